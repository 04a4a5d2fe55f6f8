"""The stream commands: worker, demo, produce, query, inspect, topics, stack, settings,
make-tiny-checkpoint (`sink` and `search` are in stream/cli/sink.py).

Each command loads its settings through `load_settings` (flags > EVOSTREAM_* > settings file)
and lets expected failures propagate as exceptions; `main()` turns them into one line and an
exit code (stream/cli/errors.py). Heavy imports (torch, faust) happen inside commands so
that `--help` and argument errors answer at once.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from stream.cli.base import STATE, app, note
from stream.cli.config import check_environment, load_settings, settings_help
from stream.cli.errors import CliError, ExitCode


def warn(line: str) -> None:
    """One `warning:` line on stderr, once per command."""
    if line not in STATE.warnings:
        STATE.warnings.append(line)
        print(f"warning: {line}", file=sys.stderr)


def settings(**overrides: Any):  # -> Settings
    """Check the environment, load and remember the settings (error messages quote them);
    deprecated names used get one line each."""
    from stream.settings import take_deprecations

    for w in check_environment():
        warn(w)
    try:
        s = load_settings(**overrides)
    finally:
        for line in take_deprecations():
            warn(line)
    STATE.settings = s
    return s


def quiet_kafka_logs() -> None:
    """aiokafka logs every failed connection attempt with a traceback; commands say it once."""
    import logging

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


#: Words in kafka_security.describe_connect_error's line that mean "credentials refused".
AUTH_WORDS = ("authentication", "TLS", "certificate")


def kafka_failure(s: Any, exc: BaseException) -> CliError:
    """One line saying why Kafka could not be used: the connection is retried once by hand
    (TCP, TLS, SASL) so that the line names the real cause, not aiokafka's generic
    "Unable to bootstrap"."""
    from aiokafka.errors import KafkaError

    from stream.kafka.security import KafkaSecurity, KafkaSecurityError, describe_connect_error
    from stream.kafka.topics import TopicError, run_sync

    if isinstance(exc, KafkaSecurityError):
        return CliError(str(exc), ExitCode.USAGE)
    if isinstance(exc, TopicError):
        return CliError(str(exc), ExitCode.BROKER)
    if not isinstance(exc, KafkaError):
        return CliError(str(exc), ExitCode.BROKER)
    line = run_sync(lambda: describe_connect_error(s.kafka_bootstrap, KafkaSecurity.from_settings(s), exc))
    auth = any(w in line for w in AUTH_WORDS)
    return CliError(f"{line} (EVOSTREAM_KAFKA_BOOTSTRAP)", ExitCode.AUTH if auth else ExitCode.BROKER)


def _kafka_call(s: Any, fn: Any) -> Any:
    from aiokafka.errors import KafkaError

    from stream.kafka.security import KafkaSecurityError
    from stream.kafka.topics import TopicError

    quiet_kafka_logs()
    try:
        return fn()
    except (KafkaError, KafkaSecurityError, TopicError) as exc:
        raise kafka_failure(s, exc) from exc


# ---------------------------------------------------------------------------------------------
# the model
def resolve_model(spec: str, revision: str | None = None) -> Path:
    """The configured model (a directory or a hub id), or the seeded tiny one (generated
    once into the cache, with a note: it takes seconds the first time)."""
    if spec:
        from workers.loading import ModelLoadError
        from workers.model_source import ModelNotAvailable, is_hub_id, resolve_checkpoint_dir

        if is_hub_id(spec):
            note(f"resolving model {spec}{'@' + revision if revision else ''} through the hub cache ...")
        try:
            path = resolve_checkpoint_dir(spec, revision)
        except ModelNotAvailable as exc:
            raise ModelLoadError(str(exc)) from exc
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"EVOSTREAM_MODEL={spec}: {path} is not a model directory (no config.json)")
        return path
    from workers.tiny_checkpoint import cache_dir, cached_tiny_checkpoint

    target = cache_dir() / "checkpoints" / "tiny-qwen3-tiny-s0"
    if not (target / "model.safetensors").is_file():
        note(f"no EVOSTREAM_MODEL: generating the seeded tiny model in {target} (first run only) ...")
    return cached_tiny_checkpoint("qwen3", "tiny")


def engine_config(s: Any):  # -> EngineConfig
    """The engine configuration a worker runs with, from its settings: batching, rendering, and
    the model-side cache budgets (issue #10/#22: `auto` resolved from the machine, see
    workers/memory_budget.py)."""
    from workers.engine import EngineConfig
    from workers.memory_budget import resolve_cache_bytes
    from workers.rendering import MemoryRendering
    from workers.scheduler import Budget

    return EngineConfig(budget=Budget(s.max_batch_tokens, s.max_batch_rows),
                        memory_rendering=MemoryRendering(s.memory_rendering),
                        prefix_cache_max_bytes=resolve_cache_bytes(s.prefix_cache_max_bytes, s.device),
                        query_cache_max_bytes=resolve_cache_bytes(s.query_cache_max_bytes, s.device))


def load_engine_with_progress(s: Any):  # -> EvoEngine
    from workers.engine import load_engine

    ckpt = resolve_model(s.model, s.model_revision)
    cfg = engine_config(s)
    note(f"loading model and tokenizer from {ckpt} ({s.device}, {s.dtype}) ...")
    t0 = time.monotonic()
    engine = load_engine(ckpt, device=s.device, dtype=s.dtype, backbone_config=s.backbone_config, config=cfg)
    note(f"model ready in {time.monotonic() - t0:.1f}s: {engine.model_name or 'evoembedding'}, hidden "
         f"{engine.hidden_size}, checkpoint fingerprint {engine.fingerprint}")
    note(precision_note(engine))
    note(f"cache budgets: segment prefixes {_mib(cfg.prefix_cache_max_bytes)}"
         f"{' (auto)' if s.prefix_cache_max_bytes == 'auto' else ''}, query-ready memory "
         f"{_mib(cfg.query_cache_max_bytes)}{' (auto)' if s.query_cache_max_bytes == 'auto' else ''}")
    return engine


def precision_note(engine: Any) -> str:
    """What the model computes in and which CPU kernels that means (issue #22: reported, not assumed)."""
    from workers.precision import cpu_facts

    dt = str(engine.compute_dtype).removeprefix("torch.")
    memory = str(engine.state_dtype).removeprefix("torch.")
    probe = engine.precision.describe() if engine.precision is not None else f"compute dtype {dt} (EVOSTREAM_DTYPE)"
    where = "" if str(engine.model.device).startswith("cuda") else f"; CPU {cpu_facts().describe()}"
    return f"{probe}; memory kept in {memory}{where}"


def _mib(n: int) -> str:
    return "off" if n == 0 else f"{n / 2**20:,.0f} MiB"


# ---------------------------------------------------------------------------------------------
@app.command()
def worker(web_port: Optional[int] = typer.Option(None, "--web-port", help="HTTP port (query, health, metrics); "
                                                  "overrides EVOSTREAM_WEB_PORT")) -> None:
    """Run one stream worker (a member of the consumer group). Checks its topics, loads the
    model, then consumes until SIGTERM/SIGINT; logs "ready: N partitions, listening on URL"
    once it owns partitions."""
    from stream.runtime.worker import run_worker
    from stream.runtime.logs import setup_logging

    s = settings(web_port=web_port)
    check_can_serve(s)
    setup_logging(s.log_level, s.log_json)
    note(f"checking topics on {s.kafka_bootstrap} ...")
    _kafka_call(s, lambda: _worker_topics(s))
    engine = load_engine_with_progress(s)
    note(f"joining group {s.group_id!r} on {s.kafka_bootstrap}; HTTP on http://{s.web_host}:{s.web_port}")
    run_worker(s, engine)


def check_can_serve(s: Any) -> None:
    """What would stop a worker after its model has loaded, checked before (issue #18): a
    query API that would refuse every request, an HTTP port another process holds."""
    import errno
    import socket

    problem = s.serving_problem()
    if problem:
        raise CliError(problem, ExitCode.USAGE)
    try:
        infos = socket.getaddrinfo(s.web_host, s.web_port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CliError(f"EVOSTREAM_WEB_HOST={s.web_host!r} is not an address of this machine: {exc}",
                       ExitCode.USAGE) from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: TIME_WAIT is no conflict
        try:
            sock.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CliError(f"HTTP port {s.web_port} on {s.web_host} is already in use (another worker?): set "
                               "EVOSTREAM_WEB_PORT or --web-port to a free port", ExitCode.USAGE) from None
            raise CliError(f"cannot listen on {s.web_host}:{s.web_port} (EVOSTREAM_WEB_HOST/EVOSTREAM_WEB_PORT): "
                           f"{exc.strerror or exc}", ExitCode.USAGE) from None


def _ensure_topics(s: Any) -> dict[str, int]:
    """Create the topics before anything asks the broker for their metadata: some brokers
    (tansu, Kafka with auto-create on) would otherwise create them with a default partition
    count. An existing topic is left as it is; a partition-count mismatch is reported."""
    from stream.kafka.security import KafkaSecurity
    from stream.kafka.topics import ensure_topics_sync, settings_topics

    counts, configs = settings_topics(s)
    return ensure_topics_sync(s.kafka_bootstrap, counts, s.topics_replication_factor,
                              security=KafkaSecurity.from_settings(s), configs=configs)


def _worker_topics(s: Any) -> None:
    """Workers check that their topics exist (creating them needs an admin permission most
    managed clusters refuse to consumers); with worker_create_topics they create them."""
    from stream.kafka.security import KafkaSecurity
    from stream.kafka.topics import TopicsMissing, missing_topics, run_sync, settings_topics

    if s.worker_create_topics:
        _ensure_topics(s)
        return
    names = list(settings_topics(s)[0])
    missing = run_sync(lambda: missing_topics(s.kafka_bootstrap, names, security=KafkaSecurity.from_settings(s)))
    if missing:
        raise TopicsMissing(missing, s.kafka_bootstrap)


def _devtool(module: str, name: str, command: str):
    """`demo` and `stack` drive the local tooling in devtools/, which a source checkout has
    and the wheel does not ship (issue #21: it is not part of the data path). Imported here,
    on use, so that every other command works from an installed package; from a checkout run
    outside its root, the checkout is found from this file's location."""
    import importlib

    root = Path(__file__).resolve().parents[2]
    if (root / "devtools" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "devtools":
            raise CliError(f"`evostream {command}` runs from a source checkout (devtools/ is not part of the "
                           "installed package): git clone the repository and run it there (`make demo`)",
                           ExitCode.USAGE) from None
        raise


@app.command()
def demo(conversations: Optional[int] = typer.Option(None, "--conversations", min=1,
                                                     help="use only the first N sample conversations"),
         keep_running: bool = typer.Option(False, "--keep-running",
                                           help="leave the stack and the worker up afterwards")) -> None:
    """Local broker + Redis + tiny model + the sample conversations, end to end."""
    run_demo = _devtool("devtools.demo", "run_demo", "demo")
    rc = run_demo(conversations=conversations, keep_running=keep_running)
    if rc:
        raise typer.Exit(rc)


@app.command()
def produce(file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True,
                                        help="JSONL: one conversation ({conversation_id, turns}) or one turn "
                                             "event per line"),
            topic: Optional[str] = typer.Option(None, "--topic", help="default: EVOSTREAM_TURNS_TOPIC"),
            rate: float = typer.Option(0.0, "--rate", min=0.0, help="records per second (0 = as fast as possible)"),
            quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar")) -> None:
    """Replay a JSONL conversation file into the turns topic. The file is streamed (constant
    memory); conversations are interleaved the way live traffic arrives; a progress bar shows
    the rate and the time left."""
    from stream.kafka.security import KafkaSecurity
    from stream.clients.producer import produce_file

    s = settings()
    dest = topic or s.turns_topic
    r = _kafka_call(s, lambda: asyncio.run(produce_file(
        file, bootstrap=s.kafka_bootstrap, topic=dest, rate=rate, progress=not quiet,
        security=KafkaSecurity.from_settings(s), idempotent=s.producer_idempotence)))
    if r.interrupted:  # Ctrl-C (issue #18): say what reached the topic, and what a rerun does
        of = f" of {r.total}" if r.total is not None else f" ({r.sent} sent)"
        print(f"interrupted: {r.delivered}{of} records delivered to {dest}; running the same produce again "
              "sends them all again, and the workers skip the turns they already applied (same seq)",
              file=sys.stderr)
        raise typer.Exit(int(ExitCode.INTERRUPTED))
    print(f"produced {r.delivered} records to {dest}", file=sys.stderr)


URL_HELP = "the worker's base URL"
TENANT_HELP = "the conversation's tenant (default: the API key's only tenant, else none)"  # issue #9
KEY_HELP = "API key of the worker's query API (Authorization: Bearer)"  # issue #9


@app.command()
def query(conversation: str = typer.Option(..., "--conversation", "-c", help="conversation id"),
          text: str = typer.Option(..., "--text", "-t", help="the query text"),
          url: str = typer.Option("http://127.0.0.1:6066", "--url", help=URL_HELP),
          full_vector: bool = typer.Option(False, "--full-vector", help="print the whole base64 vector"),
          tenant: Optional[str] = typer.Option(None, "--tenant", help=TENANT_HELP),
          api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EVOSTREAM_API_KEY", help=KEY_HELP),
          memoryless: bool = typer.Option(False, "--memoryless", help="no memory yet: embed without memory "
                                                                        "instead of failing")) -> None:
    """Embed a query against a conversation's live memory (worker HTTP API, POST /v1/embeddings)."""
    from stream.clients.query_client import query_worker

    settings()
    resp = query_worker(url, conversation, text, api_key=api_key, tenant=tenant,
                        unknown_conversation="memoryless" if memoryless else "error")
    out = resp.model_dump(mode="json")
    if not full_vector:
        out["vector"] = {**out["vector"], "b64": out["vector"]["b64"][:32] + "..."}
    print(json.dumps(out, indent=2))


def _store(s: Any):  # -> MemoryStore
    """A checkpoint store for operator commands: the configured model's identity (it keys the
    checkpoints), short socket timeouts (a person is waiting)."""
    from stream.state.store import MemoryStore
    from stream.state.redis_client import RedisOptions
    from workers.loading import checkpoint_fingerprint
    from workers.precision import state_dtype_for

    ckpt = resolve_model(s.model, s.model_revision)
    cfg = json.loads((ckpt / "config.json").read_text())
    hidden = int(cfg["backbone_config"]["hidden_size"]) if "backbone_config" in cfg else 0
    return MemoryStore(s.redis_url, fingerprint=checkpoint_fingerprint(ckpt), hidden_size=hidden,
                       capacity=int(cfg.get("buffer_capacity", 512)), dtype=state_dtype_for(s.dtype),
                       namespace=s.redis_namespace, socket_timeout_s=3.0,
                       redis_options=RedisOptions.from_settings(s))  # issue #8: TLS / password files


def _with_store(s: Any, fn: Any) -> Any:
    async def run() -> Any:
        store = _store(s)
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


STORE_TENANT_HELP = "the conversation's tenant (default: none)"


@app.command()
def inspect(conversation: str = typer.Argument(..., help="conversation id"),
            tenant: Optional[str] = typer.Option(None, "--tenant", help=STORE_TENANT_HELP)) -> None:
    """Show a conversation's checkpoint in Redis (sizes, TTL, outbox, offsets)."""
    from stream.identity import ConversationRef

    s = settings()
    info = _with_store(s, lambda store: store.inspect(ConversationRef(tenant, conversation)))
    if info is None:
        raise CliError(f"no checkpoint for conversation {conversation!r}"
                       f"{' of tenant ' + repr(tenant) if tenant else ''} in {s.redis_namespace!r}", ExitCode.FAILED)
    print(json.dumps(info, indent=2, default=str))


@app.command()
def reset(conversation: str = typer.Argument(..., help="conversation id"),
          tenant: Optional[str] = typer.Option(None, "--tenant", help=STORE_TENANT_HELP),
          yes: bool = typer.Option(False, "--yes", "-y", help="do it (without this flag, only say what would happen)")
          ) -> None:
    """Drop a conversation's memory (e.g. one quarantined as checkpoint_corrupt): its next turn
    starts an empty memory. Replay its dead letters afterwards (`evostream dead-letters`)."""
    from stream.identity import ConversationRef

    s = settings()
    ref = ConversationRef(tenant, conversation)
    if not yes:
        raise CliError(f"this drops the memory of conversation {ref}; rerun with --yes", ExitCode.USAGE)
    existed, last_seq = _with_store(s, lambda store: store.reset(ref))
    if not existed:
        raise CliError(f"nothing stored for conversation {ref} in {s.redis_namespace!r}", ExitCode.FAILED)
    print(f"reset conversation {ref}: memory dropped (last applied seq {last_seq}); its next turn starts afresh")


@app.command()
def topics(wait: float = typer.Option(60.0, "--wait", min=0.0, help="seconds to wait for the broker")) -> None:
    """Create the topics (admin step, idempotent) with partitions, replication and configs
    from the settings. Exit 2 when an existing topic has another partition count."""
    from stream.kafka.security import KafkaSecurity
    from stream.kafka.topics import run_sync, settings_topics, wait_for_broker

    s = settings()
    note(f"waiting up to {wait:.0f}s for the broker at {s.kafka_bootstrap} ...")

    def go() -> dict[str, int]:
        try:
            run_sync(lambda: wait_for_broker(s.kafka_bootstrap, wait, security=KafkaSecurity.from_settings(s)))
        except (TimeoutError, ConnectionError) as exc:
            auth = any(w in str(exc) for w in AUTH_WORDS)
            raise CliError(f"cannot reach the Kafka broker at {s.kafka_bootstrap} (EVOSTREAM_KAFKA_BOOTSTRAP): {exc}",
                           ExitCode.AUTH if auth else ExitCode.BROKER) from exc
        return _ensure_topics(s)

    got = _kafka_call(s, go)
    wanted = settings_topics(s)[0]
    for name, n in got.items():
        print(f"{name}: {n} partitions" + ("" if n == wanted[name] else f" (wanted {wanted[name]})"))
    if got != wanted:
        raise typer.Exit(int(ExitCode.USAGE))


class StackAction(str, Enum):
    start = "start"
    stop = "stop"
    status = "status"
    env = "env"


@app.command()
def stack(action: StackAction = typer.Argument(..., help="start, stop, status, or env (print the variables)"),
          run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="default: .run/localstack in the repo"),
          export: bool = typer.Option(False, "--export",
                                      help="env: print `export` lines, for eval \"$(evostream stack env --export)\""),
          postgres: bool = typer.Option(False, "--postgres",
                                        help="start: also the bundled PostgreSQL + pgvector for `evostream sink`")
          ) -> None:
    """Start/stop the local broker + Redis (the ones the demo and the tests use). A stack start
    is a clean slate: the broker keeps nothing across a stop, and neither does Redis."""
    stack_main = _devtool("devtools.localstack", "main", "stack")
    rc = stack_main([action.value] + (["--run-dir", str(run_dir)] if run_dir else [])
                    + (["--export"] if export else []) + (["--postgres"] if postgres else []))
    if rc:
        raise typer.Exit(rc)


@app.command("settings", help="Print the effective settings (flags > EVOSTREAM_* > settings file > defaults) "
                              "as JSON; secrets are masked.\n\nEvery setting:\n\n" + settings_help())
def settings_cmd() -> None:
    import re as _re

    from stream.cli.errors import redact

    s = settings()
    problem = s.serving_problem()
    if problem:
        warn(f"{problem} (a worker refuses to start on this)")
    out = json.loads(s.model_dump_json())
    for name, value in out.items():
        if value and _re.search(r"(password|secret|token|api_keys)$", name):
            out[name] = "***"  # SecretStr fields already print as stars; API keys are dict keys
        elif isinstance(value, str) and "://" in value:
            out[name] = redact(value)  # a password inside a URL
    print(json.dumps(out, indent=2))


class Family(str, Enum):
    qwen3 = "qwen3"
    qwen3_5 = "qwen3_5"


class Size(str, Enum):
    tiny = "tiny"
    small = "small"
    bench1024 = "bench1024"


@app.command("make-tiny-checkpoint")
def make_tiny_checkpoint(out_dir: Path = typer.Argument(..., help="directory to write"),
                         family: Family = typer.Option(Family.qwen3, "--family", help="backbone family"),
                         size: Size = typer.Option(Size.tiny, "--size", help="model size"),
                         seed: int = typer.Option(0, "--seed", help="weights seed")) -> None:
    """Write a seeded tiny checkpoint in the released layout (random weights, real tokenizer)."""
    from workers.tiny_checkpoint import make_tiny_checkpoint as make

    p = make(out_dir, family.value, size.value, seed=seed)
    print(f"wrote tiny {family.value}/{size.value} checkpoint (seed {seed}) to {p}")
