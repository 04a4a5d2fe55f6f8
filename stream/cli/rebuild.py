"""`evostream rebuild` and `evostream store status|accept-loss`: what an operator does when the
memory-state store is wrong (issue #17; README "When the store is wrong").

* `rebuild --into NS`: re-derive memories from the turns topic into namespace NS (its own,
  so live traffic is untouched), through what the consumer group acknowledged, with progress
  and an ETA; run it again to resume or to catch up. Then switch the workers over
  (EVOSTREAM_REDIS_NAMESPACE=NS, a rolling restart).
* `store status`: the namespace's identity, its watermarks against the group's offsets, and
  the verdict a worker would reach.
* `store accept-loss --yes`: start over from empty memories (a new identity carrying the
  decision); workers holding their batch resume, and conversations that had turns before say
  `memory: reset_by_operator`.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime
from typing import Any, Optional

import typer

from stream.cli.base import app, note
from stream.cli.core import _kafka_call, _store, load_engine_with_progress, settings
from stream.cli.errors import CliError, ExitCode


def _client_kwargs(s: Any) -> dict[str, Any]:
    from stream.kafka.security import KafkaSecurity

    return KafkaSecurity.from_settings(s).client_kwargs()


@app.command("rebuild")
def rebuild_cmd(
    into: str = typer.Option(..., "--into", metavar="NAMESPACE",
                             help="Redis namespace to write (its own; workers switch to it afterwards)"),
    tenant: Optional[str] = typer.Option(None, "--tenant", help="only this tenant's conversations"),
    conversation: Optional[str] = typer.Option(None, "--conversation", help="only this conversation (of --tenant)"),
    from_time: Optional[datetime] = typer.Option(
        None, "--from-time", formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S"],
        help="only turns published at or after this ISO time (UTC if no offset); e.g. onto a restored snapshot"),
    through: str = typer.Option("committed", "--through",
                                help="committed: through the consumer group's offsets (for a switch-over); "
                                     "end: to the end of the topic"),
    batched: bool = typer.Option(False, "--batched",
                                 help="step turns in the live micro-batches (faster; equal to an offline replay "
                                      "within float tolerance instead of bit for bit)"),
    batch_records: int = typer.Option(256, "--batch-records", min=1, help="records read per batch"),
) -> None:
    """Re-derive memories from the turns topic into namespace NAMESPACE, with the same engine
    and admission rules as the workers; prints progress and an ETA on stderr, a JSON report on
    stdout. Resumable: run it again to continue or to catch up."""
    from stream.processing.rebuild import RebuildError, Scope, run_rebuild
    from stream.state.epoch import StoreMismatch
    from stream.state.keys import check_namespace

    s = settings()
    if through not in ("committed", "end"):
        raise CliError(f"--through must be committed or end, not {through!r}", ExitCode.USAGE)
    if conversation is None and tenant is None:
        scope = Scope()
    else:
        scope = Scope(tenant=tenant, conversation=conversation)
    try:
        check_namespace(into)
    except ValueError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from None
    if into == s.redis_namespace:
        note(f"rebuilding INTO the configured namespace {into!r}: only do this while its workers hold "
             f"(store lost or behind); otherwise rebuild into another one and switch")
    if from_time is not None and from_time.tzinfo is None:
        from datetime import timezone

        from_time = from_time.replace(tzinfo=timezone.utc)
    if not batched:
        # exact means bit for bit the offline replay: the caches agree with it only within float
        # rounding (workers/engine.py), and a one-turn-at-a-time pass gains little from them
        s = s.model_copy(update={"prefix_cache_max_bytes": 0, "query_cache_max_bytes": 0})
    engine = load_engine_with_progress(s)
    try:
        rep = _kafka_call(s, lambda: asyncio.run(run_rebuild(
            s, engine, into=into, scope=scope, from_time=from_time, through=through,
            mode="batched" if batched else "exact", batch_records=batch_records, progress=note,
            client_kwargs=_client_kwargs(s))))
    except (RebuildError, StoreMismatch) as exc:
        raise CliError(str(exc), ExitCode.FAILED) from exc
    print(rep.model_dump_json(indent=2))
    note(f"namespace {into!r} rebuilt: {rep.turns_applied} turns applied from {rep.records} records in "
         f"{rep.seconds:.1f}s ({rep.turns_per_s} turns/s); switch the workers with EVOSTREAM_REDIS_NAMESPACE={into}")


store_app = typer.Typer(help="The memory-state store's identity: status, and the operator's decision after a loss.",
                        no_args_is_help=True)


async def _status(s: Any, namespace: str) -> dict[str, Any]:
    from stream.kafka.group_offsets import committed_offsets
    from stream.state.epoch import EpochWatch

    store = _store(s.model_copy(update={"redis_namespace": namespace}))
    try:
        info = await store.epoch.epoch.read()
        committed = await committed_offsets(s.kafka_bootstrap, s.group_id, s.turns_topic,
                                            client_kwargs=_client_kwargs(s))
        watch = EpochWatch(store.epoch.epoch, fingerprint=store.fingerprint, created_by="status")
        watch.committed = committed
        if info is None and not any(c > 0 for c in committed.values()):
            kind, problem = "new", "no identity and nothing acknowledged: a worker creates it at start"
        else:
            kind, problem = watch.judge(info)
    finally:
        await store.close()
    return {
        "namespace": namespace,
        "verdict": kind or "ok",
        "problem": problem,
        "identity": None if info is None else json.loads(info.model_dump_json(exclude={"watermarks"})),
        "watermarks": {} if info is None else {f"{t}[{p}]": o for (t, p), o in sorted(info.watermarks.items())},
        "group_committed": {f"{t}[{p}]": o for (t, p), o in sorted(committed.items())},
    }


@store_app.command("status")
def status_cmd(namespace: Optional[str] = typer.Option(None, "--namespace",
                                                       help="default: EVOSTREAM_REDIS_NAMESPACE")) -> None:
    """The store's identity, its watermarks against the consumer group's committed offsets,
    and the verdict a worker would reach (ok, new, lost, building). Exit 1 when lost or building."""
    s = settings()
    out = _kafka_call(s, lambda: asyncio.run(_status(s, namespace or s.redis_namespace)))
    print(json.dumps(out, indent=2))
    if out["verdict"] in ("lost", "building"):
        raise typer.Exit(int(ExitCode.FAILED))


@store_app.command("accept-loss")
def accept_loss_cmd(yes: bool = typer.Option(False, "--yes", "-y", help="do it (without: only say what would happen)"),
                    namespace: Optional[str] = typer.Option(None, "--namespace",
                                                            help="default: EVOSTREAM_REDIS_NAMESPACE")) -> None:
    """Accept that memories were lost: give the namespace a new identity carrying the decision.
    Workers holding their batch resume; what the store still holds is kept; a conversation
    whose memory is gone starts empty (its next embedding says `reset_by_operator`)."""
    from stream.state.epoch import Decision, new_identity

    s = settings()
    ns = namespace or s.redis_namespace
    if not yes:
        raise CliError(f"this accepts the loss of whatever namespace {ns!r} no longer holds; rerun with --yes",
                       ExitCode.USAGE)

    async def go() -> tuple[bool, str, str]:
        store = _store(s.model_copy(update={"redis_namespace": ns}))
        try:
            cur = await store.epoch.epoch.read()
            dtype = "bfloat16" if s.state_storage_dtype == "bfloat16" else store.storage_dtype_name()
            info = new_identity(fingerprint=store.fingerprint, dtype=cur.dtype if cur else dtype,
                                created_by="evostream store accept-loss", decision=Decision.ACCEPT_LOSS,
                                supersedes=cur.id if cur else "")
            ok, now = await store.epoch.epoch.write(info, expect=cur.id if cur else None)
            return ok, info.id, now
        finally:
            await store.close()

    ok, new, now = asyncio.run(go())
    if not ok:
        raise CliError(f"the identity of {ns!r} changed meanwhile (now {now}); look again with `evostream store status`",
                       ExitCode.FAILED)
    print(f"namespace {ns!r}: loss accepted, new store identity {new}; holding workers resume", file=sys.stderr)


app.add_typer(store_app, name="store")
