#!/usr/bin/env python3
"""Print line coverage per directory (core/ and each plugin) from gcovr's JSON."""
import json
import os
import subprocess
import sys

build = sys.argv[1]
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
out = subprocess.run(['gcovr', '-r', root, '--object-directory', build, '--filter', 'core/',
                      '--filter', 'plugins/', '--exclude', 'core/main.c', '--gcov-ignore-parse-errors', '--json-summary', '-'],
                     capture_output=True, text=True)
if out.returncode != 0:
    print(out.stderr)
    sys.exit(1)
data = json.loads(out.stdout)
dirs = {}
for f in data.get('files', []):
    d = os.path.dirname(f['filename'])
    t, c = dirs.get(d, (0, 0))
    dirs[d] = (t + f['line_total'], c + f['line_covered'])
print(f"{'directory':30} {'lines':>8} {'covered':>8} {'percent':>8}")
low = []
for d in sorted(dirs):
    t, c = dirs[d]
    pct = 100.0 * c / t if t else 100.0
    print(f"{d:30} {t:8} {c:8} {pct:7.1f}%")
    if pct < 90.0:
        low.append(d)
if low:
    print("below 90%: " + ", ".join(low))
