/*
 * loader.c - the plugin loader and registry: dlopen a shared object, read
 * its one descriptor symbol after checking the ABI version, initialise it
 * and index the kinds it provides. Thread: control.
 */
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core.h"

#ifndef EZP_PLUGIN_INSTALL_DIR
#define EZP_PLUGIN_INSTALL_DIR "/usr/local/lib/ezproxy/plugins"
#endif

/* struct_size a plugin must have for each minor it claims (index = minor). */
static const size_t desc_size_for_minor[] = {
	offsetof(struct ezp_plugin_desc, services) + sizeof(void *),
};

/* Smallest size of each kind struct: every required member present. */
#define KIND_MIN(type, last) (offsetof(type, last) + sizeof(((type *)0)->last))

int ezp__plugin_check(const struct ezp_plugin_desc *desc, const char *path,
		      struct ezp_error *err)
{
	if (desc->abi_major != EZP_ABI_MAJOR)
		return ezp__error_set(err, EZP_ERR_ABI, EZP_SIDE_INTERNAL, path, 0, 0,
				      "plugin %s was built for SDK ABI %u.%u but this core speaks "
				      "%d.%d; rebuild the plugin against ezproxy-sdk %d.x",
				      path, desc->abi_major, desc->abi_minor, EZP_ABI_MAJOR,
				      EZP_ABI_MINOR, EZP_ABI_MAJOR);
	if (desc->abi_minor > EZP_ABI_MINOR)
		return ezp__error_set(err, EZP_ERR_ABI, EZP_SIDE_INTERNAL, path, 0, 0,
				      "plugin %s needs SDK ABI %u.%u but this core speaks %d.%d; "
				      "upgrade ezproxy or rebuild the plugin for %d.%d",
				      path, desc->abi_major, desc->abi_minor, EZP_ABI_MAJOR,
				      EZP_ABI_MINOR, EZP_ABI_MAJOR, EZP_ABI_MINOR);
	if (desc->struct_size < desc_size_for_minor[desc->abi_minor])
		return ezp__error_set(err, EZP_ERR_ABI, EZP_SIDE_INTERNAL, path, 0, 0,
				      "plugin %s has a descriptor of %zu bytes, smaller than the "
				      "%zu bytes of ABI %u.%u; rebuild it with EZP_PLUGIN_DEFINE",
				      path, desc->struct_size,
				      desc_size_for_minor[desc->abi_minor], desc->abi_major,
				      desc->abi_minor);
	if (!desc->name || !*desc->name)
		return ezp__error_set(err, EZP_ERR_PLUGIN, EZP_SIDE_INTERNAL, path, 0, 0,
				      "plugin %s has no name", path);
	for (size_t i = 0; desc->transports && desc->transports[i]; i++) {
		const struct ezp_transport_kind *k = desc->transports[i];
		if (k->struct_size < KIND_MIN(struct ezp_transport_kind, close) || !k->name ||
		    !k->send || !k->close || !k->pause || !k->resume || !k->shutdown_write ||
		    (k->listen_params && (!k->listen || !k->unlisten)) ||
		    (k->connect_params && !k->connect))
			return ezp__error_set(err, EZP_ERR_ABI, EZP_SIDE_INTERNAL, path, 0, 0,
					      "plugin %s: transport #%zu is incomplete "
					      "(struct too small or a required callback is NULL)",
					      desc->name, i);
	}
	for (size_t i = 0; desc->filters && desc->filters[i]; i++) {
		const struct ezp_filter_kind *k = desc->filters[i];
		if (k->struct_size < KIND_MIN(struct ezp_filter_kind, destroy) || !k->name ||
		    !k->create || !k->destroy ||
		    (!k->packet && !(k->flags & EZP_FILTER_EXCLUSIVE)))
			return ezp__error_set(err, EZP_ERR_ABI, EZP_SIDE_INTERNAL, path, 0, 0,
					      "plugin %s: filter #%zu is incomplete "
					      "(struct too small or a required callback is NULL)",
					      desc->name, i);
	}
	for (size_t i = 0; desc->services && desc->services[i]; i++) {
		const struct ezp_service_kind *k = desc->services[i];
		if (k->struct_size < KIND_MIN(struct ezp_service_kind, iface) || !k->name ||
		    !k->start || !k->stop)
			return ezp__error_set(err, EZP_ERR_ABI, EZP_SIDE_INTERNAL, path, 0, 0,
					      "plugin %s: service #%zu is incomplete", desc->name, i);
	}
	return EZP_OK;
}

