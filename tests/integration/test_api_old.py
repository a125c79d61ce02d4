"""Integration tests of the old v1/v2 REST API, /metrics, the OpenAPI document and GET /
(DESIGN.md section 8; docs/api-old.md), against a real daemon and real upstream servers.

Run from the repository root:
    python3 tests/integration/test_api_old.py
The binary is $EZP_BIN or build/ezproxy; set EZP_SHOW_LOG=1 to print every
daemon's stderr, not only for failed tests.
"""

import base64
import json
import math
import os
import re
import socket
import subprocess
import sys
import unittest
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from apiclient import ApiDaemon  # noqa: E402
from harness import (HOST, ROOT, Deadline, LogOnFailure, UdpEchoServer,  # noqa: E402
                     _TcpServer, recv_exact)

ALL = 0x1ff
CHECK_STATUS, CLOSE, USE_WS, FILTER, INJECT, MAKE_KEYS, DUP_KEYS, RECONF, CAPTURE = (
    1 << i for i in range(9))
KEYINFO_FIELDS = ['Value', 'CanCheckStatus', 'CanClose', 'CanUseWebsocket', 'CanFilter',
                  'CanInject', 'CanMakeKeys', 'CanDuplicateKeys', 'Admin']
KEYINFO_BITS = [('CanCheckStatus', CHECK_STATUS), ('CanClose', CLOSE),
                ('CanUseWebsocket', USE_WS), ('CanFilter', FILTER), ('CanInject', INJECT),
                ('CanMakeKeys', MAKE_KEYS), ('CanDuplicateKeys', DUP_KEYS)]


# ---- upstream servers ----------------------------------------------------------

class RecordingServer(_TcpServer):
    """Keeps every connection open and records what each one received.
    send_all(data) writes to every open connection (server -> client traffic)."""

    def __init__(self, port=0):
        self.received = {}   # conn index -> bytearray
        self.socks = {}
        self.n = 0
        super().__init__(port)

    def handle(self, conn):
        with self.lock:
            idx = self.n
            self.n += 1
            self.received[idx] = bytearray()
            self.socks[idx] = conn
            self.lock.notify_all()
        conn.settimeout(120)
        while True:
            b = conn.recv(65536)
            if not b:
                return
            with self.lock:
                self.received[idx] += b
                self.lock.notify_all()

    def wait_data(self, idx, data, timeout=10.0):
        d = Deadline(timeout)
        with self.lock:
            ok = self.lock.wait_for(lambda: idx in self.received and
                                    bytes(self.received[idx]).endswith(data), d.left())
            return ok, bytes(self.received.get(idx, b''))

    def send_all(self, data):
        with self.lock:
            socks = list(self.socks.values())
        for s in socks:
            s.sendall(data)


# ---- a tiny Prometheus text format 0.0.4 parser -----------------------------------

SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+-?\d+)?$')
LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


def unescape_label(s):
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == '\\' and i + 1 < len(s):
            nxt = s[i + 1]
            out.append({'n': '\n', '\\': '\\', '"': '"'}.get(nxt, '\\' + nxt))
            i += 2
        else:
            out.append(c)
            i += 1
    return ''.join(out)


def parse_labels(text):
    labels, pos = {}, 0
    while pos < len(text):
        m = LABEL_RE.match(text, pos)
        if not m:
            raise ValueError('bad labels at %r' % text[pos:])
        if m.group(1) in labels:
            raise ValueError('label %s twice' % m.group(1))
        labels[m.group(1)] = unescape_label(m.group(2))
        pos = m.end()
    return labels


def parse_prometheus(text):
    """Returns {'types': {name: type}, 'help': {name: text}, 'samples': [(name, labels, value)]}.
    Raises ValueError on anything the 0.0.4 text format does not allow."""
    types, helps, samples, seen = {}, {}, [], set()
    if text and not text.endswith('\n'):
        raise ValueError('the text must end with a line feed')
    for n, line in enumerate(text.split('\n')[:-1], 1):
        if not line.strip():
            continue
        if line.startswith('#'):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] == 'TYPE':
                if parts[2] in types:
                    raise ValueError('line %d: second TYPE for %s' % (n, parts[2]))
                if any(s[0] == parts[2] for s in samples):
                    raise ValueError('line %d: TYPE after samples of %s' % (n, parts[2]))
                if len(parts) != 4 or parts[3] not in ('counter', 'gauge', 'histogram',
                                                       'summary', 'untyped'):
                    raise ValueError('line %d: bad TYPE line %r' % (n, line))
                types[parts[2]] = parts[3]
            elif len(parts) >= 3 and parts[1] == 'HELP':
                if parts[2] in helps:
                    raise ValueError('line %d: second HELP for %s' % (n, parts[2]))
                helps[parts[2]] = parts[3] if len(parts) > 3 else ''
            continue
        m = SAMPLE_RE.match(line)
        if not m:
            raise ValueError('line %d: not a sample: %r' % (n, line))
        name, labels = m.group(1), parse_labels(m.group(3) or '')
        v = m.group(4)
        value = {'+Inf': math.inf, '-Inf': -math.inf, 'NaN': math.nan}.get(v)
        if value is None:
            value = float(v)
        key = (name, tuple(sorted(labels.items())))
        if key in seen:
            raise ValueError('line %d: sample %s%s twice' % (n, name, labels))
        seen.add(key)
        samples.append((name, labels, value))
    return {'types': types, 'help': helps, 'samples': samples}


def metric(parsed, name, **labels):
    """The value of the one sample of @name whose labels include @labels, or None."""
    got = [v for (n, lb, v) in parsed['samples']
           if n == name and all(lb.get(k) == str(x) for k, x in labels.items())]
    if len(got) > 1:
        raise AssertionError('%d samples of %s%s' % (len(got), name, labels))
    return got[0] if got else None


# ---- a small OpenAPI 3.0 schema checker (the subset spec/openapi.json uses) ----------

def resolve_ref(doc, ref):
    node = doc
    for part in ref[2:].split('/'):
        node = node[part.replace('~1', '/').replace('~0', '~')]
    return node


