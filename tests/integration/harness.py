"""Black-box test harness for the ezproxy daemon.

Standard library only. Everything binds 127.0.0.1; every wait has a deadline
and waits on an event or a condition; every process is stopped by its PID.

Pieces:
  TcpEchoServer   - echoes each connection; can be stopped gracefully or by reset
  HashSink        - TCP server that hashes what it receives and sends a
                    deterministic pattern back (see its docstring for the header)
  UdpEchoServer   - echoes each datagram to its sender
  Daemon          - writes a YAML config, runs `ezproxy run`, parses its stderr
  Proc            - a helper process (redis-server, dnsmasq) stopped by PID
  LogOnFailure    - TestCase mixin printing the daemon's stderr when a test fails
"""

import functools
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HOST = '127.0.0.1'
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHUNK = 1 << 20


def ezproxy_bin():
    return os.environ.get('EZP_BIN') or os.path.join(ROOT, 'build', 'ezproxy')


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return max(0.0, self.end - time.monotonic())

    def expired(self):
        return time.monotonic() >= self.end

    def sleep(self, seconds):
        time.sleep(min(seconds, self.left()))


# ---- deterministic payloads --------------------------------------------------

def pattern_chunks(seed, n, chunk=CHUNK):
    """n bytes of a deterministic pseudo-random stream, in chunks of `chunk`."""
    r = random.Random(seed)
    left = n
    while left > 0:
        k = min(chunk, left)
        yield r.randbytes(k)
        left -= k


def pattern(seed, n):
    return b''.join(pattern_chunks(seed, n))


@functools.lru_cache(maxsize=64)
def pattern_sha256(seed, n, prefix=b''):
    h = hashlib.sha256(prefix)
    for c in pattern_chunks(seed, n):
        h.update(c)
    return h.hexdigest()


def free_port(kind=socket.SOCK_STREAM, both=False):
    """A port that is free now (bind port 0, close). both: free for TCP and UDP."""
    for _ in range(50):
        s = socket.socket(socket.AF_INET, kind)
        s.bind((HOST, 0))
        port = s.getsockname()[1]
        s.close()
        if not both:
            return port
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        o = socket.socket(socket.AF_INET, other)
        try:
            o.bind((HOST, port))
            return port
        except OSError:
            continue
        finally:
            o.close()
    raise RuntimeError('no free port found')


def recv_exact(sock, n, deadline):
    buf = bytearray()
    while len(buf) < n:
        sock.settimeout(max(0.01, deadline.left()))
        b = sock.recv(n - len(buf))
        if not b:
            break
        buf += b
    return bytes(buf)


def recv_until_eof(sock, deadline, hasher=None, keep=True):
    """Read until EOF; returns (bytes or None, count, how) with how in {'eof','reset','timeout'}."""
    buf = bytearray() if keep else None
    count = 0
    while True:
        t = deadline.left()
        if t <= 0:
            return buf, count, 'timeout'
        sock.settimeout(t)
        try:
            b = sock.recv(CHUNK)
        except socket.timeout:
            return buf, count, 'timeout'
        except ConnectionResetError:
            return buf, count, 'reset'
        if not b:
            return buf, count, 'eof'
        count += len(b)
        if hasher is not None:
            hasher.update(b)
        if keep:
            buf += b


def tcp_roundtrip(port, payload, timeout=5.0):
    """Connect, send payload, half-close, read to EOF; returns bytes echoed."""
    d = Deadline(timeout)
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data, _, how = recv_until_eof(s, d)
        if how != 'eof':
            raise AssertionError('roundtrip on port %d ended by %s after %d of %d bytes'
                                 % (port, how, len(data), len(payload)))
        return bytes(data)


def echo_once(sock, payload, timeout=5.0):
    """On a connected TCP socket: send payload and read the same number of bytes back."""
    sock.sendall(payload)
    return recv_exact(sock, len(payload), Deadline(timeout))


def udp_roundtrip(port, payload, timeout=3.0, sock=None):
    own = sock is None
    if own:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((HOST, 0))
    try:
        sock.settimeout(timeout)
        sock.sendto(payload, (HOST, port))
        data, _ = sock.recvfrom(70000)
        return data
    finally:
        if own:
            sock.close()


