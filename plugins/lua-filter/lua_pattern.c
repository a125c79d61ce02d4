/*
 * lua_pattern.c - string.find, string.match, string.gmatch and string.gsub
 * for the sandbox, with Lua 5.4's pattern syntax and results, written here
 * so that every matching step is charged to the script's instruction
 * budget. Lua's own matcher runs inside one C call that the count hook
 * cannot interrupt, so string.find(('a'):rep(400), '.-.-.-b') would run for
 * seconds; here it stops with "instruction limit reached (pattern ...)".
 * Thread: whichever thread runs the calling Lua state.
 */
#include <ctype.h>
#include <string.h>

#include "lua_filter.h"

#define LF_MAXCAP 32     /* as LUA_MAXCAPTURES */
#define LF_MAXDEPTH 200  /* nested matcher calls, as MAXCCALLS */
#define LF_CAP_UNF (-1)  /* capture not closed yet */
#define LF_CAP_POS (-2)  /* position capture () */

struct lf_ms {
	const char *src, *src_end; /* the subject */
	const char *p_end;         /* end of the pattern */
	lua_State *L;
	struct lf_script *s;
	int level, depth;
	struct {
		const char *init;
		ptrdiff_t len;
	} cap[LF_MAXCAP];
};

static void lf_step(struct lf_ms *ms)
{
	struct lf_script *s = ms->s;

	if (--s->budget > 0 && !s->exhausted)
		return;
	s->exhausted = 1;
	luaL_error(ms->L, "instruction limit reached (pattern matching ran over InstructionLimit "
			  "%I steps)", (lua_Integer)s->instr_limit);
}

static void lf_ms_init(struct lf_ms *ms, lua_State *L, const char *s, size_t ls, const char *p,
		       size_t lp)
{
	ms->L = L;
	ms->s = lf_script_of(L);
	ms->src = s;
	ms->src_end = s + ls;
	ms->p_end = p + lp;
}

static void lf_ms_reset(struct lf_ms *ms)
{
	ms->level = 0;
	ms->depth = LF_MAXDEPTH;
}

/* ---- single characters and classes ---- */

static int lf_class(int c, int cl)
{
	int r;

	switch (tolower(cl)) {
	case 'a': r = isalpha(c); break;
	case 'c': r = iscntrl(c); break;
	case 'd': r = isdigit(c); break;
	case 'g': r = isgraph(c); break;
	case 'l': r = islower(c); break;
	case 'p': r = ispunct(c); break;
	case 's': r = isspace(c); break;
	case 'u': r = isupper(c); break;
	case 'w': r = isalnum(c); break;
	case 'x': r = isxdigit(c); break;
	case 'z': r = c == 0; break; /* deprecated in 5.4, still accepted */
	default: return cl == c;
	}
	r = r != 0;
	return isupper(cl) ? !r : r;
}

/* @p at '[', @ec at its ']' */
static int lf_set(int c, const char *p, const char *ec)
{
	int yes = 1;

	if (p[1] == '^') {
		yes = 0;
		p++;
	}
	while (++p < ec) {
		if (*p == '%') {
			p++;
			if (lf_class(c, (unsigned char)*p))
				return yes;
		} else if (p[1] == '-' && p + 2 < ec) {
			p += 2;
			if ((unsigned char)p[-2] <= c && c <= (unsigned char)*p)
				return yes;
		} else if ((unsigned char)*p == c) {
			return yes;
		}
	}
	return !yes;
}

/* The end of the single-character item at @p. */
static const char *lf_item_end(struct lf_ms *ms, const char *p)
{
	char c = *p++;

	if (c == '%') {
		if (p >= ms->p_end)
			luaL_error(ms->L, "malformed pattern (ends with '%%')");
		return p + 1;
	}
	if (c == '[') {
		if (*p == '^')
			p++;
		do {
			if (p >= ms->p_end)
				luaL_error(ms->L, "malformed pattern (missing ']')");
			if (*(p++) == '%' && p < ms->p_end)
				p++;
		} while (*p != ']');
		return p + 1;
	}
	return p;
}

static int lf_single(struct lf_ms *ms, const char *s, const char *p, const char *ep)
{
	int c;

	if (s >= ms->src_end)
		return 0;
	c = (unsigned char)*s;
	switch (*p) {
	case '.': return 1;
	case '%': return lf_class(c, (unsigned char)p[1]);
	case '[': return lf_set(c, p, ep - 1);
	default: return (unsigned char)*p == c;
	}
}

/* ---- the matcher ---- */

static const char *lf_match(struct lf_ms *ms, const char *s, const char *p);

