"""Black-box integration tests for the ezproxy daemon (DESIGN.md sections 3, 5, 6).

Run from the repository root:
    python3 -m unittest tests/integration/test_daemon.py -v
    python3 tests/integration/test_daemon.py
The binary is $EZP_BIN or build/ezproxy; set EZP_SHOW_LOG=1 to print every
daemon's stderr, not only for failed tests.
"""

import hashlib
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (HOST, Deadline, HashSink, LogOnFailure, Proc,  # noqa: E402
                     TcpEchoServer, UdpEchoServer, echo_once, ezproxy_bin, free_port,
                     pattern, pattern_chunks, pattern_sha256, recv_exact, recv_until_eof,
                     rss_kib, tcp_roundtrip, udp_roundtrip, wait_tcp_port)

MiB = 1 << 20


def config(*pipelines, workers=2, level='info'):
    return ('Workers: %d\nApi: {Enable: false}\nLogging: {Level: %s}\nPipelines:\n%s\n'
            % (workers, level, '\n'.join(pipelines)))


def tcp_pipe(name, to_port, listen='127.0.0.1:0'):
    return ('  - Name: %s\n    From: {tcp: {Listen: "%s"}}\n'
            '    To: {tcp: {Connect: "127.0.0.1:%d"}}' % (name, listen, to_port))


def udp_pipe(name, to_port, listen='127.0.0.1:0', idle_ms=None):
    idle = ', IdleTimeoutMs: %d' % idle_ms if idle_ms else ''
    return ('  - Name: %s\n    From: {udp: {Listen: "%s"%s}}\n'
            '    To: {udp: {Connect: "127.0.0.1:%d"}}' % (name, listen, idle, to_port))


def transfer(port, seed_up, n_up, seed_down, n_down, timeout=90.0):
    """One connection through a HashSink: send header + n_up pattern bytes while
    receiving n_down bytes; returns a dict with what the client saw."""
    out = {'send_error': None}
    d = Deadline(timeout)
    s = socket.create_connection((HOST, port), timeout=10)
    try:
        def send():
            try:
                s.sendall(HashSink.header(seed_down, n_down))
                for c in pattern_chunks(seed_up, n_up):
                    s.sendall(c)
                s.shutdown(socket.SHUT_WR)
            except OSError as e:
                out['send_error'] = repr(e)

        t = threading.Thread(target=send, daemon=True)
        t.start()
        h = hashlib.sha256()
        _, count, how = recv_until_eof(s, d, hasher=h, keep=False)
        t.join(d.left())
        out.update(received=count, sha256=h.hexdigest(), end=how,
                   sender_done=not t.is_alive())
        return out
    finally:
        s.close()


def expect_closed(test, sock, timeout=10.0, what='proxy'):
    """The peer ends the connection: recv gives b'' or ECONNRESET within timeout."""
    data, _, how = recv_until_eof(sock, Deadline(timeout))
    test.assertIn(how, ('eof', 'reset'),
                  '%s did not close the client connection within %.0fs (got %d bytes)'
                  % (what, timeout, len(data)))
    return data, how


def connect_refused(port, timeout=5.0):
    """True once connecting to port is refused (bounded poll: a closed listener has no event)."""
    d = Deadline(timeout)
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        except OSError:
            pass
        if d.expired():
            return False
        threading.Event().wait(0.05)


class Base(LogOnFailure, unittest.TestCase):
    def tcp_echo(self, port=0):
        e = TcpEchoServer(port)
        self.addCleanup(e.stop)
        return e

    def udp_echo(self, port=0):
        e = UdpEchoServer(port)
        self.addCleanup(e.stop)
        return e

    def sink(self, mode='concurrent'):
        s = HashSink(mode=mode)
        self.addCleanup(s.stop)
        return s

    def connect(self, port, timeout=10.0):
        s = socket.create_connection((HOST, port), timeout=timeout)
        self.addCleanup(s.close)
        return s

    def udp_socket(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((HOST, 0))
        self.addCleanup(s.close)
        return s


# 1 -----------------------------------------------------------------------------------------
class T01TcpIntegrity(Base):
    def check_transfer(self, sink, res, seed_up, n_up, seed_down, n_down, records):
        self.assertIsNone(res['send_error'], 'client send failed')
        self.assertEqual(res['end'], 'eof', 'client stream did not end with EOF')
        self.assertEqual(res['received'], n_down, 'bytes server->client')
        self.assertEqual(res['sha256'], pattern_sha256(seed_down, n_down),
                         'server->client bytes differ (sha256)')
        rec = [r for r in records if r.get('seed') == seed_down]
        self.assertEqual(len(rec), 1, 'sink records: %r' % records)
        rec = rec[0]
        self.assertEqual(rec['received'], 16 + n_up, 'bytes client->server')
        self.assertEqual(rec['sha256'],
                         pattern_sha256(seed_up, n_up, HashSink.header(seed_down, n_down)),
                         'client->server bytes differ (sha256)')
        self.assertEqual(rec['sent'], n_down)

    def test_64MiB_each_way_one_connection(self):
        sink = self.sink('concurrent')
        d = self.daemon(config(tcp_pipe('t', sink.port)))
        n = 64 * MiB
        mark = d.mark()
        res = transfer(d.port('t'), 11, n, 12, n, timeout=120)
        records = sink.wait_records(1, timeout=30)
        self.check_transfer(sink, res, 11, n, 12, n, records)
        c = d.wait_closes(1, since=mark, pipeline='t', timeout=10)[0]
        self.assertEqual((c.to_server, c.to_client), (16 + n, n),
                         'byte counters in the close line: %r' % c)

    def test_several_connections_at_once(self):
        sink = self.sink('concurrent')
        d = self.daemon(config(tcp_pipe('t', sink.port)))
        k, n = 8, 4 * MiB
        results = [None] * k

        def one(i):
            results[i] = transfer(d.port('t'), 100 + i, n + i, 200 + i, n - i, timeout=90)

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(k)]
        for t in threads:
            t.start()
        dl = Deadline(100)
        for t in threads:
            t.join(dl.left())
        self.assertTrue(all(r is not None for r in results), 'transfers did not finish')
        records = sink.wait_records(k, timeout=30)
        self.assertEqual(sink.peak >= 2, True, 'connections never overlapped')
        for i in range(k):
            with self.subTest(connection=i):
                self.check_transfer(sink, results[i], 100 + i, n + i, 200 + i, n - i, records)


