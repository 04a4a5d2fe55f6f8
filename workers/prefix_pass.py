"""A memory pass that starts from a cached segment prefix instead of position 0.

Why this exists: a turn's memory row is `snapshot, turn_1, queries, ..., turn_k, queries`, and
everything before `turn_k` is exactly the row the previous turn of the segment already ran.
Keeping what the backbone computed for that prefix lets a turn compute only its own tokens and
query slots (issue 10). What has to be kept per layer:

- full-attention layers (Qwen3, and every 4th Qwen3.5 layer): the keys and values of the prefix;
- Qwen3.5's linear-attention layers (gated delta rule): the recurrent state after the prefix and
  the last `kernel - 1` inputs of the short causal convolution that precedes it.

Why not transformers' own cache classes (DynamicCache with its linear-attention layers): they
hold one length per batch, so prefixes of different lengths cannot share a pass, and, more
importantly, continuing Qwen3.5's chunked gated-delta kernel from a cached state restarts its
64-position chunk grid at the cache point. The kernel's float32 rounding depends on where the
chunks fall (cumulative sums of the decay gates), so a continuation rounds differently from a
pass over the whole row: on the seeded tiny Qwen3.5 checkpoint, 300 positions continued from a
DynamicCache at position 100 differ from one pass by 3.6e-4 in the last hidden state, continued
at 128 (on the grid) by 1.5e-5 (test_prefix_cache.py::test_why_qwen35_prefixes_end_on_the_chunk_grid). Here the
Qwen3.5 prefix is therefore kept only up to the last multiple of 64 (`PrefixPass.align`), the few
positions after it are recomputed, and the kernel is called one chunk at a time, so every chunk
is the very chunk an uncached pass computes, from the same state. Qwen3 has no such layers and
keeps its prefix to the last position (align 1).

Batching: each row brings its own prefix (any length, including none). Keys/values of the
prefixes are laid side by side, padded to the longest, and a boolean mask hides the padding and
keeps the new positions causal; new positions are right-padded (padding after a row's end is never
seen by its real positions, see runner.py). The linear-attention states are per row, so they
batch without padding, and the state to keep is read at each row's own chunk boundary.

The layer loop below calls the backbone's own modules (norms, projections with their LoRA
adapters, rotary embedding, attention module, MLP); only the token mixing of the linear-attention
layer is driven here, through transformers' own chunk kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from workers.evo_model import EvoEmbeddingModel

CHUNK = 64
"""Chunk size of transformers' `torch_chunk_gated_delta_rule` (its default, which Qwen3.5 uses)."""


@dataclass
class PrefixState:
    """What the backbone computed for the first `length` positions of one memory row."""

    length: int
    keys: dict[int, torch.Tensor] = field(default_factory=dict)       # layer -> (kv_heads, length, head_dim)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    conv: dict[int, torch.Tensor] = field(default_factory=dict)       # layer -> (conv_dim, kernel - 1)
    recurrent: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (v_heads, k_dim, v_dim)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for d in (self.keys, self.values, self.conv, self.recurrent) for t in d.values())


class _KVShim:
    """Stands in for a transformers Cache inside the attention modules: `update` is the only call
    they make; it returns the cached keys/values followed by the new ones and records the new."""

    def __init__(self) -> None:
        self.past: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        self.new[layer_idx] = (key, value)
        past = self.past.get(layer_idx)
        if past is None:
            return key, value
        return torch.cat([past[0], key], dim=2), torch.cat([past[1], value], dim=2)


def _chunk_kernel():
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m

    return m.torch_chunk_gated_delta_rule


