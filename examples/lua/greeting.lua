-- greeting.lua - inject a greeting when a client connects, and answer a command.
--
-- EzpOnSessionOpen runs when a session opens: inject_to_client sends bytes to
-- that client as if the server had sent them (marked `injected`). In EzpFilter
-- a client line "!time" is answered by the proxy itself and never reaches the
-- server. The pkt.injected guard is the old program's idiom: with it, a script
-- never reacts to packets it injected itself (here it is only a safeguard: a
-- filter does not see its own injections, the filters after it do).
-- Run: cd examples/lua && ezproxy run -c greeting.yaml
local GREETING = "Welcome! You are connected through ezproxy.\n"

function EzpOnSessionOpen(ezp, session)
  ezp.inject_to_client(session.get_id(), GREETING)
end

function EzpFilter(ezp, pkt)
  if pkt.injected then
    return true
  end
  if pkt.serverbound and pkt.data:match("^!time\r?\n?$") then
    ezp.inject_to_client(pkt.proxy_id, os.date("!%Y-%m-%dT%H:%M:%SZ") .. "\n")
    return false             -- the command is not sent to the server
  end
  return true
end