static const char *lf_balance(struct lf_ms *ms, const char *s, const char *p)
{
	int open = 1;

	if (p + 1 >= ms->p_end)
		luaL_error(ms->L, "malformed pattern (missing arguments to '%%b')");
	if (s >= ms->src_end || *s != *p)
		return NULL;
	while (++s < ms->src_end) {
		lf_step(ms);
		if (*s == p[1]) {
			if (--open == 0)
				return s + 1;
		} else if (*s == *p) {
			open++;
		}
	}
	return NULL;
}

static const char *lf_max_expand(struct lf_ms *ms, const char *s, const char *p,
				 const char *ep)
{
	ptrdiff_t i = 0;

	while (lf_single(ms, s + i, p, ep)) {
		lf_step(ms);
		i++;
	}
	for (; i >= 0; i--) {
		const char *r = lf_match(ms, s + i, ep + 1);
		if (r)
			return r;
		lf_step(ms);
	}
	return NULL;
}

static const char *lf_min_expand(struct lf_ms *ms, const char *s, const char *p,
				 const char *ep)
{
	for (;;) {
		const char *r = lf_match(ms, s, ep + 1);
		lf_step(ms);
		if (r)
			return r;
		if (!lf_single(ms, s, p, ep))
			return NULL;
		s++;
	}
}

static const char *lf_open_cap(struct lf_ms *ms, const char *s, const char *p, ptrdiff_t what)
{
	const char *r;

	if (ms->level >= LF_MAXCAP)
		luaL_error(ms->L, "too many captures");
	ms->cap[ms->level].init = s;
	ms->cap[ms->level].len = what;
	ms->level++;
	r = lf_match(ms, s, p);
	if (!r)
		ms->level--;
	return r;
}

static const char *lf_close_cap(struct lf_ms *ms, const char *s, const char *p)
{
	int l = ms->level - 1;
	const char *r;

	while (l >= 0 && ms->cap[l].len != LF_CAP_UNF)
		l--;
	if (l < 0)
		luaL_error(ms->L, "invalid pattern capture");
	ms->cap[l].len = s - ms->cap[l].init;
	r = lf_match(ms, s, p);
	if (!r)
		ms->cap[l].len = LF_CAP_UNF;
	return r;
}

static const char *lf_backref(struct lf_ms *ms, const char *s, int c)
{
	int l = c - '1';
	size_t len;

	if (l < 0 || l >= ms->level || ms->cap[l].len == LF_CAP_UNF)
		luaL_error(ms->L, "invalid capture index %%%d", l + 1);
	len = (size_t)ms->cap[l].len;
	if ((size_t)(ms->src_end - s) >= len && memcmp(ms->cap[l].init, s, len) == 0)
		return s + len;
	return NULL;
}

static const char *lf_match(struct lf_ms *ms, const char *s, const char *p)
{
	const char *ep;

	if (ms->depth-- == 0)
		luaL_error(ms->L, "pattern too complex");
	lf_step(ms);
	while (p < ms->p_end) {
		switch (*p) {
		case '(':
			s = p + 1 < ms->p_end && p[1] == ')' ? lf_open_cap(ms, s, p + 2, LF_CAP_POS)
							      : lf_open_cap(ms, s, p + 1, LF_CAP_UNF);
			goto done;
		case ')':
			s = lf_close_cap(ms, s, p + 1);
			goto done;
		case '$':
			if (p + 1 == ms->p_end) {
				s = s == ms->src_end ? s : NULL;
				goto done;
			}
			goto item;
		case '%':
			if (p[1] == 'b') {
				s = lf_balance(ms, s, p + 2);
				if (!s)
					goto done;
				p += 4;
				continue;
			}
			if (p[1] == 'f') {
				int prev, cur;
				p += 2;
				if (*p != '[')
					luaL_error(ms->L, "missing '[' after '%%f' in pattern");
				ep = lf_item_end(ms, p);
				prev = s == ms->src ? 0 : (unsigned char)s[-1];
				cur = s < ms->src_end ? (unsigned char)*s : 0;
				if (!lf_set(prev, p, ep - 1) && lf_set(cur, p, ep - 1)) {
					p = ep;
					continue;
				}
				s = NULL;
				goto done;
			}
			if (isdigit((unsigned char)p[1])) {
				s = lf_backref(ms, s, (unsigned char)p[1]);
				if (!s)
					goto done;
				p += 2;
				continue;
			}
			goto item;
		default:
		item:
			ep = lf_item_end(ms, p);
			if (!lf_single(ms, s, p, ep)) {
				if (*ep == '*' || *ep == '?' || *ep == '-') {
					p = ep + 1;
					continue;
				}
				s = NULL;
				goto done;
			}
			switch (*ep) {
			case '?': {
				const char *r = lf_match(ms, s + 1, ep + 1);
				if (r) {
					s = r;
					goto done;
				}
				p = ep + 1;
				continue;
			}
			case '+': s = lf_max_expand(ms, s + 1, p, ep); goto done;
			case '*': s = lf_max_expand(ms, s, p, ep); goto done;
			case '-': s = lf_min_expand(ms, s, p, ep); goto done;
			default: s++; p = ep; continue;
			}
		}
	}
done:
	ms->depth++;
	return s;
}