# 2 -----------------------------------------------------------------------------------------
class T02HalfClose(Base):
    def test_client_half_close_server_replies_after_eof(self):
        sink = self.sink('after_eof')
        d = self.daemon(config(tcp_pipe('t', sink.port)))
        up, down = 1 * MiB, 3 * MiB
        s = self.connect(d.port('t'))
        s.sendall(HashSink.header(21, down))
        for c in pattern_chunks(20, up):
            s.sendall(c)
        s.shutdown(socket.SHUT_WR)
        h = hashlib.sha256()
        _, count, how = recv_until_eof(s, Deadline(30), hasher=h, keep=False)
        self.assertEqual(how, 'eof')
        self.assertEqual(count, down, 'reply sent after the client EOF was cut short')
        self.assertEqual(h.hexdigest(), pattern_sha256(21, down))
        rec = sink.wait_records(1, timeout=10)[0]
        self.assertTrue(rec.get('eof'), 'server never saw the client EOF')
        self.assertEqual(rec['sha256'], pattern_sha256(20, up, HashSink.header(21, down)))

    def test_server_half_close_client_keeps_sending(self):
        sink = self.sink('reply_first')
        d = self.daemon(config(tcp_pipe('t', sink.port)))
        up, down = 2 * MiB, 1 * MiB
        s = self.connect(d.port('t'))
        s.sendall(HashSink.header(31, down))
        h = hashlib.sha256()
        _, count, how = recv_until_eof(s, Deadline(30), hasher=h, keep=False)
        self.assertEqual((how, count), ('eof', down), 'server reply then EOF')
        self.assertEqual(h.hexdigest(), pattern_sha256(31, down))
        # the server only closed its sending side: the client can still send
        for c in pattern_chunks(30, up):
            s.sendall(c)
        s.shutdown(socket.SHUT_WR)
        rec = sink.wait_records(1, timeout=20)
        self.assertEqual(len(rec), 1, 'server did not see the client EOF after its own')
        self.assertEqual(rec[0]['received'], 16 + up)
        self.assertEqual(rec[0]['sha256'], pattern_sha256(30, up, HashSink.header(31, down)))


    def test_send_and_close_at_once(self):
        """Bytes sent before the server leg exists, then a full close: all delivered."""
        sink = self.sink('after_eof')
        d = self.daemon(config(tcp_pipe('t', sink.port)))
        n, k = 200000, 30
        for i in range(k):
            s = socket.create_connection((HOST, d.port('t')), timeout=10)
            s.sendall(HashSink.header(i, 0) + pattern(i, n))
            s.close()
        recs = sink.wait_records(k, timeout=20)
        self.assertEqual(len(recs), k, 'connections that reached the server')
        for r in recs:
            self.assertEqual((r['received'], r['sha256']),
                             (16 + n, pattern_sha256(r['seed'], n, HashSink.header(r['seed'], 0))),
                             'connection %s lost or changed bytes' % r.get('seed'))

# 3 -----------------------------------------------------------------------------------------
class T03UdpIntegrity(Base):
    def test_datagram_sizes_whole(self):
        echo = self.udp_echo()
        d = self.daemon(config(udp_pipe('u', echo.port)))
        s = self.udp_socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        for size in (0, 1, 1400, 8192, 65507):
            with self.subTest(size=size):
                payload = pattern(1000 + size, size)
                s.sendto(payload, (HOST, d.port('u')))
                s.settimeout(3)
                try:
                    data, peer = s.recvfrom(70000)
                except socket.timeout:
                    self.fail('no echo of a %d-byte datagram within 3s' % size)
                self.assertEqual(peer, (HOST, d.port('u')))
                self.assertEqual(len(data), size)
                self.assertEqual(data, payload)

    def test_windowed_2000_datagrams_in_order(self):
        echo = self.udp_echo()
        d = self.daemon(config(udp_pipe('u', echo.port)))
        clients, total, window, size = 4, 2000, 64, 512
        results = [None] * clients

        def run(ci):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                s.bind((HOST, 0))
                body = pattern(5000 + ci, size - 8)
                got, bad, sent = [], 0, 0
                dl = Deadline(40)
                while len(got) < total and not dl.expired():
                    while sent < total and sent - len(got) < window:
                        s.sendto(struct.pack('!II', ci, sent) + body, (HOST, d.port('u')))
                        sent += 1
                    s.settimeout(2)
                    try:
                        data = s.recv(4096)
                    except socket.timeout:
                        break  # loss: the window never drains
                    if len(data) != size or data[8:] != body or \
                            struct.unpack('!I', data[:4])[0] != ci:
                        bad += 1
                    got.append(struct.unpack('!I', data[4:8])[0])
                results[ci] = (sent, got, bad)
            finally:
                s.close()

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        dl = Deadline(60)
        for t in threads:
            t.join(dl.left())
        for ci in range(clients):
            with self.subTest(client=ci):
                self.assertIsNotNone(results[ci], 'client thread did not finish')
                sent, got, bad = results[ci]
                self.assertEqual(bad, 0, 'datagrams with wrong size/content/client tag')
                missing = sorted(set(range(total)) - set(got))
                self.assertEqual(missing, [], 'lost %d of %d datagrams (first: %s)'
                                 % (len(missing), total, missing[:10]))
                self.assertEqual(got, list(range(total)), 'datagrams reordered')

    def test_server_burst_in_order(self):
        """One request, 50 datagrams back-to-back from the server: all arrive, in order."""
        srv = self.udp_socket()
        srv.settimeout(10)

        def burst():
            try:
                data, peer = srv.recvfrom(100)
                for i in range(int(data)):
                    srv.sendto(struct.pack('!I', i) + pattern(i, 996), peer)
            except OSError:
                pass

        t = threading.Thread(target=burst, daemon=True)
        t.start()
        d = self.daemon(config(udp_pipe('u', srv.getsockname()[1])))
        c = self.udp_socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        c.sendto(b'50', (HOST, d.port('u')))
        got = []
        c.settimeout(2)
        try:
            while len(got) < 50:
                data = c.recv(2000)
                i = struct.unpack('!I', data[:4])[0]
                self.assertEqual(data[4:], pattern(i, 996))
                got.append(i)
        except socket.timeout:
            pass
        t.join(5)
        self.assertEqual(got, list(range(50)))


