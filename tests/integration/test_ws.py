"""Integration tests of the WebSocket API (DESIGN.md section 8; docs/websocket.md): the
v3 socket (watch and filter modes) and the old /api/2/socket, against a real daemon,
real upstream servers and the stdlib client in wsclient.py.

Run from the repository root:
    python3 tests/integration/test_ws.py
The binary is $EZP_BIN or build/ezproxy; set EZP_SHOW_LOG=1 to print every
daemon's stderr, not only for failed tests.
"""

import base64
import os
import random
import socket
import struct
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from apiclient import ApiDaemon  # noqa: E402
from harness import (HOST, Deadline, LogOnFailure, TcpEchoServer,  # noqa: E402
                     UdpEchoServer, recv_exact, rss_kib)
from wsclient import OP_TEXT, HandshakeError, WsTimeout, frame, open_ws  # noqa: E402

CHECK_STATUS, CLOSE, USE_WS, FILTER, INJECT, MAKE_KEYS = (1 << i for i in range(6))
REMOTE = '[ {remote: {HoldTimeoutMs: 60000}} ]'
MiB = 1 << 20


def b64(data):
    return base64.b64encode(data).decode()


def unb64(text):
    return base64.b64decode(text)


def pipe(name, kind, to_port, through=None):
    t = '    Through: %s\n' % through if through else ''
    return ('  - Name: %s\n    From: {%s: {Listen: "127.0.0.1:0"}}\n%s'
            '    To: {%s: {Connect: "127.0.0.1:%d"}}\n' % (name, kind, t, kind, to_port))


def config(*pipes, workers=2):
    return 'Workers: %d\nLogging: {Level: info}\nPipelines:\n%s' % (workers, ''.join(pipes))


