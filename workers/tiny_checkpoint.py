"""Seeded tiny EvoEmbedding checkpoints in the released layout.

No model hub is reachable from development or CI machines, so tests, benchmarks and the
embedded demo run on checkpoints we generate: same file layout and key names as the released
ones (so the real loader is exercised), the real Qwen3 / Qwen3.5 tokenizer and full
vocabulary, random weights from a fixed seed, and a small hidden size.
Write one to a directory with `evostream make-tiny-checkpoint DIR` (stream/cli/core.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from workers.evo_model import EvoConfig, EvoEmbeddingModel
from workers.tokenizer import VOCABS, cache_dir, load_qwen_tokenizer

SIZES: dict[str, dict[str, int]] = {
    # hidden, layers, heads, kv heads, head dim, mlp
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=768),
    # the GPU benchmark size of issue 2: hidden 1024, 24 layers
    "bench1024": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8, head_dim=64, intermediate_size=3072),
    # shaped like the released Qwen3.5-0.8B text backbone (issue 10's realistic-size figures): hidden
    # 1024, 24 layers (3 linear-attention : 1 full-attention), 8 query / 2 kv heads of 256, gated
    # delta net with 16 key and 16 value heads of 128, MLP 3584. Random weights: for timing, cache
    # sizes and dtype drift only. Dimensions as we read them from that model's published config.json;
    # this machine cannot fetch it to check.
    "qwen35_08b": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                       intermediate_size=3584, linear_num_key_heads=16, linear_num_value_heads=16,
                       linear_key_head_dim=128, linear_value_head_dim=128),
}
_LINEAR_KEYS = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim")


def backbone_config(family: str, size: str = "tiny", vocab_size: int | None = None) -> dict[str, Any]:
    tok = load_qwen_tokenizer(family)
    dims = dict(SIZES[size])
    linear = {k: dims.pop(k) for k in _LINEAR_KEYS if k in dims}
    cfg: dict[str, Any] = dict(
        vocab_size=vocab_size or _round_up(tok.vocab_size, 64),
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        **dims,
    )
    if family == "qwen3":
        if linear:
            raise ValueError(f"size {size!r} is a qwen3_5 shape")
        cfg.update(model_type="qwen3", rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    else:
        hd = dims["head_dim"]
        cfg.update(
            model_type="qwen3_5_text",
            linear_key_head_dim=hd, linear_value_head_dim=hd,
            linear_num_key_heads=max(1, dims["num_attention_heads"] // 2),
            linear_num_value_heads=dims["num_attention_heads"],
            rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},
        )
        cfg.update(linear)
    return cfg


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def build_tiny_model(
    family: str = "qwen3", size: str = "tiny", *, seed: int = 0, num_latents: int = 16,
    buffer_capacity: int = 512, lora_r: int = 8, lora_alpha: int = 16, embedding_dim: int = 1024,
) -> EvoEmbeddingModel:
    if family not in VOCABS:
        raise ValueError(f"family must be one of {sorted(VOCABS)}")
    cfg = EvoConfig(
        base_model_name_or_path=f"evostream/tiny-{family}-{size}",
        backbone=backbone_config(family, size),
        num_latents=num_latents, buffer_capacity=buffer_capacity, lora_r=lora_r,
        lora_alpha=lora_alpha, embedding_dim=embedding_dim, tokenizer_family=family,
        extra={"evostream_tiny": {"seed": seed, "size": size}},
    )
    gen = torch.Generator().manual_seed(seed)
    model = EvoEmbeddingModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("A_log"):
                p.copy_(torch.log(torch.empty(p.shape).uniform_(1, 16, generator=gen)))
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                fan_in = p.shape[1] if p.dim() == 2 else p[0].numel()
                std = 0.02 if "embed_tokens" in name else fan_in ** -0.5
                if ".lora_B." in name:
                    std *= 0.5  # nonzero so the two adapters really differ
                p.copy_(std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        model.memory_queries.copy_(0.02 * torch.randn(model.memory_queries.shape, generator=gen))
    return model


def make_tiny_checkpoint(out_dir: str | Path, family: str = "qwen3", size: str = "tiny", *, seed: int = 0,
                         with_tokenizer: bool = True, **kwargs: Any) -> Path:
    out = Path(out_dir)
    model = build_tiny_model(family, size, seed=seed, **kwargs)
    tok = load_qwen_tokenizer(family) if with_tokenizer else None
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, tokenizer=tok)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def cached_tiny_checkpoint(family: str = "qwen3", size: str = "tiny", seed: int = 0, **kwargs: Any) -> Path:
    """A generated checkpoint under the cache dir, made once per (family, size, seed, options)."""
    tag = "-".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
    out = cache_dir() / "checkpoints" / f"tiny-{family}-{size}-s{seed}{('-' + tag) if tag else ''}"
    if not (out / "config.json").is_file() or not (out / "model.safetensors").is_file():
        make_tiny_checkpoint(out, family, size, seed=seed, **kwargs)
    return out