# 4 -----------------------------------------------------------------------------------------
class T04ManySessions(Base):
    N = 200

    def test_tcp_200_concurrent_no_crosstalk(self):
        echo = self.tcp_echo()
        d = self.daemon(config(tcp_pipe('t', echo.port)))
        mark = d.mark()
        socks = [self.connect(d.port('t')) for _ in range(self.N)]
        self.assertTrue(echo.wait_active(lambda a: a >= self.N, timeout=20),
                        'only %d of %d sessions reached the server' % (echo.active, self.N))
        payloads = [b'client-%04d:' % i + pattern(7000 + i, 1000 + 37 * i)
                    for i in range(self.N)]
        for s, p in zip(socks, payloads):
            s.sendall(p)
        dl = Deadline(30)
        for i, (s, p) in enumerate(zip(socks, payloads)):
            got = recv_exact(s, len(p), dl)
            if got != p:
                self.fail('session %d got %d bytes, not its own echo (starts %r)'
                          % (i, len(got), got[:16]))
        for s in socks:
            s.shutdown(socket.SHUT_WR)
        for i, s in enumerate(socks):
            rest, _, how = recv_until_eof(s, dl)
            self.assertEqual((how, bytes(rest)), ('eof', b''), 'session %d end' % i)
            s.close()
        closes = d.wait_closes(self.N, since=mark, pipeline='t', timeout=20)
        self.assertEqual(len({c.id for c in closes}), self.N, 'session ids not unique')
        sizes = sorted(len(p) for p in payloads)
        self.assertEqual(sorted(c.to_server for c in closes), sizes)
        self.assertEqual(sorted(c.to_client for c in closes), sizes)

    def test_udp_200_clients_no_crosstalk(self):
        echo = self.udp_echo()
        d = self.daemon(config(udp_pipe('u', echo.port)))
        socks = [self.udp_socket() for _ in range(self.N)]
        for rnd in range(3):
            payloads = [b'c%04d-r%d:' % (i, rnd) + pattern(9000 + i * 3 + rnd, 200 + i)
                        for i in range(self.N)]
            for s, p in zip(socks, payloads):
                s.sendto(p, (HOST, d.port('u')))
            for i, (s, p) in enumerate(zip(socks, payloads)):
                s.settimeout(3)
                try:
                    got = s.recv(70000)
                except socket.timeout:
                    self.fail('round %d: client %d got no echo within 3s' % (rnd, i))
                self.assertEqual(got, p, 'round %d: client %d got another datagram' % (rnd, i))
        with echo.lock:
            peers = len(echo.peers)
        self.assertGreaterEqual(peers, self.N,
                                'the server saw %d upstream addresses for %d clients '
                                '(one connected upstream socket per session expected)'
                                % (peers, self.N))


# 5 -----------------------------------------------------------------------------------------
class T05ServerAway(Base):
    def test_connect_failed_then_server_returns(self):
        port = free_port()
        d = self.daemon(config(tcp_pipe('t', port)))
        mark = d.mark()
        for i in range(3):
            s = self.connect(d.port('t'))
            try:
                s.sendall(b'hello')
            except OSError:
                pass  # the proxy may already have closed it
            expect_closed(self, s, timeout=10, what='proxy with no server (client %d)' % i)
            s.close()
        closes = d.wait_closes(3, since=mark, pipeline='t', reasons={'connect failed'},
                               timeout=10)
        self.assertEqual(len(closes), 3)
        echo = self.tcp_echo(port)
        self.assertEqual(tcp_roundtrip(d.port('t'), b'back again' * 1000), b'back again' * 1000)
        self.assertTrue(d.alive())

    def _kill_server_mid_session(self, abort):
        echo = self.tcp_echo()
        d = self.daemon(config(tcp_pipe('t', echo.port)))
        s = self.connect(d.port('t'))
        self.assertEqual(echo_once(s, b'x' * 5000), b'x' * 5000)
        self.assertTrue(echo.wait_accepted(1))
        mark = d.mark()
        echo.stop(abort=abort)
        _, how = expect_closed(self, s, timeout=10, what='proxy after the server died')
        s.close()
        c = d.wait_closes(1, since=mark, pipeline='t', timeout=10)[0]
        self.assertIn(c.reason, ('server closed', 'error'), repr(c))
        self.assertEqual((c.to_server, c.to_client), (5000, 5000), repr(c))
        return d

    def test_server_killed_with_reset(self):
        self._kill_server_mid_session(abort=True)

    def test_server_killed_with_fin(self):
        d = self._kill_server_mid_session(abort=False)
        # the listener still serves: a new client with no server gets closed, logged
        mark = d.mark()
        s = self.connect(d.port('t'))
        expect_closed(self, s, timeout=10)
        d.wait_closes(1, since=mark, reasons={'connect failed'}, timeout=10)

    def test_udp_server_down_then_up(self):
        port = free_port(socket.SOCK_DGRAM)
        d = self.daemon(config(udp_pipe('u', port)))
        s = self.udp_socket()
        for i in range(3):  # nobody listens: no answer, and the daemon stays up
            s.sendto(b'nobody %d' % i, (HOST, d.port('u')))
        s.settimeout(0.5)
        with self.assertRaises(socket.timeout):
            s.recv(100)
        self.assertTrue(d.alive())
        self.udp_echo(port)
        dl, got = Deadline(5), None
        while got is None and not dl.expired():  # bounded: a datagram may be lost once
            s.sendto(b'back', (HOST, d.port('u')))
            s.settimeout(1)
            try:
                got = s.recv(100)
            except socket.timeout:
                pass
        self.assertEqual(got, b'back', 'the same client never got through after the '
                         'server came back')

    def test_connect_timeout(self):
        # a listener whose accept queue is full drops SYNs: connects to it hang
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(srv.close)
        srv.bind((HOST, 0))
        srv.listen(0)
        port = srv.getsockname()[1]
        for _ in range(4):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.addCleanup(c.close)
            c.setblocking(False)
            try:
                c.connect((HOST, port))
            except BlockingIOError:
                pass
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect((HOST, port))
            self.skipTest('this kernel completes connects to a full accept queue')
        except socket.timeout:
            pass
        finally:
            probe.close()
        d = self.daemon(config('  - Name: t\n    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
                               '    To: {tcp: {Connect: "127.0.0.1:%d", ConnectTimeoutMs: 300}}'
                               % port))
        mark = d.mark()
        s = self.connect(d.port('t'))
        dl = Deadline(5)
        expect_closed(self, s, timeout=5, what='proxy with a server that never answers')
        self.assertGreater(dl.left(), 3.0, 'ConnectTimeoutMs 300 took %.1fs' % (5 - dl.left()))
        c = d.wait_closes(1, since=mark, pipeline='t', timeout=5)[0]
        self.assertEqual(c.reason, 'connect failed', repr(c))
        # a client that gives up while the connect is pending
        mark = d.mark()
        s = socket.create_connection((HOST, d.port('t')), timeout=5)
        s.sendall(b'abc')
        s.close()
        c = d.wait_closes(1, since=mark, pipeline='t', timeout=5)[0]
        self.assertIn(c.reason, ('connect failed', 'client closed'), repr(c))
        self.assertTrue(d.alive())

    def test_client_reset(self):
        echo = self.tcp_echo()
        d = self.daemon(config(tcp_pipe('t', echo.port)))
        s = socket.create_connection((HOST, d.port('t')), timeout=10)
        self.assertEqual(echo_once(s, b'hi'), b'hi')
        self.assertTrue(echo.wait_active(lambda a: a == 1))
        mark = d.mark()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        s.close()  # RST
        self.assertTrue(echo.wait_active(lambda a: a == 0, timeout=10),
                        'the server connection outlived a client reset')
        c = d.wait_closes(1, since=mark, pipeline='t', timeout=10)[0]
        self.assertIn(c.reason, ('client closed', 'error'), repr(c))
        self.assertEqual(tcp_roundtrip(d.port('t'), b'next'), b'next')

    def test_client_drops_and_reconnects(self):
        echo = self.tcp_echo()
        d = self.daemon(config(tcp_pipe('t', echo.port)))
        for i in range(3):
            mark = d.mark()
            s = socket.create_connection((HOST, d.port('t')), timeout=10)
            payload = b'round %d ' % i * 300
            self.assertEqual(echo_once(s, payload), payload)
            s.close()
            c = d.wait_closes(1, since=mark, pipeline='t', timeout=10)[0]
            self.assertEqual(c.reason, 'client closed', repr(c))
            self.assertEqual((c.to_server, c.to_client), (len(payload), len(payload)))