/* ---- results ---- */

static void lf_push_cap(struct lf_ms *ms, int i, const char *s, const char *e)
{
	if (i >= ms->level) {
		if (i != 0)
			luaL_error(ms->L, "invalid capture index %%%d", i + 1);
		lua_pushlstring(ms->L, s, (size_t)(e - s)); /* the whole match */
		return;
	}
	if (ms->cap[i].len == LF_CAP_UNF)
		luaL_error(ms->L, "unfinished capture");
	if (ms->cap[i].len == LF_CAP_POS)
		lua_pushinteger(ms->L, (ms->cap[i].init - ms->src) + 1);
	else
		lua_pushlstring(ms->L, ms->cap[i].init, (size_t)ms->cap[i].len);
}

static int lf_push_caps(struct lf_ms *ms, const char *s, const char *e)
{
	int n = ms->level == 0 && s ? 1 : ms->level;

	luaL_checkstack(ms->L, n, "too many captures");
	for (int i = 0; i < n; i++)
		lf_push_cap(ms, i, s, e);
	return n;
}

static size_t lf_init_pos(lua_Integer pos, size_t len)
{
	if (pos > 0)
		return (size_t)pos;
	if (pos == 0 || pos < -(lua_Integer)len)
		return 1;
	return len + (size_t)pos + 1;
}

static int lf_plain(const char *p, size_t lp)
{
	for (size_t i = 0; i < lp; i++)
		if (strchr("^$*+?.([%-", p[i]) && p[i])
			return 0;
	return 1;
}

static int lf_find_aux(lua_State *L, int find)
{
	size_t ls, lp;
	const char *s = luaL_checklstring(L, 1, &ls), *p = luaL_checklstring(L, 2, &lp);
	size_t init = lf_init_pos(luaL_optinteger(L, 3, 1), ls);
	struct lf_ms ms;
	const char *s1;
	int anchor;

	if (init > ls + 1) {
		lua_pushnil(L);
		return 1;
	}
	if (find && (lua_toboolean(L, 4) || lf_plain(p, lp))) {
		const char *hit = lp == 0 ? s + init - 1 : memmem(s + init - 1, ls - init + 1, p, lp);
		if (hit) {
			lua_pushinteger(L, (hit - s) + 1);
			lua_pushinteger(L, (lua_Integer)((hit - s) + (ptrdiff_t)lp));
			return 2;
		}
		lua_pushnil(L);
		return 1;
	}
	anchor = lp > 0 && *p == '^';
	if (anchor) {
		p++;
		lp--;
	}
	lf_ms_init(&ms, L, s, ls, p, lp);
	s1 = s + init - 1;
	do {
		const char *e;
		lf_ms_reset(&ms);
		if ((e = lf_match(&ms, s1, p)) != NULL) {
			if (find) {
				lua_pushinteger(L, (s1 - s) + 1);
				lua_pushinteger(L, e - s);
				return lf_push_caps(&ms, NULL, NULL) + 2;
			}
			return lf_push_caps(&ms, s1, e);
		}
	} while (s1++ < ms.src_end && !anchor);
	lua_pushnil(L);
	return 1;
}

static int lf_find(lua_State *L)
{
	return lf_find_aux(L, 1);
}

static int lf_str_match(lua_State *L)
{
	return lf_find_aux(L, 0);
}

struct lf_gm {
	const char *src, *p, *last;
	struct lf_ms ms;
};

static int lf_gmatch_next(lua_State *L)
{
	struct lf_gm *gm = lua_touserdata(L, lua_upvalueindex(3));

	gm->ms.L = L;
	gm->ms.s = lf_script_of(L);
	for (const char *src = gm->src; src <= gm->ms.src_end; src++) {
		const char *e;
		lf_ms_reset(&gm->ms);
		if ((e = lf_match(&gm->ms, src, gm->p)) != NULL && e != gm->last) {
			gm->src = gm->last = e;
			return lf_push_caps(&gm->ms, src, e);
		}
	}
	return 0;
}

