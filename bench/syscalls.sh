#!/usr/bin/env bash
# Syscalls per message on mailbridge's write path: `strace -c -f` on the
# relay while smtp-source pushes N messages (default 500 × 10 KiB, 20
# sessions, one connection per message) through it to smtp-sink. Prints
# strace's table and the per-message count of each syscall. Reports, never
# asserts; see bench/README.md ("Syscalls per message").
#
#   bash bench/syscalls.sh [--bin PATH] [--messages N] [--sessions S]
#
# Needs strace and Postfix's smtp-source/smtp-sink (/usr/sbin). Everything it
# starts is stopped by the EXIT trap.
set -euo pipefail
export PATH="$PATH:/usr/sbin"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN="$ROOT/target/release/mailbridge"
N=500
S=20
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN=$2; shift 2 ;;
        --messages) N=$2; shift 2 ;;
        --sessions) S=$2; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
T=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/mailbridge-sys.XXXXXX")
PIDS=()
MB=""
cleanup() {
    # mailbridge first: a killed strace would leave its tracee running.
    [ -n "$MB" ] && kill -KILL "$MB" 2>/dev/null || true
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    if [ -n "${KEEP:-}" ]; then echo "kept $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT
read -r PORT ADMIN SINK < <(python3 -c '
import socket
s=[socket.socket() for _ in range(3)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
cat > "$T/config.toml" <<CFG
hostname = "bench.local"
log_level = "warn"
[listen]
address = "127.0.0.1:$PORT"
max_connections = 200
max_connections_per_ip = 200
[spool]
path = "$T/spool"
max_messages = 100000
[delivery]
concurrency = 20
[upstream]
protocol = "smtp"
server = "127.0.0.1:$SINK"
tls = false
requires_auth = false
[admin]
address = "127.0.0.1:$ADMIN"
CFG
smtp-sink -c -u nobody "127.0.0.1:$SINK" 256 > "$T/sink.out" 2>&1 &
PIDS+=($!)
strace -c -f -o "$T/strace.txt" "$BIN" --config "$T/config.toml" run > "$T/mb.log" 2>&1 &
STRACE=$!
PIDS+=($STRACE)
for _ in $(seq 300); do
    MB=$(pgrep -P "$STRACE" || true)
    [ -n "$MB" ] && python3 -c "import socket; socket.create_connection(('127.0.0.1',$PORT),0.2).close()" 2>/dev/null && break
    sleep 0.1
done
smtp-source -s "$S" -m "$N" -l 10240 -f from@bench.local -t to@bench.local "127.0.0.1:$PORT"
# Wait (at most 120 s) until the sink has all of them.
for _ in $(seq 1200); do
    got=$(tr '\r' '\n' < "$T/sink.out" | { grep -o 'mesg=[0-9]*' || true; } | tail -1 | cut -d= -f2)
    [ "${got:-0}" -ge "$N" ] && break
    sleep 0.1
done
echo "delivered: ${got:-0} of $N"
# SIGTERM to mailbridge (strace's child) ends it; strace then writes its table.
[ -n "$MB" ] && kill -TERM "$MB"
for _ in $(seq 300); do kill -0 "$STRACE" 2>/dev/null || break; sleep 0.1; done
MB=""
cat "$T/strace.txt"
python3 - "$T/strace.txt" "$N" <<'PY'
import sys
n = int(sys.argv[2])
rows = []
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) >= 5 and f[0].replace(".", "").isdigit() and f[-1] != "total":
        rows.append((int(f[3]), f[-1]))
total = sum(c for c, _ in rows)
print(f"{'syscall':<16} {'per message':>11}")
for calls, name in sorted(rows, reverse=True)[:25]:
    print(f"{name:<16} {calls / n:>11.2f}")
print(f"{'all':<16} {total / n:>11.2f}")
PY
