"""Integration tests for the v3 REST API of the http-api plugin (DESIGN.md section 8).

A real daemon (apiclient.ApiDaemon) with real upstream servers (harness.py);
every route: success, not found, forbidden for each missing permission bit,
bad input; live swaps, pipeline create/change/delete, config replace and
reload, keys and their persistence, auth off, TLS.

Run from the repository root:
    python3 tests/integration/test_api_v3.py
The binary is $EZP_BIN or build/ezproxy; EZP_SHOW_LOG=1 prints every
daemon's stderr, not only for failed tests.
"""

import base64
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from apiclient import ApiDaemon  # noqa: E402
from harness import (HOST, Daemon, Deadline, TcpEchoServer, echo_once,  # noqa: E402
                     recv_exact, recv_until_eof, tcp_roundtrip)

PERM_NAMES = ['CheckStatus', 'Close', 'UseWebsocket', 'Filter', 'Inject', 'MakeKeys',
              'DuplicateKeys', 'Reconfigure', 'Capture']
BIT = {n: 1 << i for i, n in enumerate(PERM_NAMES)}
ALL = 0x1ff


def tcp_pipe(name, to_port, listen='127.0.0.1:0'):
    return ('  - Name: %s\n    From: {tcp: {Listen: "%s"}}\n'
            '    To: {tcp: {Connect: "127.0.0.1:%d"}}\n' % (name, listen, to_port))


def pipelines(*items):
    return 'Workers: 2\nLogging: {Level: info}\nPipelines:\n' + ''.join(items)


def b64(data):
    return base64.b64encode(data).decode()


class ApiCase(unittest.TestCase):
    """Daemons made with self.api_daemon() are stopped at cleanup; their stderr
    is printed when the test failed (or always with EZP_SHOW_LOG=1)."""

    shared = None  # a class-wide daemon, set by setUpClass where used

    def api_daemon(self, config, start=True, check_exit=True, **kw):
        d = ApiDaemon(config, **kw)
        self._own = getattr(self, '_own', [])
        self._own.append(d)
        self.addCleanup(d.stop_and_check if check_exit else d.stop)
        if start:
            d.start()
        return d

    def run(self, result=None):
        if result is None:
            return super().run(result)
        before = len(result.failures) + len(result.errors)
        self._own = []
        try:
            return super().run(result)
        finally:
            failed = len(result.failures) + len(result.errors) > before
            if failed or os.environ.get('EZP_SHOW_LOG'):
                for d in self._own + ([self.shared] if self.shared else []):
                    sys.stderr.write('\n[%s] daemon exit=%r\n%s\n' % (self.id(), d.rc,
                                                                      d.tail(120)))

    def assertError(self, resp, status, code, field=None, contains=None):
        st, js, raw, _ = resp
        self.assertEqual(st, status, raw)
        self.assertIsInstance(js, dict, raw)
        self.assertIn('error', js, raw)
        self.assertEqual(js['error']['code'], code, raw)
        if field is not None:
            self.assertEqual(js['error'].get('field'), field, raw)
        if contains is not None:
            self.assertIn(contains, js['error']['message'], raw)
        return js['error']

    def assertOk(self, resp, status=200):
        st, js, raw, hdrs = resp
        self.assertEqual(st, status, raw)
        if status != 204:
            self.assertEqual(hdrs.get('Content-Type'), 'application/json', hdrs)
        self.assertEqual(hdrs.get('Cache-Control'), 'no-store', hdrs)
        return js


def wait_session_where(d, pred, pipeline=None, timeout=10.0):
    dl = Deadline(timeout)
    while True:
        for s in d.wait_sessions(1, pipeline=pipeline, timeout=dl.left() or 0.1):
            if pred(s):
                return s
        if dl.expired():
            raise AssertionError('no session matched within %.0fs' % timeout)
        dl.sleep(0.02)


def open_session(d, pipeline, port):
    """A live TCP session through @pipeline (listening on @port); returns (sock, session)."""
    before = {s['id'] for s in d.get('/api/3/sessions?pipeline=' + pipeline)[1]['sessions']}
    s = socket.create_connection((HOST, port), timeout=10)
    assert echo_once(s, b'hello') == b'hello'
    sess = wait_session_where(d, lambda x: x['id'] not in before, pipeline=pipeline)
    return s, sess


# ---- one daemon for the read-mostly routes ------------------------------------------

