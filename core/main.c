/*
 * main.c - the `ezproxy` command line: run, check, plugins, version, and the
 * remote commands watch, key and fault (cli_watch.c, cli_remote.c, cli_fault.c; their HTTP and
 * WebSocket client: cli_http.c, cli_ws.c).
 * Thread: the main thread, which becomes the control thread of the daemon.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli_remote.h"
#include "core.h"

static void usage(FILE *out)
{
	fprintf(out,
		"usage: ezproxy run [-c FILE] [--workers N] [--log-level LEVEL]\n"
		"       ezproxy run --listen ADDR --server ADDR [--network tcp|udp|both]\n"
		"       ezproxy check FILE\n"
		"       ezproxy plugins [--plugin-path DIR]\n"
		"       ezproxy version\n"
		"       ezproxy watch [--pipeline NAME] [--hex] [--max-bytes N] [REMOTE]\n"
		"       ezproxy key create --perms LIST [--name NAME] [REMOTE]\n"
		"       ezproxy fault set|clear|show PIPELINE [--session ID] [OPTIONS] [REMOTE]\n"
		"\n"
		"With no config file the built-in default runs: tcp and udp 127.0.0.1:5554 ->\n"
		"127.0.0.1:5555. Plugins are found beside the binary, in $EZP_PLUGIN_PATH and in\n"
		"the config's Plugins.Path.\n"
		"\n"
		"watch, key and fault talk to a running daemon's API. REMOTE: --api http://HOST:PORT\n"
		"(default: -c FILE's Api.Listen, else http://127.0.0.1:8080) and --key KEY\n"
		"(default: $EZP_KEY, else StateDir/admin.key of -c FILE or the default StateDir).\n");
}

static int die(const char *what, const struct ezp_error *err)
{
	if (err->line)
		fprintf(stderr, "ezproxy: %s: %s:%d:%d: %s\n", what, err->file, err->line,
			err->column, err->message);
	else
		fprintf(stderr, "ezproxy: %s: %s\n", what, err->message[0] ? err->message
									    : ezp_status_str(err->code));
	return 1;
}

static char *read_file(const char *path, struct ezp_error *err)
{
	FILE *f = fopen(path, "rb");
	char *buf = NULL;
	long n;

	if (!f) {
		ezp__error_set(err, EZP_ERR_IO, EZP_SIDE_CONFIG, path, 0, 0,
			       "cannot read config '%s': %s", path, strerror(errno));
		return NULL;
	}
	if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && n <= 4 << 20 &&
	    fseek(f, 0, SEEK_SET) == 0 && (buf = malloc((size_t)n + 1))) {
		if (fread(buf, 1, (size_t)n, f) != (size_t)n) {
			free(buf);
			buf = NULL;
		} else {
			buf[n] = '\0';
		}
	}
	fclose(f);
	if (!buf)
		ezp__error_set(err, EZP_ERR_IO, EZP_SIDE_CONFIG, path, 0, 0,
			       "cannot read config '%s' (unreadable or over 4 MiB)", path);
	return buf;
}

/* The YAML of `run --listen --server --network`. */
static char *quick_config(const char *listen, const char *server, const char *network)
{
	char *out = NULL;
	int tcp = !strcmp(network, "tcp") || !strcmp(network, "both");
	int udp = !strcmp(network, "udp") || !strcmp(network, "both");
	size_t len;
	FILE *f = open_memstream(&out, &len);

	if (!f)
		return NULL;
	fprintf(f, "Api: {Enable: false}\nPipelines:\n");
	if (tcp)
		fprintf(f, "  - Name: tcp\n    From: {tcp: {Listen: \"%s\"}}\n"
			   "    To: {tcp: {Connect: \"%s\"}}\n", listen, server);
	if (udp)
		fprintf(f, "  - Name: udp\n    From: {udp: {Listen: \"%s\"}}\n"
			   "    To: {udp: {Connect: \"%s\"}}\n", listen, server);
	fclose(f);
	return out;
}

