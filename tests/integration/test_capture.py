#!/usr/bin/env python3
"""Integration tests of the capture plugin, read back with Debian's tshark.

A real daemon, real sockets on loopback (127.0.0.1 and ::1). Capture files
(the `capture` filter) and the live stream (GET /api/3/capture) are read by
tshark: frame counts, synthesised addresses and ports, the TCP stream as
tshark's "follow" reassembles it (equal to the bytes that were delivered both
ways), UDP payloads, IP/TCP/UDP checksums, and the per-packet comments
(frame.comment in tshark 4.0): session, direction, dropped, replaced with the
original bytes, injected. Rotation, the Capture permission, errors, and the
stream ending with its session or its client.

tshark is installed by .ci/install-deps (.ci/apt-packages.txt). Without it the
tests are skipped outside CI and fail in CI (CI=true).
"""
import base64
import http.client
import os
import re
import shutil
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
from harness import (Deadline, LogOnFailure, TcpEchoServer, ezproxy_bin,  # noqa: E402
                     pattern, recv_exact)

TSHARK = shutil.which('tshark')
if not TSHARK and os.environ.get('CI') != 'true':
    raise unittest.SkipTest('tshark is not installed (bash .ci/install-deps installs it)')

SHB, IDB, ISB, EPB = 0x0A0D0D0A, 1, 5, 6


# ---- reading captures ---------------------------------------------------------------

def tshark(path, *args, timeout=60):
    """Run tshark -r path args; returns stdout (text). Fails on a non-zero exit."""
    p = subprocess.run([TSHARK or 'tshark', '-r', path] + list(args), capture_output=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise AssertionError('tshark -r %s %s: exit %d\n%s' % (path, ' '.join(args),
                                                                 p.returncode,
                                                                 p.stderr.decode()))
    return p.stdout.decode('utf-8', 'replace')


FIELDS = ['frame.number', 'ip.src', 'ip.dst', 'ipv6.src', 'ipv6.dst', 'tcp.srcport',
          'tcp.dstport', 'udp.srcport', 'udp.dstport', 'tcp.flags.str', 'tcp.len',
          'tcp.payload', 'udp.payload', 'ip.checksum.status', 'tcp.checksum.status',
          'udp.checksum.status', 'frame.comment']


def frames(path):
    """Every frame as a dict of FIELDS (short names), checksums checked by tshark."""
    args = ['-o', 'ip.check_checksum:TRUE', '-o', 'tcp.check_checksum:TRUE',
            '-o', 'udp.check_checksum:TRUE', '-T', 'fields', '-E', 'separator=\t']
    for f in FIELDS:
        args += ['-e', f]
    out = []
    for line in tshark(path, *args).splitlines():
        parts = line.split('\t')
        parts += [''] * (len(FIELDS) - len(parts))
        row = dict(zip(FIELDS, parts))
        row['src'] = row['ip.src'] or row['ipv6.src']
        row['dst'] = row['ip.dst'] or row['ipv6.dst']
        row['sport'] = int(row['tcp.srcport'] or row['udp.srcport'] or 0)
        row['dport'] = int(row['tcp.dstport'] or row['udp.dstport'] or 0)
        hexdata = row['tcp.payload'] or row['udp.payload']
        row['payload'] = bytes.fromhex(hexdata.replace(':', ''))
        row['comment'] = row['frame.comment']
        out.append(row)
    return out


def follow(path, stream=0):
    """tshark's reassembled TCP stream: (bytes client->server, bytes server->client)."""
    text = tshark(path, '-q', '-z', 'follow,tcp,raw,%d' % stream)
    a, b = bytearray(), bytearray()
    body = False
    for line in text.splitlines():
        if line.startswith('Node 1:'):
            body = True
            continue
        if not body or not line.strip() or line.startswith('='):
            continue
        if line.startswith('\t'):
            b += bytes.fromhex(line.strip())
        else:
            a += bytes.fromhex(line.strip())
    return bytes(a), bytes(b)


def blocks(data):
    """Whole pcapng blocks in data: [(type, body)], and the bytes used."""
    out, off = [], 0
    while off + 12 <= len(data):
        btype, blen = struct.unpack_from('<II', data, off)
        if blen < 12 or off + blen > len(data):
            break
        out.append((btype, bytes(data[off + 8:off + blen - 4])))
        off += blen
    return out, off


def isb_options(body):
    """An ISB body's options: {code: [raw values]}."""
    opts, off = {}, 12
    while off + 4 <= len(body):
        code, n = struct.unpack_from('<HH', body, off)
        if code == 0:
            break
        opts.setdefault(code, []).append(body[off + 4:off + 4 + n])
        off += 4 + ((n + 3) & ~3)
    return opts


def wait_file(path, pred, timeout=15.0):
    """Poll the capture file (tshark) until pred(frames) is true; return the frames."""
    d = Deadline(timeout)
    last = []
    while True:
        if os.path.exists(path) and os.path.getsize(path) > 0:
            try:
                last = frames(path)
            except AssertionError:
                last = []
            if pred(last):
                return last
        if d.expired():
            raise AssertionError('capture %s: condition not met within %.0fs; frames: %r'
                                 % (path, timeout, [(f['frame.number'], f['comment'])
                                                    for f in last][-20:]))
        d.sleep(0.1)


def data_frames(fr, direction=None):
    """Frames of packets (not synthesised handshakes/FINs), optionally of one direction."""
    rx = re.compile(r'^session \d+ (to_server|to_client)')
    out = []
    for f in fr:
        m = rx.match(f['comment'])
        if m and (direction is None or m.group(1) == direction):
            out.append(f)
    return out


# ---- servers ------------------------------------------------------------------------

class Echo6:
    """A TCP or UDP echo server on ::1 (the harness's servers are IPv4)."""

    def __init__(self, kind):
        self.kind = kind
        self.sock = socket.socket(socket.AF_INET6, kind)
        self.sock.bind(('::1', 0))
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        if kind == socket.SOCK_STREAM:
            self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stopping:
            try:
                if self.kind == socket.SOCK_DGRAM:
                    data, peer = self.sock.recvfrom(65536)
                    self.sock.sendto(data, peer)
                    continue
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(10)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass
        conn.close()

    def stop(self):
        self.stopping = True
        self.thread.join(5)
        self.sock.close()


class LiveStream:
    """GET /api/3/capture read on a thread; the bytes so far, parsed as pcapng blocks."""

    def __init__(self, d, query, key='admin'):
        self.conn = d.conn(timeout=30)
        h = {'Authorization': 'Bearer ' + (d.admin_key if key == 'admin' else key)}
        self.conn.request('GET', '/api/3/capture' + query, headers=h)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = dict(self.resp.getheaders())
        self.data = bytearray()
        self.eof = False
        self.cond = threading.Condition()
        if self.status == 200:
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        else:
            self.data += self.resp.read()
            self.eof = True

    def _read(self):
        try:
            while True:
                chunk = self.resp.read1(65536)
                if not chunk:
                    break
                with self.cond:
                    self.data += chunk
                    self.cond.notify_all()
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            pass  # closed under the reader by close(): the end of the stream
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait(self, pred, timeout=15.0):
        """Wait until pred(blocks) is true (or EOF); returns the blocks."""
        d = Deadline(timeout)
        with self.cond:
            self.cond.wait_for(lambda: pred(blocks(self.data)[0]) or self.eof, d.left())
            got = blocks(self.data)[0]
        if not pred(got):
            raise AssertionError('live stream: condition not met within %.0fs (eof=%s, %d '
                                 'blocks)' % (timeout, self.eof, len(got)))
        return got

    def wait_eof(self, timeout=15.0):
        d = Deadline(timeout)
        with self.cond:
            self.cond.wait_for(lambda: self.eof, d.left())
            return self.eof

    def save(self, path):
        with self.cond:
            data, used = bytes(self.data), blocks(self.data)[1]
        with open(path, 'wb') as f:
            f.write(data[:used])

    def close(self):
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):
            pass
        self.conn.close()


