"""`evostream produce` streams its file (issue #11): constant memory, conversations still
interleaved with each one's turns in order, ready-made turn events passed through, bad lines
named by line number, and the records really land on a real broker."""

from __future__ import annotations

import io
import json
import tracemalloc
from collections import defaultdict
from pathlib import Path

import pytest

from stream.clients.produce_stream import InputError, iter_file_records


def _jsonl(n_convs: int, turns: int = 3) -> bytes:
    lines = [json.dumps({"conversation_id": f"c{i}", "tenant": "t",
                         "turns": [{"user": f"u{i}-{t} " + "x" * 200, "assistant": "ok"} for t in range(turns)]})
             for i in range(n_convs)]
    return ("\n".join(lines) + "\n").encode()


def test_every_turn_once_in_order_per_conversation_and_interleaved() -> None:
    data = _jsonl(10, turns=4) + json.dumps({"type": "turn", "conversation_id": "raw", "seq": 0,
                                            "messages": [{"role": "user", "content": "hi"}]}).encode() + b"\n"
    recs = list(iter_file_records(io.BytesIO(data), window=4))
    assert len(recs) == 41
    seqs: dict[str, list[int]] = defaultdict(list)
    for key, value in recs:
        ev = json.loads(value)
        assert ev["conversation_id"] == key.decode()
        seqs[key.decode()].append(ev["seq"])
    assert all(s == sorted(s) and s == list(range(len(s))) for s in seqs.values())
    assert set(seqs) == {f"c{i}" for i in range(10)} | {"raw"}
    # interleaved like live traffic: the first records are turn 0 of several conversations
    assert [json.loads(v)["seq"] for _, v in recs[:4]] == [0, 0, 0, 0]


def test_memory_does_not_grow_with_the_file() -> None:
    def peak(n: int) -> int:
        data = io.BytesIO(_jsonl(n))
        tracemalloc.start()
        count = sum(1 for _ in iter_file_records(data, window=64))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert count == 3 * n
        return top

    small, large = peak(500), peak(5000)  # 10x the records
    assert large < 2 * small, (small, large)


def test_bad_line_is_named() -> None:
    with pytest.raises(InputError, match=r"in.jsonl:2: neither a conversation"):
        list(iter_file_records(io.BytesIO(_jsonl(1) + b'{"x": 1}\n'), name="in.jsonl"))
    with pytest.raises(InputError, match=r"in.jsonl:1: not JSON"):
        list(iter_file_records(io.BytesIO(b"{nope\n"), name="in.jsonl"))


def test_produce_command_streams_to_the_broker(tmp_path: Path, kafka_bootstrap: str, topic_factory) -> None:
    from tests.support.workers import read_topic_sync
    from tests.test_cli import run_cli

    topic = topic_factory(2)
    f = tmp_path / "convs.jsonl"
    f.write_bytes(_jsonl(50, turns=2))
    p = run_cli("produce", str(f), "--topic", topic, EVOSTREAM_KAFKA_BOOTSTRAP=kafka_bootstrap)
    assert p.returncode == 0, p.stderr
    assert "produced 100 records" in p.stderr and "rec/s" in p.stderr  # the progress bar's rate
    got = read_topic_sync(kafka_bootstrap, topic)
    assert len(got) == 100
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": 1}\n')
    p = run_cli("produce", str(bad), "--topic", topic, EVOSTREAM_KAFKA_BOOTSTRAP=kafka_bootstrap)
    assert p.returncode == 2 and "bad.jsonl:1: neither a conversation" in p.stderr and "Traceback" not in p.stderr
