#!/usr/bin/env bash
# Make sure the services the tests use are running: PostgreSQL, Redis, the Docker engine,
# and the tools they need: nginx, debootstrap, docker-compose, Chromium.
# As root on Debian it installs and starts what is missing; elsewhere it only checks.
# With CI=true a missing service is an error; otherwise the tests that need it are skipped.
set -uo pipefail

log() { printf 'services: %s\n' "$*"; }
is_root() { [ "$(id -u)" = 0 ]; }
can_apt() { is_root && command -v apt-get >/dev/null 2>&1; }
APT_UPDATED=0
apt_install() {
    can_apt || return 1
    if [ "$APT_UPDATED" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
missing=()

# --- PostgreSQL -------------------------------------------------------------
pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
if ! pg_ready; then
    command -v pg_ctlcluster >/dev/null 2>&1 || apt_install postgresql
    if command -v pg_ctlcluster >/dev/null 2>&1; then
        version=$(ls /etc/postgresql 2>/dev/null | sort -n | tail -n1)
        [ -n "$version" ] && pg_ctlcluster "$version" main start 2>/dev/null
        for _ in $(seq 1 30); do pg_ready && break; sleep 1; done
    fi
fi
if pg_ready; then
    if is_root && command -v psql >/dev/null 2>&1; then
        su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='modelport'\"" | grep -q 1 ||
            su postgres -c "psql -qc \"CREATE ROLE modelport LOGIN PASSWORD 'modelport' CREATEDB\""
        su postgres -c "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname='modelport'\"" | grep -q 1 ||
            su postgres -c "createdb -O modelport modelport"
    fi
    log "PostgreSQL is up"
else
    missing+=(PostgreSQL)
fi

# --- Redis ------------------------------------------------------------------
redis_ready() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
if ! redis_ready; then
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server
    command -v redis-server >/dev/null 2>&1 && redis-server --daemonize yes --port 6379 --save '' >/dev/null
    for _ in $(seq 1 20); do redis_ready && break; sleep 0.5; done
fi
if redis_ready; then log "Redis is up"; else missing+=(Redis); fi

# --- Docker engine ----------------------------------------------------------
docker_ready() { docker info >/dev/null 2>&1; }
if ! docker_ready; then
    command -v dockerd >/dev/null 2>&1 || apt_install docker.io
    if command -v dockerd >/dev/null 2>&1 && is_root; then
        (dockerd >/var/log/dockerd.log 2>&1 &)
        for _ in $(seq 1 60); do docker_ready && break; sleep 1; done
    fi
fi
if docker_ready; then log "Docker engine is up"; else missing+=("Docker engine"); fi

# --- nginx, debootstrap, docker-compose ----------------------------------------
# nginx gives deployments their stable URLs; debootstrap builds the local base image
# (no registry here); docker-compose validates docker-compose.yml.
ensure_tool() {  # ensure_tool NAME PACKAGE: the command NAME, installed from PACKAGE if missing
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || apt_install "$2"
    if command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; then
        log "$1 is installed"
    else
        missing+=("$1")
    fi
}
ensure_tool nginx nginx
ensure_tool debootstrap debootstrap
ensure_tool docker-compose docker-compose

# --- Chromium (browser tests) -----------------------------------------------------
CHROMIUM="${MODELPORT_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
    apt_install chromium
fi
if [ -x "$CHROMIUM" ]; then log "Chromium is installed"; else missing+=(Chromium); fi

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "${CI:-}" = "true" ]; then
        log "missing in CI: ${missing[*]}"
        exit 1
    fi
    log "not available, tests that need them will be skipped: ${missing[*]}"
fi
exit 0