def schema_errors(doc, schema, value, where='$'):
    """A list of the ways @value does not match @schema (empty when it does)."""
    if '$ref' in schema:
        return schema_errors(doc, resolve_ref(doc, schema['$ref']), value, where)
    if value is None:
        return [] if schema.get('nullable') else ['%s: null is not allowed' % where]
    errs = []
    for sub in schema.get('allOf', []):
        errs += schema_errors(doc, sub, value, where)
    if 'oneOf' in schema:
        n = sum(1 for sub in schema['oneOf'] if not schema_errors(doc, sub, value, where))
        if n != 1:
            errs.append('%s: matches %d of the oneOf schemas' % (where, n))
    t = schema.get('type')
    kinds = {'object': dict, 'array': list, 'string': str, 'boolean': bool}
    if t in kinds and not isinstance(value, kinds[t]):
        return errs + ['%s: %r is not a %s' % (where, value, t)]
    if t == 'integer' and (isinstance(value, bool) or not isinstance(value, int)):
        return errs + ['%s: %r is not an integer' % (where, value)]
    if t == 'number' and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return errs + ['%s: %r is not a number' % (where, value)]
    if 'enum' in schema and value not in schema['enum']:
        errs.append('%s: %r is not one of %r' % (where, value, schema['enum']))
    if isinstance(value, dict) and (t == 'object' or 'properties' in schema):
        props = schema.get('properties', {})
        for k in schema.get('required', []):
            if k not in value:
                errs.append('%s: %s is missing' % (where, k))
        extra = schema.get('additionalProperties', True)
        for k, v in value.items():
            if k in props:
                errs += schema_errors(doc, props[k], v, '%s.%s' % (where, k))
            elif extra is False:
                errs.append('%s: %s is not in the spec' % (where, k))
            elif isinstance(extra, dict):
                errs += schema_errors(doc, extra, v, '%s.%s' % (where, k))
    if isinstance(value, list) and 'items' in schema:
        for i, v in enumerate(value):
            errs += schema_errors(doc, schema['items'], v, '%s[%d]' % (where, i))
    return errs


def load_spec():
    with open(os.path.join(ROOT, 'spec', 'openapi.json')) as f:
        return json.load(f)


def response_schema(doc, method, path, status):
    op = doc['paths'][path][method.lower()]
    resp = op['responses'].get(str(status)) or op['responses']['default']
    if '$ref' in resp:
        resp = resolve_ref(doc, resp['$ref'])
    return resp['content']['application/json']['schema']


# ---- daemon and requests -----------------------------------------------------------

def pipelines_yaml(*items):
    return 'Workers: 2\nPipelines:\n' + '\n'.join(items) + '\n'


def tcp_item(name, to_port):
    return ('  - Name: %s\n    From: {tcp: {Listen: "127.0.0.1:0"}}\n'
            '    To: {tcp: {Connect: "127.0.0.1:%d"}}' % (name, to_port))


def udp_item(name, to_port):
    return ('  - Name: %s\n    From: {udp: {Listen: "127.0.0.1:0"}}\n'
            '    To: {udp: {Connect: "127.0.0.1:%d"}}' % (name, to_port))


class Base(LogOnFailure, unittest.TestCase):
    def start(self, config, auth=True):
        d = ApiDaemon(config, auth=auth)
        self._daemons = getattr(self, '_daemons', [])
        self._daemons.append(d)
        self.addCleanup(d.stop_and_check)
        d.start()
        return d

    def server(self, cls=RecordingServer):
        s = cls()
        self.addCleanup(s.stop)
        return s

    def client(self, port):
        c = socket.create_connection((HOST, port), timeout=10)
        self.addCleanup(c.close)
        return c

    def old(self, d, method, path, key='admin', body=None, query=None, headers=None):
        """An old-API request with the key in ?key=. Returns (status, json, raw, headers)."""
        q = dict(query or {})
        if key == 'admin':
            key = d.admin_key
        if key is not None:
            q['key'] = key
        url = path + ('?' + urllib.parse.urlencode(q) if q else '')
        return d.request(method, url, body=body, key=None, headers=headers)

    def assert_old_ok(self, res, what=''):
        st, js, raw, hdr = res
        self.assertEqual(st, 200, '%s: %s %r' % (what, st, raw))
        self.assertIsInstance(js, dict, raw)
        self.assertEqual(sorted(js), ['Data', 'Status'], raw)
        self.assertEqual(js['Status'], 200, raw)
        self.assertTrue(hget(hdr, 'Content-Type').startswith('application/json'), hdr)
        return js['Data']

    def assert_old_err(self, res, status, what='', contains=None):
        st, js, raw, _ = res
        self.assertEqual(st, status, '%s: %s %r' % (what, st, raw))
        self.assertIsInstance(js, dict, '%s: %r' % (what, raw))
        self.assertEqual(sorted(js), ['Data', 'Status'], raw)
        self.assertEqual(js['Status'], status, raw)
        self.assertIsInstance(js['Data'], str, raw)
        self.assertTrue(js['Data'], raw)
        if contains:
            self.assertIn(contains, js['Data'])
        return js['Data']

    def proxies(self, d, n, timeout=10.0):
        """Wait until /api/1/proxies lists at least n sessions; return the list."""
        dl = Deadline(timeout)
        while True:
            data = self.assert_old_ok(self.old(d, 'GET', '/api/1/proxies'))
            if len(data) >= n:
                return data
            if dl.expired():
                self.fail('expected %d session(s) in /api/1/proxies, got %r' % (n, data))
            dl.sleep(0.02)

    def metrics(self, d, key='admin'):
        st, _, raw, hdr = d.get('/metrics', key=key, raw=True)
        self.assertEqual(st, 200, raw)
        self.assertTrue(hget(hdr, 'Content-Type').startswith('text/plain; version=0.0.4'), hdr)
        return parse_prometheus(raw.decode('utf-8'))


