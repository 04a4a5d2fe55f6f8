"""`evostream` command line: worker, demo, produce, query, search, inspect, topics, stack,
make-tiny-checkpoint. Settings come from EVOSTREAM_* variables and an optional config file
(--config or EVOSTREAM_CONFIG); flags override both."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any


def _settings(args: argparse.Namespace, **overrides: Any):  # -> Settings
    if getattr(args, "config", None):
        os.environ["EVOSTREAM_CONFIG"] = args.config
    from stream.settings import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def resolve_checkpoint(path: str) -> Path:
    """The configured checkpoint, or the seeded tiny one (generated once into the cache)."""
    if path:
        return Path(path)
    from workers.tiny_checkpoint import cached_tiny_checkpoint

    return cached_tiny_checkpoint("qwen3", "tiny")


def _load_engine(settings):  # -> EvoEngine
    from workers.engine import EngineConfig, load_engine
    from workers.rendering import MemoryRendering
    from workers.scheduler import Budget

    ckpt = resolve_checkpoint(settings.checkpoint)
    cfg = EngineConfig(budget=Budget(settings.max_batch_tokens, settings.max_batch_rows),
                       memory_rendering=MemoryRendering(settings.memory_rendering))
    return load_engine(ckpt, device=settings.device, dtype=settings.dtype,
                       backbone_config=settings.backbone_config, config=cfg)


# ---------------------------------------------------------------------------------------------
def cmd_worker(args: argparse.Namespace) -> int:
    from stream.app import run_worker
    from stream.logs import setup_logging

    s = _settings(args, web_port=args.web_port)
    setup_logging(s.log_level, s.log_json)
    _ensure_topics(s)
    engine = _load_engine(s)
    run_worker(s, engine)
    return 0


def _ensure_topics(s) -> dict[str, int]:
    """Create the topics before anything asks the broker for their metadata: some brokers
    (tansu, Kafka with auto-create on) would otherwise create them with a default partition
    count. An existing topic is left as it is; a partition-count mismatch is logged."""
    from stream.topics import ensure_topics_sync

    return ensure_topics_sync(s.kafka_bootstrap, {s.turns_topic: s.turns_partitions,
                                                  s.embeddings_topic: s.turns_partitions, s.dead_letter_topic: 1})


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from workers.tiny_checkpoint import make_tiny_checkpoint

    p = make_tiny_checkpoint(args.out_dir, args.family, args.size, seed=args.seed)
    print(f"wrote tiny {args.family}/{args.size} checkpoint (seed {args.seed}) to {p}")
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from stream.producer import produce_file

    s = _settings(args)
    n = asyncio.run(produce_file(Path(args.file), bootstrap=s.kafka_bootstrap, topic=args.topic or s.turns_topic,
                                 rate=args.rate, progress=not args.quiet))
    print(f"produced {n} records to {args.topic or s.turns_topic}", file=sys.stderr)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from stream.query_client import QueryError, query_worker

    try:
        resp = query_worker(args.url, args.conversation, args.text)
    except QueryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = resp.model_dump(mode="json")
    if not args.full_vector:
        out["vector"] = {**out["vector"], "b64": out["vector"]["b64"][:32] + "..."}
    print(json.dumps(out, indent=2))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from stream.indexer import TopicNotFound, search_end_to_end
    from stream.query_client import QueryError

    s = _settings(args)
    try:
        hits = asyncio.run(search_end_to_end(s.kafka_bootstrap, s.embeddings_topic, args.url, args.conversation,
                                             args.text, args.k))
    except (QueryError, TopicNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps([h.model_dump(mode="json") for h in hits], indent=2))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from stream.checkpoints import CheckpointStore
    from workers.evo_model import checkpoint_fingerprint, parse_dtype

    s = _settings(args)
    ckpt = resolve_checkpoint(s.checkpoint)
    cfg = json.loads((ckpt / "config.json").read_text())
    hidden = int(cfg["backbone_config"]["hidden_size"]) if "backbone_config" in cfg else 0

    async def run() -> dict | None:
        store = CheckpointStore(s.redis_url, fingerprint=checkpoint_fingerprint(ckpt), hidden_size=hidden,
                                capacity=int(cfg.get("buffer_capacity", 512)), dtype=parse_dtype(s.dtype),
                                namespace=s.redis_namespace)
        try:
            return await store.inspect(args.conversation)
        finally:
            await store.close()

    info = asyncio.run(run())
    if info is None:
        print(f"no checkpoint for conversation {args.conversation!r}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2))
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    s = _settings(args)
    got = _ensure_topics(s)
    for name, n in got.items():
        print(f"{name}: {n} partitions")
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from stream.localstack import main as stack_main

    return stack_main([args.action] + (["--run-dir", args.run_dir] if args.run_dir else []))


def cmd_demo(args: argparse.Namespace) -> int:
    from stream.demo import run_demo

    return run_demo(conversations=args.conversations, keep_running=args.keep_running)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="evostream", description=__doc__)
    ap.add_argument("--config", help="settings file (JSON/TOML/YAML); same as EVOSTREAM_CONFIG")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("worker", help="run one stream worker (consumer group member)")
    p.add_argument("--web-port", type=int, default=None)
    p.set_defaults(fn=cmd_worker)

    p = sub.add_parser("demo", help="local broker + Redis + tiny model + sample conversations, end to end")
    p.add_argument("--conversations", type=int, default=None, help="use only the first N sample conversations")
    p.add_argument("--keep-running", action="store_true", help="leave the stack and worker up afterwards")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("produce", help="replay a JSONL conversation file into the turns topic")
    p.add_argument("file")
    p.add_argument("--topic")
    p.add_argument("--rate", type=float, default=0.0, help="records per second (0 = as fast as possible)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_produce)

    p = sub.add_parser("query", help="embed a query against a conversation's live memory (HTTP)")
    p.add_argument("--url", default="http://127.0.0.1:6066")
    p.add_argument("--conversation", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--full-vector", action="store_true")
    p.set_defaults(fn=cmd_query)

    p = sub.add_parser("search", help="index the embeddings topic and search one conversation")
    p.add_argument("--url", default="http://127.0.0.1:6066")
    p.add_argument("--conversation", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("-k", type=int, default=5)
    p.set_defaults(fn=cmd_search)

    p = sub.add_parser("inspect", help="show a conversation's checkpoint in Redis")
    p.add_argument("conversation")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("topics", help="create the topics (idempotent)")
    p.set_defaults(fn=cmd_topics)

    p = sub.add_parser("stack", help="start/stop the local broker + Redis")
    p.add_argument("action", choices=["start", "stop", "status", "env"])
    p.add_argument("--run-dir")
    p.set_defaults(fn=cmd_stack)

    p = sub.add_parser("make-tiny-checkpoint", help="write a seeded tiny checkpoint (released layout)")
    p.add_argument("out_dir")
    p.add_argument("--family", choices=["qwen3", "qwen3_5"], default="qwen3")
    p.add_argument("--size", choices=["tiny", "small", "bench1024"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_make_tiny)

    args = ap.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
