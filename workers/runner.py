"""How a pass runs (the "model runner" half): rows -> padded tensors on the device -> outputs.

A row is a memory prefix (latents, fed through `mem_to_latent`) followed by pieces of token
ids, each optionally followed by the `num_latents` learned memory-query slots.

Padding: the reference left-pads with an attention mask and restarts position ids after the
padding. Two layouts give the same numbers for the real positions (up to float rounding):
- `left`: the reference's layout (mask + cumsum position ids);
- `right`: rows start at column 0, padding goes at the end and no mask is passed at all. Under
  causal attention (and the causal recurrences of Qwen3.5's linear-attention layers) a real
  position never sees a later one, so padding after the row cannot reach it. Without a mask
  the attention kernels take their fused causal path; on CPU the masked path made batching
  slower than running rows one by one. We read each row's outputs at its own length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workers.evo_model import EvoEmbeddingModel


@dataclass
class Row:
    prefix: torch.Tensor | None              # (n, H) memory latents, any device
    pieces: list[list[int]]                  # token id runs
    queries_after: list[bool] = field(default_factory=list)  # memory queries after piece i

    def length(self, num_latents: int) -> int:
        n = 0 if self.prefix is None else int(self.prefix.shape[0])
        return n + sum(len(p) for p in self.pieces) + num_latents * sum(self.queries_after)


class ModelRunner:
    def __init__(self, model: EvoEmbeddingModel, padding: str = "right"):
        if padding not in ("left", "right"):
            raise ValueError("padding must be 'left' or 'right'")
        self.model = model
        self.L = model.config.num_latents
        self.padding = padding

    def _build(self, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        m = self.model
        dev, dt = m.device, m.dtype
        H = m.config.hidden_size
        # one embedding lookup and one mem_to_latent for the whole pass
        all_ids = [t for r in rows for p in r.pieces for t in p]
        tok_emb = m.embed_ids(torch.tensor(all_ids, device=dev, dtype=torch.long)) if all_ids else None
        prefixes = [r.prefix for r in rows if r.prefix is not None and r.prefix.shape[0]]
        lat_in = m.mem_to_latent(torch.cat([p.to(dev, dt) for p in prefixes], 0)) if prefixes else None
        queries = m.memory_queries[0]
        seqs: list[torch.Tensor] = []
        t_off = l_off = 0
        for r in rows:
            parts: list[torch.Tensor] = []
            if r.prefix is not None and r.prefix.shape[0]:
                n = r.prefix.shape[0]
                parts.append(lat_in[l_off : l_off + n])  # type: ignore[index]
                l_off += n
            for i, piece in enumerate(r.pieces):
                parts.append(tok_emb[t_off : t_off + len(piece)])  # type: ignore[index]
                t_off += len(piece)
                if i < len(r.queries_after) and r.queries_after[i]:
                    parts.append(queries)
            seqs.append(torch.cat(parts, 0) if parts else torch.empty(0, H, device=dev, dtype=dt))
        T = max(s.shape[0] for s in seqs)
        lengths = [s.shape[0] for s in seqs]
        embeds = torch.zeros(len(rows), T, H, device=dev, dtype=dt)
        if self.padding == "right" or len(set(lengths)) == 1:
            for i, s in enumerate(seqs):
                embeds[i, : s.shape[0]] = s
            return embeds, None, lengths
        mask = torch.zeros(len(rows), T, device=dev, dtype=torch.long)
        for i, s in enumerate(seqs):
            embeds[i, T - s.shape[0]:] = s
            mask[i, T - s.shape[0]:] = 1
        return embeds, mask, [T] * len(rows)

    def _slice(self, row: Row, start: int) -> torch.Tensor:
        """Input embeddings of `row` from position `start` to its end: only the pieces that reach
        past `start` are looked up (a cached segment prefix is not rebuilt, see prefix_pass.py)."""
        m = self.model
        dev, dt = m.device, m.dtype
        parts: list[torch.Tensor] = []
        off = 0
        n = 0 if row.prefix is None else int(row.prefix.shape[0])
        if n and start < n:
            parts.append(m.mem_to_latent(row.prefix[start:].to(dev, dt)))
        off = n
        for i, piece in enumerate(row.pieces):
            end = off + len(piece)
            if end > start and piece:
                ids = piece[max(0, start - off):]
                parts.append(m.embed_ids(torch.tensor(ids, device=dev, dtype=torch.long)))
            off = end
            if i < len(row.queries_after) and row.queries_after[i]:
                end = off + self.L
                if end > start:
                    parts.append(m.memory_queries[0][max(0, start - off):])
                off = end
        if not parts:
            return torch.empty(0, m.config.hidden_size, device=dev, dtype=dt)
        return torch.cat(parts, 0)

    def padded_from(self, rows: list[Row], starts: list[int]) -> tuple[torch.Tensor, list[int]]:
        """(B, n, H) right-padded embeddings of each row from its start position, and real lengths."""
        m = self.model
        seqs = [self._slice(r, s) for r, s in zip(rows, starts)]
        lengths = [int(s.shape[0]) for s in seqs]
        embeds = torch.zeros(len(rows), max(lengths), m.config.hidden_size, device=m.device, dtype=m.dtype)
        for i, s in enumerate(seqs):
            embeds[i, : s.shape[0]] = s
        return embeds, lengths

    @torch.no_grad()
    def memory_latents(self, rows: list[Row]) -> torch.Tensor:
        """(B, L, H) new memory latents: `latent_to_mem` of the hidden states at each row's
        last query block (which ends every memory row)."""
        embeds, mask, ends = self._build(rows)
        hidden = self.model.run(embeds, mask, "memory_generator")
        idx = torch.tensor(ends, device=hidden.device)[:, None] - self.L + torch.arange(self.L, device=hidden.device)
        picked = hidden.gather(1, idx[:, :, None].expand(-1, -1, hidden.shape[-1]))
        return self.model.latent_to_mem(picked)

    @torch.no_grad()
    def embeddings(self, rows: list[Row]) -> torch.Tensor:
        """(B, E) normalised float32 embeddings pooled at each row's last token."""
        embeds, mask, ends = self._build(rows)
        hidden = self.model.run(embeds, mask, "retriever")
        last = hidden[torch.arange(len(rows), device=hidden.device), torch.tensor(ends, device=hidden.device) - 1]
        return self.model.pool_embedding(last)
