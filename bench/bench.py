#!/usr/bin/env python3
"""EzProxy benchmark: ezproxy against direct, socat, haproxy and nginx (stream) on loopback.

One run measures every configuration side by side, interleaved within each round, and
reports medians over rounds of the absolute values and of the per-round ratios
ezproxy/direct and ezproxy/best-peer. See bench/README.md.

Standard library only (Python 3.11). Only 127.0.0.1 is ever used.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CONFIGS = ["direct", "socat", "haproxy", "nginx", "ezproxy"]
PEERS = ["socat", "haproxy", "nginx"]

# metric groups (what --only selects) -> rows they produce
GROUPS = {
    "bulk": ["bulk1_gbps", "bulk8_gbps"],
    "rr_tcp": ["rr_tcp_p50_us", "rr_tcp_p99_us"],
    "rr_udp": ["rr_udp_p50_us", "rr_udp_p99_us"],
    "udprate": ["udp_pps"],
    "cps": ["cps"],
    "memory": ["rss_idle_kib", "kib_per_session"],
}
GROUP_ORDER = ["bulk", "rr_tcp", "rr_udp", "udprate", "cps", "memory"]
ALIASES = {
    "bulk1": "bulk", "bulk8": "bulk", "throughput": "bulk",
    "rr": ["rr_tcp", "rr_udp"], "tcp_rr": "rr_tcp", "udp_rr": "rr_udp",
    "udp": "udprate", "udp_rate": "udprate", "pps": "udprate",
    "connrate": "cps", "conn": "cps",
    "rss": "memory", "idle": "memory", "mem": "memory",
}

# row -> (label, better, target kind, target value)
#   better: "high" or "low"; kind: "ratio" (ezproxy / best peer) or "abs" (ezproxy value)
ROWS = {
    "bulk1_gbps": ("TCP bulk 1 stream, Gbit/s", "high", "ratio", 1.0),
    "bulk8_gbps": ("TCP bulk 8 streams, Gbit/s", "high", "ratio", 1.0),
    "rr_tcp_p50_us": ("TCP 64B rr p50, us", "low", "ratio", 1.0),
    "rr_tcp_p99_us": ("TCP 64B rr p99, us", "low", "ratio", 1.0),
    "rr_udp_p50_us": ("UDP 64B rr p50, us", "low", "ratio", 1.0),
    "rr_udp_p99_us": ("UDP 64B rr p99, us", "low", "ratio", 1.0),
    "udp_pps": ("UDP rate at 0 loss, pkt/s", "high", "ratio", 1.5),
    "cps": ("TCP connections/s", "high", "ratio", 1.0),
    "rss_idle_kib": ("RSS idle, KiB", "low", "abs", 10 * 1024),
    "kib_per_session": ("KiB per idle TCP session", "low", "abs", 16),
}

VERBOSE = False


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def vlog(*a):
    if VERBOSE:
        log(*a)


class BenchError(Exception):
    pass


class NotApplicable(Exception):
    pass


# --------------------------------------------------------------------------- processes

class Procs:
    """Every process this script starts. Each one leads its own process group, so
    stopping it (by its PID) also stops what it forked (socat children, nginx workers)."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.live: list[subprocess.Popen] = []
        self.n = 0

    def start(self, cmd: list[str], name: str, pin: int | None = None,
              stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL) -> subprocess.Popen:
        self.n += 1
        errpath = self.logdir / f"{self.n:03d}-{name}.log"
        err = open(errpath, "wb")
        preexec = (lambda: os.sched_setaffinity(0, {pin})) if pin is not None else None
        vlog(f"  start {name}: {' '.join(shlex.quote(c) for c in cmd)}"
             + (f" (pinned to cpu {pin})" if pin is not None else ""))
        try:
            p = subprocess.Popen(cmd, stdin=stdin, stdout=stdout, stderr=err,
                                 start_new_session=True, preexec_fn=preexec, close_fds=True)
        finally:
            err.close()
        p.bench_name = name  # type: ignore[attr-defined]
        p.bench_log = errpath  # type: ignore[attr-defined]
        self.live.append(p)
        return p

    def stop(self, p: subprocess.Popen, grace: float = 3.0):
        if p.stdin:
            try:
                p.stdin.close()
            except OSError:
                pass
        self._signal(p, signal.SIGTERM)
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self._signal(p, signal.SIGKILL)
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                log(f"warning: pid {p.pid} did not exit after SIGKILL")
        # the leader is gone; make sure no forked child of it survives
        self._signal(p, signal.SIGKILL)
        if p.stdout:
            try:
                p.stdout.close()
            except OSError:
                pass
        if p in self.live:
            self.live.remove(p)

    @staticmethod
    def _signal(p: subprocess.Popen, sig):
        try:
            os.killpg(p.pid, sig)  # the group this script created for that PID
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self):
        for p in list(reversed(self.live)):
            self.stop(p, grace=2.0)


def read_line(p: subprocess.Popen, timeout: float) -> str:
    """Read one line from p.stdout with a deadline."""
    fd = p.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"{p.bench_name}: no output within {timeout:.0f}s")
        r, _, _ = select.select([fd], [], [], min(left, 0.5))
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise BenchError(f"{p.bench_name}: exited early: {tail(p.bench_log)}")
            buf += chunk
        elif p.poll() is not None:
            raise BenchError(f"{p.bench_name}: exited ({p.returncode}): {tail(p.bench_log)}")
    return buf.split(b"\n", 1)[0].decode(errors="replace")


def tail(path: Path, n: int = 400) -> str:
    try:
        data = path.read_bytes()[-n:].decode(errors="replace").strip()
        return data.replace("\n", " | ") or "(no stderr)"
    except OSError:
        return "(no log)"


def free_port(kind: int) -> int:
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def tcp_ready(port: int, p_list: list[subprocess.Popen], timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        for p in p_list:
            if p.poll() is not None:
                raise BenchError(f"{p.bench_name} exited ({p.returncode}): {tail(p.bench_log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"nothing listening on tcp {port} after {timeout:.0f}s")
        time.sleep(0.05)


def udp_ready(port: int, p_list: list[subprocess.Popen], timeout: float = 10.0):
    """Send a probe datagram through the proxy to the echo server until it comes back."""
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.2)
    try:
        while True:
            for p in p_list:
                if p.poll() is not None:
                    raise BenchError(f"{p.bench_name} exited ({p.returncode}): {tail(p.bench_log)}")
            try:
                s.sendto(b"ready?" + b"\0" * 58, ("127.0.0.1", port))
                s.recvfrom(2048)
                return
            except OSError:  # timeout or ICMP port unreachable
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"no udp echo through port {port} after {timeout:.0f}s")
    finally:
        s.close()


def loadavg() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs' time spent non-idle over `interval` (from /proc/stat)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + (v[4] if len(v) > 4 else 0), sum(v[:8])
    try:
        i0, t0 = sample()
        time.sleep(interval)
        i1, t1 = sample()
        return 1.0 - (i1 - i0) / max(1, t1 - t0)
    except (OSError, ValueError, IndexError):
        return 0.0


