"""The capacity levers in a real worker (issue #14): bfloat16 storage and the cold tier wired
through settings, a conversation frozen to SQLite between its turns by the operator entry
point (`evostream cold-tier freeze`), continued by the worker exactly.

Why end to end: the worker keeps the conversation in its state cache, so after the freeze its
next commit must lose the compare-and-set, reload, thaw from SQLite and recompute, and the
embeddings must be those of a conversation that was never frozen.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import redis

from schemas.vectors import decode_vector
from stream.state.cold_tier import ColdTier
from support.oracle import wait_for_embeddings
from support.traffic import TopicMaker, Workers, pipeline_env, produce, random_messages, turn_record
from support.workers import REPO, WorkerProc

N_BEFORE, N_AFTER = 6, 4


def test_worker_continues_a_frozen_conversation_exactly(kafka_bootstrap: str, redis_url: str, tmp_path) -> None:
    topics = TopicMaker(kafka_bootstrap, "capacity-cold")
    procs = Workers()
    cold_path = tmp_path / "cold.sqlite"
    rng = random.Random(14)
    msgs = [random_messages(rng, words=(3, 30), long_turn_p=0.0) for _ in range(N_BEFORE + N_AFTER)]
    try:
        penv = pipeline_env(topics, kafka_bootstrap, redis_url, partitions=2, extra={
            "EVOSTREAM_STATE_STORAGE_DTYPE": "bfloat16", "EVOSTREAM_COLD_TIER_PATH": str(cold_path)})
        worker = procs.add(WorkerProc(penv, tmp_path, "cold").start())
        produce(kafka_bootstrap, penv.turns_topic, [turn_record("frozen", i, msgs[i]) for i in range(N_BEFORE)])
        wait_for_embeddings(penv, {("frozen", i) for i in range(N_BEFORE)}, timeout=300, workers=[worker])

        # the operator's entry point moves it out of Redis while the worker still caches it
        done = subprocess.run([sys.executable, "-m", "stream.cli", "cold-tier", "freeze", "--idle-s", "0"],
                              cwd=REPO, env=penv.env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["frozen"] == 1 and report["cold_rows"] == 1, report
        r = redis.Redis.from_url(redis_url)
        metas = list(r.scan_iter(match=f"{penv.namespace}:*:meta"))
        assert metas == [], "state keys left in Redis after the freeze"

        # its next turns, and a never-frozen twin with the same turns
        produce(kafka_bootstrap, penv.turns_topic,
                [turn_record("frozen", i, msgs[i]) for i in range(N_BEFORE, N_BEFORE + N_AFTER)]
                + [turn_record("twin", i, msgs[i]) for i in range(N_BEFORE + N_AFTER)])
        keys = {(c, i) for c in ("frozen", "twin") for i in range(N_BEFORE + N_AFTER)}
        out = wait_for_embeddings(penv, keys, timeout=300, workers=[worker])
        for i in range(N_BEFORE + N_AFTER):
            a, b = out.embeddings[("frozen", i)][-1], out.embeddings[("twin", i)][-1]
            assert a.memory_len == b.memory_len, (i, a.memory_len, b.memory_len)
            assert a.memory.value == "continued" or i == 0, (i, a.memory)
            va, vb = decode_vector(a.vector), decode_vector(b.vector)
            assert np.max(np.abs(va - vb)) < 1e-5, (i, float(np.max(np.abs(va - vb))))
        cold = ColdTier(cold_path)
        assert cold.count() == 0, "the cold copy was not dropped after the thaw"
        cold.close()
        marks = [r.hget(k.decode().removesuffix("meta") + "mark", "status") for k in
                 r.scan_iter(match=f"{penv.namespace}:*:meta")]
        assert sorted(marks) == [b"live", b"live"], marks
        r.close()
    finally:
        for p in procs.procs:
            p.stop()
        topics.close()