class V3Shared(ApiCase):
    @classmethod
    def setUpClass(cls):
        cls.echo = TcpEchoServer()
        cls.echo2 = TcpEchoServer()
        cls.shared = ApiDaemon(pipelines(tcp_pipe('echo', cls.echo.port),
                                         tcp_pipe('swap', cls.echo.port)))
        try:
            cls.shared.start()
            d = cls.shared
            # one key lacking each bit, one key with only that bit
            cls.without = {n: d.make_key(ALL & ~b, 'without-' + n) for n, b in BIT.items()}
            cls.only = {n: d.make_key(b, 'only-' + n) for n, b in BIT.items()}
        except Exception:
            sys.stderr.write(cls.shared.tail())
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        rc = cls.shared.stop()
        cls.echo.stop()
        cls.echo2.stop()
        if rc != 0:
            raise AssertionError('daemon exit status %r\n%s' % (rc, cls.shared.tail()))

    @property
    def d(self):
        return self.shared

    # -- auth, routing --

    def test_key_missing_unknown_and_query(self):
        self.assertError(self.d.get('/api/3/status', key=None), 401, 'unauthorized')
        self.assertError(self.d.get('/api/3/status', key='0' * 64), 401, 'unauthorized',
                         contains='unknown key')
        self.assertError(self.d.get('/api/3/status', key=None,
                                    headers={'Authorization': 'Basic abc'}), 401, 'unauthorized')
        self.assertOk(self.d.get('/api/3/status?key=' + self.d.admin_key, key=None))
        self.assertOk(self.d.get('/api/3/status', key=None,
                                 headers={'Authorization': 'bearer  ' + self.d.admin_key}))

    def test_route_not_found_and_method_not_allowed(self):
        self.assertError(self.d.get('/api/3/nope'), 404, 'route_not_found')
        self.assertError(self.d.get('/api/3/status/'), 404, 'route_not_found')
        self.assertError(self.d.get('/api/3/sessions/1/2/3'), 404, 'route_not_found')
        r = self.d.request('PUT', '/api/3/status')
        self.assertError(r, 405, 'method_not_allowed')
        self.assertEqual(r[3].get('Allow'), 'GET')
        r = self.d.request('PUT', '/api/3/pipelines')
        self.assertError(r, 405, 'method_not_allowed')
        self.assertEqual(r[3].get('Allow'), 'GET, POST')
        # the old API's envelope for its own paths
        st, js, raw, _ = self.d.get('/api/1/nope')
        self.assertEqual(st, 404, raw)
        self.assertEqual(js['Status'], 404, raw)
        self.assertIsInstance(js['Data'], str)

    ROUTES = [  # method, path, body, the bit it needs
        ('GET', '/api/3/status', None, 'CheckStatus'),
        ('GET', '/api/3/plugins', None, 'CheckStatus'),
        ('GET', '/api/3/pipelines', None, 'CheckStatus'),
        ('POST', '/api/3/pipelines', {}, 'Reconfigure'),
        ('GET', '/api/3/pipelines/echo', None, 'CheckStatus'),
        ('PATCH', '/api/3/pipelines/nope', {'shared': False}, 'Reconfigure'),
        ('DELETE', '/api/3/pipelines/nope', None, 'Reconfigure'),
        ('POST', '/api/3/pipelines/nope/restart', None, 'Reconfigure'),
        ('POST', '/api/3/pipelines/nope/inject', {}, 'Inject'),
        ('GET', '/api/3/pipelines/echo/faults', None, 'CheckStatus'),
        ('PUT', '/api/3/pipelines/echo/faults', {}, 'Reconfigure'),
        ('GET', '/api/3/sessions', None, 'CheckStatus'),
        ('GET', '/api/3/sessions/999999', None, 'CheckStatus'),
        ('DELETE', '/api/3/sessions/999999', None, 'Close'),
        ('POST', '/api/3/sessions/999999/inject', {}, 'Inject'),
        ('PUT', '/api/3/sessions/999999/server', {}, 'Reconfigure'),
        ('PUT', '/api/3/sessions/999999/client', {}, 'Reconfigure'),
        ('POST', '/api/3/sessions/999999/clients', {}, 'Reconfigure'),
        ('GET', '/api/3/sessions/999999/faults', None, 'CheckStatus'),
        ('PUT', '/api/3/sessions/999999/faults', {}, 'Reconfigure'),
        ('GET', '/api/3/config', None, 'Reconfigure'),
        ('PUT', '/api/3/config', {}, 'Reconfigure'),
        ('POST', '/api/3/config/reload', None, 'Reconfigure'),
        ('GET', '/api/3/capture?pipeline=nope', None, 'Capture'),  # 404: no endless stream
        ('GET', '/api/3/keys', None, 'MakeKeys'),
        ('POST', '/api/3/keys', {}, 'MakeKeys'),
        ('DELETE', '/api/3/keys/0123456789abcdef', None, 'MakeKeys'),
        ('GET', '/api/3/socket', None, 'UseWebsocket'),
    ]

    def test_forbidden_for_each_missing_bit(self):
        for method, path, body, bit in self.ROUTES:
            with self.subTest(route='%s %s' % (method, path)):
                e = self.assertError(self.d.request(method, path, body=body,
                                                    key=self.without[bit]), 403, 'forbidden')
                self.assertIn(bit, e['message'])
                # the bit alone gets past the permission check
                st, js, raw, _ = self.d.request(method, path, body=body, key=self.only[bit])
                self.assertNotIn(st, (401, 403), raw)

    def test_key_self_needs_no_bit(self):
        k = self.only['Filter']
        js = self.assertOk(self.d.get('/api/3/keys/self', key=k))
        self.assertEqual(js['perms'], BIT['Filter'])
        self.assertEqual(js['name'], 'only-Filter')
        self.assertNotIn('key', js)
        self.assertError(self.d.get('/api/3/status', key=k), 403, 'forbidden',
                         contains='CheckStatus')

    # -- status, plugins, pipelines --

    def test_status(self):
        js = self.assertOk(self.d.get('/api/3/status'))
        for f in ('version', 'uptime_ms', 'workers', 'pipelines', 'sessions', 'total_sessions',
                  'bytes_to_server', 'bytes_to_client', 'config_file'):
            self.assertIn(f, js)
        self.assertEqual(js['workers'], 2)
        self.assertEqual(js['config_file'], self.d.config_path)
        self.assertGreaterEqual(js['pipelines'], 2)

    def test_plugins(self):
        js = self.assertOk(self.d.get('/api/3/plugins'))
        by = {p['name']: p for p in js['plugins']}
        self.assertIn('tcp', by['tcp']['transports'])
        self.assertEqual(by['http-api']['services'], ['http-api'])
        for f in ('name', 'version', 'description', 'license', 'path', 'transports', 'filters',
                  'services'):
            self.assertIn(f, by['http-api'])

    def test_pipelines_list_and_get(self):
        js = self.assertOk(self.d.get('/api/3/pipelines'))
        names = [p['name'] for p in js['pipelines']]
        self.assertIn('echo', names)
        p = self.assertOk(self.d.get('/api/3/pipelines/echo'))
        self.assertEqual(p['name'], 'echo')
        self.assertTrue(p['listening'])
        self.assertEqual(p['listen_address'], '127.0.0.1:%d' % self.d.port('echo'))
        self.assertEqual(p['to_address'], '127.0.0.1:%d' % self.echo.port)
        self.assertEqual(p['config']['from'], {'tcp': {'listen': '127.0.0.1:0', 'backlog': 1024,
                                                       'no_delay': True}})
        self.assertEqual(p['config']['to']['tcp']['connect'], '127.0.0.1:%d' % self.echo.port)
        self.assertEqual(p['config']['through'], [])
        self.assertIn('max_sessions', p['config']['limits'])
        self.assertError(self.d.get('/api/3/pipelines/nope'), 404, 'pipeline_not_found')

    def test_faults_need_a_fault_stage(self):
        # the fault plugin is loaded (not 501), but `echo` has no fault stage: 404 saying so
        for m in ('GET', 'PUT'):
            e = self.assertError(self.d.request(m, '/api/3/pipelines/echo/faults', body={}),
                                 404, 'fault_stage_not_found')
            self.assertIn('no fault stage', e['message'])
            self.assertError(self.d.request(m, '/api/3/pipelines/nope/faults', body={}), 404,
                             'pipeline_not_found')
            self.assertError(self.d.request(m, '/api/3/sessions/999999/faults', body={}), 404,
                             'session_not_found')

    # -- sessions --

    def test_sessions_list_get_inject_close(self):
        s, sess = open_session(self.d, 'echo', self.d.port('echo'))
        try:
            sid = sess['id']
            for f in ('id', 'pipeline', 'transport', 'client', 'clients', 'server', 'opened_at',
                      'last_activity', 'bytes_to_server', 'bytes_to_client',
                      'packets_to_server', 'packets_to_client', 'dropped', 'replaced',
                      'injected', 'state'):
                self.assertIn(f, sess)
            self.assertEqual(sess['pipeline'], 'echo')
            self.assertEqual(sess['transport'], 'tcp')
            self.assertEqual(sess['client'], '127.0.0.1:%d' % s.getsockname()[1])
            self.assertEqual(sess['clients'], [sess['client']])
            self.assertEqual(sess['server'].rsplit(':', 1)[1], str(self.echo.port))
            self.assertRegex(sess['opened_at'], r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$')
            all_ids = [x['id'] for x in self.assertOk(self.d.get('/api/3/sessions'))['sessions']]
            self.assertIn(sid, all_ids)
            self.assertEqual(
                [x['id'] for x in self.d.get('/api/3/sessions?pipeline=swap')[1]['sessions']
                 if x['id'] == sid], [])
            self.assertError(self.d.get('/api/3/sessions?pipeline=nope'), 404,
                             'pipeline_not_found')
            one = self.assertOk(self.d.get('/api/3/sessions/%d' % sid))
            self.assertEqual(one['id'], sid)
            self.assertError(self.d.get('/api/3/sessions/999999'), 404, 'session_not_found')
            self.assertError(self.d.get('/api/3/sessions/abc'), 400, 'bad_request', field='id')

            # inject toward the client: the client reads it
            js = self.assertOk(self.d.post('/api/3/sessions/%d/inject' % sid,
                                           {'direction': 'to_client', 'data': b64(b'ping')}))
            self.assertEqual(js['injected'], 4)
            self.assertEqual(recv_exact(s, 4, Deadline(5)), b'ping')
            # toward the server: the echo server sends it back
            self.assertOk(self.d.post('/api/3/sessions/%d/inject' % sid,
                                      {'direction': 'to_server', 'data': b64(b'pong!')}))
            self.assertEqual(recv_exact(s, 5, Deadline(5)), b'pong!')
            # both: the client gets it twice (once direct, once echoed)
            self.assertOk(self.d.post('/api/3/sessions/%d/inject' % sid,
                                      {'direction': 'both', 'data': b64(b'xy')}))
            self.assertEqual(recv_exact(s, 4, Deadline(5)), b'xyxy')
            self.assertError(self.d.post('/api/3/sessions/999999/inject',
                                         {'direction': 'both', 'data': b64(b'xy')}),
                             404, 'session_not_found')

            # close
            st, _, raw, _ = self.d.request('DELETE', '/api/3/sessions/%d' % sid)
            self.assertEqual(st, 204, raw)
            _, _, how = recv_until_eof(s, Deadline(5))
            self.assertIn(how, ('eof', 'reset'))
            self.assertError(self.d.request('DELETE', '/api/3/sessions/%d' % sid), 404,
                             'session_not_found')
        finally:
            s.close()

    def test_pipeline_inject(self):
        s, sess = open_session(self.d, 'echo', self.d.port('echo'))
        try:
            js = self.assertOk(self.d.post('/api/3/pipelines/echo/inject',
                                           {'direction': 'to_client', 'data': b64(b'all')}))
            self.assertGreaterEqual(js['sessions'], 1)
            self.assertEqual(recv_exact(s, 3, Deadline(5)), b'all')
            self.assertError(self.d.post('/api/3/pipelines/nope/inject',
                                         {'direction': 'to_client', 'data': b64(b'x')}),
                             404, 'pipeline_not_found')
            self.assertError(self.d.post('/api/3/pipelines/echo/inject',
                                         {'direction': 'up', 'data': b64(b'x')}),
                             400, 'bad_request', field='direction')
        finally:
            s.close()

    def test_inject_bad_input(self):
        path = '/api/3/sessions/1/inject'
        self.assertError(self.d.post(path, '{"direction": '), 400, 'bad_json',
                         contains='line 1')
        self.assertError(self.d.post(path, '{"direction": "both", "direction": "both"}'),
                         400, 'bad_json', contains='duplicate')
        self.assertError(self.d.post(path, '[1, 2]'), 400, 'bad_request')
        self.assertError(self.d.post(path, ''), 400, 'bad_json')
        self.assertError(self.d.post(path, {'direction': 1, 'data': 'eA=='}), 400,
                         'bad_request', field='direction')
        e = self.assertError(self.d.post(path, {'direction': 'sideways', 'data': 'eA=='}), 400,
                             'bad_request', field='direction')
        self.assertEqual(e['message'], 'direction: must be to_client, to_server or both')
        self.assertError(self.d.post(path, {'direction': 'both'}), 400, 'bad_request',
                         field='data')
        self.assertError(self.d.post(path, {'direction': 'both', 'data': 5}), 400,
                         'bad_request', field='data')
        for bad in ('***', 'eA=x', 'e', '=eA=', 'eA===', ''):
            self.assertError(self.d.post(path, {'direction': 'both', 'data': bad}), 400,
                             'bad_request', field='data')
        e = self.assertError(self.d.post(path, {'direction': 'both', 'data': 'eA==',
                                                'extra': 1}), 400, 'bad_request',
                             field='extra')
        self.assertIn("unknown field 'extra'", e['message'])

    def test_bad_json_on_every_body_route(self):
        for method, path in (('POST', '/api/3/pipelines'), ('PATCH', '/api/3/pipelines/echo'),
                             ('POST', '/api/3/pipelines/echo/restart'),
                             ('POST', '/api/3/pipelines/echo/inject'),
                             ('POST', '/api/3/sessions/1/inject'),
                             ('PUT', '/api/3/sessions/1/server'),
                             ('PUT', '/api/3/sessions/1/client'),
                             ('POST', '/api/3/sessions/1/clients'), ('PUT', '/api/3/config'),
                             ('POST', '/api/3/keys')):
            with self.subTest(route='%s %s' % (method, path)):
                self.assertError(self.d.request(method, path, body='{"a": [1,}'), 400,
                                 'bad_json', contains='column')
                self.assertError(self.d.request(method, path, body='"text"'), 400,
                                 'bad_request')

    def test_body_too_large(self):
        # a declared length over the limit: refused before the body is read
        s = socket.create_connection((HOST, self.d.api_port), timeout=10)
        try:
            s.sendall(b'POST /api/3/sessions/1/inject HTTP/1.1\r\nHost: x\r\n'
                      b'Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n{"data"'
                      % (self.d.admin_key.encode(), (1 << 20) + 1))
            data, _, _ = recv_until_eof(s, Deadline(10))
            head, _, payload = bytes(data).partition(b'\r\n\r\n')
            self.assertTrue(head.startswith(b'HTTP/1.1 413'), head)
            self.assertEqual(json.loads(payload)['error']['code'], 'payload_too_large')
        finally:
            s.close()
        # chunked, no Content-Length: counted while it arrives
        c = self.d.conn()
        try:
            c.putrequest('POST', '/api/3/sessions/1/inject')
            c.putheader('Authorization', 'Bearer ' + self.d.admin_key)
            c.putheader('Transfer-Encoding', 'chunked')
            c.endheaders()
            chunk = b'A' * 65536
            for _ in range(20):
                c.send(b'%x\r\n%s\r\n' % (len(chunk), chunk))
            c.send(b'0\r\n\r\n')
            resp = c.getresponse()
            js = json.loads(resp.read())
            self.assertEqual(resp.status, 413)
            self.assertEqual(js['error']['code'], 'payload_too_large')
        finally:
            c.close()

    # -- swaps --

    def test_swap_server_moves_live_session(self):
        other = TcpEchoServer()
        try:
            s, sess = open_session(self.d, 'swap', self.d.port('swap'))
            try:
                js = self.assertOk(self.d.request('PUT', '/api/3/sessions/%d/server' % sess['id'],
                                                  body={'address': '127.0.0.1:%d' % other.port}))
                self.assertEqual(js['server'], '127.0.0.1:%d' % other.port)
                self.assertTrue(other.wait_accepted(1, timeout=5))
                self.assertEqual(echo_once(s, b'after swap'), b'after swap')
                self.assertError(self.d.request('PUT', '/api/3/sessions/%d/server' % sess['id'],
                                                body={'address': 5}), 400, 'bad_request',
                                 field='address')
                self.assertError(self.d.request('PUT', '/api/3/sessions/%d/server' % sess['id'],
                                                body={'address': '127.0.0.1:1', 'x': 1}), 400,
                                 'bad_request', field='x')
                self.assertError(self.d.request('PUT', '/api/3/sessions/999999/server',
                                                body={'address': '127.0.0.1:1'}),
                                 404, 'session_not_found')
                # a server that refuses: an error, and the session keeps its server
                st, js, raw, _ = self.d.request('PUT', '/api/3/sessions/%d/server' % sess['id'],
                                                body={'address': '127.0.0.1:1'})
                self.assertGreaterEqual(st, 400, raw)
                self.assertIn('error', js)
                self.assertEqual(echo_once(s, b'still there'), b'still there')
            finally:
                s.close()
        finally:
            other.stop()

    def test_swap_and_add_client_dial(self):
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.bind((HOST, 0))
        lst.listen(4)
        lst.settimeout(10)
        lport = lst.getsockname()[1]
        s, sess = open_session(self.d, 'echo', self.d.port('echo'))
        conns = []
        try:
            sid = sess['id']
            js = self.assertOk(self.d.request('PUT', '/api/3/sessions/%d/client' % sid,
                                              body={'address': '127.0.0.1:%d' % lport,
                                                    'mode': 'dial'}))
            c1, _ = lst.accept()
            conns.append(c1)
            self.assertEqual(js['client'], '127.0.0.1:%d' % lport)
            # the new client leg talks to the server
            self.assertEqual(echo_once(c1, b'new leg'), b'new leg')
            # add a second client leg
            js = self.assertOk(self.d.post('/api/3/sessions/%d/clients' % sid,
                                           {'address': '127.0.0.1:%d' % lport}))
            c2, _ = lst.accept()
            conns.append(c2)
            self.assertEqual(len(js['clients']), 2, js)
            self.assertError(self.d.post('/api/3/sessions/%d/clients' % sid,
                                         {'address': '127.0.0.1:1', 'mode': 'carrier'}),
                             400, 'bad_request', field='mode')
            self.assertError(self.d.post('/api/3/sessions/%d/clients' % sid,
                                         {'address': '127.0.0.1:1', 'timeout_ms': 0}),
                             400, 'bad_request', field='timeout_ms')
            self.assertError(self.d.request('PUT', '/api/3/sessions/%d/client' % sid,
                                            body={'mode': 'dial'}),
                             400, 'bad_request', field='address')
        finally:
            for c in conns:
                c.close()
            s.close()
            lst.close()

    def test_swap_client_accept_times_out(self):
        s, sess = open_session(self.d, 'echo', self.d.port('echo'))
        try:
            st, js, raw, _ = self.d.request(
                'PUT', '/api/3/sessions/%d/client' % sess['id'],
                body={'address': '127.0.0.1:9', 'mode': 'accept', 'timeout_ms': 200})
            self.assertGreaterEqual(st, 400, raw)
            self.assertIn('error', js)
            # the API answers other requests meanwhile and afterwards
            self.assertOk(self.d.get('/api/3/status'))
        finally:
            s.close()


# ---- pipelines: create, change, delete -------------------------------------------------

class V3Pipelines(ApiCase):
    def setUp(self):
        self.a = TcpEchoServer()
        self.b = TcpEchoServer()
        self.addCleanup(self.a.stop)
        self.addCleanup(self.b.stop)
        self.d = self.api_daemon(pipelines(tcp_pipe('base', self.a.port)))

    def listen_port(self, name):
        st, js, raw, _ = self.d.get('/api/3/pipelines/' + name)
        self.assertEqual(st, 200, raw)
        return int(js['listen_address'].rsplit(':', 1)[1])

    def test_create_patch_delete(self):
        body = {'name': 'p2', 'from': {'tcp': {'listen': '127.0.0.1:0'}},
                'to': {'tcp': {'connect': '127.0.0.1:%d' % self.a.port}}}
        js = self.assertOk(self.d.post('/api/3/pipelines', body), 201)
        self.assertEqual(js['name'], 'p2')
        self.assertEqual(js['config']['to']['tcp']['connect'], '127.0.0.1:%d' % self.a.port)
        port = self.listen_port('p2')
        self.assertEqual(tcp_roundtrip(port, b'via p2'), b'via p2')
        self.assertTrue(self.a.wait_accepted(1))
        self.assertError(self.d.post('/api/3/pipelines', body), 409, 'conflict', field='name')

        # PATCH to: new sessions go to b
        js = self.assertOk(self.d.request('PATCH', '/api/3/pipelines/p2', body={
            'to': {'tcp': {'connect': '127.0.0.1:%d' % self.b.port}}}))
        self.assertEqual(js['to_address'], '127.0.0.1:%d' % self.b.port)
        self.assertEqual(tcp_roundtrip(port, b'via b'), b'via b')
        self.assertTrue(self.b.wait_accepted(1))

        # PATCH through: a filter is added (the built-in remote filter)
        js = self.assertOk(self.d.request('PATCH', '/api/3/pipelines/p2',
                                          body={'through': [{'remote': {}}]}))
        self.assertEqual(js['filters'], 1)
        self.assertEqual(list(js['config']['through'][0].keys()), ['remote'])
        self.assertEqual(tcp_roundtrip(port, b'filtered'), b'filtered')

        # to and shared together, moving existing sessions too
        js = self.assertOk(self.d.request('PATCH', '/api/3/pipelines/p2', body={
            'to': {'tcp': {'connect': '127.0.0.1:%d' % self.b.port}}, 'shared': False,
            'apply_to_existing': True, 'close_sessions': False}))
        self.assertEqual(js['to_address'], '127.0.0.1:%d' % self.b.port)

        # PATCH limits merges into the current limits
        js = self.assertOk(self.d.request('PATCH', '/api/3/pipelines/p2',
                                          body={'limits': {'max_sessions': 7}}))
        self.assertEqual(js['config']['limits']['max_sessions'], 7)
        self.assertIn('max_packet', js['config']['limits'])

        # bad PATCHes
        self.assertError(self.d.request('PATCH', '/api/3/pipelines/p2', body={}), 400,
                         'bad_request')
        self.assertError(self.d.request('PATCH', '/api/3/pipelines/p2', body={'name': 'x'}),
                         400, 'bad_request', field='name')
        self.assertError(self.d.request('PATCH', '/api/3/pipelines/p2',
                                        body={'apply_to_existing': True}),
                         400, 'bad_request', field='apply_to_existing')
        self.assertError(self.d.request('PATCH', '/api/3/pipelines/p2', body={'to': 'tcp'}),
                         400, 'bad_request', field='to')
        st, js, raw, _ = self.d.request('PATCH', '/api/3/pipelines/p2',
                                        body={'to': {'tcp': {'conect': '127.0.0.1:1'}}})
        self.assertEqual(st, 400, raw)
        self.assertIn(js['error']['code'], ('bad_request', 'config_invalid'))
        self.assertError(self.d.request('PATCH', '/api/3/pipelines/nope',
                                        body={'shared': True}), 404, 'pipeline_not_found')
        self.assertError(self.d.request('PATCH', '/api/3/pipelines/nope',
                                        body={'to': {'tcp': {'connect': '127.0.0.1:1'}}}),
                         404, 'pipeline_not_found')

        # restart: rebinds; body optional
        self.assertOk(self.d.post('/api/3/pipelines/p2/restart'))
        self.assertOk(self.d.post('/api/3/pipelines/p2/restart', {'close_sessions': True}))
        self.assertError(self.d.post('/api/3/pipelines/p2/restart', {'close_sessions': 1}),
                         400, 'bad_request', field='close_sessions')
        self.assertError(self.d.post('/api/3/pipelines/nope/restart'), 404,
                         'pipeline_not_found')
        port = self.listen_port('p2')
        self.assertEqual(tcp_roundtrip(port, b'after restart'), b'after restart')

        # DELETE: the listener is gone
        st, _, raw, _ = self.d.request('DELETE', '/api/3/pipelines/p2')
        self.assertEqual(st, 204, raw)
        self.assertError(self.d.get('/api/3/pipelines/p2'), 404, 'pipeline_not_found')
        with self.assertRaises(OSError):
            socket.create_connection((HOST, port), timeout=2).close()
        self.assertError(self.d.request('DELETE', '/api/3/pipelines/p2'), 404,
                         'pipeline_not_found')

    def test_patch_to_apply_to_existing(self):
        port = self.d.port('base')
        s, sess = open_session(self.d, 'base', port)
        try:
            self.assertOk(self.d.request('PATCH', '/api/3/pipelines/base', body={
                'to': {'tcp': {'connect': '127.0.0.1:%d' % self.b.port}},
                'apply_to_existing': True}))
            want = '127.0.0.1:%d' % self.b.port
            wait_session_where(self.d, lambda x: x['id'] == sess['id'] and x['server'] == want,
                               pipeline='base')
            self.assertEqual(echo_once(s, b'moved'), b'moved')
            self.assertTrue(self.b.wait_accepted(1))
        finally:
            s.close()

    def test_create_bad_bodies(self):
        ok_from = {'tcp': {'listen': '127.0.0.1:0'}}
        ok_to = {'tcp': {'connect': '127.0.0.1:%d' % self.a.port}}
        cases = [
            ({'from': ok_from, 'to': ok_to}, 'name'),
            ({'name': 'bad name', 'from': ok_from, 'to': ok_to}, 'name'),
            ({'name': 7, 'from': ok_from, 'to': ok_to}, 'name'),
            ({'name': 'x', 'to': ok_to}, 'from'),
            ({'name': 'x', 'from': ok_from}, 'to'),
            ({'name': 'x', 'from': {'tcp': {}, 'udp': {}}, 'to': ok_to}, 'from'),
            ({'name': 'x', 'from': {'tcp': 5}, 'to': ok_to}, 'from'),
            ({'name': 'x', 'from': ok_from, 'to': ok_to, 'through': {}}, 'through'),
            ({'name': 'x', 'from': ok_from, 'to': ok_to, 'through': [5]}, 'through'),
            ({'name': 'x', 'from': ok_from, 'to': ok_to, 'shared': 'yes'}, 'shared'),
            ({'name': 'x', 'from': ok_from, 'to': ok_to, 'limits': []}, 'limits'),
            ({'name': 'x', 'from': ok_from, 'to': ok_to, 'colour': 'red'}, 'colour'),
        ]
        for body, field in cases:
            with self.subTest(body=body):
                self.assertError(self.d.post('/api/3/pipelines', body), 400, 'bad_request',
                                 field=field)
        # valid shape, refused by the core: an unknown kind, an unknown parameter
        for body in ({'name': 'x', 'from': {'nokind': {}}, 'to': ok_to},
                     {'name': 'x', 'from': {'tcp': {'listen': '127.0.0.1:0', 'bogus': 1}},
                      'to': ok_to}):
            st, js, raw, _ = self.d.post('/api/3/pipelines', body)
            self.assertEqual(st, 400, raw)
            self.assertIn(js['error']['code'], ('bad_request', 'config_invalid'))
        self.assertError(self.d.get('/api/3/pipelines/x'), 404, 'pipeline_not_found')


# ---- config ----------------------------------------------------------------------------

class V3Config(ApiCase):
    def test_get_put_reload(self):
        a = TcpEchoServer()
        self.addCleanup(a.stop)
        d = self.api_daemon(pipelines(tcp_pipe('echo', a.port)))
        port = d.port('echo')
        js = self.assertOk(d.get('/api/3/config'))
        self.assertEqual(js['file'], d.config_path)
        self.assertIn('Pipelines:', js['yaml'])
        self.assertEqual(js['config']['pipelines'][0]['name'], 'echo')
        self.assertEqual(js['config']['api']['auth'], True)
        before = js['yaml']
        with open(d.config_path) as f:
            original = f.read()

        # invalid: 400 with where, nothing changes
        bad = original + '    Bogus: 1\n'
        e = self.assertError(d.request('PUT', '/api/3/config', body=bad,
                                       headers={'Content-Type': 'application/yaml'}),
                             400, 'config_invalid')
        self.assertGreater(e['line'], 0)
        self.assertGreater(e['column'], 0)
        self.assertIn('Bogus', e['message'])
        self.assertEqual(d.get('/api/3/config')[1]['yaml'], before)
        self.assertEqual(tcp_roundtrip(port, b'still flows'), b'still flows')
        with open(d.config_path) as f:
            self.assertEqual(f.read(), original)
        self.assertError(d.request('PUT', '/api/3/config', body='Pipelines: [',
                                   headers={'Content-Type': 'text/yaml'}), 400, 'config_invalid')
        self.assertError(d.request('PUT', '/api/3/config', body='',
                                   headers={'Content-Type': 'text/plain'}), 400, 'bad_request')
        self.assertError(d.request('PUT', '/api/3/config', body={'yaml': 5}), 400, 'bad_request',
                         field='yaml')
        self.assertError(d.request('PUT', '/api/3/config', body={'yaml': 'a', 'config': {}}),
                         400, 'bad_request')
        self.assertError(d.request('PUT', '/api/3/config', body={'text': 'a'}), 400,
                         'bad_request', field='text')

        self.assertError(d.request('PUT', '/api/3/config', body='Workers: 2\0\n',
                                   headers={'Content-Type': 'text/plain; charset=utf-8'}),
                         400, 'bad_request', contains='NUL')
        # the key at fault is named (snake_case, as the JSON form spells it)
        e = self.assertError(d.request('PUT', '/api/3/config',
                                       body=original.replace('127.0.0.1:0', 'nowhere'),
                                       headers={'Content-Type': 'application/yaml'}),
                             400, 'config_invalid')
        self.assertEqual(e.get('field'), 'listen', e)
        # the JSON form: any JSON value is written as YAML the core then checks
        odd = {'name': 'odd', 'from': {'tcp': {'listen': '127.0.0.1:0'}},
               'to': {'tcp': {'connect': '127.0.0.1:9'}},
               'odd_values': [1.5, None, True, False, -3, 'caf\u00e9 \u0085\x01\x7f"\\ \U0001F600',
                              {'Already': 1, 'a__b': 2, 'x-y': 3, '': 4}, [], {}]}
        e = self.assertError(d.request('PUT', '/api/3/config',
                                       body={'config': {'pipelines': [odd]}}),
                             400, 'config_invalid', contains='OddValues')
        self.assertEqual(d.get('/api/3/config')[1]['yaml'], before)

        # valid raw YAML: applied and written back
        b = TcpEchoServer()
        self.addCleanup(b.stop)
        new = original + tcp_pipe('added', b.port)
        js = self.assertOk(d.request('PUT', '/api/3/config', body=new,
                                     headers={'Content-Type': 'application/yaml'}))
        self.assertEqual(js, {'applied': True, 'written': d.config_path})
        with open(d.config_path) as f:
            self.assertEqual(f.read(), new)
        p = self.assertOk(d.get('/api/3/pipelines/added'))
        aport = int(p['listen_address'].rsplit(':', 1)[1])
        self.assertEqual(tcp_roundtrip(aport, b'added'), b'added')
        self.assertEqual(tcp_roundtrip(port, b'old one'), b'old one')

        # valid JSON {"yaml": ...}: back to the original
        self.assertOk(d.request('PUT', '/api/3/config', body={'yaml': original}))
        self.assertError(d.get('/api/3/pipelines/added'), 404, 'pipeline_not_found')

        # {"config": {...}}: the JSON form round-trips
        cfg = d.get('/api/3/config')[1]['config']
        cfg['pipelines'][0]['limits']['max_sessions'] = 5
        self.assertOk(d.request('PUT', '/api/3/config', body={'config': cfg}))
        self.assertEqual(d.get('/api/3/pipelines/echo')[1]['config']['limits']['max_sessions'], 5)

        # reload: the file changed on disk
        with open(d.config_path, 'w') as f:
            f.write(original + tcp_pipe('fromfile', b.port))
        js = self.assertOk(d.post('/api/3/config/reload'))
        self.assertTrue(js['applied'])
        self.assertOk(d.get('/api/3/pipelines/fromfile'))
        with open(d.config_path, 'w') as f:
            f.write(original + '  - Name: [\n')
        st, js, raw, _ = d.post('/api/3/config/reload')
        self.assertEqual(st, 400, raw)
        self.assertEqual(js['error']['code'], 'config_invalid')
        self.assertOk(d.get('/api/3/pipelines/fromfile'))


# ---- keys ----------------------------------------------------------------------------

class V3Keys(ApiCase):
    def test_mint_list_self_revoke(self):
        d = self.api_daemon(pipelines(tcp_pipe('echo', 9)))
        js = self.assertOk(d.post('/api/3/keys', {'perms': ['CheckStatus', 'MakeKeys'],
                                                  'name': 'ops'}), 201)
        self.assertEqual(js['perms'], BIT['CheckStatus'] | BIT['MakeKeys'])
        self.assertEqual(js['perm_names'], ['CheckStatus', 'MakeKeys'])
        self.assertEqual(js['name'], 'ops')
        self.assertRegex(js['key'], r'^[0-9a-f]{64}$')
        self.assertRegex(js['id'], r'^[0-9a-f]{16}$')
        ops_key, ops_id = js['key'], js['id']
        js2 = self.assertOk(d.post('/api/3/keys', {'perms': 1}), 201)
        self.assertEqual(js2['perm_names'], ['CheckStatus'])

        listed = self.assertOk(d.get('/api/3/keys'))['keys']
        self.assertIn(ops_id, [k['id'] for k in listed])
        for k in listed:
            self.assertNotIn('key', k)
            self.assertNotIn(ops_key, json.dumps(k))
        me = self.assertOk(d.get('/api/3/keys/self', key=ops_key))
        self.assertEqual(me['id'], ops_id)
        self.assertEqual(me['perm_names'], ['CheckStatus', 'MakeKeys'])

        # minting rules: a subset only; MakeKeys needs DuplicateKeys
        self.assertError(d.post('/api/3/keys', {'perms': ['Close']}, key=ops_key), 403,
                         'forbidden')
        self.assertError(d.post('/api/3/keys', {'perms': ['MakeKeys']}, key=ops_key), 403,
                         'forbidden')
        self.assertOk(d.post('/api/3/keys', {'perms': ['CheckStatus']}, key=ops_key), 201)
        # the ops key cannot revoke the admin key (it has bits ops lacks)
        admin_id = d.get('/api/3/keys/self')[1]['id']
        self.assertError(d.request('DELETE', '/api/3/keys/' + admin_id, key=ops_key), 403,
                         'forbidden', contains='Reconfigure')

        # bad bodies
        for body, field in (({'perms': ['Nope']}, 'perms'), ({'perms': 1024}, 'perms'),
                            ({'perms': -1}, 'perms'), ({'perms': 'all'}, 'perms'), ({}, 'perms'),
                            ({'perms': 1, 'name': 5}, 'name'),
                            ({'perms': 1, 'name': 'n' * 65}, 'name'),
                            ({'perms': 1, 'owner': 'x'}, 'owner')):
            with self.subTest(body=body):
                self.assertError(d.post('/api/3/keys', body), 400, 'bad_request', field=field)
        self.assertError(d.post('/api/3/keys', '{"perms": 1, "perms": 2}'), 400, 'bad_json')

        # revoke: the key stops working at once
        st, _, raw, _ = d.request('DELETE', '/api/3/keys/' + ops_id)
        self.assertEqual(st, 204, raw)
        self.assertError(d.get('/api/3/status', key=ops_key), 401, 'unauthorized')
        self.assertError(d.request('DELETE', '/api/3/keys/' + ops_id), 404, 'key_not_found')
        self.assertNotIn(ops_id, [k['id'] for k in d.get('/api/3/keys')[1]['keys']])
        # keys never reach the log
        self.assertNotIn(ops_key, d.text())
        self.assertNotIn(d.admin_key, d.text())

    def test_keys_survive_restart(self):
        state = tempfile.mkdtemp(prefix='ezp-state-')
        self.addCleanup(shutil.rmtree, state, True)
        cfg = pipelines(tcp_pipe('echo', 9))
        d1 = self.api_daemon(cfg, state_dir=state)
        key = d1.make_key(['CheckStatus'], 'kept')
        gone = d1.make_key(['CheckStatus'], 'gone')
        gone_id = d1.get('/api/3/keys/self', key=gone)[1]['id']
        self.assertEqual(d1.request('DELETE', '/api/3/keys/' + gone_id)[0], 204)
        self.assertEqual(d1.stop(), 0)
        d2 = self.api_daemon(cfg, state_dir=state)
        self.assertEqual(d2.admin_key, d1.admin_key)
        self.assertOk(d2.get('/api/3/status', key=key))
        self.assertEqual(d2.get('/api/3/keys/self', key=key)[1]['name'], 'kept')
        self.assertError(d2.get('/api/3/status', key=gone), 401, 'unauthorized')


# ---- auth off, TLS, IPv6 ------------------------------------------------------------------

class V3Listen(ApiCase):
    def test_auth_off_on_loopback(self):
        d = self.api_daemon(pipelines(tcp_pipe('echo', 9)), auth=False)
        self.assertIsNone(d.admin_key)
        self.assertOk(d.get('/api/3/status', key=None))
        self.assertOk(d.get('/api/3/config', key=None))
        me = self.assertOk(d.get('/api/3/keys/self', key=None))
        self.assertEqual(me['perms'], ALL)
        self.assertFalse(me['auth'])
        self.assertIsNone(me['id'])
        self.assertError(d.get('/api/3/keys', key=None), 501, 'not_available')
        self.assertError(d.post('/api/3/keys', {'perms': 1}, key=None), 501, 'not_available')
        self.assertError(d.request('DELETE', '/api/3/keys/0123456789abcdef', key=None), 501,
                         'not_available')
        # any key text is ignored
        self.assertOk(d.get('/api/3/status', key='whatever'))

    def test_auth_off_refused_on_wildcard(self):
        tmp = tempfile.mkdtemp(prefix='ezp-state-')
        self.addCleanup(shutil.rmtree, tmp, True)
        text = ('StateDir: %s\nApi:\n  Listen: 0.0.0.0:0\n  Auth: false\n' % tmp +
                pipelines(tcp_pipe('echo', 9)))
        d = ApiDaemon(text, full=True, expect=[])
        self.addCleanup(d.stop)
        Daemon.start(d)
        d.proc.wait(15)
        d.wait_until(d.readers_done, timeout=5)
        self.assertNotEqual(d.proc.returncode, 0)
        self.assertIn('loopback', d.text())

    def test_tls(self):
        if not shutil.which('openssl'):
            print('skipped: the openssl command is not installed', file=sys.stderr)
            self.skipTest('openssl CLI not installed')
        tmp = tempfile.mkdtemp(prefix='ezp-tls-')
        self.addCleanup(shutil.rmtree, tmp, True)
        cert, key = os.path.join(tmp, 'cert.pem'), os.path.join(tmp, 'key.pem')
        r = subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes',
                            '-subj', '/CN=127.0.0.1', '-days', '1', '-keyout', key,
                            '-out', cert], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout)
        d = self.api_daemon(pipelines(tcp_pipe('echo', 9)),
                            api_extra='  Tls: {Cert: %s, Key: %s}\n' % (cert, key))
        self.assertEqual(d.scheme, 'https')
        js = self.assertOk(d.get('/api/3/status'))
        self.assertEqual(js['workers'], 2)
        self.assertError(d.get('/api/3/status', key=None), 401, 'unauthorized')
        # plain HTTP on the TLS port gets no answer
        c = http.client.HTTPConnection('127.0.0.1', d.api_port, timeout=5)
        try:
            with self.assertRaises((http.client.HTTPException, OSError)):
                c.request('GET', '/api/3/status')
                c.getresponse().read()
        finally:
            c.close()

    def test_tls_missing_file(self):
        d = self.api_daemon(pipelines(tcp_pipe('echo', 9)), start=False, check_exit=False,
                            api_extra='  Tls: {Cert: /nonexistent/c.pem, Key: /nonexistent/k.pem}\n')
        d.expect = []
        Daemon.start(d)
        d.proc.wait(15)
        d.wait_until(d.readers_done, timeout=5)
        self.assertNotEqual(d.proc.returncode, 0)
        self.assertIn('/nonexistent/c.pem', d.text())

    def refused(self, text, expect):
        """Start a daemon that must refuse to start; return its output."""
        d = ApiDaemon(text, full=True, expect=[])
        self.addCleanup(d.stop)
        Daemon.start(d)
        d.proc.wait(15)
        d.wait_until(d.readers_done, timeout=5)
        self.assertNotEqual(d.proc.returncode, 0, d.text())
        self.assertIn(expect, d.text())
        return d.text()

    def test_tls_bad_files(self):
        tmp = tempfile.mkdtemp(prefix='ezp-tls-')
        self.addCleanup(shutil.rmtree, tmp, True)
        empty, junk = os.path.join(tmp, 'empty.pem'), os.path.join(tmp, 'junk.pem')
        open(empty, 'w').close()
        with open(junk, 'w') as f:
            f.write('-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n')
        base = 'StateDir: %s\nApi:\n  Listen: 127.0.0.1:0\n  Auth: false\n' % tmp
        self.refused(base + '  Tls: {Cert: %s, Key: %s}\n' % (empty, junk)
                     + pipelines(tcp_pipe('echo', 9)), 'is empty or too large')
        self.refused(base + '  Tls: {Cert: %s, Key: %s}\n' % (junk, junk)
                     + pipelines(tcp_pipe('echo', 9)), 'libmicrohttpd cannot start')

    def test_debug_log_limits_and_stop_waits(self):
        a = TcpEchoServer()
        self.addCleanup(a.stop)
        cfg = ('Workers: 2\nLogging: {Level: debug}\nPipelines:\n' + tcp_pipe('echo', a.port)
               + '    Limits: {MaxInjectBytes: 4}\n')
        d = self.api_daemon(cfg)
        self.assertOk(d.get('/api/3/status?key=' + d.admin_key, key=None))
        d.wait_line(r'GET /api/3/status -> 200')
        s, sess = open_session(d, 'echo', d.port('echo'))
        self.addCleanup(s.close)
        self.assertError(d.post('/api/3/sessions/%d/inject' % sess['id'],
                                    {'direction': 'to_client', 'data': b64(b'0123456789')}),
                             413, 'limit')
        # per pipeline it is best effort: sessions that refuse are not counted
        js = self.assertOk(d.post('/api/3/pipelines/echo/inject',
                                  {'direction': 'to_client', 'data': b64(b'0123456789')}))
        self.assertEqual(js['sessions'], 0)
        # a swap waiting for a client (accept mode) when the daemon is told to stop:
        # the daemon waits for it, answers it, and exits cleanly
        since = d.mark()
        out = {}

        def swap():
            out['resp'] = d.request('PUT', '/api/3/sessions/%d/client' % sess['id'],
                                    body={'address': '127.0.0.1:9', 'mode': 'accept',
                                          'timeout_ms': 1500}, timeout=20)

        t = threading.Thread(target=swap, daemon=True)
        t.start()
        d.wait_line(r'PUT /api/3/sessions/\d+/client: waiting on a thread', since=since)
        self.assertEqual(d.stop(timeout=20), 0, d.tail())
        t.join(10)
        self.assertFalse(t.is_alive())
        st = out['resp'][0]
        self.assertGreaterEqual(st, 400, out['resp'][2])
        text = d.text()
        self.assertNotIn(d.admin_key, text)
        self.assertNotIn('key=', text)

    def test_ipv6_and_port_in_use(self):
        try:
            probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            probe.bind(('::1', 0))
            probe.close()
        except OSError:
            self.skipTest('no IPv6 loopback here')
        tmp = tempfile.mkdtemp(prefix='ezp-state-')
        self.addCleanup(shutil.rmtree, tmp, True)
        text = ('StateDir: %s\nApi:\n  Listen: "[::1]:0"\n  Auth: false\n' % tmp +
                pipelines(tcp_pipe('echo', 9, listen='[::1]:0')))
        d = self.api_daemon(text, full=True, auth=False)
        self.assertEqual(d.api_host, '[::1]')
        c = http.client.HTTPConnection('::1', d.api_port, timeout=5)
        try:
            c.request('GET', '/api/3/pipelines/echo')
            resp = c.getresponse()
            self.assertEqual(resp.status, 200)
            js = json.loads(resp.read())
            self.assertRegex(js['listen_address'], r'^\[::1\]:\d+$')
        finally:
            c.close()

        # a port in use: the daemon refuses to start and says which
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        busy.bind((HOST, 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        text = ('StateDir: %s\nApi:\n  Listen: 127.0.0.1:%d\n  Auth: false\n'
                % (tmp, busy.getsockname()[1]) + pipelines(tcp_pipe('echo2', 9)))
        d2 = ApiDaemon(text, full=True, expect=[])
        self.addCleanup(d2.stop)
        Daemon.start(d2)
        d2.proc.wait(15)
        d2.wait_until(d2.readers_done, timeout=5)
        self.assertNotEqual(d2.proc.returncode, 0)
        self.assertTrue(re.search(r'cannot listen on 127\.0\.0\.1:\d+', d2.text()), d2.text())


if __name__ == '__main__':
    unittest.main(verbosity=2)
