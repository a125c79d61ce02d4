#!/usr/bin/env bash
# Build EzProxy (installing missing Debian packages) and start the daemon on
# its built-in default config. Extra arguments go to `ezproxy run`.
set -euo pipefail
cd "$(dirname "$0")"
bash .ci/install-deps
[ -f build/build.ninja ] || meson setup build --buildtype=debugoptimized
ninja -C build
exec build/ezproxy run "$@"
