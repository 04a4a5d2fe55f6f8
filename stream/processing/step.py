"""The model step of a batch, off the event loop, with a failing turn isolated.

If the batch fails as a whole, its turns are retried one by one so that the turn that fails
alone is dead-lettered (`processing_error`) instead of stalling the partition. States touched
by a failed step are re-read from Redis, the source of truth, rather than copied before every
step (that copy would cost megabytes per batch).

The engine sees each conversation by its opaque tag (a hash of tenant + id), so two tenants'
conversations with one id never share a state inside a step.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor

from schemas.events import DeadLetterReason
from schemas.turns import TurnInput
from stream.identity import ConversationRef
from stream.processing.commit import BatchCommit, reached
from stream.processing.dead_letters import DeadLetterWriter, Rejection
from stream.processing.records import BatchReport, Due
from stream.processing.views import ViewLoader
from workers.engine import EvoEngine, TurnOutput
from workers.state import ConversationState

log = logging.getLogger(__name__)


class ModelStep:
    def __init__(self, engine: EvoEngine, executor: Executor, views: ViewLoader, dead_letter: DeadLetterWriter,
                 *, embed: bool = True) -> None:
        self.engine = engine
        self.embed = embed
        self.executor = executor
        self.views = views
        self.dead_letter = dead_letter

    async def __call__(self, states: dict[str, ConversationState], todo: list[Due], batch: BatchCommit,
                       rep: BatchReport) -> list[tuple[Due, TurnOutput]]:
        turns = [self._engine_turn(d) for d in todo]
        loop = asyncio.get_running_loop()
        try:
            outs = await loop.run_in_executor(self.executor, self._step, states, turns)
            reached("in_step")
            return list(zip(todo, outs))
        except Exception:
            log.exception("model step failed for a batch of %d turns; retrying them one by one", len(todo))
        await self.views.reload(states, {d.ref for d in todo})
        result: list[tuple[Due, TurnOutput]] = []
        broken: set[ConversationRef] = set()
        for d, turn in zip(todo, turns):
            ref, tag = d.ref, turn.conversation_id
            if ref in broken:  # later turns of a conversation whose turn failed: memory would skip it
                batch.send(self.dead_letter(d.record, Rejection(
                    reason_code=DeadLetterReason.PROCESSING_ERROR,
                    reason="an earlier turn of this conversation in the same batch failed in the model step"), rep))
                continue
            try:
                o = await loop.run_in_executor(self.executor, self._step, {tag: states[tag]}, [turn])
                result.append((d, o[0]))
            except Exception as exc:  # noqa: BLE001 - reported with the record
                log.exception("model step failed for %s seq %d", ref, turn.seq)
                broken.add(ref)
                batch.send(self.dead_letter(d.record, Rejection(
                    reason_code=DeadLetterReason.PROCESSING_ERROR, reason=f"model step failed: {type(exc).__name__}: {exc}"),
                    rep))
                # its earlier turns of this batch still commit; drop what the failed step half-did
                done = [o for dd, o in result if dd.ref == ref]
                await self.views.reload(states, {ref})
                for o in done:
                    states[tag].apply(o.delta)
        return result

    def _step(self, states: dict[str, ConversationState], turns: list[TurnInput]) -> list[TurnOutput]:
        return self.engine.step(states, turns) if self.embed else self.engine.step(states, turns, embed=False)

    @staticmethod
    def _engine_turn(d: Due) -> TurnInput:
        return d.event.to_turn_input().model_copy(update={"conversation_id": d.ref.tag})
