"""The process-level slips a new user hit (issue #18 item 5), one test each.

The `--url .../v1` slip is tested live in tests/test_api_compat.py
(test_query_command_accepts_the_openai_base_url) and here on the URL itself; `--debug <bool>`
in tests/test_cli.py::test_version_and_help; the demo's hint with `--tenant` here and in
tests/test_demo.py.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stream.cli.errors import ExitCode
from tests.support.workers import REPO, read_topic_sync
from tests.test_cli import _env, one_error, run_cli


# --------------------------------------------------------------------------- a busy HTTP port


def test_busy_web_port_is_one_error_line_before_the_model_loads(kafka_bootstrap: str, topic_factory) -> None:
    """Before: faust printed its JSON traceback and the worker exited 1, after loading the model."""
    turns, emb, dl = topic_factory(1), topic_factory(1), topic_factory(1)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        p = run_cli("worker", EVOSTREAM_KAFKA_BOOTSTRAP=kafka_bootstrap, EVOSTREAM_TURNS_TOPIC=turns,
                    EVOSTREAM_EMBEDDINGS_TOPIC=emb, EVOSTREAM_DEAD_LETTER_TOPIC=dl, EVOSTREAM_TURNS_PARTITIONS="1",
                    EVOSTREAM_API_AUTH="off", EVOSTREAM_WEB_PORT=str(port), timeout=180)
    one_error(p, ExitCode.USAGE, f"HTTP port {port}", "already in use", "EVOSTREAM_WEB_PORT")
    assert "loading model" not in p.stderr


# --------------------------------------------------------------------------- --url with /v1


def test_query_url_takes_the_openai_base_url() -> None:
    from stream.clients.query_client import query_url

    assert query_url("http://h:6066/v1") == "http://h:6066/v1/embeddings"
    assert query_url("http://h:6066/v1/") == "http://h:6066/v1/embeddings"
    assert query_url("http://h:6066") == "http://h:6066/v1/embeddings"


# --------------------------------------------------------------------------- produce: Ctrl-C and progress


def _conversation_file(path: Path, conversations: int, turns: int) -> Path:
    with open(path, "w") as f:
        for c in range(conversations):
            f.write(json.dumps({"conversation_id": f"ctrlc-{c}", "turns": [
                {"user": f"question {t} of {c}", "assistant": f"answer {t}"} for t in range(turns)]}) + "\n")
    return path


@pytest.mark.slow  # see the docstring: lost its SIGINT in 2 of 3 full parallel runs, cause not found yet
def test_ctrl_c_during_produce_says_what_was_sent(kafka_bootstrap: str, topic_factory, tmp_path: Path) -> None:
    """SIGINT half-way through a rate-limited produce: a summary line says how many records
    reached the topic (and it is true), the exit code is 130; the progress line moved on an
    interleaved conversation file (it stayed at 0% before: the file was read in one go).

    Marked slow (`make test-all`): alone it passes every time, but under the full `-n 4` run it
    twice saw the produce run to its end and exit 0 after the SIGINT, although the cancel checks
    below (`test_ctrl_c_while_the_producer_starts_is_not_swallowed`,
    `test_ctrl_c_swallowed_by_a_send_still_stops_the_produce`, both in the default run) hold.
    Where the signal goes then is an open question, not an accepted behaviour."""
    topic = topic_factory(1)
    src = _conversation_file(tmp_path / "convs.jsonl", 40, 10)  # 400 records, interleaved: ~10 s at 40/s
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "produce", str(src), "--topic", topic,
                             "--rate", "40"], cwd=REPO, env=_env(EVOSTREAM_KAFKA_BOOTSTRAP=kafka_bootstrap),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    # Ctrl-C once records are moving (the start takes 1-3 s idle, far longer on a loaded CI
    # machine: a fixed sleep sometimes fired after the last record)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(proc.stderr.fileno(), 4096), b"")),
                              daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while not re.search(rb"\b[1-9]\d*/400\b", b"".join(chunks)) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    err = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == int(ExitCode.INTERRUPTED), (proc.returncode, err)
    assert "Traceback" not in err, err
    m = re.search(r"interrupted: (\d+) of 400 records delivered to (\S+);", err)
    assert m, err
    delivered = int(m.group(1))
    assert m.group(2) == topic and 0 < delivered < 400, err
    assert "again" in err.split("interrupted:")[1], err  # says what a rerun does
    on_topic = len(read_topic_sync(kafka_bootstrap, topic, idle_ms=1500))
    assert on_topic == delivered, (on_topic, delivered)
    assert re.search(r"\b[1-9]\d*/400\b", err), f"progress never moved: {err[-500:]!r}"


# --------------------------------------------------------------------------- the demo's hint


def test_demo_hint_for_inspect_names_the_tenant(tmp_path: Path) -> None:
    from devtools.demo import _Run

    out = io.StringIO()
    d = _Run(run_dir=tmp_path, out=out, err=io.StringIO(), keep_running=True, worker_log=tmp_path / "worker.log",
             env={"EVOSTREAM_SINK_SCHEMA": "demo"})
    d.sink_log = tmp_path / "sink.log"
    d.web_port = 1
    d.tenants = {"support-refund-0001": "demo"}
    d.print_howto("support-refund-0001", "how long does the refund take?")
    lines = [ln for ln in out.getvalue().splitlines() if " inspect " in ln]
    assert lines and all("--tenant demo" in ln for ln in lines), out.getvalue()


# --------------------------------------------------------------------------- unresolvable broker


@pytest.mark.parametrize("command", [["dead-letters", "list"], ["sink"]])
def test_unresolvable_broker_leaves_no_unclosed_client_lines(command: list[str], tmp_path: Path) -> None:
    p = run_cli(*command, EVOSTREAM_KAFKA_BOOTSTRAP="no-such-host.invalid:9092",
                EVOSTREAM_INDEX_PATH=str(tmp_path / "index.sqlite"))
    one_error(p, ExitCode.BROKER, "no-such-host.invalid")
    assert "Unclosed" not in p.stderr, p.stderr


# --------------------------------------------------------------------------- broker health: outage length


def test_unreachable_line_gives_the_outage_length_not_the_uptime(caplog: pytest.LogCaptureFixture) -> None:
    """Connected for a minute, then silent: the line said "unreachable for 56.2 s" 4 s after
    the broker stopped (it measured from when the connection began)."""
    from stream.kafka.broker_health import BrokerMonitor, BrokerState

    t = [0.0]
    m = BrokerMonitor("x:1", "g", interval_s=2, unreachable_after_s=6, clock=lambda: t[0])
    for second in range(0, 62, 2):  # answers every probe for a minute
        t[0] = float(second)
        m.observe(True)
    with caplog.at_level(logging.WARNING, logger="stream.kafka.broker_health"):
        for second in (62, 64, 66, 68):  # last answer at 60
            t[0] = float(second)
            m.observe(False, "refused")
    assert m.state is BrokerState.UNREACHABLE
    (line,) = [r.getMessage() for r in caplog.records if "broker unreachable" in r.getMessage()]
    took = float(re.search(r"for ([\d.]+) s", line).group(1))
    assert 6.0 <= took <= 8.0, line
    # and the line when it comes back gives the outage's length too
    with caplog.at_level(logging.INFO, logger="stream.kafka.broker_health"):
        t[0] = 80.0
        m.observe(True)
    (back,) = [r.getMessage() for r in caplog.records if "reachable again" in r.getMessage()]
    assert "after 20.0 s" in back, back


# --------------------------------------------------------------------------- README walk-through


def test_readme_walkthrough_stops_the_worker_it_started() -> None:
    """The walk-through backgrounds `evostream worker &` (and `evostream sink &`); before, nothing
    stopped the worker, so it outlived `evostream stack stop` (retrying a broker that was gone)."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("Against the local broker + Redis", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [ln.split("#", 1)[0].strip() for ln in block.splitlines()]
    started = [i for i, ln in enumerate(lines) if re.search(r"\bevostream \w+\b.*&", ln)]
    stop = next(i for i, ln in enumerate(lines) if ln.startswith("evostream stack stop"))
    assert any("evostream worker" in lines[i] for i in started), block
    for i in started:
        pid_var = re.search(r"(\w+)=\$!", lines[i])
        assert pid_var, f"the walk-through does not keep the pid of: {lines[i]!r}"
        killed = [ln for ln in lines[i + 1:stop] if ln.startswith("kill ")]
        assert any(f"${pid_var.group(1)}" in ln.split() for ln in killed), \
            f"the walk-through never stops {lines[i]!r} before `evostream stack stop`"


