#!/usr/bin/env bash
# Debian packages that some tests drive as real peers: kcat (librdkafka, a non-Python Kafka
# client), stunnel4 (TLS in front of the local broker), redis-server/redis-tools/
# redis-sentinel (TLS-enabled Redis builds and Sentinel). Idempotent: installs only what is
# missing. Needs apt-get and root (CI and these machines run as root); elsewhere it says what
# is missing and the tests that need it skip with that reason.
set -euo pipefail
need=()
command -v kcat >/dev/null 2>&1 || need+=(kcat)
command -v stunnel4 >/dev/null 2>&1 || need+=(stunnel4)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v redis-sentinel >/dev/null 2>&1 || need+=(redis-sentinel)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[system-deps] missing ${need[*]} (install them with your package manager); tests that need them will skip" >&2
  exit 0
fi
echo "[system-deps] installing ${need[*]} with apt-get (first run only)" >&2
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts the packaged services where an init system runs; the tests start their own.
for svc in redis-server redis-sentinel; do
  (command -v service >/dev/null 2>&1 && service "$svc" stop >/dev/null 2>&1) || true
done
echo "[system-deps] ready" >&2
