-- drop_direction.lua - drop every packet going one way.
--
-- A one-way link: with DROP = "to_client" the server still gets everything the
-- client sends, but nothing it answers reaches the client (and the reverse with
-- "to_server"). Useful to see how a client copes with a server that went mute.
-- Run: cd examples/lua && ezproxy run -c drop_direction.yaml
local DROP = "to_client"   -- "to_client" or "to_server"

local dropped = 0          -- per worker: each worker runs its own copy of this script

function EzpFilter(ezp, pkt)
  local to_server = pkt.serverbound
  if (DROP == "to_server") == to_server then
    dropped = dropped + 1
    if dropped % 1000 == 1 then
      log(LEVEL_INFO, string.format("drop_direction: dropped %d packet(s) %s on this worker",
          dropped, DROP))
    end
    return false             -- drop
  end
  return true                -- pass
end
