"""A real daemon with the HTTP API on a free port, and a small HTTP client.

ApiDaemon starts `ezproxy run -c` with an `Api` section on 127.0.0.1:0 and
its own StateDir, waits for the http-api startup line, reads the API port
from it and the first-start admin key from StateDir/admin.key.
"""
import http.client
import json
import os
import re
import ssl

from harness import Daemon, DaemonError, Deadline

# The core prints the source tag as "[http-api]"; "http-api:" is accepted too.
API_RE = r'http-api(?::|\]) listening on (https?)://([\d.]+|\[[0-9a-fA-F:]+\]):(\d+)'


def api_section(auth=True, listen='127.0.0.1:0', extra=''):
    return ('Api:\n  Listen: %s\n  Auth: %s\n%s' % (listen, 'true' if auth else 'false', extra))


class ApiDaemon(Daemon):
    """config: the YAML without `Api:` and `StateDir:` (added here), or full=True
    to use it as given (it must then carry its own Api and StateDir)."""

    def __init__(self, config, auth=True, api_extra='', full=False, state_dir=None, expect=None):
        super().__init__(config=None, expect=expect if expect is not None
                         else re.findall(r'Name:\s*([\w.-]+)', config))
        self.state_dir = state_dir or os.path.join(self.dir, 'state')
        if full:
            text = config
        else:
            text = ('StateDir: %s\n' % self.state_dir) + api_section(auth, extra=api_extra) + config
        self.write_config(text)
        self.auth = auth
        self.scheme = 'http'
        self.api_port = None
        self.admin_key = None

    def start(self, timeout=15.0):
        super().start(timeout=timeout)
        m = self.wait_line(API_RE, timeout=timeout)
        self.scheme, self.api_host, self.api_port = m.group(1), m.group(2), int(m.group(3))
        key_path = os.path.join(self.state_dir, 'admin.key')
        if self.auth and os.path.exists(key_path):
            with open(key_path) as f:
                self.admin_key = f.read().strip()
        return self

    def conn(self, timeout=10.0):
        if self.scheme == 'https':
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection('127.0.0.1', self.api_port, timeout=timeout,
                                               context=ctx)
        return http.client.HTTPConnection('127.0.0.1', self.api_port, timeout=timeout)

    def request(self, method, path, body=None, key='admin', headers=None, raw=False,
                timeout=10.0):
        """Returns (status, parsed JSON or None, raw bytes, response headers).
        key: 'admin' (the admin key), None (no key) or a key string sent as Bearer.
        body: a dict/list (sent as JSON), bytes or str (sent as is)."""
        h = dict(headers or {})
        if key == 'admin':
            key = self.admin_key
        if key is not None:
            h['Authorization'] = 'Bearer ' + key
        data = None
        if body is not None:
            if isinstance(body, (dict, list)):
                data = json.dumps(body).encode()
                h.setdefault('Content-Type', 'application/json')
            elif isinstance(body, str):
                data = body.encode()
            else:
                data = body
        c = self.conn(timeout)
        try:
            c.request(method, path, body=data, headers=h)
            resp = c.getresponse()
            payload = resp.read()
            parsed = None
            if not raw and payload:
                try:
                    parsed = json.loads(payload)
                except ValueError:
                    parsed = None
            return resp.status, parsed, payload, dict(resp.getheaders())
        finally:
            c.close()

    def get(self, path, **kw):
        return self.request('GET', path, **kw)

    def post(self, path, body=None, **kw):
        return self.request('POST', path, body=body, **kw)

    def make_key(self, perms, name='test'):
        """A key with @perms (int or list of names), minted with the admin key."""
        st, js, raw, _ = self.post('/api/3/keys', {'perms': perms, 'name': name})
        if st != 201:
            raise DaemonError('cannot mint a key: %s %s' % (st, raw))
        return js['key']

    def wait_sessions(self, n, pipeline=None, timeout=10.0):
        """Wait until the API lists at least n sessions; return the list."""
        d = Deadline(timeout)
        path = '/api/3/sessions' + ('?pipeline=' + pipeline if pipeline else '')
        while True:
            st, js, raw, _ = self.get(path)
            if st == 200 and len(js['sessions']) >= n:
                return js['sessions']
            if d.expired():
                raise DaemonError('expected %d session(s), API says %s %s' % (n, st, raw))
            d.sleep(0.02)
