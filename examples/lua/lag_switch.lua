-- lag_switch.lua - a lag switch: while it is on, packets are delayed (or, in
-- "time" mode, frozen and then released at once). The waiting is done by the
-- fault stage after this filter in Through (the fault plugin): the script only
-- flips it with ezp.set_faults. Order is kept and nothing is lost.
--
-- Two ways to flip it (SWITCH):
--   "file" - edit this file: set LAG_ON = true or false and save. The filter
--            reloads the script within ~0.1 s (WatchFile: true, the default)
--            and the next packet applies the setting; live sessions stay up.
--            (The sandbox has no io library, so the script cannot read
--            another file; the script file is the switch.)
--   "time" - on for ON_SECONDS out of every PERIOD_SECONDS (by the clock):
--            packets that arrive while it is on are held until it goes off,
--            then all released at once, in order - a "freeze".
-- The same switch from a shell, without a script:
--   ezproxy fault set lag_switch --latency 300      /   ezproxy fault clear lag_switch
-- Run: cd examples/lua && ezproxy run -c lag_switch.yaml
local SWITCH = "file"
local LAG_ON = false
local DELAY_MS = 300                 -- "file": each packet waits this long while on
local PERIOD_SECONDS, ON_SECONDS = 10, 3
local DIRECTION = "both"             -- "to_server", "to_client" or "both"

local applied = false                -- "file": set once per (re)load, at the first packet
local frozen_until = -1              -- "time": the end of the "on" stretch now frozen

local function set(faults)
  local ok, why = ezp.set_faults(faults)
  if not ok then
    log(LEVEL_WARN, "lag_switch: " .. tostring(why))
  end
end

function EzpFilter(ezp, pkt)
  if SWITCH == "file" then
    if not applied then
      applied = true
      set(LAG_ON and {LatencyMs = DELAY_MS, Direction = DIRECTION} or {Direction = DIRECTION})
    end
  else
    local now = os.time()
    local into = now % PERIOD_SECONDS
    if into < ON_SECONDS and frozen_until < now then
      -- freeze until the end of this "on" stretch; the fault plugin lets go by itself
      frozen_until = now - into + ON_SECONDS
      set({Freeze = true, FreezeMaxMs = (ON_SECONDS - into) * 1000, Direction = DIRECTION})
    end
  end
  return true
end
