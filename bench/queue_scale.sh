#!/usr/bin/env bash
# Queue scale: start-up time and memory of mailbridge with N messages already
# queued (default 100 000). Reports, never asserts; see bench/README.md.
#
#   bash bench/queue_scale.sh                  # 100 000 entries, release build
#   bash bench/queue_scale.sh --messages 20000 --no-build
#   bash bench/queue_scale.sh --sidecar        # retry state in <id>.json beside
#
# The spool is written directly, in the layout the daemon writes and
# src/spool/mod.rs documents: queue/<id>.msg, one line of JSON metadata then
# the message (with --sidecar, also queue/<id>.json beside it, as after a
# failed attempt), every entry due in 50 minutes so the scheduler loads them
# and attempts none. Then `mailbridge run` is started
# and timed until its SMTP port accepts a connection; RSS (VmRSS, VmHWM) is
# read from /proc right then, 5 s later, and when the log says the queue
# (read in the background) is loaded.
# "Listening" means the 220 greeting arrived. Everything it starts is
# stopped by the EXIT trap; the temp dir is removed unless --keep.
set -euo pipefail

N=100000
BUILD=1
KEEP=0
SIZE=1024
SIDECAR=0
while [ $# -gt 0 ]; do
    case "$1" in
        --messages) N=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --sidecar) SIDECAR=1; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MB_BIN="${MB_BIN:-$ROOT/target/release/mailbridge}"
if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release --quiet)
fi
T=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/mailbridge-qscale.XXXXXX")
MB_PID=""
cleanup() {
    if [ -n "$MB_PID" ] && kill -0 "$MB_PID" 2>/dev/null; then
        kill -TERM "$MB_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$MB_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$MB_PID" 2>/dev/null || true
    fi
    if [ "$KEEP" = 0 ]; then rm -rf "$T"; else echo "kept $T"; fi
}
trap cleanup EXIT

read -r PORT ADMIN < <(python3 - <<'PY'
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])
PY
)

echo "writing $N queued entries of $SIZE bytes to $T/spool (sidecar .json: $SIDECAR) ..."
python3 - "$T/spool" "$N" "$SIZE" "$SIDECAR" <<'PY'
import json, os, sys, time
root, n, size, sidecar = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
q = os.path.join(root, "queue")
for d in (root, q, os.path.join(root, "tmp"), os.path.join(root, "corrupt")):
    os.makedirs(d, mode=0o700, exist_ok=True)
now = int(time.time())
head = "Received: from bench ([127.0.0.1])\r\nSubject: queued\r\n\r\n"
body = (head + "x" * max(0, size - len(head) - 2) + "\r\n").encode()
for i in range(n):
    mid = "%013x%06x" % (now * 1000000 + i, i & 0xffffff)
    meta = {
        "id": mid, "from": "app@bench.local",
        "rcpts": [{"addr": "to@bench.local", "status": "pending"}],
        "size": len(body), "received_at": now, "attempts": 1,
        "next_attempt": now + 3000, "last_error": "451 4.3.0 try again later",
        "message_id": "<%s@bench.local>" % mid, "client": "127.0.0.1:40000",
        "smtputf8": False, "is_dsn": False,
    }
    # The metadata line: compact JSON (every control character escaped,
    # so its newline is the only one), then the message.
    line = json.dumps(meta, separators=(",", ":")).encode() + b"\n"
    with open(os.path.join(q, mid + ".msg"), "wb") as f:
        f.write(line + body)
    if sidecar:
        with open(os.path.join(q, mid + ".json"), "w") as f:
            json.dump(meta, f, indent=2)
PY
sync

cat > "$T/config.toml" <<CFG
hostname = "bench.local"
log_level = "info"
[listen]
address = "127.0.0.1:$PORT"
[spool]
path = "$T/spool"
max_messages = $((N + 1000))
[delivery]
retry_max_secs = 3600
[upstream]
protocol = "smtp"
server = "127.0.0.1:9"
tls = false
requires_auth = false
[admin]
address = "127.0.0.1:$ADMIN"
CFG

