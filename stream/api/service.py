"""What the endpoints do, independent of HTTP: find the memory a request may read, embed or
rerank against it through the query batcher, count tokens.

Texts are handled as the reference client handles them (workers/client.py): a query is
stripped and gets the instruction prefix; a rerank text is taken as it is (it becomes a
user turn); a passage is embedded as plain text + end-of-text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from stream.api.auth import Principal
from stream.api.batcher import EmbedItem, QueryBatcher
from stream.api.errors import ApiError, not_found, too_large, unavailable
from stream.api.models import InputType, MemoryInfo, UnknownConversation
from stream.state.errors import FingerprintMismatch, MemoryCorrupt, MemoryStateError
from stream.identity import ConversationRef
from stream.state.availability import StoreUnavailable
from workers.engine import EvoEngine
from workers.state import ConversationState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Memory:
    """The memory a request reads: a state (None = empty memory) and what to report about it
    (None when the request was memory-less)."""

    state: ConversationState | None
    info: MemoryInfo | None


MEMORYLESS = Memory(None, None)


@dataclass(frozen=True)
class Prepared:
    items: list[EmbedItem]
    tokens: int


class QueryService:
    def __init__(self, engine: EvoEngine, store: object, cache: object, batcher: QueryBatcher, *,
                 max_inputs: int, max_input_tokens: int):
        self.engine = engine
        self.store = store
        self.cache = cache
        self.batcher = batcher
        self.max_inputs = max_inputs
        self.max_input_tokens = max_input_tokens

    # -- memory ------------------------------------------------------------------------------
    async def memory(self, principal: Principal, conversation_id: str | None, tenant: str | None,
                     unknown: UnknownConversation) -> Memory:
        """The memory a request may read. The tenant is checked even for memory-less requests
        (a key must not probe which tenants exist). 404 for a conversation without memory unless
        memory-less was asked for."""
        resolved = principal.resolve_tenant(tenant)
        if conversation_id is None:
            return MEMORYLESS
        ref = ConversationRef(resolved, conversation_id)
        state = self.cache.get(ref)  # type: ignore[attr-defined]
        if state is None:
            try:
                ck = await self.store.load(ref)  # type: ignore[attr-defined]
            except StoreUnavailable:
                raise unavailable("checkpoint store unavailable; retry later") from None
            except FingerprintMismatch:
                raise ApiError(409, "checkpoint_mismatch",
                               "the conversation's memory was written by another model checkpoint") from None
            except (MemoryCorrupt, MemoryStateError):
                log.warning("query for %s: checkpoint unreadable", ref, exc_info=True)
                raise ApiError(409, "checkpoint_corrupt", "the conversation's checkpoint is unreadable") from None
            state = ck.state if ck is not None else None
        if state is None:
            if unknown is UnknownConversation.MEMORYLESS:
                return Memory(None, MemoryInfo(conversation_id=conversation_id, tenant=resolved,
                                               applied_seq=-1, memory_len=0))
            raise not_found("no memory for this conversation (unknown, deleted or expired); "
                            "send unknown_conversation='memoryless' to embed without memory",
                            "conversation_not_found")
        return Memory(state, MemoryInfo(conversation_id=conversation_id, tenant=resolved,
                                        applied_seq=state.seq, memory_len=state.memory_len))

    # -- texts -------------------------------------------------------------------------------
    def check_count(self, n: int) -> None:
        if n > self.max_inputs:
            raise too_large(f"{n} inputs; at most {self.max_inputs} per request (api_max_inputs)")

    def prepare(self, texts: list[str], input_type: InputType, state: ConversationState | None) -> Prepared:
        """Items for the batcher plus the token count (for `usage`); 413 for a text over the
        token limit. Queries are stripped as the reference client strips them."""
        self.check_count(len(texts))
        r = self.engine.renderer
        items, tokens = [], 0
        for i, t in enumerate(texts):
            if input_type is InputType.QUERY:
                t = t.strip()
                n = len(r.query_ids(t, True))
                body = n - len(r.instruction)
            else:
                n = body = len(r.text_ids(t))
            if body > self.max_input_tokens:
                raise too_large(f"input {i} has {body} tokens; the limit is {self.max_input_tokens} (api_max_input_tokens)")
            tokens += n
            items.append(EmbedItem(state, t, input_type is InputType.QUERY))
        return Prepared(items, tokens)

    async def embed(self, prepared: Prepared) -> np.ndarray:
        return await self.batcher.embed(prepared.items)

    async def rerank(self, memory: Memory, query: str, texts: list[str]) -> tuple[np.ndarray, int]:
        """Scores in input order and the tokens read (texts as ChatML user turns + the query)."""
        self.check_count(len(texts))
        r = self.engine.renderer
        q = query.strip()
        tokens = len(r.query_ids(q, True))
        if tokens - len(r.instruction) > self.max_input_tokens:
            raise too_large(f"the query has more than {self.max_input_tokens} tokens (api_max_input_tokens)")
        from schemas.turns import ChatMessage, TurnInput

        for i, t in enumerate(texts):
            n = len(r.tok.encode(t))
            if n > self.max_input_tokens:
                raise too_large(f"text {i} has {n} tokens; the limit is {self.max_input_tokens} (api_max_input_tokens)")
            turn = TurnInput.model_construct(conversation_id="x", seq=0, messages=[
                ChatMessage(role="user", content=t), ChatMessage(role="assistant", content="")])
            tokens += len(r.memory_ids(turn))
        scores = await self.batcher.rerank(memory.state, q, list(texts))
        return scores, tokens