static struct ezp__plugin *registry_find(struct ezp_core_ctx *d, const char *name)
{
	struct ezp__plugin *pl;

	LIST_FOREACH(pl, &d->reg.plugins, link)
		if (!strcmp(pl->desc->name, name))
			return pl;
	return NULL;
}

/* Refuse a plugin whose kind names are already provided by another. */
static int registry_conflicts(struct ezp_core_ctx *d, const struct ezp_plugin_desc *desc,
			      const char *path, struct ezp_error *err)
{
	for (size_t i = 0; desc->transports && desc->transports[i]; i++)
		if (ezp__registry_transport(d, desc->transports[i]->name))
			return ezp__error_set(err, EZP_ERR_EXISTS, EZP_SIDE_INTERNAL, path, 0, 0,
					      "plugin %s: transport '%s' is already provided by "
					      "another plugin",
					      desc->name, desc->transports[i]->name);
	for (size_t i = 0; desc->filters && desc->filters[i]; i++)
		if (ezp__registry_filter(d, desc->filters[i]->name))
			return ezp__error_set(err, EZP_ERR_EXISTS, EZP_SIDE_INTERNAL, path, 0, 0,
					      "plugin %s: filter '%s' is already provided by "
					      "another plugin",
					      desc->name, desc->filters[i]->name);
	for (size_t i = 0; desc->services && desc->services[i]; i++)
		if (ezp__registry_service(d, desc->services[i]->name))
			return ezp__error_set(err, EZP_ERR_EXISTS, EZP_SIDE_INTERNAL, path, 0, 0,
					      "plugin %s: service '%s' is already provided by "
					      "another plugin",
					      desc->name, desc->services[i]->name);
	return EZP_OK;
}

static int registry_add(struct ezp_core_ctx *d, const struct ezp_plugin_desc *desc, void *handle,
			const char *path, struct ezp_error *err)
{
	struct ezp__plugin *pl;
	int rc;

	rc = ezp__plugin_check(desc, path, err);
	if (rc != EZP_OK)
		return rc;
	if (registry_find(d, desc->name)) {
		ezp__log(EZP_LOG_DEBUG, "loader", "plugin %s from %s already loaded; skipped",
			 desc->name, path);
		return EZP_ERR_EXISTS;
	}
	rc = registry_conflicts(d, desc, path, err);
	if (rc != EZP_OK)
		return rc;
	if (desc->init) {
		rc = desc->init(&d->table, err);
		if (rc != EZP_OK) {
			if (!err->message[0])
				ezp__error_set(err, rc, EZP_SIDE_INTERNAL, path, 0, 0,
					       "plugin %s failed to initialise: %s", desc->name,
					       ezp__status_str(rc));
			return rc;
		}
	}
	pl = calloc(1, sizeof(*pl));
	if (!pl) {
		if (desc->fini)
			desc->fini();
		return ezp__error_set(err, EZP_ERR_NOMEM, EZP_SIDE_INTERNAL, path, 0, 0,
				      "out of memory");
	}
	pl->desc = desc;
	pl->handle = handle;
	pl->path = strdup(path);
	pl->initialised = 1;
	LIST_INSERT_HEAD(&d->reg.plugins, pl, link);
	ezp__log(EZP_LOG_DEBUG, "loader", "loaded plugin %s %s from %s", desc->name,
		 desc->version ? desc->version : "?", path);
	return EZP_OK;
}