def busy_warning(where: str) -> float:
    """Called while none of our load runs: busy CPUs mean someone else is using the machine."""
    busy = cpu_busy()
    if busy > 0.25:
        log(f"ezp-bench: WARNING: CPUs {busy:.0%} busy {where} (load average {loadavg():.1f}) with no "
            "benchmark load running: something else uses this machine, results will be noisy")
    return round(busy, 3)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for {pid}")


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
            ppid = int(st[st.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_rss_kib(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        try:
            total += rss_kib(pid)
        except (OSError, BenchError):
            pass
    return total


# --------------------------------------------------------------------------- setup

def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


_apt_updated = False


def apt_candidate(pkg: str) -> bool:
    try:
        out = subprocess.run(["apt-cache", "policy", pkg], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Candidate:"):
            return line.split(":", 1)[1].strip() not in ("", "(none)")
    return False


def apt_install(pkgs: list[str]) -> bool:
    global _apt_updated
    if os.geteuid() != 0 or not which("apt-get"):
        log(f"  cannot install {' '.join(pkgs)}: not root or no apt-get")
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if not all(apt_candidate(p) for p in pkgs) and not _apt_updated:
        log("  apt-get update")
        subprocess.run(["apt-get", "update"], env=env, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _apt_updated = True
    pkgs = [p for p in pkgs if apt_candidate(p)]
    if not pkgs:
        return False
    log(f"  apt-get install -y {' '.join(pkgs)}")
    r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *pkgs], env=env,
                       timeout=900, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        log(f"  apt-get failed: {r.stderr.strip()[-300:]}")
    return r.returncode == 0


NGINX_MODULE_DIRS = ["/usr/lib/nginx/modules", "/usr/share/nginx/modules",
                     "/usr/lib64/nginx/modules", "/etc/nginx/modules"]


def nginx_stream_prefix(nginx: str, tmp: Path) -> str | None:
    """Return the config prefix ('' or a load_module line) that makes `stream {}` work."""
    candidates = [""]
    for d in NGINX_MODULE_DIRS:
        so = Path(d) / "ngx_stream_module.so"
        if so.exists():
            candidates.append(f"load_module {so};\n")
    for i, pre in enumerate(candidates):
        conf = tmp / f"nginx-test-{i}.conf"
        conf.write_text(pre + f"pid {tmp}/nginx-test.pid;\nevents {{}}\n"
                        "stream { server { listen 127.0.0.1:1; proxy_pass 127.0.0.1:2; } }\n")
        try:
            r = subprocess.run([nginx, "-t", "-q", "-p", str(tmp), "-e", "stderr", "-c", str(conf)],
                               capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return pre
    return None


def ensure_peers(tmp: Path, install: bool) -> dict:
    found: dict = {}
    if not which("socat") and install:
        apt_install(["socat"])
    if not which("haproxy") and install:
        apt_install(["haproxy"])
    if not which("nginx") and install:
        apt_install(["nginx-light", "libnginx-mod-stream"])
    found["socat"] = which("socat")
    found["haproxy"] = which("haproxy")
    ng = which("nginx")
    pre = nginx_stream_prefix(ng, tmp) if ng else None
    if ng and pre is None and install:
        apt_install(["libnginx-mod-stream"])
        pre = nginx_stream_prefix(ng, tmp)
        if pre is None:
            apt_install(["nginx", "libnginx-mod-stream"])
            ng = which("nginx")
            pre = nginx_stream_prefix(ng, tmp) if ng else None
    found["nginx"] = ng if pre is not None else None
    found["nginx_prefix"] = pre or ""
    return found


def build_load_tool(tmp: Path, force_compile: bool) -> Path:
    src = HERE / "ezp-load.c"
    for cand in (ROOT / "build" / "bench" / "ezp-load", Path.cwd() / "build" / "bench" / "ezp-load"):
        if not force_compile and cand.is_file() and os.access(cand, os.X_OK) \
                and cand.stat().st_mtime >= src.stat().st_mtime:
            return cand
    cc = os.environ.get("CC") or which("gcc") or which("cc")
    if not cc:
        raise BenchError("no C compiler (gcc) found and no build/bench/ezp-load")
    out = tmp / "ezp-load"
    r = subprocess.run([cc, "-O2", "-std=gnu11", "-pthread", "-o", str(out), str(src)],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise BenchError(f"compiling ezp-load.c failed:\n{r.stderr}")
    return out


def tool_version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip().splitlines()[0][:120]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


# --------------------------------------------------------------------------- configurations

class Bench:
    def __init__(self, args, tmp: Path, procs: Procs, load: Path, peers: dict):
        self.a = args
        self.tmp = tmp
        self.procs = procs
        self.load = load
        self.peers = peers
        self.pin = args.pin_cpu
        self.backends: dict[str, int] = {}
        self.cfgn = 0
        q = args.quick
        self.bulk_s = args.bulk_seconds or (1.0 if q else 3.0)
        self.cps_s = args.cps_seconds or (1.0 if q else 3.0)
        self.rr_count = args.rr_count or (5000 if q else 20000)
        self.udp_trial_s = args.udp_trial_seconds or (0.4 if q else 1.0)
        self.udp_trials = 7 if q else 10
        self.udp_retries = args.udp_retries if args.udp_retries is not None else (0 if q else 1)
        self.idle_n = args.idle_sessions
        self.api_udp_s = args.api_udp_seconds
        self.ws_tool: Path | None = None

    # ---- backends ------------------------------------------------------------------
    def start_backends(self):
        """Unpinned sink/echo for throughput, pinned echo servers for round trips."""
        def srv(name, sub, proto, port, pin=None, extra=()):
            p = self.procs.start([str(self.load), sub, f"--{proto}", str(port), *extra], name, pin=pin,
                                 stdout=subprocess.PIPE, stdin=subprocess.PIPE)
            line = read_line(p, 10)
            return json.loads(line)["port"]

        self.backends["sink"] = srv("sink", "sink", "tcp", 0)
        self.backends["echo_tcp"] = srv("echo-tcp", "echo", "tcp", 0)
        self.backends["echo_udp"] = srv("echo-udp", "echo", "udp", 0)
        # for connections/s: echoes 1 byte, then the server closes first
        self.backends["echo_tcp_close"] = srv("echo-tcp-close", "echo", "tcp", 0, extra=("--close-after", "1"))
        self.backends["echo_tcp_pinned"] = srv("echo-tcp-pinned", "echo", "tcp", 0, self.pin)
        self.backends["echo_udp_pinned"] = srv("echo-udp-pinned", "echo", "udp", 0, self.pin)
        vlog(f"  backends: {self.backends}")

    # ---- proxies ---------------------------------------------------------------------
    def available(self, cfg: str) -> str | None:
        """None if usable, else the reason it is not."""
        if cfg == "direct":
            return None
        if cfg == "ezproxy":
            if self.a.ezproxy_stub or self.a.ezproxy_cmd:
                return None
            return None if self.ezproxy_bin() else f"no binary at {self.a.ezproxy}"
        return None if self.peers.get(cfg) else f"{cfg} not installed"

    def ezproxy_bin(self) -> str | None:
        p = Path(self.a.ezproxy)
        for cand in ([p] if p.is_absolute() else [Path.cwd() / p, ROOT / p]):
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
        return None

    def socat_cmds(self, net: str, lport: int, tport: int) -> list[list[str]]:
        s = self.peers.get("socat") or "socat"
        if net == "tcp":
            return [[s, "-b", "65536",
                     f"TCP-LISTEN:{lport},bind=127.0.0.1,fork,reuseaddr,backlog=4096,nodelay",
                     f"TCP:127.0.0.1:{tport},nodelay"]]
        return [[s, "-b", "65536", "-T", "60",
                 f"UDP-LISTEN:{lport},bind=127.0.0.1,fork,reuseaddr",
                 f"UDP:127.0.0.1:{tport}"]]

    def start_proxy(self, cfg: str, net: str, target: int, pinned: bool) -> tuple[int, list]:
        """Start `cfg` forwarding 127.0.0.1:<new port> -> 127.0.0.1:target on `net`.
        Returns (listen port, processes). direct returns the target itself."""
        if cfg == "direct":
            return target, []
        if cfg == "haproxy" and net == "udp":
            raise NotApplicable("haproxy has no UDP")
        why = self.available(cfg)
        if why:
            raise NotApplicable(why)
        self.cfgn += 1
        lport = free_port(socket.SOCK_STREAM if net == "tcp" else socket.SOCK_DGRAM)
        pin = self.pin if pinned else None
        name = f"{cfg}-{net}-{self.cfgn}"
        cmds: list[list[str]] = []
        if cfg == "socat":
            cmds = self.socat_cmds(net, lport, target)
        elif cfg == "haproxy":
            conf = self.tmp / f"{name}.cfg"
            conf.write_text(f"""global
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend f
    bind 127.0.0.1:{lport}
    default_backend b
backend b
    server s1 127.0.0.1:{target}
""")
            cmds = [[self.peers["haproxy"], "-f", str(conf), "-db"]]
        elif cfg == "nginx":
            pdir = self.tmp / name
            pdir.mkdir()
            listen = f"127.0.0.1:{lport}" + (" udp reuseport" if net == "udp" else "")
            extra = "proxy_timeout 60s;" if net == "udp" else ""
            conf = pdir / "nginx.conf"
            conf.write_text(self.peers.get("nginx_prefix", "") + f"""worker_processes {1 if pinned else "auto"};
worker_rlimit_nofile 16384;
pid {pdir}/nginx.pid;
error_log {pdir}/error.log warn;
events {{ worker_connections 8192; }}
stream {{
    server {{
        listen {listen};
        proxy_pass 127.0.0.1:{target};
        {extra}
    }}
}}
""")
            cmds = [[self.peers["nginx"], "-p", str(pdir), "-e", f"{pdir}/error.log", "-c", str(conf),
                     "-g", "daemon off;"]]
        elif cfg == "ezproxy":
            if self.a.ezproxy_stub == "socat":
                cmds = self.socat_cmds(net, lport, target)
            else:
                tmpl = self.a.ezproxy_cmd or "{bin} run --listen {listen} --server {server} --network {network}"
                cmds = [[c.format(bin=self.ezproxy_bin() or self.a.ezproxy, listen=f"127.0.0.1:{lport}",
                                  server=f"127.0.0.1:{target}", network=net, port=lport, target=target)
                         for c in shlex.split(tmpl)]]
        ps = [self.procs.start(c, name, pin=pin) for c in cmds]
        try:
            if net == "tcp":
                tcp_ready(lport, ps)
            else:
                udp_ready(lport, ps)
        except BaseException:
            for p in ps:
                self.procs.stop(p)
            raise
        return lport, ps

    def stop_proxy(self, ps):
        for p in ps:
            self.procs.stop(p)

    # ---- load runs -------------------------------------------------------------------
    def run_load(self, args: list[str], timeout: float, pin: int | None = None) -> dict:
        cmd = [str(self.load), *args]
        preexec = (lambda: os.sched_setaffinity(0, {pin})) if pin is not None else None
        vlog(f"    $ {' '.join(cmd)}" + (f"  (cpu {pin})" if pin is not None else ""))
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                               preexec_fn=preexec, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BenchError(f"ezp-load {args[0]} timed out after {timeout:.0f}s")
        lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
        if not lines:
            raise BenchError(f"ezp-load {args[0]} printed nothing (rc {r.returncode}): {r.stderr.strip()[-300:]}")
        res = json.loads(lines[-1])
        if "error" in res:
            raise BenchError(f"ezp-load {args[0]}: {res['error']}")
        vlog(f"      {lines[-1]}")
        return res

    def m_bulk(self, cfg: str) -> dict:
        port, ps = self.start_proxy(cfg, "tcp", self.backends["sink"], pinned=False)
        try:
            out = {}
            for n in (1, 8):
                r = self.run_load(["bulk", "--connect", f"127.0.0.1:{port}", "--streams", str(n),
                                   "--seconds", str(self.bulk_s)], timeout=self.bulk_s + 20)
                out[f"bulk{n}_gbps"] = r["gbps"]
            return out
        finally:
            self.stop_proxy(ps)

    def m_rr(self, cfg: str, net: str) -> dict:
        port, ps = self.start_proxy(cfg, net, self.backends[f"echo_{net}_pinned"], pinned=True)
        try:
            maxs = 60 if self.a.quick else 180
            r = self.run_load(["rr", f"--{net}", "--connect", f"127.0.0.1:{port}", "--count",
                               str(self.rr_count), "--size", "64", "--max-seconds", str(maxs)],
                              timeout=maxs + 20, pin=self.pin)
            return {f"rr_{net}_p50_us": r["p50_us"], f"rr_{net}_p99_us": r["p99_us"],
                    f"_rr_{net}_lost": r.get("lost", 0)}
        finally:
            self.stop_proxy(ps)

    def m_udprate(self, cfg: str) -> dict:
        port, ps = self.start_proxy(cfg, "udp", self.backends["echo_udp"], pinned=False)
        try:
            lo, hi = 0.0, None
            best, trials = 0.0, []
            rate = float(self.a.udp_start_rate)
            for _ in range(self.udp_trials):
                # a failed trial is repeated up to --udp-retries times (a single
                # scheduling hiccup on a 2-CPU machine drops packets at any rate)
                for attempt in range(1 + self.udp_retries):
                    r = self.run_load(["udprate", "--connect", f"127.0.0.1:{port}", "--rate", f"{rate:.0f}",
                                       "--seconds", str(self.udp_trial_s), "--size", "64"],
                                      timeout=self.udp_trial_s + 20)
                    # zero loss, and the generator really sent at that rate
                    ok = r["loss"] <= 0.0 and r["errors"] == 0 and r["rate_sent"] >= 0.97 * rate
                    trials.append({"rate": round(rate), "ok": ok, "loss": r["loss"],
                                   "sent_pps": r["rate_sent"], "attempt": attempt + 1})
                    if ok:
                        break
                if ok:
                    lo = rate
                    best = max(best, r["rate_sent"])
                else:
                    hi = rate
                if hi is None:
                    rate = lo * 2
                    if rate > self.a.udp_max_rate:
                        break
                elif lo == 0:
                    rate = hi / 2
                    if rate < 1000:
                        break
                else:
                    if hi / lo < 1.08:
                        break
                    rate = math.sqrt(lo * hi)
            return {"udp_pps": round(best), "_udp_trials": trials}
        finally:
            self.stop_proxy(ps)

    def m_cps(self, cfg: str) -> dict:
        port, ps = self.start_proxy(cfg, "tcp", self.backends["echo_tcp_close"], pinned=False)
        try:
            r = self.run_load(["connrate", "--connect", f"127.0.0.1:{port}", "--seconds", str(self.cps_s),
                               "--concurrency", str(self.a.cps_concurrency)], timeout=self.cps_s + 30)
            return {"cps": r["cps"], "_cps_errors": r["errors"]}
        finally:
            self.stop_proxy(ps)

    def m_memory(self, cfg: str) -> dict:
        if cfg == "direct":
            raise NotApplicable("no proxy process")
        port, ps = self.start_proxy(cfg, "tcp", self.backends["echo_tcp"], pinned=False)
        idle = None
        try:
            time.sleep(0.5)
            root = ps[0].pid
            rss0 = tree_rss_kib(root)
            idle = self.procs.start([str(self.load), "idle", "--connect", f"127.0.0.1:{port}",
                                     "--count", str(self.idle_n), "--max-seconds", "300"], "idle",
                                    stdout=subprocess.PIPE, stdin=subprocess.PIPE)
            res = json.loads(read_line(idle, 120))
            if "error" in res:
                raise BenchError(f"idle: {res['error']}")
            opened = res["open"]
            if opened <= 0:
                raise BenchError("idle: no connection opened")
            time.sleep(1.0)
            rss1 = tree_rss_kib(root)
            nproc = len(tree_pids(root))
            return {"rss_idle_kib": rss0, "kib_per_session": round((rss1 - rss0) / opened, 2),
                    "_rss_sessions_kib": rss1, "_sessions_open": opened, "_procs": nproc}
        finally:
            if idle is not None:
                self.procs.stop(idle, grace=10)
            self.stop_proxy(ps)

    def run_group(self, group: str, cfg: str) -> dict:
        if group == "bulk":
            return self.m_bulk(cfg)
        if group == "rr_tcp":
            return self.m_rr(cfg, "tcp")
        if group == "rr_udp":
            return self.m_rr(cfg, "udp")
        if group == "udprate":
            return self.m_udprate(cfg)
        if group == "cps":
            return self.m_cps(cfg)
        if group == "memory":
            return self.m_memory(cfg)
        raise ValueError(group)


# --------------------------------------------------------------------------- API (--api)
#
# DESIGN.md section 14's WebSocket targets, ezproxy only (no peer has this API):
#   - one v3 watcher attached: TCP bulk (1 stream) as a ratio to the same pipeline untapped,
#     same daemon, same round (target >= 0.5); and 10k UDP packets/s for a few seconds with the
#     watcher attached: forwarded vs sent, watcher saw vs sent, `lagged` (target: no loss);
#   - the remote WebSocket filter: 64-byte TCP rr through Through: [{remote: {}}] with a filter
#     socket answering every packet `pass`, minus the same pipeline unclaimed (target: added
#     p50 <= 200 us).
# The WebSocket client is bench/ezp-ws.c (wslay). The daemon runs with `Api: {Listen:
# 127.0.0.1:0, Auth: true}` and its own StateDir; the port comes from its log line, the admin
# key from StateDir/admin.key.

API_ROWS = {
    # row -> (label, fmt, target text)
    "ws_bulk_untapped_gbps": ("TCP bulk 1 stream untapped, Gbit/s", "{:.2f}", ""),
    "ws_bulk_tapped_gbps": ("TCP bulk 1 stream, 1 watcher, Gbit/s", "{:.2f}", ""),
    "ws_bulk_ratio": ("  tapped / untapped", "{:.2f}", ">= 0.5"),
    "ws_bulk_watcher_pkts": ("  packets the watcher saw", "{:,.0f}", ""),
    "ws_bulk_lagged": ("  packets reported lagged", "{:,.0f}", ""),
    "ws_udp_sent": ("UDP 10k pkt/s, 1 watcher: sent", "{:,.0f}", ""),
    "ws_udp_forwarded": ("  forwarded (echoed back)", "{:,.0f}", "== sent"),
    "ws_udp_watcher_to_server": ("  watcher saw to_server", "{:,.0f}", "== sent"),
    "ws_udp_watcher_to_client": ("  watcher saw to_client", "{:,.0f}", "== forwarded"),
    "ws_udp_lagged": ("  packets reported lagged", "{:,.0f}", "0"),
    "remote_rr_unclaimed_p50_us": ("TCP 64B rr, remote unclaimed p50, us", "{:.1f}", ""),
    "remote_rr_unclaimed_p99_us": ("TCP 64B rr, remote unclaimed p99, us", "{:.1f}", ""),
    "remote_rr_claimed_p50_us": ("TCP 64B rr, WebSocket filter p50, us", "{:.1f}", ""),
    "remote_rr_claimed_p99_us": ("TCP 64B rr, WebSocket filter p99, us", "{:.1f}", ""),
    "remote_added_p50_us": ("  added p50, us", "{:.1f}", "<= 200"),
    "remote_added_p99_us": ("  added p99, us", "{:.1f}", ""),
}
API_PARTS = {"ws_bulk": "ws_bulk_", "ws_udp": "ws_udp_", "remote_rr": "remote_"}
API_LOG_RE = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
UDP_PROBE_B64 = "cHBwcHBw"  # base64 of "pppppp": ezp-load udprate's session probe, not counted


def build_ws_tool(tmp: Path, force_compile: bool) -> Path:
    src = HERE / "ezp-ws.c"
    for cand in (ROOT / "build" / "bench" / "ezp-ws", Path.cwd() / "build" / "bench" / "ezp-ws"):
        if not force_compile and cand.is_file() and os.access(cand, os.X_OK) \
                and cand.stat().st_mtime >= src.stat().st_mtime:
            return cand
    cc = os.environ.get("CC") or which("gcc") or which("cc")
    if not cc:
        raise BenchError("no C compiler (gcc) found and no build/bench/ezp-ws")
    out = tmp / "ezp-ws"
    r = subprocess.run([cc, "-O2", "-std=gnu11", "-o", str(out), str(src), "-lwslay", "-ljansson",
                        "-lcrypto"], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise BenchError(f"compiling ezp-ws.c failed (needs libwslay-dev, libjansson-dev, "
                         f"libssl-dev):\n{r.stderr}")
    return out


class ApiDaemon:
    """An ezproxy daemon with the API on, started from a YAML config with its own StateDir."""

    def __init__(self, bench: "Bench", name: str, pipelines: str, pin: int | None):
        self.b = bench
        d = bench.tmp / name
        d.mkdir(mode=0o700)
        self.state = d / "state"
        self.state.mkdir(mode=0o700)
        conf = d / "ezproxy.yaml"
        conf.write_text(f"StateDir: {self.state}\n"
                        "Api: {Listen: 127.0.0.1:0, Auth: true}\n"
                        "Logging: {Level: info}\n"
                        f"Pipelines:\n{pipelines}")
        self.p = bench.procs.start([bench.ezproxy_bin(), "run", "-c", str(conf)], name, pin=pin)
        self.key_file = self.state / "admin.key"
        self.port = None
        self.key = None

    def wait_ready(self, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while True:
            if self.p.poll() is not None:
                raise BenchError(f"{self.p.bench_name} exited ({self.p.returncode}): "
                                 f"{tail(self.p.bench_log)}")
            if self.port is None:
                try:
                    m = API_LOG_RE.search(self.p.bench_log.read_text(errors="replace"))
                except OSError:
                    m = None
                if m:
                    self.port = int(m.group(1))
            if self.port is not None and self.key is None and self.key_file.is_file():
                key = self.key_file.read_text().strip()
                self.key = key or None
            if self.port is not None and self.key is not None:
                try:
                    st, _ = self.request("GET", "/api/3/status")
                    if st == 200:
                        return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise BenchError(f"{self.p.bench_name}: API not ready after {timeout:.0f}s "
                                 f"(port {self.port}, key file {'present' if self.key else 'missing'}): "
                                 f"{tail(self.p.bench_log)}")
            time.sleep(0.05)

    def request(self, method: str, path: str) -> tuple[int, object]:
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            c.request(method, path, headers={"Authorization": f"Bearer {self.key}"})
            r = c.getresponse()
            body = r.read()
            try:
                return r.status, json.loads(body) if body else None
            except ValueError:
                return r.status, None
        finally:
            c.close()

    def stop(self):
        self.b.procs.stop(self.p)


class WsClient:
    """One ezp-ws process (watch or filter) on a pipeline."""

    def __init__(self, bench: "Bench", d: ApiDaemon, mode: str, pipeline: str,
                 pin: int | None = None, extra: tuple = ()):
        self.b = bench
        cmd = [str(bench.ws_tool), mode, "--api", f"127.0.0.1:{d.port}", "--key-file", str(d.key_file),
               "--pipeline", pipeline, "--max-seconds", "600", *extra]
        self.p = bench.procs.start(cmd, f"ws-{mode}-{pipeline}", pin=pin,
                                   stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        self.buf = b""
        res = self._line(10)
        if "error" in res:
            self.b.procs.stop(self.p)
            raise BenchError(f"ezp-ws {mode}: {res['error']}")
        if not res.get("ready"):
            self.b.procs.stop(self.p)
            raise BenchError(f"ezp-ws {mode}: unexpected first line {res}")

    def _line(self, timeout: float) -> dict:
        fd = self.p.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.p.bench_name}: no output within {timeout:.0f}s")
            r, _, _ = select.select([fd], [], [], min(left, 0.5))
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise BenchError(f"{self.p.bench_name}: exited early: {tail(self.p.bench_log)}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        vlog(f"      ws: {line.decode(errors='replace')}")
        return json.loads(line)

    def stats(self) -> dict:
        self.p.stdin.write(b"stats\n")
        self.p.stdin.flush()
        return self._line(10)

    def settle(self, keys: tuple, quiet: float = 0.5, timeout: float = 10.0) -> dict:
        """Poll the counters until `keys` stop moving for `quiet` seconds (bounded)."""
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while True:
            s = self.stats()
            cur = tuple(s.get(k) for k in keys)
            if cur != last:
                last, since = cur, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return s
            if time.monotonic() > deadline:
                return s
            time.sleep(0.1)

    def finish(self) -> dict:
        """Close stdin: the client closes its socket and prints its final counters."""
        try:
            self.p.stdin.close()
            res = self._line(10)
        finally:
            self.b.procs.stop(self.p)
        if res.get("failed"):
            raise BenchError(f"ezp-ws {res.get('mode')}: {res.get('last_error')}")
        return res


class ApiRuns:
    """The --api measurements of one round, on fresh daemons."""

    def __init__(self, b: "Bench"):
        self.b = b

    def run(self, rnd: int) -> tuple[dict, dict]:
        res, errs = {}, {}
        for part, fn in (("ws_bulk", self.m_bulk_udp), ("remote_rr", self.m_remote)):
            try:
                res.update(fn(rnd))
            except (BenchError, OSError, ValueError, KeyError) as e:
                log(f"  api {part}: FAILED: {type(e).__name__}: {e}")
                errs[part] = str(e)
        return res, errs

    def m_bulk_udp(self, rnd: int) -> dict:
        b = self.b
        tport, uport = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
        b.cfgn += 1
        d = ApiDaemon(b, f"ezproxy-api-{b.cfgn}", (
            f"  - Name: bulk\n"
            f"    From: {{ tcp: {{ Listen: 127.0.0.1:{tport} }} }}\n"
            f"    To: {{ tcp: {{ Connect: 127.0.0.1:{b.backends['sink']} }} }}\n"
            f"  - Name: udp\n"
            f"    From: {{ udp: {{ Listen: 127.0.0.1:{uport} }} }}\n"
            f"    To: {{ udp: {{ Connect: 127.0.0.1:{b.backends['echo_udp']} }} }}\n"), pin=None)
        out: dict = {}
        try:
            d.wait_ready()
            tcp_ready(tport, [d.p])
            udp_ready(uport, [d.p])

            def bulk() -> float:
                r = b.run_load(["bulk", "--connect", f"127.0.0.1:{tport}", "--streams", "1",
                                "--seconds", str(b.bulk_s)], timeout=b.bulk_s + 20)
                return r["gbps"]

            # alternate which goes first, so drift within a round does not favour one
            if rnd % 2 == 0:
                out["ws_bulk_untapped_gbps"] = bulk()
            w = WsClient(b, d, "watch", "bulk")
            try:
                out["ws_bulk_tapped_gbps"] = bulk()
                w.settle(("frames",), quiet=0.3, timeout=5)  # let the watcher catch up
            finally:
                f = w.finish()
            if rnd % 2 == 1:
                out["ws_bulk_untapped_gbps"] = bulk()
            out["ws_bulk_ratio"] = round(out["ws_bulk_tapped_gbps"] / out["ws_bulk_untapped_gbps"], 3) \
                if out["ws_bulk_untapped_gbps"] else None
            out["ws_bulk_watcher_pkts"] = f["packets"]
            out["ws_bulk_lagged"] = f["lagged"]
            out["_ws_bulk_watcher"] = {k: f[k] for k in ("frames", "bytes", "packets", "lagged",
                                                         "lagged_frames", "error_frames")}

            # 10k packets/s of 64 bytes for --api-udp-seconds with the watcher attached
            w = WsClient(b, d, "watch", "udp", extra=("--skip-data-prefix", UDP_PROBE_B64))
            try:
                secs = b.api_udp_s
                r = b.run_load(["udprate", "--connect", f"127.0.0.1:{uport}", "--rate",
                                str(b.a.api_udp_rate), "--seconds", str(secs), "--size", "64"],
                               timeout=secs + 20)
                w.settle(("to_server", "to_client", "lagged"), quiet=0.5, timeout=10)
            finally:
                f = w.finish()
            out["ws_udp_sent"] = r["sent"]
            out["ws_udp_forwarded"] = r["received"]
            out["ws_udp_watcher_to_server"] = f["to_server"]
            out["ws_udp_watcher_to_client"] = f["to_client"]
            out["ws_udp_lagged"] = f["lagged"]
            out["_ws_udp"] = {"rate_sent": r["rate_sent"], "send_errors": r["errors"],
                              "watcher": {k: f[k] for k in ("frames", "packets", "skipped", "lagged",
                                                            "lagged_frames", "error_frames")}}
            try:  # the daemon's own count of the session (includes the probe datagram)
                st, body = d.request("GET", "/api/3/sessions?pipeline=udp")
                if st == 200 and isinstance(body, dict):
                    out["_ws_udp"]["sessions"] = [
                        {k: s.get(k) for k in ("id", "packets_to_server", "packets_to_client",
                                               "dropped")} for s in body.get("sessions", [])]
            except OSError:
                pass
            return out
        finally:
            d.stop()

    def m_remote(self, rnd: int) -> dict:
        b = self.b
        port = free_port(socket.SOCK_STREAM)
        b.cfgn += 1
        d = ApiDaemon(b, f"ezproxy-api-{b.cfgn}", (
            f"  - Name: rr\n"
            f"    From: {{ tcp: {{ Listen: 127.0.0.1:{port} }} }}\n"
            f"    Through: [ {{ remote: {{}} }} ]\n"
            f"    To: {{ tcp: {{ Connect: 127.0.0.1:{b.backends['echo_tcp_pinned']} }} }}\n"),
            pin=b.pin)
        out: dict = {}
        try:
            d.wait_ready()
            tcp_ready(port, [d.p])
            maxs = 60 if b.a.quick else 180

            def rr(tag: str):
                r = b.run_load(["rr", "--tcp", "--connect", f"127.0.0.1:{port}", "--count",
                                str(b.rr_count), "--size", "64", "--max-seconds", str(maxs)],
                               timeout=maxs + 20, pin=b.pin)
                out[f"remote_rr_{tag}_p50_us"] = r["p50_us"]
                out[f"remote_rr_{tag}_p99_us"] = r["p99_us"]

            if rnd % 2 == 0:
                rr("unclaimed")
            w = WsClient(b, d, "filter", "rr", pin=b.pin)
            try:
                rr("claimed")
            finally:
                f = w.finish()
            if rnd % 2 == 1:
                rr("unclaimed")
            out["remote_added_p50_us"] = round(out["remote_rr_claimed_p50_us"]
                                               - out["remote_rr_unclaimed_p50_us"], 2)
            out["remote_added_p99_us"] = round(out["remote_rr_claimed_p99_us"]
                                               - out["remote_rr_unclaimed_p99_us"], 2)
            out["_remote_filter"] = {k: f[k] for k in ("held", "verdicts", "verdict_failures",
                                                       "error_frames", "last_error")}
            if f["verdicts"] < b.rr_count:
                raise BenchError(f"the filter socket answered {f['verdicts']} packets, fewer than "
                                 f"{b.rr_count} round trips: packets were not held")
            return out
        finally:
            d.stop()


def api_summary(rounds: list[dict]) -> dict:
    summary = {}
    for row, (label, _, target) in API_ROWS.items():
        vals = [r["api"].get(row) for r in rounds if isinstance(r.get("api"), dict)]
        summary[row] = {"label": label, "median": median(vals), "per_round": vals, "target": target}
    # targets: ratio median >= 0.5; added p50 median <= 200; no loss in ANY round
    def get(row):
        return summary[row]["median"]
    if get("ws_bulk_ratio") is not None:
        summary["ws_bulk_ratio"]["met"] = get("ws_bulk_ratio") >= 0.5
    if get("remote_added_p50_us") is not None:
        summary["remote_added_p50_us"]["met"] = get("remote_added_p50_us") <= 200
    udp = [r["api"] for r in rounds if isinstance(r.get("api"), dict) and "ws_udp_sent" in r["api"]]
    if udp:
        summary["ws_udp_forwarded"]["met"] = all(u["ws_udp_forwarded"] == u["ws_udp_sent"] for u in udp)
        summary["ws_udp_watcher_to_server"]["met"] = all(
            u["ws_udp_watcher_to_server"] == u["ws_udp_sent"] for u in udp)
        summary["ws_udp_watcher_to_client"]["met"] = all(
            u["ws_udp_watcher_to_client"] == u["ws_udp_forwarded"] for u in udp)
        summary["ws_udp_lagged"]["met"] = all(u["ws_udp_lagged"] == 0 for u in udp)
    return summary


def print_rows_table(title: str, rows: dict, summary: dict, note: str, out=sys.stdout):
    """One ezproxy-only table: a row per metric with its median, per-round values and target."""
    head = [title, "median", "per round", "target", "met?"]
    body = []
    for row, s in summary.items():
        f = rows[row][1]
        med = s["median"]
        body.append([s["label"], f.format(med) if med is not None else "n/a",
                     " ".join(f.format(v) if v is not None else "-" for v in s["per_round"]),
                     s["target"], {True: "yes", False: "NO", None: ""}[s.get("met")]])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    for cells in [head, ["-" * w for w in widths], *body]:
        print("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                        for i, c in enumerate(cells)), file=out)
    print("\n" + note, file=out)


def print_api_table(summary: dict, out=sys.stdout):
    print_rows_table("API (ezproxy only)", API_ROWS, summary,
                     "no loss = in every round; ratio and added latency = medians over rounds. "
                     "Bulk and UDP unpinned; the rr rows pinned to one CPU (client, daemon, echo "
                     "server, filter socket).", out)


# --------------------------------------------------------------------------- Lua (--lua)
#
# DESIGN.md section 14's Lua target, ezproxy only: 64-byte TCP request/response through a
# pipeline whose Through is one `lua` filter running a trivial EzpFilter that returns true, as
# a ratio to the same pipeline without the filter, in the same daemon and round (target <= 1.5x).
# The daemon, the load client and the echo server are pinned to --pin-cpu, as for the other
# round trips; the order (no filter first / lua first) alternates between rounds.

LUA_ROWS = {
    # row -> (label, fmt, target text)
    "lua_rr_plain_p50_us": ("TCP 64B rr, no filter p50, us", "{:.1f}", ""),
    "lua_rr_plain_p99_us": ("TCP 64B rr, no filter p99, us", "{:.1f}", ""),
    "lua_rr_lua_p50_us": ("TCP 64B rr, trivial lua filter p50, us", "{:.1f}", ""),
    "lua_rr_lua_p99_us": ("TCP 64B rr, trivial lua filter p99, us", "{:.1f}", ""),
    "lua_ratio_p50": ("  lua / no filter p50", "{:.2f}", "<= 1.5"),
    "lua_ratio_p99": ("  lua / no filter p99", "{:.2f}", ""),
}
LUA_TRIVIAL = """-- bench: the trivial filter of DESIGN.md section 14
local seen = false
function EzpFilter(ezp, pkt)
  if not seen then
    seen = true
    log(LEVEL_INFO, "bench: lua filter active")
  end
  return true
end
"""


class LuaRuns:
    """The --lua measurement of one round, on a fresh daemon with two pipelines."""

    def __init__(self, b: "Bench"):
        self.b = b

    def run(self, rnd: int) -> tuple[dict, dict]:
        try:
            return self.m_rr(rnd), {}
        except (BenchError, OSError, ValueError, KeyError) as e:
            log(f"  lua rr: FAILED: {type(e).__name__}: {e}")
            return {}, {"lua_rr": str(e)}

    def m_rr(self, rnd: int) -> dict:
        b = self.b
        b.cfgn += 1
        name = f"ezproxy-lua-{b.cfgn}"
        d = b.tmp / name
        d.mkdir(mode=0o700)
        script = d / "trivial.lua"
        script.write_text(LUA_TRIVIAL)
        plain, lua = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
        echo = b.backends["echo_tcp_pinned"]
        conf = d / "ezproxy.yaml"
        conf.write_text("Logging: {Level: info}\n"
                        "Pipelines:\n"
                        f"  - Name: plain\n"
                        f"    From: {{ tcp: {{ Listen: 127.0.0.1:{plain} }} }}\n"
                        f"    To: {{ tcp: {{ Connect: 127.0.0.1:{echo} }} }}\n"
                        f"  - Name: lua\n"
                        f"    From: {{ tcp: {{ Listen: 127.0.0.1:{lua} }} }}\n"
                        f"    Through: [ {{ lua: {{ Script: {script} }} }} ]\n"
                        f"    To: {{ tcp: {{ Connect: 127.0.0.1:{echo} }} }}\n")
        p = b.procs.start([b.ezproxy_bin(), "run", "-c", str(conf)], name, pin=b.pin)
        out: dict = {}
        try:
            tcp_ready(plain, [p])
            tcp_ready(lua, [p])
            maxs = 60 if b.a.quick else 180

            def rr(tag: str, port: int):
                r = b.run_load(["rr", "--tcp", "--connect", f"127.0.0.1:{port}", "--count",
                                str(b.rr_count), "--size", "64", "--max-seconds", str(maxs)],
                               timeout=maxs + 20, pin=b.pin)
                out[f"lua_rr_{tag}_p50_us"] = r["p50_us"]
                out[f"lua_rr_{tag}_p99_us"] = r["p99_us"]

            runs = [("plain", plain), ("lua", lua)]
            for tag, port in (runs if rnd % 2 == 0 else runs[::-1]):
                rr(tag, port)
            if "lua filter active" not in p.bench_log.read_text(errors="replace"):
                raise BenchError(f"the lua filter saw no packet: {tail(p.bench_log)}")
            for q in ("p50", "p99"):
                base = out[f"lua_rr_plain_{q}_us"]
                out[f"lua_ratio_{q}"] = round(out[f"lua_rr_lua_{q}_us"] / base, 3) if base else None
            return out
        finally:
            b.procs.stop(p)


def lua_summary(rounds: list[dict]) -> dict:
    summary = {}
    for row, (label, _, target) in LUA_ROWS.items():
        vals = [r["lua"].get(row) for r in rounds if isinstance(r.get("lua"), dict)]
        summary[row] = {"label": label, "median": median(vals), "per_round": vals, "target": target}
    if summary["lua_ratio_p50"]["median"] is not None:
        summary["lua_ratio_p50"]["met"] = summary["lua_ratio_p50"]["median"] <= 1.5
    return summary


def print_lua_table(summary: dict, out=sys.stdout):
    print_rows_table("Lua (ezproxy only)", LUA_ROWS, summary,
                     "ratios per round, then the median over rounds; both pipelines in one daemon, "
                     "pinned to one CPU with the client and the echo server.", out)


# --------------------------------------------------------------------------- summary

def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def best_of(vals: dict, better: str):
    vs = {c: v for c, v in vals.items() if c in PEERS and isinstance(v, (int, float)) and v > 0}
    if not vs:
        return None, None
    c = (max if better == "high" else min)(vs, key=vs.get)
    return c, vs[c]


def summarize(rounds: list[dict], rows: list[str], configs: list[str]) -> dict:
    summary = {}
    for row in rows:
        label, better, kind, target = ROWS[row]
        vals = {c: median([r["results"].get(c, {}).get(row) for r in rounds]) for c in configs}
        notes = {}
        for c in configs:
            if vals[c] is None:
                reasons = {r["notes"].get(c, {}).get(row) for r in rounds} - {None}
                if reasons:
                    notes[c] = sorted(reasons)[0]
        r_direct, r_best, bests = [], [], []
        for r in rounds:
            res = r["results"]
            e = res.get("ezproxy", {}).get(row)
            d = res.get("direct", {}).get(row)
            bc, bv = best_of({c: res.get(c, {}).get(row) for c in configs}, better)
            bests.append(bc)
            if isinstance(e, (int, float)) and isinstance(d, (int, float)) and d > 0:
                r_direct.append(e / d)
            if isinstance(e, (int, float)) and bv:
                r_best.append(e / bv)
        ezd, ezb = median(r_direct), median(r_best)
        e = vals.get("ezproxy")
        if kind == "ratio":
            met = None if ezb is None else (ezb >= target if better == "high" else ezb <= target)
            tdesc = (f">= {target:g}x best peer" if better == "high" else f"<= {target:g}x best peer")
        else:
            met = None if e is None else e <= target
            tdesc = f"<= {target:g}"
        summary[row] = {"label": label, "better": better, "values": vals, "notes": notes,
                        "ezp_over_direct": ezd, "ezp_over_best_peer": ezb,
                        "best_peer_per_round": bests, "target": tdesc, "met": met}
    return summary


def fmt(v, row: str) -> str:
    if v is None:
        return "-"
    if row.endswith("gbps"):
        return f"{v:.2f}"
    if row.endswith("_us"):
        return f"{v:.1f}"
    if row in ("udp_pps", "cps", "rss_idle_kib"):
        return f"{v:,.0f}"
    return f"{v:.1f}"


def print_table(summary: dict, configs: list[str], out=sys.stdout):
    head = ["metric", *configs, "ezp/direct", "ezp/best", "target", "met?"]
    body = []
    for row, s in summary.items():
        cells = [s["label"]]
        for c in configs:
            v = s["values"].get(c)
            cells.append(fmt(v, row) if v is not None else ("n/a" if c in s["notes"] else "-"))
        cells.append(f"{s['ezp_over_direct']:.2f}" if s["ezp_over_direct"] is not None else "-")
        cells.append(f"{s['ezp_over_best_peer']:.2f}" if s["ezp_over_best_peer"] is not None else "-")
        cells.append(s["target"])
        cells.append({True: "yes", False: "NO", None: "n/a"}[s["met"]])
        body.append(cells)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    def line(cells):
        return "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells))
    print(line(head), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for b in body:
        print(line(b), file=out)
    notes = {}
    for s in summary.values():
        for c, n in s["notes"].items():
            notes.setdefault((c, n), None)
    if notes:
        print("\nn/a: " + "; ".join(f"{c}: {n}" for c, n in notes), file=out)


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, short durations (< 2 minutes)")
    ap.add_argument("--rounds", type=int, help="rounds (default 3, 1 with --quick)")
    ap.add_argument("--only", help="comma list of: " + ", ".join(GROUP_ORDER) + ", api, lua (aliases: rr, bulk1, bulk8, ...)")
    ap.add_argument("--api", action="store_true", help="also run the API benchmarks (WebSocket watcher, "
                    "remote WebSocket filter; ezproxy only). `--only api` runs just those")
    ap.add_argument("--lua", action="store_true", help="also run the Lua benchmark (64-byte TCP rr "
                    "through a trivial lua filter / no filter; ezproxy only). `--only lua` runs just that")
    ap.add_argument("--api-udp-rate", type=int, default=10000, help="UDP packets/s with a watcher (10000)")
    ap.add_argument("--api-udp-seconds", type=float, default=3.0, help="how long to send them (3)")
    ap.add_argument("--configs", help="comma list of configurations (default: all of " + ", ".join(CONFIGS) + ")")
    ap.add_argument("--ezproxy", default="build/ezproxy", help="ezproxy binary (default build/ezproxy)")
    ap.add_argument("--ezproxy-cmd", help="command template for the ezproxy config; placeholders "
                    "{bin} {listen} {server} {network} {port} {target}")
    ap.add_argument("--ezproxy-stub", choices=["socat"], help="run socat as the 'ezproxy' configuration "
                    "(to test this script before the daemon exists)")
    ap.add_argument("--json", help="write results as JSON to this file")
    ap.add_argument("--pin-cpu", type=int, default=0, help="CPU for the pinned round-trip runs (default 0)")
    ap.add_argument("--no-install", action="store_true", help="never apt-get install missing peers")
    ap.add_argument("--compile", action="store_true", help="always compile ezp-load.c (and ezp-ws.c), "
                    "ignore build/bench/")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--bulk-seconds", type=float)
    ap.add_argument("--cps-seconds", type=float)
    ap.add_argument("--cps-concurrency", type=int, default=8)
    ap.add_argument("--rr-count", type=int)
    ap.add_argument("--udp-trial-seconds", type=float)
    ap.add_argument("--udp-retries", type=int, help="repeat a failed udp trial this often (default 1, 0 with --quick)")
    ap.add_argument("--udp-start-rate", type=float, default=50000)
    ap.add_argument("--udp-max-rate", type=float, default=4e6)
    ap.add_argument("--idle-sessions", type=int, default=1000)
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    if a.rounds is None:
        a.rounds = 1 if a.quick else 3
    groups = []
    if a.only:
        for tok in a.only.split(","):
            tok = tok.strip().lower()
            if tok in ("api", "ws", "websocket"):
                a.api = True
                continue
            if tok in ("lua", "lua_rr"):
                a.lua = True
                continue
            g = ALIASES.get(tok, tok)
            for x in (g if isinstance(g, list) else [g]):
                if x not in GROUPS:
                    ap.error(f"unknown metric {tok!r}; known: {', '.join(GROUP_ORDER)}")
                if x not in groups:
                    groups.append(x)
        groups.sort(key=GROUP_ORDER.index)
    else:
        groups = list(GROUP_ORDER)
    a.groups = groups
    if a.api_udp_rate < 1 or a.api_udp_rate > 1000000 or not 0 < a.api_udp_seconds <= 60:
        ap.error("--api-udp-rate must be 1..1000000 and --api-udp-seconds 0..60")
    if a.configs:
        a.config_list = [c.strip() for c in a.configs.split(",") if c.strip()]
        for c in a.config_list:
            if c not in CONFIGS:
                ap.error(f"unknown configuration {c!r}")
        a.config_list = [c for c in CONFIGS if c in a.config_list]
    else:
        a.config_list = list(CONFIGS)
    return a


def main(argv=None) -> int:
    global VERBOSE
    a = parse_args(argv)
    VERBOSE = a.verbose
    t_start = time.monotonic()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # respect nohup
        signal.signal(signal.SIGHUP, on_term)

    try:  # 1000 idle sessions need ~2000 descriptors in the proxy
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass

    tmp = Path(tempfile.mkdtemp(prefix="ezp-bench-"))
    procs = Procs(tmp)
    rounds: list[dict] = []
    rc = 0
    failures = 0
    try:
        log(f"ezp-bench: temp dir {tmp}")
        load_at_start = busy_warning("at start")
        load = build_load_tool(tmp, a.compile)
        log(f"ezp-bench: load tool {load}")
        need = set(a.config_list) & set(PEERS) if a.groups else set()
        peers = ensure_peers(tmp, install=not a.no_install) if need or a.ezproxy_stub else {}
        b = Bench(a, tmp, procs, load, peers)
        run_api = a.api
        if run_api:
            why = ("the ezproxy column is a stub" if a.ezproxy_stub else
                   None if b.ezproxy_bin() else f"no binary at {a.ezproxy}")
            if why:
                log(f"ezp-bench: api: n/a ({why})")
                run_api = False
            else:
                b.ws_tool = build_ws_tool(tmp, a.compile)
                log(f"ezp-bench: WebSocket client {b.ws_tool}")
        run_lua = a.lua
        if run_lua:
            why = ("the ezproxy column is a stub" if a.ezproxy_stub else
                   None if b.ezproxy_bin() else f"no binary at {a.ezproxy}")
            if why:
                log(f"ezp-bench: lua: n/a ({why})")
                run_lua = False
        for c in (a.config_list if a.groups else []):
            why = b.available(c)
            if why:
                log(f"ezp-bench: {c}: n/a ({why})")
        if "ezproxy" in a.config_list and a.ezproxy_stub:
            log(f"ezp-bench: NOTE: the 'ezproxy' column is a {a.ezproxy_stub} stub, not ezproxy")
        b.start_backends()
        rows = [r for g in a.groups for r in GROUPS[g]]
        configs = a.config_list if a.groups else []
        for rnd in range(a.rounds):
            k = rnd % len(configs) if configs else 0
            order = configs[k:] + configs[:k]
            log(f"ezp-bench: round {rnd + 1}/{a.rounds}: {' '.join(order + (['api'] if run_api else []) + (['lua'] if run_lua else []))}")
            rr = {"round": rnd + 1, "order": order, "results": {}, "notes": {}, "errors": {},
                  "cpu_busy_before": cpu_busy(0.3)}
            for cfg in order:
                res, notes = {}, {}
                t0 = time.monotonic()
                for g in a.groups:
                    try:
                        res.update(b.run_group(g, cfg))
                    except NotApplicable as e:
                        for row in GROUPS[g]:
                            notes[row] = str(e)
                    except (BenchError, OSError, ValueError, KeyError) as e:
                        log(f"  {cfg} {g}: FAILED: {type(e).__name__}: {e}")
                        rr["errors"].setdefault(cfg, {})[g] = str(e)
                        failures += 1
                        for row in GROUPS[g]:
                            notes[row] = "failed"
                rr["results"][cfg] = res
                rr["notes"][cfg] = notes
                brief = ", ".join(f"{k}={fmt(v, k)}" for k, v in res.items() if not k.startswith("_"))
                log(f"  {cfg:8s} ({time.monotonic() - t0:4.1f}s) {brief}")
            if run_api:
                t0 = time.monotonic()
                rr["api"], rr["api_errors"] = ApiRuns(b).run(rnd)
                failures += len(rr["api_errors"])
                brief = ", ".join(f"{k}={v}" for k, v in rr["api"].items() if not k.startswith("_"))
                log(f"  api      ({time.monotonic() - t0:4.1f}s) {brief}")
            if run_lua:
                t0 = time.monotonic()
                rr["lua"], rr["lua_errors"] = LuaRuns(b).run(rnd)
                failures += len(rr["lua_errors"])
                brief = ", ".join(f"{k}={v}" for k, v in rr["lua"].items() if not k.startswith("_"))
                log(f"  lua      ({time.monotonic() - t0:4.1f}s) {brief}")
            rounds.append(rr)
        summary = summarize(rounds, rows, configs)
        api_sum = api_summary(rounds) if run_api else None
        lua_sum = lua_summary(rounds) if run_lua else None
        load_at_end = busy_warning("at the end")
        elapsed = time.monotonic() - t_start
        print()
        title = f"EzProxy benchmark: {a.rounds} round(s), medians over rounds, loopback, {os.cpu_count()} CPUs"
        if a.ezproxy_stub:
            title += f"  [ezproxy column = {a.ezproxy_stub} STUB]"
        print(title)
        print()
        if configs:
            print_table(summary, configs)
            print()
        if api_sum:
            print_api_table(api_sum)
            print()
        if lua_sum:
            print_lua_table(lua_sum)
            print()
        print(f"round trips pinned to CPU {a.pin_cpu} (client, proxy, echo server); throughput unpinned. "
              f"took {elapsed:.0f}s")
        if a.json:
            meta = {
                "started": started,
                "seconds": round(elapsed, 1),
                "host": {"kernel": platform.release(), "cpus": os.cpu_count(),
                         "python": platform.python_version(), "cpu_busy_at_start": load_at_start,
                         "cpu_busy_at_end": load_at_end, "loadavg_at_end": loadavg()},
                "args": {k: v for k, v in vars(a).items()},
                "load_tool": str(load),
                "versions": {
                    "socat": tool_version([peers["socat"], "-V"]) if peers.get("socat") else None,
                    "haproxy": tool_version([peers["haproxy"], "-v"]) if peers.get("haproxy") else None,
                    "nginx": tool_version([peers["nginx"], "-v"]) if peers.get("nginx") else None,
                    "ezproxy": (f"stub:{a.ezproxy_stub}" if a.ezproxy_stub else b.ezproxy_bin()),
                },
                "durations": {"bulk_s": b.bulk_s, "cps_s": b.cps_s, "rr_count": b.rr_count,
                              "udp_trial_s": b.udp_trial_s, "udp_trials_max": b.udp_trials,
                              "idle_sessions": b.idle_n, "api_udp_rate": a.api_udp_rate,
                              "api_udp_s": b.api_udp_s},
                "ws_tool": str(b.ws_tool) if b.ws_tool else None,
            }
            doc = {"meta": meta, "rounds": rounds, "summary": summary}
            if api_sum:
                doc["api_summary"] = api_sum
            if lua_sum:
                doc["lua_summary"] = lua_sum
            Path(a.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
            log(f"ezp-bench: wrote {a.json}")
        if failures:
            log(f"ezp-bench: {failures} measurement(s) failed (see FAILED lines above)")
            rc = 3
    except KeyboardInterrupt as e:
        log(f"\nezp-bench: interrupted ({e}); stopping processes")
        rc = 130
    except BenchError as e:
        log(f"ezp-bench: error: {e}")
        rc = 1
    finally:
        procs.stop_all()
        if a.keep_tmp or rc in (1, 3):
            log(f"ezp-bench: logs and configs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