def hget(headers, name):
    for k, v in headers.items():
        if k.lower() == name.lower():
            return v
    return ''


def b64(data):
    return base64.b64encode(data).decode()


# ---- v1 REST ---------------------------------------------------------------------

class OldStatus(Base):
    def test_status_and_proxies_shapes(self):
        s1, s2 = self.server(), self.server()
        u = UdpEchoServer()
        self.addCleanup(u.stop)
        d = self.start(pipelines_yaml(tcp_item('first', s1.port), tcp_item('second', s2.port),
                                      udp_item('third', u.port)))
        data = self.assert_old_ok(self.old(d, 'GET', '/api/1/status'))
        self.assertEqual(list(data), ['ConnectionCount', 'Alive', 'BytesSent', 'ProxyAddress',
                                      'ServerAddress'])
        self.assertEqual(data['ConnectionCount'], 0)
        self.assertIs(data['Alive'], True)
        self.assertEqual(data['ProxyAddress'], '127.0.0.1:%d' % d.port('first'))
        self.assertEqual(data['ServerAddress'], '127.0.0.1:%d' % s1.port)
        base_bytes = data['BytesSent']

        c1, c2 = self.client(d.port('first')), self.client(d.port('second'))
        c1.sendall(b'abc')
        c2.sendall(b'defgh')
        self.assertTrue(s1.wait_data(0, b'abc')[0])
        self.assertTrue(s2.wait_data(0, b'defgh')[0])
        s1.send_all(b'xy')
        self.assertEqual(recv_exact(c1, 2, Deadline(5)), b'xy')
        us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(us.close)
        us.bind((HOST, 0))
        us.settimeout(5)
        us.sendto(b'1234', (HOST, d.port('third')))
        self.assertEqual(us.recvfrom(100)[0], b'1234')

        proxies = self.proxies(d, 3)
        self.assertEqual(len(proxies), 3, proxies)
        by_addr = {p['Address']: p for p in proxies}
        for p in proxies:
            self.assertEqual(list(p), ['Id', 'Alive', 'Address', 'Network', 'BytesSent',
                                       'LastContactAgo'])
            self.assertIsInstance(p['Id'], int)
            self.assertIs(p['Alive'], True)
            self.assertIsInstance(p['LastContactAgo'], int)
            self.assertGreaterEqual(p['LastContactAgo'], 0)
            self.assertLess(p['LastContactAgo'], 60000)
        a1 = '%s:%d' % c1.getsockname()
        a2 = '%s:%d' % c2.getsockname()
        au = '%s:%d' % us.getsockname()
        self.assertEqual(set(by_addr), {a1, a2, au}, proxies)
        self.assertEqual(by_addr[a1]['Network'], 'tcp')
        self.assertEqual(by_addr[a2]['Network'], 'tcp')
        self.assertEqual(by_addr[au]['Network'], 'udp')
        self.assertEqual(by_addr[a1]['BytesSent'], 5)   # 3 up, 2 down
        self.assertEqual(by_addr[a2]['BytesSent'], 5)
        self.assertEqual(by_addr[au]['BytesSent'], 8)
        self.assertEqual(len({p['Id'] for p in proxies}), 3)

        data = self.assert_old_ok(self.old(d, 'GET', '/api/1/status'))
        self.assertEqual(data['ConnectionCount'], 3)
        self.assertEqual(data['BytesSent'] - base_bytes, 18)
        self.assertEqual(data['ProxyAddress'], '127.0.0.1:%d' % d.port('first'))

    def test_no_sessions_is_an_empty_list(self):
        s = self.server()
        d = self.start(pipelines_yaml(tcp_item('only', s.port)))
        self.assertEqual(self.assert_old_ok(self.old(d, 'GET', '/api/1/proxies')), [])

    def test_no_pipelines(self):
        d = self.start('Pipelines: []\n')
        data = self.assert_old_ok(self.old(d, 'GET', '/api/1/status'))
        self.assertEqual(data, {'ConnectionCount': 0, 'Alive': False, 'BytesSent': 0,
                                'ProxyAddress': '', 'ServerAddress': ''})
        self.assertEqual(self.assert_old_ok(self.old(d, 'GET', '/api/1/proxies')), [])
        self.assert_old_ok(self.old(d, 'POST', '/api/1/inject',
                                    body={'Id': -1, 'Data': 'YQ==', 'ToClient': True}))
        m = self.metrics(d)
        self.assertEqual(metric(m, 'ezproxy_up'), 1)
        self.assertIsNone(metric(m, 'ezproxy_sessions'))

    def test_key_in_bearer_header_works_too(self):
        s = self.server()
        d = self.start(pipelines_yaml(tcp_item('only', s.port)))
        st, js, raw, _ = d.get('/api/1/status')
        self.assertEqual(st, 200, raw)
        self.assertEqual(js['Status'], 200)


    def test_old_envelope_for_unknown_routes_and_methods(self):
        s = self.server()
        d = self.start(pipelines_yaml(tcp_item('only', s.port)))
        self.assert_old_err(self.old(d, 'POST', '/api/1/status', body={}), 405, 'POST status')
        self.assert_old_err(self.old(d, 'DELETE', '/api/1/inject'), 405, 'DELETE inject')
        self.assert_old_err(self.old(d, 'GET', '/api/1/nothing'), 404, 'unknown v1 route')
        # the old program served its REST routes under /api/1/ only
        for path in ('/api/2/status', '/api/2/proxies', '/api/2/keyinfo', '/api/1/socket',
                     '/api/1/close'):
            self.assert_old_err(self.old(d, 'GET', path), 404, path)
        # /api/2/socket is a WebSocket: a plain GET is refused in the old envelope
        st, js, raw, _ = self.old(d, 'GET', '/api/2/socket')
        self.assertIn(st, (400, 426), raw)
        self.assert_old_err((st, js, raw, {}), st, 'plain GET of the socket')