int ezp__registry_add_builtin(struct ezp_core_ctx *d, const struct ezp_plugin_desc *desc,
			      struct ezp_error *err)
{
	return registry_add(d, desc, NULL, "<builtin>", err);
}

int ezp__registry_load(struct ezp_core_ctx *d, const char *path, struct ezp_error *err)
{
	const struct ezp_plugin_desc *desc;
	void *handle;
	int rc;

	handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!handle)
		return ezp__error_set(err, EZP_ERR_PLUGIN, EZP_SIDE_INTERNAL, path, 0, 0,
				      "cannot load plugin %s: %s", path, dlerror());
	desc = dlsym(handle, EZP_PLUGIN_SYMBOL);
	if (!desc) {
		dlclose(handle);
		return ezp__error_set(err, EZP_ERR_PLUGIN, EZP_SIDE_INTERNAL, path, 0, 0,
				      "%s is not an EzProxy plugin: it does not export the "
				      "symbol '%s' (define it with EZP_PLUGIN_DEFINE)",
				      path, EZP_PLUGIN_SYMBOL);
	}
	rc = registry_add(d, desc, handle, path, err);
	if (rc != EZP_OK)
		dlclose(handle);
	return rc;
}

static int has_suffix(const char *s, const char *suffix)
{
	size_t n = strlen(s), m = strlen(suffix);

	return n > m && !strcmp(s + n - m, suffix);
}

/* Load every *.so in @dir; recurse one level when @depth > 0. */
static void scan_dir(struct ezp_core_ctx *d, const char *dir, int depth)
{
	struct dirent **names;
	int n = scandir(dir, &names, NULL, alphasort);

	for (int i = 0; i < n; i++) {
		char path[PATH_MAX];
		struct stat st;
		const char *e = names[i]->d_name;

		if (e[0] == '.' || snprintf(path, sizeof(path), "%s/%s", dir, e) >= (int)sizeof(path))
			goto next;
		if (stat(path, &st) != 0)
			goto next;
		if (S_ISDIR(st.st_mode) && depth > 0) {
			scan_dir(d, path, depth - 1);
		} else if (S_ISREG(st.st_mode) && has_suffix(e, ".so")) {
			struct ezp_error err = {0};
			int rc = ezp__registry_load(d, path, &err);
			if (rc != EZP_OK && rc != EZP_ERR_EXISTS)
				ezp__log(EZP_LOG_WARN, "loader", "%s", err.message);
		}
	next:
		free(names[i]);
	}
	if (n >= 0)
		free(names);
}

int ezp__registry_scan(struct ezp_core_ctx *d, const char *dir, struct ezp_error *err)
{
	char real[PATH_MAX];
	struct stat st;
	char **grown;

	if (!realpath(dir, real) || stat(real, &st) != 0 || !S_ISDIR(st.st_mode))
		return ezp__error_set(err, EZP_ERR_NOT_FOUND, EZP_SIDE_CONFIG, dir, 0, 0,
				      "plugin folder '%s' does not exist", dir);
	for (size_t i = 0; i < d->reg.n_searched; i++)
		if (!strcmp(d->reg.searched[i], real))
			return EZP_OK;
	grown = realloc(d->reg.searched, (d->reg.n_searched + 1) * sizeof(*grown));
	if (!grown)
		return EZP_ERR_NOMEM;
	d->reg.searched = grown;
	d->reg.searched[d->reg.n_searched++] = strdup(real);
	scan_dir(d, real, 1);
	return EZP_OK;
}

