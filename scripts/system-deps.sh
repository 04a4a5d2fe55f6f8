#!/usr/bin/env bash
# Debian packages that some tests drive as real peers: kcat (librdkafka, a non-Python Kafka
# client), stunnel4 (TLS in front of the local broker), redis-server/redis-tools/
# redis-sentinel (TLS-enabled Redis builds and Sentinel). Idempotent: installs only what is
# missing.
#
# Where it must install (issue #20): in CI (CI=true) and whenever it runs as root with
# apt-get, a peer that cannot be installed is an error (exit 1), so the run fails loudly
# instead of going green with those tests skipped. Only a developer without root (or without
# apt-get) outside CI gets a warning and exit 0; the tests that need a missing peer then skip,
# and the pytest summary names the peer (tests/conftest.py, marker `peer`).
set -euo pipefail
declare -A provides=([kcat]=kcat [stunnel4]=stunnel4 [redis-server]=redis-server [redis-cli]=redis-tools
                     [redis-sentinel]=redis-sentinel)
missing() {
  local out=()
  for cmd in kcat stunnel4 redis-server redis-cli redis-sentinel; do
    command -v "$cmd" >/dev/null 2>&1 || out+=("${provides[$cmd]}")
  done
  echo "${out[@]:-}"
}
need=($(missing))
[ ${#need[@]} -eq 0 ] && exit 0
in_ci=false
case "${CI:-}" in 1|true|TRUE|True|yes) in_ci=true ;; esac
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  if $in_ci; then
    echo "[system-deps] ERROR: missing ${need[*]} and cannot install them here (needs root and apt-get); CI must have every peer" >&2
    exit 1
  fi
  echo "[system-deps] missing ${need[*]} (install them with your package manager); the tests that need them will skip, named in the pytest summary" >&2
  exit 0
fi
echo "[system-deps] installing ${need[*]} with apt-get (first run only)" >&2
if ! apt-get update -qq >/dev/null; then
  echo "[system-deps] ERROR: apt-get update failed; cannot install ${need[*]}" >&2
  exit 1
fi
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; then
  echo "[system-deps] ERROR: apt-get install ${need[*]} failed" >&2
  exit 1
fi
# Debian starts the packaged services where an init system runs; the tests start their own.
for svc in redis-server redis-sentinel; do
  (command -v service >/dev/null 2>&1 && service "$svc" stop >/dev/null 2>&1) || true
done
still=($(missing))
if [ ${#still[@]} -ne 0 ]; then
  echo "[system-deps] ERROR: still missing after apt-get install: ${still[*]}" >&2
  exit 1
fi
echo "[system-deps] ready" >&2
