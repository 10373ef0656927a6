#!/usr/bin/env bash
# Container test: build the root Dockerfile with buildah and relay a mail
# through the image configured by environment variables only.
#
# No registry is reachable from CI, so the two base images the Dockerfile
# names are made here as local stand-ins and cached between runs:
#   docker.io/library/debian:bookworm-slim   Debian from debootstrap --variant=minbase
#   docker.io/library/rust:1.95-slim-bookworm that, plus gcc and this machine's
#       Rust toolchain laid out as the official image does (/usr/local/cargo,
#       /usr/local/rustup) and this machine's CA bundle, so cargo inside the
#       build reaches crates.io the way this machine does.
#
# Usage: deploy/test/container.sh [standins|build|run|all]   (default: all)
# Every container it starts is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."

STANDIN_VERSION=1
CACHE=${CONTAINER_TEST_CACHE:-/var/cache/mailbridge-ci}
IMAGE=${CONTAINER_TEST_IMAGE:-localhost/mailbridge:test}
DEBIAN_IMG=docker.io/library/debian:bookworm-slim
RUST_IMG=docker.io/library/rust:1.95-slim-bookworm
TOOLCHAIN=1.95.0-x86_64-unknown-linux-gnu
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export BUILDAH_ISOLATION=chroot

containers=()
cleanup() {
  for c in "${containers[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

log() { echo "container.sh: $*" >&2; }
stamp() { echo "$CACHE/$1.v$STANDIN_VERSION"; }

has_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

rootfs() { # rootfs NAME [--include=...]
  local name=$1; shift
  local dir=$CACHE/$name-rootfs
  if [ ! -f "$(stamp "$name-rootfs")" ]; then
    rm -rf "$dir"
    mkdir -p "$CACHE"
    log "debootstrap $name (once; cached in $CACHE)"
    debootstrap --variant=minbase "$@" bookworm "$dir" "$MIRROR" >"$CACHE/$name-debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/$name-debootstrap.log" >&2; exit 1; }
    # What the official slim images drop too.
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* \
      "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/locale/*
    touch "$(stamp "$name-rootfs")"
  fi
  echo "$dir"
}

standins() {
  if ! has_image "$DEBIAN_IMG" || [ ! -f "$(stamp debian-image)" ]; then
    local dir; dir=$(rootfs debian)
    local c; c=$(buildah from scratch); containers+=("$c")
    buildah copy --quiet "$c" "$dir" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --cmd bash "$c"
    buildah commit --quiet "$c" "$DEBIAN_IMG" >/dev/null
    touch "$(stamp debian-image)"
    log "made $DEBIAN_IMG"
  fi
  if ! has_image "$RUST_IMG" || [ ! -f "$(stamp rust-image)" ]; then
    local dir; dir=$(rootfs rust --include=ca-certificates,gcc,libc6-dev,libcap2-bin)
    local tc=${RUSTUP_HOME:-$HOME/.rustup}/toolchains/$TOOLCHAIN
    [ -d "$tc" ] || { log "no $TOOLCHAIN toolchain under ${RUSTUP_HOME:-$HOME/.rustup}"; exit 1; }
    local c; c=$(buildah from --pull=never "$DEBIAN_IMG"); containers+=("$c")
    buildah copy --quiet "$c" "$dir" / >/dev/null
    # The toolchain without its documentation (share/doc is 800 MB of HTML).
    local stage=$CACHE/rust-stage
    rm -rf "$stage"; mkdir -p "$stage/rustup/toolchains" "$stage/cargo/bin"
    cp -a "$(readlink -f "$tc")" "$stage/rustup/toolchains/$TOOLCHAIN"
    rm -rf "$stage/rustup/toolchains/$TOOLCHAIN/share/doc"
    printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\n' "$TOOLCHAIN" >"$stage/rustup/settings.toml"
    local rustup=${CARGO_HOME:-$HOME/.cargo}/bin/rustup
    cp "$rustup" "$stage/cargo/bin/rustup"
    for p in cargo rustc rustdoc; do ln "$stage/cargo/bin/rustup" "$stage/cargo/bin/$p"; done
    buildah copy --quiet "$c" "$stage/rustup" /usr/local/rustup >/dev/null
    buildah copy --quiet "$c" "$stage/cargo" /usr/local/cargo >/dev/null
    buildah copy --quiet "$c" /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt >/dev/null
    rm -rf "$stage"
    buildah config --env RUSTUP_HOME=/usr/local/rustup --env CARGO_HOME=/usr/local/cargo \
      --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --env RUST_VERSION=1.95.0 "$c"
    buildah commit --quiet "$c" "$RUST_IMG" >/dev/null
    touch "$(stamp rust-image)"
    log "made $RUST_IMG"
  fi
}