int ezp__registry_scan_defaults(struct ezp_core_ctx *d, struct ezp_error *err)
{
	char exe[PATH_MAX], dir[PATH_MAX + 16];
	const char *env = getenv("EZP_PLUGIN_PATH");
	ssize_t n;

	(void)err;
	if (env && *env) {
		char *copy = strdup(env), *save = NULL;
		for (char *t = strtok_r(copy, ":", &save); t; t = strtok_r(NULL, ":", &save)) {
			struct ezp_error e = {0};
			if (ezp__registry_scan(d, t, &e) != EZP_OK)
				ezp__log(EZP_LOG_WARN, "loader", "%s", e.message);
		}
		free(copy);
	}
	n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
	if (n > 0) {
		exe[n] = '\0';
		char *slash = strrchr(exe, '/');
		if (slash) {
			struct ezp_error e = {0};
			*slash = '\0';
			snprintf(dir, sizeof(dir), "%s/plugins", exe);
			if (access(dir, F_OK) == 0)
				ezp__registry_scan(d, dir, &e);
			snprintf(dir, sizeof(dir), "%s/../plugins", exe);
			if (access(dir, F_OK) == 0)
				ezp__registry_scan(d, dir, &e);
		}
	}
	if (access(EZP_PLUGIN_INSTALL_DIR, F_OK) == 0) {
		struct ezp_error e = {0};
		ezp__registry_scan(d, EZP_PLUGIN_INSTALL_DIR, &e);
	}
	return EZP_OK;
}

void ezp__registry_free(struct ezp_core_ctx *d)
{
	struct ezp__plugin *pl;

	while ((pl = LIST_FIRST(&d->reg.plugins))) {
		LIST_REMOVE(pl, link);
		if (pl->desc->fini)
			pl->desc->fini();
		if (pl->handle)
			dlclose(pl->handle);
		free(pl->path);
		free(pl);
	}
	for (size_t i = 0; i < d->reg.n_searched; i++)
		free(d->reg.searched[i]);
	free(d->reg.searched);
	d->reg.searched = NULL;
	d->reg.n_searched = 0;
}

const struct ezp_transport_kind *ezp__registry_transport(struct ezp_core_ctx *d,
							 const char *name)
{
	struct ezp__plugin *pl;

	LIST_FOREACH(pl, &d->reg.plugins, link)
		for (size_t i = 0; pl->desc->transports && pl->desc->transports[i]; i++)
			if (!strcmp(pl->desc->transports[i]->name, name))
				return pl->desc->transports[i];
	return NULL;
}

const struct ezp_filter_kind *ezp__registry_filter(struct ezp_core_ctx *d, const char *name)
{
	struct ezp__plugin *pl;

	LIST_FOREACH(pl, &d->reg.plugins, link)
		for (size_t i = 0; pl->desc->filters && pl->desc->filters[i]; i++)
			if (!strcmp(pl->desc->filters[i]->name, name))
				return pl->desc->filters[i];
	return NULL;
}

const struct ezp_service_kind *ezp__registry_service(struct ezp_core_ctx *d, const char *name)
{
	struct ezp__plugin *pl;

	LIST_FOREACH(pl, &d->reg.plugins, link)
		for (size_t i = 0; pl->desc->services && pl->desc->services[i]; i++)
			if (!strcmp(pl->desc->services[i]->name, name))
				return pl->desc->services[i];
	return NULL;
}

static const struct ezp_transport_kind *lookup_transport(void *arg, const char *name)
{
	return ezp__registry_transport(arg, name);
}

static const struct ezp_filter_kind *lookup_filter(void *arg, const char *name)
{
	return ezp__registry_filter(arg, name);
}

static int lookup_paths(void *arg, char *const *paths, size_t n, struct ezp_error *err)
{
	for (size_t i = 0; i < n; i++) {
		int rc = ezp__registry_scan(arg, paths[i], err);
		if (rc != EZP_OK)
			return rc;
	}
	return EZP_OK;
}

void ezp__registry_lookup(struct ezp_core_ctx *d, struct ezp__kind_lookup *lookup)
{
	lookup->arg = d;
	lookup->transport = lookup_transport;
	lookup->filter = lookup_filter;
	lookup->plugin_paths = lookup_paths;
}
