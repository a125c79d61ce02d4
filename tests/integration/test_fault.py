"""Integration tests for the fault plugin (docs/fault.md): real sockets, a real daemon.

Latency (both directions, TCP and UDP), jitter keeping order, seeded loss (rate within a
statistical bound, the same drops for the same seed), a bandwidth cap, freeze then release
with every byte in order, the FreezeMaxMs bound, blackhole, live changes through the API and
through SIGHUP, a session's own faults over its pipeline's, clear releasing held packets at
once, bad input, permissions, and the dormant stage keeping TCP on the zero-copy path.

Run from the repository root:
    python3 tests/integration/test_fault.py
The binary is $EZP_BIN or build/ezproxy; EZP_SHOW_LOG=1 prints every daemon's stderr.
"""

import hashlib
import os
import re
import socket
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from apiclient import ApiDaemon  # noqa: E402
from harness import (HOST, Deadline, TcpEchoServer, UdpEchoServer, pattern,  # noqa: E402
                     recv_exact)

# Timing is checked with generous slack: a noisy 2-core machine, maybe under ASan.
SLACK = 0.45


def pipe(name, net, to_port, through='[{fault: {}}]'):
    text = '  - Name: %s\n    From: {%s: {Listen: "127.0.0.1:0"}}\n' % (name, net)
    if through:
        text += '    Through: %s\n' % through
    return text + '    To: {%s: {Connect: "127.0.0.1:%d"}}\n' % (net, to_port)


def dirs(**kw):
    """A fault direction object with every field (the API's answer shape)."""
    d = {'latency_ms': 0, 'jitter_ms': 0, 'loss': 0.0, 'bandwidth_bps': 0, 'freeze': False,
         'blackhole': False}
    d.update(kw)
    return d


class Tcp:
    """A TCP client of a pipeline."""

    def __init__(self, port):
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local = '%s:%d' % self.sock.getsockname()[:2]

    def rtt(self, payload=b'ping', timeout=10.0):
        t0 = time.monotonic()
        self.sock.sendall(payload)
        got = recv_exact(self.sock, len(payload), Deadline(timeout))
        if got != payload:
            raise AssertionError('echo %r of %r' % (got, payload))
        return time.monotonic() - t0

    def nothing_for(self, seconds):
        """True when no byte arrives within @seconds (a blackhole or a freeze)."""
        self.sock.settimeout(seconds)
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b''
        except socket.timeout:
            return True
        finally:
            self.sock.settimeout(10)

    def close(self):
        self.sock.close()


class Udp:
    """A UDP client of a pipeline (its own session); a thread collects the echoes."""

    def __init__(self, port):
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((HOST, 0))
        self.local = '%s:%d' % self.sock.getsockname()[:2]
        self.got = []  # (monotonic time, payload)
        self.cond = threading.Condition()
        self.stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        self.sock.settimeout(0.1)
        while not self.stop:
            try:
                data = self.sock.recv(70000)
            except socket.timeout:
                continue
            except OSError:
                return
            with self.cond:
                self.got.append((time.monotonic(), data))
                self.cond.notify_all()

    def send(self, data):
        self.sock.sendto(data, (HOST, self.port))

    def wait_count(self, n, timeout):
        d = Deadline(timeout)
        with self.cond:
            self.cond.wait_for(lambda: len(self.got) >= n, d.left())
            return len(self.got)

    def wait_quiet(self, quiet, timeout):
        """Wait until nothing arrived for @quiet seconds (bounded by @timeout)."""
        d = Deadline(timeout)
        while not d.expired():
            with self.cond:
                last = self.got[-1][0] if self.got else 0
            if time.monotonic() - last >= quiet:
                break
            d.sleep(0.05)
        with self.cond:
            return list(self.got)

    def burst(self, n, pace=0.0005):
        """Send n numbered datagrams, paced so no socket buffer overflows."""
        for i in range(n):
            self.send(b'%06d' % i)
            if pace:
                time.sleep(pace)

    def close(self):
        self.stop = True
        self.thread.join(2)
        self.sock.close()