class OldAuth(Base):
    # method, path, the bit it needs, the body, the bits a key needs beside it to succeed
    ROUTES = [('GET', '/api/1/status', CHECK_STATUS, None, 0),
              ('GET', '/api/1/proxies', CHECK_STATUS, None, 0),
              ('POST', '/api/1/inject', INJECT, {'Id': -1, 'Data': 'YQ==', 'ToServer': True}, 0),
              ('GET', '/api/1/newkey', MAKE_KEYS, None, CHECK_STATUS),
              ('GET', '/api/1/keyinfo', 0, None, 0)]

    def test_401_missing_and_unknown_key(self):
        s = self.server()
        d = self.start(pipelines_yaml(tcp_item('only', s.port)))
        for method, path, _, body, _ in self.ROUTES:
            q = {'perms': '1'} if path.endswith('newkey') else None
            self.assert_old_err(self.old(d, method, path, key=None, body=body, query=q), 401,
                                '%s without a key' % path)
            self.assert_old_err(self.old(d, method, path, key='00' * 32, body=body, query=q),
                                401, '%s with an unknown key' % path)
            self.assert_old_err(self.old(d, method, path, key='beef', body=body, query=q), 401,
                                '%s with an old-style key' % path)

    def test_403_per_missing_permission(self):
        s = self.server()
        d = self.start(pipelines_yaml(tcp_item('only', s.port)))
        for method, path, need, body, beside in self.ROUTES:
            q = {'perms': '1'} if path.endswith('newkey') else None
            if not need:
                continue
            # every bit but the one needed
            key = d.make_key(ALL & ~need, name='no-%d' % need)
            self.assert_old_err(self.old(d, method, path, key=key, body=body, query=q), 403,
                                '%s without bit %d' % (path, need))
            key = d.make_key(need | beside, name='only-%d' % need)
            st, js, raw, _ = self.old(d, method, path, key=key, body=body, query=q)
            self.assertEqual(st, 200, '%s with only bit %d: %s %r' % (path, need, st, raw))
        # keyinfo needs no bit: a key with only Close answers
        key = d.make_key(CLOSE)
        self.assert_old_ok(self.old(d, 'GET', '/api/1/keyinfo', key=key))


class OldInject(Base):
    def test_inject_one_session_both_ways(self):
        s = self.server()
        d = self.start(pipelines_yaml(tcp_item('only', s.port)))
        c = self.client(d.port('only'))
        c.sendall(b'hi')
        self.assertTrue(s.wait_data(0, b'hi')[0])
        (p,) = self.proxies(d, 1)

        res = self.old(d, 'POST', '/api/1/inject', body={'Id': p['Id'], 'Data': b64(b'to-srv'),
                                                         'ToClient': False, 'ToServer': True})
        self.assertEqual(self.assert_old_ok(res), '')
        ok, got = s.wait_data(0, b'hito-srv')
        self.assertTrue(ok, got)

        res = self.old(d, 'POST', '/api/1/inject', body={'Id': p['Id'], 'Data': b64(b'to-cli'),
                                                         'ToClient': True})
        self.assertEqual(self.assert_old_ok(res), '')
        self.assertEqual(recv_exact(c, 6, Deadline(5)), b'to-cli')

        res = self.old(d, 'POST', '/api/1/inject', body={'Id': p['Id'], 'Data': b64(b'<both>'),
                                                         'ToClient': True, 'ToServer': True})
        self.assert_old_ok(res)
        self.assertEqual(recv_exact(c, 6, Deadline(5)), b'<both>')
        ok, got = s.wait_data(0, b'<both>')
        self.assertTrue(ok, got)

        # Go matched field names without regard to case; so do we
        res = self.old(d, 'POST', '/api/1/inject', body={'id': p['Id'], 'data': b64(b'lower'),
                                                         'toclient': True, 'Extra': 1})
        self.assert_old_ok(res)
        self.assertEqual(recv_exact(c, 5, Deadline(5)), b'lower')
        # every base64 character, CR/LF inside (Go skipped them), null fields as absent
        raw = bytes(range(256))
        text = b64(raw)
        self.assertIn('+', text)
        self.assertIn('/', text)
        res = self.old(d, 'POST', '/api/1/inject', body={
            'Id': p['Id'], 'Data': text[:100] + '\r\n' + text[100:], 'ToServer': None,
            'ToClient': True})
        self.assert_old_ok(res)
        self.assertEqual(recv_exact(c, 256, Deadline(5)), raw)
        # empty data is accepted and sends nothing
        self.assert_old_ok(self.old(d, 'POST', '/api/1/inject',
                                    body={'Id': p['Id'], 'Data': '', 'ToClient': True}))

    def test_inject_all_over_two_pipelines(self):
        s1, s2 = self.server(), self.server()
        d = self.start(pipelines_yaml(tcp_item('one', s1.port), tcp_item('two', s2.port)))
        c1, c2 = self.client(d.port('one')), self.client(d.port('two'))
        c1.sendall(b'1')
        c2.sendall(b'2')
        self.assertTrue(s1.wait_data(0, b'1')[0])
        self.assertTrue(s2.wait_data(0, b'2')[0])
        self.proxies(d, 2)
        self.assert_old_ok(self.old(d, 'POST', '/api/1/inject',
                                    body={'Id': -1, 'Data': b64(b'ALL'), 'ToServer': True}))
        self.assertTrue(s1.wait_data(0, b'1ALL')[0])
        self.assertTrue(s2.wait_data(0, b'2ALL')[0])
        self.assert_old_ok(self.old(d, 'POST', '/api/1/inject',
                                    body={'Id': -1, 'Data': b64(b'ALL2'), 'ToClient': True}))
        self.assertEqual(recv_exact(c1, 4, Deadline(5)), b'ALL2')
        self.assertEqual(recv_exact(c2, 4, Deadline(5)), b'ALL2')
        # metrics count injected packets per pipeline
        m = self.metrics(d)
        self.assertGreaterEqual(metric(m, 'ezproxy_injected_total', pipeline='one'), 2)
        self.assertGreaterEqual(metric(m, 'ezproxy_injected_total', pipeline='two'), 2)

    def test_inject_over_the_pipeline_limit(self):
        s = self.server()
        d = self.start(pipelines_yaml(tcp_item('small', s.port) +
                                      '\n    Limits: {MaxInjectBytes: 16}'))
        c = self.client(d.port('small'))
        c.sendall(b'x')
        (p,) = self.proxies(d, 1)
        self.assert_old_err(self.old(d, 'POST', '/api/1/inject', body={
            'Id': p['Id'], 'Data': b64(b'y' * 17), 'ToServer': True}), 413, 'over the limit',
            'MaxInjectBytes')
        self.assert_old_ok(self.old(d, 'POST', '/api/1/inject', body={
            'Id': p['Id'], 'Data': b64(b'y' * 16), 'ToServer': True}))
        ok, got = s.wait_data(0, b'x' + b'y' * 16)
        self.assertTrue(ok, got)

    def test_inject_bad_input(self):
        s = self.server()
        d = self.start(pipelines_yaml(tcp_item('only', s.port)))
        c = self.client(d.port('only'))
        c.sendall(b'x')
        (p,) = self.proxies(d, 1)
        good = {'Id': p['Id'], 'Data': b64(b'ok'), 'ToServer': True}
        cases = [
            ('bad JSON', '{"Id": 1,', 'invalid JSON'),
            ('not an object', '[1, 2]', 'object'),
            ('empty body', b'', 'invalid JSON'),
            ('duplicate key', '{"Id": %d, "Id": %d, "ToServer": true}' % (p['Id'], p['Id']),
             'duplicate'),
            ('duplicate key by case', '{"Id": %d, "id": %d, "ToServer": true}'
             % (p['Id'], p['Id']), 'twice'),
            ('bad base64', dict(good, Data='!!!!'), 'base64'),
            ('base64 without padding', dict(good, Data='aGk'), 'base64'),
            ('Data not a string', dict(good, Data=[1]), 'Data'),
            ('no direction', {'Id': p['Id'], 'Data': b64(b'x')}, 'ToClient and/or ToServer'),
            ('both false', dict(good, ToServer=False, ToClient=False), 'ToClient'),
            ('direction not a bool', dict(good, ToServer='yes'), 'ToServer'),
            ('Id missing', {'Data': b64(b'x'), 'ToServer': True}, 'Id'),
            ('Id a string', dict(good, Id=str(p['Id'])), 'Id'),
            ('Id a fraction', '{"Id": 1.5, "ToServer": true}', 'Id'),
            ('Id below -1', dict(good, Id=-2), 'Id'),
        ]
        for what, body, text in cases:
            self.assert_old_err(self.old(d, 'POST', '/api/1/inject', body=body), 400, what, text)
        self.assert_old_err(self.old(d, 'POST', '/api/1/inject', body=dict(good, Id=p['Id'] + 999)),
                            404, 'unknown session', 'proxy not found')
        self.assert_old_err(self.old(d, 'POST', '/api/1/inject',
                                     body=dict(good, Id=p['Id'] + 999, Data='')),
                            404, 'unknown session, empty data')
        # nothing reached the server
        self.assertTrue(s.wait_data(0, b'x')[0])
        self.assertEqual(bytes(s.received[0]), b'x')


