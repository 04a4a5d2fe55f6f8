"""Queries get their own bounded queue and are micro-batched into model passes that take
turns with ingestion on the one model thread.

Why: a query used to be one `run_in_executor` call on the model thread; a burst of N queries
put N passes in the executor's FIFO ahead of the next ingestion step, so the stream stalled
for as long as the burst lasted. Now:

* requests wait in a bounded queue (`query_queue_max`); when it is full the request is refused
  at once (429) instead of queueing without bound;
* one dispatcher drains it: compatible requests are merged into one pass of up to
  `query_batch_max` texts (waiting at most `query_batch_wait_ms` to fill it); a rerank (which
  advances a copy of the memory) is a pass of its own;
* at most ONE query pass is on the model thread at any time, so an ingestion step never waits
  behind more than one pass;
* fairness rule (time share): while ingestion is busy (a step is queued or running, or one
  ended less than `query_idle_grace_ms` ago), a pass of q seconds is followed by a pause of
  q * (1 - s) / s before the next one (s = `query_share`), so queries take at most a share s
  of the model thread's time and ingestion keeps >= 1 - s; while ingestion is idle the pause
  is skipped and queries use the thread freely.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas.turns import ChatMessage, TurnInput
from stream.api.errors import overloaded
from stream.runtime.model_thread import ModelThread
from workers.engine import EvoEngine
from workers.state import ConversationState

log = logging.getLogger(__name__)

_RERANK_CID = "rerank"


@dataclass(frozen=True)
class EmbedItem:
    state: ConversationState | None
    text: str
    query: bool  # True: instruction prefix (a query); False: plain text (a passage)


@dataclass
class _Job:
    future: asyncio.Future = field(repr=False)
    items: list[EmbedItem] | None = None                     # an embed job
    rerank: tuple[ConversationState | None, str, list[str]] | None = None  # (state, query, texts)

    @property
    def size(self) -> int:
        return len(self.items) if self.items is not None else len(self.rerank[2])  # type: ignore[index]


def embed_pass(engine: EvoEngine, items: list[EmbedItem]) -> np.ndarray:
    """One forward pass (two when queries and passages are mixed) over many texts."""
    out = np.empty((len(items), engine.embedding_dim), dtype=np.float32)
    q_idx = [i for i, it in enumerate(items) if it.query]
    p_idx = [i for i, it in enumerate(items) if not it.query]
    if q_idx:
        out[q_idx] = engine.embed_queries([(items[i].state, items[i].text) for i in q_idx])
    if p_idx:
        out[p_idx] = engine.embed_texts([(items[i].state, items[i].text) for i in p_idx])
    return out


def rerank_pass(engine: EvoEngine, state: ConversationState | None, query: str, texts: list[str]) -> np.ndarray:
    """Cosine of each text's per-turn-snapshot embedding with the query, as
    `workers.client.EvoEmbeddingClient.rerank_scores` computes it, starting from a copy of
    `state` (a fresh memory when None). Runs on the model thread: the copy is taken there, so
    it cannot interleave with an ingestion step advancing the same state."""
    st = state.copy() if state is not None else engine.new_state()
    first = st.seq + 1
    turns = [TurnInput.model_construct(conversation_id=_RERANK_CID, seq=first + i, messages=[
        ChatMessage(role="user", content=t), ChatMessage(role="assistant", content="")]) for i, t in enumerate(texts)]
    states = {_RERANK_CID: st}
    # The rerank's throw-away memory must not enter the engine's per-conversation caches (it
    # would evict the stream's entries) nor replace the stream's step statistics. Safe: this runs
    # on the model thread, the only thread that steps the engine.
    with engine.scratch():
        outs = engine.step(states, turns, embed=True)
        keys = np.stack([o.embedding for o in outs]).astype(np.float32)
        q = engine.embed_queries([(states[_RERANK_CID], query)])[0].astype(np.float32)
    return keys @ q


class QueryBatcher:
    def __init__(self, engine: EvoEngine, thread: ModelThread, *, queue_max: int, batch_max: int,
                 batch_wait_s: float, share: float, grace_s: float, metrics: Any = None):
        self.engine = engine
        self.thread = thread
        self.queue_max = queue_max
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        self.share = share
        self.grace_s = grace_s
        self.metrics = metrics
        self._queue: deque[_Job] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._not_before = 0.0  # monotonic time before which no pass starts while ingestion is busy
        self.passes = 0

    # -- submitting --------------------------------------------------------------------------
    def _enqueue(self, job: _Job) -> None:
        if len(self._queue) >= self.queue_max:
            if self.metrics is not None:
                self.metrics.rejected.inc()
            raise overloaded(f"query queue full ({self.queue_max} requests waiting); retry later")
        self._queue.append(job)
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))
        self._ensure_running()
        assert self._wake is not None
        self._wake.set()

    async def embed(self, items: list[EmbedItem]) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(fut, items=items))
        return await fut

    async def rerank(self, state: ConversationState | None, query: str, texts: list[str]) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(fut, rerank=(state, query, texts)))
        return await fut

    # -- the dispatcher ------------------------------------------------------------------------
    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="evostream-query-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.cancel()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            if self.batch_wait_s > 0 and self._queue[0].items is not None and self._pending_items() < self.batch_max:
                await asyncio.sleep(self.batch_wait_s)  # let concurrent requests join this pass
            await self._wait_for_turn()
            jobs = self._take()
            if not jobs:
                continue
            try:
                await self._execute(jobs)
            except asyncio.CancelledError:
                for j in jobs:
                    if not j.future.done():
                        j.future.cancel()
                raise

    def _pending_items(self) -> int:
        n = 0
        for j in self._queue:
            if j.items is None:
                break
            n += j.size
        return n

    def _take(self) -> list[_Job]:
        """The next pass: one rerank, or embed jobs up to `batch_max` texts (at least one job),
        skipping requests whose caller has gone away."""
        jobs: list[_Job] = []
        n = 0
        while self._queue:
            j = self._queue[0]
            if j.future.done():  # cancelled by a disconnected client
                self._queue.popleft()
                continue
            if j.rerank is not None:
                if not jobs:
                    jobs.append(self._queue.popleft())
                break
            if jobs and n + j.size > self.batch_max:
                break
            jobs.append(self._queue.popleft())
            n += j.size
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))
        return jobs

    async def _wait_for_turn(self) -> None:
        while True:
            now = time.monotonic()
            if now >= self._not_before or not self.thread.ingestion_busy(self.grace_s):
                return
            await asyncio.sleep(min(self._not_before - now, 0.005))

    async def _execute(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        try:
            if jobs[0].rerank is not None:
                state, query, texts = jobs[0].rerank
                fut = self.thread.submit_query(rerank_pass, self.engine, state, query, texts)
            else:
                items = [it for j in jobs for it in j.items]  # type: ignore[union-attr]
                fut = self.thread.submit_query(embed_pass, self.engine, items)
            result, seconds = await asyncio.wrap_future(fut, loop=loop)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every waiting request
            log.exception("query pass failed (%d request(s))", len(jobs))
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(exc)
            return
        self.passes += 1
        if self.metrics is not None:
            self.metrics.pass_seconds.observe(seconds)
            self.metrics.pass_texts.observe(sum(j.size for j in jobs))
        if self.share < 1 and self.thread.ingestion_busy(self.grace_s):
            self._not_before = time.monotonic() + seconds * (1 - self.share) / self.share
        else:
            self._not_before = 0.0
        if jobs[0].rerank is not None:
            if not jobs[0].future.done():
                jobs[0].future.set_result(result)
            return
        start = 0
        for j in jobs:
            part = result[start:start + j.size]
            start += j.size
            if not j.future.done():
                j.future.set_result(part)