# ---- servers -----------------------------------------------------------------

class _TcpServer:
    """Thread per connection; stop() wakes every blocked thread and joins them."""

    def __init__(self, port=0):
        self.lock = threading.Condition()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, port))
        self.listener.listen(1024)
        self.port = self.listener.getsockname()[1]
        self.conns = set()
        self.threads = []
        self.accepted = 0
        self.active = 0
        self.peak = 0
        self.stopping = False
        self.abort = False
        self.errors = []
        self.thread = threading.Thread(target=self._accept_loop, daemon=True,
                                       name='%s:%d' % (type(self).__name__, self.port))
        self.thread.start()

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.stopping:
                    conn.close()
                    return
                self.conns.add(conn)
                self.accepted += 1
                self.active += 1
                self.peak = max(self.peak, self.active)
                t = threading.Thread(target=self._run, args=(conn,), daemon=True)
                self.threads.append(t)
                self.lock.notify_all()
            t.start()

    def _run(self, conn):
        try:
            self.handle(conn)
        except Exception as e:  # recorded; the test decides
            if not self.stopping:
                self.errors.append(repr(e))
        finally:
            with self.lock:
                self.conns.discard(conn)
                self.active -= 1
                self.lock.notify_all()
            try:
                conn.close()
            except OSError:
                pass

    def handle(self, conn):
        raise NotImplementedError

    def wait_accepted(self, n, timeout=10.0):
        d = Deadline(timeout)
        with self.lock:
            return self.lock.wait_for(lambda: self.accepted >= n, d.left())

    def wait_active(self, pred, timeout=10.0):
        d = Deadline(timeout)
        with self.lock:
            return self.lock.wait_for(lambda: pred(self.active), d.left())

    def stop(self, abort=False, timeout=5.0):
        """Close the listener and every connection (abort=True: with a reset)."""
        with self.lock:
            if self.stopping:
                return
            self.stopping = True
            self.abort = abort
            conns = list(self.conns)
            threads = list(self.threads)
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        except OSError:
            pass
        self.listener.close()
        for c in conns:
            try:
                if abort:
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
                c.shutdown(socket.SHUT_RD)  # wakes the handler; it closes
            except OSError:
                pass
        d = Deadline(timeout)
        self.thread.join(d.left())
        for t in threads:
            t.join(d.left())


class TcpEchoServer(_TcpServer):
    """Echoes each connection; self.received counts every byte it got (under self.lock)."""

    def __init__(self, port=0):
        self.received = 0
        super().__init__(port)

    def handle(self, conn):
        conn.settimeout(120)
        while True:
            b = conn.recv(65536)
            if not b:
                break
            with self.lock:
                self.received += len(b)
                self.lock.notify_all()
            conn.sendall(b)
        if self.stopping:
            return  # closed by the finally; with SO_LINGER 0 when aborting
        conn.shutdown(socket.SHUT_WR)