# 6 -----------------------------------------------------------------------------------------
class T06UdpIdle(Base):
    def test_idle_timeout_and_new_session(self):
        echo = self.udp_echo()
        d = self.daemon(config(udp_pipe('u', echo.port, idle_ms=500)))
        s = self.udp_socket()
        mark = d.mark()
        self.assertEqual(udp_roundtrip(d.port('u'), b'one', sock=s), b'one')
        first = d.wait_closes(1, since=mark, pipeline='u', timeout=5)[0]
        self.assertEqual(first.reason, 'idle', repr(first))
        self.assertEqual((first.to_server, first.to_client), (3, 3))
        mark = d.mark()
        self.assertEqual(udp_roundtrip(d.port('u'), b'second', sock=s), b'second',
                         'datagram after the idle close')
        second = d.wait_closes(1, since=mark, pipeline='u', timeout=5)[0]
        self.assertEqual(second.reason, 'idle', repr(second))
        self.assertNotEqual(second.id, first.id, 'a new session was expected')
        self.assertEqual((second.to_server, second.to_client), (6, 6))


    def test_activity_keeps_session_alive(self):
        echo = self.udp_echo()
        d = self.daemon(config(udp_pipe('u', echo.port, idle_ms=500)))
        s = self.udp_socket()
        mark = d.mark()
        stop = Deadline(1.6)
        n = 0
        while not stop.expired():  # one datagram every ~100 ms, well inside 500 ms
            self.assertEqual(udp_roundtrip(d.port('u'), b'k%d' % n, sock=s), b'k%d' % n)
            n += 1
            threading.Event().wait(0.1)
        self.assertEqual(d.closes(mark), [], 'an active session was closed')
        c = d.wait_closes(1, since=mark, pipeline='u', timeout=5)[0]
        self.assertEqual(c.reason, 'idle')
        self.assertEqual(len(d.closes(mark)), 1, 'more than one session for one client')