static int cmd_run(int argc, char **argv)
{
	static const struct option opts[] = {
		{"config", required_argument, NULL, 'c'},
		{"listen", required_argument, NULL, 'l'},
		{"server", required_argument, NULL, 's'},
		{"network", required_argument, NULL, 'n'},
		{"workers", required_argument, NULL, 'w'},
		{"log-level", required_argument, NULL, 'L'},
		{"plugin-path", required_argument, NULL, 'P'},
		{"help", no_argument, NULL, 'h'},
		{0},
	};
	const char *config = NULL, *listen = NULL, *server = NULL, *network = "both";
	const char *paths[16] = {0};
	struct ezp_daemon_opts dopts = {.struct_size = sizeof(dopts), .log_level = -1,
					.plugin_paths = paths};
	struct ezp_error err = {0};
	struct ezp_daemon *d;
	char *yaml = NULL;
	unsigned n_paths = 0;
	sigset_t set;
	int c, rc;

	while ((c = getopt_long(argc, argv, "c:h", opts, NULL)) != -1) {
		switch (c) {
		case 'c': config = optarg; break;
		case 'l': listen = optarg; break;
		case 's': server = optarg; break;
		case 'n': network = optarg; break;
		case 'w': dopts.workers = (unsigned)atoi(optarg); break;
		case 'L':
			dopts.log_level = !strcmp(optarg, "debug") ? EZP_LOG_DEBUG
					  : !strcmp(optarg, "info") ? EZP_LOG_INFO
					  : !strcmp(optarg, "warn") ? EZP_LOG_WARN
					  : !strcmp(optarg, "error") ? EZP_LOG_ERROR : -2;
			if (dopts.log_level == -2) {
				fprintf(stderr, "ezproxy: --log-level must be debug, info, warn or error\n");
				return 2;
			}
			break;
		case 'P':
			if (n_paths + 1 < EZP_ARRAY_LEN(paths))
				paths[n_paths++] = optarg;
			break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "ezproxy: unexpected argument '%s'; see 'ezproxy run --help'\n",
			argv[optind]);
		return 2;
	}
	if ((listen || server) && config) {
		fprintf(stderr, "ezproxy: use either -c FILE or --listen/--server, not both\n");
		return 2;
	}
	if (listen || server) {
		if (!listen || !server) {
			fprintf(stderr, "ezproxy: --listen and --server go together\n");
			return 2;
		}
		if (strcmp(network, "tcp") && strcmp(network, "udp") && strcmp(network, "both")) {
			fprintf(stderr, "ezproxy: --network must be tcp, udp or both\n");
			return 2;
		}
		yaml = quick_config(listen, server, network);
	} else if (config && !(yaml = read_file(config, &err))) {
		return die("cannot start", &err);
	}
	/* signals go to the control thread's sigwait, never to a worker */
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);
	rc = ezp_daemon_new(yaml, config ? config : (listen ? "<command line>" : NULL), &dopts, &d,
			    &err);
	free(yaml);
	if (rc != EZP_OK)
		return die("cannot start", &err);
	rc = ezp_daemon_start(d, &err);
	if (rc != EZP_OK) {
		ezp_daemon_free(d);
		return die("cannot start", &err);
	}
	ezp_daemon_run_signals(d, config);
	ezp_daemon_free(d);
	return 0;
}

static int cmd_check(int argc, char **argv)
{
	struct ezp_daemon_opts dopts = {.struct_size = sizeof(dopts), .workers = 1,
					.log_level = EZP_LOG_ERROR};
	struct ezp_error err = {0};
	struct ezp_daemon *d;
	char *yaml, *dump;

	if (argc != 2) {
		fprintf(stderr, "usage: ezproxy check FILE\n");
		return 2;
	}
	ezp__log_setup(EZP_LOG_ERROR, EZP__LOG_TEXT);
	yaml = read_file(argv[1], &err);
	if (!yaml)
		return die("invalid config", &err);
	if (ezp_daemon_new(yaml, argv[1], &dopts, &d, &err) != EZP_OK) {
		free(yaml);
		return die("invalid config", &err);
	}
	free(yaml);
	dump = ezp_daemon_config_dump(d);
	printf("# %s is valid; resolved config:\n%s", argv[1], dump ? dump : "");
	free(dump);
	ezp_daemon_free(d);
	return 0;
}