# Cold-ish start: drop what the page cache can give back (root only).
if [ "$(id -u)" = 0 ]; then echo 1 > /proc/sys/vm/drop_caches || true; fi

START=$(date +%s.%N)
"$MB_BIN" --config "$T/config.toml" run > "$T/mailbridge.log" 2>&1 &
MB_PID=$!
LISTEN=""
for _ in $(seq 600); do
    if ! kill -0 "$MB_PID" 2>/dev/null; then
        echo "mailbridge exited:"; tail -5 "$T/mailbridge.log"; exit 1
    fi
    # Listening = the 220 greeting arrives (a bound socket alone accepts
    # connections into its backlog before the server serves them).
    if python3 -c "
import socket
s = socket.create_connection(('127.0.0.1', $PORT), 0.5)
s.settimeout(0.5)
assert s.recv(64).startswith(b'220')
s.sendall(b'QUIT\r\n')
s.close()" 2>/dev/null; then
        LISTEN=$(date +%s.%N); break
    fi
    sleep 0.02
done
[ -n "$LISTEN" ] || { echo "not listening after 12 s"; exit 1; }
rss() { awk -v k="$1:" '$1==k {print $2}' "/proc/$MB_PID/status"; }
RSS0=$(rss VmRSS); HWM0=$(rss VmHWM)
sleep 5
RSS5=$(rss VmRSS); HWM5=$(rss VmHWM)
# The queue is read in the background after the greeting: wait (at most
# 300 s) for the "spool loaded" line, then read the figures again.
LOADED=""
for _ in $(seq 3000); do
    if grep -q "spool loaded" "$T/mailbridge.log"; then LOADED=$(date +%s.%N); break; fi
    sleep 0.1
done
[ -n "$LOADED" ] || { echo "queue not loaded after 300 s"; exit 1; }
RSSL=$(rss VmRSS); HWML=$(rss VmHWM)
# How long SIGTERM takes to end it (at most 10 s are waited for).
STOP0=$(date +%s.%N)
kill -TERM "$MB_PID"
STOPPED=""
for _ in $(seq 100); do
    # Ended: gone, or a zombie (our child, not reaped yet).
    if ! kill -0 "$MB_PID" 2>/dev/null || grep -q '^State:[[:space:]]*Z' "/proc/$MB_PID/status" 2>/dev/null; then
        STOPPED=$(date +%s.%N); break
    fi
    sleep 0.1
done
if [ -n "$STOPPED" ]; then
    STOP_SECS=$(python3 -c "print(f'{$STOPPED - $STOP0:.2f} s')"); MB_PID=""
else
    STOP_SECS="still running after 10 s"
fi
QUEUED=$(ls "$T/spool/queue" | grep -c '\.msg$' || true)
echo "log (first lines, with times):"; head -4 "$T/mailbridge.log" | cut -c1-160
grep "spool loaded" "$T/mailbridge.log" | cut -c1-200
python3 - "$START" "$LISTEN" "$LOADED" "$N" "$RSS0" "$HWM0" "$RSS5" "$HWM5" "$RSSL" "$HWML" "$QUEUED" <<'PY'
import sys
start, listen, loaded = map(float, sys.argv[1:4])
n, rss0, hwm0, rss5, hwm5, rssl, hwml, queued = map(int, sys.argv[4:])
print(f"queued messages        {n}")
print(f"listening after        {listen - start:.2f} s")
print(f"RSS when listening     {rss0/1024:.1f} MiB (VmHWM {hwm0/1024:.1f} MiB)")
print(f"RSS 5 s later          {rss5/1024:.1f} MiB (VmHWM {hwm5/1024:.1f} MiB)")
print(f"queue loaded after     {loaded - start:.2f} s")
print(f"RSS when loaded        {rssl/1024:.1f} MiB (VmHWM {hwml/1024:.1f} MiB)")
print(f"per queued message     {hwml*1024/max(n,1):.0f} bytes (VmHWM when loaded / N)")
print(f"still in queue/        {queued} entries")
PY
echo "SIGTERM to exit         $STOP_SECS"