# 7 -----------------------------------------------------------------------------------------
class T07Reload(Base):
    def test_add_rebind_remove_and_refused(self):
        echo = self.tcp_echo()
        a = tcp_pipe('a', echo.port)
        d = self.daemon(config(a))
        old_port = d.port('a')
        ok = lambda port, tag: self.assertEqual(tcp_roundtrip(port, tag * 100), tag * 100)  # noqa
        ok(old_port, b'a0')

        # add a pipeline
        b = tcp_pipe('b', echo.port)
        applied, line = d.reload(config(a, b))
        self.assertTrue(applied, line)
        d.wait_pipelines(['b'], timeout=5)
        b_port = d.port('b')
        ok(b_port, b'b1')
        ok(old_port, b'a1')

        # change a's Listen: rebind; an existing session keeps working
        live = self.connect(old_port)
        self.assertEqual(echo_once(live, b'before'), b'before')
        new_port = free_port()
        a2 = tcp_pipe('a', echo.port, listen='127.0.0.1:%d' % new_port)
        mark = d.mark()
        applied, line = d.reload(config(a2, b))
        self.assertTrue(applied, line)
        d.wait_line(r"pipeline 'a' now listens on 127\.0\.0\.1:%d" % new_port, since=mark,
                    timeout=5)
        ok(new_port, b'a2')
        self.assertTrue(connect_refused(old_port), 'old Listen port still accepts')
        self.assertEqual(echo_once(live, b'after rebind'), b'after rebind',
                         'session on the old listener broke on rebind')
        ok(b_port, b'b2')

        # remove b
        mark = d.mark()
        applied, line = d.reload(config(a2))
        self.assertTrue(applied, line)
        d.wait_line(r"pipeline 'b' removed", since=mark, timeout=5)
        self.assertTrue(connect_refused(b_port), 'removed pipeline still accepts')
        ok(new_port, b'a3')

        # an invalid file changes nothing
        bad = config(a2 + '\n    Bogus: 1', tcp_pipe('c', echo.port))
        bad_line = bad.splitlines().index('    Bogus: 1') + 1
        mark = d.mark()
        applied, line = d.reload(bad)
        self.assertFalse(applied, line)
        self.assertIn('reload refused, nothing changed: %s:%d:5:' % (d.config_path, bad_line),
                      line)
        self.assertIn('Bogus', line)
        ok(new_port, b'a4')
        self.assertEqual(echo_once(live, b'after refused'), b'after refused')
        self.assertTrue(connect_refused(b_port, timeout=1))
        self.assertNotIn("pipeline 'c'", '\n'.join(d.lines[mark:]))
        self.assertTrue(d.alive())

    def test_change_to_affects_new_sessions_only(self):
        one, two = self.tcp_echo(), self.tcp_echo()
        d = self.daemon(config(tcp_pipe('a', one.port)))
        port = d.port('a')
        live = self.connect(port)
        self.assertEqual(echo_once(live, b'first'), b'first')
        self.assertTrue(one.wait_accepted(1))
        applied, line = d.reload(config(tcp_pipe('a', two.port)))
        self.assertTrue(applied, line)
        self.assertIn('1 changed', line)
        self.assertEqual(d.port('a'), port)
        self.assertEqual(tcp_roundtrip(port, b'new session'), b'new session')
        self.assertEqual((one.accepted, two.accepted), (1, 1),
                         'the new session should go to the new To, only')
        self.assertEqual(echo_once(live, b'still here'), b'still here',
                         'existing session lost its server on a To change')
        self.assertEqual(one.active, 1, 'existing session moved off its server')

    def test_unchanged_reload_keeps_everything(self):
        echo = self.tcp_echo()
        uecho = self.udp_echo()
        text = config(tcp_pipe('a', echo.port), udp_pipe('u', uecho.port))
        d = self.daemon(text)
        ports = (d.port('a'), d.port('u'))
        live = self.connect(ports[0])
        self.assertEqual(echo_once(live, b'x'), b'x')
        u = self.udp_socket()
        self.assertEqual(udp_roundtrip(ports[1], b'u1', sock=u), b'u1')
        mark = d.mark()
        applied, line = d.reload(text)
        self.assertTrue(applied, line)
        self.assertIn('0 added, 0 changed, 0 removed', line)
        self.assertEqual((d.port('a'), d.port('u')), ports)
        self.assertEqual(echo_once(live, b'y'), b'y')
        self.assertEqual(udp_roundtrip(ports[1], b'u2', sock=u), b'u2')
        self.assertEqual(d.closes(mark), [], 'sessions closed by a no-op reload')

    def test_reload_to_busy_port_changes_nothing(self):
        echo = self.tcp_echo()
        a = tcp_pipe('a', echo.port)
        d = self.daemon(config(a))
        old_port = d.port('a')
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(busy.close)
        busy.bind((HOST, 0))
        busy.listen(1)
        busy_port = busy.getsockname()[1]
        b_port = free_port()
        # b (new, valid) comes first so that it is planned before a's bind fails
        text = config(tcp_pipe('b', echo.port, listen='127.0.0.1:%d' % b_port),
                      tcp_pipe('a', echo.port, listen='127.0.0.1:%d' % busy_port))
        applied, line = d.reload(text)
        self.assertFalse(applied, 'reload onto a port in use was applied: ' + line)
        self.assertIn('reload refused, nothing changed', line)
        self.assertEqual(tcp_roundtrip(old_port, b'still'), b'still')
        self.assertTrue(connect_refused(b_port, timeout=2),
                        'pipeline b of a refused reload accepts connections')
        # and a later valid reload still works
        applied, line = d.reload(config(a, tcp_pipe('b', echo.port)))
        self.assertTrue(applied, line)
        d.wait_pipelines(['b'], timeout=5)
        self.assertEqual(tcp_roundtrip(d.port('b'), b'b ok'), b'b ok')

    def test_remove_with_live_session_then_readd(self):
        echo = self.tcp_echo()
        a = tcp_pipe('a', echo.port)
        b = tcp_pipe('b', echo.port)
        d = self.daemon(config(a, b))
        live = self.connect(d.port('b'))
        self.assertEqual(echo_once(live, b'live'), b'live')
        mark = d.mark()
        applied, line = d.reload(config(a))
        self.assertTrue(applied, line)
        # the live session either goes on or is closed cleanly and logged
        try:
            got = echo_once(live, b'again', timeout=3)
        except OSError:
            got = None
        if got != b'again':
            self.assertIn(got, (None, b''), 'session of a removed pipeline returned garbage')
            d.wait_closes(1, since=mark, pipeline='b', timeout=5)
        self.assertTrue(d.alive())
        applied, line = d.reload(config(a, b))
        self.assertTrue(applied, line)
        d.wait_line(r"pipeline 'b': tcp", since=mark, timeout=5)
        self.assertEqual(tcp_roundtrip(d.port('b'), b'readded'), b'readded')
        self.assertEqual(tcp_roundtrip(d.port('a'), b'a'), b'a')

    def test_kind_change_tcp_to_udp(self):
        tcp, udp = self.tcp_echo(), self.udp_echo()
        d = self.daemon(config(tcp_pipe('x', tcp.port)))
        self.assertEqual(tcp_roundtrip(d.port('x'), b't'), b't')
        mark = d.mark()
        applied, line = d.reload(config(udp_pipe('x', udp.port)))
        self.assertTrue(applied, line)
        m = d.wait_line(r"pipeline 'x'(: udp| now listens on) ", since=mark, timeout=5)
        self.assertEqual(udp_roundtrip(d.port('x'), b'u'), b'u', m.string)

    def test_reloads_under_traffic(self):
        echo, uecho = self.tcp_echo(), self.udp_echo()
        a, u = tcp_pipe('a', echo.port), udp_pipe('u', uecho.port)
        one = config(a, u)
        two = config(a, u, tcp_pipe('b', echo.port))
        d = self.daemon(one)
        stop = threading.Event()
        progress = threading.Condition()
        counts = {'tcp': 0, 'udp': 0}
        errors = []

        def bump(kind):
            with progress:
                counts[kind] += 1
                progress.notify_all()

        def tcp_loop():
            i = 0
            while not stop.is_set() and len(errors) < 5:
                i += 1
                try:
                    p = b'%d' % i * 50
                    if tcp_roundtrip(d.port('a'), p) != p:
                        errors.append('tcp echo differs')
                except (OSError, AssertionError) as e:
                    errors.append('tcp: %r' % e)
                bump('tcp')

        def udp_loop():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((HOST, 0))
            i = 0
            try:
                while not stop.is_set() and len(errors) < 5:
                    i += 1
                    p = b'u%d' % i
                    try:
                        if udp_roundtrip(d.port('u'), p, sock=s, timeout=2) != p:
                            errors.append('udp echo differs')
                    except OSError as e:
                        errors.append('udp: %r' % e)
                    bump('udp')
            finally:
                s.close()

        def wait_progress():
            """Both loops complete at least one more round trip (bounded)."""
            with progress:
                seen = dict(counts)
                ok = progress.wait_for(lambda: all(counts[k] > seen[k] for k in counts)
                                       or errors, 10)
            self.assertTrue(ok, 'traffic stalled during reloads: %r' % counts)

        threads = [threading.Thread(target=f, daemon=True) for f in (tcp_loop, udp_loop)]
        for t in threads:
            t.start()
        try:
            for i in range(20):
                applied, line = d.reload(two if i % 2 == 0 else one)
                self.assertTrue(applied, line)
                wait_progress()
            # a burst of signals without waiting: must neither crash nor wedge
            for i in range(10):
                os.kill(d.proc.pid, signal.SIGHUP)
            wait_progress()
            applied, line = d.reload(one)
            self.assertTrue(applied, line)
            wait_progress()
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        self.assertEqual(errors, [], 'traffic failed during reloads')
        self.assertGreaterEqual(min(counts.values()), 22)
        self.assertTrue(d.alive())

    def test_udp_listen_change(self):
        echo = self.udp_echo()
        d = self.daemon(config(udp_pipe('u', echo.port)))
        old_port = d.port('u')
        self.assertEqual(udp_roundtrip(old_port, b'before'), b'before')
        new_port = free_port(socket.SOCK_DGRAM)
        mark = d.mark()
        applied, line = d.reload(config(udp_pipe('u', echo.port,
                                                 listen='127.0.0.1:%d' % new_port)))
        self.assertTrue(applied, line)
        d.wait_line(r"pipeline 'u' now listens on 127\.0\.0\.1:%d" % new_port, since=mark,
                    timeout=5)
        self.assertEqual(udp_roundtrip(new_port, b'after'), b'after')
        s = self.udp_socket()
        s.connect((HOST, old_port))
        s.send(b'old port')
        s.settimeout(1)
        with self.assertRaises((ConnectionRefusedError, socket.timeout),
                               msg='the old UDP port still answers'):
            s.recv(100)


