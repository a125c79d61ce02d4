#!/usr/bin/env bash
# Build examples/plugins/prefix_drop.c out of tree with only
# `pkg-config --cflags --libs ezproxy-sdk`, load it with `ezproxy plugins`,
# and run it in a UDP pipeline: a datagram starting with the prefix is
# dropped, others come back. Args: BUILD_DIR SOURCE_DIR
set -euo pipefail
build=$1
src=$2
tmp=$(mktemp -d)
cleanup() {
	[ -n "${ez_pid:-}" ] && kill "$ez_pid" 2>/dev/null && wait "$ez_pid" 2>/dev/null
	[ -n "${echo_pid:-}" ] && kill "$echo_pid" 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT
# install into a staging folder, as a plugin author's machine would have it
meson install -C "$build" --destdir "$tmp/stage" --no-rebuild --quiet >/dev/null
pc=$(find "$tmp/stage" -name ezproxy-sdk.pc | head -n 1)
[ -n "$pc" ] || { echo "ezproxy-sdk.pc was not installed"; exit 1; }
export PKG_CONFIG_PATH="$(dirname "$pc")"
export PKG_CONFIG_SYSROOT_DIR="$tmp/stage"
flags=$(pkg-config --cflags --libs ezproxy-sdk)
echo "pkg-config ezproxy-sdk: $flags"
cc -std=c11 -Wall -Wextra -Werror -shared -fPIC -o "$tmp/prefix_drop.so" \
	"$src/examples/plugins/prefix_drop.c" $flags
"$build/ezproxy" plugins --plugin-path "$tmp" | tee "$tmp/plugins.txt"
grep -q "^prefix-drop 1.0.0" "$tmp/plugins.txt"
grep -q "filter prefix-drop" "$tmp/plugins.txt"

# a UDP echo server and a pipeline through the filter
python3 - "$tmp" <<'PY' &
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
open(sys.argv[1] + "/echo.port", "w").write(str(s.getsockname()[1]))
s.settimeout(30)
try:
    while True:
        d, a = s.recvfrom(70000)
        s.sendto(d, a)
except socket.timeout:
    pass
PY
echo_pid=$!
for _ in $(seq 100); do [ -s "$tmp/echo.port" ] && break; sleep 0.05; done
port=$(cat "$tmp/echo.port")
cat > "$tmp/ez.yaml" <<YAML
Workers: 1
Api: {Enable: false}
Plugins: {Path: ["$tmp"]}
Pipelines:
  - Name: ex
    From: {udp: {Listen: "127.0.0.1:0"}}
    Through:
      - prefix-drop: {Prefix: "BAD"}
    To: {udp: {Connect: "127.0.0.1:$port"}}
YAML
: > "$tmp/ez.log"
"$build/ezproxy" run -c "$tmp/ez.yaml" 2>"$tmp/ez.log" &
ez_pid=$!
for _ in $(seq 100); do grep -q "pipeline 'ex'" "$tmp/ez.log" && break; sleep 0.05; done
listen=$(grep -o "pipeline 'ex': udp 127.0.0.1:[0-9]*" "$tmp/ez.log" | grep -o "[0-9]*$")
python3 - "$listen" <<'PY'
import socket, sys
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.settimeout(2)
dst = ("127.0.0.1", int(sys.argv[1]))
c.sendto(b"BAD packet", dst)
c.sendto(b"good packet", dst)
d, _ = c.recvfrom(100)
assert d == b"good packet", d
try:
    d, _ = c.recvfrom(100)
    raise SystemExit("unexpected datagram %r" % d)
except socket.timeout:
    pass
print("prefix-drop dropped the BAD datagram and passed the good one")
PY
