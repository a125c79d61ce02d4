-- lag_switch.lua - a lag switch: while it is on, packets wait (sleep) before
-- they go on. Order is kept and nothing is lost: a sleeping packet holds the
-- packets behind it in its direction (up to HoldWindow), and HoldTimeoutMs in
-- the YAML must be longer than the longest wait.
--
-- Two ways to flip it (SWITCH):
--   "file" - edit this file: set LAG_ON = true or false and save. The filter
--            reloads the script within ~0.1 s (WatchFile: true, the default);
--            live sessions stay up. (The sandbox has no io library, so the
--            script cannot read another file; the script file is the switch.)
--   "time" - on for ON_SECONDS out of every PERIOD_SECONDS (by the clock):
--            packets that arrive while it is on are held until it goes off,
--            then all released at once, in order - a "freeze".
-- Run: cd examples/lua && ezproxy run -c lag_switch.yaml
local SWITCH = "file"
local LAG_ON = false
local DELAY_MS = 300                 -- "file": each packet waits this long while on
local PERIOD_SECONDS, ON_SECONDS = 10, 3
local DIRECTION = "both"             -- "to_server", "to_client" or "both"

local function applies(pkt)
  if DIRECTION == "both" then return true end
  return (DIRECTION == "to_server") == pkt.serverbound
end

function EzpFilter(ezp, pkt)
  if pkt.injected or not applies(pkt) then
    return true
  end
  if SWITCH == "file" then
    if LAG_ON then
      sleep(DELAY_MS)
    end
  else
    local into = os.time() % PERIOD_SECONDS
    if into < ON_SECONDS then
      sleep((ON_SECONDS - into) * 1000)
    end
  end
  return true
end
