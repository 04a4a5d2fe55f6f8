"""How a turn or a query becomes token ids (MODEL_SPEC "Token conventions", "What a turn is").

Two renderings of a turn exist because the reference reads ChatML while advancing memory
(what the model was trained and evaluated on) but "User: ...\\nAssistant: ..." while embedding.
The reference client's `encode_messages` uses the embedding rendering for memory too; that
variant is kept (`MemoryRendering.CLIENT`) for parity with it.

Structure tokens are inserted by id; message content is encoded as plain text (see tokenizer).
"""

from __future__ import annotations

from enum import Enum

from schemas.turns import TurnInput
from workers.tokenizer import ENDOFTEXT, IM_END, IM_START, QwenTokenizer

QUERY_INSTRUCTION = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"


class MemoryRendering(str, Enum):
    CHATML = "chatml"   # trained rendering; streaming default
    CLIENT = "client"   # reference client's encode_messages variant


def embedding_text(user: str, assistant: str) -> str:
    """The reference client's pairing: one side alone when the other is empty."""
    if not user:
        return f"Assistant: {assistant}"
    if not assistant:
        return f"User: {user}"
    return f"User: {user}\nAssistant: {assistant}"


class Renderer:
    """Token ids for turns and queries under one tokenizer (ids resolved once)."""

    def __init__(self, tokenizer: QwenTokenizer, memory_rendering: MemoryRendering = MemoryRendering.CHATML):
        self.tok = tokenizer
        self.memory_rendering = MemoryRendering(memory_rendering)
        self.eot = tokenizer.special_id(ENDOFTEXT)
        self.im_start = tokenizer.special_id(IM_START)
        self.im_end = tokenizer.special_id(IM_END)
        self.newline = tokenizer.encode("\n")
        self.instruction = tokenizer.encode(QUERY_INSTRUCTION)

    def with_eot(self, ids: list[int]) -> list[int]:
        return ids if ids and ids[-1] == self.eot else ids + [self.eot]

    def text_ids(self, text: str) -> list[int]:
        """Any text as the reference embeds it: tokens then end-of-text."""
        return self.with_eot(self.tok.encode(text))

    def embedding_ids(self, turn: TurnInput) -> list[int]:
        return self.text_ids(embedding_text(turn.user, turn.assistant))

    def chatml_ids(self, turn: TurnInput) -> list[int]:
        ids: list[int] = []
        for m in turn.messages:
            ids.append(self.im_start)
            ids.extend(self.tok.encode(f"{m.role}\n{m.content}"))
            ids.append(self.im_end)
            ids.extend(self.newline)
        return ids

    def memory_ids(self, turn: TurnInput) -> list[int]:
        if self.memory_rendering is MemoryRendering.CHATML:
            return self.chatml_ids(turn)
        return self.embedding_ids(turn)

    def query_ids(self, query: str, instruction: bool = True) -> list[int]:
        """A query: instruction prefix (tokenised on its own, as the reference inserts fixed
        ids), the query text, end-of-text."""
        body = self.tok.encode(query)
        return self.with_eot((list(self.instruction) if instruction else []) + body)
