/*
 * cli_fault.c - `ezproxy fault set|clear|show PIPELINE [--session ID] ...`:
 * the faults of a running daemon's pipeline or session through its API
 * (GET/PUT /api/3/pipelines/{name}/faults, /api/3/sessions/{id}/faults;
 * docs/fault.md). `set` reads the faults first and changes only the
 * direction(s) asked for, so setting one direction keeps the other's.
 * Exit codes as `ezproxy watch`: 0 done, 1 the daemon refused or could not
 * be reached, 2 bad usage. Errors: one line on stderr saying what to do.
 * Thread: the CLI process's main thread (single-threaded).
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli_remote.h"

/* What `set` was given; has_* says which options appeared. */
struct fault_args {
	const char *cmd, *pipeline, *session, *direction;
	long long latency, jitter, bandwidth, seed, freeze_max;
	double loss;
	int has_latency, has_jitter, has_loss, has_bandwidth, has_seed, has_freeze_max;
	int freeze, blackhole, json;
};

static void fault_usage(FILE *out)
{
	fprintf(out,
		"usage: ezproxy fault set PIPELINE [--session ID] [--direction "
		"both|to_server|to_client]\n"
		"                 [--latency MS] [--jitter MS] [--loss X] [--bandwidth BPS] "
		"[--freeze]\n"
		"                 [--blackhole] [--seed N] [--freeze-max MS] [REMOTE]\n"
		"       ezproxy fault clear PIPELINE [--session ID] [REMOTE]\n"
		"       ezproxy fault show PIPELINE [--session ID] [--json] [REMOTE]\n"
		"  set replaces the faults of the direction(s) given (default both) and keeps the\n"
		"  other direction's; clear removes them all (for a session: its own, so its\n"
		"  pipeline's apply again). REMOTE: --api URL, -c FILE, --key KEY (as ezproxy "
		"watch).\n");
}

/* A whole number option in 0..@max; 0 on success, else 2 after saying why. */
static int fault_num(const char *opt, const char *s, long long max, long long *out)
{
	char *end;
	long long v;

	errno = 0;
	v = strtoll(s, &end, 10);
	if (errno || end == s || *end || v < 0 || v > max) {
		fprintf(stderr, "ezproxy: %s must be a whole number in 0..%lld, not '%s'\n", opt,
			max, s);
		return 2;
	}
	*out = v;
	return 0;
}

static int fault_parse(int argc, char **argv, struct fault_args *a, struct ezp__cli_remote *r)
{
	static const struct option opts[] = {
	    {"session", required_argument, NULL, 's'}, {"direction", required_argument, NULL, 'd'},
	    {"latency", required_argument, NULL, 'L'}, {"jitter", required_argument, NULL, 'J'},
	    {"loss", required_argument, NULL, 'l'},    {"bandwidth", required_argument, NULL, 'b'},
	    {"freeze", no_argument, NULL, 'F'},	       {"blackhole", no_argument, NULL, 'B'},
	    {"seed", required_argument, NULL, 'S'},    {"freeze-max", required_argument, NULL, 'M'},
	    {"json", no_argument, NULL, 'j'},	       {"api", required_argument, NULL, 'a'},
	    {"key", required_argument, NULL, 'k'},     {"config", required_argument, NULL, 'c'},
	    {"help", no_argument, NULL, 'h'},	       {0},
	};
	int c, li = -1, set = !strcmp(a->cmd, "set");
	char *end;

	optind = 1;
	while ((c = getopt_long(argc, argv, "c:h", opts, &li)) != -1) {
		if (!set && c > 0 && strchr("dLJlbFBSM", c)) {
			fprintf(stderr,
				"ezproxy: fault %s takes no fault values (--%s); use "
				"'ezproxy fault set'\n",
				a->cmd, li >= 0 ? opts[li].name : "?");
			return 2;
		}
		switch (c) {
		case 's':
			a->session = optarg;
			if (!optarg[0] || strspn(optarg, "0123456789") != strlen(optarg) ||
			    strlen(optarg) > 20) {
				fprintf(stderr,
					"ezproxy: --session takes a session id (a number, as "
					"in GET /api/3/sessions), not '%s'\n",
					optarg);
				return 2;
			}
			break;
		case 'd':
			if (strcmp(optarg, "both") && strcmp(optarg, "to_server") &&
			    strcmp(optarg, "to_client")) {
				fprintf(stderr,
					"ezproxy: --direction must be both, to_server or "
					"to_client, not '%s'\n",
					optarg);
				return 2;
			}
			a->direction = optarg;
			break;
		case 'L':
			a->has_latency = 1;
			if (fault_num("--latency", optarg, 300000, &a->latency))
				return 2;
			break;
		case 'J':
			a->has_jitter = 1;
			if (fault_num("--jitter", optarg, 300000, &a->jitter))
				return 2;
			break;
		case 'b':
			a->has_bandwidth = 1;
			if (fault_num("--bandwidth", optarg, 100000000000ll, &a->bandwidth))
				return 2;
			break;
		case 'S':
			a->has_seed = 1;
			if (fault_num("--seed", optarg, 9223372036854775807ll, &a->seed))
				return 2;
			break;
		case 'M':
			a->has_freeze_max = 1;
			if (fault_num("--freeze-max", optarg, 600000, &a->freeze_max))
				return 2;
			break;
		case 'l':
			errno = 0;
			a->loss = strtod(optarg, &end);
			if (errno || end == optarg || *end || !(a->loss >= 0 && a->loss <= 1)) {
				fprintf(stderr,
					"ezproxy: --loss must be a number in 0..1 (the share "
					"of packets dropped: 0.05 is 5%%), not '%s'\n",
					optarg);
				return 2;
			}
			a->has_loss = 1;
			break;
		case 'F':
			a->freeze = 1;
			break;
		case 'B':
			a->blackhole = 1;
			break;
		case 'j':
			a->json = 1;
			break;
		case 'h':
			fault_usage(stdout);
			return -1;
		default:
			if (ezp__cli_remote_opt(r, c, optarg))
				break;
			fault_usage(stderr);
			return 2;
		}
	}
	if (optind >= argc) {
		fprintf(stderr,
			"ezproxy: fault %s needs a PIPELINE name; see 'ezproxy fault "
			"--help'\n",
			a->cmd);
		return 2;
	}
	a->pipeline = argv[optind++];
	if (optind < argc) {
		fprintf(stderr, "ezproxy: unexpected argument '%s'; see 'ezproxy fault --help'\n",
			argv[optind]);
		return 2;
	}
	return 0;
}

