"""`evostream cold-tier freeze|purge|stats`: move idle conversations out of Redis and manage the files.

Runs against the configured Redis namespace and EVOSTREAM_COLD_TIER_PATH (or `--path`); prints one
JSON line (what a cron job logs) and, on stderr, a sentence. See stream/state/cold_tier.py for how a
freeze stays safe next to live workers, and docs/CAPACITY.md for the freeze/thaw rates.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Optional

import typer

from stream.cli.base import app, note
from stream.cli.core import settings
from stream.cli.errors import CliError, ExitCode

cold_app = typer.Typer(help="Move idle conversations out of Redis to the cold tier's files, and manage them.",
                       no_args_is_help=True)

_PATH_HELP = "the cold tier's directory (default: EVOSTREAM_COLD_TIER_PATH)"


def parse_shards(spec: str | None, shards: int) -> set[int] | None:
    """`0-7,12` -> {0..7, 12}; None = every shard."""
    if not spec:
        return None
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise CliError(f"--shards {spec!r}: expected shard numbers and ranges like 0-7,12", ExitCode.USAGE) from None
    if not out or min(out) < 0 or max(out) >= shards:
        raise CliError(f"--shards {spec!r}: this cold tier has shards 0-{shards - 1}", ExitCode.USAGE)
    return out


def _open(path: Optional[Path]) -> tuple[Any, Any]:
    from stream.state.cold_tier import ColdTier

    s = settings()
    where = path or (Path(s.cold_tier_path) if s.cold_tier_path else None)
    if where is None:
        raise CliError("no cold tier: pass --path or set EVOSTREAM_COLD_TIER_PATH", ExitCode.USAGE)
    return s, ColdTier(where, shards=s.cold_tier_shards)


def _store(s: Any, cold: Any) -> Any:
    import torch

    from stream.state.redis_client import RedisOptions
    from stream.state.store import MemoryStore

    # freeze/thaw move raw bytes: the model's shape and fingerprint are not needed to move them
    return MemoryStore(s.redis_url, fingerprint="cold-tier", hidden_size=1, capacity=1, dtype=torch.float32,
                           namespace=s.redis_namespace, ttl_s=s.state_ttl_s, marker_ttl_s=s.marker_ttl_s,
                           ttl_by_tenant=s.state_ttl_by_tenant, cold=cold,
                           redis_options=RedisOptions.from_settings(s))  # issue #8


def _files(cold: Any) -> dict[str, Any]:
    return {"cold_rows": cold.count(), "cold_file_bytes": cold.file_bytes(), "shards": cold.shards,
            "quarantined": {str(k): v for k, v in cold.quarantined().items()}}


@cold_app.command("freeze")
def freeze_cmd(idle_s: float = typer.Option(..., "--idle-s", min=0, help="idle time: seconds since the last commit"),
               limit: Optional[int] = typer.Option(None, "--limit", min=1, help="freeze at most this many"),
               shards: Optional[str] = typer.Option(None, "--shards", help="only these shards, e.g. 0-7 (run one "
                                                    "freezer per range to freeze in parallel processes)"),
               concurrency: int = typer.Option(4, "--concurrency", min=1, help="batches in flight at once"),
               path: Optional[Path] = typer.Option(None, "--path", help=_PATH_HELP)) -> None:
    """Move every conversation idle for --idle-s out of Redis into the cold tier (their next turn
    brings them back exactly). Conversations of a quarantined shard stay in Redis."""
    s, cold = _open(path)

    async def run() -> dict[str, Any]:
        store = _store(s, cold)
        try:
            rep = await cold.freeze_idle(store, idle_s, limit=limit, concurrency=concurrency,
                                         only_shards=parse_shards(shards, cold.shards))
        finally:
            await store.close()
        out = {k: v for k, v in rep.__dict__.items() if k != "quarantined"}
        return {**out, **_files(cold)}

    try:
        got = asyncio.run(run())
    finally:
        cold.close()
    print(json.dumps(got))
    note(f"froze {got['frozen']} of {got['idle']} idle conversation(s) ({got['changed']} moved on, {got['failed']} in "
         f"quarantined shards); {got['cold_rows']} row(s) in {got['shards']} shard(s)")
    if got["quarantined"]:
        raise CliError(f"quarantined shard(s): {got['quarantined']}", ExitCode.FAILED)


@cold_app.command("purge")
def purge_cmd(path: Optional[Path] = typer.Option(None, "--path", help=_PATH_HELP)) -> None:
    """Drop rows older than the retention (their Redis markers are gone: nothing can thaw them)."""
    _, cold = _open(path)
    try:
        got = {"purged": cold.purge(), **_files(cold)}
    finally:
        cold.close()
    print(json.dumps(got))


@cold_app.command("stats")
def stats_cmd(path: Optional[Path] = typer.Option(None, "--path", help=_PATH_HELP)) -> None:
    """Rows, bytes on disk, shards, and the shards that cannot be read (quarantined)."""
    _, cold = _open(path)
    try:
        got = _files(cold)
    finally:
        cold.close()
    print(json.dumps(got))


app.add_typer(cold_app, name="cold-tier")
