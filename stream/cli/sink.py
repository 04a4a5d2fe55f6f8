"""`evostream sink` (keep the index: PostgreSQL + pgvector, or the SQLite file) and
`evostream search` (rank a tenant's turns through that index) -- issue #19.

Which index: `EVOSTREAM_SINK_DSN` set -> that PostgreSQL; unset -> the SQLite file at
`EVOSTREAM_INDEX_PATH` (default: one per broker and topic under the cache dir). Both hold the
same tables and follow the same rules (stream/index/).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from datetime import datetime
from typing import Any, Optional

import typer

from stream.cli.base import app, note
from stream.cli.core import KEY_HELP, TENANT_HELP, URL_HELP, _kafka_call, settings
from stream.cli.errors import CliError, ExitCode


def _open(s: Any, *, for_search: bool = False) -> Any:
    from stream.index.base import IndexError_
    from stream.index.sink import open_index
    from workers.tokenizer import cache_dir

    try:
        return open_index(s, for_search=for_search, cache_root=cache_dir())
    except IndexError_ as exc:
        raise CliError(str(exc), ExitCode.FAILED) from None


def _sink_for(s: Any, index: Any) -> Any:
    from stream.index.sink import Sink, SinkMetrics
    from stream.kafka.security import KafkaSecurity

    metrics = SinkMetrics()
    if s.sink_metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(s.sink_metrics_port, addr="0.0.0.0", registry=metrics.registry)
        note(f"metrics on :{s.sink_metrics_port}/metrics")
    return Sink(index, s.kafka_bootstrap, s.embeddings_topic, s.turns_topic if s.sink_texts else None,
                name=s.sink_name, batch_max=s.sink_batch_max, security=KafkaSecurity.from_settings(s), metrics=metrics)


def _wait_for_writer(index: Any, name: str, wait: bool) -> None:
    said = False
    while not index.acquire_writer(name):
        if not wait:
            raise CliError(f"another sink named {name!r} is writing {index.where} (EVOSTREAM_SINK_NAME)",
                           ExitCode.FAILED)
        if not said:
            note(f"another sink named {name!r} holds {index.where}; waiting as a standby")
            said = True
        time.sleep(2.0)


async def _run_until_signal(sink: Any) -> Any:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await sink.run(stop)
    finally:
        await sink.stop()


@app.command("sink")
def sink_cmd(once: bool = typer.Option(False, "--once", help="commit what the topics hold now, then exit"),
             reset: bool = typer.Option(False, "--reset",
                                        help="drop this sink's offsets, rows and texts first: rebuild from offset 0"),
             wait: bool = typer.Option(True, "--wait/--no-wait",
                                       help="wait as a standby while another sink of the same name runs")) -> None:
    """Keep the index of the embeddings topic (and of the turns topic's texts): PostgreSQL +
    pgvector at EVOSTREAM_SINK_DSN, else the SQLite file. Exactly once: the consumed offsets
    are committed with the rows, and a restart resumes from them. Runs until SIGTERM/Ctrl-C."""
    s = settings()
    index = _open(s)
    try:
        _wait_for_writer(index, s.sink_name, wait)
        if reset:
            index.forget(s.sink_name)
            note(f"reset: {index.where} emptied; reading from offset 0")
        sink = _sink_for(s, index)
        note(f"sink {s.sink_name!r}: {s.embeddings_topic}"
             f"{' + ' + s.turns_topic if s.sink_texts else ''} on {s.kafka_bootstrap} -> {index.where} "
             f"({index.count()} turns so far)")
        if once:
            async def catch_up() -> Any:
                try:
                    return await sink.catch_up()
                finally:
                    await sink.stop()

            totals = _kafka_call(s, lambda: asyncio.run(catch_up()))
        else:
            totals = _kafka_call(s, lambda: asyncio.run(_run_until_signal(sink)))
        st = totals.stats
        note(f"{index.count()} turns indexed: {st.records} records in {totals.batches} transactions "
             f"(+{st.upserts} rows, {st.deletes} deletes, {st.texts} texts, {st.rejected + st.stale} rejected) "
             f"in {totals.seconds:.1f}s")
    finally:
        index.close()


def _when(value: Optional[str], flag: str) -> Optional[datetime]:
    if value is None:
        return None
    from schemas.events import Timestamp  # noqa: F401 - the same rule as the wire: ISO 8601 with an offset
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(Timestamp).validate_python(value)
    except ValidationError:
        raise CliError(f"{flag} {value!r}: expected an ISO 8601 time with an offset, e.g. 2026-12-01T10:00:00Z",
                       ExitCode.USAGE) from None


@app.command("search")
def search_cmd(text: str = typer.Option(..., "--text", "-t", help="the query text"),
               conversation: Optional[str] = typer.Option(
                   None, "--conversation", "-c",
                   help="embed the query against this conversation's live memory and search its turns"),
               all_conversations: bool = typer.Option(
                   False, "--all-conversations", help="with --conversation: rank every conversation of the tenant"),
               url: str = typer.Option("http://127.0.0.1:6066", "--url", help=URL_HELP),
               k: int = typer.Option(5, "-k", min=1, max=1000, help="number of hits"),
               tenant: Optional[str] = typer.Option(None, "--tenant", help=TENANT_HELP),
               since: Optional[str] = typer.Option(None, "--since", help="only turns at or after this time (ISO 8601)"),
               until: Optional[str] = typer.Option(None, "--until", help="only turns before this time (ISO 8601)"),
               exact: bool = typer.Option(False, "--exact", help="exact scan instead of the HNSW index"),
               api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EVOSTREAM_API_KEY", help=KEY_HELP)
               ) -> None:
    """Search turns through the index: the worker embeds the query (against the conversation's
    live memory when --conversation is given, memory-less otherwise), the index ranks the
    tenant's turns by cosine, with their text. When no sink is running, the index is first
    brought up to date from the topics (only what is new since the last time)."""
    from stream.clients.query_client import query_vector
    from stream.index.base import SearchQuery

    s = settings()
    t0, t1 = _when(since, "--since"), _when(until, "--until")
    index = _open(s)
    try:
        if s.sink_search_dsn is None and index.acquire_writer(s.sink_name):
            sink = _sink_for(s.model_copy(update={"sink_metrics_port": None}), index)

            async def catch_up() -> Any:
                try:
                    return await sink.catch_up()
                finally:
                    await sink.stop()

            totals = _kafka_call(s, lambda: asyncio.run(catch_up()))
            note(f"index {index.where}: {index.count()} turns (+{totals.stats.upserts} rows, "
                 f"{totals.stats.deletes} deletes, {totals.stats.texts} texts read in {totals.seconds:.1f}s)")
        else:
            note(f"index {index.where}: kept by a running sink; searching what it has committed")
            if s.sink_search_dsn is not None:
                index.close()
                index = _open(s, for_search=True)
        qv = query_vector(url, text, conversation, tenant=tenant, api_key=api_key)
        scoped = conversation if conversation is not None and not all_conversations else None
        # the tenant the worker resolved (an API key of one tenant names it without --tenant)
        tenant = tenant if tenant is not None or qv.memory is None else qv.memory.tenant
        hits = index.search(SearchQuery(vector=qv.vector, checkpoint=qv.checkpoint, tenant=tenant,
                                        conversation_id=scoped, since=t0, until=t1, k=k, exact=exact))
    finally:
        index.close()
    print(json.dumps([h.model_dump(mode="json") for h in hits], indent=2, ensure_ascii=False))


__all__ = ["search_cmd", "sink_cmd"]