# 8 -----------------------------------------------------------------------------------------
class T08Check(Base):
    def setUp(self):
        if not os.access(ezproxy_bin(), os.X_OK):
            self.fail('ezproxy binary not found at %s' % ezproxy_bin())
        self.dir = tempfile.mkdtemp(prefix='ezp-check-')
        self.addCleanup(shutil.rmtree, self.dir, True)

    def check(self, text, name='c.yaml'):
        path = os.path.join(self.dir, name)
        with open(path, 'w') as f:
            f.write(text)
        r = subprocess.run([ezproxy_bin(), 'check', path], capture_output=True, text=True,
                           timeout=20)
        return path, r

    def test_good_file(self):
        path, r = self.check(config(tcp_pipe('t', 9), udp_pipe('u', 9, idle_ms=500)))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('Pipelines:', r.stdout)
        self.assertIn('IdleTimeoutMs', r.stdout)

    def test_unknown_key(self):
        text = config(tcp_pipe('t', 9) + '\n    Bogus: 1')
        line = text.splitlines().index('    Bogus: 1') + 1
        path, r = self.check(text)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertRegex(r.stderr, r'^ezproxy: invalid config: %s:%d:5: .*Bogus'
                         % (re.escape(path), line))

    def test_unknown_key_in_transport_params(self):
        text = config('  - Name: t\n    From: {tcp: {Listen: "127.0.0.1:0", Lsten: 1}}\n'
                      '    To: {tcp: {Connect: "127.0.0.1:9"}}')
        lines = text.splitlines()
        line = [i for i, l in enumerate(lines) if 'Lsten' in l][0]
        col = lines[line].index('Lsten') + 1
        path, r = self.check(text)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertRegex(r.stderr, r'^ezproxy: invalid config: %s:%d:%d: .*Lsten'
                         % (re.escape(path), line + 1, col))

    def test_duplicate_key(self):
        path, r = self.check('Workers: 2\nWorkers: 3\nApi: {Enable: false}\nPipelines: []\n')
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertRegex(r.stderr, r'^ezproxy: invalid config: %s:2:1: .*Workers'
                         % re.escape(path))

    def test_legacy_form(self):
        path, r = self.check(LEGACY % (15554, 15555))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('default-udp', r.stdout)
        self.assertRegex(r.stdout, r'Name: "?default"?\s')


    def test_check_output_is_a_valid_config(self):
        for name, text in (('new', config(tcp_pipe('t', 9), udp_pipe('u', 9, idle_ms=500))),
                           ('legacy', LEGACY % (15554, 15555))):
            with self.subTest(form=name):
                _, r1 = self.check(text, name + '1.yaml')
                self.assertEqual(r1.returncode, 0, r1.stderr)
                _, r2 = self.check(r1.stdout, name + '2.yaml')
                self.assertEqual(r2.returncode, 0, 'check rejects its own output: ' + r2.stderr)
                strip = lambda t: t.split('\n', 1)[1]  # noqa: E731 (first line names the file)
                self.assertEqual(strip(r2.stdout), strip(r1.stdout), 'resolved config unstable')

LEGACY = ('ProxyAddress:\n  Address: 127.0.0.1\n  Port: %d\n'
          'ServerAddress:\n  Address: 127.0.0.1\n  Port: %d\n'
          'Logging:\n  Level: info\n'
          'Api:\n  Enable: false\n  UseAuth: false\n  Address:\n    Address: 127.0.0.1\n'
          '    Port: 18080\n'
          'Lua:\n  Enable: false\n  Path: ""\n  Mode: callback\n')


class T08bLegacyRuns(Base):
    def test_legacy_config_runs_tcp_and_udp(self):
        tcp = self.tcp_echo()
        udp = self.udp_echo(tcp.port)
        listen = free_port(both=True)
        d = self.daemon(LEGACY % (listen, tcp.port), expect=['default', 'default-udp'])
        self.assertEqual((d.port('default'), d.port('default-udp')), (listen, listen))
        self.assertEqual(tcp_roundtrip(listen, b'legacy tcp'), b'legacy tcp')
        self.assertEqual(udp_roundtrip(listen, b'legacy udp'), b'legacy udp')


# 9 -----------------------------------------------------------------------------------------
class T09QuickRun(Base):
    def test_listen_server_network_both(self):
        tcp = self.tcp_echo()
        try:
            udp = self.udp_echo(tcp.port)
        except OSError:
            self.skipTest('udp port %d taken' % tcp.port)
        listen = free_port(both=True)
        d = self.daemon(args=['--listen', '127.0.0.1:%d' % listen,
                              '--server', '127.0.0.1:%d' % tcp.port, '--network', 'both'],
                        expect=['tcp', 'udp'])
        self.assertEqual(d.pipelines['tcp'][0], 'tcp')
        self.assertEqual(d.pipelines['udp'][0], 'udp')
        self.assertEqual((d.port('tcp'), d.port('udp')), (listen, listen))
        payload = pattern(77, 100000)
        self.assertEqual(tcp_roundtrip(listen, payload), payload)
        self.assertEqual(udp_roundtrip(listen, payload[:1200]), payload[:1200])
        self.assertEqual(udp.count, 1)


    def test_sighup_without_config_file(self):
        tcp = self.tcp_echo()
        listen = free_port()
        d = self.daemon(args=['--listen', '127.0.0.1:%d' % listen,
                              '--server', '127.0.0.1:%d' % tcp.port, '--network', 'tcp'],
                        expect=['tcp'])
        mark = d.mark()
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_line(r'SIGHUP', since=mark, timeout=5)
        self.assertTrue(d.alive())
        self.assertEqual(tcp_roundtrip(listen, b'still'), b'still')


