"""The reference client's two public calls on top of the streaming engine.

`EvoEmbeddingClient` mirrors `model/client.py` of the public reference (MiG-NJU/EvoEmbedding):

- `encode_messages(messages)`: messages are paired into turns *by position* (index 0 with 1,
  2 with 3, ...), whatever their roles, exactly as the reference's `_messages_to_turns` does;
  the memory is built from all history turns read in the client rendering
  ("User: ...\\nAssistant: ..." + end-of-text, also what the 16-turn / 2048-token segments
  count), and then every history turn text and the final message's stripped content (no
  instruction prefix) are embedded against the FINAL queue. Rows: history first, query last.
- `rerank(query, candidates, top_k, return_indices)`: every candidate is one user turn with an
  empty assistant reply, read in the trained ChatML rendering while advancing the memory and
  embedded against the memory as it stood before it (the per-turn-snapshot embeddings that
  `EvoEngine.step` emits); the stripped query with the instruction prefix is embedded against
  the final queue; candidates are ranked by cosine similarity, best first.

Both calls are one-shot: nothing is kept between calls (the streaming pipeline is what keeps
state). The memory is advanced with the same engine as the stream, so the numbers are the
streaming numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from schemas.turns import ChatMessage, TurnInput
from workers.engine import EngineConfig, EvoEngine
from workers.loading import LoadedModel, load_checkpoint
from workers.rendering import MemoryRendering, Renderer

_CID = "client"


@dataclass(frozen=True)
class _TextTurn:
    """A turn that is already its client-rendering text. The reference pairs messages by
    position and renders an unpaired trailing message as "User: <content>" even when that
    content is empty, which a `TurnInput` (roles, non-empty) cannot always express."""

    conversation_id: str
    seq: int
    text: str


class _ClientTextRenderer(Renderer):
    """Renderer whose client rendering of a `_TextTurn` is its text (+ end-of-text)."""

    def embedding_ids(self, turn: Any) -> list[int]:  # type: ignore[override]
        if isinstance(turn, _TextTurn):
            return self.text_ids(turn.text)
        return super().embedding_ids(turn)


def _content(msg: Any) -> str:
    if isinstance(msg, Mapping):
        return str(msg["content"])
    return str(msg.content)


def messages_to_turns(messages: Sequence[Any]) -> list[str]:
    """The reference client's pairing: message 2k is the first of a pair, 2k+1 the second
    (roles are not looked at); one side alone when the other is empty; an unpaired last
    message becomes "User: <content>"."""
    turns: list[str] = []
    for i in range(0, len(messages), 2):
        first = _content(messages[i])
        if i + 1 >= len(messages):
            turns.append(f"User: {first}")
            continue
        second = _content(messages[i + 1])
        if not first:
            turns.append(f"Assistant: {second}")
        elif not second:
            turns.append(f"User: {first}")
        else:
            turns.append(f"User: {first}\nAssistant: {second}")
    return turns


class EvoEmbeddingClient:
    """`EvoEmbeddingClient(checkpoint_dir_or_LoadedModel, device="cpu", dtype="float32")`."""

    def __init__(self, checkpoint: str | Path | LoadedModel, device: str = "cpu", dtype: str = "float32",
                 *, backbone_config: str | None = None, config: EngineConfig | None = None):
        lm = checkpoint if isinstance(checkpoint, LoadedModel) else load_checkpoint(
            checkpoint, device=device, dtype=dtype, backbone_config=backbone_config)
        base = config or EngineConfig()
        common = {"fingerprint": lm.fingerprint, "model_name": lm.model.config.base_model_name_or_path}
        # one model, two renderings of the memory: the client's text (encode_messages) and the
        # trained ChatML (rerank)
        self.client_engine = EvoEngine(lm.model, lm.tokenizer, config=EngineConfig(
            budget=base.budget, segment=base.segment, memory_rendering=MemoryRendering.CLIENT), **common)
        self.client_engine.renderer = _ClientTextRenderer(lm.tokenizer, MemoryRendering.CLIENT)
        self.chatml_engine = EvoEngine(lm.model, lm.tokenizer, config=EngineConfig(
            budget=base.budget, segment=base.segment, memory_rendering=MemoryRendering.CHATML), **common)
        self.loaded = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.embedding_dim = lm.model.config.embedding_dim

    # -- encode_messages -----------------------------------------------------------------------
    def encode_messages(self, messages: Sequence[Any]) -> np.ndarray:
        """[len(history turns) + 1, E] float32, L2-normalised: every history turn and the final
        message's content, all embedded against the memory built from the whole history."""
        if not messages:
            raise ValueError("encode_messages needs at least one message (the last one is the query)")
        history = messages_to_turns(list(messages[:-1]))
        query = _content(messages[-1]).strip()
        eng = self.client_engine
        state = eng.new_state()
        if history:
            states = {_CID: state}
            eng.step(states, [_TextTurn(_CID, i, t) for i, t in enumerate(history)], embed=False)  # type: ignore[list-item]
            state = states[_CID]
        texts = history + [query]
        return eng.embed_texts([(state, t) for t in texts]).astype(np.float32, copy=False)

    # -- rerank ----------------------------------------------------------------------------------
    def rerank(self, query: str, candidates: Iterable[Any], top_k: int | None = None,
               return_indices: bool = False) -> list[Any] | tuple[list[Any], list[int]]:
        cands = list(candidates)
        if not cands:
            return ([], []) if return_indices else []
        scores = self.rerank_scores(query, cands)
        k = len(cands) if top_k is None else max(0, min(int(top_k), len(cands)))
        order = np.argsort(-scores, kind="stable")[:k].tolist()
        ranked = [cands[i] for i in order]
        return (ranked, order) if return_indices else ranked

    def rerank_scores(self, query: str, candidates: Sequence[Any]) -> np.ndarray:
        """Cosine similarity of each candidate's per-turn-snapshot embedding with the query
        (instruction prefix, against the memory after all candidates)."""
        eng = self.chatml_engine
        # model_construct: the reference accepts any candidate, the empty string included
        turns = [
            TurnInput.model_construct(conversation_id=_CID, seq=i, messages=[
                ChatMessage(role="user", content=str(c)), ChatMessage(role="assistant", content="")])
            for i, c in enumerate(candidates)
        ]
        states = {_CID: eng.new_state()}
        outs = eng.step(states, turns, embed=True)
        keys = np.stack([o.embedding for o in outs]).astype(np.float32)
        q = eng.embed_queries([(states[_CID], str(query).strip())])[0].astype(np.float32)
        return keys @ q
