#!/usr/bin/env bash
# A private Docker engine for the tests and CI.
#
#   docker-engine.sh start    make sure an engine answers; print DOCKER_HOST=...
#   docker-engine.sh stop     stop the private engine started by `start`
#   docker-engine.sh env      print DOCKER_HOST=... if an engine answers (else exit 1)
#   docker-engine.sh status   like env, but says which engine and exits 0/1
#
# `start` uses an engine that already answers (DOCKER_HOST, the default
# socket, or a private one left running). Otherwise it installs Debian's
# docker.io if dockerd is missing and starts a private dockerd whose state,
# socket, pid file and log all live under $SPELL_DOCKERD_DIR
# (default /tmp/spell-dockerd). Progress goes to stderr; stdout carries only
# the DOCKER_HOST line, so callers can do
#
#   export "$(bash tests/support/docker-engine.sh start)"
#
# What we found on this machine (Firecracker VM, kernel 6.18, cgroup v1, root,
# Debian 12 docker.io 20.10.24 with its own containerd 1.6 and runc 1.1):
# * overlay2 works on the ext4 root (/tmp is on it). vfs is the fallback for
#   a backing filesystem that cannot hold overlay layers.
# * iptables (nft backend) works, so the default bridge network is kept:
#   `--network none` and `--network bridge` both work. Fallbacks, tried only
#   if the daemon does not come up: --iptables=false, then --bridge=none
#   (which leaves `--network none` and `host` only).
# * The bridge is given its own subnet (--bip, SPELL_DOCKERD_BIP) and the
#   daemon may neither turn on IP forwarding nor masquerade: a container on
#   the bridge reaches this machine (the gateway address) and other containers,
#   and nothing beyond. A test that serves a container should bind its server
#   to the gateway address, which `env`/`status` do not print but
#   `docker network inspect bridge` (or images.bridge_gateway()) shows.
#   Because forwarding is off, `docker run` on the bridge prints
#   "WARNING: IPv4 forwarding is disabled. Networking will not work." on
#   stderr; that is expected (it only means: no route beyond this machine).
# * A dockerd killed with SIGKILL (say, at the end of a session) leaves a
#   stale pid file, socket and netns mounts; `start` clears them and the new
#   daemon removes the dead containers itself.
# * The Docker Hub is unreachable: images come from tests/support/images.py.
# * Debian's postinst does not start a system dockerd here (policy-rc.d says
#   101), and we never touch /var/run/docker.sock.
# * Warnings in the log about blkio weight are harmless (cgroup v1 kernel).

set -euo pipefail

DIR=${SPELL_DOCKERD_DIR:-/tmp/spell-dockerd}
SOCK="$DIR/docker.sock"
HOST="unix://$SOCK"
PIDFILE="$DIR/dockerd.pid"
LOG="$DIR/dockerd.log"
BIP=${SPELL_DOCKERD_BIP:-172.29.0.1/24}
WAIT_SECONDS=${SPELL_DOCKERD_WAIT:-60}