class FaultCase(unittest.TestCase):
    """One daemon for the class (auth on); each test starts with every fault cleared."""

    @classmethod
    def setUpClass(cls):
        cls.echo = TcpEchoServer()
        cls.uecho = UdpEchoServer()
        cfg = ('Workers: 2\nLogging: {Level: info}\nPipelines:\n'
               + pipe('t', 'tcp', cls.echo.port) + pipe('u', 'udp', cls.uecho.port)
               + pipe('nf', 'tcp', cls.echo.port, through=None))
        cls.d = ApiDaemon(cfg)
        try:
            cls.d.start()
        except Exception:
            cls.d.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        rc = cls.d.stop()
        cls.echo.stop()
        cls.uecho.stop()
        if rc != 0:
            raise AssertionError('daemon exit status %r\n%s' % (rc, cls.d.tail()))

    def setUp(self):
        for p in ('t', 'u'):
            self.put('/api/3/pipelines/%s/faults' % p, {})
        self.own = []

    def tearDown(self):
        for c in self.own:
            c.close()

    def run(self, result=None):
        before = len(result.failures) + len(result.errors) if result else 0
        try:
            return super().run(result)
        finally:
            if result and (len(result.failures) + len(result.errors) > before
                           or os.environ.get('EZP_SHOW_LOG')):
                sys.stderr.write('\n[%s]\n%s\n' % (self.id(), self.d.tail(60)))

    # -- helpers --

    def put(self, path, body, status=200, key='admin'):
        st, js, raw, _ = self.d.request('PUT', path, body=body, key=key)
        self.assertEqual(st, status, raw)
        return js

    def get(self, path, status=200, key='admin'):
        st, js, raw, _ = self.d.request('GET', path, key=key)
        self.assertEqual(st, status, raw)
        return js

    def faults(self, pipeline, body):
        return self.put('/api/3/pipelines/%s/faults' % pipeline, body)

    def tcp(self, pipeline='t'):
        c = Tcp(self.d.port(pipeline))
        self.own.append(c)
        return c

    def udp(self, pipeline='u'):
        c = Udp(self.d.port(pipeline))
        self.own.append(c)
        return c

    def session_of(self, client, pipeline):
        d = Deadline(10)
        while True:
            for s in self.get('/api/3/sessions?pipeline=' + pipeline)['sessions']:
                if s['client'] == client.local:
                    return s['id']
            if d.expired():
                self.fail('no session for %s in %s' % (client.local, pipeline))
            d.sleep(0.02)

    def assertDelay(self, took, ms):
        self.assertGreaterEqual(took, ms / 1000 - 0.01, 'expected at least %d ms' % ms)
        self.assertLess(took, ms / 1000 + SLACK, 'expected about %d ms' % ms)

    # -- latency --

    def test_latency_tcp_both_directions(self):
        c = self.tcp()
        self.assertLess(c.rtt(), SLACK)
        js = self.faults('t', {'to_server': {'latency_ms': 150}, 'to_client': {'latency_ms': 100}})
        self.assertEqual(js['to_server'], dirs(latency_ms=150))
        self.assertEqual(js['to_client'], dirs(latency_ms=100))
        for _ in range(3):
            self.assertDelay(c.rtt(), 250)
        self.faults('t', {'to_client': {'latency_ms': 200}})  # one direction only
        for _ in range(2):
            self.assertDelay(c.rtt(), 200)

    def test_latency_udp_both_directions(self):
        c = self.udp()
        self.faults('u', {'both': {'latency_ms': 120}})
        for i in range(4):
            t0 = time.monotonic()
            c.send(b'u%d' % i)
            self.assertEqual(c.wait_count(i + 1, 5), i + 1)
            self.assertDelay(c.got[-1][0] - t0, 240)

    # -- jitter keeps order --

    def test_jitter_keeps_order_udp(self):
        self.faults('u', {'to_server': {'latency_ms': 10, 'jitter_ms': 80}, 'seed': 3})
        c = self.udp()
        t0 = time.monotonic()
        c.burst(150, pace=0.001)
        self.assertEqual(c.wait_count(150, 10), 150, 'every datagram arrives')
        seqs = [int(p) for _, p in c.got]
        self.assertEqual(seqs, list(range(150)), 'in order')
        self.assertGreaterEqual(c.got[0][0] - t0, 0.009)

    def test_jitter_keeps_tcp_stream(self):
        self.faults('t', {'both': {'jitter_ms': 40}})
        c = self.tcp()
        data = pattern(11, 200000)
        t = threading.Thread(target=c.sock.sendall, args=(data,), daemon=True)
        t.start()
        got = recv_exact(c.sock, len(data), Deadline(20))
        t.join(5)
        self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(data).hexdigest())

    # -- loss --

    def loss_pattern(self, n):
        c = self.udp()
        c.burst(n)
        got = c.wait_quiet(0.4, 10)
        c.close()
        self.own.remove(c)
        return [int(p) for _, p in got]

    def test_loss_rate_and_same_seed_same_drops(self):
        n, p = 400, 0.3
        self.faults('u', {'to_server': {'loss': p}, 'seed': 1234})
        first = self.loss_pattern(n)
        # binomial(400, 0.3): sd 9.2 drops; 5 sd either side
        self.assertTrue(n * (1 - p) - 46 <= len(first) <= n * (1 - p) + 46, len(first))
        self.assertEqual(first, sorted(first))
        second = self.loss_pattern(n)  # a new session, the same seed: the same drops
        self.assertEqual(first, second)
        self.faults('u', {'to_server': {'loss': p}, 'seed': 99})
        other = self.loss_pattern(n)
        self.assertNotEqual(first, other, 'another seed, other drops')

    # -- bandwidth --

    def test_bandwidth_cap(self):
        bps = 800000  # 100 kB/s
        self.faults('t', {'to_server': {'bandwidth_bps': bps}})
        c = self.tcp()
        data = pattern(5, 150000)
        t0 = time.monotonic()
        threading.Thread(target=c.sock.sendall, args=(data,), daemon=True).start()
        got = recv_exact(c.sock, len(data), Deadline(15))
        took = time.monotonic() - t0
        self.assertEqual(got, data)
        rate = len(data) * 8 / took
        self.assertGreater(rate, bps * 0.6, 'measured %.0f bit/s' % rate)
        self.assertLess(rate, bps * 1.1, 'measured %.0f bit/s' % rate)

    # -- freeze --

    def test_freeze_then_release_in_order(self):
        c = self.tcp()
        self.assertLess(c.rtt(), SLACK)
        self.faults('t', {'both': {'freeze': True}})
        data = pattern(7, 300000)
        sender = threading.Thread(target=c.sock.sendall, args=(data,), daemon=True)
        sender.start()
        self.assertTrue(c.nothing_for(0.6), 'a frozen session passes nothing')
        t0 = time.monotonic()
        self.faults('t', {})
        got = recv_exact(c.sock, len(data), Deadline(10))
        self.assertLess(time.monotonic() - t0, 3.0)
        sender.join(5)
        self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(data).hexdigest())

    def test_freeze_max_bound(self):
        c = self.tcp()
        mark = self.d.mark()
        t0 = time.monotonic()
        js = self.faults('t', {'to_server': {'freeze': True}, 'freeze_max_ms': 800})
        t1 = time.monotonic()
        self.assertEqual(js['freeze_max_ms'], 800)
        self.assertTrue(js['to_server']['freeze'])
        c.rtt(b'frozen')
        end = time.monotonic()
        # released when the bound (from when the freeze was set) passed, not before
        self.assertGreaterEqual(end - t1, 0.79 - (t1 - t0))
        self.assertLess(end - t0, 0.8 + SLACK)
        self.d.wait_line(r'pipeline t: the freeze ended after FreezeMaxMs \(800 ms\)',
                         since=mark, timeout=5)
        self.assertFalse(self.get('/api/3/pipelines/t/faults')['to_server']['freeze'])
        self.assertLess(c.rtt(), SLACK, 'the freeze is over')

    # -- blackhole --

    def test_blackhole(self):
        u = self.udp()
        self.faults('u', {'to_server': {'blackhole': True}})
        for i in range(5):
            u.send(b'b%d' % i)
        self.assertEqual(u.wait_count(1, 0.5), 0, 'nothing comes back from a blackhole')
        self.faults('u', {})
        u.send(b'after')
        self.assertEqual(u.wait_count(1, 5), 1)
        self.assertEqual(u.got[0][1], b'after')

        c = self.tcp()
        self.faults('t', {'to_client': {'blackhole': True}})
        c.sock.sendall(b'lost')
        self.assertTrue(c.nothing_for(0.4))
        self.faults('t', {})
        # on TCP a blackhole (as loss) cuts bytes out of the stream: 'lost' never arrives
        self.assertLess(c.rtt(b'kept'), SLACK)

    # -- live changes --

    def test_clear_releases_held_packets_at_once(self):
        c = self.tcp()
        self.faults('t', {'to_server': {'latency_ms': 5000}})
        t0 = time.monotonic()
        c.sock.sendall(b'held')
        self.assertTrue(c.nothing_for(0.3))
        self.faults('t', {})
        self.assertEqual(recv_exact(c.sock, 4, Deadline(5)), b'held')
        self.assertLess(time.monotonic() - t0, 0.3 + SLACK + 0.5, 'released at the clear')

    def test_sessions_end_while_packets_are_held(self):
        self.faults('t', {'both': {'latency_ms': 800}})
        self.faults('u', {'both': {'latency_ms': 800, 'bandwidth_bps': 100000}})
        for _ in range(5):
            c = Tcp(self.d.port('t'))
            c.sock.sendall(b'x' * 5000)
            c.sock.close()  # the session ends with packets held in the fault stage
        u = self.udp()
        u.burst(100, pace=0)
        sid = self.session_of(u, 'u')
        st, _, raw, _ = self.d.request('DELETE', '/api/3/sessions/%d' % sid)
        self.assertEqual(st, 204, raw)
        self.d.wait_closes(5, pipeline='t', timeout=10)
        self.faults('t', {})
        self.faults('u', {})
        self.assertLess(self.tcp().rtt(), SLACK, 'the daemon goes on')

    def test_session_override(self):
        a, b = self.tcp(), self.tcp()
        a.rtt(), b.rtt()
        ida, idb = self.session_of(a, 't'), self.session_of(b, 't')
        self.faults('t', {'both': {'latency_ms': 150}})
        js = self.put('/api/3/sessions/%d/faults' % ida, {'to_server': {'latency_ms': 0}})
        self.assertTrue(js['own'])
        self.assertLess(a.rtt(), 0.1 + SLACK / 2, 'a has its own faults: none')
        self.assertDelay(b.rtt(), 300)
        self.assertFalse(self.get('/api/3/sessions/%d/faults' % idb)['own'])
        self.assertEqual(self.get('/api/3/sessions/%d/faults' % idb)['to_server'],
                         dirs(latency_ms=150))
        js = self.put('/api/3/sessions/%d/faults' % ida, {})   # back to the pipeline's
        self.assertFalse(js['own'])
        self.assertDelay(a.rtt(), 300)
        # a session's own freeze ends by itself at its bound, logged
        mark = self.d.mark()
        self.put('/api/3/sessions/%d/faults' % idb, {'to_server': {'freeze': True},
                                                     'freeze_max_ms': 300})
        self.assertGreaterEqual(b.rtt(b'thaw'), 0.2)
        self.d.wait_line(r'session %d: the freeze ended after FreezeMaxMs \(300 ms\)' % idb,
                         since=mark, timeout=5)
        self.assertFalse(self.get('/api/3/sessions/%d/faults' % idb)['to_server']['freeze'])
        # a session's own faults alone wake the stage too
        self.faults('t', {})
        self.put('/api/3/sessions/%d/faults' % idb, {'to_client': {'latency_ms': 120}})
        self.assertDelay(b.rtt(), 120)
        self.assertLess(a.rtt(), SLACK)

    def test_bad_input(self):
        bad = [
            ({'to_server': {'loss': 1.5}}, 'to_server.loss'),
            ({'to_server': {'loss': 'x'}}, 'to_server.loss'),
            ({'to_client': {'latency_ms': -1}}, 'to_client.latency_ms'),
            ({'to_client': {'latency_ms': 300001}}, 'to_client.latency_ms'),
            ({'to_client': {'jitter_ms': 1.5}}, 'to_client.jitter_ms'),
            ({'both': {'freeze': 1}}, 'both.freeze'),
            ({'both': {'blackhole': 'yes'}}, 'both.blackhole'),
            ({'both': {'speed': 1}}, 'both.speed'),
            ({'to_server': 5}, 'to_server'),
            ({'both': {}, 'to_server': {}}, 'both'),
            ({'seed': -1}, 'seed'),
            ({'freeze_max_ms': 600001}, 'freeze_max_ms'),
            ({'direction': 'both'}, 'direction'),
        ]
        for body, field in bad:
            with self.subTest(body=body):
                st, js, raw, _ = self.d.request('PUT', '/api/3/pipelines/t/faults', body=body)
                self.assertEqual(st, 400, raw)
                self.assertEqual(js['error']['code'], 'bad_request')
                self.assertEqual(js['error']['field'], field)
                self.assertIn(field, js['error']['message'])
        st, js, raw, _ = self.d.request('PUT', '/api/3/pipelines/t/faults',
                                        body='{"seed": 1, "seed": 2}')
        self.assertEqual((st, js['error']['code']), (400, 'bad_json'))
        st, js, raw, _ = self.d.request('PUT', '/api/3/sessions/abc/faults', body={})
        self.assertEqual((st, js['error']['field']), (400, 'id'))
        # nothing was changed by the refused bodies
        self.assertEqual(self.get('/api/3/pipelines/t/faults')['to_server'], dirs())
        for path, code, says in (
                ('/api/3/pipelines/nope/faults', 'pipeline_not_found', "no pipeline named 'nope'"),
                ('/api/3/pipelines/nf/faults', 'fault_stage_not_found', 'no fault stage'),
                ('/api/3/sessions/987654/faults', 'session_not_found', 'no session 987654')):
            for m in ('GET', 'PUT'):
                st, js, raw, _ = self.d.request(m, path, body={})
                self.assertEqual((st, js['error']['code']), (404, code), raw)
                self.assertIn(says, js['error']['message'])
        c = self.tcp('nf')
        c.rtt()
        st, js, raw, _ = self.d.request('GET', '/api/3/sessions/%d/faults'
                                        % self.session_of(c, 'nf'))
        self.assertEqual((st, js['error']['code']), (404, 'fault_stage_not_found'), raw)

    def test_permissions(self):
        ro = self.d.make_key(['CheckStatus'], name='ro')
        rc = self.d.make_key(['Reconfigure'], name='rc')
        path = '/api/3/pipelines/t/faults'
        st, js, raw, _ = self.d.request('PUT', path, body={'both': {'loss': 0.5}}, key=ro)
        self.assertEqual((st, js['error']['code']), (403, 'forbidden'))
        self.assertIn('Reconfigure', js['error']['message'])
        self.get(path, key=ro)
        st, js, raw, _ = self.d.request('GET', path, key=rc)
        self.assertEqual(st, 403)
        self.put(path, {'both': {'loss': 0.5}}, key=rc)
        self.assertEqual(self.get(path)['to_client']['loss'], 0.5)
        st, _, _, _ = self.d.request('PUT', path, body={}, key=None)
        self.assertEqual(st, 401)

    def test_kind_hold_defaults(self):
        js = self.get('/api/3/pipelines/t')
        item = js['config']['through'][0]['fault']
        self.assertEqual(item['hold_window'], 65536)
        self.assertEqual(item['hold_timeout_ms'], 3600000)
        self.assertEqual(item['freeze_max_ms'], 10000)
        self.assertEqual(item['direction'], 'both')


