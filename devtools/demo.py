"""`evostream demo` / `make demo`: the whole pipeline on this machine, in one command.

1. a local broker + Redis + the bundled PostgreSQL/pgvector in `.run/demo` (reused if one is
already running there), 2. topics for this run, 3. the tiny seeded checkpoint (generated once
into the cache), 4. an `evostream worker` and an `evostream sink` subprocess, 5. the sample
conversations produced into the turns topic, 6. every embedding read back from PostgreSQL,
where the sink put it (issue #19), 7. a search per sample question through the worker's
`POST /v1/search` (the question embedded against the conversation's live memory, ranked by
pgvector), then the worker, the sink and the stack are stopped again (unless --keep-running).

Each run uses its own topics, consumer group, Redis namespace and PostgreSQL schema
(`demo.<run id>.*`, `demo_<run id>`), so a reused stack never mixes runs. The settings of
the run are written to `<run dir>/demo.env`, for the commands printed at the end.

Results go to stdout, progress to stderr; any failure stops what the demo started and
exits non-zero with the reason and the relevant log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "sample_conversations.jsonl"
PARTITIONS = 4
WORKER_READY_TIMEOUT_S = 120.0
EMBEDDINGS_TIMEOUT_S = 120.0

#: (conversation, question) pairs searched at the end; only those whose conversation was produced.
SAMPLE_QUESTIONS: list[tuple[str, str]] = [
    ("support-refund-0001", "how long does the refund take?"),
    ("support-password-0002", "which authenticator app can I use?"),
    ("support-shipping-0003", "why was I charged customs duty?"),
]
#: EVOSTREAM_* variables of the caller that are passed on to the worker (model choice, caches);
#: everything else of that prefix is replaced by the demo's own settings.
PASSED_ON = ("EVOSTREAM_CACHE_DIR", "EVOSTREAM_MODEL", "EVOSTREAM_MODEL_REVISION", "EVOSTREAM_BACKBONE_CONFIG",
             "EVOSTREAM_DEVICE",
             "EVOSTREAM_DTYPE", "EVOSTREAM_MEMORY_RENDERING", "EVOSTREAM_TANSU_BIN", "EVOSTREAM_REDIS_SERVER_BIN")


class DemoError(RuntimeError):
    """A step failed; the message says which and where to look."""


def default_demo_dir() -> Path:
    base = REPO if (REPO / "pyproject.toml").exists() else Path.cwd()
    return base / ".run" / "demo"


def _show(path: Path) -> str:
    """A path relative to the cwd when it is below it (shorter to read and to paste)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)



def _stop_group(p: subprocess.Popen | None) -> None:
    """SIGTERM the process group of `p` (its shutdown drains and commits), SIGKILL after 20 s."""
    if p is None or p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)

def _tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in lines) or "    (empty log)"


def _load_conversations(path: Path, limit: int | None) -> list[dict]:
    convs = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        if "turns" not in obj or "conversation_id" not in obj:
            raise DemoError(f"{path}:{lineno}: not a conversation (needs 'conversation_id' and 'turns')")
        convs.append(obj)
    if limit is not None:
        if limit < 1:
            raise DemoError(f"--conversations must be >= 1, got {limit}")
        convs = convs[:limit]
    if not convs:
        raise DemoError(f"no conversations in {path}")
    return convs