/* ---- talking to the API ---- */

/* One request; 0 with the answer as JSON in *@out, else the exit code (said why). */
static int fault_call(struct ezp__cli_remote *r, const char *method, const char *path,
		      const char *body, const char *perm, json_t **out)
{
	struct ezp__cli_reply rep = {0};
	char msg[512];
	int rc = 1;

	*out = NULL;
	if (ezp__cli_http(&r->api, method, path, body, &rep, msg, sizeof(msg))) {
		fprintf(stderr, "ezproxy: %s\n", msg);
		goto done;
	}
	if (rep.status != 200) {
		rc = ezp__cli_api_refused(r, &rep, perm);
		goto done;
	}
	*out = json_loadb(rep.body, rep.body_len, JSON_REJECT_DUPLICATES, NULL);
	if (!json_is_object(*out)) {
		json_decref(*out);
		*out = NULL;
		fprintf(stderr,
			"ezproxy: the ezproxy API at %s answered %s %s with something "
			"else than JSON; is --api really an ezproxy v3 API?\n",
			r->api.url, method, path);
		goto done;
	}
	rc = 0;
done:
	ezp__cli_reply_clear(&rep);
	return rc;
}

/* A session of another pipeline than the one named is a mistake worth stopping at. */
static int fault_check_session(struct ezp__cli_remote *r, const struct fault_args *a)
{
	char path[96];
	const char *p;
	json_t *s;
	int rc;

	snprintf(path, sizeof(path), "/api/3/sessions/%s", a->session);
	if ((rc = fault_call(r, "GET", path, NULL, "CheckStatus", &s)))
		return rc;
	p = json_string_value(json_object_get(s, "pipeline"));
	if (p && strcmp(p, a->pipeline)) {
		char pn[80];
		snprintf(pn, sizeof(pn), "%s", p);
		ezp__cli_scrub(pn);
		fprintf(stderr, "ezproxy: session %s belongs to pipeline '%s', not '%s'\n",
			a->session, pn, a->pipeline);
		rc = 1;
	}
	json_decref(s);
	return rc;
}

static void fault_print_dir(const char *name, json_t *d)
{
	long long lat = json_integer_value(json_object_get(d, "latency_ms"));
	long long jit = json_integer_value(json_object_get(d, "jitter_ms"));
	long long bw = json_integer_value(json_object_get(d, "bandwidth_bps"));
	double loss = json_number_value(json_object_get(d, "loss"));
	int fr = json_is_true(json_object_get(d, "freeze"));
	int bh = json_is_true(json_object_get(d, "blackhole"));
	int any = 0;

	printf("  %-9s", name);
	if (lat && ++any)
		printf(" latency %lld ms", lat);
	if (jit && ++any)
		printf("%s jitter %lld ms", any > 1 ? "," : "", jit);
	if (loss > 0 && ++any)
		printf("%s loss %g", any > 1 ? "," : "", loss);
	if (bw && ++any)
		printf("%s bandwidth %lld bps", any > 1 ? "," : "", bw);
	if (fr && ++any)
		printf("%s frozen", any > 1 ? "," : "");
	if (bh && ++any)
		printf("%s blackhole", any > 1 ? "," : "");
	printf("%s\n", any ? "" : " none");
}