class HashSink(_TcpServer):
    """Per connection: the first 16 bytes are a header struct('!QQ', seed, reply_len).
    The sink hashes everything it receives (header included) and sends back
    reply_len bytes of pattern(seed): while receiving (mode 'concurrent'),
    after the client's EOF (mode 'after_eof'), or right after the header and
    then shutdown(SHUT_WR) before reading on (mode 'reply_first'); then it closes.
    gates: {seed: threading.Event}: such a connection reads nothing after its
    header until the event is set (a stalled server, for backpressure tests).
    self.records: one dict per finished connection."""

    HEADER = struct.Struct('!QQ')

    def __init__(self, port=0, mode='concurrent', gates=None):
        self.mode = mode
        self.gates = gates or {}  # seed -> Event: read nothing after the header until set
        self.records = []
        super().__init__(port)

    @classmethod
    def header(cls, seed, reply_len):
        return cls.HEADER.pack(seed, reply_len)

    def _send_pattern(self, conn, seed, n, rec):
        sent = 0
        try:
            for c in pattern_chunks(seed, n):
                conn.sendall(c)
                sent += len(c)
        except OSError as e:
            rec['send_error'] = repr(e)
        rec['sent'] = sent

    def handle(self, conn):
        conn.settimeout(120)
        rec = {'sent': 0}
        h = hashlib.sha256()
        hdr = recv_exact(conn, 16, Deadline(60))
        h.update(hdr)
        n = len(hdr)
        try:
            if len(hdr) < 16:
                rec['error'] = 'short header (%d bytes)' % len(hdr)
                return
            seed, reply_len = self.HEADER.unpack(hdr)
            rec['seed'], rec['reply_len'] = seed, reply_len
            sender = None
            gate = self.gates.get(seed)
            if gate is not None:
                rec['gate_opened'] = gate.wait(120)
            if self.mode == 'reply_first':
                self._send_pattern(conn, seed, reply_len, rec)
                conn.shutdown(socket.SHUT_WR)
                rec['shut_wr'] = True
            if self.mode == 'concurrent':
                sender = threading.Thread(target=self._send_pattern,
                                          args=(conn, seed, reply_len, rec), daemon=True)
                sender.start()
            while True:
                b = conn.recv(CHUNK)
                if not b:
                    break
                h.update(b)
                n += len(b)
            rec['eof'] = True
            if self.mode == 'after_eof':
                self._send_pattern(conn, seed, reply_len, rec)
            if sender:
                sender.join(120)
        finally:
            rec['received'] = n
            rec['sha256'] = h.hexdigest()
            with self.lock:
                self.records.append(rec)
                self.lock.notify_all()

    def wait_records(self, n, timeout=30.0):
        d = Deadline(timeout)
        with self.lock:
            self.lock.wait_for(lambda: len(self.records) >= n, d.left())
            return list(self.records)


