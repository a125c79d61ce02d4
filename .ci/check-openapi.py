#!/usr/bin/env python3
"""Check that spec/openapi.json describes exactly the routes the http-api plugin serves.

    python3 .ci/check-openapi.py [--root DIR] [--quiet]

Reads the route tables (`const struct api_route NAME[] = { {"GET", "/path", ...}, ... };`)
in plugins/http-api/routes_*.c and metrics.c, and the `paths` of spec/openapi.json.
Path parameters are compared by position only ("/sessions/{id}" matches
"/sessions/{session_id}"). Also checks that the document loads without duplicate keys,
that every `{param}` in a path is declared `in: path`, and that every local $ref resolves.
Prints each difference and exits 1 on any, 0 when they agree.
"""
import argparse
import glob
import json
import os
import re
import sys

METHODS = ('get', 'put', 'post', 'delete', 'patch', 'head', 'options', 'trace')
TABLE_RE = re.compile(r'const\s+struct\s+api_route\s+(\w+)\s*\[\s*\]\s*=\s*\{(.*?)\n\s*\}\s*;',
                      re.S)
ENTRY_RE = re.compile(r'\{\s*(?:\.method\s*=\s*)?"([A-Z]+)"\s*,\s*'
                      r'(?:\.pattern\s*=\s*)?"(/[^"]*)"')
PARAM_RE = re.compile(r'\{([^}/]*)\}')


def strip_comments(src):
    src = re.sub(r'/\*.*?\*/', ' ', src, flags=re.S)
    return re.sub(r'//[^\n]*', ' ', src)


def norm(path):
    return PARAM_RE.sub('{}', path)


def code_routes(root):
    """{(METHOD, normalised path): (pattern, 'file:table')}; problems found on the way."""
    files = sorted(glob.glob(os.path.join(root, 'plugins', 'http-api', 'routes_*.c')))
    files.append(os.path.join(root, 'plugins', 'http-api', 'metrics.c'))
    routes, problems = {}, []
    for path in files:
        if not os.path.exists(path):
            problems.append('missing source file %s' % os.path.relpath(path, root))
            continue
        with open(path, encoding='utf-8') as f:
            src = strip_comments(f.read())
        for m in TABLE_RE.finditer(src):
            where = '%s:%s' % (os.path.basename(path), m.group(1))
            for e in ENTRY_RE.finditer(m.group(2)):
                key = (e.group(1), norm(e.group(2)))
                if key in routes:
                    problems.append('route %s %s is registered twice (%s and %s)'
                                    % (e.group(1), e.group(2), routes[key][1], where))
                routes[key] = (e.group(2), where)
    return routes, problems


def no_dup_pairs(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError('duplicate key %r in spec/openapi.json' % k)
        obj[k] = v
    return obj


def resolve(doc, ref):
    if not ref.startswith('#/'):
        return None
    node = doc
    for part in ref[2:].split('/'):
        part = part.replace('~1', '/').replace('~0', '~')
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def walk_refs(node, out):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == '$ref' and isinstance(v, str):
                out.append(v)
            else:
                walk_refs(v, out)
    elif isinstance(node, list):
        for v in node:
            walk_refs(v, out)


def spec_routes(doc):
    routes, problems = {}, []
    if not str(doc.get('openapi', '')).startswith('3.0'):
        problems.append('spec: "openapi" must be a 3.0.x version, found %r' % doc.get('openapi'))
    paths = doc.get('paths')
    if not isinstance(paths, dict):
        return routes, problems + ['spec: no "paths" object']
    for path, item in paths.items():
        if not isinstance(item, dict):
            problems.append('spec: path %s is not an object' % path)
            continue
        common = item.get('parameters', [])
        for method, op in item.items():
            if method not in METHODS:
                continue
            routes[(method.upper(), norm(path))] = path
            declared = set()
            for p in list(common) + list(op.get('parameters', [])):
                if '$ref' in p:
                    p = resolve(doc, p['$ref']) or {}
                if p.get('in') == 'path':
                    declared.add(p.get('name'))
            for name in PARAM_RE.findall(path):
                if name not in declared:
                    problems.append('spec: %s %s: path parameter {%s} is not declared '
                                    '(in: path)' % (method.upper(), path, name))
            if 'responses' not in op:
                problems.append('spec: %s %s has no responses' % (method.upper(), path))
    refs = []
    walk_refs(doc, refs)
    for ref in sorted(set(refs)):
        if resolve(doc, ref) is None:
            problems.append('spec: $ref %s does not resolve' % ref)
    return routes, problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--root', default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument('--quiet', action='store_true', help='print only differences')
    args = ap.parse_args(argv)
    spec_path = os.path.join(args.root, 'spec', 'openapi.json')
    try:
        with open(spec_path, encoding='utf-8') as f:
            doc = json.load(f, object_pairs_hook=no_dup_pairs)
    except (OSError, ValueError) as e:
        print('check-openapi: cannot read %s: %s' % (spec_path, e))
        return 1
    code, problems = code_routes(args.root)
    spec, spec_problems = spec_routes(doc)
    problems += spec_problems
    for key in sorted(set(code) - set(spec)):
        problems.append('served but not in spec/openapi.json: %s %s (%s)'
                        % (key[0], code[key][0], code[key][1]))
    for key in sorted(set(spec) - set(code)):
        problems.append('in spec/openapi.json but not served: %s %s' % (key[0], spec[key]))
    if not code:
        problems.append('no route tables found under plugins/http-api')
    for p in problems:
        print('check-openapi: ' + p)
    if problems:
        print('check-openapi: %d problem(s); served %d route(s), spec has %d operation(s)'
              % (len(problems), len(code), len(spec)))
        return 1
    if not args.quiet:
        print('check-openapi: ok, %d route(s) served and documented' % len(code))
    return 0


if __name__ == '__main__':
    sys.exit(main())