static void fault_print(const struct fault_args *a, json_t *f)
{
	json_t *own = json_object_get(f, "own");

	if (a->json) {
		char *text =
		    json_dumps(f, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(15));
		printf("%s\n", text ? text : "{}");
		free(text);
		return;
	}
	if (a->session)
		printf("session %s of pipeline %s: %s\n", a->session, a->pipeline,
		       json_is_true(own) ? "its own faults" : "its pipeline's faults");
	else
		printf("pipeline %s:\n", a->pipeline);
	fault_print_dir("to_server", json_object_get(f, "to_server"));
	fault_print_dir("to_client", json_object_get(f, "to_client"));
	printf("  seed %lld, freeze max %lld ms\n",
	       (long long)json_integer_value(json_object_get(f, "seed")),
	       (long long)json_integer_value(json_object_get(f, "freeze_max_ms")));
}

/* The new direction object for `set`. */
static json_t *fault_dir_new(const struct fault_args *a)
{
	json_t *d = json_object();

	if (a->has_latency)
		json_object_set_new(d, "latency_ms", json_integer(a->latency));
	if (a->has_jitter)
		json_object_set_new(d, "jitter_ms", json_integer(a->jitter));
	if (a->has_loss)
		json_object_set_new(d, "loss", json_real(a->loss));
	if (a->has_bandwidth)
		json_object_set_new(d, "bandwidth_bps", json_integer(a->bandwidth));
	if (a->freeze)
		json_object_set_new(d, "freeze", json_true());
	if (a->blackhole)
		json_object_set_new(d, "blackhole", json_true());
	return d;
}

/* GET the faults, replace the asked direction(s), PUT. */
static int fault_set(struct ezp__cli_remote *r, const struct fault_args *a, const char *path,
		     json_t **out)
{
	const char *dir = a->direction ? a->direction : "both";
	json_t *cur, *body;
	char *text;
	int rc;

	if ((rc = fault_call(r, "GET", path, NULL, "CheckStatus", &cur)))
		return rc;
	body = json_object();
	for (int i = 0; i < 2; i++) {
		const char *name = i ? "to_client" : "to_server";
		if (!strcmp(dir, "both") || !strcmp(dir, name))
			json_object_set_new(body, name, fault_dir_new(a));
		else
			json_object_set(body, name, json_object_get(cur, name));
	}
	json_object_set_new(body, "seed",
			    a->has_seed ? json_integer(a->seed)
					: json_incref(json_object_get(cur, "seed")));
	json_object_set_new(body, "freeze_max_ms",
			    a->has_freeze_max ? json_integer(a->freeze_max)
					      : json_incref(json_object_get(cur, "freeze_max_ms")));
	json_decref(cur);
	text = json_dumps(body, JSON_COMPACT);
	json_decref(body);
	if (!text) {
		fprintf(stderr, "ezproxy: out of memory\n");
		return 1;
	}
	rc = fault_call(r, "PUT", path, text, "Reconfigure", out);
	free(text);
	return rc;
}

int ezp__cli_fault(int argc, char **argv)
{
	struct ezp__cli_remote r = {0};
	struct fault_args a = {0};
	json_t *ans = NULL;
	char path[160];
	int rc;

	if (argc < 2 ||
	    (strcmp(argv[1], "set") && strcmp(argv[1], "clear") && strcmp(argv[1], "show"))) {
		if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
			fault_usage(stdout);
			return 0;
		}
		fprintf(stderr,
			"ezproxy: %s%s%suse 'ezproxy fault set|clear|show PIPELINE' (see "
			"'ezproxy fault --help')\n",
			argc >= 2 ? "unknown fault command '" : "", argc >= 2 ? argv[1] : "",
			argc >= 2 ? "'; " : "");
		return 2;
	}
	a.cmd = argv[1];
	rc = fault_parse(argc - 1, argv + 1, &a, &r);
	if (rc)
		return rc < 0 ? 0 : rc;
	if ((strlen(a.pipeline) > 64 ||
	     strspn(a.pipeline, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
				"0123456789_.-") != strlen(a.pipeline))) {
		fprintf(stderr, "ezproxy: '%s' is not a pipeline name (letters, digits, _ . -)\n",
			a.pipeline);
		return 2;
	}
	if ((rc = ezp__cli_remote_resolve(&r)))
		goto done;
	signal(SIGPIPE, SIG_IGN);
	if (a.session) {
		snprintf(path, sizeof(path), "/api/3/sessions/%s/faults", a.session);
		if ((rc = fault_check_session(&r, &a)))
			goto done;
	} else {
		snprintf(path, sizeof(path), "/api/3/pipelines/%s/faults", a.pipeline);
	}
	if (!strcmp(a.cmd, "show"))
		rc = fault_call(&r, "GET", path, NULL, "CheckStatus", &ans);
	else if (!strcmp(a.cmd, "clear"))
		rc = fault_call(&r, "PUT", path, "{}", "Reconfigure", &ans);
	else
		rc = fault_set(&r, &a, path, &ans);
	if (!rc)
		fault_print(&a, ans);
done:
	json_decref(ans);
	ezp__cli_remote_clear(&r);
	return rc;
}
