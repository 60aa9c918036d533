#!/usr/bin/env bash
# Makes this host ready to run the agent and its tests: the Debian packages the tests use, a Docker
# engine that answers, and the local test image. Safe to run again; does only what is missing.
set -euo pipefail

log() { echo "ensure-host: $*" >&2; }

# A pid is a live dockerd only if the process exists, is not a zombie, and is dockerd (pids get
# reused, and a killed dockerd whose parent has not reaped it still answers kill -0).
dockerd_alive() {
    local pid=$1
    [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != "Z" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "dockerd" ]
}

apt_updated=0
apt_install() {
    if [ "$(id -u)" != 0 ]; then
        log "need root to install: $*"; exit 1
    fi
    if [ "$apt_updated" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Debian packages: the engine, numactl (inventory cross-check), busybox-static (test image),
# docker-registry and htpasswd (pull tests), systemd-analyze (unit checks).
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v numactl >/dev/null 2>&1 || missing+=(numactl)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
command -v htpasswd >/dev/null 2>&1 || missing+=(apache2-utils)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi

# A Docker engine: use the one that answers, else start dockerd in the background.
if ! docker info >/dev/null 2>&1; then
    pidfile=/var/run/docker.pid
    if [ -f "$pidfile" ]; then
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if dockerd_alive "$pid"; then
            log "dockerd (pid $pid) is running but not answering yet"
        else
            log "removing stale $pidfile (pid '${pid}' is not alive)"
            rm -f "$pidfile"
        fi
    fi
    if [ ! -f "$pidfile" ]; then
        log "starting dockerd (log: /var/log/dockerd.log)"
        nohup dockerd >/var/log/dockerd.log 2>&1 </dev/null &
    fi
    for _ in $(seq 1 120); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    if ! docker info >/dev/null 2>&1; then
        log "the Docker engine did not answer within 60 s; last lines of /var/log/dockerd.log:"
        tail -n 20 /var/log/dockerd.log >&2 || true
        exit 1
    fi
fi
log "docker engine $(docker version --format '{{.Server.Version}}') answers"

# The local test image: busybox-static in an otherwise empty rootfs, no registry needed.
image="${DROVE_TEST_IMAGE:-drove-agent-test/busybox:latest}"
if ! docker image inspect "$image" >/dev/null 2>&1; then
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    mkdir -p "$rootfs"/{bin,etc,tmp,proc,sys,dev}
    chmod 1777 "$rootfs/tmp"
    cp /bin/busybox "$rootfs/bin/busybox"
    for applet in $("$rootfs/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
    done
    printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' >"$rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
    tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/sh"]' --change 'ENV PATH=/bin' - "$image" >/dev/null
    log "built test image $image"
fi
