#!/usr/bin/env bash
# Start/stop the offline local stack (tansu broker + Valkey/Redis on loopback).
#   deploy/local-stack.sh start|stop|status|env [--run-dir DIR] [--export]
# A thin wrapper around `python -m devtools.localstack` (see devtools/localstack.py) so the
# stack can be driven from any directory; state lives in .run/localstack/ by default.
# After `start`:  set -a; . .run/localstack/env; set +a
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${EVOSTREAM_PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
  echo "error: $PY not found; run ./scripts/bootstrap.sh first" >&2
  exit 1
fi
if [ $# -lt 1 ]; then
  echo "usage: $0 start|stop|status|env [--run-dir DIR]" >&2
  exit 2
fi
exec "$PY" -m devtools.localstack "$@"
