"""Which of a batch's turns are applied: order, replays, deletes, gaps and limits.

Rules, per conversation, in record order (README "Wire format" documents them for producers):
* a conversation whose stored memory cannot be continued is quarantined: its turns are
  dead-lettered with the problem (`checkpoint_corrupt`, `tenant_mismatch`,
  `fingerprint_mismatch`);
* a record published before the live generation began (before the delete that ended the
  previous one) is a replay of an earlier generation: never applied to this one;
* a turn published after a delete that restarts the seqs below the deleted ones opens the new
  generation (replays of the deleted turns sit before the delete, not after it);
* a turn after a quarantined one (its memory could not be read, on this worker or another)
  waits behind it: dead-lettered with the same reason, never applied over the hole; replaying
  the dead letters in order after the repair applies them (issue #17);
* a seq not newer than the last applied one is checked against the conversation's ledger
  (stream/state/keys.py; issue #17): the same messages again are a duplicate (its event is
  re-emitted from the outbox if it is still there, byte-identical, otherwise dropped and
  counted); other messages under an applied seq are dead-lettered `conflicting_duplicate`; a
  seq that was skipped (applied over a gap) is dead-lettered `late_turn`. Memory is never
  rewound to insert a turn: the dead letters keep their bytes. A generation
  without a ledger (written before ledgers existed) counts them as duplicates, as before;
* a turn over `max_turn_tokens` is dead-lettered `turn_too_long`;
* a seq gap is applied with a warning (`GAP_POLICY=apply`) or dead-lettered `seq_gap`, at most
  `GAP_MAX_DEAD_LETTERS` per gap, after which the conversation continues without the missing
  turns (`GAP_POLICY=dead_letter`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from schemas.events import DeadLetterReason, MemoryOrigin, TurnEvent
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


def turn_digest(ev: TurnEvent) -> bytes:
    """8 bytes identifying what the model reads of a turn (roles and texts, in order): a resend
    with another timestamp or metadata is the same turn, an edited message is not."""
    ti = ev.to_turn_input()
    canon = json.dumps([[m.role, m.content] for m in ti.messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(canon.encode("utf-8", "surrogatepass"), digest_size=8).digest()


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
        ledgers: dict[ConversationRef, dict[int, bytes]] = {}  # read on demand (resent seqs only)
        admitted: dict[tuple[ConversationRef, int], bytes] = {}  # this batch's turns, by digest
        for d in due:
            ev, ref = d.event, d.ref
            if ref in problems:
                await self.quarantine(d, problems[ref], batch, rep)
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
            if view.held is not None and ev.seq > view.held[0]:
                self._held(d, view.held, batch, rep)
                continue
            if ev.seq <= last_seq[ref]:
                verdict = await self._resent(d, view, ledgers, admitted)
                if verdict != "duplicate":
                    late = verdict == "late"
                    (m.late_turns if late else m.conflicting_turns).inc()
                    batch.send(self.dead_letter(d.record, Rejection(
                        reason_code=DeadLetterReason.LATE_TURN if late else DeadLetterReason.CONFLICTING_DUPLICATE,
                        reason=(f"conversation {ref}: seq {ev.seq} was skipped (applied over a gap) and arrives after "
                                f"seq {last_seq[ref]}; memory is not rewound to insert it" if late else
                                f"conversation {ref}: seq {ev.seq} was applied with other messages; the applied "
                                f"version stays in memory")), rep))
                    continue
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
            admitted[(ref, ev.seq)] = turn_digest(ev)
            todo.append(d)
        return todo

    async def _resent(self, d: Due, view: View, ledgers: dict[ConversationRef, dict[int, bytes]],
                      admitted: dict[tuple[ConversationRef, int], bytes]) -> str:
        """A seq not newer than the last applied one: "duplicate", "conflict" or "late"."""
        ref, seq, mine = d.ref, d.event.seq, turn_digest(d.event)
        if (ref, seq) in admitted:
            return "duplicate" if admitted[(ref, seq)] == mine else "conflict"
        if view.fresh:
            return "duplicate"  # no live generation (expired, deleted): nothing recorded to compare with
        if ref not in ledgers:
            ledgers[ref] = await self.guard(lambda: self.store.ledger(ref), "ledger")
        ledger = ledgers[ref]
        if not ledger:
            return "duplicate"  # a generation written before ledgers existed: unverifiable, as before
        if seq in ledger:
            return "duplicate" if ledger[seq] == mine else "conflict"
        return "late"

    def _held(self, d: Due, held: tuple[int, str], batch: BatchCommit, rep: BatchReport) -> None:
        try:
            code = DeadLetterReason(held[1])
        except ValueError:
            code = DeadLetterReason.CHECKPOINT_CORRUPT
        self.metrics.held_turns.inc()
        batch.send(self.dead_letter(d.record, Rejection(
            reason_code=code,
            reason=(f"conversation {d.ref}: held behind seq {held[0]}, which was dead-lettered ({held[1]}) because its "
                    f"memory could not be read; after the repair replay the conversation's dead letters in order")),
            rep))

    async def quarantine(self, d: Due, problem: MemoryProblem, batch: BatchCommit, rep: BatchReport) -> None:
        """Dead-letter a turn whose conversation's memory cannot be read here, and hold the
        conversation behind it on every worker (stream/state/store.py `hold`)."""
        batch.send(self.dead_letter.quarantined(d, problem, rep))
        hold = getattr(self.store, "hold", None)
        if hold is not None:
            await self.guard(lambda: hold(d.ref, d.event.seq, problem.code.value), "hold")

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
