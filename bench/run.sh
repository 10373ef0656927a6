#!/usr/bin/env bash
# mailbridge throughput benchmark: smtp-source -> relay -> smtp-sink, for
# mailbridge and for a private Postfix instance set up here, on loopback.
# See bench/README.md. Reports what it measures; never asserts on the figures.
#
# usage: bash bench/run.sh [options]
#   --messages N       messages per run (default 5000)
#   --quick            short smoke run: --messages 200 --repeat 1
#   --sessions "20 1"  smtp-source parallel sessions, one run per value
#   --relays "postfix mailbridge"   which relays to measure, in this order
#   --size BYTES       message payload size (default 10240)
#   --reuse            smtp-source -d: several messages per connection
#                      (default: one connection per message, like most apps)
#   --repeat R         run each scenario R times, fresh relay each time (default 3;
#                      the summary uses the median)
#   --timeout S        per-run limit for ingest + end-to-end (default 300)
#   --no-build         do not run cargo build --release
#   --keep             keep the temp dir (configs, logs, spool, queue)
#   --json FILE        also write one JSON object per run to FILE
#   --quiet-wait S     before each run, wait up to S s (default 120) for a
#                      second in which the machine is at most 15% busy
#   --nice N           run relay, sink, smtp-source and the sampler under
#                      `nice -n N` (e.g. -10 on a machine shared with builds)
#   --verify           the sink keeps every message (smtp-sink -d) and each one's
#                      body is compared (SHA-256) with what smtp-source sends
#   --large            the large-message scenario: --messages 20 --sessions 20
#                      --size 20971520 --repeat 1 --verify --timeout 900
set -euo pipefail

ORIG_ARGS="$*"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CRATE=$(cd "$HERE/.." && pwd)

MESSAGES=5000
SESSIONS="20 1"
RELAYS="postfix mailbridge"
SIZE=10240
REUSE=0
REPEAT=3
TIMEOUT=300
BUILD=1
KEEP=0
JSON_OUT=""
QUIET_WAIT=120
NICE=""
VERIFY=0

while [ $# -gt 0 ]; do
    case "$1" in
        --messages) MESSAGES=$2; shift 2 ;;
        --quick) MESSAGES=200; REPEAT=1; shift ;;
        --sessions) SESSIONS=$2; shift 2 ;;
        --relays) RELAYS=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --reuse) REUSE=1; shift ;;
        --repeat) REPEAT=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        --json) JSON_OUT=$2; shift 2 ;;
        --quiet-wait) QUIET_WAIT=$2; shift 2 ;;
        --nice) NICE=$2; shift 2 ;;
        --verify) VERIFY=1; shift ;;
        --large) MESSAGES=20; SESSIONS=20; SIZE=20971520; REPEAT=1; VERIFY=1; TIMEOUT=900; shift ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown option $1" >&2; exit 64 ;;
    esac
done

NICE_CMD=""
[ -n "$NICE" ] && NICE_CMD="nice -n $NICE"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

for tool in smtp-source smtp-sink postfix postconf python3; do
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
        echo "run.sh: $tool not found. Install Debian's postfix package (see bench/README.md)." >&2
        exit 69
    fi
done
export PATH="$PATH:/usr/sbin:/usr/lib/postfix/sbin"

case " $RELAYS " in
    *" postfix "*)
        if [ "$(id -u)" != 0 ]; then
            echo "run.sh: the private Postfix instance needs root (postfix start); use --relays mailbridge otherwise" >&2
            exit 77
        fi
        getent passwd postfix >/dev/null || { echo "run.sh: no 'postfix' user (install the postfix package)" >&2; exit 69; }
        ;;
esac

# ---------------------------------------------------------------- temp dir ---
# On the disk, not tmpfs: fsync must cost what it costs.
T=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/mailbridge-bench.XXXXXX")
chmod 755 "$T"
PIDS="$T/pids"          # every process we start directly, one pid a line
: > "$PIDS"
RESULTS="$T/results.jsonl"
: > "$RESULTS"
PF="$T/postfix"
PF_STARTED=0

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() { # port timeout_s pid_to_watch(optional)
    local port=$1 limit=$2 watch=${3:-} i=0
    while [ "$i" -lt $((limit * 10)) ]; do
        if timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; then
            return 0
        fi
        if [ -n "$watch" ] && ! kill -0 "$watch" 2>/dev/null; then
            return 1
        fi
        sleep 0.1
        i=$((i + 1))
    done
    return 1
}