# 10 ----------------------------------------------------------------------------------------
class T10RealPrograms(Base):
    def proc(self, cmd):
        p = Proc(cmd, cwd=self.tmp)
        self.addCleanup(p.stop)
        return p

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='ezp-real-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    @unittest.skipUnless(shutil.which('redis-server') and shutil.which('redis-cli') and
                         shutil.which('redis-benchmark'), 'redis-server/cli/benchmark missing')
    def test_redis_through_tcp(self):
        port = free_port()
        r = self.proc(['redis-server', '--port', str(port), '--save', '', '--appendonly', 'no',
                       '--bind', '127.0.0.1', '--dir', self.tmp])
        self.assertTrue(wait_tcp_port(port, 10, proc=r), 'redis-server did not start:\n'
                        + r.output())
        d = self.daemon(config(tcp_pipe('redis', port)))
        pp = str(d.port('redis'))
        cli = ['redis-cli', '-h', HOST, '-p', pp]
        out = subprocess.run(cli + ['set', 'k', 'v'], capture_output=True, text=True, timeout=20)
        self.assertEqual((out.returncode, out.stdout.strip()), (0, 'OK'), out.stderr)
        out = subprocess.run(cli + ['get', 'k'], capture_output=True, text=True, timeout=20)
        self.assertEqual((out.returncode, out.stdout.strip()), (0, 'v'), out.stderr)
        out = subprocess.run(['redis-benchmark', '-h', HOST, '-p', pp, '-n', '20000', '-c', '50',
                              '-q', '-t', 'set,get'], capture_output=True, text=True,
                             timeout=90)
        both = out.stdout + out.stderr
        self.assertEqual(out.returncode, 0, both)
        self.assertNotRegex(both.lower(), r'error|err |refused|reset', both)
        self.assertRegex(out.stdout, r'SET: [\d.]+ requests per second')
        self.assertRegex(out.stdout, r'GET: [\d.]+ requests per second')

    @unittest.skipUnless(shutil.which('dnsmasq') and shutil.which('dig'), 'dnsmasq/dig missing')
    def test_dns_through_udp(self):
        port = free_port(socket.SOCK_DGRAM, both=True)
        cmd = ['dnsmasq', '--no-daemon', '--conf-file=/dev/null', '--port', str(port),
               '--listen-address', HOST, '--bind-interfaces', '--no-resolv', '--no-hosts',
               '--address=/example.test/10.1.2.3',
               '--pid-file=' + os.path.join(self.tmp, 'dnsmasq.pid'), '--log-facility=-']
        if os.geteuid() == 0:
            cmd.append('--user=root')
        dns = self.proc(cmd)

        def dig(p):
            return subprocess.run(['dig', '@' + HOST, '-p', str(p), 'example.test', '+short',
                                   '+tries=1', '+time=2'], capture_output=True, text=True,
                                  timeout=20)

        dl = Deadline(10)
        while True:  # bounded poll: dnsmasq has no readiness event we can wait on
            out = dig(port)
            if out.stdout.strip() == '10.1.2.3' or dl.expired() or dns.proc.poll() is not None:
                break
        self.assertEqual(out.stdout.strip(), '10.1.2.3',
                         'dnsmasq itself does not answer:\n' + dns.output())
        d = self.daemon(config(udp_pipe('dns', port)))
        mark = d.mark()
        out = dig(d.port('dns'))
        self.assertEqual((out.returncode, out.stdout.strip()), (0, '10.1.2.3'),
                         out.stdout + out.stderr)
        out = dig(d.port('dns'))  # a second query: new client port, new session
        self.assertEqual(out.stdout.strip(), '10.1.2.3', out.stdout + out.stderr)
        self.assertEqual(d.closes(mark), [], 'sessions closed before their idle timeout')