class OldKeys(Base):
    def test_newkey_rules(self):
        s = self.server()
        d = self.start(pipelines_yaml(tcp_item('only', s.port)))
        data = self.assert_old_ok(self.old(d, 'GET', '/api/1/newkey', query={'perms': '1'}))
        self.assertEqual(list(data), ['Key', 'Perms'])
        self.assertEqual(data['Perms'], CHECK_STATUS)
        self.assertIsInstance(data['Key'], str)
        k1 = data['Key']
        self.assert_old_ok(self.old(d, 'GET', '/api/1/status', key=k1))
        self.assert_old_err(self.old(d, 'GET', '/api/1/newkey', key=k1, query={'perms': '1'}),
                            403, 'newkey without MakeKeys')
        info = self.assert_old_ok(self.old(d, 'GET', '/api/1/keyinfo', key=k1))
        self.assertEqual(info['Value'], CHECK_STATUS)

        # Go's integer syntax: 0x, 0o, 0b, leading 0
        for text, want in (('0x11', 0x11), ('0X1F', 0x1f), ('0b1', 1), ('0o20', 16),
                           ('020', 16), ('+4', 4), ('0b1_1', 3), ('0x_1', 1)):
            data = self.assert_old_ok(self.old(d, 'GET', '/api/1/newkey', query={'perms': text}))
            self.assertEqual(data['Perms'], want, text)
        # bits above the known ones are ignored, as the old program did
        data = self.assert_old_ok(self.old(d, 'GET', '/api/1/newkey',
                                           query={'perms': str(0xfffffffffffffff)}))
        self.assertEqual(data['Perms'], ALL)

        maker = self.assert_old_ok(self.old(d, 'GET', '/api/1/newkey',
                                            query={'perms': str(MAKE_KEYS | CHECK_STATUS |
                                                                INJECT)}))
        self.assertEqual(maker['Perms'], MAKE_KEYS | CHECK_STATUS | INJECT)
        mk = maker['Key']
        data = self.assert_old_ok(self.old(d, 'GET', '/api/1/newkey', key=mk,
                                           query={'perms': str(CHECK_STATUS | INJECT)}))
        self.assertEqual(data['Perms'], CHECK_STATUS | INJECT)
        self.assert_old_err(self.old(d, 'GET', '/api/1/newkey', key=mk,
                                     query={'perms': str(CLOSE)}),
                            403, 'a bit the maker lacks', "'CanClose'")
        self.assert_old_err(self.old(d, 'GET', '/api/1/newkey', key=mk,
                                     query={'perms': str(MAKE_KEYS | CHECK_STATUS)}),
                            403, 'MakeKeys without DuplicateKeys', "'CanMakeKeys'")

        dup = self.assert_old_ok(self.old(d, 'GET', '/api/1/newkey', query={
            'perms': str(MAKE_KEYS | DUP_KEYS | CHECK_STATUS)}))['Key']
        data = self.assert_old_ok(self.old(d, 'GET', '/api/1/newkey', key=dup,
                                           query={'perms': str(MAKE_KEYS | CHECK_STATUS)}))
        self.assertEqual(data['Perms'], MAKE_KEYS | CHECK_STATUS)

        for q, what in (({}, 'no perms'), ({'perms': 'abc'}, 'not a number'),
                        ({'perms': '-1'}, 'negative'), ({'perms': ''}, 'empty'),
                        ({'perms': '0'}, 'no bits'), ({'perms': '1024'}, 'only unknown bits'),
                        ({'perms': '99999999999999999999'}, 'too large'),
                        ({'perms': '1_0'}, '_ without a prefix'), ({'perms': '0x1__0'}, '__'),
                        ({'perms': '0x1_'}, 'trailing _'), ({'perms': '0x'}, 'no digits'),
                        ({'perms': '09'}, 'not octal'), ({'perms': '0b2'}, 'not binary')):
            self.assert_old_err(self.old(d, 'GET', '/api/1/newkey', query=q), 400, what)

    def test_keyinfo_bits(self):
        s = self.server()
        d = self.start(pipelines_yaml(tcp_item('only', s.port)))
        info = self.assert_old_ok(self.old(d, 'GET', '/api/1/keyinfo'))
        self.assertEqual(list(info), KEYINFO_FIELDS)
        self.assertEqual(info['Value'], ALL)
        self.assertIs(info['Admin'], True)
        for name, _ in KEYINFO_BITS:
            self.assertIs(info[name], True, name)
        for perms in (CHECK_STATUS, CLOSE | INJECT, USE_WS | FILTER, MAKE_KEYS | DUP_KEYS,
                      RECONF | CAPTURE, ALL & ~CAPTURE):
            key = d.make_key(perms, name='p%d' % perms)
            info = self.assert_old_ok(self.old(d, 'GET', '/api/1/keyinfo', key=key))
            self.assertEqual(list(info), KEYINFO_FIELDS)
            self.assertEqual(info['Value'], perms)
            self.assertIs(info['Admin'], False)
            for name, bit in KEYINFO_BITS:
                self.assertIs(info[name], bool(perms & bit), '%s of %d' % (name, perms))

    def test_auth_off(self):
        s = self.server()
        d = self.start(pipelines_yaml(tcp_item('only', s.port)), auth=False)
        info = self.assert_old_ok(self.old(d, 'GET', '/api/1/keyinfo', key=None))
        self.assertEqual(info['Value'], ALL)
        self.assertIs(info['Admin'], True)
        self.assert_old_ok(self.old(d, 'GET', '/api/1/status', key=None))
        self.assert_old_err(self.old(d, 'GET', '/api/1/newkey', key=None, query={'perms': '1'}),
                            501, 'newkey with Auth off', 'Auth: false')


