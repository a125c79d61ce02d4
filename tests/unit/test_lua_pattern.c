/*
 * test_lua_pattern.c - the lua-filter's own string.find/match/gmatch/gsub
 * (plugins/lua-filter/lua_pattern.c) against Lua 5.4's, differentially.
 *
 * One Lua state keeps the stock functions as `orig` and gets the plugin's
 * in `string`; a Lua chunk runs both on the same arguments and reports the
 * first case where the results (every value, or both raising an error with
 * the same message) differ. Cases: a table of hand-written ones covering
 * each pattern item, then random patterns and subjects from a fixed seed.
 * Finally the step budget: a backtracking pattern stops with the
 * instruction-limit error instead of running for seconds.
 * Thread: the test's only.
 */
/* cmocka.h needs these first */
/* clang-format off */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
/* clang-format on */
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include <lualib.h>

#include "../../plugins/lua-filter/lua_filter.h"

static struct lf_script script; /* only budget, exhausted and instr_limit are used */

static lua_State *state_new(int64_t budget)
{
	lua_State *L = luaL_newstate();

	assert_non_null(L);
	luaL_openlibs(L);
	*(struct lf_script **)lua_getextraspace(L) = &script;
	memset(&script, 0, sizeof(script));
	script.budget = budget;
	script.instr_limit = budget;
	/* the stock functions stay reachable as orig.* */
	assert_int_equal(luaL_dostring(L, "orig = {find = string.find, match = string.match, "
					  "gmatch = string.gmatch, gsub = string.gsub}"),
			 LUA_OK);
	lf_pattern_open(L);
	return L;
}

/* Run @chunk; it returns nil when all is well, else a description of the first mismatch. */
static void run_chunk(lua_State *L, const char *chunk)
{
	int top = lua_gettop(L);

	if (luaL_dostring(L, chunk) != LUA_OK)
		fail_msg("chunk failed: %s", lua_tostring(L, -1));
	if (lua_gettop(L) > top && !lua_isnil(L, -1))
		fail_msg("%s", lua_tostring(L, -1));
	lua_settop(L, top);
}

/* Shared by both chunks: compare one call of fn in both implementations. */
#define COMPARE_LUA                                                                              \
	"local function pack(...) return {n = select('#', ...), ...} end\n"                        \
	"local function show(v)\n"                                                                 \
	"  local t = {}\n"                                                                         \
	"  for i = 1, v.n do t[#t + 1] = string.format('%q', v[i]) end\n"                          \
	"  return table.concat(t, ', ')\n"                                                         \
	"end\n"                                                                                    \
	"local function gm(f, s, p)\n"                                                             \
	"  local out, it = {}, f(s, p)\n"                                                          \
	"  for _ = 1, 100 do\n"                                                                    \
	"    local r = pack(it())\n"                                                               \
	"    if r[1] == nil then break end\n"                                                      \
	"    out[#out + 1] = show(r)\n"                                                            \
	"  end\n"                                                                                  \
	"  return table.concat(out, ' | ')\n"                                                      \
	"end\n"                                                                                    \
	"local mine = {find = string.find, match = string.match, gsub = string.gsub,\n"           \
	"  gmatch = function(s, p) return gm(string.gmatch, s, p) end}\n"                         \
	"local stock = {find = orig.find, match = orig.match, gsub = orig.gsub,\n"                \
	"  gmatch = function(s, p) return gm(orig.gmatch, s, p) end}\n"                           \
	"local function unname(r)  -- the name in 'bad argument #3 to NAME' is where it was found\n" \
	"  if not r[1] then r[2] = orig.gsub(tostring(r[2]), \" to '[^']*'\", ' to F') end\n"      \
	"  return r\n"                                                                             \
	"end\n"                                                                                    \
	"local function cmp(fn, ...)\n"                                                            \
	"  local a = unname(pack(pcall(stock[fn], ...)))\n"                                        \
	"  local b = unname(pack(pcall(mine[fn], ...)))\n"                                         \
	"  if a[1] ~= b[1] or show(a) ~= show(b) then\n"                                           \
	"    return string.format('%s(%s): stock gives %s, the plugin %s', fn,\n"                  \
	"                         show(pack(...)), show(a), show(b))\n"                             \
	"  end\n"                                                                                  \
	"end\n"

