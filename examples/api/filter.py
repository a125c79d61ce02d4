#!/usr/bin/env python3
"""Filter a pipeline's packets from a WebSocket (the API's remote filter).

    python3 examples/api/filter.py --pipeline default --drop CHEAT --replace hello=HELLO

Connects to /api/3/socket?mode=filter, prints every packet, and answers each
one: `drop` when it contains a --drop text, `replace` (with the text swapped)
for --replace OLD=NEW, otherwise `pass`. Ctrl-C closes the socket: packets the
script still held get the default action at once. Standard library only (the
WebSocket client is tests/integration/wsclient.py of this repository).

The key: --key, else $EZP_KEY, else the file given with --key-file (default
/var/lib/ezproxy/admin.key, where the daemon writes its first admin key).
"""
import argparse
import base64
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..',
                                'tests', 'integration'))
from wsclient import WsClient, WsClosed, WsTimeout  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--api', default='127.0.0.1:8080', help='HOST:PORT of the API')
    ap.add_argument('--pipeline', default='default')
    ap.add_argument('--key')
    ap.add_argument('--key-file', default='/var/lib/ezproxy/admin.key')
    ap.add_argument('--drop', action='append', default=[], help='drop packets containing TEXT')
    ap.add_argument('--replace', action='append', default=[], help='OLD=NEW in packets')
    ap.add_argument('--default', choices=['pass', 'drop'], default='pass',
                    help='what held packets get if this script goes away')
    ap.add_argument('--count', type=int, default=0, help='stop after N packets (0: never)')
    a = ap.parse_args()
    key = a.key or os.environ.get('EZP_KEY')
    if not key:
        try:
            with open(a.key_file) as f:
                key = f.read().strip()
        except OSError as e:
            sys.exit('no key: pass --key, set EZP_KEY or --key-file (%s)' % e)
    host, port = a.api.rsplit(':', 1)
    drops = [d.encode() for d in a.drop]
    repl = [tuple(x.encode() for x in r.split('=', 1)) for r in a.replace if '=' in r]
    ws = WsClient.open(host, int(port), '/api/3/socket?mode=filter&pipeline=%s&default=%s'
                       % (a.pipeline, a.default), key=key)
    hello = ws.recv_json()
    print('filtering %s as %s' % (a.pipeline, ','.join(hello.get('permissions', []))),
          file=sys.stderr)
    seen = 0
    try:
        while not a.count or seen < a.count:
            try:
                m = ws.recv_json(timeout=3600)
            except WsTimeout:
                continue
            if m.get('type') != 'packet':
                print(m, file=sys.stderr)
                continue
            data = base64.b64decode(m['data'])
            print('#%s %s %r' % (m['session'], m['direction'], data[:80]))
            if not m.get('verdict_required'):
                continue
            seen += 1
            verdict = {'type': 'verdict', 'seq': m['seq'], 'action': 'pass'}
            if any(d in data for d in drops):
                verdict['action'] = 'drop'
            else:
                new = data
                for old, rep in repl:
                    new = new.replace(old, rep)
                if new != data:
                    verdict.update(action='replace', data=base64.b64encode(new).decode())
            ws.send_json(verdict)
    except (KeyboardInterrupt, WsClosed):
        pass
    try:
        ws.close()
    except Exception:
        pass


if __name__ == '__main__':
    main()
