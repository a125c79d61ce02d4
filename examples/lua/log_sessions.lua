-- log_sessions.lua - one log line per session opened and closed, with totals.
--
-- Session objects are the old API's: get_id, get_network, get_client_addr,
-- get_server_addr, get_bytes_sent, get_last_contact, is_alive, send_to_*.
-- get_proxy_count and get_bytes_sent on `ezp` cover every worker.
-- Run: cd examples/lua && ezproxy run -c log_sessions.yaml
function EzpOnSessionOpen(ezp, s)
  log(LEVEL_INFO, string.format("session %d opened: %s %s -> %s (%d open in this pipeline)",
      s.get_id(), s.get_network(), s.get_client_addr(), s.get_server_addr(),
      ezp.get_proxy_count()))
end

function EzpOnSessionClose(ezp, s)
  log(LEVEL_INFO, string.format("session %d closed: %d bytes through this filter; "
      .. "pipeline total %d bytes", s.get_id(), s.get_bytes_sent(), ezp.get_bytes_sent()))
end

-- watch only: every packet passes (EzpOnPacket's return value never drops one;
-- returning true would stop the calls for good)
function EzpOnPacket(ezp, pkt)
  if #pkt.data > 0 and pkt.data:byte(1) == 0 then
    log(LEVEL_DEBUG, string.format("session %d: binary packet, %d bytes %s",
        pkt.proxy_id, #pkt.data, pkt.serverbound and "to server" or "to client"))
  end
  return false
end