build() {
  log "buildah bud $IMAGE (release build inside the container)"
  local t0=$SECONDS
  buildah bud --isolation=chroot --pull=never --layers --format docker -t "$IMAGE" . >"$CACHE/bud.log" 2>&1 \
    || { tail -40 "$CACHE/bud.log" >&2; exit 1; }
  log "built in $((SECONDS - t0)) s"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

kill_tree() { # the process we started and its descendants, by id
  local pid=$1 kids
  kids=$(cat /proc/"$pid"/task/*/children 2>/dev/null || true)
  for k in $kids; do kill_tree "$k"; done
  kill -TERM "$pid" 2>/dev/null || true
}

pids=()
cleanup_run() {
  for p in "${pids[@]}"; do kill_tree "$p"; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  cleanup
  [ -n "${work:-}" ] && rm -rf "$work"
}

fail() { log "FAIL: $*"; [ -f "${work:-/nonexistent}/daemon.log" ] && tail -30 "$work/daemon.log" >&2; exit 1; }

run_test() {
  trap cleanup_run EXIT
  work=$(mktemp -d)
  chmod 0777 "$work"
  # The image: non-root, small.
  local user size
  user=$(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "$IMAGE")
  case "$user" in ""|0|0:*|root|root:*) fail "image runs as root ($user)";; esac
  size=$(buildah inspect --type image --format '{{.Docker.Size}}' "$IMAGE" 2>/dev/null || echo 0)
  local c; c=$(buildah from --pull=never "$IMAGE"); containers+=("$c")
  local mnt; mnt=$(buildah mount "$c")
  size=$(du -sb "$mnt" | cut -f1)
  getcap "$mnt/usr/local/bin/mailbridge" | grep -q cap_net_bind_service \
    || log "note: the file capability did not survive the copy (port 25 needs the sysctl or 2525)"
  buildah umount "$c" >/dev/null
  log "image user $user, size $((size / 1024 / 1024)) MiB ($size bytes)"
  buildah inspect --type image --format '{{.Docker.Config.Healthcheck.Test}}' "$IMAGE" | grep -q 'mailbridge health' \
    || fail "the image has no HEALTHCHECK running mailbridge health"
  [ "$size" -le $((40 * 1024 * 1024)) ] || fail "image is larger than 40 MB"

  # An SMTP sink on loopback as the upstream; the container shares the
  # host's network (chroot isolation), so it reaches it on 127.0.0.1.
  local sink_port smtp_port admin_port
  sink_port=$(free_port); smtp_port=$(free_port); admin_port=$(free_port)
  mkdir -p "$work/sink"; chmod 0777 "$work/sink"
  /usr/sbin/smtp-sink -u nobody -d "$work/sink/%M." "127.0.0.1:$sink_port" 10 >"$work/sink.log" 2>&1 &
  pids+=($!)
  # Configured by environment variables only: no file in the image.
  buildah run --isolation=chroot --network=host \
    -e MAILBRIDGE_LISTEN__ADDRESS="127.0.0.1:$smtp_port" \
    -e MAILBRIDGE_ADMIN__ADDRESS="127.0.0.1:$admin_port" \
    -e MAILBRIDGE_HOSTNAME=container.test \
    -e MAILBRIDGE_LOG_FORMAT=json \
    -e MAILBRIDGE_UPSTREAM__PROTOCOL=smtp \
    -e MAILBRIDGE_UPSTREAM__SERVER="127.0.0.1:$sink_port" \
    -e MAILBRIDGE_UPSTREAM__TLS=false \
    -e MAILBRIDGE_UPSTREAM__REQUIRES_AUTH=false \
    "$c" -- mailbridge run >"$work/daemon.log" 2>&1 &
  pids+=($!)
  local i
  for i in $(seq 1 100); do
    grep -q '"listening for SMTP"' "$work/daemon.log" 2>/dev/null && break
    sleep 0.2
  done
  grep -q '"listening for SMTP"' "$work/daemon.log" || fail "mailbridge did not start in the container"
  buildah run --isolation=chroot --network=host \
    -e MAILBRIDGE_ADMIN__ADDRESS="127.0.0.1:$admin_port" "$c" -- mailbridge health >/dev/null \
    || fail "mailbridge health (the HEALTHCHECK) failed"
  swaks --server "127.0.0.1:$smtp_port" --from app@example.com --to user@example.net \
    --header "Subject: container test" --body "relayed by the image" >"$work/swaks.log" 2>&1 \
    || { cat "$work/swaks.log" >&2; fail "swaks could not send"; }
  # The sendmail entry point of the image (the symlink), through the daemon.
  printf 'From: cron@example.com\nTo: user@example.net\nSubject: container sendmail\n\nfrom sendmail -t\n' \
    | buildah run --isolation=chroot --network=host \
        -e MAILBRIDGE_LISTEN__ADDRESS="127.0.0.1:$smtp_port" "$c" -- sendmail -t -i \
    || fail "sendmail -t in the container failed"
  for i in $(seq 1 100); do
    grep -rqs "container sendmail" "$work/sink" && grep -rqs "container test" "$work/sink" && break
    sleep 0.2
  done
  grep -rqs "container test" "$work/sink" || fail "the SMTP message did not reach the SMTP sink"
  grep -rqs "container sendmail" "$work/sink" || fail "the sendmail message did not reach the SMTP sink"
  log "PASS: image $IMAGE ($((size / 1024 / 1024)) MiB, user $user) relayed mail (SMTP and sendmail) configured by environment only"
  echo "container: 1 passed, 0 failed"
}

case "${1:-all}" in
  standins) standins ;;
  build) build ;;
  run) run_test ;;
  all) standins; build; run_test ;;
  *) echo "usage: $0 [standins|build|run|all]" >&2; exit 64 ;;
esac