class UdpEchoServer:
    def __init__(self, port=0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((HOST, port))
        self.port = self.sock.getsockname()[1]
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.count = 0
        self.peers = set()
        self.thread = threading.Thread(target=self._loop, daemon=True,
                                       name='UdpEcho:%d' % self.port)
        self.thread.start()

    def _loop(self):
        self.sock.settimeout(0.2)  # to notice stop_event
        while not self.stop_event.is_set():
            try:
                data, peer = self.sock.recvfrom(70000)
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.count += 1
                self.peers.add(peer)
            try:
                self.sock.sendto(data, peer)
            except OSError:
                pass

    def stop(self, timeout=5.0):
        self.stop_event.set()
        self.thread.join(timeout)
        self.sock.close()


# ---- the daemon --------------------------------------------------------------

PIPELINE_RE = re.compile(r"pipeline '([^']+)': (\w+) (\S+) -> (\w+) (\S+)")
REBIND_RE = re.compile(r"pipeline '([^']+)' now listens on (\S+)")
CLOSE_RE = re.compile(r"session (\d+) \(([^)]*)\) closed: ([a-z ]+?)(?:: (.*?))?; "
                      r"(\d+) bytes to server, (\d+) to client")


def addr_port(addr):
    return int(addr.rsplit(':', 1)[1])


class Close:
    def __init__(self, m, index):
        self.id = int(m.group(1))
        self.pipeline = m.group(2)
        self.reason = m.group(3)
        self.text = m.group(4) or ''
        self.to_server = int(m.group(5))
        self.to_client = int(m.group(6))
        self.index = index

    def __repr__(self):
        return ('Close(id=%d, pipeline=%r, reason=%r, text=%r, to_server=%d, to_client=%d)'
                % (self.id, self.pipeline, self.reason, self.text, self.to_server,
                   self.to_client))


class DaemonError(AssertionError):
    pass


class Daemon:
    """One `ezproxy run` process.

    config: YAML text (written to a temp dir, run with -c) or None with args.
    args:   extra command-line arguments instead of a config, e.g.
            ['--listen', '127.0.0.1:P', '--server', '127.0.0.1:Q'].
    expect: pipeline names whose startup line to wait for (default: every
            `Name:` in the config)."""

    all_daemons = []

    def __init__(self, config=None, args=None, expect=None):
        self.dir = tempfile.mkdtemp(prefix='ezp-it-')
        self.config_path = os.path.join(self.dir, 'ezproxy.yaml')
        self.args = args
        if config is not None:
            self.write_config(config)
        if expect is None:
            expect = re.findall(r'Name:\s*([\w.-]+)', config or '')
        self.expect = list(expect)
        self.lines = []
        self.cond = threading.Condition()
        self.pipelines = {}
        self.proc = None
        self.rc = None
        self.readers = []
        Daemon.all_daemons.append(self)

    def write_config(self, text):
        tmp = self.config_path + '.tmp'
        with open(tmp, 'w') as f:
            f.write(text)
        os.replace(tmp, self.config_path)

    def start(self, timeout=15.0):
        binary = ezproxy_bin()
        if not os.access(binary, os.X_OK):
            raise DaemonError('ezproxy binary not found at %s (build it: ninja -C build, '
                              'or set EZP_BIN)' % binary)
        cmd = [binary, 'run'] + (self.args if self.args is not None
                                 else ['-c', self.config_path])
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=self.dir)
        for stream, tag in ((self.proc.stderr, ''), (self.proc.stdout, '[stdout] ')):
            t = threading.Thread(target=self._read, args=(stream, tag), daemon=True)
            t.start()
            self.readers.append(t)
        self.wait_pipelines(self.expect, timeout=timeout)
        return self

    def _read(self, stream, tag):
        for raw in iter(stream.readline, b''):
            line = tag + raw.decode('utf-8', 'replace').rstrip('\n')
            with self.cond:
                m = PIPELINE_RE.search(line)
                if m:
                    self.pipelines[m.group(1)] = (m.group(2), m.group(3), m.group(4),
                                                  m.group(5))
                m = REBIND_RE.search(line)
                if m and m.group(1) in self.pipelines:
                    old = self.pipelines[m.group(1)]
                    self.pipelines[m.group(1)] = (old[0], m.group(2), old[2], old[3])
                self.lines.append(line)
                self.cond.notify_all()
        stream.close()
        with self.cond:
            self.cond.notify_all()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def wait_pipelines(self, names, timeout=15.0):
        d = Deadline(timeout)
        with self.cond:
            ok = self.cond.wait_for(
                lambda: all(n in self.pipelines for n in names) or not self.alive(), d.left())
            missing = [n for n in names if n not in self.pipelines]
        if missing:
            raise DaemonError('daemon %s: no startup line for pipeline(s) %s within %.0fs '
                              '(exit code %s)\n%s' % (' '.join(self.cmd), missing, timeout,
                                                      self.proc.poll(), self.tail()))

    def port(self, name):
        with self.cond:
            return addr_port(self.pipelines[name][1])

    def mark(self):
        with self.cond:
            return len(self.lines)

    def wait_line(self, regex, since=0, timeout=10.0):
        """The first line at index >= since matching regex; DaemonError at the deadline."""
        rx = re.compile(regex)
        d = Deadline(timeout)
        pos = [since]
        found = []

        def check():
            while pos[0] < len(self.lines):
                m = rx.search(self.lines[pos[0]])
                pos[0] += 1
                if m:
                    found.append(m)
                    return True
            return not self.alive() and self.readers_done()

        with self.cond:
            self.cond.wait_for(check, d.left())
        if found:
            return found[0]
        raise DaemonError('no daemon log line matching %r within %.0fs\n%s'
                          % (regex, timeout, self.tail()))

    def readers_done(self):
        return all(not t.is_alive() for t in self.readers)

    def closes(self, since=0):
        with self.cond:
            out = []
            for i in range(since, len(self.lines)):
                m = CLOSE_RE.search(self.lines[i])
                if m:
                    out.append(Close(m, i))
            return out

    def closes_of(self, since, pipeline):
        return [c for c in self.closes(since) if c.pipeline == pipeline]

    def wait_closes(self, n=1, since=0, pipeline=None, reasons=None, timeout=10.0):
        """Wait until at least n close lines (filtered) appear after `since`; return them."""
        d = Deadline(timeout)

        def matching():
            return [c for c in self.closes(since)
                    if (pipeline is None or c.pipeline == pipeline)
                    and (reasons is None or c.reason in reasons)]

        with self.cond:
            self.cond.wait_for(lambda: len(matching()) >= n or
                               (not self.alive() and self.readers_done()), d.left())
        got = matching()
        if len(got) < n:
            alls = self.closes(since)
            raise DaemonError('expected %d session close line(s) (pipeline=%s, reasons=%s) '
                              'within %.0fs, got %d: %r; all %d closes since mark, last 10: '
                              '%r\n%s' % (n, pipeline, reasons, timeout, len(got), got[-10:],
                                          len(alls), alls[-10:], self.tail(30)))
        return got

    def wait_until(self, pred, timeout=10.0):
        """Wait (on the log condition) until pred() is true; returns its last value."""
        d = Deadline(timeout)
        with self.cond:
            return self.cond.wait_for(pred, d.left())

    def reload(self, config, timeout=10.0):
        """Write config, SIGHUP, wait for 'config applied' or 'reload refused'.
        Returns (applied: bool, line)."""
        self.write_config(config)
        since = self.mark()
        self.proc.send_signal(signal.SIGHUP)
        m = self.wait_line(r'config applied|reload refused', since=since, timeout=timeout)
        return 'config applied' in m.string, m.string

    def stop(self, timeout=10.0, sig=signal.SIGTERM):
        """SIGTERM by PID; SIGKILL after the deadline. Returns the exit code."""
        if self.proc is None:
            shutil.rmtree(self.dir, ignore_errors=True)
            return None
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                self.rc = 'killed after %.0fs (did not exit on %s)' % (
                    timeout, signal.Signals(sig).name)
        else:
            self.rc = self.proc.returncode
        for t in self.readers:
            t.join(5)
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.rc

    def stop_and_check(self, timeout=10.0):
        if self.proc is None:
            shutil.rmtree(self.dir, ignore_errors=True)
            return  # never started: the start error is the failure
        rc = self.stop(timeout)
        if rc != 0:
            raise DaemonError('daemon exit status %r, expected 0\n%s' % (rc, self.tail()))

    def tail(self, n=80):
        with self.cond:
            lines = self.lines[-n:]
        return '--- daemon stderr (last %d lines) ---\n%s\n---' % (len(lines), '\n'.join(lines))

    def text(self):
        with self.cond:
            return '\n'.join(self.lines)