stop_pid() { # pid: TERM, wait up to 10 s, then KILL
    local pid=$1 i=0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid ignored SIGTERM for 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# Processes of the private Postfix: master and every daemon it spawned carry
# MAIL_CONFIG=<our config dir> in their environment. Matches nothing else.
postfix_pids() {
    grep -lsxzF "MAIL_CONFIG=$PF/etc" /proc/[0-9]*/environ 2>/dev/null \
        | sed -n 's|^/proc/\([0-9]*\)/environ$|\1|p' || true
}

postfix_stop() {
    [ "$PF_STARTED" = 1 ] || return 0
    timeout 30 postfix -c "$PF/etc" stop >/dev/null 2>&1 || true
    local i=0 left
    while [ "$i" -lt 100 ]; do
        left=$(postfix_pids)
        [ -z "$left" ] && break
        sleep 0.1; i=$((i + 1))
    done
    left=$(postfix_pids)
    if [ -n "$left" ]; then
        log "Postfix leftovers after 'postfix stop': $left: SIGKILL"
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
    fi
    PF_STARTED=0
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    postfix_stop
    if [ -s "$PIDS" ]; then
        local pid
        # newest first
        for pid in $(tac "$PIDS"); do stop_pid "$pid"; done
    fi
    if [ "$KEEP" = 1 ]; then
        log "kept $T"
    else
        rm -rf "$T"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------- build ---
# MB_BIN=<path> measures another mailbridge binary (then use --no-build).
MB_BIN="${MB_BIN:-$CRATE/target/release/mailbridge}"
MB_SKIP=""
case " $RELAYS " in
    *" mailbridge "*)
        if [ "$BUILD" = 1 ]; then
            log "cargo build --release"
            if ! (cd "$CRATE" && timeout 1200 cargo build --release --quiet) > "$T/build.log" 2>&1; then
                MB_SKIP="cargo build --release failed: $(tail -5 "$T/build.log" | tr '\n' ' ')"
            fi
        fi
        [ -z "$MB_SKIP" ] && [ ! -x "$MB_BIN" ] && MB_SKIP="no binary at $MB_BIN"
        ;;
esac

# ------------------------------------------------------------------ ports ---
SINK_PORT=$(free_port)
PF_PORT=$(free_port)

# ------------------------------------------------------- private Postfix ---
postfix_setup() {
    mkdir -p "$PF/etc" "$PF/queue" "$PF/data"
    chown postfix "$PF/data"; chmod 700 "$PF/data"
    cp /usr/share/postfix/master.cf.dist "$PF/etc/master.cf" 2>/dev/null \
        || cp /etc/postfix/master.cf.proto "$PF/etc/master.cf"
    : > "$PF/etc/main.cf"
    # Everything explicit; nothing read from /etc/postfix/main.cf.
    postconf -c "$PF/etc" -e \
        "compatibility_level = 3.6" \
        "config_directory = $PF/etc" \
        "queue_directory = $PF/queue" \
        "data_directory = $PF/data" \
        "mail_owner = postfix" \
        "setgid_group = postdrop" \
        "myhostname = postfix.bench.local" \
        "mydomain = bench.local" \
        "myorigin = \$myhostname" \
        "inet_interfaces = 127.0.0.1" \
        "inet_protocols = ipv4" \
        "mydestination =" \
        "local_recipient_maps =" \
        "local_transport = error:local delivery is disabled" \
        "alias_maps =" \
        "alias_database =" \
        "mynetworks = 127.0.0.0/8" \
        "smtpd_relay_restrictions = permit_mynetworks, reject" \
        "relayhost = [127.0.0.1]:$SINK_PORT" \
        "smtp_host_lookup = native" \
        "smtp_dns_support_level = disabled" \
        "smtpd_client_connection_count_limit = 100" \
        "smtpd_client_connection_rate_limit = 0" \
        "message_size_limit = 104857600" \
        "default_destination_concurrency_limit = 20" \
        "smtp_tls_security_level = none" \
        "smtpd_tls_security_level = none" \
        "biff = no" \
        "append_dot_mydomain = no" \
        "maillog_file = $T/postfix.log" \
        "maillog_file_prefixes = $T"
    # smtpd on our free port only; no daemon runs chrooted (no copies of /etc).
    postconf -c "$PF/etc" -M# smtp/inet
    postconf -c "$PF/etc" -M "127.0.0.1:$PF_PORT/inet = 127.0.0.1:$PF_PORT inet n - n - - smtpd"
    postconf -c "$PF/etc" -F '*/*/chroot = n'
    if ! postfix -c "$PF/etc" check > "$T/postfix-check.log" 2>&1; then
        cat "$T/postfix-check.log" >&2
        [ -f "$T/postfix.log" ] && tail -20 "$T/postfix.log" >&2
        return 1
    fi
}

postfix_start() {
    if ! $NICE_CMD postfix -c "$PF/etc" start >> "$T/postfix-start.log" 2>&1; then
        log "postfix start failed:"; tail -20 "$T/postfix.log" >&2 || true
        return 1
    fi
    PF_STARTED=1
    if ! wait_port "$PF_PORT" 20; then
        log "Postfix smtpd not listening on $PF_PORT:"; tail -20 "$T/postfix.log" >&2 || true
        return 1
    fi
    PF_MASTER=$(tr -d ' ' < "$PF/queue/pid/master.pid")
}

queue_files() { # files left in queue/spool directories (not counting corrupt/,
    # nor the delivered messages' files mailbridge keeps in tmp/ to write over)
    find "$@" -type f -not -path '*/corrupt/*' -not -path '*/tmp/free.*' 2>/dev/null | wc -l
}

# ------------------------------------------------------------ mailbridge ---
MB_PID=""
mailbridge_start() { # run-id
    local id=$1
    MB_PORT=$(free_port)
    MB_ADMIN=$(free_port)
    MB_SPOOL="$T/mb-spool-$id"
    cat > "$T/mailbridge-$id.toml" <<EOF
hostname = "bench.local"
log_level = "warn"
[listen]
address = "127.0.0.1:$MB_PORT"
max_connections = 200
[spool]
path = "$MB_SPOOL"
max_messages = 100000
[delivery]
concurrency = 20
[upstream]
protocol = "smtp"
server = "127.0.0.1:$SINK_PORT"
tls = false
requires_auth = false
[admin]
address = "127.0.0.1:$MB_ADMIN"
EOF
    # 20 sessions opening one connection per message can briefly hold 21
    # connections from 127.0.0.1 (the server frees a slot a moment after the
    # client's QUIT): raise the per-address limit when this build has one.
    if [ -z "${MB_PER_IP_OK:-}" ]; then
        MB_PER_IP_OK=no
        sed 's/^max_connections = 200$/&\nmax_connections_per_ip = 200/' "$T/mailbridge-$id.toml" > "$T/per-ip-probe.toml"
        if "$MB_BIN" --config "$T/per-ip-probe.toml" check > /dev/null 2>&1; then MB_PER_IP_OK=yes; fi
    fi
    if [ "$MB_PER_IP_OK" = yes ]; then
        sed -i 's/^max_connections = 200$/&\nmax_connections_per_ip = 200/' "$T/mailbridge-$id.toml"
    fi
    $NICE_CMD "$MB_BIN" --config "$T/mailbridge-$id.toml" run > "$T/mailbridge-$id.log" 2>&1 &
    MB_PID=$!
    echo "$MB_PID" >> "$PIDS"
    if ! wait_port "$MB_PORT" 20 "$MB_PID"; then
        MB_ERR="mailbridge did not listen on $MB_PORT: $(tail -3 "$T/mailbridge-$id.log" | tr '\n' ' ')"
        stop_pid "$MB_PID"; MB_PID=""
        return 1
    fi
}

# ------------------------------------------------------------------ sink ---
SINK_PID=""
sink_start() { # run-id
    SINK_OUT="$T/sink-$1.out"
    : > "$SINK_OUT"
    local dump=()
    if [ "$VERIFY" = 1 ]; then
        # One file per message, written as user nobody (smtp-sink -u).
        mkdir -p "$T/dump-$1"; chown nobody "$T/dump-$1"
        dump=(-d "$T/dump-$1/%H%M%S.")
    fi
    $NICE_CMD smtp-sink -c -u nobody "${dump[@]}" "127.0.0.1:$SINK_PORT" 1000 > "$SINK_OUT" 2> "$T/sink-$1.err" &
    SINK_PID=$!
    echo "$SINK_PID" >> "$PIDS"
    wait_port "$SINK_PORT" 10 "$SINK_PID" || { log "smtp-sink did not start: $(cat "$T/sink-$1.err")"; return 1; }
    # The probe connection above is a session: let its counter line appear.
    sleep 0.2
}

# ------------------------------------------------------------------- runs ---
one_run() { # relay sessions rep
    local relay=$1 s=$2 rep=$3 id="$1-s$2-r$3" pid tree_flag="" reuse_flag="" out rc=0
    sink_start "$id" || return 1
    case "$relay" in
        postfix)
            postfix_start || { stop_pid "$SINK_PID"; return 1; }
            pid=$PF_MASTER; tree_flag=--tree; port=$PF_PORT ;;
        mailbridge)
            if ! mailbridge_start "$id"; then
                log "$MB_ERR"
                printf '{"relay":"mailbridge","sessions":%s,"messages":%s,"errors":[%s]}\n' \
                    "$s" "$MESSAGES" "$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$MB_ERR")" >> "$RESULTS"
                stop_pid "$SINK_PID"
                return 0
            fi
            pid=$MB_PID; port=$MB_PORT ;;
    esac
    [ "$REUSE" = 1 ] && reuse_flag=--reuse
    log "$relay: $MESSAGES x $SIZE B, $s session(s)$([ "$REUSE" = 1 ] && echo ', connections reused') ..."
    # In the background + wait, so that a signal to this script is handled at once.
    $NICE_CMD python3 "$HERE/measure.py" --relay "$relay" --relay-port "$port" --pid "$pid" $tree_flag \
        --sink-out "$SINK_OUT" --sink-pid "$SINK_PID" --messages "$MESSAGES" --sessions "$s" --size "$SIZE" $reuse_flag \
        --timeout "$TIMEOUT" --quiet-wait "$QUIET_WAIT" --source-log "$T/source-$id.log" --pids-file "$PIDS" \
        > "$T/measure-$id.json" &
    local meas=$!
    echo "$meas" >> "$PIDS"
    wait "$meas" || rc=$?
    out=$(cat "$T/measure-$id.json")
    # What is left in the relay's queue after the sink got everything.
    case "$relay" in
        postfix) left=$(queue_files "$PF/queue/incoming" "$PF/queue/active" "$PF/queue/deferred" "$PF/queue/maildrop") ;;
        mailbridge)
            if [ -d "$MB_SPOOL/queue" ]; then left=$(queue_files "$MB_SPOOL/queue" "$MB_SPOOL/tmp")
            else left=$(queue_files "$MB_SPOOL"); fi ;;
    esac
    local verified='{}'
    if [ "$VERIFY" = 1 ]; then
        verified=$(python3 "$HERE/verify.py" --reference "$T/dump-reference" --dumps "$T/dump-$id" --expect "$MESSAGES")
        rm -rf "$T/dump-$id"
    fi
    echo "$out" | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); d["queue_files_left"]=int(sys.argv[1]); d["run"]=sys.argv[2]; d.update(json.loads(sys.argv[3])); print(json.dumps(d))' "$left" "$id" "$verified" >> "$RESULTS"
    [ "$rc" = 0 ] || log "$relay run had errors (see results)"
    case "$relay" in
        postfix) postfix_stop ;;
        mailbridge)
            stop_pid "$MB_PID"; MB_PID=""
            # A large mailbridge log at log_level=warn means something went wrong.
            if [ -s "$T/mailbridge-$id.log" ]; then
                log "mailbridge log ($(wc -l < "$T/mailbridge-$id.log") lines), last 3:"; tail -3 "$T/mailbridge-$id.log" >&2
            fi ;;
    esac
    stop_pid "$SINK_PID"; SINK_PID=""
}

