"""The offline oracle: a whole conversation processed the way the reference code does it.

Written deliberately apart from the engine (no runner, no scheduler, no state deltas): it
groups the conversation into segments up front, runs one forward pass per segment over
[mem_to_latent(queue at segment start), turn, queries, turn, queries, ...], keeps the raw
latent buffer, and embeds every turn against the last `capacity` latents appended before it,
in left-padded retriever batches of at most 2048 padded tokens. Tests compare the streaming
engine against this; it is also the "re-read the whole history" baseline of the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.evo_model import EvoEmbeddingModel
from workers.state import ConversationState


@dataclass
class ReferenceResult:
    embeddings: np.ndarray          # [N, E] per-turn-snapshot embeddings
    raw_buffer: torch.Tensor        # all latents ever appended, (N*L, H)
    buffer_end: list[int]           # raw buffer length before each turn (and after the last)
    segments: list[list[int]]       # turn indices of each segment
    final_state: ConversationState  # the streaming state the engine should end in


def group_segments(turn_lengths: list[int], max_turns: int = 16, max_tokens: int = 2048) -> list[list[int]]:
    segs: list[list[int]] = []
    t = 0
    while t < len(turn_lengths):
        size = acc = 0
        for i in range(t, len(turn_lengths)):
            if size > 0 and acc + turn_lengths[i] > max_tokens:
                break
            acc += turn_lengths[i]
            size += 1
            if size >= max_turns:
                break
        segs.append(list(range(t, t + size)))
        t += size
    return segs


@torch.no_grad()
def build_memory(model: EvoEmbeddingModel, memory_ids: list[list[int]], *, max_turns: int = 16,
                 max_tokens: int = 2048) -> tuple[torch.Tensor | None, list[int], list[list[int]]]:
    dev, L, C = model.device, model.config.num_latents, model.config.buffer_capacity
    raw: torch.Tensor | None = None
    current: torch.Tensor | None = None
    ends: list[int] = []
    segs = group_segments([len(x) for x in memory_ids], max_turns, max_tokens)
    for seg in segs:
        parts, query_pos, off = [], [], 0
        if current is not None:
            parts.append(model.mem_to_latent(current))
            off += current.shape[1]
        for i in seg:
            parts.append(model.embed_ids(torch.tensor([memory_ids[i]], device=dev)))
            off += len(memory_ids[i])
            parts.append(model.memory_queries)
            query_pos.append(off)
            off += L
        seq = torch.cat(parts, dim=1)
        hidden = model.run(seq, torch.ones(seq.shape[:2], dtype=torch.long, device=dev), "memory_generator")
        for p in query_pos:
            new = model.latent_to_mem(hidden[:, p : p + L, :])
            ends.append(0 if raw is None else raw.shape[1])
            raw = new if raw is None else torch.cat([raw, new], dim=1)
            current = raw[:, -C:, :]
    ends.append(0 if raw is None else raw.shape[1])
    return (None if raw is None else raw[0]), ends, segs


@torch.no_grad()
def embed_against(model: EvoEmbeddingModel, token_ids: list[list[int]], windows: list[torch.Tensor | None],
                  max_batch_tokens: int = 2048) -> np.ndarray:
    """Each text embedded against its own memory window, in the reference's padded batches."""
    dev, H = model.device, model.config.hidden_size
    seqs = []
    for ids, win in zip(token_ids, windows):
        t = model.embed_ids(torch.tensor([ids], device=dev))[0]
        seqs.append(torch.cat([model.mem_to_latent(win.unsqueeze(0))[0], t]) if win is not None and win.shape[0] else t)
    out, i = [], 0
    while i < len(seqs):
        batch, longest = [], 0
        while i < len(seqs):
            new_longest = max(longest, seqs[i].shape[0])
            if batch and (len(batch) + 1) * new_longest > max_batch_tokens:
                break
            batch.append(seqs[i])
            longest = new_longest
            i += 1
        emb = torch.stack([torch.cat([torch.zeros(longest - s.shape[0], H, device=dev, dtype=s.dtype), s]) for s in batch])
        mask = torch.stack([torch.cat([torch.zeros(longest - s.shape[0], device=dev), torch.ones(s.shape[0], device=dev)]) for s in batch]).long()
        hidden = model.run(emb, mask, "retriever")
        out.append(model.pool_embedding(hidden[:, -1, :]).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.config.embedding_dim), np.float32)


def run_conversation(model: EvoEmbeddingModel, memory_ids: list[list[int]], embedding_ids: list[list[int]],
                     seqs: list[int] | None = None, *, max_turns: int = 16, max_tokens: int = 2048) -> ReferenceResult:
    C, H = model.config.buffer_capacity, model.config.hidden_size
    raw, ends, segs = build_memory(model, memory_ids, max_turns=max_turns, max_tokens=max_tokens)
    windows = [None if e == 0 else raw[max(0, e - C) : e] for e in ends[:-1]]  # type: ignore[index]
    emb = embed_against(model, embedding_ids, windows)
    # the streaming state after the last turn: snapshot of the last segment + its latents
    state = ConversationState(hidden_size=H, capacity=C, dtype=model.dtype)
    if segs:
        last = segs[-1]
        start = ends[last[0]]
        snap = raw[max(0, start - C) : start]  # type: ignore[index]
        state.latents = torch.cat([snap, raw[start:]]).cpu().clone()  # type: ignore[index]
        state.snapshot_len = snap.shape[0]
        state.segment_token_ids = [list(memory_ids[i]) for i in last]
        state.seq = (seqs[-1] if seqs else len(memory_ids) - 1)
    return ReferenceResult(emb, raw if raw is not None else torch.empty(0, H), ends, segs, state)
