"""`evostream demo` end to end in a private run dir: its own broker + Redis + bundled PostgreSQL,
a worker and a sink subprocess, the sample conversations, the search through PostgreSQL
(issue #19); and that it cleans up after itself, also when a step fails."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest

from devtools.demo import run_demo
from devtools.localstack import LocalStack


def _nothing_left_running(run_dir: Path) -> None:
    status = LocalStack(run_dir).status()
    assert not status.any_running and not any(s.running for s in status.services), status
    assert not (run_dir / "worker.pid").exists()


def test_demo_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVOSTREAM_CHECKPOINT", raising=False)  # the tiny checkpoint, as for a new user
    run_dir = tmp_path / "demo"
    out, err = io.StringIO(), io.StringIO()
    rc = run_demo(conversations=2, run_dir=run_dir, out=out, err=err)
    stdout, stderr = out.getvalue(), err.getvalue()
    assert rc == 0, f"demo failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"

    # 11 turns in the first two sample conversations, all embedded, put into PostgreSQL by the
    # sink and listed from there
    assert "embeddings in PostgreSQL 11/11" in stderr and "Embeddings in PostgreSQL (11," in stdout
    assert "started `evostream sink`" in stderr and "PostgreSQL 18 + pgvector" in stderr
    rows = re.findall(r"^\s+(?:support-\S+\s+)?(\d+)\s+(\d+)\s+\[([^\]]+)\]\s+([\d.]+)$", stdout, re.M)
    assert len(rows) == 11
    assert all(abs(float(norm) - 1.0) < 1e-3 for *_, norm in rows)
    # a search with ranked hits that carry the turn text
    assert 'support-refund-0001: "how long does the refund take?"  (index: postgres)' in stdout
    hits = re.findall(r"^\s+(\d)\. seq (\d+)\s+score ([+-][\d.]+)\s+user: (.+)$", stdout, re.M)
    assert len(hits) >= 3 and [h[0] for h in hits[:3]] == ["1", "2", "3"]
    assert "curl -s -X POST http://127.0.0.1:" in stdout and "evostream inspect support-refund-0001" in stdout
    assert "/v1/search" in stdout and "evostream search" in stdout
    assert "stopped the sink, the worker and the local stack" in stderr
    _nothing_left_running(run_dir)
    assert not list(Path.cwd().glob("demo-*-data")), "faust data dir leaked into the cwd"


def test_demo_failure_stops_what_it_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVOSTREAM_CHECKPOINT", str(tmp_path / "no-such-checkpoint"))
    run_dir = tmp_path / "demo"
    out, err = io.StringIO(), io.StringIO()
    rc = run_demo(conversations=1, run_dir=run_dir, out=out, err=err)
    assert rc == 1
    assert "demo failed: EVOSTREAM_CHECKPOINT=" in err.getvalue() and "is not a directory" in err.getvalue()
    assert "stopped the local stack" in err.getvalue()
    _nothing_left_running(run_dir)


def test_demo_rejects_bad_input_before_starting_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": 1}\n')
    err = io.StringIO()
    assert run_demo(run_dir=tmp_path / "demo", data_file=bad, out=io.StringIO(), err=err) == 1
    assert "not a conversation" in err.getvalue()
    assert not (tmp_path / "demo").exists()
    assert run_demo(conversations=0, run_dir=tmp_path / "demo", out=io.StringIO(), err=err) == 1
    assert "--conversations must be >= 1" in err.getvalue()
    assert os.path.exists(tmp_path)