# ---- /metrics, openapi.json, / ------------------------------------------------------

FAMILIES = {
    'ezproxy_up': 'gauge', 'ezproxy_uptime_seconds': 'gauge', 'ezproxy_sessions': 'gauge',
    'ezproxy_sessions_total': 'counter', 'ezproxy_bytes_total': 'counter',
    'ezproxy_packets_total': 'counter', 'ezproxy_verdicts_total': 'counter',
    'ezproxy_injected_total': 'counter', 'ezproxy_hold_timeouts_total': 'counter',
    'ezproxy_connect_failures_total': 'counter', 'ezproxy_refused_total': 'counter',
    'ezproxy_tap_drops_total': 'counter', 'ezproxy_api_requests_total': 'counter',
}


class Metrics(Base):
    def test_metrics_text_and_counters(self):
        s = self.server()
        u = UdpEchoServer()
        self.addCleanup(u.stop)
        d = self.start(pipelines_yaml(tcp_item('web', s.port), udp_item('game', u.port)))
        m0 = self.metrics(d)
        self.assertEqual(m0['types'], FAMILIES)
        self.assertEqual(set(m0['help']), set(FAMILIES))
        for name in FAMILIES:
            self.assertTrue(m0['help'][name], name)
        self.assertEqual(metric(m0, 'ezproxy_up'), 1)
        self.assertGreaterEqual(metric(m0, 'ezproxy_uptime_seconds'), 0)
        self.assertIsNotNone(metric(m0, 'ezproxy_tap_drops_total'))
        for p in ('web', 'game'):
            self.assertEqual(metric(m0, 'ezproxy_sessions', pipeline=p), 0)
            self.assertEqual(metric(m0, 'ezproxy_sessions_total', pipeline=p), 0)
            for dr in ('to_server', 'to_client'):
                self.assertEqual(metric(m0, 'ezproxy_bytes_total', pipeline=p, direction=dr), 0)
                self.assertEqual(metric(m0, 'ezproxy_packets_total', pipeline=p, direction=dr),
                                 0)
            for v in ('dropped', 'replaced', 'held'):
                self.assertEqual(metric(m0, 'ezproxy_verdicts_total', pipeline=p, verdict=v), 0)
            for name in ('ezproxy_injected_total', 'ezproxy_hold_timeouts_total',
                         'ezproxy_connect_failures_total', 'ezproxy_refused_total'):
                self.assertEqual(metric(m0, name, pipeline=p), 0, name)

        c = self.client(d.port('web'))
        c.sendall(b'a' * 1000)
        self.assertTrue(s.wait_data(0, b'a' * 1000)[0])
        s.send_all(b'b' * 300)
        self.assertEqual(recv_exact(c, 300, Deadline(5)), b'b' * 300)
        us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(us.close)
        us.bind((HOST, 0))
        us.settimeout(5)
        for i in range(3):
            us.sendto(b'%d' % i * 10, (HOST, d.port('game')))
            self.assertEqual(len(us.recvfrom(100)[0]), 10)

        m1 = self.metrics(d)
        self.assertEqual(metric(m1, 'ezproxy_sessions', pipeline='web'), 1)
        self.assertEqual(metric(m1, 'ezproxy_sessions_total', pipeline='web'), 1)
        self.assertEqual(metric(m1, 'ezproxy_bytes_total', pipeline='web', direction='to_server'),
                         1000)
        self.assertEqual(metric(m1, 'ezproxy_bytes_total', pipeline='web', direction='to_client'),
                         300)
        self.assertGreaterEqual(metric(m1, 'ezproxy_packets_total', pipeline='web',
                                       direction='to_server'), 1)
        self.assertGreaterEqual(metric(m1, 'ezproxy_packets_total', pipeline='web',
                                       direction='to_client'), 1)
        self.assertEqual(metric(m1, 'ezproxy_sessions', pipeline='game'), 1)
        self.assertEqual(metric(m1, 'ezproxy_bytes_total', pipeline='game',
                                direction='to_server'), 30)
        self.assertEqual(metric(m1, 'ezproxy_bytes_total', pipeline='game',
                                direction='to_client'), 30)
        self.assertEqual(metric(m1, 'ezproxy_packets_total', pipeline='game',
                                direction='to_server'), 3)
        self.assertEqual(metric(m1, 'ezproxy_packets_total', pipeline='game',
                                direction='to_client'), 3)
        # the first /metrics request was counted
        self.assertGreaterEqual(metric(m1, 'ezproxy_api_requests_total', route='/metrics',
                                       method='GET', status=200), 1)

        c.close()
        dl = Deadline(10)
        while metric(self.metrics(d), 'ezproxy_sessions', pipeline='web') != 0:
            self.assertFalse(dl.expired(), 'the closed TCP session is still counted live')
            dl.sleep(0.02)
        m2 = self.metrics(d)
        self.assertEqual(metric(m2, 'ezproxy_sessions_total', pipeline='web'), 1)
        self.assertEqual(metric(m2, 'ezproxy_bytes_total', pipeline='web', direction='to_server'),
                         1000)

    def test_api_requests_counted_by_route_and_status(self):
        s = self.server()
        d = self.start(pipelines_yaml(tcp_item('only', s.port)))

        def count(m, route, method, status):
            return metric(m, 'ezproxy_api_requests_total', route=route, method=method,
                          status=status) or 0

        before = self.metrics(d)
        for _ in range(3):
            self.assert_old_ok(self.old(d, 'GET', '/api/1/status'))
        self.assert_old_err(self.old(d, 'GET', '/api/1/status', key=None), 401)
        self.assert_old_err(self.old(d, 'GET', '/api/1/status', key='11' * 32), 401)
        self.assert_old_err(self.old(d, 'POST', '/api/1/inject', body='{'), 400)
        key = d.make_key(CLOSE)
        self.assert_old_err(self.old(d, 'GET', '/api/1/proxies', key=key), 403)
        after = self.metrics(d)
        self.assertEqual(count(after, '/api/1/status', 'GET', 200) -
                         count(before, '/api/1/status', 'GET', 200), 3)
        self.assertEqual(count(after, '/api/1/status', 'GET', 401) -
                         count(before, '/api/1/status', 'GET', 401), 2)
        self.assertEqual(count(after, '/api/1/inject', 'POST', 400) -
                         count(before, '/api/1/inject', 'POST', 400), 1)
        self.assertEqual(count(after, '/api/1/proxies', 'GET', 403) -
                         count(before, '/api/1/proxies', 'GET', 403), 1)
        self.assertGreaterEqual(count(after, '/metrics', 'GET', 200), 1)

    def test_metrics_needs_check_status(self):
        s = self.server()
        d = self.start(pipelines_yaml(tcp_item('only', s.port)))
        st, js, raw, _ = d.get('/metrics', key=None)
        self.assertEqual(st, 401, raw)
        self.assertIn('error', js)
        st, js, raw, _ = d.get('/metrics', key=d.make_key(ALL & ~CHECK_STATUS & ~MAKE_KEYS))
        self.assertEqual(st, 403, raw)
        self.assertIn('error', js)
        # ?key= works for scrapers that cannot send headers
        st, _, raw, hdr = d.get('/metrics?key=' + d.admin_key, key=None, raw=True)
        self.assertEqual(st, 200, raw)
        parse_prometheus(raw.decode())

    def test_parser_rejects_bad_text(self):
        # the test's own parser must catch what a scraper would refuse
        for bad in ('x 1', 'x{a="1"} 1\nx{a="1"} 2\n', '# TYPE x foo\nx 1\n',
                    'x 1\n# TYPE x counter\n', 'x{a=1} 2\n', 'x one\n'):
            with self.assertRaises(ValueError, msg=bad):
                parse_prometheus(bad)
        p = parse_prometheus('# HELP x a\n# TYPE x counter\nx{a="q\\"\\\\\\n"} 2\n')
        self.assertEqual(p['samples'], [('x', {'a': 'q"\\\n'}, 2.0)])