class PrefixPass:
    def __init__(self, model: EvoEmbeddingModel):
        self.model = model
        self.backbone = model.backbone
        types = model.config.backbone.get("layer_types") or getattr(self.backbone.config, "layer_types", None)
        n = len(self.backbone.layers)
        self.kinds = [("linear" if types and types[i] == "linear_attention" else "full") for i in range(n)]
        self.is_qwen35 = model.config.model_type.startswith("qwen3_5")
        self.align = CHUNK if "linear" in self.kinds else 1

    def keep_point(self, end: int) -> int:
        """Where a row ending at `end` keeps its prefix for the next turn (see module docstring)."""
        return end // self.align * self.align

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, embeds: torch.Tensor, lengths: list[int], prefixes: list[PrefixState | None],
            keep: list[int] | None, adapter: str = "memory_generator") -> tuple[torch.Tensor, list[PrefixState]]:
        """See `_run`; runs with the LoRA `adapter` active (the memory generator's by default).
        `keep=None`: nothing is kept (a query or a turn embedding reads a prefix, keeps none)."""
        self.model.switch.active = adapter
        try:
            return self._run(embeds, lengths, prefixes, keep)
        finally:
            self.model.switch.active = None

    def _run(self, embeds: torch.Tensor, lengths: list[int], prefixes: list[PrefixState | None],
             keep: list[int] | None) -> tuple[torch.Tensor, list[PrefixState]]:
        """Last-layer hidden states (B, n, H) of the new positions of each row, and each row's
        prefix state at absolute position `keep[r]` (prefix length <= keep[r] <= prefix + lengths[r]).

        `embeds` (B, n, H): row r's input embeddings from its prefix end on, right-padded;
        `lengths[r]` of them are real."""
        B, n, _ = embeds.shape
        dev = embeds.device
        starts = [0 if p is None else p.length for p in prefixes]
        for r in range(B if keep is not None else 0):
            if not starts[r] <= keep[r] <= starts[r] + lengths[r]:
                raise ValueError(f"row {r}: keep point {keep[r]} outside [{starts[r]}, {starts[r] + lengths[r]}]")
            if self.align > 1 and (starts[r] % self.align or keep[r] % self.align):
                raise ValueError(f"row {r}: prefix {starts[r]} / keep {keep[r]} not on the {self.align}-position grid")
        pos = torch.tensor(starts, device=dev)[:, None] + torch.arange(n, device=dev)[None, :]
        pmax = max(starts)
        shim = _KVShim()
        mask = None
        if pmax:
            # key j (padded prefix slots first, then the n new ones) is visible to new position t of row r
            # when it is a real prefix slot of r, or a new position <= t
            j = torch.arange(pmax + n, device=dev)
            t = torch.arange(n, device=dev)
            real_prefix = j[None, :] < torch.tensor(starts, device=dev)[:, None]          # (B, pmax+n)
            causal_new = (j[None, :] >= pmax) & (j[None, :] - pmax <= t[:, None])       # (n, pmax+n)
            mask = (real_prefix[:, None, :] | causal_new[None, :, :])[:, None, :, :]     # (B, 1, n, pmax+n)

        bb = self.backbone
        x = embeds
        if self.is_qwen35:
            rope_pos = pos[None].expand(3, B, n)
        else:
            rope_pos = pos
        pos_emb = bb.rotary_emb(x, rope_pos)
        out_states = [PrefixState(length=k) for k in keep] if keep is not None else []
        for i, layer in enumerate(bb.layers[: bb.config.num_hidden_layers]):
            residual = x
            h = layer.input_layernorm(x)
            if self.kinds[i] == "linear":
                h = self._linear_mixer(layer.linear_attn, i, h, prefixes, starts, keep, out_states)
            else:
                if pmax:
                    shim.past[i] = self._padded_kv(i, prefixes, pmax, h.dtype, dev)
                h, _ = layer.self_attn(hidden_states=h, position_embeddings=pos_emb, attention_mask=mask,
                                       past_key_values=shim, position_ids=pos)
                k_new, v_new = shim.new.pop(i)
                shim.past.pop(i, None)
                for r, st in enumerate(out_states):
                    assert keep is not None
                    take = keep[r] - starts[r]
                    p = prefixes[r]
                    parts_k = ([p.keys[i]] if p is not None and p.length else []) + [k_new[r, :, :take]]
                    parts_v = ([p.values[i]] if p is not None and p.length else []) + [v_new[r, :, :take]]
                    st.keys[i] = torch.cat(parts_k, dim=1).contiguous()
                    st.values[i] = torch.cat(parts_v, dim=1).contiguous()
            x = residual + h
            residual = x
            x = residual + layer.mlp(layer.post_attention_layernorm(x))
        return bb.norm(x), out_states

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _padded_kv(layer: int, prefixes: list[PrefixState | None], pmax: int, dtype: torch.dtype,
                   dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ref = next(p for p in prefixes if p is not None and p.length)
        if len(prefixes) == 1:  # one row (a lone query): its prefix as it is, no padded copy
            return ref.keys[layer][None], ref.values[layer][None]
        kvh, _, hd = ref.keys[layer].shape
        k = torch.zeros(len(prefixes), kvh, pmax, hd, dtype=dtype, device=dev)
        v = torch.zeros_like(k)
        for r, p in enumerate(prefixes):
            if p is not None and p.length:
                k[r, :, : p.length] = p.keys[layer]
                v[r, :, : p.length] = p.values[layer]
        return k, v

    def _linear_mixer(self, mod, layer: int, h: torch.Tensor, prefixes: list[PrefixState | None],
                      starts: list[int], keep: list[int] | None, out_states: list[PrefixState]) -> torch.Tensor:
        """Qwen3.5's gated-delta-net token mixer, continued from each row's cached state; the same
        projections, convolution and chunk kernel as transformers' forward (no padding mask: rows
        are right-padded, see module docstring)."""
        B, n, _ = h.shape
        width = mod.conv_kernel_size - 1
        qkv = mod.in_proj_qkv(h).transpose(1, 2)                    # (B, conv_dim, n)
        z = mod.in_proj_z(h).reshape(B, n, -1, mod.head_v_dim)
        b = mod.in_proj_b(h)
        a = mod.in_proj_a(h)
        prev = torch.zeros(B, qkv.shape[1], width, dtype=qkv.dtype, device=qkv.device)
        init = None
        if any(p is not None and p.length for p in prefixes):
            shape = next(p.recurrent[layer].shape for p in prefixes if p is not None and p.length)
            init = torch.zeros((B, *shape), dtype=torch.float32, device=h.device)
            for r, p in enumerate(prefixes):
                if p is not None and p.length:
                    prev[r] = p.conv[layer]
                    init[r] = p.recurrent[layer]
        # conv inputs from position start - width, laid out (B, T, C) like transformers' own call
        # (a transposed projection): the convolution's rounding depends on the memory layout
        full = torch.cat([prev.transpose(1, 2), qkv.transpose(1, 2)], dim=1).transpose(1, 2)
        weight = mod.conv1d.weight.squeeze(1)
        # padded like transformers' call (the padded outputs are dropped): same kernel, same rounding
        mixed = F.conv1d(full.to(weight.dtype), weight.unsqueeze(1), mod.conv1d.bias, padding=width,
                         groups=full.shape[1])[:, :, width: width + n]
        mixed = _act(mod.activation, mixed).to(h.dtype)
        mixed = mixed.transpose(1, 2)
        q, k, v = torch.split(mixed, [mod.key_dim, mod.key_dim, mod.value_dim], dim=-1)
        q = q.reshape(B, n, -1, mod.head_k_dim)
        k = k.reshape(B, n, -1, mod.head_k_dim)
        v = v.reshape(B, n, -1, mod.head_v_dim)
        beta = b.sigmoid()
        g = -mod.A_log.float().exp() * F.softplus(a.float() + mod.dt_bias)
        rep = mod.num_v_heads // mod.num_k_heads
        if rep > 1:
            q = q.repeat_interleave(rep, dim=2)
            k = k.repeat_interleave(rep, dim=2)
        kernel = _chunk_kernel()
        # one kernel call per chunk where a state inside the row is kept: each is exactly the chunk an
        # uncached pass computes (module doc)
        outs = []
        state = init
        want = {r: keep[r] - starts[r] for r in range(B)} if keep is not None else {}
        for r in want:
            if want[r] == 0:
                out_states[r].recurrent[layer] = (init[r].clone() if init is not None
                                                  else _zero_state(mod, h.device))
        # one call for the whole row when no state is wanted inside it (a query or a turn embedding,
        # and a ready pass that keeps its end): the kernel runs the same chunks from the same state
        # either way (measured bit-identical), with less per-call overhead
        whole = all(w in (0, n) for w in want.values())
        for c0 in range(0, n, max(1, n) if whole else CHUNK):
            c1 = n if whole else min(n, c0 + CHUNK)
            o, state = kernel(q[:, c0:c1], k[:, c0:c1], v[:, c0:c1], g=g[:, c0:c1], beta=beta[:, c0:c1],
                              initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
            outs.append(o)
            for r in want:
                if want[r] == c1 and want[r] and c1 % CHUNK == 0:
                    out_states[r].recurrent[layer] = state[r].clone()
        for r in want:
            assert keep is not None
            if layer not in out_states[r].recurrent:  # keep points are on the grid, so this cannot happen
                raise AssertionError(f"row {r}: no recurrent state captured at {keep[r]}")
            at = keep[r] - starts[r]                  # conv inputs before the keep point: full[at : at + width]
            out_states[r].conv[layer] = full[r, :, at: at + width].clone()
        core = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        core = mod.norm(core.reshape(-1, mod.head_v_dim), z.reshape(-1, mod.head_v_dim))
        return mod.out_proj(core.reshape(B, n, -1))


def _zero_state(mod, device: torch.device) -> torch.Tensor:
    return torch.zeros(mod.num_v_heads, mod.head_k_dim, mod.head_v_dim, dtype=torch.float32, device=device)


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    from transformers.activations import ACT2FN

    return ACT2FN[name](x)
