"""Integration tests of the remote CLI commands (DESIGN.md section 6):
`ezproxy watch [--pipeline NAME] [--hex]` and `ezproxy key create --perms LIST`.

Two halves:
  - against a real daemon with the API (apiclient.ApiDaemon) and real traffic
    through tcp pipelines to echo servers;
  - against FakeApi, a scripted loopback HTTP/WebSocket server, for what a
    well-behaved daemon never does (a bad Sec-WebSocket-Accept, a chunked
    answer, a dropped connection) and to see exactly what the CLI sends
    (--api / -c / --key resolution, HTTP/1.0, the Bearer header).

Run: python3 tests/integration/test_cli_remote.py   (binary: $EZP_BIN or build/ezproxy)
"""

import base64
import hashlib
import json
import os
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
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from apiclient import ApiDaemon  # noqa: E402
from harness import (HOST, Deadline, LogOnFailure, TcpEchoServer, echo_once,  # noqa: E402
                     ezproxy_bin, free_port)

WS_GUID = b'258EAFA5-E914-47DA-95CA-C5AB0DC85B11'
KEY64 = 'ab' * 32


def tcp_pipe(name, to_port):
    return ('  - Name: %s\n    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
            '    To: {tcp: {Connect: "127.0.0.1:%d"}}\n' % (name, to_port))


def pipelines(*items):
    return 'Pipelines:\n' + ''.join(items)


# ---- the CLI as a subprocess ---------------------------------------------------

