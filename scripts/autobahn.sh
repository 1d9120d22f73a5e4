#!/usr/bin/env bash
# Autobahn|Testsuite conformance run (fuzzingclient mode, sections 1-10)
# against the `/echo` route of the `sharedflow` example.
#
# Run from anywhere (it cds to the repository root):
#
#   bash scripts/autobahn.sh
#
# What it does:
#   1. installs the `kosoku` runner (pip, pinned; a Python 3 / Rust runner that
#      drives the Autobahn TestSuite's own case files) if it cannot be imported;
#   2. builds `cargo build --release --example sharedflow` and starts it on
#      127.0.0.1:0, reading the bound address from its log line
#      `sharedflow on ws://ADDR/ws ...` (bounded wait);
#   3. runs kosoku against ws://ADDR/echo for cases 1.* .. 10.* only
#      (12.* and 13.* are permessage-deflate, which tungstenite 0.30 lacks);
#   4. writes the Autobahn-format report (index.html, index.json, one JSON and
#      HTML file per case) to target/autobahn/reports/ and the server's log to
#      target/autobahn/server.log;
#   5. stops the server (always, via an EXIT trap);
#   6. prints a summary per section and lists every non-OK case.
#
# Exit status: 0 if no case FAILED, 1 if any did, 2 on a setup error (build,
# server start, runner crash or timeout).
#
# A case FAILED when its behavior is anything but OK / NON-STRICT /
# INFORMATIONAL / UNIMPLEMENTED, or its close behavior is anything but OK /
# INFORMATIONAL. That is kosoku's own `passed` (so WRONG CODE, FAILED BY CLIENT
# and UNCLEAN closes count as failed), except that UNIMPLEMENTED (only the
# compression cases, not run here) is listed rather than failed. NON-STRICT and
# INFORMATIONAL are acceptable per Autobahn conventions; they are listed.
#
# Environment (all optional):
#   CARGO_TARGET_DIR        where cargo builds (honoured as usual)
#   AUTOBAHN_FEATURES       crate features to build the example with (default:
#                           none; .ci/run passes those of its release build of
#                           the benchmark, so the library is built once)
#   AUTOBAHN_OUTDIR         report directory (default: target/autobahn)
#   AUTOBAHN_CASES          space-separated case globs (default: "1.* ... 10.*"; Autobahn
#                           has no section 8, and kosoku rejects a glob
#                           that matches no case)
#   AUTOBAHN_PARALLELISM    cases run at once by kosoku (default: 1)
#   AUTOBAHN_TIMEOUT        seconds allowed for the kosoku run (default: 900)
#   PYTHON                  Python 3 interpreter (default: python3)
#
# All traffic goes to 127.0.0.1 only.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

KOSOKU_VERSION=0.1.0
python=${PYTHON:-python3}
outdir=${AUTOBAHN_OUTDIR:-target/autobahn}
cases=${AUTOBAHN_CASES:-"1.* 2.* 3.* 4.* 5.* 6.* 7.* 9.* 10.*"}
parallelism=${AUTOBAHN_PARALLELISM:-1}
run_timeout=${AUTOBAHN_TIMEOUT:-900}
target_dir=${CARGO_TARGET_DIR:-target}

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'autobahn.sh: error: %s\n' "$*" >&2; exit 2; }

started=$SECONDS

# ------------------------------------------------------------------ kosoku
if ! "$python" -c 'import kosoku' >/dev/null 2>&1; then
    log "installing kosoku==$KOSOKU_VERSION with pip"
    "$python" -m pip install --disable-pip-version-check --quiet "kosoku==$KOSOKU_VERSION" \
        || die "pip install kosoku==$KOSOKU_VERSION failed"
fi
"$python" -c 'import kosoku' || die "$python cannot import kosoku"

# ------------------------------------------------------------------ build
# Long-running children run in the background and are waited for, so that a
# SIGINT/SIGTERM to this script runs the traps at once and cleanup() stops them.
child_pid=
run_child() {
    "$@" &
    child_pid=$!
    local rc=0
    wait "$child_pid" || rc=$?
    child_pid=
    return "$rc"
}

server_pid=
stop_server() {
    [[ -n $server_pid ]] || return 0
    if kill -0 "$server_pid" 2>/dev/null; then
        # SIGINT is the example's graceful shutdown (ctrl-c); escalate if it lingers.
        kill -INT "$server_pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$server_pid" 2>/dev/null; then
            log "server did not stop on SIGINT in 5 s; sending SIGKILL"
            kill -KILL "$server_pid" 2>/dev/null || true
        fi
    fi
    wait "$server_pid" 2>/dev/null || true
    server_pid=
}