def comments_of(blks):
    """The opt_comment of every EPB in blks."""
    out = []
    for t, body in blks:
        if t != EPB:
            continue
        caplen = struct.unpack_from('<I', body, 12)[0]
        off = 20 + ((caplen + 3) & ~3)
        c = ''
        while off + 4 <= len(body):
            code, n = struct.unpack_from('<HH', body, off)
            if code == 0:
                break
            if code == 1:
                c = body[off + 4:off + 4 + n].decode()
            off += 4 + ((n + 3) & ~3)
        out.append(c)
    return out


def yq(s):
    return '"%s"' % s


# ---- the tests ----------------------------------------------------------------------

class CaptureCase(LogOnFailure, unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='ezp-cap-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def api_daemon(self, config, level='info', workers=2, **kw):
        d = ApiDaemon('Workers: %d\nLogging: {Level: %s}\n' % (workers, level) + config, **kw)
        self._daemons = getattr(self, '_daemons', [])
        self._daemons.append(d)
        self.addCleanup(d.stop_and_check)
        d.start()
        return d

    def echo(self):
        e = TcpEchoServer()
        self.addCleanup(e.stop)
        return e

    def echo6(self, kind):
        e = Echo6(kind)
        self.addCleanup(e.stop)
        return e

    def assertChecksumsGood(self, fr):
        for f in fr:
            for k in ('ip.checksum.status', 'tcp.checksum.status', 'udp.checksum.status'):
                if f[k]:
                    self.assertEqual(f[k], '1', 'frame %s: %s is %s (2 = bad)'
                                     % (f['frame.number'], k, f[k]))

    def roundtrips(self, sock, msgs):
        for m in msgs:
            sock.sendall(m)
            self.assertEqual(recv_exact(sock, len(m), Deadline(10)), m)


class FileTests(CaptureCase):
    def test_tcp_ipv4_file(self):
        echo = self.echo()
        cap = self.path('t.pcapng')
        d = self.daemon('Workers: 2\nPipelines:\n  - Name: t\n'
                        '    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
                        '    Through: [{capture: {File: %s}}]\n'
                        '    To: {tcp: {Connect: "127.0.0.1:%d"}}\n' % (yq(cap), echo.port))
        msgs = [b'hello ', b'world\n', pattern(7, 200000), b'bye']
        s = socket.create_connection(('127.0.0.1', d.port('t')))
        cport = s.getsockname()[1]
        self.roundtrips(s, msgs)
        # readable while the daemon runs (flushed within a second)
        fr = wait_file(cap, lambda fr: sum(len(f['payload']) for f in
                                           data_frames(fr, 'to_client')) == 200015)
        s.close()
        fr = wait_file(cap, lambda fr: sum('closed' in f['comment'] for f in fr) == 3)
        self.assertChecksumsGood(fr)
        # the synthesised handshake first, with the session's real addresses
        self.assertEqual([f['tcp.flags.str'].strip('·') for f in fr[:3]], ['S', 'A··S', 'A'])
        for f in fr:
            self.assertIn((f['src'], f['sport'], f['dst'], f['dport']),
                          (('127.0.0.1', cport, '127.0.0.1', echo.port),
                           ('127.0.0.1', echo.port, '127.0.0.1', cport)))
        self.assertTrue(all(f['tcp.srcport'] for f in fr))
        up, down = data_frames(fr, 'to_server'), data_frames(fr, 'to_client')
        self.assertTrue(all(f['sport'] == cport for f in up))
        self.assertTrue(all(f['sport'] == echo.port for f in down))
        # a read larger than one frame holds is split, and says so
        self.assertTrue(any('part 1/' in f['comment'] for f in fr), [f['comment'] for f in fr])
        # the reassembled stream is exactly what was sent, both ways
        a, b = follow(cap)
        self.assertEqual(a, b''.join(msgs))
        self.assertEqual(b, b''.join(msgs))
        self.assertRegex(fr[0]['comment'], r'^session \d+ opened: synthesised handshake$')
        self.assertTrue(all(re.match(r'^session \d+ to_server', f['comment']) for f in up))

    def test_udp_ipv6_file(self):
        echo = self.echo6(socket.SOCK_DGRAM)
        cap = self.path('u.pcapng')
        d = self.daemon('Workers: 2\nPipelines:\n  - Name: u\n'
                        '    From: {udp: {Listen: "[::1]:0"}}\n'
                        '    Through: [{capture: {File: %s}}]\n'
                        '    To: {udp: {Connect: "[::1]:%d"}}\n' % (yq(cap), echo.port))
        c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.addCleanup(c.close)
        c.settimeout(5)
        msgs = [b'ping', b'', pattern(3, 60000), b'pong']
        for m in msgs:
            c.sendto(m, ('::1', d.port('u')))
            self.assertEqual(c.recvfrom(65536)[0], m)
        cport = c.getsockname()[1]
        fr = wait_file(cap, lambda fr: len(data_frames(fr)) == 2 * len(msgs))
        self.assertChecksumsGood(fr)
        up, down = data_frames(fr, 'to_server'), data_frames(fr, 'to_client')
        self.assertEqual([f['payload'] for f in up], msgs)
        self.assertEqual([f['payload'] for f in down], msgs)
        for f in up:
            self.assertEqual((f['ipv6.src'], f['sport'], f['ipv6.dst'], f['dport']),
                             ('::1', cport, '::1', echo.port))
            self.assertTrue(f['udp.srcport'])
        for f in down:
            self.assertEqual((f['ipv6.src'], f['sport'], f['ipv6.dst'], f['dport']),
                             ('::1', echo.port, '::1', cport))

    def test_tcp_ipv6_and_mixed_families(self):
        echo6 = self.echo6(socket.SOCK_STREAM)
        echo4 = self.echo()
        c6, cm = self.path('six.pcapng'), self.path('mixed.pcapng')
        d = self.daemon(
            'Workers: 2\nPipelines:\n'
            '  - Name: six\n    From: {tcp: {Listen: "[::1]:0"}}\n'
            '    Through: [{capture: {File: %s}}]\n'
            '    To: {tcp: {Connect: "[::1]:%d"}}\n'
            '  - Name: mixed\n    From: {tcp: {Listen: "[::1]:0"}}\n'
            '    Through: [{capture: {File: %s}}]\n'
            '    To: {tcp: {Connect: "127.0.0.1:%d"}}\n'
            % (yq(c6), echo6.port, yq(cm), echo4.port))
        for name, cap in (('six', c6), ('mixed', cm)):
            s = socket.create_connection(('::1', d.port(name)))
            msgs = [b'abc', pattern(11, 70000), b'xyz']
            self.roundtrips(s, msgs)
            s.close()
            fr = wait_file(cap, lambda fr: sum('closed' in f['comment'] for f in fr) == 3)
            self.assertChecksumsGood(fr)
            self.assertTrue(all(f['ipv6.src'] for f in fr))
            if name == 'mixed':  # an IPv4 server beside an IPv6 client: IPv4-mapped
                self.assertIn('::ffff:127.0.0.1', {f['ipv6.dst'] for f in fr})
            a, b = follow(cap)
            self.assertEqual(a, b''.join(msgs))
            self.assertEqual(b, b''.join(msgs))

    def test_rotation(self):
        echo = self.echo()
        cap, cap2 = self.path('r/rot.pcapng'), self.path('r2/rot')
        d = self.daemon(
            'Workers: 2\nPipelines:\n'
            '  - Name: r\n    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
            '    Through: [{capture: {File: %s, RotateBytes: 4096, RotateFiles: 50}}]\n'
            '    To: {tcp: {Connect: "127.0.0.1:%d"}}\n'
            '  - Name: r2\n    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
            '    Through: [{capture: {File: %s, RotateBytes: 4096, RotateFiles: 2}}]\n'
            '    To: {tcp: {Connect: "127.0.0.1:%d"}}\n'
            '  - Name: r3\n    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
            '    Through: [{capture: {File: %s, RotateBytes: 4096, RotateFiles: 0}}]\n'
            '    To: {tcp: {Connect: "127.0.0.1:%d"}}\n' % (yq(cap), echo.port, yq(cap2),
                                                          echo.port, yq(self.path('r3/c.pcap')),
                                                          echo.port))
        msgs = [pattern(i, 300) for i in range(60)]
        for name in ('r', 'r2', 'r3'):
            s = socket.create_connection(('127.0.0.1', d.port(name)))
            self.roundtrips(s, msgs)
            s.close()
        d.wait_closes(3)
        d.stop_and_check()  # the writers finish their files
        files = [cap] + [self.path('r/rot.%d.pcapng' % i) for i in range(1, 51)]
        files = [f for f in files if os.path.exists(f)]
        self.assertGreaterEqual(len(files), 6, os.listdir(self.path('r')))
        total_up, total_down, closes = b'', b'', 0
        for f in reversed(files):  # oldest first
            self.assertLess(os.path.getsize(f), 4096 + 2000, f)
            fr = frames(f)
            self.assertChecksumsGood(fr)
            # each file is whole: its own handshake, its own reassembly
            self.assertIn('S', fr[0]['tcp.flags.str'].strip('·'), f)
            a, b = follow(f)
            total_up += a
            total_down += b
            closes += sum('closed' in x['comment'] for x in fr)
        self.assertEqual(total_up, b''.join(msgs))
        self.assertEqual(total_down, b''.join(msgs))
        self.assertEqual(closes, 3)
        # RotateFiles 2: the current file and two rotated ones, no more
        self.assertEqual(sorted(os.listdir(self.path('r2'))), ['rot', 'rot.1', 'rot.2'])
        for f in ('rot', 'rot.1', 'rot.2'):
            frames(self.path('r2/' + f))
        # RotateFiles 0: only the current file, which starts over
        self.assertEqual(os.listdir(self.path('r3')), ['c.pcap'])
        self.assertLess(len(data_frames(frames(self.path('r3/c.pcap')))), 120)

    def test_config_errors(self):
        cases = [
            ('RotateBytes: 100', 'RotateBytes must be 0 (no rotation) or at least 4096'),
            ('RotateFiles: -1', 'RotateFiles'),
        ]
        for extra, msg in cases:
            with self.subTest(extra=extra):
                text = ('Pipelines:\n  - Name: x\n    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
                        '    Through: [{capture: {File: %s, %s}}]\n'
                        '    To: {tcp: {Connect: "127.0.0.1:9"}}\n'
                        % (yq(self.path('x.pcapng')), extra))
                self.assertRunFails(text, msg)
        self.assertRunFails('Pipelines:\n  - Name: x\n    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
                            '    Through: [{capture: {RotateBytes: 0}}]\n'
                            '    To: {tcp: {Connect: "127.0.0.1:9"}}\n', 'File')
        self.assertRunFails('Pipelines:\n  - Name: x\n    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
                            '    Through: [{capture: {File: ""}}]\n'
                            '    To: {tcp: {Connect: "127.0.0.1:9"}}\n', 'File must name a file')
        blocker = self.path('afile')
        open(blocker, 'w').close()
        self.assertRunFails('Pipelines:\n  - Name: x\n    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
                            '    Through: [{capture: {File: %s}}]\n'
                            '    To: {tcp: {Connect: "127.0.0.1:9"}}\n'
                            % yq(blocker + '/sub/x.pcapng'), 'cannot open File')
        same = yq(self.path('same.pcapng'))
        self.assertRunFails('Pipelines:\n'
                            '  - Name: a\n    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
                            '    Through: [{capture: {File: %s}}]\n'
                            '    To: {tcp: {Connect: "127.0.0.1:9"}}\n'
                            '  - Name: b\n    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
                            '    Through: [{capture: {File: %s}}]\n'
                            '    To: {tcp: {Connect: "127.0.0.1:9"}}\n' % (same, same),
                            'is already written by pipeline')

    def assertRunFails(self, text, msg):
        cfg = self.path('bad.yaml')
        with open(cfg, 'w') as f:
            f.write(text)
        p = subprocess.run([ezproxy_bin(), 'run', '-c', cfg], capture_output=True, timeout=30,
                           cwd=self.tmp)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn(msg, p.stderr.decode())

    def test_reload_keeps_the_file_and_removal_closes_it(self):
        echo = self.echo()
        cap = self.path('k.pcapng')
        base = ('Workers: 2\nPipelines:\n  - Name: k\n    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
                '%s    To: {tcp: {Connect: "127.0.0.1:%d"}}\n')
        with_cap = '    Through: [{capture: {File: %s, RotateBytes: %%d}}]\n' % yq(cap)
        d = self.daemon(base % ('', echo.port))
        s = socket.create_connection(('127.0.0.1', d.port('k')))
        self.roundtrips(s, [b'zero'])  # on the zero-copy path: no filter, no tap
        # the stage added live: the running session is captured from its next packet
        ok, line = d.reload(base % (with_cap % 0, echo.port))
        self.assertTrue(ok, line)
        self.roundtrips(s, [b'one'])
        # a changed parameter: the same writer goes on with the same file
        ok, line = d.reload(base % (with_cap % 1000000, echo.port))
        self.assertTrue(ok, line)
        self.roundtrips(s, [b'two'])
        fr = wait_file(cap, lambda fr: len(data_frames(fr)) == 4)
        self.assertEqual([f['payload'] for f in data_frames(fr, 'to_server')], [b'one', b'two'])
        self.assertRegex(fr[0]['comment'], r'seen mid-session: synthesised handshake$')
        # the stage removed: the file is finished (a statistics block at its end)
        ok, line = d.reload(base % ('', echo.port))
        self.assertTrue(ok, line)
        self.roundtrips(s, [b'three'])
        s.close()
        d.wait_closes(1)

        def finished():
            with open(cap, 'rb') as f:
                blks = blocks(f.read())[0]
            return blks and blks[-1][0] == ISB
        dl = Deadline(10)
        while not finished() and not dl.expired():
            dl.sleep(0.05)
        self.assertTrue(finished())
        fr = frames(cap)
        self.assertEqual([f['payload'] for f in data_frames(fr, 'to_server')], [b'one', b'two'])


LUA = '''
function EzpFilter(ezp, pkt)
  if pkt.injected then return true end
  if pkt.data:find("DROP") then return false end
  if pkt.data:find("REPL") then return (pkt.data:gsub("REPL", "new!")) end
  return true
end
'''


class VerdictTests(CaptureCase):
    def test_dropped_replaced_injected(self):
        echo = self.echo()
        cap = self.path('v.pcapng')
        script = self.path('f.lua')
        with open(script, 'w') as f:
            f.write(LUA)
        d = self.api_daemon('Pipelines:\n  - Name: v\n    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
                            '    Through: [{lua: {Script: %s}}, {capture: {File: %s}}]\n'
                            '    To: {tcp: {Connect: "127.0.0.1:%d"}}\n'
                            % (yq(script), yq(cap), echo.port))
        ls = LiveStream(d, '?pipeline=v')
        self.addCleanup(ls.close)
        ls.wait(lambda b: len(b) >= 2)
        s = socket.create_connection(('127.0.0.1', d.port('v')))
        self.addCleanup(s.close)
        sid = d.wait_sessions(1, 'v')[0]['id']

        def wait_dropped(n):
            dl = Deadline(10)
            while d.get('/api/3/sessions/%d' % sid)[1]['dropped'] < n:
                self.assertFalse(dl.expired(), 'the filter did not drop')
                dl.sleep(0.02)
        s.sendall(b'DROPfirst')  # the first packet dropped: before any delivered byte
        wait_dropped(1)
        self.roundtrips(s, [b'hello '])
        s.sendall(b'REPLx')
        self.assertEqual(recv_exact(s, 5, Deadline(10)), b'new!x')
        st, _, raw, _ = d.post('/api/3/sessions/%d/inject' % sid,
                               {'direction': 'to_client',
                                'data': base64.b64encode(b'INJ').decode()})
        self.assertEqual(st, 200, raw)
        self.assertEqual(recv_exact(s, 3, Deadline(10)), b'INJ')
        s.sendall(b'xxDROPxx')
        wait_dropped(2)
        self.roundtrips(s, [b'end'])
        s.close()
        fr = wait_file(cap, lambda fr: sum('closed' in f['comment'] for f in fr) == 3)
        self.assertChecksumsGood(fr)
        by = {f['payload']: f for f in data_frames(fr)}
        for p in (b'DROPfirst', b'xxDROPxx'):
            self.assertRegex(by[p]['comment'], r'^session %d to_server; dropped$' % sid)
        self.assertEqual(data_frames(fr, 'to_server')[2]['payload'], b'new!x')
        self.assertRegex(data_frames(fr, 'to_server')[2]['comment'],
                         r'^session %d to_server; replaced; original \(5 bytes\): %s$'
                         % (sid, b'REPLx'.hex()))
        self.assertRegex(by[b'INJ']['comment'], r'^session %d to_client; injected$' % sid)
        # what was delivered, and only that, reassembles
        a, b = follow(cap)
        self.assertEqual(a, b'hello new!xend')
        self.assertEqual(b, b'hello new!xINJend')
        # the live stream says the same
        live = comments_of(ls.wait(lambda b: sum('closed' in c for c in comments_of(b)) == 3))
        self.assertEqual(live, [f['comment'] for f in fr])


class LiveTests(CaptureCase):
    def test_live_stream_pipeline_and_session(self):
        echo = self.echo()
        d = self.api_daemon('Pipelines:\n  - Name: live\n'
                            '    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
                            '    To: {tcp: {Connect: "127.0.0.1:%d"}}\n'
                            '  - Name: other\n    From: {udp: {Listen: "127.0.0.1:0"}}\n'
                            '    To: {udp: {Connect: "127.0.0.1:9"}}\n' % echo.port,
                            level='debug')
        ls = LiveStream(d, '?pipeline=live')
        self.addCleanup(ls.close)
        self.assertEqual(ls.status, 200)
        self.assertEqual(ls.headers.get('Content-Type'), 'application/x-pcapng')
        self.assertEqual(ls.headers.get('Transfer-Encoding'), 'chunked')
        blks = ls.wait(lambda b: len(b) >= 2)
        self.assertEqual([t for t, _ in blks[:2]], [SHB, IDB])
        s = socket.create_connection(('127.0.0.1', d.port('live')))
        msgs = [b'live1', pattern(5, 100000), b'live2']
        self.roundtrips(s, msgs)
        sid = d.wait_sessions(1, 'live')[0]['id']
        st, js, raw, _ = d.get('/api/3/capture?pipeline=other&session=%d' % sid)
        self.assertEqual(st, 404, raw)
        self.assertEqual(js['error']['code'], 'session_not_found')
        # every pipeline, opened mid-session: the session's flow starts with a handshake
        mid = LiveStream(d, '')
        self.addCleanup(mid.close)
        mid.wait(lambda b: len(b) >= 2)
        # a stream of this one session, through curl into tshark as a user would
        key = d.admin_key
        url = 'http://127.0.0.1:%d/api/3/capture?session=%d' % (d.api_port, sid)
        pipe = subprocess.Popen('curl -sN -H "Authorization: Bearer %s" "%s" | %s -r - -T '
                                'fields -e tcp.len -e frame.comment' % (key, url, TSHARK),
                                shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: pipe.poll() is None and pipe.kill())
        dl = Deadline(10)
        while not d.text().count('live capture of session %d started' % sid):
            self.assertFalse(dl.expired())
            dl.sleep(0.02)
        self.roundtrips(s, [b'after'])
        s.close()
        # the session's stream ends by itself when the session closes
        out, err = pipe.communicate(timeout=30)
        self.assertEqual(pipe.returncode, 0, err)
        lines = out.decode().splitlines()
        self.assertIn('5\tsession %d to_server' % sid, lines)
        self.assertIn('5\tsession %d to_client' % sid, lines)
        self.assertEqual(sum('closed' in ln for ln in lines), 3, lines)
        mid.wait(lambda b: sum('closed' in c for c in comments_of(b)) == 3)
        self.assertRegex(comments_of(mid.wait(lambda b: True))[0],
                         r'^session %d seen mid-session: synthesised handshake$' % sid)
        path = self.path('mid.pcapng')
        mid.save(path)
        self.assertEqual(follow(path), (b'after', b'after'))
        # the pipeline's stream: everything, read back by tshark
        ls.wait(lambda b: sum('closed' in c for c in comments_of(b)) == 3)
        path = self.path('live.pcapng')
        ls.save(path)
        fr = frames(path)
        self.assertChecksumsGood(fr)
        a, b = follow(path)
        self.assertEqual(a, b''.join(msgs) + b'after')
        self.assertEqual(b, b''.join(msgs) + b'after')
        # the client goes away: the stream ends on the daemon's side too
        mark = d.mark()
        ls.close()
        d.wait_line(r'live capture of pipeline .live. ended', since=mark, timeout=15)

    def test_live_stream_every_pipeline_udp_and_keepalive(self):
        d = self.api_daemon('Pipelines:\n  - Name: u\n    From: {udp: {Listen: "127.0.0.1:0"}}\n'
                            '    To: {udp: {Connect: "127.0.0.1:%d"}}\n' % self.udp_echo())
        ls = LiveStream(d, '')
        self.addCleanup(ls.close)
        self.assertEqual(ls.status, 200)
        # idle: statistics blocks keep coming (about one a second)
        ls.wait(lambda b: sum(t == ISB for t, _ in b) >= 2, timeout=10)
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(c.close)
        c.settimeout(5)
        for m in (b'u1', b'u2'):
            c.sendto(m, ('127.0.0.1', d.port('u')))
            self.assertEqual(c.recvfrom(100)[0], m)
        ls.wait(lambda b: len(comments_of(b)) >= 4)
        path = self.path('u.pcapng')
        ls.save(path)
        fr = data_frames(frames(path))
        self.assertEqual([f['payload'] for f in fr], [b'u1', b'u1', b'u2', b'u2'])
        self.assertTrue(all(f['udp.srcport'] for f in fr))

    def udp_echo(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(('127.0.0.1', 0))
        sock.settimeout(0.2)
        stop = threading.Event()

        def loop():
            while not stop.is_set():
                try:
                    data, peer = sock.recvfrom(65536)
                    sock.sendto(data, peer)
                except (socket.timeout, OSError):
                    continue
        t = threading.Thread(target=loop, daemon=True)
        t.start()
        self.addCleanup(lambda: (stop.set(), t.join(5), sock.close()))
        return sock.getsockname()[1]

    def test_permission_and_errors(self):
        d = self.api_daemon('Pipelines:\n  - Name: p\n    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
                            '    To: {tcp: {Connect: "127.0.0.1:9"}}\n')
        no_cap = d.make_key(['CheckStatus', 'UseWebsocket', 'Inject'])
        st, js, raw, _ = d.get('/api/3/capture?pipeline=p', key=no_cap)
        self.assertEqual(st, 403, raw)
        self.assertEqual(js['error']['code'], 'forbidden')
        self.assertIn('Capture', js['error']['message'])
        st, js, raw, _ = d.get('/api/3/capture?pipeline=p', key=None)
        self.assertEqual(st, 401, raw)
        with_cap = d.make_key(['Capture'])
        ls = LiveStream(d, '?pipeline=p', key=with_cap)
        self.addCleanup(ls.close)
        self.assertEqual(ls.status, 200)
        blks = ls.wait(lambda b: len(b) >= 2)
        self.assertEqual(blks[0][0], SHB)
        self.assertEqual(struct.unpack_from('<I', blks[0][1], 0)[0], 0x1A2B3C4D)
        for query, status, code in (('?pipeline=nope', 404, 'pipeline_not_found'),
                                    ('?session=999999', 404, 'session_not_found'),
                                    ('?session=abc', 400, 'bad_request'),
                                    ('?session=0', 400, 'bad_request')):
            with self.subTest(query=query):
                st, js, raw, _ = d.get('/api/3/capture' + query)
                self.assertEqual(st, status, raw)
                self.assertEqual(js['error']['code'], code)

    def test_lag_is_counted_and_said(self):
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(('127.0.0.1', 0))
        self.addCleanup(sink.close)
        cap = self.path('lag.pcapng')
        d = self.api_daemon('Limits: {TapBuffer: 16}\n'
                            'Pipelines:\n  - Name: u\n    From: {udp: {Listen: "127.0.0.1:0"}}\n'
                            '    Through: [{capture: {File: %s}}]\n'
                            '    To: {udp: {Connect: "127.0.0.1:%d"}}\n'
                            % (yq(cap), sink.getsockname()[1]), workers=1)
        ls = LiveStream(d, '?pipeline=u')
        self.addCleanup(ls.close)
        ls.wait(lambda b: len(b) >= 2)
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(c.close)
        mark = d.mark()
        # a burst far larger than the 16-event tap buffer: bounded (5000 datagrams)
        for i in range(5000):
            c.sendto(b'burst %d' % i, ('127.0.0.1', d.port('u')))
        d.wait_line(r'capture\W.*packet\(s\) not written to .*: the capture fell behind',
                    since=mark, timeout=15)
        d.stop_and_check()
        with open(cap, 'rb') as f:
            blks = blocks(f.read())[0]
        isbs = [isb_options(b) for t, b in blks if t == ISB]
        self.assertTrue(any(b'lost here' in o.get(1, [b''])[0] for o in isbs), isbs)
        final = isbs[-1]
        received = struct.unpack('<Q', final[4][0])[0]
        lost = struct.unpack('<Q', final[5][0])[0]
        self.assertGreater(lost, 0)
        self.assertEqual(received, len(data_frames(frames(cap))))
        self.assertLessEqual(received + lost, 5000 + 2)
        # the live stream stayed a valid capture whatever it lost
        path = self.path('lag-live.pcapng')
        ls.save(path)
        frames(path)

    def test_slow_reader_loses_whole_blocks(self):
        echo = self.echo()
        d = self.api_daemon('Pipelines:\n  - Name: s\n    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
                            '    To: {tcp: {Connect: "127.0.0.1:%d"}}\n' % echo.port,
                            level='debug')
        # a client that asks for the stream and never reads
        r = socket.create_connection(('127.0.0.1', d.api_port))
        self.addCleanup(r.close)
        r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        r.sendall(('GET /api/3/capture?pipeline=s HTTP/1.1\r\nHost: x\r\n'
                   'Authorization: Bearer %s\r\n\r\n' % d.admin_key).encode())
        d.wait_line(r'live capture of pipeline .s. started', timeout=10)
        s = socket.create_connection(('127.0.0.1', d.port('s')))
        self.addCleanup(s.close)
        total = 24 << 20
        done = threading.Event()

        def send():
            for chunk in (pattern(1, 1 << 20) for _ in range(24)):
                s.sendall(chunk)
            done.set()
        t = threading.Thread(target=send, daemon=True)
        t.start()
        got, dl = 0, Deadline(60)
        s.settimeout(5)
        while got < total and not dl.expired():
            got += len(s.recv(1 << 20))
        t.join(10)
        self.assertEqual(got, total)  # traffic never waited for the capture's reader
        # the reader leaves: the stream ends and says what it dropped
        mark = d.mark()
        r.close()
        d.wait_line(r'pcapng block\(s\) \(\d+ bytes\) dropped because the client read too '
                    r'slowly', since=mark, timeout=20)

    def test_pipeline_made_and_deleted_through_the_api(self):
        echo = self.echo()
        cap = self.path('api/p.pcapng')
        d = self.api_daemon('Pipelines: []\n')
        body = {'name': 'p', 'from': {'tcp': {'listen': '127.0.0.1:0'}},
                'through': [{'capture': {'file': cap, 'rotate_bytes': 0}}],
                'to': {'tcp': {'connect': '127.0.0.1:%d' % echo.port}}}
        st, js, raw, _ = d.post('/api/3/pipelines', body)
        self.assertEqual(st, 201, raw)
        self.assertEqual(js['config']['through'][0]['capture']['file'], cap)
        port = int(d.get('/api/3/pipelines/p')[1]['listen_address'].rsplit(':', 1)[1])
        s = socket.create_connection(('127.0.0.1', port))
        self.roundtrips(s, [b'made by the API'])
        s.close()
        wait_file(cap, lambda fr: sum('closed' in f['comment'] for f in fr) == 3)
        st, _, raw, _ = d.request('DELETE', '/api/3/pipelines/p')
        self.assertEqual(st, 204, raw)
        dl = Deadline(10)
        while True:  # the writer finishes the file: a statistics block at its end
            with open(cap, 'rb') as f:
                blks = blocks(f.read())[0]
            if blks[-1][0] == ISB or dl.expired():
                break
            dl.sleep(0.05)
        self.assertEqual(blks[-1][0], ISB)
        self.assertEqual(follow(cap), (b'made by the API', b'made by the API'))

    def test_not_available_without_the_plugin(self):
        # a copy of the binary whose plugins folder has every plugin but capture
        bindir = self.path('bin')
        os.makedirs(os.path.join(bindir, 'plugins'))
        shutil.copy2(ezproxy_bin(), os.path.join(bindir, 'ezproxy'))
        src = os.path.join(os.path.dirname(ezproxy_bin()), 'plugins')
        for sub in sorted(os.listdir(src)):
            so = os.path.join(src, sub, sub + '.so')
            if sub != 'capture' and os.path.exists(so):
                os.symlink(so, os.path.join(bindir, 'plugins', sub + '.so'))
        old = os.environ.get('EZP_BIN')
        os.environ['EZP_BIN'] = os.path.join(bindir, 'ezproxy')
        try:
            d = self.api_daemon('Pipelines:\n  - Name: p\n'
                                '    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
                                '    To: {tcp: {Connect: "127.0.0.1:9"}}\n')
        finally:
            if old is None:
                del os.environ['EZP_BIN']
            else:
                os.environ['EZP_BIN'] = old
        st, js, raw, _ = d.get('/api/3/capture?pipeline=p')
        self.assertEqual(st, 501, raw)
        self.assertEqual(js['error']['code'], 'not_available')


if __name__ == '__main__':
    unittest.main(verbosity=2)