static void print_params(const char *title, const struct ezp_param *pr)
{
	if (!pr)
		return;
	printf("      %s:\n", title);
	for (; pr->key; pr++)
		printf("        %-18s %-7s %s%s%s%s\n", pr->key,
		       (const char *[]){"?", "string", "int", "bool", "double", "address",
					"ms"}[pr->type <= 6 ? pr->type : 0],
		       pr->doc ? pr->doc : "", pr->required ? " (required)" : "",
		       pr->def ? "; default " : "", pr->def ? pr->def : "");
}

static int cmd_plugins(int argc, char **argv)
{
	struct ezp_core_ctx *d;
	struct ezp_daemon_opts dopts = {.struct_size = sizeof(dopts), .workers = 1,
					.log_level = EZP_LOG_ERROR};
	struct ezp_error err = {0};
	struct ezp__plugin *pl;
	const char *paths[2] = {0};

	if (argc == 3 && !strcmp(argv[1], "--plugin-path")) {
		paths[0] = argv[2];
		dopts.plugin_paths = paths;
	} else if (argc != 1) {
		fprintf(stderr, "usage: ezproxy plugins [--plugin-path DIR]\n");
		return 2;
	}
	ezp__log_setup(EZP_LOG_ERROR, EZP__LOG_TEXT);
	if (ezp_daemon_new("Pipelines: []\n", "<plugins>", &dopts, (struct ezp_daemon **)&d, &err) !=
	    EZP_OK)
		return die("cannot load plugins", &err);
	printf("core: SDK ABI %d.%d\n", EZP_ABI_MAJOR, EZP_ABI_MINOR);
	LIST_FOREACH(pl, &d->reg.plugins, link) {
		const struct ezp_plugin_desc *ds = pl->desc;
		printf("%s %s (ABI %u.%u) - %s\n  %s\n", ds->name, ds->version ? ds->version : "?",
		       ds->abi_major, ds->abi_minor, ds->description ? ds->description : "",
		       pl->path);
		for (size_t i = 0; ds->transports && ds->transports[i]; i++) {
			const struct ezp_transport_kind *k = ds->transports[i];
			printf("    transport %s: %s\n", k->name, k->description ? k->description : "");
			print_params("From", k->listen_params);
			print_params("To", k->connect_params);
		}
		for (size_t i = 0; ds->filters && ds->filters[i]; i++) {
			const struct ezp_filter_kind *k = ds->filters[i];
			printf("    filter %s: %s%s\n", k->name, k->description ? k->description : "",
			       k->flags & EZP_FILTER_EXCLUSIVE ? " (exclusive, claimable)" : "");
			print_params("Through", k->params);
		}
		for (size_t i = 0; ds->services && ds->services[i]; i++)
			printf("    service %s: %s\n", ds->services[i]->name,
			       ds->services[i]->description ? ds->services[i]->description : "");
	}
	ezp_daemon_free((struct ezp_daemon *)d);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	if (!strcmp(argv[1], "run"))
		return cmd_run(argc - 1, argv + 1);
	if (!strcmp(argv[1], "check"))
		return cmd_check(argc - 1, argv + 1);
	if (!strcmp(argv[1], "plugins"))
		return cmd_plugins(argc - 1, argv + 1);
	if (!strcmp(argv[1], "watch"))
		return ezp__cli_watch(argc - 1, argv + 1);
	if (!strcmp(argv[1], "key"))
		return ezp__cli_key(argc - 1, argv + 1);
	if (!strcmp(argv[1], "fault"))
		return ezp__cli_fault(argc - 1, argv + 1);
	if (!strcmp(argv[1], "version") || !strcmp(argv[1], "--version")) {
		printf("ezproxy %s (SDK ABI %d.%d)\n", EZP_VERSION, EZP_ABI_MAJOR, EZP_ABI_MINOR);
		return 0;
	}
	if (!strcmp(argv[1], "help") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
		usage(stdout);
		return 0;
	}
	fprintf(stderr, "ezproxy: unknown command '%s'; try 'ezproxy help'\n", argv[1]);
	return 2;
}