static void test_hand_written_cases(void **state)
{
	lua_State *L = state_new(INT64_MAX);

	(void)state;
	run_chunk(L, COMPARE_LUA
		  "local subjects = {'', 'hello world', 'a,b,,c', '  x = 10; y=2 ', 'f(a(b)c)d',\n"
		  "  'THE (quick) fox', 'key=val\\0tail', 'aaa', '12ab34', '[x]', 'a.b', 'x%y'}\n"
		  "local patterns = {'', 'o', 'l+', 'l*', 'l-o', 'x?', '^h', 'd$', '^$', '.',\n"
		  "  '%a+', '%A+', '%d+', '%D', '%s*', '%S+', '%w+', '%W', '%p', '%P+', '%l+',\n"
		  "  '%u+', '%x+', '%X', '%c', '%C+', '%g+', '%G', '%z', '%.', '%%', '[%a_]+',\n"
		  "  '[^,]+', '[a-c]+', '[^%s]+', '[]]', '[^]]+', '[a-]', '[%-a]+', '(%w+)=(%w+)',\n"
		  "  '(%w+)%s*=%s*(%w+)', '()ll()', '(l)(l)', '(a*(.)%w(%s*))', '%b()', '%b((',\n"
		  "  '%f[%a]%a+', '%f[%A]', '%f[%z]', '(.)%1', '(%a)%1*', '^(%s*)(.-)(%s*)$',\n"
		  "  '[%]]', '[%%]', '[a-%%]', '.-', '.-b', 'a-$', '(', ')', '%', '[a', '%b',\n"
		  "  '%f', '%fa', '(%1)', '%2', '(()', '[^', '%g', '^(a+)(b?)'}\n"
		  "for _, s in ipairs(subjects) do\n"
		  "  for _, p in ipairs(patterns) do\n"
		  "    local r = cmp('find', s, p) or cmp('match', s, p) or cmp('gmatch', s, p)\n"
		  "      or cmp('gsub', s, p, '<%0>') or cmp('gsub', s, p, '%1-%%', 2)\n"
		  "      or cmp('gsub', s, p, {hello = 'HI', a = false, l = 1.5})\n"
		  "      or cmp('gsub', s, p, function(x) if x == 'o' then return 'O' end end)\n"
		  "      or cmp('find', s, p, 3) or cmp('find', s, p, -4) or cmp('find', s, p, 40)\n"
		  "      or cmp('find', s, p, 2, true) or cmp('match', s, p, -2)\n"
		  "    if r then return r end\n"
		  "  end\n"
		  "end\n"
		  "return cmp('gsub', 'abc', '%w', '%9') or cmp('gsub', 'abc', '%w', '%')\n"
		  "  or cmp('gsub', 'abc', '%w', true) or cmp('gsub', 'abc', '', '-')\n"
		  "  or cmp('gsub', 'abc', '(b)', function() error('in repl') end)\n"
		  "  or cmp('gsub', 'abc', 'b', function() return {} end)\n"
		  "  or cmp('find', 'a+b', '+', 1, true) or cmp('find', 'abc', '', 10)\n"
		  "  or cmp('find', 'abc', '', 4) or cmp('gsub', 'hello', 'l', 'L', 0)\n"
		  "  or cmp('gsub', 'hello', 'l', 'L', -1) or cmp('match', 'x', string.rep('(', 40))\n"
		  "  or cmp('match', string.rep('a', 300), string.rep('a?', 300))\n"
		  "  or cmp('gmatch', 'a1b2', '%a()%d')\n");
	lua_close(L);
}

static void test_random_cases(void **state)
{
	lua_State *L = state_new(INT64_MAX);

	(void)state;
	run_chunk(L, COMPARE_LUA
		  "local items = {'a', 'b', '.', '%a', '%d', '%s', '%w', '%p', '%A', '[ab]',\n"
		  "  '[^a]', '[a-c]', '[%d_]', '%b()', '%f[%a]', '%f[%s]', '(', ')', '()', '%1',\n"
		  "  '%', '[', ']', '^', '$', '%.', ' '}\n"
		  "local quant = {'', '', '', '*', '+', '-', '?'}\n"
		  "local chars = {'a', 'b', 'c', '(', ')', ' ', '1', '.', '_', '\\0', 'A'}\n"
		  "math.randomseed(20261125)\n"
		  "for i = 1, 6000 do\n"
		  "  local p, s = {}, {}\n"
		  "  for k = 1, math.random(1, 5) do\n"
		  "    p[k] = items[math.random(#items)] .. quant[math.random(#quant)]\n"
		  "  end\n"
		  "  for k = 1, math.random(0, 10) do s[k] = chars[math.random(#chars)] end\n"
		  "  p, s = table.concat(p), table.concat(s)\n"
		  "  local r = cmp('find', s, p) or cmp('match', s, p) or cmp('gmatch', s, p)\n"
		  "    or cmp('gsub', s, p, '[%0]')\n"
		  "  if r then return 'case ' .. i .. ': ' .. r end\n"
		  "end\n");
	lua_close(L);
}

/* The stock matcher would run for seconds; with a budget it stops with a clear error. */
static void test_budget_stops_backtracking(void **state)
{
	lua_State *L = state_new(100000);
	const char *msg;

	(void)state;
	assert_int_not_equal(luaL_dostring(L, "return string.find(string.rep('a', 400), "
					      "'.-.-.-.-b')"),
			     LUA_OK);
	msg = lua_tostring(L, -1);
	if (!msg || !strstr(msg, "instruction limit reached (pattern matching ran over "
				 "InstructionLimit 100000 steps)"))
		fail_msg("unexpected error: %s", msg ? msg : "(none)");
	assert_true(script.exhausted);
	/* once exhausted, every later match stops too (pcall cannot reset it) */
	lua_pop(L, 1);
	assert_int_not_equal(luaL_dostring(L, "return string.match('abc', 'b')"), LUA_OK);
	lua_close(L);

	/* the same budget is plenty for ordinary work */
	L = state_new(100000);
	assert_int_equal(luaL_dostring(L, "local n = 0\n"
					  "for w in string.gmatch(string.rep('word ', 200), '%a+') do\n"
					  "  n = n + 1 end\n"
					  "return n .. select(2, string.gsub('a b c', '%a', 'x'))"),
			 LUA_OK);
	assert_string_equal(lua_tostring(L, -1), "2003");
	assert_false(script.exhausted);
	lua_close(L);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_hand_written_cases),
	    cmocka_unit_test(test_random_cases),
	    cmocka_unit_test(test_budget_stops_backtracking),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
