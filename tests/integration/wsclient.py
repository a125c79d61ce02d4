"""A small RFC 6455 WebSocket client (standard library only) for the tests.

    ws = WsClient.open('127.0.0.1', port, '/api/3/socket?mode=watch', key=KEY)
    hello = ws.recv_json()
    ws.send_json({'type': 'close', 'session': 'all'})
    ws.close()

It does the handshake (and checks Sec-WebSocket-Accept), masks what it
sends, can split a message into fragments, answers pings, records pongs,
and answers the server's close. Refused upgrades raise HandshakeError with
the HTTP status, headers and body. Every read has a deadline.
"""
import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import time

GUID = b'258EAFA5-E914-47DA-95CA-C5AB0DC85B11'

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


class WsError(Exception):
    pass


class HandshakeError(WsError):
    def __init__(self, status, headers, body):
        super().__init__('upgrade refused: HTTP %d %r' % (status, body[:200]))
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)


class WsClosed(WsError):
    """The server closed the WebSocket (code, reason) or the TCP connection."""

    def __init__(self, code, reason):
        super().__init__('closed: %s %r' % (code, reason))
        self.code = code
        self.reason = reason


class WsTimeout(WsError):
    pass


def _mask(key, data):
    n = len(data)
    if not n:
        return b''
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, 'little') ^ int.from_bytes(k, 'little')).to_bytes(n, 'little')


def accept_for(key):
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def frame(opcode, payload, fin=True, rsv=0, mask=True):
    """One frame as a client sends it (masked unless mask=False)."""
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head = struct.pack('!BB', b0, m | n)
    elif n < 65536:
        head = struct.pack('!BBH', b0, m | 126, n)
    else:
        head = struct.pack('!BBQ', b0, m | 127, n)
    if mask:
        key = os.urandom(4)
        head += key
        payload = _mask(key, payload)
    return head + payload


