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
echo "[bootstrap] creating $VENV and installing pinned dependencies (first run: about a minute)" >&2
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch==2.13.0 is pinned in the lock: pip picks the local CPU build; an unpinned torch
# would pull gigabytes of CUDA wheels.
"$VENV/bin/python" -m pip install -q -r requirements.lock
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -m pip check
echo "$want" > "$STAMP"
echo "[bootstrap] ready: $VENV" >&2