# 11 ----------------------------------------------------------------------------------------
class T11Shutdown(Base):
    def test_sigterm_with_open_sessions(self):
        echo = self.tcp_echo()
        uecho = self.udp_echo()
        d = self.daemon(config(tcp_pipe('t', echo.port), udp_pipe('u', uecho.port)),
                        check_exit=False)
        socks = [self.connect(d.port('t')) for _ in range(5)]
        for i, s in enumerate(socks):
            self.assertEqual(echo_once(s, b'open %d' % i), b'open %d' % i)
        for i in range(2):
            u = self.udp_socket()
            self.assertEqual(udp_roundtrip(d.port('u'), b'u%d' % i, sock=u), b'u%d' % i)
        self.assertTrue(echo.wait_active(lambda a: a >= 5))
        mark = d.mark()
        dl = Deadline(10)
        rc = d.stop(timeout=10)
        self.assertEqual(rc, 0, 'exit status after SIGTERM with sessions open')
        self.assertFalse(dl.expired())
        closes = d.closes(mark)
        shut = [c for c in closes if c.reason == 'shutdown']
        self.assertEqual(len([c for c in shut if c.pipeline == 't']), 5, repr(closes))
        self.assertEqual(len([c for c in shut if c.pipeline == 'u']), 2, repr(closes))
        for s in socks:
            expect_closed(self, s, timeout=5, what='stopped daemon')


    def test_sigterm_during_bulk_and_stalled_sessions(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        sink = HashSink(mode='concurrent', gates={7: gate})
        self.addCleanup(sink.stop)
        d = self.daemon(config(tcp_pipe('t', sink.port)), check_exit=False)
        stalled = self.connect(d.port('t'))
        stalled.sendall(HashSink.header(7, 0))
        sent, was_stalled, _ = push_until_stalled(stalled, pattern_chunks(8, 64 * MiB))
        self.assertTrue(was_stalled)
        result = {}
        bulk = threading.Thread(target=lambda: result.update(
            transfer(d.port('t'), 9, 256 * MiB, 10, 256 * MiB, timeout=30)), daemon=True)
        bulk.start()
        self.assertTrue(sink.wait_accepted(2, timeout=5))
        threading.Event().wait(0.2)  # let bytes flow (the transfer takes seconds)
        dl = Deadline(10)
        rc = d.stop(timeout=10)
        self.assertEqual(rc, 0, 'exit status after SIGTERM during transfers')
        self.assertFalse(dl.expired())
        bulk.join(30)
        self.assertIn(result.get('end'), ('eof', 'reset'), result)
        self.assertLess(result.get('received', 0), 256 * MiB, 'the transfer was not cut')
        self.assertGreaterEqual(len([c for c in d.closes() if c.reason == 'shutdown']), 2,
                                d.tail())

    def test_sigint_exits_0(self):
        echo = self.tcp_echo()
        d = self.daemon(config(tcp_pipe('t', echo.port)), check_exit=False)
        s = self.connect(d.port('t'))
        self.assertEqual(echo_once(s, b'x'), b'x')
        self.assertEqual(d.stop(timeout=10, sig=signal.SIGINT), 0)
        self.assertEqual([c.reason for c in d.closes()], ['shutdown'])


# 12 ----------------------------------------------------------------------------------------
def push_until_stalled(sock, chunks, stall_s=1.0, timeout=30.0):
    """Send from `chunks` without blocking until the socket stays unwritable for stall_s.
    Returns (bytes sent, stalled, unsent rest of the current chunk)."""
    sock.setblocking(False)
    sent, pending, dl = 0, memoryview(b''), Deadline(timeout)
    while not dl.expired():
        if not pending:
            try:
                pending = memoryview(next(chunks))
            except StopIteration:
                return sent, False, pending
        try:
            k = sock.send(pending)
            sent += k
            pending = pending[k:]
        except BlockingIOError:
            _, w, _ = select.select([], [sock], [], stall_s)
            if not w:
                return sent, True, pending
    return sent, False, pending


class T12Backpressure(Base):
    def test_stalled_server_bounds_memory_and_spares_others(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        sink = HashSink(mode='concurrent', gates={1: gate})
        self.addCleanup(sink.stop)
        d = self.daemon(config(tcp_pipe('t', sink.port)))
        n = 96 * MiB
        base = rss_kib(d.proc.pid)
        s = self.connect(d.port('t'))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 << 10)
        s.sendall(HashSink.header(1, 0))
        chunks = pattern_chunks(41, n)
        sent, stalled, rest = push_until_stalled(s, chunks)
        grown = rss_kib(d.proc.pid) - base
        if os.environ.get('EZP_SHOW_LOG'):
            print('\nbackpressure: %.1f MiB accepted before the stall; daemon RSS +%d KiB'
                  % (sent / MiB, grown), file=sys.stderr)
        self.assertTrue(stalled, 'the client could send all %d MiB to a server that reads '
                        'nothing: no backpressure' % (n >> 20))
        self.assertLess(grown, 32 << 10, 'daemon RSS grew by %d KiB while the server '
                        'stalled (%d MiB pushed)' % (grown, sent >> 20))
        # other sessions on the same pipeline are not stalled
        for i in range(4):
            res = transfer(d.port('t'), 50 + i, 256 << 10, 60 + i, 256 << 10, timeout=10)
            self.assertEqual((res['end'], res['received']), ('eof', 256 << 10),
                             'session %d beside a stalled one' % i)
        # release the server: every byte arrives, in order
        gate.set()
        s.setblocking(True)
        s.settimeout(60)
        s.sendall(rest)
        for c in chunks:
            s.sendall(c)
        s.shutdown(socket.SHUT_WR)
        expect_closed(self, s, timeout=30, what='the stalled session after release')
        recs = [r for r in sink.wait_records(5, timeout=30) if r.get('seed') == 1]
        self.assertEqual(len(recs), 1)
        self.assertEqual(recs[0]['received'], 16 + n)
        self.assertEqual(recs[0]['sha256'], pattern_sha256(41, n, HashSink.header(1, 0)))


# 13 ----------------------------------------------------------------------------------------
class T13Limits(Base):
    def test_max_sessions(self):
        echo = self.tcp_echo()
        d = self.daemon(config(tcp_pipe('t', echo.port) + '\n    Limits: {MaxSessions: 2}'))
        port = d.port('t')
        first = [self.connect(port) for _ in range(2)]
        for s in first:
            self.assertEqual(echo_once(s, b'in'), b'in')
        mark = d.mark()
        extra = self.connect(port)
        expect_closed(self, extra, timeout=10, what='proxy over Limits.MaxSessions')
        d.wait_line(r"pipeline 't': refused client 127\.0\.0\.1:\d+: 2 sessions reached "
                    r"\(Limits\.MaxSessions\)", since=mark, timeout=5)
        self.assertEqual(echo.accepted, 2, 'a refused client reached the server')
        for s in first:
            self.assertEqual(echo_once(s, b'still'), b'still')
        mark = d.mark()
        first[0].close()
        d.wait_closes(1, since=mark, pipeline='t', timeout=10)
        # The slot is freed just after the close line is logged (on another worker than
        # the next accept, maybe): allow a short bounded retry rather than a race.
        dl, last = Deadline(3), None
        while not dl.expired():
            try:
                self.assertEqual(tcp_roundtrip(port, b'room again'), b'room again')
                break
            except (AssertionError, OSError) as e:
                last = e
                threading.Event().wait(0.05)
        else:
            self.fail('no room after a session closed under MaxSessions: %s' % last)


# 14 ----------------------------------------------------------------------------------------
class T14StartupErrors(Base):
    def run_bin(self, args, timeout=15):
        if not os.access(ezproxy_bin(), os.X_OK):
            self.fail('ezproxy binary not found at %s' % ezproxy_bin())
        p = subprocess.Popen([ezproxy_bin()] + args, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            out, err = p.communicate(timeout=10)
            self.fail('%s did not exit within %ds; stderr:\n%s' % (args, timeout, err))
        return p.returncode, out, err

    def test_run_invalid_config_exits_1(self):
        tmp = tempfile.mkdtemp(prefix='ezp-bad-')
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, 'bad.yaml')
        with open(path, 'w') as f:
            f.write(config(tcp_pipe('t', 9)).replace('Workers: 2', 'Workerz: 2'))
        rc, out, err = self.run_bin(['run', '-c', path])
        self.assertEqual(rc, 1, err)
        self.assertRegex(err, r'^ezproxy: [a-z ]+: %s:1:1: .*Workerz' % re.escape(path))

    def test_run_listen_port_in_use_exits_nonzero(self):
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(busy.close)
        busy.bind((HOST, 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc, out, err = self.run_bin(['run', '--listen', '127.0.0.1:%d' % port,
                                     '--server', '127.0.0.1:9', '--network', 'tcp'])
        self.assertNotEqual(rc, 0, err)
        self.assertIn('127.0.0.1:%d' % port, err, 'the error should name the address')

    def test_check_missing_file(self):
        rc, out, err = self.run_bin(['check', '/nonexistent/ezp.yaml'])
        self.assertEqual(rc, 1, err)
        self.assertIn('/nonexistent/ezp.yaml', err)


# 15 ----------------------------------------------------------------------------------------
class T15Resources(Base):
    def test_no_fd_leak_after_many_sessions(self):
        echo, uecho = self.tcp_echo(), self.udp_echo()
        bad = free_port()
        d = self.daemon(config(tcp_pipe('t', echo.port), tcp_pipe('x', bad),
                               udp_pipe('u', uecho.port, idle_ms=300)))
        fds = lambda: len(os.listdir('/proc/%d/fd' % d.proc.pid))  # noqa: E731
        d.wait_line(r'ezproxy running')  # every loop (workers, service loop) is up
        base = fds()
        mark = d.mark()
        for i in range(300):
            self.assertEqual(tcp_roundtrip(d.port('t'), b'x' * 100), b'x' * 100)
        for i in range(100):
            s = socket.create_connection((HOST, d.port('x')), timeout=5)
            expect_closed(self, s, timeout=5)
            s.close()
        for i in range(200):
            self.assertEqual(udp_roundtrip(d.port('u'), b'y'), b'y')
        for i in range(100):
            s = socket.create_connection((HOST, d.port('t')), timeout=5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
            s.sendall(b'abc')
            s.close()
        # UDP clients may get a recycled port and so share a session: count bytes there
        done = lambda: (len(d.closes_of(mark, 't')) >= 400 and  # noqa: E731
                        len(d.closes_of(mark, 'x')) >= 100 and
                        sum(c.to_server for c in d.closes_of(mark, 'u')) >= 200)
        self.assertTrue(d.wait_until(done, timeout=15), 'not every session closed:\n' + d.tail())
        # a session's sockets close just after its close line is logged: give them a moment
        d.wait_until(lambda: fds() == base, timeout=5)
        self.assertEqual(fds(), base, 'daemon file descriptors before/after ~700 closed sessions')

if __name__ == '__main__':
    unittest.main(verbosity=2)