class UdpSink:
    """Records every datagram it receives, in order."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.got = []
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        self.sock.settimeout(0.2)
        while not self.stopping:
            try:
                data, _ = self.sock.recvfrom(70000)
            except socket.timeout:
                continue
            except OSError:
                return
            with self.cond:
                self.got.append(data)
                self.cond.notify_all()

    def wait(self, n, timeout):
        with self.cond:
            self.cond.wait_for(lambda: len(self.got) >= n, timeout)
            return list(self.got)

    def stop(self):
        self.stopping = True
        self.thread.join(5)
        self.sock.close()


class Base(LogOnFailure, unittest.TestCase):
    def api(self, config_text, auth=True, api_extra=''):
        d = ApiDaemon(config_text, auth=auth, api_extra=api_extra)
        self._daemons = getattr(self, '_daemons', [])
        self._daemons.append(d)
        self.addCleanup(d.stop_and_check)
        d.start()
        return d

    def echo(self):
        e = TcpEchoServer()
        self.addCleanup(e.stop)
        return e

    def ws(self, d, path, key='admin', **kw):
        w = open_ws(d, path, key=key, **kw)
        self.addCleanup(w.abort)
        return w

    def refused(self, d, path, key='admin', **kw):
        with self.assertRaises(HandshakeError) as cm:
            w = open_ws(d, path, key=key, **kw)
            w.abort()
        return cm.exception

    def connect(self, d, name):
        s = socket.create_connection((HOST, d.port(name)), timeout=10)
        self.addCleanup(s.close)
        return s

    def expect_silence(self, sock, seconds=0.3):
        sock.settimeout(seconds)
        try:
            data = sock.recv(100)
        except socket.timeout:
            return
        self.fail('unexpected bytes %r' % data)

    def next_packet(self, w, timeout=5.0):
        return w.recv_until(lambda m: m['type'] == 'packet', timeout)


# 1 ---------------------------------------------------------------------------------------
class T1Handshake(Base):
    def test_hello_watch(self):
        e = self.echo()
        d = self.api(config(pipe('a', 'tcp', e.port), pipe('b', 'tcp', e.port)))
        w = self.ws(d, '/api/3/socket')
        h = w.recv_json()
        self.assertEqual(h['type'], 'hello')
        self.assertEqual(h['version'], 3)
        self.assertEqual(h['mode'], 'watch')
        self.assertEqual(h['pipelines'], ['a', 'b'])
        self.assertIn('UseWebsocket', h['permissions'])
        self.assertIn('Capture', h['permissions'])
        w2 = self.ws(d, '/api/3/socket?mode=watch&pipeline=b')
        self.assertEqual(w2.recv_json()['pipelines'], ['b'])
        self.assertEqual(w.close()[0], 1000)

    def test_refused_upgrades(self):
        e = self.echo()
        d = self.api(config(pipe('a', 'tcp', e.port)))
        r = self.refused(d, '/api/3/socket', headers={'Upgrade': None})
        self.assertEqual(r.status, 426)
        self.assertEqual(r.json()['error']['code'], 'upgrade_required')
        r = self.refused(d, '/api/3/socket', headers={'Connection': 'keep-alive'})
        self.assertEqual(r.status, 426)
        r = self.refused(d, '/api/3/socket', headers={'Sec-WebSocket-Version': '8'})
        self.assertEqual(r.status, 426)
        self.assertEqual(r.headers.get('sec-websocket-version'), '13')
        r = self.refused(d, '/api/3/socket', headers={'Sec-WebSocket-Key': 'short'})
        self.assertEqual(r.status, 400)
        r = self.refused(d, '/api/3/socket', key=None)
        self.assertEqual(r.status, 401)
        r = self.refused(d, '/api/3/socket?mode=spy')
        self.assertEqual((r.status, r.json()['error']['code']), (400, 'bad_request'))
        for q in ('default=maybe', 'timeout_ms=0', 'timeout_ms=abc', 'timeout_ms=99999999'):
            r = self.refused(d, '/api/3/socket?mode=filter&' + q)
            self.assertEqual(r.status, 400, q)
        r = self.refused(d, '/api/3/socket?pipeline=nope')
        self.assertEqual((r.status, r.json()['error']['code']), (404, 'pipeline_not_found'))
        # token lists and case in Connection / Upgrade are fine
        w = self.ws(d, '/api/3/socket', headers={'Connection': 'keep-alive, UPGRADE',
                                                 'Upgrade': 'WebSocket'})
        self.assertEqual(w.recv_json()['type'], 'hello')

    def test_origin(self):
        e = self.echo()
        d = self.api(config(pipe('a', 'tcp', e.port)),
                     api_extra='  Origin: "http://page.example:8000"\n')
        r = self.refused(d, '/api/3/socket', headers={'Origin': 'http://evil.example'})
        self.assertEqual((r.status, r.json()['error']['code']), (403, 'origin_not_allowed'))
        r = self.refused(d, '/api/3/socket', headers={'Origin': 'https://127.0.0.1:%d'
                                                      % d.api_port})
        self.assertEqual(r.status, 403)
        same = 'http://127.0.0.1:%d' % d.api_port
        for origin in (same, 'http://page.example:8000'):
            w = self.ws(d, '/api/3/socket', headers={'Origin': origin})
            self.assertEqual(w.recv_json()['type'], 'hello', origin)
        r = self.refused(d, '/api/2/socket?key=' + d.admin_key, key=None,
                         headers={'Origin': 'http://evil.example'})
        self.assertEqual(r.status, 403)
        self.assertEqual(r.json()['Status'], 403)

    def test_permissions(self):
        e = self.echo()
        d = self.api(config(pipe('a', 'tcp', e.port, REMOTE)))
        r = self.refused(d, '/api/3/socket', key=d.make_key(CHECK_STATUS))
        self.assertEqual((r.status, r.json()['error']['code']), (403, 'forbidden'))
        watcher = d.make_key(USE_WS)
        r = self.refused(d, '/api/3/socket?mode=filter&pipeline=a', key=watcher)
        self.assertEqual((r.status, r.json()['error']['code']), (403, 'forbidden'))
        w = self.ws(d, '/api/3/socket', key=watcher)
        self.assertEqual(w.recv_json()['permissions'], ['UseWebsocket'])
        w.send_json({'type': 'inject', 'session': 'all', 'direction': 'both', 'data': 'eA=='})
        err = w.recv_json()
        self.assertEqual((err['type'], err['code']), ('error', 'forbidden'))
        w.send_json({'type': 'close', 'session': 1, 'id': 'c1'})
        err = w.recv_json()
        self.assertEqual((err['code'], err['ref']), ('forbidden', 'c1'))
        w.send_json({'type': 'verdict', 'seq': 1, 'action': 'pass'})
        self.assertEqual(w.recv_json()['code'], 'not_filtering')
        f = self.ws(d, '/api/3/socket?mode=filter', key=d.make_key(USE_WS | FILTER))
        self.assertEqual(f.recv_json()['mode'], 'filter')

    def test_ping_fragments_and_early_frames(self):
        e = self.echo()
        d = self.api(config(pipe('a', 'tcp', e.port)))
        w = self.ws(d, '/api/3/socket')
        w.recv_json()
        w.ping(b'are you there')
        self.assertEqual(w.wait_pong(), b'are you there')
        w.send_json({'type': 'verdict', 'seq': 5, 'action': 'pass', 'id': 'x'}, fragments=4)
        err = w.recv_json()
        self.assertEqual((err['code'], err['ref']), ('not_filtering', 5))
        # a frame sent right behind the request, before the 101 came back
        early = frame(OP_TEXT, b'{"type": "nope"}')
        w2 = self.ws(d, '/api/3/socket', extra=early)
        msgs = [w2.recv_json(), w2.recv_json()]
        self.assertEqual([m['type'] for m in msgs], ['hello', 'error'])
        self.assertEqual(msgs[1]['code'], 'unknown_type')

    def test_bad_frames_keep_socket_open(self):
        e = self.echo()
        d = self.api(config(pipe('a', 'tcp', e.port)))
        w = self.ws(d, '/api/3/socket')
        w.recv_json()
        cases = [('{"type": ', 'bad_json'), ('[1, 2]', 'bad_message'),
                 ('{"seq": 1}', 'missing_field'), ('{"type": 7}', 'bad_field'),
                 ('{"type": "dance"}', 'unknown_type'),
                 ('{"type": "verdict"}', 'missing_field'),
                 ('{"type": "verdict", "seq": -1, "action": "pass"}', 'bad_field'),
                 ('{"type": "verdict", "seq": 1}', 'missing_field'),
                 ('{"type": "verdict", "seq": 1, "action": "eat"}', 'bad_field'),
                 ('{"type": "verdict", "seq": 1, "action": "replace"}', 'missing_field'),
                 ('{"type": "verdict", "seq": 1, "action": "replace", "data": 5}', 'bad_field'),
                 ('{"type": "verdict", "seq": 1, "action": "replace", "data": "@@"}',
                  'bad_field'),
                 ('{"type": "inject", "direction": "both", "data": "eA=="}', 'missing_field'),
                 ('{"type": "inject", "session": 0, "direction": "both", "data": "eA=="}',
                  'bad_field'),
                 ('{"type": "inject", "session": "all", "data": "eA=="}', 'missing_field'),
                 ('{"type": "inject", "session": "all", "direction": "up", "data": "eA=="}',
                  'bad_field'),
                 ('{"type": "inject", "session": "all", "direction": "both"}', 'missing_field'),
                 ('{"type": "inject", "session": "all", "direction": "both", "data": ""}',
                  'bad_field'),
                 ('{"type": "inject", "session": "all", "pipeline": 3, "direction": "both", '
                  '"data": "eA=="}', 'bad_field'),
                 ('{"type": "close", "session": "every"}', 'bad_field'),
                 ('{"type": "close", "type": "close", "session": 1}', 'bad_json'),
                 ('{"type": "verdict", "seq": 1, "action": "pass"}', 'not_filtering'),
                 ('{"type": "inject", "session": "all", "pipeline": "zz", "direction": "both",'
                  ' "data": "eA=="}', 'pipeline_not_found'),
                 ('{"type": "inject", "session": 999, "direction": "both", "data": "eA=="}',
                  'session_not_found'),
                 ('{"type": "close", "session": 999}', 'session_not_found')]
        for text, code in cases:
            w.send_text(text)
            m = w.recv_json()
            self.assertEqual((m['type'], m['code']), ('error', code), text)
            self.assertTrue(m['message'], text)
        w.send_binary(b'\x00\x01')
        self.assertEqual(w.recv_json()['code'], 'bad_message')
        # still open: a valid message works
        s = self.connect(d, 'a')
        s.sendall(b'hi')
        self.assertEqual(recv_exact(s, 2, Deadline(5)), b'hi')
        sid = d.wait_sessions(1)[0]['id']
        w.send_json({'type': 'inject', 'session': sid, 'direction': 'to_client',
                     'data': b64(b'pushed')})
        self.assertEqual(recv_exact(s, 6, Deadline(5)), b'pushed')

    def test_message_too_big_closes(self):
        e = self.echo()
        d = self.api(config(pipe('a', 'tcp', e.port)))
        w = self.ws(d, '/api/3/socket')
        w.recv_json()
        # announce a message past 1 MiB; the server refuses it from the header alone
        whole = frame(OP_TEXT, b'{"pad": "' + b'x' * (MiB + 10) + b'"}')
        w.sock.sendall(whole[:4096])
        self.assertEqual(w.wait_closed()[0], 1009)


# 2 ---------------------------------------------------------------------------------------
class T2Watch(Base):
    def test_watch_both_ways_session_events_injected(self):
        e = self.echo()
        d = self.api(config(pipe('a', 'tcp', e.port), pipe('b', 'tcp', e.port)))
        w = self.ws(d, '/api/3/socket?pipeline=a')
        w.recv_json()
        s = self.connect(d, 'a')
        s.sendall(b'ping')
        self.assertEqual(recv_exact(s, 4, Deadline(5)), b'ping')
        opened = w.recv_until(lambda m: m['type'] == 'session_opened')
        sess = opened['session']
        self.assertEqual((sess['pipeline'], sess['transport'], sess['state']),
                         ('a', 'tcp', 'open'))
        p1, p2 = self.next_packet(w), self.next_packet(w)
        self.assertEqual((p1['direction'], unb64(p1['data'])), ('to_server', b'ping'))
        self.assertEqual((p2['direction'], unb64(p2['data'])), ('to_client', b'ping'))
        self.assertEqual(p1['src'], p2['dst'])
        self.assertEqual(p1['dst'], p2['src'])
        self.assertEqual(p1['src'], sess['client'])
        self.assertEqual(p1['session'], sess['id'])
        self.assertGreater(p2['seq'], p1['seq'])
        for p in (p1, p2):
            self.assertEqual((p['pipeline'], p['transport'], p['leg'], p['flags'],
                              p['verdict_required']), ('a', 'tcp', 0, [], False))
            self.assertGreater(p['ts_us'], 1e15)
        # traffic on b is not shown
        b = self.connect(d, 'b')
        b.sendall(b'other')
        recv_exact(b, 5, Deadline(5))
        st, _, raw, _ = d.post('/api/3/sessions/%d/inject' % sess['id'],
                               {'direction': 'to_client', 'data': b64(b'INJ')})
        self.assertIn(st, (200, 202, 204), raw)
        self.assertEqual(recv_exact(s, 3, Deadline(5)), b'INJ')
        p3 = self.next_packet(w)
        self.assertEqual((p3['flags'], unb64(p3['data']), p3['direction']),
                         (['injected'], b'INJ', 'to_client'))
        s.close()
        closed = w.recv_until(lambda m: m['type'] == 'session_closed')
        self.assertEqual(closed['session']['id'], sess['id'])
        self.assertEqual(closed['session']['state'], 'closed')
        self.assertIn(closed['session']['close_reason'], ('client_closed', 'server_closed'))

    def test_ws_inject_and_close(self):
        e = self.echo()
        d = self.api(config(pipe('a', 'tcp', e.port), pipe('b', 'tcp', e.port)))
        w = self.ws(d, '/api/3/socket')
        w.recv_json()
        sa, sb = self.connect(d, 'a'), self.connect(d, 'b')
        for s in (sa, sb):
            s.sendall(b'x')
            recv_exact(s, 1, Deadline(5))
        d.wait_sessions(2)
        w.send_json({'type': 'inject', 'session': 'all', 'pipeline': 'b',
                     'direction': 'to_client', 'data': b64(b'only-b')})
        self.assertEqual(recv_exact(sb, 6, Deadline(5)), b'only-b')
        self.expect_silence(sa)
        w.send_json({'type': 'inject', 'session': 'all', 'direction': 'both',
                     'data': b64(b'all')})
        # both: to the client, and to the echo server which sends it back
        for s in (sa, sb):
            self.assertEqual(recv_exact(s, 6, Deadline(5)), b'allall')
        sid_a = [x['id'] for x in d.wait_sessions(2) if x['pipeline'] == 'a'][0]
        w.send_json({'type': 'close', 'session': sid_a})
        sa.settimeout(5)
        self.assertEqual(sa.recv(10), b'')
        w.send_json({'type': 'close', 'session': 'all'})
        sb.settimeout(5)
        self.assertEqual(sb.recv(10), b'')

    def test_slow_watcher_lags_and_never_slows_traffic(self):
        e = self.echo()
        d = self.api(config(pipe('a', 'tcp', e.port)))
        w = self.ws(d, '/api/3/socket', rcvbuf=4096)
        w.recv_json()   # then never read while the transfer runs
        total = 48 * MiB
        s = self.connect(d, 'a')
        chunk = bytes(range(256)) * 256
        done = {}

        def send():
            sent = 0
            while sent < total:
                s.sendall(chunk)
                sent += len(chunk)
            done['sent'] = sent

        t = threading.Thread(target=send, daemon=True)
        t0 = time.monotonic()
        t.start()
        got = 0
        dl = Deadline(60)
        s.settimeout(10)
        while got < total and not dl.expired():
            b = s.recv(1 << 20)
            if not b:
                break
            got += len(b)
        t.join(dl.left())
        elapsed = time.monotonic() - t0
        self.assertEqual(got, total, 'bulk transfer incomplete after %.1fs' % elapsed)
        self.assertLess(elapsed, 60)
        self.assertLess(rss_kib(d.proc.pid), 400 * 1024, 'daemon memory grew')
        lag = w.recv_until(lambda m: m['type'] == 'lagged', timeout=60)
        self.assertGreater(lag['dropped'], 0)


# 3 ---------------------------------------------------------------------------------------
class T3Filter(Base):
    def filter_daemon(self, through=REMOTE):
        e = self.echo()
        return self.api(config(pipe('t', 'tcp', e.port, through)))

    def answer(self, w, action, data=None, timeout=5.0):
        p = self.next_packet(w, timeout)
        self.assertTrue(p['verdict_required'], p)
        v = {'type': 'verdict', 'seq': p['seq'], 'action': action}
        if data is not None:
            v['data'] = b64(data)
        w.send_json(v)
        return p

    def test_pass_drop_replace(self):
        d = self.filter_daemon()
        w = self.ws(d, '/api/3/socket?mode=filter&pipeline=t')
        h = w.recv_json()
        self.assertEqual((h['mode'], h['pipelines']), ('filter', ['t']))
        s = self.connect(d, 't')
        s.sendall(b'one')
        p = self.answer(w, 'pass')
        self.assertEqual((unb64(p['data']), p['direction'], p['flags']),
                         (b'one', 'to_server', []))
        self.assertEqual(self.answer(w, 'pass')['direction'], 'to_client')
        self.assertEqual(recv_exact(s, 3, Deadline(5)), b'one')
        s.sendall(b'two')
        self.answer(w, 'drop')
        s.sendall(b'three')
        self.answer(w, 'pass')
        self.answer(w, 'pass')
        self.assertEqual(recv_exact(s, 5, Deadline(5)), b'three')
        s.sendall(b'four')
        self.answer(w, 'replace', b'FOUR-AND-LONGER')
        p = self.answer(w, 'pass')
        self.assertEqual(unb64(p['data']), b'FOUR-AND-LONGER')
        self.assertEqual(recv_exact(s, 15, Deadline(5)), b'FOUR-AND-LONGER')
        s.sendall(b'five')
        self.answer(w, 'replace', b'')
        s.sendall(b'six')
        self.answer(w, 'pass')
        p = self.answer(w, 'replace', b'SIX')
        self.assertEqual(unb64(p['data']), b'six')
        self.assertEqual(recv_exact(s, 3, Deadline(5)), b'SIX')
        self.expect_silence(s)
        # answered twice / never sent
        w.send_json({'type': 'verdict', 'seq': p['seq'], 'action': 'pass'})
        err = w.recv_json()
        self.assertEqual((err['code'], err['ref']), ('unknown_seq', p['seq']))
        w.send_json({'type': 'verdict', 'seq': 10 ** 9, 'action': 'pass'})
        self.assertEqual(w.recv_json()['code'], 'unknown_seq')

    def test_10000_packets_out_of_order(self):
        sink = UdpSink()
        self.addCleanup(sink.stop)
        d = self.api(config(pipe('u', 'udp', sink.port, REMOTE)))
        w = self.ws(d, '/api/3/socket?mode=filter&pipeline=u&timeout_ms=120000')
        w.recv_json()
        n = 10000
        rnd = random.Random(7)
        seen = [0]
        cond = threading.Condition()
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(c.close)
        port = d.port('u')
        errors = []

        def payload(i):
            return b'%05d:' % i + bytes([65 + i % 26]) * (i % 40)

        def sender():
            try:
                for i in range(n):
                    with cond:
                        if not cond.wait_for(lambda: i - seen[0] < 100, 60):
                            errors.append('sender stalled at %d' % i)
                            return
                    c.sendto(payload(i), (HOST, port))
            except OSError as ex:
                errors.append(repr(ex))

        def decide(i):
            if i % 7 == 0:
                return 'drop', None
            if i % 5 == 0:
                return 'replace', b'R%05d' % i + b'+' * (i % 90 + 10)
            if i % 11 == 0:
                return 'replace', b'S%d' % i
            return 'pass', None

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        pending, order = [], []
        dl = Deadline(120)
        while len(order) < n and not dl.expired():
            try:
                m = w.recv_json(0.02)
            except WsTimeout:
                m = None
            if m is not None:
                if m['type'] != 'packet':
                    continue
                self.assertTrue(m['verdict_required'])
                pending.append(m)
                order.append(unb64(m['data']))
                with cond:
                    seen[0] += 1
                    cond.notify_all()
                if len(pending) < 48 and len(order) < n:
                    continue
            rnd.shuffle(pending)
            for p in pending:
                i = int(unb64(p['data'])[:5])
                action, data = decide(i)
                v = {'type': 'verdict', 'seq': p['seq'], 'action': action}
                if data is not None:
                    v['data'] = b64(data)
                w.send_json(v)
            pending = []
        t.join(10)
        self.assertEqual(errors, [])
        self.assertEqual(order, [payload(i) for i in range(n)], 'frames out of packet order')
        expected = []
        for i in range(n):
            action, data = decide(i)
            if action == 'pass':
                expected.append(payload(i))
            elif action == 'replace':
                expected.append(data)
        got = sink.wait(len(expected), 30)
        self.assertEqual(len(got), len(expected))
        self.assertEqual(got, expected)

    def release_case(self, default):
        d = self.filter_daemon()
        w = self.ws(d, '/api/3/socket?mode=filter&pipeline=t&default=' + default)
        w.recv_json()
        s = self.connect(d, 't')
        for part in (b'a1', b'a2', b'a3'):
            s.sendall(part)
            self.next_packet(w)   # held; each is a separate read
        t0 = time.monotonic()
        w.abort()
        if default == 'pass':
            self.assertEqual(recv_exact(s, 6, Deadline(10)), b'a1a2a3')
            self.assertLess(time.monotonic() - t0, 10)
        # the claim is free again: a new holder is accepted
        dl = Deadline(10)
        while True:
            try:
                w2 = open_ws(d, '/api/3/socket?mode=filter&pipeline=t')
                break
            except HandshakeError as e:
                self.assertEqual(e.status, 409)
                self.assertFalse(dl.expired(), 'the claim was not released')
                dl.sleep(0.02)
        w2.recv_json()
        w2.close()
        s.sendall(b'zz')
        self.assertEqual(recv_exact(s, 2, Deadline(5)), b'zz')
        self.expect_silence(s)

    def test_close_mid_stream_default_pass(self):
        self.release_case('pass')

    def test_close_mid_stream_default_drop(self):
        self.release_case('drop')

    def test_second_claim_busy(self):
        d = self.filter_daemon()
        w = self.ws(d, '/api/3/socket?mode=filter&pipeline=t')
        w.recv_json()
        r = self.refused(d, '/api/3/socket?mode=filter&pipeline=t')
        self.assertEqual((r.status, r.json()['error']['code']), (409, 'filter_busy'))
        self.assertIn('filter held by', r.json()['error']['message'])
        r = self.refused(d, '/api/3/socket?mode=filter')
        self.assertEqual(r.status, 409)

    def test_timeout_and_default(self):
        d = self.filter_daemon()
        w = self.ws(d, '/api/3/socket?mode=filter&pipeline=t&timeout_ms=300&default=drop')
        w.recv_json()
        s = self.connect(d, 't')
        s.sendall(b'late')
        p = self.next_packet(w)
        time.sleep(0.6)   # the hold expires: nothing to wait on but the clock
        w.send_json({'type': 'verdict', 'seq': p['seq'], 'action': 'pass'})
        err = w.recv_json()
        self.assertEqual((err['type'], err['code'], err['ref']),
                         ('error', 'verdict_expired', p['seq']))
        s.sendall(b'next')
        self.answer(w, 'pass')
        self.answer(w, 'pass')
        self.assertEqual(recv_exact(s, 4, Deadline(5)), b'next')
        w.close()
        w = self.ws(d, '/api/3/socket?mode=filter&pipeline=t&timeout_ms=200&default=pass')
        w.recv_json()
        t0 = time.monotonic()
        s.sendall(b'slow')
        self.assertEqual(recv_exact(s, 4, Deadline(10)), b'slow')
        self.assertGreater(time.monotonic() - t0, 0.3)   # held twice, 200 ms each

    def test_filter_all_pipelines_and_injected_shown(self):
        e = self.echo()
        d = self.api(config(pipe('f1', 'tcp', e.port, REMOTE), pipe('plain', 'tcp', e.port),
                            pipe('f2', 'tcp', e.port, REMOTE)))
        r = self.refused(d, '/api/3/socket?mode=filter&pipeline=plain')
        self.assertEqual((r.status, r.json()['error']['code']), (404, 'no_remote_filter'))
        w = self.ws(d, '/api/3/socket?mode=filter')
        self.assertEqual(w.recv_json()['pipelines'], ['f1', 'f2'])
        s = self.connect(d, 'plain')
        s.sendall(b'free')
        self.assertEqual(recv_exact(s, 4, Deadline(5)), b'free')
        s2 = self.connect(d, 'f2')
        s2.sendall(b'q')
        p = self.next_packet(w)
        self.assertEqual(p['pipeline'], 'f2')
        w.send_json({'type': 'verdict', 'seq': p['seq'], 'action': 'drop'})
        sid = [x['id'] for x in d.wait_sessions(2) if x['pipeline'] == 'f2'][0]
        w.send_json({'type': 'inject', 'session': sid, 'direction': 'to_client',
                     'data': b64(b'inj')})
        self.assertEqual(recv_exact(s2, 3, Deadline(5)), b'inj')
        p = self.next_packet(w)
        self.assertEqual((p['flags'], p['verdict_required']), (['injected'], False))

    def test_no_remote_filter_anywhere(self):
        e = self.echo()
        d = self.api(config(pipe('plain', 'tcp', e.port)))
        r = self.refused(d, '/api/3/socket?mode=filter')
        self.assertEqual((r.status, r.json()['error']['code']), (404, 'no_remote_filter'))


# 4 ---------------------------------------------------------------------------------------
class T4Revoke(Base):
    def test_revoking_a_key_closes_its_sockets(self):
        e = self.echo()
        d = self.api(config(pipe('t', 'tcp', e.port, REMOTE)))
        st, js, raw, _ = d.post('/api/3/keys', {'perms': ['UseWebsocket', 'Filter'],
                                                'name': 'ws'})
        self.assertEqual(st, 201, raw)
        w = self.ws(d, '/api/3/socket?mode=filter', key=js['key'])
        w.recv_json()
        other = self.ws(d, '/api/3/socket')
        other.recv_json()
        old = self.ws(d, '/api/2/socket?key=' + js['key'], key=None)
        st, _, raw, _ = d.request('DELETE', '/api/3/keys/' + js['id'])
        self.assertIn(st, (200, 204), raw)
        self.assertEqual(w.wait_closed()[0], 1008)
        self.assertEqual(old.wait_closed()[0], 1008)
        # the claim went with it; the admin's socket is still open
        f = self.ws(d, '/api/3/socket?mode=filter')
        f.recv_json()
        other.ping(b'still')
        self.assertEqual(other.wait_pong(), b'still')


    def test_revoked_silent_client_is_cut_off_and_stop_closes_all(self):
        e = self.echo()
        d = ApiDaemon(config(pipe('t', 'tcp', e.port)))
        self._daemons = getattr(self, '_daemons', [])
        self._daemons.append(d)
        self.addCleanup(d.stop)
        d.start()
        st, js, raw, _ = d.post('/api/3/keys', {'perms': ['UseWebsocket'], 'name': 'quiet'})
        silent = self.ws(d, '/api/3/socket', key=js['key'])
        silent.recv_json()
        w = self.ws(d, '/api/3/socket')
        w.recv_json()
        d.request('DELETE', '/api/3/keys/' + js['id'])
        t0 = time.monotonic()
        silent.sock.settimeout(10)
        data = b''
        while True:   # read raw bytes, never answer the close frame
            b = silent.sock.recv(4096)
            if not b:
                break
            data += b
        self.assertIn(b'key revoked', data)
        self.assertLess(time.monotonic() - t0, 8)
        d.stop()
        self.assertEqual(w.wait_closed()[0], 1001)


# 5 ---------------------------------------------------------------------------------------
class T5Old(Base):
    def old(self, d, flags='', key=None, **kw):
        return self.ws(d, '/api/2/socket?key=%s%s' % (key or d.admin_key, flags), key=None,
                       **kw)

    def old_refused(self, d, flags, key=None):
        r = self.refused(d, '/api/2/socket?key=%s%s' % (key or d.admin_key, flags), key=None)
        return r.status, r.json()

    def test_envelopes_exact(self):
        e = self.echo()
        d = self.api(config(pipe('a', 'tcp', e.port)))
        w = self.old(d)
        s = self.connect(d, 'a')
        s.sendall(b'hey')
        recv_exact(s, 3, Deadline(5))
        m1, m2 = w.recv_json(), w.recv_json()
        sid = d.wait_sessions(1)[0]['id']
        client = '127.0.0.1:%d' % s.getsockname()[1]
        server = '127.0.0.1:%d' % e.port
        self.assertEqual(m1, {'Status': 200, 'Data': {'Type': 1, 'Data': {
            'PktNum': -1, 'ProxyId': sid, 'Network': 'tcp', 'Source': client,
            'Dest': server, 'Data': b64(b'hey'), 'Flags': 1}}})
        self.assertEqual(m2['Data']['Data']['Flags'], 0)
        self.assertEqual((m2['Data']['Data']['Source'], m2['Data']['Data']['Dest']),
                         (server, client))
        st, _, raw, _ = d.post('/api/3/sessions/%d/inject' % sid,
                               {'direction': 'to_server', 'data': b64(b'i')})
        m3 = w.recv_json()
        self.assertEqual((m3['Data']['Data']['Flags'], m3['Data']['Data']['Data']), (3, 'aQ=='))

    def test_flags_need_permissions(self):
        e = self.echo()
        d = self.api(config(pipe('a', 'tcp', e.port, REMOTE)))
        k = d.make_key(USE_WS)
        for flag in ('close', 'inject', 'filter'):
            st, js = self.old_refused(d, '&' + flag, key=k)
            self.assertEqual((st, js), (403, {'Status': 403, 'Data':
                                              "missing permissions for '%s'" % flag}))
        st, js = self.old_refused(d, '&filter&default=maybe')
        self.assertEqual((st, js['Status']), (400, 400))
        self.assertIn("'default' value is invalid", js['Data'])
        st, js = self.old_refused(d, '&network=sctp')
        self.assertEqual(js, {'Status': 400, 'Data': "network must be 'tcp', 'udp' or left empty"})
        st, js = self.old_refused(d, '', key=d.make_key(CHECK_STATUS))
        self.assertEqual((st, js['Status']), (403, 403))
        w = self.old(d, key=k)
        w.send_json({'Type': 1, 'Target': -1, 'Data': 'eA==', 'Extra': 3})
        self.assertEqual(w.recv_json(), {'Status': 403, 'Data': 'Missing permissions to inject'})
        w.send_json({'Type': 2, 'Target': -1})
        self.assertEqual(w.recv_json(), {'Status': 403, 'Data': 'Missing permissions to close'})
        w.send_json({'Type': 3, 'Target': 0, 'Extra': 1})
        self.assertEqual(w.recv_json(), {'Status': 403, 'Data': 'Missing permissions to filter'})

    def test_messages(self):
        e = self.echo()
        d = self.api(config(pipe('a', 'tcp', e.port), pipe('b', 'tcp', e.port)))
        w = self.old(d, '&close&inject')
        sa, sb = self.connect(d, 'a'), self.connect(d, 'b')
        for s in (sa, sb):
            s.sendall(b'.')
            recv_exact(s, 1, Deadline(5))
        sessions = d.wait_sessions(2)
        sid_a = [x['id'] for x in sessions if x['pipeline'] == 'a'][0]
        bad = [('{"Type": 1, "Target": 1, "Data": "eA==", "Extra": 0}',
                {'Status': 400, 'Data': "toClient and/or toServer must be set in 'Extra'"}),
               ('{"Type": 9}', {'Status': 400, 'Data': 'Unknown Type'}),
               ('null', {'Status': 400, 'Data': 'Unknown Type'}),
               ('{"Type": "1"}', {'Status': 400, 'Data': 'Bad JSON data'}),
               ('{"Type": 1, "Data": "!!"}', {'Status': 400, 'Data': 'Bad JSON data'}),
               ('{"Type": 1, "Extra": -1}', {'Status': 400, 'Data': 'Bad JSON data'}),
               ('[1]', {'Status': 400, 'Data': 'Bad JSON data'}),
               ('{"Type": 3, "Target": 0}', {'Status': 403,
                                             'Data': 'Missing permissions to filter'})]
        for text, want in bad:
            w.send_text(text)
            self.assertEqual(w.recv_until(lambda m: m['Status'] != 200), want, text)
        w.send_binary(b'{}')
        self.assertEqual(w.recv_until(lambda m: m['Status'] != 200),
                         {'Status': 400, 'Data': 'Data type must be Text JSON'})
        w.send_json({'Type': 1, 'Target': 4242, 'Data': 'eA==', 'Extra': 1})
        m = w.recv_until(lambda m: m['Status'] != 200)
        self.assertEqual(m['Status'], 404)
        self.assertTrue(m['Data'].startswith('proxy not found'))
        # case-insensitive field names, as Go decoded them; Extra 1 = to client
        w.send_text('{"type": 1, "target": %d, "data": "%s", "extra": 1}' % (sid_a, b64(b'C')))
        self.assertEqual(recv_exact(sa, 1, Deadline(5)), b'C')
        w.send_json({'Type': 1, 'Target': sid_a, 'Data': b64(b'S'), 'Extra': 2})
        self.assertEqual(recv_exact(sa, 1, Deadline(5)), b'S')   # echoed back
        w.send_json({'Type': 1, 'Target': -1, 'Data': b64(b'B'), 'Extra': 3})
        for s in (sa, sb):
            self.assertEqual(recv_exact(s, 2, Deadline(5)), b'BB')
        w.send_json({'Type': 2, 'Target': 4242})
        self.assertEqual(w.recv_until(lambda m: m['Status'] != 200)['Status'], 404)
        w.send_json({'Type': 2, 'Target': sid_a})
        sa.settimeout(5)
        self.assertEqual(sa.recv(10), b'')
        w.send_json({'Type': 2, 'Target': -1})
        sb.settimeout(5)
        self.assertEqual(sb.recv(10), b'')

    def test_filter(self):
        e = self.echo()
        d = self.api(config(pipe('t', 'tcp', e.port,
                                 '[ {remote: {HoldTimeoutMs: 400, Default: pass}} ]')))
        w = self.old(d, '&filter&default=drop')
        st, js = self.old_refused(d, '&filter')
        self.assertEqual((st, js['Status']), (409, 409))
        self.assertIn('filter held by', js['Data'])
        s = self.connect(d, 't')
        s.sendall(b'one')
        m = w.recv_json()['Data']['Data']
        self.assertEqual((m['PktNum'], m['Flags'], m['Data']), (0, 1, b64(b'one')))
        w.send_json({'Type': 3, 'Target': 0, 'Extra': 1})
        m = w.recv_json()['Data']['Data']
        self.assertEqual((m['PktNum'], m['Flags']), (1, 0))
        w.send_json({'Type': 3, 'Target': 1, 'Extra': 1})
        self.assertEqual(recv_exact(s, 3, Deadline(5)), b'one')
        w.send_json({'Type': 3, 'Target': 1, 'Extra': 1})
        self.assertEqual(w.recv_json(), {'Status': 410, 'Data': 'packet already handled'})
        w.send_json({'Type': 3, 'Target': 77, 'Extra': 1})
        self.assertEqual(w.recv_json(), {'Status': 404, 'Data': 'packet not found'})
        s.sendall(b'two')
        m = w.recv_json()['Data']['Data']
        w.send_json({'Type': 3, 'Target': m['PktNum'], 'Extra': 0})   # drop
        # not answered: the old program told the client, and a late verdict gets 408
        s.sendall(b'three')
        m = w.recv_json()['Data']['Data']
        self.assertEqual(w.recv_json(5), {'Status': 408, 'Data': 'packet timed out'})
        w.send_json({'Type': 3, 'Target': m['PktNum'], 'Extra': 1})
        self.assertEqual(w.recv_json(), {'Status': 408, 'Data': 'packet timed out'})
        self.expect_silence(s, 0.5)   # default=drop: neither two nor three came back
        # injected packets are shown with a number but never wait
        sid = d.wait_sessions(1)[0]['id']
        d.post('/api/3/sessions/%d/inject' % sid, {'direction': 'to_client', 'data': b64(b'I')})
        self.assertEqual(recv_exact(s, 1, Deadline(5)), b'I')
        m = w.recv_json()['Data']['Data']
        self.assertEqual(m['Flags'], 2)
        self.assertGreater(m['PktNum'], 1)

    def test_network_filter(self):
        e, u = self.echo(), UdpEchoServer()
        self.addCleanup(u.stop)
        d = self.api(config(pipe('t', 'tcp', e.port, REMOTE), pipe('u', 'udp', u.port, REMOTE)))
        w = self.old(d, '&network=udp')
        f = self.old(d, '&filter&network=udp')
        s = self.connect(d, 't')
        s.sendall(b'tcp!')
        self.assertEqual(recv_exact(s, 4, Deadline(5)), b'tcp!')   # t is not held
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(c.close)
        c.sendto(b'udp!', (HOST, d.port('u')))
        m = f.recv_json()['Data']['Data']
        self.assertEqual((m['Network'], m['Data']), ('udp', b64(b'udp!')))
        f.send_json({'Type': 3, 'Target': m['PktNum'], 'Extra': 1})
        m = f.recv_json()['Data']['Data']
        f.send_json({'Type': 3, 'Target': m['PktNum'], 'Extra': 1})
        c.settimeout(5)
        self.assertEqual(c.recv(100), b'udp!')
        seen = [w.recv_json()['Data']['Data'] for _ in range(2)]
        self.assertEqual([x['Network'] for x in seen], ['udp', 'udp'])
        self.assertEqual([x['PktNum'] for x in seen], [-1, -1])
        with self.assertRaises(WsTimeout):
            w.recv_json(0.3)


if __name__ == '__main__':
    unittest.main(verbosity=2)