def _cli() -> str:
    """How to invoke the CLI from the user's shell: `evostream` when that is on PATH, else
    the script next to this interpreter (the venv's), else `python -m stream.cli`."""
    import shutil

    script = Path(sys.executable).parent / "evostream"
    found = shutil.which("evostream")
    if found and (not script.exists() or Path(found).resolve() == script.resolve()):
        return "evostream"
    if script.exists():
        return _show(script)
    return f"{_show(Path(sys.executable))} -m stream.cli"


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------------------------------
@dataclass
class _Run:
    run_dir: Path
    out: TextIO
    err: TextIO
    keep_running: bool
    run_id: str = field(default_factory=lambda: time.strftime("%H%M%S") + uuid.uuid4().hex[:4])
    stack: object = None               # LocalStack
    started_stack: bool = False
    worker: subprocess.Popen | None = None
    worker_log: Path | None = None
    sink: subprocess.Popen | None = None
    sink_log: Path | None = None
    web_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    tiny: bool = True
    t0: float = field(default_factory=time.monotonic)

    # -- output ------------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def step(self, text: str) -> None:
        self.note(f"[{time.monotonic() - self.t0:5.1f}s] {text}")

    @property
    def worker_pid_file(self) -> Path:
        return self.run_dir / "worker.pid"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    # -- 1. stack ----------------------------------------------------------------------------
    def start_stack(self) -> None:
        from devtools.localstack import LocalStack, LocalStackError
        from stream.kafka.topics import wait_for_broker_sync

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._stop_stale_worker()
        # Servers we start die with us unless they are meant to outlive the demo.
        stack = LocalStack(self.run_dir, die_with_parent=not self.keep_running, with_postgres=True)
        status = stack.status()
        if status.running and stack.postgres is not None:
            try:
                wait_for_broker_sync(stack.kafka_bootstrap, timeout=10.0)
            except TimeoutError as exc:
                raise DemoError(f"a local stack is recorded as running in {_show(self.run_dir)} but its broker does "
                                f"not answer ({exc}); stop it with: evostream stack stop --run-dir "
                                f"{_show(self.run_dir)}") from None
            self.stack = stack
            self.step(f"reusing the local stack already running in {_show(self.run_dir)}: broker "
                      f"{stack.kafka_bootstrap}, Redis {stack.redis_url}, PostgreSQL in {_show(stack.postgres.data_dir)}")
            return
        if status.any_running:  # half a stack (one server died), or one without PostgreSQL: start over
            self.step(f"stopping the partly running stack in {_show(self.run_dir)}")
            stack.stop(grace=3.0)
        if stack.postgres is None:  # recorded by a stack of before issue #19
            stack.state_file.unlink(missing_ok=True)
        stack = LocalStack(self.run_dir, die_with_parent=not self.keep_running, with_postgres=True)
        try:
            stack.start()
        except LocalStackError as exc:
            raise DemoError(f"could not start the local broker + Redis + PostgreSQL: {exc}") from None
        self.stack, self.started_stack = stack, True
        self.step(f"started a local broker ({stack.kafka_bootstrap}), Redis ({stack.redis_url}) and PostgreSQL 18 + "
                  f"pgvector (socket in {_show(stack.postgres.data_dir)}) in {_show(self.run_dir)}")

    def _stop_stale_worker(self) -> None:
        """A demo worker left running by an earlier `--keep-running` run in this run dir."""
        try:
            pid = int(self.worker_pid_file.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            self.worker_pid_file.unlink(missing_ok=True)
            return
        try:  # only a worker this demo started (its id is demo-<run id>), never a recycled pid
            ours = b"EVOSTREAM_WORKER_ID=demo-" in Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            ours = False
        if ours and "stream.cli" in cmdline and "worker" in cmdline:
            self.step(f"stopping the demo worker left running by an earlier run (pid {pid})")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                        break
                time.sleep(0.2)
            else:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        self.worker_pid_file.unlink(missing_ok=True)

    # -- 2./3. topics, checkpoint, settings ----------------------------------------------------
    def prepare(self) -> None:
        from devtools.localstack import free_ports
        from stream.kafka.topics import ensure_topics_sync

        prefix = f"demo.{self.run_id}"
        self.env = {
            "EVOSTREAM_KAFKA_BOOTSTRAP": self.stack.kafka_bootstrap,
            "EVOSTREAM_REDIS_URL": self.stack.redis_url,
            "EVOSTREAM_TURNS_TOPIC": f"{prefix}.turns",
            "EVOSTREAM_EMBEDDINGS_TOPIC": f"{prefix}.embeddings",
            "EVOSTREAM_DEAD_LETTER_TOPIC": f"{prefix}.dead-letter",
            "EVOSTREAM_TURNS_PARTITIONS": str(PARTITIONS),
            "EVOSTREAM_GROUP_ID": f"demo-{self.run_id}",
            "EVOSTREAM_REDIS_NAMESPACE": f"demo-{self.run_id}",
            # a local demo on loopback: the query API without keys, explicitly (issue #9)
            "EVOSTREAM_API_AUTH": "off",
            # issue #19: the sink's index (and the worker's /v1/search) in the stack's PostgreSQL
            "EVOSTREAM_SINK_DSN": self.stack.env()["EVOSTREAM_SINK_DSN"],
            "EVOSTREAM_SINK_SCHEMA": f"demo_{self.run_id}".lower(),
        }
        try:
            ensure_topics_sync(self.stack.kafka_bootstrap, {self.env["EVOSTREAM_TURNS_TOPIC"]: PARTITIONS,
                                                            self.env["EVOSTREAM_EMBEDDINGS_TOPIC"]: PARTITIONS,
                                                            self.env["EVOSTREAM_DEAD_LETTER_TOPIC"]: 1})
        except Exception as exc:  # noqa: BLE001 - reported as a demo step failure
            raise DemoError(f"could not create the topics on {self.stack.kafka_bootstrap}: {exc}") from None
        self.step(f"created topics {prefix}.turns / .embeddings / .dead-letter ({PARTITIONS} partitions)")

        # EVOSTREAM_MODEL; EVOSTREAM_CHECKPOINT is its deprecated alias (issue #21)
        var = "EVOSTREAM_MODEL" if os.environ.get("EVOSTREAM_MODEL") else "EVOSTREAM_CHECKPOINT"
        ckpt = os.environ.get(var, "")
        self.tiny = not ckpt
        if self.tiny:
            from workers.tiny_checkpoint import cached_tiny_checkpoint
            from workers.tokenizer import cache_dir

            fresh = not (cache_dir() / "checkpoints" / "tiny-qwen3-tiny-s0" / "model.safetensors").is_file()
            if fresh:
                self.step("generating the tiny seeded checkpoint (first run only; cached afterwards)")
            t = time.monotonic()
            try:
                ckpt = str(cached_tiny_checkpoint("qwen3", "tiny"))
            except Exception as exc:  # noqa: BLE001
                raise DemoError(f"could not make the tiny checkpoint: {exc!r}") from None
            self.step(f"model: tiny seeded qwen3 checkpoint {ckpt}"
                      + (f" (made in {time.monotonic() - t:.0f}s)" if fresh else " (cached)"))
        else:
            if not Path(ckpt).is_dir():
                raise DemoError(f"{var}={ckpt} is not a directory")
            self.step(f"model: {ckpt} (from {var})")
        self.env["EVOSTREAM_MODEL"] = ckpt
        self.web_port = free_ports(1)[0]
        self.env["EVOSTREAM_WEB_PORT"] = str(self.web_port)
        (self.run_dir / "demo.env").write_text("".join(f"{k}={v}\n" for k, v in self.env.items()))

    # -- 4. worker ---------------------------------------------------------------------------
    def start_worker(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVOSTREAM_") or k in PASSED_ON}
        env.update(self.env)
        env.update(
            EVOSTREAM_WORKER_ID=f"demo-{self.run_id}",
            # short group timings: the broker holds a JoinGroup for half the session timeout
            EVOSTREAM_SESSION_TIMEOUT_S="6",
            EVOSTREAM_REBALANCE_TIMEOUT_S="6",
            EVOSTREAM_HEARTBEAT_INTERVAL_S="1",
            EVOSTREAM_COMMIT_INTERVAL_S="0.5",
            EVOSTREAM_LOG_JSON="false",
            EVOSTREAM_LOG_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
            # faust keeps an (empty, with the memory store) data dir; not in the caller's cwd
            F_DATADIR=str(self.run_dir / "worker-data"),
        )
        env.pop("FAUST_DATADIR", None)
        self.worker_log = self.run_dir / "worker.log"
        from devtools.localstack import _set_pdeathsig

        pdeathsig = (not self.keep_running and sys.platform == "linux"
                     and threading.current_thread() is threading.main_thread())
        with open(self.worker_log, "wb") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "stream.cli", "worker"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_set_pdeathsig if pdeathsig else None)
        self.worker_pid_file.write_text(f"{self.worker.pid}\n")
        self.step(f"started `evostream worker` (pid {self.worker.pid}, http {self.url}); waiting until it is ready")
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        while True:
            self._check_worker()
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200 and json.loads(r.read() or b"{}").get("ready"):
                        break
            except (OSError, ValueError):
                pass
            if time.monotonic() >= deadline:
                raise DemoError(f"the worker was not ready after {WORKER_READY_TIMEOUT_S:.0f}s "
                                f"(GET {self.url}/readyz); last lines of {_show(self.worker_log)}:\n"
                                f"{_tail(self.worker_log)}")
            time.sleep(0.3)
        self.step("worker ready (partitions assigned)")

    def start_sink(self) -> None:
        """`evostream sink`: the embeddings topic (and the turns topic's texts) into PostgreSQL."""
        from devtools.localstack import _set_pdeathsig

        env = {k: v for k, v in os.environ.items() if not k.startswith("EVOSTREAM_") or k in PASSED_ON}
        env.update(self.env, PYTHONUNBUFFERED="1", EVOSTREAM_SINK_NAME=f"demo-{self.run_id}")
        self.sink_log = self.run_dir / "sink.log"
        pdeathsig = (not self.keep_running and sys.platform == "linux"
                     and threading.current_thread() is threading.main_thread())
        with open(self.sink_log, "wb") as log:
            self.sink = subprocess.Popen(
                [sys.executable, "-m", "stream.cli", "sink"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_set_pdeathsig if pdeathsig else None)
        self.step(f"started `evostream sink` (pid {self.sink.pid}): {self.env['EVOSTREAM_EMBEDDINGS_TOPIC']} -> "
                  f"PostgreSQL table {self.env['EVOSTREAM_SINK_SCHEMA']}.evostream_turns")

    def _check_sink(self) -> None:
        if self.sink is not None and self.sink.poll() is not None:
            raise DemoError(f"the sink exited with code {self.sink.returncode}; last lines of "
                            f"{_show(self.sink_log)}:\n{_tail(self.sink_log)}")

    def stop_sink(self) -> None:
        p, self.sink = self.sink, None
        _stop_group(p)

    def _check_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is not None:
            raise DemoError(f"the worker exited with code {self.worker.returncode}; last lines of "
                            f"{_show(self.worker_log)}:\n{_tail(self.worker_log)}")

    def stop_worker(self) -> None:
        w, self.worker = self.worker, None
        if w is None:
            return
        _stop_group(w)
        self.worker_pid_file.unlink(missing_ok=True)

    # -- 5./6. produce, wait ---------------------------------------------------------------------
    def produce_and_collect(self, convs: list[dict]) -> dict:
        from stream.clients.producer import produce_records, turn_events
        from stream.index.pgvector import PgVectorIndex

        events = list(turn_events(convs))
        records = [(e.conversation_id.encode(), e.model_dump_json().encode()) for e in events]
        topic = self.env["EVOSTREAM_TURNS_TOPIC"]
        try:
            asyncio.run(produce_records(records, bootstrap=self.stack.kafka_bootstrap, topic=topic, progress=False))
        except Exception as exc:  # noqa: BLE001
            raise DemoError(f"producing to {topic} failed: {exc!r}") from None
        self.step(f"produced {len(records)} turns of {len(convs)} conversations to {topic}")

        expected = {(e.tenant or "", e.conversation_id, e.seq) for e in events}
        got: dict = {}
        tty = getattr(self.err, "isatty", lambda: False)()
        shown, last_print = -1, 0.0
        deadline = time.monotonic() + EMBEDDINGS_TIMEOUT_S
        table = f"{self.env['EVOSTREAM_SINK_SCHEMA']}.evostream_turns"
        with PgVectorIndex(self.env["EVOSTREAM_SINK_DSN"], schema=self.env["EVOSTREAM_SINK_SCHEMA"]) as index:
            while True:
                got = {(r.tenant, r.conversation_id, r.seq): r for r in index.rows()}
                n = len(expected & got.keys())
                now = time.monotonic()
                if n != shown and (tty or n == len(expected) or now - last_print >= 2.0):
                    line = f"embeddings in PostgreSQL {n}/{len(expected)}"
                    print(("\r" + line) if tty else f"        {line}", end="" if tty else "\n", file=self.err,
                          flush=True)
                    shown, last_print = n, now
                if n == len(expected):
                    if tty:
                        print(file=self.err)
                    break
                self._check_worker()
                self._check_sink()
                if now >= deadline:
                    if tty:
                        print(file=self.err)
                    missing = sorted(expected - got.keys())[:5]
                    raise DemoError(
                        f"only {n}/{len(expected)} embeddings reached {table} within {EMBEDDINGS_TIMEOUT_S:.0f}s "
                        f"(missing e.g. {missing}); dead-lettered turns go to {self.env['EVOSTREAM_DEAD_LETTER_TOPIC']}. "
                        f"Last lines of {_show(self.worker_log)}:\n{_tail(self.worker_log)}\n"
                        f"and of {_show(self.sink_log)}:\n{_tail(self.sink_log)}")
                time.sleep(0.3)
        self.step(f"all {len(expected)} embeddings are in PostgreSQL ({table}), put there by the sink")
        return got

    # -- 7. report ---------------------------------------------------------------------------
    def print_table(self, convs: list[dict], got: dict) -> None:
        order = {c["conversation_id"]: i for i, c in enumerate(convs)}
        keys = sorted(got, key=lambda k: (order.get(k[1], len(order)), k[2]))
        dim = int(got[keys[0]].vector.shape[0]) if keys else 0
        self.say(f"\nEmbeddings in PostgreSQL ({len(keys)}, dim {dim}, table "
                 f"{self.env['EVOSTREAM_SINK_SCHEMA']}.evostream_turns, from topic "
                 f"{self.env['EVOSTREAM_EMBEDDINGS_TOPIC']}):")
        self.say(f"  {'conversation':<24} {'seq':>3} {'memory_len':>10}  {'vector[:4]':<36} {'norm':>5}")
        prev = None
        for key in keys:
            r = got[key]
            head = "[" + ", ".join(f"{x:+.4f}" for x in r.vector[:4]) + "]"
            name = r.conversation_id if r.conversation_id != prev else ""
            self.say(f"  {name:<24} {r.seq:>3} {r.memory_len:>10}  {head:<36} {float(np.linalg.norm(r.vector)):>5.3f}")
            prev = r.conversation_id
        self.say("  (memory_len = memory latents the turn's embedding was computed against: the memory before it)")

    def searches(self, convs: list[dict]) -> tuple[str, str]:
        ids = [c["conversation_id"] for c in convs]
        # a conversation's tenant is part of its identity (stream/identity.py): queries name it
        self.tenants = {c["conversation_id"]: c.get("tenant") for c in convs}
        questions = [(cid, q) for cid, q in SAMPLE_QUESTIONS if cid in ids][:2]
        if not questions:
            questions = [(ids[0], "what was the customer's problem?")]
        self.say("\nSearch, as `evostream search` does it: the worker embeds the question against the conversation's\n"
                 "live memory and PostgreSQL (pgvector) ranks the conversation's turns by cosine (POST /v1/search):")
        for cid, q in questions:
            body = {"query": q, "conversation_id": cid, "k": 3, **({"tenant": self.tenants[cid]} if self.tenants[cid]
                                                                   else {})}
            req = urllib.request.Request(self.url + "/v1/search", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    answer = json.loads(r.read())
            except urllib.error.HTTPError as exc:
                raise DemoError(f"search in {cid} failed: HTTP {exc.code}: {exc.read()[:300]!r}") from None
            except (OSError, ValueError) as exc:
                raise DemoError(f"search in {cid} failed: {exc}") from None
            hits = answer.get("hits") or []
            if not hits:
                raise DemoError(f"search in {cid} returned no hits although its embeddings are in PostgreSQL")
            self.say(f"\n  {cid}: \"{q}\"  (index: {answer.get('index')})")
            for rank, h in enumerate(hits, 1):
                lines = (h.get("text") or "(no text)").split("\n")
                self.say(f"    {rank}. seq {h['seq']}  score {h['score']:+.4f}  {_short(lines[0], 90)}")
                for extra in lines[1:]:
                    self.say(f"    {'':>23}{_short(extra, 90)}")
        if self.tiny:
            self.say("\n  Note: the demo model is a tiny checkpoint with random weights, so these rankings show the\n"
                     "  plumbing working end to end, not retrieval quality. Set EVOSTREAM_MODEL to a released\n"
                     "  EvoEmbedding model directory to run the same demo with real vectors.")
        return questions[0]

    def print_howto(self, cid: str, question: str) -> None:
        rd = _show(self.run_dir)
        self.say("\nLogs:")
        self.say(f"  worker  {_show(self.worker_log)}")
        self.say(f"  sink    {_show(self.sink_log)}")
        for name in ("broker", "redis"):
            self.say(f"  {name:<7} {_show(self.run_dir / f'{name}.log')}")
        self.say(f"  settings of this run (topics, group, Redis namespace): {rd}/demo.env")
        tenant = getattr(self, "tenants", {}).get(cid)
        body = json.dumps({"model": "evoembedding", "input": question, "conversation_id": cid,
                           **({"tenant": tenant} if tenant else {})})
        tflag = f" --tenant {shlex.quote(tenant)}" if tenant else ""
        cli = _cli()
        if self.keep_running:
            self.say(f"\nThe stack and the worker (pid {self.worker.pid if self.worker else '?'}) are still running. "
                     "Try it by hand:")
        else:
            self.say(f"\nTo try it by hand, run `{cli} demo --keep-running`: it leaves the stack and the worker up\n"
                     "and prints these commands for them (the worker's port changes per run):")
        self.say(f"  curl -s -X POST {self.url}/v1/embeddings -H 'Content-Type: application/json' \\\n"
                 f"       -d {shlex.quote(body)}")
        self.say(f"  set -a; . {rd}/demo.env; set +a    # point the {cli} commands below at this run")
        self.say(f"  {cli} query  --url {self.url} --conversation {cid}{tflag} --text {shlex.quote(question)}")
        self.say(f"  {cli} search --url {self.url} --conversation {cid}{tflag} --text {shlex.quote(question)} -k 3")
        sbody = json.dumps({"query": question, "conversation_id": cid, "k": 3, **({"tenant": tenant} if tenant else {})})
        self.say(f"  curl -s -X POST {self.url}/v1/search -H 'Content-Type: application/json' -d {shlex.quote(sbody)}")
        self.say(f"  psql \"$EVOSTREAM_SINK_DSN\" -c 'select conversation_id, seq, memory_origin from "
                 f"{self.env['EVOSTREAM_SINK_SCHEMA']}.evostream_turns'   # the table the sink keeps")
        self.say(f"  {cli} inspect {cid}{tflag}              # its memory state in Redis")
        self.say(f"  {cli} produce data/sample_conversations.jsonl   # more turns (already applied seqs are skipped)")
        if self.keep_running:
            self.say(f"Stop everything: kill {self.worker.pid if self.worker else '<worker pid>'} "
                     f"{self.sink.pid if self.sink else '<sink pid>'}; "
                     f"{cli} stack stop --run-dir {rd}")

    # -- cleanup -----------------------------------------------------------------------------
    def cleanup(self, failed: bool) -> None:
        if self.keep_running and not failed:
            self.worker = None  # left running on purpose; its pid is in worker.pid
            self.sink = None
            return
        stopped = []
        try:
            if self.sink is not None:
                self.stop_sink()
                stopped.append("the sink")
        except Exception as exc:  # noqa: BLE001 - keep going: the rest must still be stopped
            self.note(f"warning: could not stop the sink: {exc!r}")
        try:
            if self.worker is not None:
                self.stop_worker()
                stopped.append("the worker")
        except Exception as exc:  # noqa: BLE001 - keep going: the stack must still be stopped
            self.note(f"warning: could not stop the worker: {exc!r}")
        if self.started_stack and self.stack is not None:
            try:
                self.stack.stop(grace=3.0)
                stopped.append("the local stack")
            except Exception as exc:  # noqa: BLE001
                self.note(f"warning: could not stop the local stack: {exc!r}; stop it with: "
                          f"evostream stack stop --run-dir {_show(self.run_dir)}")
        if stopped:
            self.step("stopped " + (", ".join(stopped[:-1]) + " and " + stopped[-1] if len(stopped) > 1 else stopped[0]))
        if self.stack is not None and not self.started_stack:
            self.step(f"left the stack in {_show(self.run_dir)} running (it was running before the demo)")


def run_demo(conversations: int | None = None, keep_running: bool = False, *, run_dir: Path | str | None = None,
             data_file: Path | str | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the end-to-end demo; returns the process exit code (0 = everything worked)."""
    run = _Run(Path(run_dir) if run_dir is not None else default_demo_dir(), out or sys.stdout, err or sys.stderr,
               keep_running)
    rc = 1
    try:
        data = Path(data_file) if data_file is not None else DEFAULT_DATA
        convs = _load_conversations(data, conversations)
        plural = "s" if len(convs) != 1 else ""
        run.note(f"evostream demo: {len(convs)} conversation{plural} from {_show(data)} through a local broker + "
                 f"Redis + PostgreSQL/pgvector, one worker, the sink and a search through it, end to end "
                 f"(run dir {_show(run.run_dir)})")
        run.start_stack()
        run.prepare()
        run.start_worker()
        run.start_sink()
        got = run.produce_and_collect(convs)
        run.print_table(convs, got)
        cid, question = run.searches(convs)
        run.print_howto(cid, question)
        rc = 0
    except DemoError as exc:
        run.note(f"\ndemo failed: {exc}")
    except KeyboardInterrupt:
        run.note("\ndemo interrupted")
        rc = 130
    except Exception as exc:  # noqa: BLE001 - a bug or an unexpected environment: still clean up
        import traceback

        run.note(f"\ndemo failed unexpectedly: {exc!r}\n{traceback.format_exc()}")
    finally:
        run.cleanup(failed=rc != 0)
    if rc == 0:
        run.say(f"\ndemo finished in {time.monotonic() - run.t0:.0f}s")
    return rc

__all__ = ["DemoError", "SAMPLE_QUESTIONS", "default_demo_dir", "run_demo"]