class WsClient:
    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.pongs = []
        self.closed = None          # (code, reason) once the server's close frame came
        self.close_sent = False

    # ---- opening ----

    @classmethod
    def open(cls, host, port, path, key=None, headers=None, timeout=10.0, tls=False,
             rcvbuf=None, extra=b''):
        """Connect and upgrade. key: sent as 'Authorization: Bearer'. extra: bytes sent
        right after the request (frames before the 101 arrives)."""
        raw = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET,
                            socket.SOCK_STREAM)
        if rcvbuf:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(timeout)
        raw.connect((host, port))
        sock = raw
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            sock = ctx.wrap_socket(raw)
        try:
            return cls._handshake(sock, host, port, path, key, headers, timeout, extra)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def _handshake(cls, sock, host, port, path, key, headers, timeout, extra):
        wskey = base64.b64encode(os.urandom(16)).decode()
        h = {'Host': '%s:%d' % (host, port), 'Upgrade': 'websocket',
             'Connection': 'Upgrade', 'Sec-WebSocket-Key': wskey,
             'Sec-WebSocket-Version': '13'}
        if key:
            h['Authorization'] = 'Bearer ' + key
        for k, v in (headers or {}).items():
            if v is None:
                h.pop(k, None)
            else:
                h[k] = v
        req = 'GET %s HTTP/1.1\r\n%s\r\n' % (path, ''.join('%s: %s\r\n' % kv for kv in h.items()))
        sock.sendall(req.encode() + extra)
        c = cls(sock)
        deadline = time.monotonic() + timeout
        while b'\r\n\r\n' not in c.buf:
            c._fill(deadline)
        head, _, rest = bytes(c.buf).partition(b'\r\n\r\n')
        c.buf = bytearray(rest)
        lines = head.decode('latin-1').split('\r\n')
        status = int(lines[0].split()[1])
        rh = {}
        for line in lines[1:]:
            k, _, v = line.partition(':')
            rh[k.strip().lower()] = v.strip()
        if status != 101:
            n = int(rh.get('content-length', '0'))
            while len(c.buf) < n:
                try:
                    c._fill(deadline)
                except WsClosed:
                    break
            raise HandshakeError(status, rh, bytes(c.buf[:n]))
        if rh.get('sec-websocket-accept') != accept_for(wskey):
            raise WsError('bad Sec-WebSocket-Accept %r' % rh.get('sec-websocket-accept'))
        c.headers = rh
        return c

    # ---- bytes ----

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise WsTimeout('no data from the server in time')
        self.sock.settimeout(left)
        try:
            b = self.sock.recv(1 << 16)
        except socket.timeout:
            raise WsTimeout('no data from the server in time')
        except (ConnectionResetError, BrokenPipeError):
            b = b''
        if not b:
            raise WsClosed(self.closed[0] if self.closed else None, 'connection closed')
        self.buf += b

    def _need(self, n, deadline):
        while len(self.buf) < n:
            self._fill(deadline)

    def send_frame(self, opcode, payload, fin=True, rsv=0, mask=True):
        self.sock.sendall(frame(opcode, payload, fin, rsv, mask))

    def send_text(self, text, fragments=1):
        data = text.encode() if isinstance(text, str) else text
        self._send_msg(OP_TEXT, data, fragments)

    def send_binary(self, data, fragments=1):
        self._send_msg(OP_BINARY, data, fragments)

    def _send_msg(self, opcode, data, fragments):
        if fragments <= 1:
            self.send_frame(opcode, data)
            return
        step = max(1, (len(data) + fragments - 1) // fragments)
        parts = [data[i:i + step] for i in range(0, len(data), step)] or [b'']
        for i, p in enumerate(parts):
            self.send_frame(opcode if i == 0 else OP_CONT, p, fin=i == len(parts) - 1)

    def send_json(self, obj, fragments=1):
        self.send_text(json.dumps(obj), fragments)

    def ping(self, payload=b'ping'):
        self.send_frame(OP_PING, payload)

    # ---- receiving ----

    def recv_frame(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        self._need(2, deadline)
        b0, b1 = self.buf[0], self.buf[1]
        if b1 & 0x80:
            raise WsError('the server masked a frame')
        n, off = b1 & 0x7f, 2
        if n == 126:
            self._need(4, deadline)
            n, off = struct.unpack('!H', self.buf[2:4])[0], 4
        elif n == 127:
            self._need(10, deadline)
            n, off = struct.unpack('!Q', self.buf[2:10])[0], 10
        self._need(off + n, deadline)
        payload = bytes(self.buf[off:off + n])
        del self.buf[:off + n]
        return bool(b0 & 0x80), b0 & 0x0f, payload

    def recv(self, timeout=10.0):
        """The next data message as (opcode, bytes); pings answered, pongs recorded.
        Raises WsClosed when the server closes (after answering its close)."""
        deadline = time.monotonic() + timeout
        parts, first = [], None
        while True:
            fin, op, payload = self.recv_frame(max(0.0, deadline - time.monotonic()))
            if op == OP_PING:
                self.send_frame(OP_PONG, payload)
                continue
            if op == OP_PONG:
                self.pongs.append(payload)
                continue
            if op == OP_CLOSE:
                code = struct.unpack('!H', payload[:2])[0] if len(payload) >= 2 else None
                reason = payload[2:].decode('utf-8', 'replace')
                self.closed = (code, reason)
                if not self.close_sent:
                    try:
                        self.send_frame(OP_CLOSE, payload[:2])
                        self.close_sent = True
                    except OSError:
                        pass
                raise WsClosed(code, reason)
            if first is None:
                first = op
            parts.append(payload)
            if fin:
                return first, b''.join(parts)

    def recv_json(self, timeout=10.0):
        op, data = self.recv(timeout)
        if op != OP_TEXT:
            raise WsError('expected a text message, got opcode %d' % op)
        return json.loads(data)

    def recv_until(self, pred, timeout=10.0, keep=None):
        """JSON messages until pred(msg) is true; returns that message. keep: a list that
        gets every message read before it."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WsTimeout('no matching message in time')
            msg = self.recv_json(left)
            if pred(msg):
                return msg
            if keep is not None:
                keep.append(msg)

    def wait_pong(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while not self.pongs:
            # the pong may come among data messages: read and keep them aside
            fin, op, payload = self.recv_frame(max(0.0, deadline - time.monotonic()))
            if op == OP_PONG:
                self.pongs.append(payload)
            elif op == OP_CLOSE:
                raise WsClosed(None, 'closed while waiting for a pong')
        return self.pongs.pop(0)

    # ---- closing ----

    def close(self, code=1000, reason='', timeout=5.0):
        """Send a close frame and wait for the server's; closes the socket."""
        try:
            if not self.close_sent:
                self.send_frame(OP_CLOSE, struct.pack('!H', code) + reason.encode())
                self.close_sent = True
            deadline = time.monotonic() + timeout
            while self.closed is None:
                try:
                    self.recv(max(0.0, deadline - time.monotonic()))
                except WsClosed:
                    break
                except (WsTimeout, OSError):
                    break
        except OSError:
            pass
        finally:
            self.sock.close()
        return self.closed

    def wait_closed(self, timeout=10.0):
        """Read (and discard) until the server closes; returns (code, reason)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.recv(max(0.0, deadline - time.monotonic()))
            except WsClosed as e:
                return (e.code, e.reason)

    def abort(self):
        """Drop the TCP connection without a close frame."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        except OSError:
            pass
        self.sock.close()


def open_ws(daemon, path, key='admin', **kw):
    """Open a WebSocket on an ApiDaemon; key 'admin', None or a key string."""
    if key == 'admin':
        key = daemon.admin_key
    return WsClient.open('127.0.0.1', daemon.api_port, path, key=key,
                         tls=daemon.scheme == 'https', **kw)