class Proc:
    """A helper program (redis-server, dnsmasq): output collected, stopped by PID."""

    def __init__(self, cmd, cwd=None):
        self.cmd = cmd
        self.lines = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, cwd=cwd)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in iter(self.proc.stdout.readline, b''):
            with self.cond:
                self.lines.append(raw.decode('utf-8', 'replace').rstrip('\n'))
                self.cond.notify_all()
        self.proc.stdout.close()

    def output(self):
        with self.cond:
            return '\n'.join(self.lines)

    def stop(self, timeout=5.0):
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.reader.join(5)
        return self.proc.returncode


def wait_tcp_port(port, timeout=10.0, proc=None):
    """Poll-connect until something accepts on port (no event exists for this)."""
    d = Deadline(timeout)
    while not d.expired():
        if proc is not None and proc.proc.poll() is not None:
            return False
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


class LogOnFailure:
    """TestCase mixin: daemons made through self.daemon() are stopped at cleanup
    (asserting exit 0) and their stderr is printed if the test failed."""

    def daemon(self, config=None, args=None, expect=None, start=True, check_exit=True):
        d = Daemon(config, args=args, expect=expect)
        self._daemons = getattr(self, '_daemons', [])
        self._daemons.append(d)
        if check_exit:
            self.addCleanup(d.stop_and_check)
        else:
            self.addCleanup(d.stop)
        if start:
            d.start()
        return d

    def run(self, result=None):
        if result is None:
            return super().run(result)
        before = len(result.failures) + len(result.errors)
        self._daemons = []
        try:
            return super().run(result)
        finally:
            if len(result.failures) + len(result.errors) > before or os.environ.get('EZP_SHOW_LOG'):
                for d in self._daemons:
                    cmd = ' '.join(getattr(d, 'cmd', []) or ['(not started)'])
                    sys.stderr.write('\n[%s] daemon: %s exit=%r\n%s\n'
                                     % (self.id(), cmd, d.rc, d.tail(200)))


def rss_kib(pid):
    """Resident set size of a process in KiB (Linux /proc)."""
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0
