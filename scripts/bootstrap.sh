#!/usr/bin/env bash
# Creates .venv and installs the pinned dependency set (requirements.lock: one pip
# resolution, CPU torch) plus evostream itself in editable mode. Idempotent: it does
# nothing when the lock file has not changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${EVOSTREAM_VENV:-.venv}
STAMP="$VENV/.evostream-lock.sha256"
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
t0=$SECONDS
step() { echo "[bootstrap] ($((SECONDS - t0))s) $*" >&2; }
# pip's own lines, shortened to one per package, so that a minute of installing is visibly moving
progress() { sed -u -n -e 's/^Collecting \([^ ]*\).*/[bootstrap]   collecting \1/p' \
                      -e 's/^Installing collected packages.*/[bootstrap]   installing .../p' >&2; }
n=$(grep -cE '^[A-Za-z0-9]' requirements.lock || true)
step "creating $VENV and installing $n pinned packages (first run: about a minute)"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch==2.13.0 is pinned in the lock, and the lock names PyTorch's CPU index, so pip installs
# the CPU build (from PyPI alone it would pull gigabytes of CUDA wheels). Where that index cannot
# be reached (an offline machine with a local wheel mirror), pip would retry it for minutes per
# package: there it gives up on it at once and uses the configured indexes.
retries=()
if ! "$PY" -c 'import socket; socket.setdefaulttimeout(3); socket.getaddrinfo("download.pytorch.org", 443)' \
     2>/dev/null; then
  retries=(--retries 0)
  step "download.pytorch.org cannot be resolved here: using the configured package indexes only"
fi
"$VENV/bin/python" -m pip install "${retries[@]}" --progress-bar off -r requirements.lock | progress
step "installing evostream itself (editable)"
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
step "checking the installed set"
"$VENV/bin/python" -m pip check
echo "$want" > "$STAMP"
step "ready: $VENV (run commands as $VENV/bin/evostream, or: source $VENV/bin/activate)"
