# The two commands of the README: `make demo` and `make test`. Both set up .venv first
# (pinned dependencies from requirements.lock; a no-op when nothing changed).
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-all bench bench-engine bench-e2e bench-e2e-load bench-codecs bench-query bench-sink bench-plots capacity capacity-scale chaos-long stack-start stack-stop clean

setup:
	@./scripts/bootstrap.sh
	@./scripts/system-deps.sh

demo: setup
	$(PY) -m stream.cli demo

# Default test run: unit, engine parity, real-broker/real-Redis end-to-end and the short
# fault-injection suite. Long soak/chaos runs are behind markers (see README).
# In parallel (pytest-xdist): the suite mostly waits on processes and sockets, and every xdist
# worker starts its own broker and Redis (tests/conftest.py), so tests never share a stack.
TEST_WORKERS ?= 4
test: setup
	$(PY) -m pytest -m "not slow and not chaos_long" -q -n $(TEST_WORKERS)

test-all: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# issue 11: the plots (PNG in benchmarks/plots/, linked from BENCHMARKS.md) are drawn last,
# from the series the benchmarks above saved in benchmarks/results/
bench: bench-engine bench-e2e bench-e2e-load bench-codecs bench-query
	$(MAKE) bench-plots

bench-engine: setup  # --history-points: more re-read points for the plot of ms per turn by history (issue 11)
	$(PY) -m benchmarks.bench_engine --history-points 100,200,300,400

bench-e2e: setup
	$(PY) -m benchmarks.bench_e2e

bench-e2e-load: setup  # issue 11: latency vs offered load, one steady phase per rate (~2.5 min)
	$(PY) -m benchmarks.bench_e2e --conversations 16 --turns 8 --rates 4,8,16,32,64 --section 'End-to-end, latency vs load (issue 11)'

bench-plots: setup  # issue 11: draw benchmarks/results/*.json (no measuring)
	$(PY) -m benchmarks.plots

bench-codecs: setup
	$(PY) -m benchmarks.bench_codecs

bench-query: setup  # issue 9: query latency, ingestion under a query flood
	$(PY) -m benchmarks.bench_query

bench-sink: setup  # issue 19: sink rows/s vs produce rate, search p50/p99 at 100k rows, recall@10 (~15 min)
	$(PY) -m benchmarks.bench_sink --dim 1024 --rows 100000 --rates 50,100,200 --phase-records 1000 --queries 200 --ef 40,100,200
	$(PY) -m benchmarks.figures render

capacity: setup  # issue 14: per-conversation figures -> docs/CAPACITY.md (model time: add --model-time-only, slow)
	$(PY) -m benchmarks.capacity_measure --drift-convs 2 --drift-turns 40 --lever-convs 20
	$(PY) -m benchmarks.capacity_measure --compact-sweep-only
	$(PY) scripts/capacity_report.py

capacity-scale: setup  # issue 14: 20k conversations, 2 workers, a rebalance -> BENCHMARKS.md
	$(PY) -m benchmarks.capacity_scale --conversations 20000 --live-turns 300 --rate 3
	$(PY) scripts/capacity_report.py

chaos-long: setup
	EVOSTREAM_CHAOS_SCALE=long $(PY) -m pytest -m chaos -q -s tests/test_chaos.py
	$(PY) scripts/chaos_report.py

stack-start: setup
	$(PY) -m devtools.localstack start

stack-stop:
	$(PY) -m devtools.localstack stop

clean:
	rm -rf .run .pytest_cache .hypothesis
