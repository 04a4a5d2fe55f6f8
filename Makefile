# The two commands of the README: `make demo` and `make test`. Both set up .venv first
# (pinned dependencies from requirements.lock; a no-op when nothing changed).
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-all bench bench-engine bench-e2e bench-codecs chaos-long stack-start stack-stop clean

setup:
	@./scripts/bootstrap.sh
	@./scripts/system-deps.sh

demo: setup
	$(PY) -m stream.cli demo

# Default test run: unit, engine parity, real-broker/real-Redis end-to-end and the short
# fault-injection suite. Long soak/chaos runs are behind markers (see README).
test: setup
	$(PY) -m pytest -m "not slow and not chaos_long" -q

test-all: setup
	$(PY) -m pytest -q

bench: bench-engine bench-e2e bench-codecs

bench-engine: setup
	$(PY) -m benchmarks.bench_engine

bench-e2e: setup
	$(PY) -m benchmarks.bench_e2e

bench-codecs: setup
	$(PY) -m benchmarks.bench_codecs

chaos-long: setup
	EVOSTREAM_CHAOS_SCALE=long $(PY) -m pytest -m chaos -q -s tests/test_chaos.py
	$(PY) scripts/chaos_report.py

stack-start: setup
	$(PY) -m stream.localstack start

stack-stop:
	$(PY) -m stream.localstack stop

clean:
	rm -rf .run .pytest_cache .hypothesis