cleanup() {
    if [[ -n $child_pid ]]; then
        kill -TERM "$child_pid" 2>/dev/null || true
        wait "$child_pid" 2>/dev/null || true
    fi
    stop_server
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

features=(${AUTOBAHN_FEATURES:+--features "$AUTOBAHN_FEATURES"})
log "cargo build --release --example sharedflow ${features[*]} (target dir: $target_dir)"
run_child cargo build --release --example sharedflow "${features[@]}" || die "build failed"
server_bin=$target_dir/release/examples/sharedflow
[[ -x $server_bin ]] || die "no server binary at $server_bin"

# ------------------------------------------------------------------ server
mkdir -p "$outdir"
rm -rf "$outdir/reports"
server_log=$outdir/server.log
: >"$server_log"

log "starting $server_bin --addr 127.0.0.1:0"
NO_COLOR=1 RUST_LOG=${RUST_LOG:-info} "$server_bin" --addr 127.0.0.1:0 >"$server_log" 2>&1 &
server_pid=$!

addr=
for _ in $(seq 100); do # up to 10 s
    addr=$(sed -e 's/\x1b\[[0-9;]*m//g' "$server_log" \
        | sed -n 's#.*sharedflow on ws://\(127\.0\.0\.1:[0-9][0-9]*\)/ws.*#\1#p' | head -n1)
    [[ -n $addr ]] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$server_log" >&2; die "server exited before listening"; }
    sleep 0.1
done
[[ -n $addr ]] || { cat "$server_log" >&2; die "server did not print its address within 10 s"; }
url="ws://$addr/echo"
log "server up at $url"

# ------------------------------------------------------------------ kosoku run
args=()
for c in $cases; do args+=(-i "$c"); done
log "kosoku -p $parallelism -o $outdir/reports ${args[*]} $url (timeout ${run_timeout}s)"
t0=$SECONDS
status=0
run_child timeout --kill-after=10 "$run_timeout" "$python" -c '
import sys
from kosoku._cli import main
sys.argv[0] = "kosoku"
main()
' -p "$parallelism" -o "$outdir/reports" "${args[@]}" "$url" || status=$?
run_secs=$((SECONDS - t0))
log "kosoku finished in ${run_secs}s (exit status $status)"
((status == 124 || status == 137)) && die "kosoku timed out after ${run_timeout}s"
[[ -f $outdir/reports/index.json ]] || die "kosoku wrote no report (exit status $status)"

stop_server

# ------------------------------------------------------------------ summary
verdict=0
"$python" - "$outdir/reports" <<'PY' || verdict=$?
import json, os, sys

outdir = sys.argv[1]
with open(os.path.join(outdir, "index.json")) as f:
    index = json.load(f)

OK_BEHAVIOR = {"OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED"}
OK_CLOSE = {"OK", "INFORMATIONAL"}
KINDS = ["passed", "non-strict", "informational", "failed", "unimplemented"]

def classify(b, c):
    if b not in OK_BEHAVIOR or c not in OK_CLOSE:
        return "failed"
    if b == "UNIMPLEMENTED":
        return "unimplemented"
    if b == "NON-STRICT":
        return "non-strict"
    if b == "INFORMATIONAL" or c == "INFORMATIONAL":
        return "informational"
    return "passed"

def key(case_id):
    return [int(p) for p in case_id.split(".")]

rows = []
for agent, cases in index.items():
    for case_id, entry in cases.items():
        kind = classify(entry["behavior"], entry["behaviorClose"])
        with open(os.path.join(outdir, entry["reportfile"])) as f:
            detail = json.load(f)
        rows.append((case_id, kind, entry, detail))
rows.sort(key=lambda r: key(r[0]))

sections = {}
for case_id, kind, _, _ in rows:
    sec = sections.setdefault(case_id.split(".")[0], dict.fromkeys(KINDS, 0))
    sec[kind] += 1
total = dict.fromkeys(KINDS, 0)
for sec in sections.values():
    for k in KINDS:
        total[k] += sec[k]

print()
print("Autobahn fuzzingclient summary (report: %s/index.html)" % outdir)
hdr = "%-8s %6s %7s %11s %14s %7s %14s" % ("section", "cases", *KINDS)
print(hdr)
print("-" * len(hdr))
for s in sorted(sections, key=int):
    c = sections[s]
    print("%-8s %6d %7d %11d %14d %7d %14d" % (s, sum(c.values()), *(c[k] for k in KINDS)))
print("-" * len(hdr))
print("%-8s %6d %7d %11d %14d %7d %14d" % ("total", len(rows), *(total[k] for k in KINDS)))

def short(text, n=110):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."

for kind in ["non-strict", "informational", "unimplemented", "failed"]:
    listed = [r for r in rows if r[1] == kind]
    if not listed:
        continue
    print("\n%s (%d):" % (kind.upper(), len(listed)))
    for case_id, _, e, d in listed:
        print("  %-8s behavior=%s close=%s remoteCloseCode=%s duration=%sms"
              % (case_id, e["behavior"], e["behaviorClose"], e["remoteCloseCode"], e["duration"]))
        if kind == "failed":
            print("           description: %s" % short(d.get("description", "")))
            print("           expectation: %s" % short(d.get("expectation", "")))
            print("           result: %s | close: %s" % (short(d.get("result", ""), 60), short(d.get("resultClose", ""), 80)))

print("\n%d passed, %d failed" % (len(rows) - total["failed"], total["failed"]))
sys.exit(1 if total["failed"] else 0)
PY

printf '\nautobahn.sh: %s cases run in %ss (kosoku %ss); report in %s/reports/index.html\n' \
    "$(ls "$outdir"/reports/*.json | grep -vc '/index.json$')" "$((SECONDS - started))" "$run_secs" "$outdir" >&2
exit "$verdict"