case " $RELAYS " in
    *" postfix "*) postfix_setup || { log "private Postfix setup failed"; exit 1; } ;;
esac

# What every delivered message must be: one message from smtp-source straight
# into the sink, no relay between them.
if [ "$VERIFY" = 1 ]; then
    sink_start reference || { log "reference sink did not start"; exit 1; }
    if ! timeout "$TIMEOUT" smtp-source -s 1 -m 1 -l "$SIZE" -f from@bench.local -t to@bench.local \
            "127.0.0.1:$SINK_PORT" > "$T/source-reference.log" 2>&1; then
        log "reference message could not be sent: $(tail -3 "$T/source-reference.log" | tr '\n' ' ')"; exit 1
    fi
    i=0
    while [ -z "$(find "$T/dump-reference" -type f -size +0 2>/dev/null)" ] && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    stop_pid "$SINK_PID"; SINK_PID=""
fi

for s in $SESSIONS; do
    for rep in $(seq 1 "$REPEAT"); do
        for relay in $RELAYS; do
            if [ "$relay" = mailbridge ] && [ -n "$MB_SKIP" ]; then
                log "mailbridge skipped: $MB_SKIP"
                printf '{"relay":"mailbridge","sessions":%s,"messages":%s,"errors":[%s]}\n' \
                    "$s" "$MESSAGES" "$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$MB_SKIP")" >> "$RESULTS"
                continue
            fi
            one_run "$relay" "$s" "$rep" || log "$relay run with $s sessions could not be carried out"
            sleep 1
        done
    done
done

# ---------------------------------------------------------------- report ---
COMMIT=$(cd "$CRATE" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(cd "$CRATE" && [ -n "$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ] && echo "+uncommitted changes" || true)
python3 "$HERE/report.py" "$RESULTS" \
    --date "$(date -u +%Y-%m-%dT%H:%MZ)" \
    --commit "$COMMIT$DIRTY" \
    --command "bash bench/run.sh $ORIG_ARGS" \
    --postfix-version "$(postconf -d -h mail_version 2>/dev/null || echo '?')"
[ -n "$JSON_OUT" ] && cp "$RESULTS" "$JSON_OUT"
exit 0
