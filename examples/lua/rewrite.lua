-- rewrite.lua - find and replace bytes, both ways.
--
-- Returning a string from EzpFilter replaces the packet's bytes; the new
-- bytes may be longer, shorter or empty. Each rule is plain text (no Lua
-- pattern), applied to whole packets: on TCP a word split across two reads
-- is not seen (a packet is one read, see docs/lua.md).
-- Run: cd examples/lua && ezproxy run -c rewrite.yaml
local RULES = {
  { to_server = true,  from = "cat",   to = "dog" },
  { to_server = false, from = "hello", to = "HELLO" },
}

-- escape the magic characters so `from` is matched as plain text
local function plain(s) return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0")) end
local function literal(s) return (s:gsub("%%", "%%%%")) end

function EzpFilter(ezp, pkt)
  local data, changed = pkt.data, 0
  for _, r in ipairs(RULES) do
    if r.to_server == pkt.serverbound then
      local n
      data, n = data:gsub(plain(r.from), literal(r.to))
      changed = changed + n
    end
  end
  if changed > 0 then
    return data              -- replace
  end
  return true                -- pass unchanged
end