class Cli:
    """One `ezproxy ...` process; stdout and stderr collected line by line."""

    def __init__(self, args, env):
        self.args = args
        self.proc = subprocess.Popen([ezproxy_bin()] + args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.cond = threading.Condition()
        self.out, self.err = [], []
        self.readers = [threading.Thread(target=self._read, args=(s, l), daemon=True)
                        for s, l in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    def _read(self, stream, lines):
        for raw in iter(stream.readline, b''):
            with self.cond:
                lines.append(raw.decode('utf-8', 'replace').rstrip('\n'))
                self.cond.notify_all()
        stream.close()
        with self.cond:
            self.cond.notify_all()

    def wait_line(self, regex, err=False, timeout=10.0, since=0):
        """The first stdout (stderr with err=True) line from index `since` matching regex."""
        rx = re.compile(regex)
        lines = self.err if err else self.out
        found = []

        def check():
            for line in lines[since:]:
                m = rx.search(line)
                if m:
                    found.append(m)
                    return True
            return self.proc.poll() is not None and not any(t.is_alive() for t in self.readers)

        with self.cond:
            self.cond.wait_for(check, Deadline(timeout).left())
        if not found:
            raise AssertionError('no %s line matching %r within %.0fs; %s'
                                 % ('stderr' if err else 'stdout', regex, timeout, self.dump()))
        return found[0]

    def wait_exit(self, timeout=10.0):
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError('ezproxy %s did not exit within %.0fs; %s'
                                 % (' '.join(self.args), timeout, self.dump()))
        for t in self.readers:
            t.join(5)
        return rc

    def signal(self, sig):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def dump(self):
        with self.cond:
            return ('exit=%r\n--- stdout ---\n%s\n--- stderr ---\n%s'
                    % (self.proc.poll(), '\n'.join(self.out), '\n'.join(self.err)))


def run_cli(args, env, timeout=20.0):
    c = Cli(args, env)
    rc = c.wait_exit(timeout)
    return rc, '\n'.join(c.out), '\n'.join(c.err)


# ---- FakeApi: a scripted HTTP / WebSocket server ---------------------------------

def ws_accept(key):
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def ws_frame(payload, opcode=1, fin=True):
    if isinstance(payload, str):
        payload = payload.encode()
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack('!H', n)
    else:
        head += bytes([127]) + struct.pack('!Q', n)
    return head + payload


def ws_close(code, reason=b''):
    return ws_frame(struct.pack('!H', code) + reason, opcode=8)


def recv_exact(conn, n, d):
    buf = b''
    while len(buf) < n:
        conn.settimeout(max(0.01, d.left()))
        b = conn.recv(n - len(buf))
        if not b:
            raise EOFError('peer closed after %d of %d bytes' % (len(buf), n))
        buf += b
    return buf


def ws_read(conn, d):
    """One client frame: (opcode, payload); the client must mask."""
    b0, b1 = recv_exact(conn, 2, d)
    n = b1 & 0x7f
    if n == 126:
        n = struct.unpack('!H', recv_exact(conn, 2, d))[0]
    elif n == 127:
        n = struct.unpack('!Q', recv_exact(conn, 8, d))[0]
    if not b1 & 0x80:
        raise AssertionError('client frame not masked')
    mask = recv_exact(conn, 4, d)
    data = recv_exact(conn, n, d)
    return b0 & 0x0f, bytes(c ^ mask[i % 4] for i, c in enumerate(data))


class FakeApi:
    """Loopback server: each connection's request is parsed, recorded in
    self.requests, and answered by handler(fake, conn, req)."""

    def __init__(self, handler):
        self.handler = handler
        self.requests = []
        self.notes = []            # what handlers saw afterwards (close frames, pongs)
        self.cond = threading.Condition()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = 'http://127.0.0.1:%d' % self.port
        self.threads = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn):
        d = Deadline(20)
        try:
            buf = b''
            while b'\r\n\r\n' not in buf:
                conn.settimeout(max(0.01, d.left()))
                b = conn.recv(4096)
                if not b:
                    return
                buf += b
            head, body = buf.split(b'\r\n\r\n', 1)
            lines = head.decode().split('\r\n')
            method, path, version = lines[0].split(' ')
            headers = {}
            for line in lines[1:]:
                k, v = line.split(':', 1)
                headers[k.strip().lower()] = v.strip()
            n = int(headers.get('content-length', '0'))
            if len(body) < n:
                body += recv_exact(conn, n - len(body), d)
            req = {'method': method, 'path': path, 'version': version, 'headers': headers,
                   'body': body.decode()}
            with self.cond:
                self.requests.append(req)
                self.cond.notify_all()
            self.handler(self, conn, req)
        except (OSError, EOFError) as e:
            self.note(('error', repr(e)))
        finally:
            conn.close()

    def note(self, what):
        with self.cond:
            self.notes.append(what)
            self.cond.notify_all()

    def wait_note(self, pred, timeout=10.0):
        with self.cond:
            self.cond.wait_for(lambda: any(pred(n) for n in self.notes), Deadline(timeout).left())
            return [n for n in self.notes if pred(n)]

    def stop(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for t in self.threads:
            t.join(5)


def reply(status, obj=None, raw=None, extra=''):
    """A handler answering one HTTP response."""
    def h(fake, conn, req):
        body = raw if raw is not None else json.dumps(obj).encode() if obj is not None else b''
        conn.sendall(('HTTP/1.1 %d X\r\nContent-Type: application/json\r\n%s'
                      'Content-Length: %d\r\n\r\n' % (status, extra, len(body))).encode() + body)
    return h


def ws_script(events, end='close', close_code=1001, accept=None):
    """A WebSocket handler: 101 (the first event in the same write), send events
    (dicts as JSON text frames, bytes as raw frames), then end:
    'close' send close_code and read the client's answer; 'drop' close the TCP
    connection; 'wait' wait for the client's close frame and answer it."""
    def h(fake, conn, req):
        key = req['headers'].get('sec-websocket-key', '')
        head = ('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n'
                'Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n'
                % (accept or ws_accept(key))).encode()
        frames = [ws_frame(json.dumps(e)) if isinstance(e, dict) else e for e in events]
        conn.sendall(head + (frames[0] if frames else b''))
        for f in frames[1:]:
            conn.sendall(f)
        d = Deadline(15)
        if end == 'drop':
            return
        if end == 'close':
            conn.sendall(ws_close(close_code, b'bye'))
        while True:
            op, data = ws_read(conn, d)
            fake.note(('frame', op, data))
            if op == 8:
                if end == 'wait':
                    conn.sendall(ws_close(1000))
                return
    return h


# ---- shared setup ----------------------------------------------------------------

class Base(LogOnFailure, unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='ezp-cli-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        home = os.path.join(self.tmp, 'home')
        os.makedirs(home)
        # a clean environment: no EZP_KEY, a HOME and XDG_STATE_HOME of our own
        self.env = {k: v for k, v in os.environ.items() if k not in ('EZP_KEY',)}
        self.env.update(HOME=home, XDG_STATE_HOME=os.path.join(self.tmp, 'xdg'), TZ='UTC')

    def fake(self, handler):
        f = FakeApi(handler)
        self.addCleanup(f.stop)
        return f

    def cli(self, args, env=None):
        c = Cli(args, env or self.env)
        self.addCleanup(c.kill)
        return c

    def echo(self):
        e = TcpEchoServer()
        self.addCleanup(e.stop)
        return e

    def api_daemon(self, config, **kw):
        d = ApiDaemon(config, **kw)
        self._daemons = getattr(self, '_daemons', [])
        self._daemons.append(d)
        self.addCleanup(d.stop)
        return d.start()


# ---- against a real daemon ------------------------------------------------------

class T01WatchDaemon(Base):
    def remote(self, d):
        return ['--api', 'http://127.0.0.1:%d' % d.api_port, '--key', d.admin_key]

    def test_watch_shows_traffic_as_text(self):
        e = self.echo()
        d = self.api_daemon(pipelines(tcp_pipe('web', e.port)))
        w = self.cli(['watch'] + self.remote(d))
        w.wait_line(r'watching pipeline.* web', err=True)
        with socket.create_connection((HOST, d.port('web')), timeout=5) as s:
            self.assertEqual(echo_once(s, b'hello\x00wor"ld\n'), b'hello\x00wor"ld\n')
        pat = (r'^\d\d:\d\d:\d\d\.\d{3} #(\d+) web %s 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+ '
               r'13 bytes  "hello\\x00wor\\"ld\\x0a"$')
        up = w.wait_line(pat % 'to_server')
        down = w.wait_line(pat % 'to_client')
        self.assertEqual(up.group(1), down.group(1))
        w.wait_line(r'#%s web opened tcp 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:%d'
                    % (up.group(1), e.port))
        w.wait_line(r'#%s web closed tcp .*13 bytes to server, 13 to client' % up.group(1))
        w.signal(signal.SIGINT)
        self.assertEqual(w.wait_exit(), 0, w.dump())

    def test_watch_hex(self):
        e = self.echo()
        d = self.api_daemon(pipelines(tcp_pipe('web', e.port)))
        w = self.cli(['watch', '--hex'] + self.remote(d))
        w.wait_line(r'watching', err=True)
        payload = bytes(range(0x41, 0x41 + 20))
        with socket.create_connection((HOST, d.port('web')), timeout=5) as s:
            echo_once(s, payload)
        m = w.wait_line(r'#\d+ web to_server .* 20 bytes$')
        i = w.out.index(m.string)
        w.wait_line(r'^  0010  ', since=i)
        self.assertEqual(w.out[i + 1], '  0000  41 42 43 44 45 46 47 48  49 4a 4b 4c 4d 4e 4f 50 '
                                       ' |ABCDEFGHIJKLMNOP|')
        self.assertTrue(w.out[i + 2].startswith('  0010  51 52 53 54 '), w.dump())
        self.assertTrue(w.out[i + 2].endswith('|QRST|'), w.dump())
        w.signal(signal.SIGTERM)
        self.assertEqual(w.wait_exit(), 0, w.dump())

    def test_pipeline_filter(self):
        e = self.echo()
        d = self.api_daemon(pipelines(tcp_pipe('alpha', e.port), tcp_pipe('beta', e.port)))
        only = self.cli(['watch', '--pipeline', 'alpha'] + self.remote(d))
        every = self.cli(['watch'] + self.remote(d))
        only.wait_line(r'watching pipeline alpha\b', err=True)
        every.wait_line(r'watching', err=True)
        with socket.create_connection((HOST, d.port('beta')), timeout=5) as s:
            echo_once(s, b'to-beta')
        every.wait_line(r' beta to_client .*"to-beta"')
        with socket.create_connection((HOST, d.port('alpha')), timeout=5) as s:
            echo_once(s, b'to-alpha')
        every.wait_line(r' alpha to_client .*"to-alpha"')
        only.wait_line(r' alpha to_client .*"to-alpha"')
        self.assertFalse([l for l in only.out if ' beta ' in l], only.dump())

    def test_unknown_pipeline(self):
        d = self.api_daemon(pipelines(tcp_pipe('web', 9)))
        rc, out, err = run_cli(['watch', '--pipeline', 'nope'] + self.remote(d), self.env)
        self.assertNotEqual(rc, 0)
        self.assertIn('nope', err)
        self.assertEqual(len(err.splitlines()), 1, err)

    def test_exits_when_daemon_stops(self):
        d = self.api_daemon(pipelines(tcp_pipe('web', 9)))
        w = self.cli(['watch'] + self.remote(d))
        w.wait_line(r'watching', err=True)
        d.stop()
        rc = w.wait_exit(15)
        self.assertEqual(rc, 0, w.dump())
        w.wait_line(r'the daemon ended the watch \(1001', err=True)

    def test_watch_needs_websocket_permission(self):
        d = self.api_daemon(pipelines(tcp_pipe('web', 9)))
        key = d.make_key(['CheckStatus'])
        rc, out, err = run_cli(['watch', '--api', 'http://127.0.0.1:%d' % d.api_port,
                                '--key', key], self.env)
        self.assertEqual(rc, 1)
        self.assertRegex(err, r'refused \(403.*UseWebsocket permission')


class T02KeyDaemon(Base):
    def test_key_create_with_config(self):
        """-c FILE: the API from its Api.Listen, the key from its StateDir/admin.key."""
        port = free_port()
        state = os.path.join(self.tmp, 'state')
        cfg = ('StateDir: %s\nApi:\n  Listen: 127.0.0.1:%d\n  Auth: true\n%s'
               % (state, port, pipelines(tcp_pipe('web', 9))))
        d = self.api_daemon(cfg, full=True, state_dir=state)
        rc, out, err = run_cli(['key', 'create', '--perms', 'checkstatus,USEWEBSOCKET',
                                '--name', 'viewer', '-c', d.config_path], self.env)
        self.assertEqual(rc, 0, err)
        key = out.strip()
        self.assertRegex(key, r'^\S{16,}$')
        self.assertRegex(err, r"created key \S+ 'viewer' with perms CheckStatus,UseWebsocket")
        st, js, raw, _ = d.get('/api/3/keys/self', key=key)
        self.assertEqual(st, 200, raw)
        self.assertEqual(sorted(js['perms']) if isinstance(js['perms'], list) else js['perms'],
                         ['CheckStatus', 'UseWebsocket'] if isinstance(js['perms'], list) else 5)
        # and the new key watches
        w = self.cli(['watch', '-c', d.config_path, '--key', key])
        w.wait_line(r'watching pipeline web', err=True)
        w.signal(signal.SIGINT)
        self.assertEqual(w.wait_exit(), 0, w.dump())

    def test_key_from_env_and_numbers(self):
        d = self.api_daemon(pipelines(tcp_pipe('web', 9)))
        env = dict(self.env, EZP_KEY=d.admin_key)
        api = ['--api', 'http://127.0.0.1:%d' % d.api_port]
        rc, out, err = run_cli(['key', 'create', '--perms', '3'] + api, env)
        self.assertEqual(rc, 0, err)
        self.assertIn('with perms CheckStatus,Close', err)
        rc, out, err = run_cli(['key', 'create', '--perms', 'admin'] + api, env)
        self.assertEqual(rc, 0, err)
        self.assertIn('with perms CheckStatus,Close,UseWebsocket,Filter,Inject,MakeKeys,'
                      'DuplicateKeys,Reconfigure,Capture', err)
        st, js, raw, _ = d.get('/api/3/keys/self', key=out.strip())
        self.assertEqual(st, 200, raw)

    def test_bad_perms_name(self):
        rc, out, err = run_cli(['key', 'create', '--perms', 'CheckStatus,Teleport',
                                '--api', 'http://127.0.0.1:9'], self.env)
        self.assertEqual(rc, 2)
        self.assertEqual(out, '')
        self.assertIn("unknown permission 'Teleport'", err)
        self.assertEqual(len(err.splitlines()), 1)
        for bad in ('', '512', ',', '0x', '-1'):
            rc, out, err = run_cli(['key', 'create', '--perms', bad, '--api',
                                    'http://127.0.0.1:9'], self.env)
            self.assertEqual(rc, 2, (bad, err))
            self.assertEqual(len(err.splitlines()), 1, err)

    def test_missing_and_wrong_key(self):
        d = self.api_daemon(pipelines(tcp_pipe('web', 9)))
        api = ['--api', 'http://127.0.0.1:%d' % d.api_port]
        # -c only for an empty StateDir (the default one may hold a key when run as root)
        cfg = os.path.join(self.tmp, 'cli.yaml')
        with open(cfg, 'w') as fh:
            fh.write('StateDir: %s/empty\nApi: {Listen: "127.0.0.1:1"}\nPipelines: []\n'
                     % self.tmp)
        rc, out, err = run_cli(['key', 'create', '--perms', '1', '-c', cfg] + api, self.env)
        self.assertEqual(rc, 1)
        self.assertRegex(err, r'refused \(401.*no key was sent \(no --key, no \$EZP_KEY, '
                              r'and .*admin\.key: No such file or directory\)')
        self.assertEqual(len(err.splitlines()), 1, err)
        rc, out, err = run_cli(['key', 'create', '--perms', '1', '--key', 'f' * 64] + api,
                               self.env)
        self.assertEqual(rc, 1)
        self.assertRegex(err, r'refused \(401.*does not know the key from --key')
        weak = d.make_key(['CheckStatus'])
        rc, out, err = run_cli(['key', 'create', '--perms', '1', '--key', weak] + api,
                               self.env)
        self.assertEqual(rc, 1)
        self.assertRegex(err, r'refused \(403.*MakeKeys permission')

    def test_default_state_dir(self):
        """No --key, no $EZP_KEY, no -c: $XDG_STATE_HOME/ezproxy/admin.key."""
        if os.geteuid() == 0:
            self.skipTest('as root the default state directory is /var/lib/ezproxy, which '
                          'tests do not touch')
        d = self.api_daemon(pipelines(tcp_pipe('web', 9)))
        state = os.path.join(self.env['XDG_STATE_HOME'], 'ezproxy')
        os.makedirs(state)
        with open(os.path.join(state, 'admin.key'), 'w') as f:
            f.write('\n  %s  \n' % d.admin_key)
        rc, out, err = run_cli(['key', 'create', '--perms', 'Close', '--api',
                                'http://127.0.0.1:%d' % d.api_port], self.env)
        self.assertEqual(rc, 0, err)

    def test_unreachable(self):
        port = free_port()
        rc, out, err = run_cli(['key', 'create', '--perms', '1', '--api',
                                'http://127.0.0.1:%d' % port], self.env)
        self.assertEqual(rc, 1)
        self.assertEqual(err.strip(), 'ezproxy: cannot reach the ezproxy API at '
                         'http://127.0.0.1:%d: Connection refused; is the daemon running? '
                         '(--api URL)' % port)
        rc, out, err = run_cli(['watch', '--api', 'http://127.0.0.1:%d' % port], self.env)
        self.assertEqual(rc, 1)
        self.assertIn('Connection refused; is the daemon running?', err)


# ---- against FakeApi -------------------------------------------------------------

CREATED = {'id': '0123456789abcdef', 'key': KEY64, 'perms': ['CheckStatus', 'Close'],
           'name': 'n'}


class T03Resolution(Base):
    def test_sends_http10_bearer_and_json(self):
        f = self.fake(reply(201, CREATED))
        rc, out, err = run_cli(['key', 'create', '--perms', ' checkstatus , CLOSE', '--name',
                                'n', '--api', f.url + '/', '--key', 'K1'], self.env)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, KEY64)
        self.assertIn("created key 0123456789abcdef 'n' with perms CheckStatus,Close", err)
        req = f.requests[0]
        self.assertEqual((req['method'], req['path'], req['version']),
                         ('POST', '/api/3/keys', 'HTTP/1.0'))
        self.assertEqual(req['headers']['authorization'], 'Bearer K1')
        self.assertEqual(req['headers']['host'], '127.0.0.1:%d' % f.port)
        self.assertEqual(json.loads(req['body']), {'perms': ['CheckStatus', 'Close'],
                                                   'name': 'n'})

    def test_key_precedence(self):
        f = self.fake(reply(201, dict(CREATED, perms=7)))
        state = os.path.join(self.tmp, 'st')
        os.makedirs(state)
        with open(os.path.join(state, 'admin.key'), 'w') as fh:
            fh.write('FILEKEY\n')
        cfg = os.path.join(self.tmp, 'c.yaml')
        with open(cfg, 'w') as fh:
            fh.write('StateDir: %s\nApi:\n  Listen: 0.0.0.0:%d\n  Auth: true\nPipelines: []\n'
                     % (state, f.port))
        env = dict(self.env, EZP_KEY='ENVKEY')
        for args, e, want in ((['--key', 'OPTKEY'], env, 'OPTKEY'), ([], env, 'ENVKEY'),
                              ([], self.env, 'FILEKEY')):
            rc, out, err = run_cli(['key', 'create', '--perms', 'admin', '-c', cfg] + args, e)
            self.assertEqual(rc, 0, err)
            self.assertIn('perms CheckStatus,Close,UseWebsocket', err)
            self.assertEqual(f.requests[-1]['headers']['authorization'], 'Bearer ' + want)
            self.assertEqual(json.loads(f.requests[-1]['body']), {'perms': 511})
        # --api wins over the config's Api.Listen
        rc, out, err = run_cli(['key', 'create', '--perms', '1', '-c', cfg, '--api',
                                'http://127.0.0.1:%d' % free_port()], self.env)
        self.assertEqual(rc, 1)
        self.assertIn('Connection refused', err)

    def test_legacy_config(self):
        """The old program's form: Api.Address {Address, Port}."""
        f = self.fake(reply(201, CREATED))
        cfg = os.path.join(self.tmp, 'old.yaml')
        with open(cfg, 'w') as fh:
            fh.write('ProxyAddress: {Address: 127.0.0.1, Port: 1}\n'
                     'ServerAddress: {Address: 127.0.0.1, Port: 2}\n'
                     'Api: {Enable: true, UseAuth: true, Address: {Address: 127.0.0.1, '
                     'Port: %d}}\n' % f.port)
        rc, out, err = run_cli(['key', 'create', '--perms', '1', '-c', cfg, '--key', 'K'],
                               self.env)
        self.assertEqual(rc, 0, err)
        self.assertEqual(f.requests[0]['path'], '/api/3/keys')

    def test_config_errors(self):
        cases = {
            'noapi': ('Api: {Enable: false}\nPipelines: []\n', 'has no enabled Api section'),
            'port0': ('Api: {Listen: "127.0.0.1:0"}\nPipelines: []\n', 'no fixed port'),
            'tls': ('Api: {Listen: "127.0.0.1:1", Tls: {Cert: a.pem, Key: b.pem}}\n'
                    'Pipelines: []\n', 'does not speak TLS'),
            'bad': ('Api: {Listen: "127.0.0.1:1"}\nNope: 1\n', 'invalid config'),
        }
        for name, (text, want) in cases.items():
            path = os.path.join(self.tmp, name + '.yaml')
            with open(path, 'w') as fh:
                fh.write(text)
            rc, out, err = run_cli(['watch', '-c', path], self.env)
            self.assertEqual(rc, 2, (name, err))
            self.assertIn(want, err)
            self.assertEqual(len(err.splitlines()), 1, err)
        rc, out, err = run_cli(['watch', '-c', os.path.join(self.tmp, 'missing.yaml')],
                               self.env)
        self.assertEqual(rc, 2)
        self.assertIn('cannot read config', err)

    def test_bad_urls_and_usage(self):
        for url, want in (('https://127.0.0.1:1', 'does not speak TLS'),
                          ('ftp://x', 'is not an API address'),
                          ('http://127.0.0.1:99999', 'is not an API address'),
                          ('http://[::1', 'is not an API address'),
                          ('http://h:1/path', 'is not an API address')):
            rc, out, err = run_cli(['watch', '--api', url], self.env)
            self.assertEqual(rc, 2, (url, err))
            self.assertIn(want, err)
        for args in (['key'], ['key', 'delete'], ['key', 'create'], ['key', 'create', 'x'],
                     ['watch', 'x'], ['watch', '--max-bytes', 'lots'], ['watch', '--bogus'],
                     ['watch', '--pipeline', '']):
            rc, out, err = run_cli(args, self.env)
            self.assertEqual(rc, 2, (args, err))
        for args in (['key', '--help'], ['key', 'create', '--help'], ['watch', '--help']):
            rc, out, err = run_cli(args, self.env)
            self.assertEqual(rc, 0)
            self.assertIn('usage: ezproxy', out)
        rc, out, err = run_cli(['key', 'create', '--perms', '1', '--api', 'http://127.0.0.1:1',
                                '--key', 'two words'], self.env)
        self.assertEqual(rc, 1)
        self.assertIn('spaces or control characters', err)
        rc, out, err = run_cli(['key', 'create', '--perms', '1', '--api',
                                'http://no-such-host.invalid:1'], self.env)
        self.assertEqual(rc, 1)
        self.assertIn('cannot resolve', err)


class T04HttpAnswers(Base):
    def key_create(self, handler):
        f = self.fake(handler)
        return run_cli(['key', 'create', '--perms', '1', '--api', f.url, '--key', 'K'],
                       self.env)

    def test_chunked_is_refused(self):
        def h(fake, conn, req):
            conn.sendall(b'HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n'
                         b'2\r\n{}\r\n0\r\n\r\n')
        rc, out, err = self.key_create(h)
        self.assertEqual(rc, 1)
        self.assertIn("Transfer-Encoding 'chunked'", err)

    def test_not_http(self):
        rc, out, err = self.key_create(lambda f, c, r: c.sendall(b'SSH-2.0-OpenSSH\r\n\r\n'))
        self.assertEqual(rc, 1)
        self.assertIn('did not answer in HTTP', err)

    def test_short_body_and_no_answer(self):
        rc, out, err = self.key_create(
            lambda f, c, r: c.sendall(b'HTTP/1.0 201 OK\r\nContent-Length: 100\r\n\r\n{"id"'))
        self.assertEqual(rc, 1)
        self.assertIn('closed the connection 5 bytes into a 100-byte answer', err)
        rc, out, err = self.key_create(lambda f, c, r: None)
        self.assertEqual(rc, 1)
        self.assertIn('closed the connection without an answer', err)
        rc, out, err = self.key_create(
            lambda f, c, r: c.sendall(b'HTTP/1.0 201 OK\r\nContent-Length: x\r\n\r\n'))
        self.assertIn('bad or too large Content-Length', err)

    def test_body_to_eof_and_odd_answers(self):
        body = json.dumps(CREATED).encode()
        rc, out, err = self.key_create(
            lambda f, c, r: c.sendall(b'HTTP/1.0 201 Created\r\n\r\n' + body))
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, KEY64)
        rc, out, err = self.key_create(reply(201, {'id': 'x'}))
        self.assertEqual(rc, 1)
        self.assertIn('without a key', err)
        rc, out, err = self.key_create(reply(500, raw=b'boom\nsecond line'))
        self.assertEqual(rc, 1)
        self.assertIn('refused (500): boom; see the daemon', err)
        rc, out, err = self.key_create(reply(404, {'error': {'code': 'not_found',
                                                             'message': 'no route'}}))
        self.assertIn('refused (404 not_found): no route; check', err)
        self.assertEqual(len(err.splitlines()), 1, err)


class T05WatchProtocol(Base):
    def watch(self, handler, *args):
        f = self.fake(handler)
        w = self.cli(['watch', '--api', f.url, '--key', 'K'] + list(args))
        return f, w

    def packet(self, payload, **kw):
        p = {'type': 'packet', 'seq': 1, 'pipeline': 'web', 'session': 7, 'transport': 'tcp',
             'direction': 'to_server', 'src': '127.0.0.1:1000', 'dst': '127.0.0.1:2000',
             'leg': 0, 'flags': [], 'verdict_required': False, 'ts_us': 3723004000,
             'data': base64.b64encode(payload).decode()}
        p.update(kw)
        return p

    def test_events(self):
        sess = {'id': 7, 'pipeline': 'web', 'transport': 'tcp', 'client': '127.0.0.1:1000',
                'server': '127.0.0.1:2000', 'bytes_to_server': 3, 'bytes_to_client': 4,
                'state': 'open'}
        events = [
            {'type': 'hello', 'version': 3, 'permissions': ['UseWebsocket'],
             'pipelines': ['web', {'name': 'other'}]},
            {'type': 'session_opened', 'session': sess},
            self.packet(b'ab\\\x7f', flags=['injected', 'replaced']),
            self.packet(b'', flags=['dropped']),
            self.packet(b'x' * 300, direction='to_client', flags=['replaced']),
            {'type': 'hello', 'pipelines': ['evil\x1b[2Jname']},
            {'type': 'session_changed', 'session': dict(sess, state='draining')},
            {'type': 'session_closed', 'session': dict(sess, state='closing',
                                                       close_reason='server_closed',
                                                       close_text='reset by peer')},
            {'type': 'lagged', 'dropped': 5},
            {'type': 'error', 'code': 'bad_message', 'message': 'what?', 'ref': None},
            {'no': 'type'},
            self.packet(b'', data='!!!'),
            ws_frame(b'binary is ignored', opcode=2),
            ws_frame(b'pi', opcode=9),
            ws_frame(json.dumps(self.packet(b'frag'))[:10], fin=False),
            ws_frame(json.dumps(self.packet(b'frag'))[10:], opcode=0),
            {'type': 'future_event'},
        ]
        f, w = self.watch(ws_script(events, close_code=1001))
        self.assertEqual(w.wait_exit(), 0, w.dump())
        self.assertEqual(f.requests[0]['path'], '/api/3/socket?mode=watch')
        self.assertEqual(f.requests[0]['headers']['authorization'], 'Bearer K')
        self.assertEqual(f.requests[0]['version'], 'HTTP/1.1')
        out = w.out
        self.assertRegex(out[0], r'^\d\d:\d\d:\d\d\.\d{3} #7 web opened tcp 127\.0\.0\.1:1000 '
                                 r'-> 127\.0\.0\.1:2000$')
        self.assertEqual(out[1], '01:02:03.004 #7 web to_server 127.0.0.1:1000 -> '
                                 '127.0.0.1:2000 4 bytes [injected,replaced]  "ab\\\\\\x7f"')
        self.assertEqual(out[2], '01:02:03.004 #7 web to_server 127.0.0.1:1000 -> '
                                 '127.0.0.1:2000 0 bytes [dropped]  ""')
        self.assertEqual(out[3], '01:02:03.004 #7 web to_client 127.0.0.1:1000 -> '
                                 '127.0.0.1:2000 300 bytes [replaced]  "%s" ... (+44 bytes)'
                         % ('x' * 256))
        self.assertRegex(out[4], r'#7 web changed tcp .* \(draining\)$')
        self.assertRegex(out[5], r'#7 web closed tcp 127\.0\.0\.1:1000 -> 127\.0\.0\.1:2000, '
                                 r'3 bytes to server, 4 to client: server_closed: reset by peer$')
        self.assertIn('(undecodable data)', out[6])
        self.assertRegex(out[7], r' 4 bytes  "frag"$')
        self.assertEqual(len(out), 8, w.dump())
        err = '\n'.join(w.err)
        self.assertIn('watching pipelines web, other on %s; Ctrl-C stops' % f.url, err)
        self.assertIn('watching pipeline evil?[2Jname on', err)
        self.assertIn('the daemon dropped 5 event(s)', err)
        self.assertIn('the daemon reported an error: what? (bad_message)', err)
        self.assertIn('not a v3 event', err)
        self.assertIn('the daemon ended the watch (1001: bye); it is shutting down', err)
        # (the ping's pong may be dropped by wslay once the close frame is queued)
        closes = f.wait_note(lambda n: n[0] == 'frame' and n[1] == 8)
        self.assertEqual(closes[0][2][:2], struct.pack('!H', 1001))

    def test_hex_and_pipeline_query(self):
        f, w = self.watch(ws_script([self.packet(bytes(range(40)))], close_code=1000),
                          '--hex', '--max-bytes', '20', '--pipeline', 'a b/ü')
        self.assertEqual(w.wait_exit(), 0, w.dump())
        self.assertEqual(f.requests[0]['path'],
                         '/api/3/socket?mode=watch&pipeline=a%20b%2F%C3%BC')
        self.assertEqual(w.out[1:], [
            '  0000  00 01 02 03 04 05 06 07  08 09 0a 0b 0c 0d 0e 0f  |................|',
            '  0010  10 11 12 13                                       |....|',
            '  ... (+20 bytes)'])
        f, w = self.watch(ws_script([self.packet(b'y' * 300)], close_code=1000),
                          '--max-bytes', '0')
        self.assertEqual(w.wait_exit(), 0, w.dump())
        self.assertTrue(w.out[0].endswith('"%s"' % ('y' * 300)), w.dump())

    def test_ctrl_c_sends_close(self):
        f, w = self.watch(ws_script([{'type': 'hello', 'pipelines': []}], end='wait'))
        w.wait_line(r'watching pipelines \(none yet\)', err=True)
        w.signal(signal.SIGINT)
        self.assertEqual(w.wait_exit(), 0, w.dump())
        closes = f.wait_note(lambda n: n[0] == 'frame' and n[1] == 8)
        self.assertEqual(closes[0][2][:2], struct.pack('!H', 1000))

    def test_other_close_code_fails(self):
        f, w = self.watch(ws_script([], close_code=1011))
        self.assertEqual(w.wait_exit(), 1, w.dump())
        self.assertIn('the daemon ended the watch (1011: bye)', '\n'.join(w.err))

    def test_dropped_connection(self):
        f, w = self.watch(ws_script([{'type': 'hello', 'pipelines': ['web']}], end='drop'))
        self.assertEqual(w.wait_exit(), 1, w.dump())
        self.assertIn('lost the connection to the ezproxy API at %s: the daemon closed the '
                      'connection without a WebSocket close frame' % f.url, '\n'.join(w.err))

    def test_bad_accept(self):
        f, w = self.watch(ws_script([], accept='AAAA'))
        self.assertEqual(w.wait_exit(), 1, w.dump())
        self.assertIn('without a valid Sec-WebSocket-Accept', '\n'.join(w.err))

    def test_refused_upgrade(self):
        f, w = self.watch(reply(401, {'error': {'code': 'unauthorized',
                                                'message': 'unknown key'}}))
        self.assertEqual(w.wait_exit(), 1, w.dump())
        self.assertEqual(w.err, ['ezproxy: the ezproxy API at %s refused (401 unauthorized): '
                                 'unknown key; the daemon does not know the key from --key: '
                                 'pass a valid one with --key KEY or $EZP_KEY' % f.url])

    def test_stdout_closed(self):
        """`ezproxy watch | head -1`: ends quietly when the reader goes away."""
        # more than a pipe holds (64 KiB), so writing fails once the reader is gone
        f = self.fake(ws_script([self.packet(b'one' * 400), self.packet(b'two' * 400)] * 100,
                                end='wait'))
        r, wfd = os.pipe()
        p = subprocess.Popen([ezproxy_bin(), 'watch', '--max-bytes', '0', '--api', f.url],
                             stdout=wfd,
                             stderr=subprocess.PIPE, env=self.env)
        os.close(wfd)
        with os.fdopen(r, 'rb') as rd:
            first = rd.readline()
        self.assertIn(b' 1200 bytes  "oneone', first)
        try:
            _, err = p.communicate(timeout=10)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        self.assertEqual(p.returncode, 0, err)


class T06FaultDaemon(Base):
    """`ezproxy fault set|clear|show` against a real daemon (the fault plugin's routes)."""

    def test_fault_set_show_clear(self):
        e = self.echo()
        cfg = pipelines(tcp_pipe('web', e.port).replace(
            '    To:', '    Through: [{fault: {}}]\n    To:'), tcp_pipe('plain', e.port))
        d = self.api_daemon(cfg)
        api = ['--api', 'http://127.0.0.1:%d' % d.api_port, '--key', d.admin_key]
        rc, out, err = run_cli(['fault', 'set', 'web', '--direction', 'to_server',
                                '--latency', '150', '--jitter', '10', '--seed', '7'] + api,
                               self.env)
        self.assertEqual(rc, 0, err)
        self.assertIn('to_server latency 150 ms, jitter 10 ms', out)
        self.assertIn('to_client none', out)
        # one direction: the other keeps its values
        rc, out, err = run_cli(['fault', 'set', 'web', '--direction', 'to_client', '--loss',
                                '0.25', '--freeze-max', '3000'] + api, self.env)
        self.assertEqual(rc, 0, err)
        st, js, raw, _ = d.get('/api/3/pipelines/web/faults')
        self.assertEqual((js['to_server']['latency_ms'], js['to_server']['jitter_ms']), (150, 10))
        self.assertEqual((js['to_client']['loss'], js['seed'], js['freeze_max_ms']),
                         (0.25, 7, 3000))
        # it really delays: a round trip through the pipeline takes >= 150 ms
        with socket.create_connection((HOST, d.port('web')), timeout=5) as s:
            t0 = time.monotonic()
            s.sendall(b'x')
            s.settimeout(5)
            self.assertEqual(s.recv(1), b'x')
            self.assertGreaterEqual(time.monotonic() - t0, 0.149)
            sid = [x['id'] for x in d.get('/api/3/sessions?pipeline=web')[1]['sessions']][0]
            rc, out, err = run_cli(['fault', 'set', 'web', '--session', str(sid),
                                    '--blackhole'] + api, self.env)
            self.assertEqual(rc, 0, err)
            self.assertIn('session %d of pipeline web: its own faults' % sid, out)
            rc, out, err = run_cli(['fault', 'show', 'web', '--session', str(sid), '--json']
                                   + api, self.env)
            self.assertEqual(rc, 0, err)
            self.assertEqual(json.loads(out)['own'], True)
            rc, out, err = run_cli(['fault', 'show', 'plain', '--session', str(sid)] + api,
                                   self.env)
            self.assertEqual(rc, 1)
            self.assertIn("belongs to pipeline 'web', not 'plain'", err)
            rc, out, err = run_cli(['fault', 'clear', 'web', '--session', str(sid)] + api,
                                   self.env)
            self.assertEqual(rc, 0, err)
            self.assertIn("its pipeline's faults", out)
        rc, out, err = run_cli(['fault', 'clear', 'web'] + api, self.env)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out.count(' none'), 2)
        rc, out, err = run_cli(['fault', 'show', 'web', '--json'] + api, self.env)
        self.assertEqual(json.loads(out)['to_server']['latency_ms'], 0)

    def test_fault_errors_and_exit_codes(self):
        d = self.api_daemon(pipelines(tcp_pipe('plain', 9)))
        api = ['--api', 'http://127.0.0.1:%d' % d.api_port, '--key', d.admin_key]
        for args, code, says in (
                (['fault'], 2, 'fault set|clear|show'),
                (['fault', 'set'], 2, 'needs a PIPELINE'),
                (['fault', 'set', 'plain', '--loss', '2'], 2, '--loss must be a number in 0..1'),
                (['fault', 'set', 'plain', '--latency', 'x'], 2, '--latency must be'),
                (['fault', 'set', 'plain', '--direction', 'up'], 2, '--direction must be'),
                (['fault', 'clear', 'plain', '--latency', '5'], 2, 'takes no fault values'),
                (['fault', 'show', 'plain', '--session', 'abc'], 2, '--session takes'),
                (['fault', 'show', 'plain'], 1, 'no fault stage'),
                (['fault', 'show', 'nope'], 1, "no pipeline named 'nope'"),
                (['fault', 'show', 'plain', '--session', '424242'], 1, 'no session 424242')):
            with self.subTest(args=args):
                rc, out, err = run_cli(args + (api if len(args) > 2 else []), self.env)
                self.assertEqual(rc, code, err)
                self.assertIn(says, err)
        ro = d.make_key(['CheckStatus'], name='ro')
        rc, out, err = run_cli(['fault', 'clear', 'plain', '--api',
                                'http://127.0.0.1:%d' % d.api_port, '--key', ro], self.env)
        self.assertEqual(rc, 1)
        self.assertIn('403', err)
        rc, out, err = run_cli(['fault', 'show', 'plain', '--api', 'http://127.0.0.1:1'],
                               self.env)
        self.assertEqual(rc, 1)
        self.assertIn('cannot reach', err)


if __name__ == '__main__':
    unittest.main(verbosity=2)
