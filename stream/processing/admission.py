"""Which of a batch's turns are applied: order, replays, deletes, gaps and limits.

Rules, per conversation, in record order (README "Wire format" documents them for producers):
* a conversation whose stored memory cannot be continued is quarantined: its turns are
  dead-lettered with the problem (`checkpoint_corrupt`, `tenant_mismatch`,
  `fingerprint_mismatch`);
* a record published before the live generation began (before the delete that ended the
  previous one) is a replay of an earlier generation: never applied to this one;
* a turn published after a delete that restarts the seqs below the deleted ones opens the new
  generation (replays of the deleted turns sit before the delete, not after it);
* a seq not newer than the last applied one is a duplicate: its event is re-emitted from the
  outbox if it is still there (byte-identical), otherwise dropped and counted;
* a turn over `max_turn_tokens` is dead-lettered `turn_too_long`;
* a seq gap is applied with a warning (`GAP_POLICY=apply`) or dead-lettered `seq_gap`, at most
  `GAP_MAX_DEAD_LETTERS` per gap, after which the conversation continues without the missing
  turns (`GAP_POLICY=dead_letter`).
"""

from __future__ import annotations

import logging
from typing import Any

from schemas.events import DeadLetterReason, MemoryOrigin
from stream.identity import ConversationRef
from stream.processing.commit import BatchCommit
from stream.processing.dead_letters import DeadLetterWriter, Rejection
from stream.processing.outage import PauseOnOutage
from stream.processing.records import BatchReport, Due
from stream.processing.views import View
from stream.runtime.logs import fields as log_fields
from stream.settings import GapPolicy, Settings
from stream.state.records import MemoryProblem
from workers.state import NO_SEQ

log = logging.getLogger(__name__)


class Admission:
    def __init__(self, settings: Settings, turn_tokens: Any, store: Any, guard: PauseOnOutage,
                 dead_letter: DeadLetterWriter, metrics: Any) -> None:
        self.settings = settings
        self.turn_tokens = turn_tokens  # TurnInput -> token count (the engine's)
        self.store = store
        self.guard = guard
        self.dead_letter = dead_letter
        self.metrics = metrics

    async def admit(self, due: list[Due], views: dict[ConversationRef, View],
                    problems: dict[ConversationRef, MemoryProblem], batch: BatchCommit,
                    rep: BatchReport) -> list[Due]:
        """The turns to step, in record order; everything else is answered into `batch`."""
        s, m = self.settings, self.metrics
        last_seq = {ref: v.seq for ref, v in views.items()}
        todo: list[Due] = []
        for d in due:
            ev, ref = d.event, d.ref
            if ref in problems:
                batch.send(self.dead_letter.quarantined(d, problems[ref], rep))
                continue
            view = views[ref]
            pos = (d.record.partition, d.record.offset)
            if view.gen_start and pos[0] == view.gen_start[0] and pos[1] < view.gen_start[1]:
                # published before the live generation began (before its delete): a replay of
                # an earlier generation, never applied to this one
                m.after_delete.inc()
                rep.duplicates += 1
                m.duplicates.inc()
                continue
            if (view.fresh and view.deleted_at and not view.restarted and pos[0] == view.deleted_at[0]
                    and pos[1] > view.deleted_at[1] and ev.seq <= last_seq[ref]):
                # published after the delete under the same id, restarting its seqs: a new
                # conversation (replays of the deleted turns sit before the delete, not after)
                view.restarted = True
                view.state.seq = NO_SEQ
                last_seq[ref] = NO_SEQ
            if ev.seq <= last_seq[ref]:
                stored = view.outbox.get(ev.seq)
                if stored is not None:
                    batch.resend(ref, ev.seq, stored)
                    rep.reemitted += 1
                    m.reemitted.inc()
                if view.origin is MemoryOrigin.RESET_AFTER_DELETE and view.fresh:
                    # published before the delete, replayed after it: its memory is erased
                    m.after_delete.inc()
                rep.duplicates += 1
                m.duplicates.inc()
                continue
            n_tok = self.turn_tokens(ev.to_turn_input())
            if n_tok > s.max_turn_tokens:
                batch.send(self.dead_letter(d.record, Rejection(
                    reason_code=DeadLetterReason.TURN_TOO_LONG,
                    reason=f"turn has {n_tok} tokens; the limit (max_turn_tokens) is {s.max_turn_tokens}"), rep))
                continue
            if ev.seq > last_seq[ref] + 1 and not (view.fresh and last_seq[ref] == NO_SEQ):
                if not await self._gap(d, last_seq[ref], batch, rep):
                    continue
            last_seq[ref] = ev.seq
            todo.append(d)
        return todo

    async def _gap(self, d: Due, last: int, batch: BatchCommit, rep: BatchReport) -> bool:
        """A turn after missing seqs: True to apply it anyway (after a warning)."""
        s, ref, seq = self.settings, d.ref, d.event.seq
        if s.gap_policy is GapPolicy.DEAD_LETTER:
            rejected = await self.guard(lambda: self.store.note_gap_rejected(ref), "gap count")
            if rejected <= s.gap_max_dead_letters:
                batch.send(self.dead_letter(d.record, Rejection(
                    reason_code=DeadLetterReason.SEQ_GAP,
                    reason=(f"seq {seq} after {last}: turns {last + 1}..{seq - 1} are "
                            f"missing ({rejected} of at most {s.gap_max_dead_letters} gapped "
                            f"turns dead-lettered before the conversation continues without them)")), rep))
                return False
            self.metrics.gap_rebased.inc()
            log.warning("conversation %s: %d gapped turns dead-lettered; continuing at seq %d without "
                        "turns %d..%d", ref, rejected - 1, seq, last + 1, seq - 1)
        rep.gaps += 1
        self.metrics.gaps.inc()
        log.warning("conversation %s: seq gap, applying %d after %d", ref, seq, last,
                    extra=log_fields(conversation_id=ref.conversation_id, tenant=ref.tenant, seq=seq,
                                     topic=d.record.topic, partition=d.record.partition, offset=d.record.offset))
        return True
