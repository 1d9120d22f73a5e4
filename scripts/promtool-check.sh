#!/usr/bin/env bash
# Checks a live scrape of an example's /metrics with Prometheus's own
# `promtool check metrics` (Debian's `prometheus` package):
#
#   bash scripts/promtool-check.sh sharedflow
#   bash scripts/promtool-check.sh axum --features axum
#
# It builds and starts the example on a free loopback port (--addr
# 127.0.0.1:0, the address is read from its log), makes it count something
# (a WebSocket client that sends a message and closes, a refused request),
# scrapes /metrics, and runs promtool on the scrape. Every wait is bounded;
# the example is stopped on exit. Fails on any problem promtool reports.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

example=${1:?usage: promtool-check.sh EXAMPLE [cargo flags...]}
shift
python=${PYTHON:-python3}
command -v promtool >/dev/null 2>&1 || {
    echo "promtool-check: no promtool; install it with: apt-get install prometheus" >&2
    exit 1
}

cargo build --quiet --example "$example" "$@"
binary=target/debug/examples/$example
log=$(mktemp)
"$binary" --addr 127.0.0.1:0 >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -f "$log"' EXIT

addr=
for _ in $(seq 1 200); do
    addr=$(grep -oE 'http://127\.0\.0\.1:[0-9]+/metrics' "$log" | head -n1 | sed -E 's#http://([^/]+)/metrics#\1#' || true)
    [[ -n $addr ]] && break
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; echo "promtool-check: $example exited" >&2; exit 1; }
    sleep 0.05
done
[[ -n $addr ]] || { cat "$log" >&2; echo "promtool-check: $example logged no metrics address" >&2; exit 1; }

scrape=$(mktemp)
"$python" - "$addr" "$scrape" <<'EOF'
import base64, os, socket, sys, time

host, port = sys.argv[1].rsplit(":", 1)
port = int(port)

def connect():
    return socket.create_connection((host, port), timeout=5)

def read_head(s):
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise SystemExit("connection closed before the head")
        head += chunk
    return head.decode()

def frame(opcode, payload):
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked

# A WebSocket client: upgrade, send a message, close with 1000.
s = connect()
key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
head = read_head(s)
assert head.startswith("HTTP/1.1 101"), head
s.sendall(frame(0x1, b"hello from promtool-check"))
s.sendall(frame(0x8, (1000).to_bytes(2, "big") + b"bye"))
s.settimeout(5)
while s.recv(4096):
    pass
s.close()

# A refused request: no upgrade headers.
s = connect()
s.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
assert read_head(s).startswith("HTTP/1.1 400")
s.close()

# The scrape, once the closed session is counted.
deadline = time.monotonic() + 5
while True:
    s = connect()
    s.sendall(f"GET /metrics HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
    raw = b""
    while chunk := s.recv(65536):
        raw += chunk
    s.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    if b'wshub_sessions_closed_total{code="1000"' in body or time.monotonic() > deadline:
        break
    time.sleep(0.05)
open(sys.argv[2], "wb").write(body)
EOF

echo "promtool-check: $(grep -c '^wshub_' "$scrape") wshub samples from $example at $addr"
promtool check metrics <"$scrape"
rm -f "$scrape"
echo "promtool-check: $example /metrics passes promtool check metrics"