class FaultReloadCase(unittest.TestCase):
    """A daemon of its own: YAML values, SIGHUP, and the zero-copy path (debug log)."""

    def daemon(self, cfg):
        d = ApiDaemon(cfg)
        self.addCleanup(self.stop, d)
        d.start()
        return d

    def stop(self, d):
        rc = d.stop()
        if rc != 0:
            raise AssertionError('daemon exit status %r\n%s' % (rc, d.tail()))

    def setUp(self):
        self.echo = TcpEchoServer()
        self.addCleanup(self.echo.stop)

    def config(self, item, level='info'):
        return ('Workers: 2\nLogging: {Level: %s}\nPipelines:\n' % level
                + pipe('r', 'tcp', self.echo.port, through='[{fault: %s}]' % item))

    def test_yaml_and_sighup(self):
        d = self.daemon(self.config('{LatencyMs: 100, Direction: to_server}'))
        c = Tcp(d.port('r'))
        self.addCleanup(c.close)
        took = c.rtt()
        self.assertTrue(0.099 <= took < 0.1 + SLACK, took)
        st, js, _, _ = d.request('GET', '/api/3/pipelines/r/faults')
        self.assertEqual(js['to_server']['latency_ms'], 100)
        self.assertEqual(js['to_client']['latency_ms'], 0)
        # a live change through the API, then a reload that leaves the YAML alone keeps it
        d.request('PUT', '/api/3/pipelines/r/faults', body={'to_client': {'latency_ms': 150}})
        with open(d.config_path) as f:
            text = f.read()
        applied, line = d.reload(text)
        self.assertTrue(applied, line)
        took = c.rtt()
        self.assertTrue(0.149 <= took < 0.15 + SLACK, took)
        # a reload that changes the item replaces the live faults, mid-stream
        applied, line = d.reload(text.replace('{LatencyMs: 100, Direction: to_server}',
                                              '{LatencyMs: 200, Direction: to_client}'))
        self.assertTrue(applied, line)
        took = c.rtt()
        self.assertTrue(0.199 <= took < 0.2 + SLACK, took)
        st, js, _, _ = d.request('GET', '/api/3/pipelines/r/faults')
        self.assertEqual((js['to_server']['latency_ms'], js['to_client']['latency_ms']), (0, 200))
        # a bad value is refused with the key named; the running config stays
        applied, line = d.reload(text.replace('LatencyMs: 100', 'Loss: 2'))
        self.assertFalse(applied)
        self.assertIn('Loss', line)
        applied, line = d.reload(text.replace('Direction: to_server', 'Direction: up'))
        self.assertFalse(applied)
        self.assertIn('Direction', line)
        self.assertTrue(0.199 <= c.rtt() < 0.2 + SLACK)

    def test_dormant_stage_keeps_the_zero_copy_path(self):
        d = self.daemon(self.config('{}', level='debug'))
        c = Tcp(d.port('r'))
        self.addCleanup(c.close)
        on = r'session (\d+) on the zero-copy path'
        self.assertLess(c.rtt(), SLACK)
        sid = d.wait_line(on, timeout=5).group(1)
        mark = d.mark()
        d.request('PUT', '/api/3/pipelines/r/faults', body={'both': {'latency_ms': 50}})
        d.wait_line(r'session %s left the zero-copy path' % sid, since=mark, timeout=5)
        self.assertGreaterEqual(c.rtt(), 0.099)
        mark = d.mark()
        d.request('PUT', '/api/3/pipelines/r/faults', body={})
        d.wait_line(r'session %s on the zero-copy path' % sid, since=mark, timeout=5)
        self.assertLess(c.rtt(), SLACK)


if __name__ == '__main__':
    unittest.main(verbosity=2)