class OpenApi(Base):
    def test_openapi_served_equals_spec(self):
        s = self.server()
        d = self.start(pipelines_yaml(tcp_item('only', s.port)))
        st, js, raw, hdr = d.get('/api/3/openapi.json')
        self.assertEqual(st, 200, raw[:200])
        self.assertTrue(hget(hdr, 'Content-Type').startswith('application/json'), hdr)
        with open(os.path.join(ROOT, 'spec', 'openapi.json'), 'rb') as f:
            self.assertEqual(raw, f.read())
        self.assertTrue(js['openapi'].startswith('3.0'))
        st, _, raw, _ = d.get('/api/3/openapi.json', key=None)
        self.assertEqual(st, 401, raw)

    def test_live_answers_match_the_spec(self):
        """What the daemon answers (v3, old, errors) has the shapes the spec gives."""
        doc = load_spec()
        s = self.server()
        d = self.start(pipelines_yaml(tcp_item('one', s.port), tcp_item('two', s.port)))
        c = self.client(d.port('one'))
        c.sendall(b'abc')
        self.assertTrue(s.wait_data(0, b'abc')[0])
        (p,) = self.proxies(d, 1)
        key = d.make_key(CHECK_STATUS | INJECT, name='spec')
        sid = str(p['Id'])
        checks = [  # method, request path, spec path, body, expected status, key
            ('GET', '/api/3/status', '/api/3/status', None, 200, 'admin'),
            ('GET', '/api/3/plugins', '/api/3/plugins', None, 200, 'admin'),
            ('GET', '/api/3/pipelines', '/api/3/pipelines', None, 200, 'admin'),
            ('GET', '/api/3/pipelines/one', '/api/3/pipelines/{name}', None, 200, 'admin'),
            ('GET', '/api/3/pipelines/nope', '/api/3/pipelines/{name}', None, 404, 'admin'),
            ('GET', '/api/3/sessions', '/api/3/sessions', None, 200, 'admin'),
            ('GET', '/api/3/sessions/' + sid, '/api/3/sessions/{id}', None, 200, 'admin'),
            ('GET', '/api/3/sessions/x', '/api/3/sessions/{id}', None, 400, 'admin'),
            ('POST', '/api/3/sessions/%s/inject' % sid, '/api/3/sessions/{id}/inject',
             {'direction': 'to_server', 'data': b64(b'q')}, 200, 'admin'),
            ('POST', '/api/3/pipelines/one/inject', '/api/3/pipelines/{name}/inject',
             {'direction': 'to_client', 'data': b64(b'q')}, 200, 'admin'),
            ('POST', '/api/3/pipelines/one/inject', '/api/3/pipelines/{name}/inject',
             '{"direction": 1', 400, 'admin'),
            ('GET', '/api/3/config', '/api/3/config', None, 200, 'admin'),
            ('GET', '/api/3/keys', '/api/3/keys', None, 200, 'admin'),
            ('GET', '/api/3/keys/self', '/api/3/keys/self', None, 200, 'admin'),
            ('GET', '/api/3/keys/self', '/api/3/keys/self', None, 200, key),
            ('POST', '/api/3/keys', '/api/3/keys', {'perms': ['CheckStatus'], 'name': 'x'},
             201, 'admin'),
            ('GET', '/api/3/status', '/api/3/status', None, 401, None),
            ('GET', '/api/3/config', '/api/3/config', None, 403, key),
            ('GET', '/api/1/status', '/api/1/status', None, 200, 'admin'),
            ('GET', '/api/1/proxies', '/api/1/proxies', None, 200, 'admin'),
            ('GET', '/api/1/keyinfo', '/api/1/keyinfo', None, 200, key),
            ('GET', '/api/1/newkey?perms=1', '/api/1/newkey', None, 200, 'admin'),
            ('GET', '/api/1/newkey', '/api/1/newkey', None, 400, 'admin'),
            ('POST', '/api/1/inject', '/api/1/inject',
             {'Id': p['Id'], 'Data': b64(b'z'), 'ToServer': True}, 200, 'admin'),
            ('POST', '/api/1/inject', '/api/1/inject', {'Id': p['Id']}, 400, 'admin'),
            ('GET', '/api/1/status', '/api/1/status', None, 401, None),
            ('GET', '/api/1/status', '/api/1/status', None, 403,
             d.make_key(CLOSE, name='close-only')),
        ]
        for method, path, spec_path, body, want, k in checks:
            st, js, raw, _ = d.request(method, path, body=body, key=k)
            self.assertEqual(st, want, '%s %s: %s %r' % (method, path, st, raw))
            errs = schema_errors(doc, response_schema(doc, method, spec_path, st), js)
            self.assertEqual(errs, [], '%s %s -> %s %s' % (method, path, st, raw[:300]))

    def test_schema_checker_finds_differences(self):
        doc = load_spec()
        sess = {'$ref': '#/components/schemas/Session'}
        self.assertTrue(schema_errors(doc, sess, {}))
        self.assertTrue(schema_errors(doc, {'type': 'integer'}, True))
        self.assertTrue(schema_errors(doc, {'type': 'object', 'additionalProperties': False},
                                      {'x': 1}))
        self.assertTrue(schema_errors(doc, {'type': 'string', 'enum': ['a']}, 'b'))
        self.assertEqual(schema_errors(doc, {'type': 'string', 'nullable': True}, None), [])

    def test_check_openapi_script_passes(self):
        p = subprocess.run([sys.executable, os.path.join(ROOT, '.ci', 'check-openapi.py')],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout.decode())

    def test_check_openapi_script_finds_differences(self):
        import shutil
        import tempfile
        tmp = tempfile.mkdtemp(prefix='ezp-openapi-')
        self.addCleanup(shutil.rmtree, tmp, True)
        shutil.copytree(os.path.join(ROOT, 'plugins', 'http-api'),
                        os.path.join(tmp, 'plugins', 'http-api'))
        os.makedirs(os.path.join(tmp, 'spec'))
        with open(os.path.join(ROOT, 'spec', 'openapi.json')) as f:
            doc = json.load(f)
        del doc['paths']['/api/1/keyinfo']
        doc['paths']['/api/9/nothing'] = {'get': {'responses': {'200': {'description': 'x'}}}}
        with open(os.path.join(tmp, 'spec', 'openapi.json'), 'w') as f:
            json.dump(doc, f)
        p = subprocess.run([sys.executable, os.path.join(ROOT, '.ci', 'check-openapi.py'),
                            '--root', tmp], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=60)
        out = p.stdout.decode()
        self.assertEqual(p.returncode, 1, out)
        self.assertIn('GET /api/1/keyinfo', out)
        self.assertIn('GET /api/9/nothing', out)

    def test_root_page_needs_no_key(self):
        s = self.server()
        d = self.start(pipelines_yaml(tcp_item('only', s.port)))
        st, _, raw, hdr = d.get('/', key=None, raw=True)
        self.assertEqual(st, 200, raw)
        self.assertTrue(hget(hdr, 'Content-Type').startswith('text/html'), hdr)
        self.assertIn(b'/api/3/status', raw)


if __name__ == '__main__':
    unittest.main(verbosity=2)
