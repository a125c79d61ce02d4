#!/usr/bin/env python3
"""Count test results in meson testlog.json files (cmocka's own summary is
not printed by meson test) and end with 'N passed, N failed'."""
import json
import sys

def main(argv):
    last_only = '--last-line' in argv
    files = [a for a in argv if not a.startswith('--')]
    passed = failed = skipped = 0
    cases = 0
    for path in files:
        try:
            fh = open(path, encoding='utf-8')
        except OSError:
            continue
        with fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                rec = json.loads(line)
                res = rec.get('result')
                if res in ('OK', 'EXPECTEDFAIL'):
                    passed += 1
                elif res == 'SKIP':
                    skipped += 1
                else:
                    failed += 1
                    if not last_only:
                        print(f"FAILED: {path}: {rec.get('name')} ({res})")
                out = rec.get('stdout') or ''
                # cmocka and unittest print per-case counts; keep them for the record
                for l in out.splitlines():
                    if l.startswith('[  PASSED  ]'):
                        try:
                            cases += int(l.split()[3])
                        except (IndexError, ValueError):
                            pass
    if not last_only:
        print(f"(test programs over all runs: {passed} passed, {failed} failed, "
              f"{skipped} skipped)")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed or passed == 0 else 0

if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