# --------------------------------------------------------------------------- stack start --postgres


def test_stack_start_with_postgres_after_a_stack_without_it(tmp_path: Path) -> None:
    """A run dir left by an earlier `evostream stack start` (without PostgreSQL) made the saved
    state win over `--postgres`: no PostgreSQL, no EVOSTREAM_SINK_DSN, and the README
    walk-through's `evostream sink` / `search` fell back to an SQLite file (found running the
    walk-through as written after the sink landed)."""
    from devtools.localstack import LocalStack

    (tmp_path / "state.json").write_text(json.dumps({"broker": {"port": 1}, "redis": {"port": 2}}))
    stack = LocalStack(tmp_path, with_postgres=True)
    assert stack.postgres is not None
    assert LocalStack(tmp_path).postgres is None  # not asked for, not saved: none


def test_ctrl_c_while_the_producer_starts_is_not_swallowed(tmp_path: Path, monkeypatch) -> None:
    """A cancel that lands in the Kafka client's start (its connection retries catch it, so
    nothing raises) still ends the produce as interrupted, with nothing sent. Our logic alone:
    the client's start is stood in for by one that swallows the cancel, as aiokafka's can."""
    import asyncio

    from stream.clients import produce_stream as ps

    class Stopped:
        async def stop(self) -> None:
            pass

    async def swallowing_start(*a, **kw):
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            pass  # the swallow
        return Stopped()

    monkeypatch.setattr(ps, "start_producer", swallowing_start)
    src = _conversation_file(tmp_path / "c.jsonl", 2, 2)

    async def main():
        task = asyncio.create_task(ps.produce_stream(src, bootstrap="unused:1", topic="t", progress=False))
        await asyncio.sleep(0.1)
        task.cancel()
        return await task

    r = asyncio.run(main())
    assert r.interrupted and r.sent == 0 and r.delivered == 0, r


def test_ctrl_c_swallowed_by_a_send_still_stops_the_produce(tmp_path: Path, monkeypatch) -> None:
    """The same swallow inside `send` (the client waiting for metadata or buffer room):
    found when the Ctrl-C test, now interrupting mid-stream, still saw the produce run to its
    end and exit 0 under a full test run. The produce stops at the next record and says so."""
    import asyncio

    from stream.clients import produce_stream as ps

    class SwallowingProducer:
        async def send(self, topic, value, key=None):
            try:
                await asyncio.sleep(0.005)
            except asyncio.CancelledError:
                pass  # the swallow
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut

        async def stop(self) -> None:
            pass

    async def start(*a, **kw):
        return SwallowingProducer()

    monkeypatch.setattr(ps, "start_producer", start)
    src = _conversation_file(tmp_path / "c.jsonl", 40, 10)  # 400 records, ~2 s unthrottled here

    async def main():
        task = asyncio.create_task(ps.produce_stream(src, bootstrap="unused:1", topic="t", progress=False))
        await asyncio.sleep(0.2)
        task.cancel()
        return await task

    r = asyncio.run(main())
    assert r.interrupted and 0 < r.sent < 400 and r.delivered == r.sent, r
