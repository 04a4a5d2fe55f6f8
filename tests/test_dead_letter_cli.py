"""`evostream dead-letters list|show|replay` (issue #11) against a real broker, Redis and
worker: a rejected turn is listed and shown, replaying it with a corrected value gets the turn
applied (its embedding appears), replaying it unchanged sends the byte-identical original."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from pathlib import Path

from schemas.events import TurnEvent
from stream.clients.producer import produce_records
from tests.support.workers import PipelineEnv, WorkerProc, read_topic_sync, wait_for
from tests.test_cli import ExitCode, one_error, run_cli


def _env(penv: PipelineEnv) -> dict[str, str]:
    return {k: v for k, v in penv.env().items() if k.startswith("EVOSTREAM_")}


def test_list_show_and_replay_applies_the_turn(kafka_bootstrap: str, redis_url: str, topic_factory,
                                               tmp_path: Path) -> None:
    penv = PipelineEnv(kafka_bootstrap, redis_url, topic_factory(1), topic_factory(1), topic_factory(1), 1)
    env = _env(penv)
    worker = WorkerProc(penv, tmp_path, "dl").start()
    try:
        good = TurnEvent(conversation_id="dl-c1", seq=0, timestamp=datetime.now(timezone.utc),
                         messages=[{"role": "user", "content": "please refund order 17"}])
        wrong = good.model_dump(mode="json")
        wrong["conversation_id"] = "someone-else"  # body disagrees with the key: key_mismatch
        wrong_bytes = json.dumps(wrong).encode()
        asyncio.run(produce_records([(b"dl-c1", wrong_bytes)], bootstrap=kafka_bootstrap, topic=penv.turns_topic,
                                    progress=False))
        worker.wait_ready(timeout=180)

        def listed() -> list[str]:
            p = run_cli("dead-letters", "list", **env)
            assert p.returncode == 0, p.stderr
            return [line for line in p.stdout.splitlines() if "key_mismatch" in line]

        lines = wait_for(listed, timeout=120, interval=2, what="the dead letter listed")
        assert len(lines) == 1 and "'dl-c1'" in lines[0] and f"{penv.turns_topic}/0@0" in lines[0], lines
        letter_id = lines[0].split()[0]
        assert letter_id == "0:0"

        p = run_cli("dead-letters", "show", letter_id, **env)
        assert p.returncode == 0, p.stderr
        shown = json.loads(p.stdout)
        assert shown["reason_code"] == "key_mismatch" and shown["original_key"] == "dl-c1"
        assert json.loads(shown["original_value"]) == wrong

        one_error(run_cli("dead-letters", "show", "0:99", **env), ExitCode.FAILED, "no dead letter 0:99")
        one_error(run_cli("dead-letters", "show", "nonsense", **env), ExitCode.USAGE, "is not PARTITION:OFFSET")

        # unchanged: the original bytes go back to the turns topic as they were
        p = run_cli("dead-letters", "replay", letter_id, **env)
        assert p.returncode == 0 and "original value unchanged" in p.stdout, p.stderr
        turns = read_topic_sync(kafka_bootstrap, penv.turns_topic)
        assert [(m.key, m.value) for m in turns] == [(b"dl-c1", wrong_bytes)] * 2

        # corrected: the turn is applied and embedded
        fixed = tmp_path / "fixed.json"
        fixed.write_text(good.model_dump_json())
        p = run_cli("dead-letters", "replay", letter_id, "--value-file", str(fixed), **env)
        assert p.returncode == 0 and "corrected value" in p.stdout, p.stderr

        def embedded() -> list:
            return [m for m in read_topic_sync(kafka_bootstrap, penv.embeddings_topic, idle_ms=800)
                    if json.loads(m.value).get("conversation_id") == "dl-c1"
                    and json.loads(m.value).get("seq") == 0]

        assert wait_for(embedded, timeout=120, interval=2, what="the replayed turn embedded")
        p = run_cli("inspect", "dl-c1", **env)
        assert p.returncode == 0, p.stderr
    finally:
        worker.stop()