static int lf_gmatch(lua_State *L)
{
	size_t ls, lp;
	const char *s = luaL_checklstring(L, 1, &ls), *p = luaL_checklstring(L, 2, &lp);
	size_t init = lf_init_pos(luaL_optinteger(L, 3, 1), ls) - 1;
	struct lf_gm *gm;

	if (init > ls)
		init = ls + 1; /* no match at all */
	lua_settop(L, 2);
	gm = lua_newuserdatauv(L, sizeof(*gm), 0);
	lf_ms_init(&gm->ms, L, s, ls, p, lp);
	gm->src = s + init;
	gm->p = p;
	gm->last = NULL;
	lua_pushcclosure(L, lf_gmatch_next, 3);
	return 1;
}

static void lf_add_s(struct lf_ms *ms, luaL_Buffer *b, const char *s, const char *e)
{
	lua_State *L = ms->L;
	size_t l;
	const char *p = lua_tolstring(L, 3, &l), *q;

	while ((q = memchr(p, '%', l)) != NULL) {
		luaL_addlstring(b, p, (size_t)(q - p));
		q++;
		if (*q == '%') {
			luaL_addchar(b, '%');
		} else if (*q == '0') {
			luaL_addlstring(b, s, (size_t)(e - s));
		} else if (isdigit((unsigned char)*q)) {
			lf_push_cap(ms, *q - '1', s, e);
			luaL_tolstring(L, -1, NULL);
			lua_remove(L, -2);
			luaL_addvalue(b);
		} else {
			luaL_error(L, "invalid use of '%%' in replacement string");
		}
		l -= (size_t)(q + 1 - p);
		p = q + 1;
	}
	luaL_addlstring(b, p, l);
}

static int lf_add_value(struct lf_ms *ms, luaL_Buffer *b, const char *s, const char *e, int tr)
{
	lua_State *L = ms->L;

	if (tr == LUA_TFUNCTION) {
		int n;
		lua_pushvalue(L, 3);
		n = lf_push_caps(ms, s, e);
		lua_call(L, n, 1);
	} else if (tr == LUA_TTABLE) {
		lf_push_cap(ms, 0, s, e);
		lua_gettable(L, 3);
	} else {
		lf_add_s(ms, b, s, e);
		return 1;
	}
	if (!lua_toboolean(L, -1)) { /* nil or false: keep the original text */
		lua_pop(L, 1);
		luaL_addlstring(b, s, (size_t)(e - s));
		return 0;
	}
	if (!lua_isstring(L, -1))
		return luaL_error(L, "invalid replacement value (a %s)", luaL_typename(L, -1));
	luaL_addvalue(b);
	return 1;
}

static int lf_gsub(lua_State *L)
{
	size_t ls, lp;
	const char *src = luaL_checklstring(L, 1, &ls), *p = luaL_checklstring(L, 2, &lp);
	const char *last = NULL;
	int tr = lua_type(L, 3), anchor, changed = 0;
	lua_Integer max_n = luaL_optinteger(L, 4, (lua_Integer)ls + 1), n = 0;
	struct lf_ms ms;
	luaL_Buffer b;

	luaL_argexpected(L, tr == LUA_TNUMBER || tr == LUA_TSTRING || tr == LUA_TFUNCTION ||
				    tr == LUA_TTABLE, 3, "string/function/table");
	luaL_buffinit(L, &b);
	anchor = lp > 0 && *p == '^';
	if (anchor) {
		p++;
		lp--;
	}
	lf_ms_init(&ms, L, src, ls, p, lp);
	while (n < max_n) {
		const char *e;
		lf_ms_reset(&ms);
		if ((e = lf_match(&ms, src, p)) != NULL && e != last) {
			n++;
			changed = lf_add_value(&ms, &b, src, e, tr) | changed;
			src = last = e;
		} else if (src < ms.src_end) {
			luaL_addchar(&b, *src++);
		} else {
			break;
		}
		if (anchor)
			break;
	}
	if (!changed) {
		lua_pushvalue(L, 1);
	} else {
		luaL_addlstring(&b, src, (size_t)(ms.src_end - src));
		luaL_pushresult(&b);
	}
	lua_pushinteger(L, n);
	return 2;
}

void lf_pattern_open(lua_State *L)
{
	static const luaL_Reg fns[] = {
		{"find", lf_find},   {"match", lf_str_match}, {"gmatch", lf_gmatch},
		{"gsub", lf_gsub},   {NULL, NULL},
	};

	lua_getglobal(L, "string");
	luaL_setfuncs(L, fns, 0);
	lua_pop(L, 1);
}