say() { printf 'docker-engine: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

answers() {  # answers [HOST]: does an engine answer `docker info`?
    if [[ -n "${1:-}" ]]; then
        DOCKER_HOST="$1" timeout 20 docker info >/dev/null 2>&1
    else
        timeout 20 docker info >/dev/null 2>&1
    fi
}

private_pid() {  # print the pid of our dockerd if it is alive
    [[ -f "$PIDFILE" ]] || return 1
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    # Make sure the pid is still our dockerd and not a reused number.
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" \
        | grep -q -- "dockerd .*--data-root $DIR/data" || return 1
    echo "$pid"
}

clear_stale_state() {  # after a daemon died without cleaning up
    # A killed dockerd leaves network namespace and overlay mounts behind;
    # unmount them (deepest first) so its runtime folder can be removed. The
    # next dockerd cleans up its data root by itself.
    local mnt
    awk -v dir="$DIR/exec/" 'index($2, dir) == 1 { print $2 }' /proc/self/mounts \
        | sort -r | while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
    rm -rf "$DIR/exec" 2>/dev/null || true
    rm -f "$SOCK" "$PIDFILE"
}

current_engine() {  # print DOCKER_HOST=... of an engine that answers
    command -v docker >/dev/null 2>&1 || return 1
    if [[ -n "${DOCKER_HOST:-}" ]]; then
        answers && { echo "DOCKER_HOST=$DOCKER_HOST"; return 0; }
    elif answers; then
        echo "DOCKER_HOST=unix:///var/run/docker.sock"
        return 0
    fi
    if [[ -S "$SOCK" ]] && answers "$HOST"; then
        echo "DOCKER_HOST=$HOST"
        return 0
    fi
    return 1
}

install_docker() {
    command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1 \
        && return 0
    [[ $(id -u) -eq 0 ]] || die "dockerd is missing and we are not root"
    command -v apt-get >/dev/null 2>&1 || die "dockerd is missing and there is no apt-get"
    say "installing Debian's docker.io"
    if ! apt-cache show docker.io >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        -o Dpkg::Use-Pty=0 docker.io >"$DIR/apt.log" 2>&1 \
        || { tail -20 "$DIR/apt.log" >&2; die "apt-get install docker.io failed"; }
}

launch() {  # launch STORAGE_DRIVER EXTRA_ARGS...: start dockerd, wait for it
    local driver=$1; shift
    clear_stale_state
    mkdir -p "$DIR/data" "$DIR/exec"
    say "starting dockerd (storage driver $driver${*:+, $*})"
    {
        echo "=== $(date -u +%FT%TZ) dockerd --storage-driver $driver $*"
    } >>"$LOG"
    setsid dockerd \
        --data-root "$DIR/data" \
        --exec-root "$DIR/exec" \
        --pidfile "$PIDFILE" \
        --host "$HOST" \
        --storage-driver "$driver" \
        "$@" \
        </dev/null >>"$LOG" 2>&1 &
    local pid=$! waited=0
    while (( waited < WAIT_SECONDS * 2 )); do
        if ! kill -0 "$pid" 2>/dev/null; then
            say "dockerd exited; last lines of $LOG:"
            tail -5 "$LOG" >&2
            return 1
        fi
        if [[ -S "$SOCK" ]] && answers "$HOST"; then
            echo "$driver $*" >"$DIR/config"
            return 0
        fi
        sleep 0.5
        waited=$(( waited + 1 ))
    done
    say "dockerd did not answer within ${WAIT_SECONDS}s; stopping it"
    kill -TERM "$pid" 2>/dev/null || true
    sleep 2
    kill -KILL "$pid" 2>/dev/null || true
    return 1
}

cmd_start() {
    local line
    if line=$(current_engine); then
        echo "$line"
        return 0
    fi
    mkdir -p "$DIR"
    chmod 700 "$DIR"
    install_docker
    [[ $(id -u) -eq 0 ]] || die "starting a private dockerd needs root"
    if pid=$(private_pid); then
        die "dockerd $pid is running but does not answer on $HOST; see $LOG or run: $0 stop"
    fi

    local net=(--bip "$BIP" --ip-forward=false --ip-masq=false)
    # Tried in order until one answers; see the notes at the top.
    launch overlay2 "${net[@]}" \
        || launch overlay2 --iptables=false "${net[@]}" \
        || launch vfs --iptables=false "${net[@]}" \
        || launch vfs --iptables=false --bridge=none \
        || die "could not start dockerd; see $LOG"
    say "dockerd $(cat "$PIDFILE") answers on $HOST"
    echo "DOCKER_HOST=$HOST"
}

cmd_stop() {
    local pid
    if ! pid=$(private_pid); then
        say "no private dockerd is running"
        rm -f "$SOCK" "$PIDFILE"
        return 0
    fi
    say "stopping dockerd $pid"
    kill -TERM "$pid"
    local waited=0
    while kill -0 "$pid" 2>/dev/null && (( waited < 60 )); do
        sleep 0.5
        waited=$(( waited + 1 ))
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "dockerd $pid did not stop in 30s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$SOCK" "$PIDFILE"
}

cmd_status() {
    local line
    if line=$(current_engine); then
        say "engine answers: $line"
        echo "$line"
        return 0
    fi
    say "no engine answers"
    return 1
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    env) current_engine ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|env|status" >&2; exit 2 ;;
esac
