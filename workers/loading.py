"""Loading EvoEmbedding model weights: a directory in the released layout, or a hub id resolved
through the local hub cache, into an `EvoEmbeddingModel` (workers/evo_model.py) and its tokenizer.

Why a module of its own: the model reads in one sitting without the ~200 lines of checks that
loading needs. The released layout is a transformers save of the reference wrapper: `config.json`
with model_type "EvoRAG" and safetensors keys `model.base_model.model.<backbone>...` with
`.base_layer.weight` / `.lora_A.<adapter>.weight` / `.lora_B.<adapter>.weight` on adapted
projections, plus `memory_queries`, `latent_to_mem.0.*`, `mem_to_latent.0.*`, `mem_to_emb.{0,2}.*`
and optionally `emb_model.*` (ignored: only the "native" evaluation mode uses it). Every way a
directory can fail to be such a model raises `ModelLoadError` saying what is wrong (missing or
unexpected weights, shapes, adapters, a tokenizer of another vocabulary, a backbone config that
is not available offline).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.evo_model import (ADAPTERS, HEAD_PREFIXES, PEFT_PREFIX, EvoConfig, EvoEmbeddingModel, parse_dtype)
from workers.tokenizer import MODEL_TYPE_TO_VOCAB, QwenTokenizer, TokenizerError, load_qwen_tokenizer, load_tokenizer_file


class ModelLoadError(ValueError):
    """A model directory (or hub id) that cannot be loaded as an EvoEmbedding model; says what is wrong.
    (Named for the model's weights: "checkpoint" is a conversation's memory state in Redis.)"""


def _backbone_config_from(cfg: dict[str, Any], ckpt_dir: Path, override: str | None) -> dict[str, Any]:
    """Where the backbone architecture comes from, in order: an explicit override path, the
    `backbone_config` our own saves embed, a local directory named by base_model_name_or_path.
    The released checkpoints only name a hub id, and no hub is reachable, so we say so."""
    from workers.model_source import ModelNotAvailable, backbone_config_from_hub, is_hub_id

    src: dict[str, Any] | None = None
    if override and is_hub_id(override):  # EVOSTREAM_BACKBONE_CONFIG=Qwen/Qwen3-0.6B
        try:
            src = backbone_config_from_hub(override)
        except ModelNotAvailable as exc:
            raise ModelLoadError(str(exc)) from exc
    elif override:
        p = Path(override).expanduser()
        src = json.loads((p / "config.json" if p.is_dir() else p).read_text())
    elif "backbone_config" in cfg:
        src = cfg["backbone_config"]
    else:
        base = cfg.get("base_model_name_or_path", "")
        for cand in (Path(base), ckpt_dir / base, ckpt_dir / "backbone"):
            if (cand / "config.json").is_file():
                src = json.loads((cand / "config.json").read_text())
                break
        hub_error = ""
        if src is None and is_hub_id(base):  # the released layout: the backbone named by hub id
            try:
                src = backbone_config_from_hub(base)
            except ModelNotAvailable as exc:
                hub_error = f" ({exc})"
        if src is None:
            raise ModelLoadError(
                f"{ckpt_dir}/config.json names backbone {base!r}, whose config is not available offline{hub_error}: "
                "set EVOSTREAM_BACKBONE_CONFIG to the base model's config.json (or its hub id), or put "
                f"that config.json in {ckpt_dir}/backbone/"
            )
    if "text_config" in src and "hidden_size" not in src:  # multimodal Qwen3.5 wrapper config
        text = dict(src["text_config"])
        text.setdefault("model_type", "qwen3_5_text")
        src = text
    if src.get("model_type") not in MODEL_TYPE_TO_VOCAB:
        raise ModelLoadError(
            f"backbone model_type {src.get('model_type')!r} is not supported; supported: {sorted(MODEL_TYPE_TO_VOCAB)}"
        )
    return src


def _map_key(key: str) -> tuple[str, str] | None:
    """Checkpoint key -> (part, key inside that part); None for keys we deliberately skip."""
    if key.startswith("emb_model."):
        return None
    if key == "memory_queries" or key.startswith(HEAD_PREFIXES):
        return ("heads", key)
    if not key.startswith(PEFT_PREFIX):
        return ("unknown", key)
    k = key[len(PEFT_PREFIX):]
    if k.startswith("lm_head.") or k.startswith("mtp.") or k.startswith("model.visual."):
        return None
    for p in ("model.language_model.", "model."):
        if k.startswith(p):
            k = k[len(p):]
            break
    return ("backbone", k)


def _read_safetensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors in {ckpt}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def checkpoint_fingerprint(ckpt: Path) -> str:
    """Identifies a checkpoint cheaply but robustly: config, every safetensors header (names,
    shapes, dtypes, offsets) and 16 sampled 64 KiB windows of each weight file. Stored with
    every conversation state so that memory written by one model is never continued by another."""
    h = hashlib.sha256()
    h.update((ckpt / "config.json").read_bytes())
    for f in sorted(ckpt.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, 1 << 26)))
            for i in range(16):
                fh.seek(size * i // 16)
                h.update(fh.read(1 << 16))
        h.update(str(size).encode())
    return h.hexdigest()[:16]


@dataclass
class LoadedModel:
    model: EvoEmbeddingModel
    tokenizer: QwenTokenizer
    fingerprint: str
    path: Path


def load_checkpoint(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    backbone_config: str | None = None,
    tokenizer_path: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Load an EvoEmbedding checkpoint (reference layout) for inference: a directory, or a hub
    id resolved through the hub cache (workers/model_source.py)."""
    from workers.model_source import ModelNotAvailable, resolve_checkpoint_dir

    try:
        ckpt = resolve_checkpoint_dir(str(path), revision) if not isinstance(path, Path) else path
    except ModelNotAvailable as exc:
        raise ModelLoadError(str(exc)) from exc
    if not (ckpt / "config.json").is_file():
        raise ModelLoadError(f"{ckpt} is not a checkpoint directory (no config.json)")
    raw = json.loads((ckpt / "config.json").read_text())
    if raw.get("model_type") != "EvoRAG":
        raise ModelLoadError(f"{ckpt}/config.json has model_type {raw.get('model_type')!r}, expected 'EvoRAG'")
    backbone = _backbone_config_from(raw, ckpt, backbone_config)
    weights = _read_safetensors(ckpt)

    parts: dict[str, dict[str, torch.Tensor]] = {"backbone": {}, "heads": {}, "unknown": {}}
    for k, v in weights.items():
        mapped = _map_key(k)
        if mapped is not None:
            parts[mapped[0]][mapped[1]] = v
    if parts["unknown"]:
        raise ModelLoadError(f"unexpected keys in {ckpt}: {sorted(parts['unknown'])[:5]} ...")

    # which projections carry adapters, and with which names / rank, is read off the weights
    lora_keys = [k for k in parts["backbone"] if ".lora_A." in k or ".lora_B." in k]
    if not lora_keys:
        raise ModelLoadError(f"{ckpt} has no LoRA adapter weights (expected {ADAPTERS})")
    found_adapters = {k.split(".lora_")[1].split(".")[1] for k in lora_keys}
    missing_adapters = set(ADAPTERS) - found_adapters
    if missing_adapters:
        raise ModelLoadError(f"{ckpt} lacks LoRA adapter(s) {sorted(missing_adapters)}; found {sorted(found_adapters)}")
    lora_modules = {k.split(".lora_")[0] for k in lora_keys}
    r = parts["backbone"][next(k for k in lora_keys if ".lora_A." in k)].shape[0]
    if r != raw.get("lora_r", r):
        raise ModelLoadError(f"LoRA rank in weights is {r} but config.json says lora_r={raw.get('lora_r')}")

    emb_dim = int(raw.get("embedding_dim") or parts["heads"].get("mem_to_emb.2.weight", torch.empty(1024, 0)).shape[0])
    family = raw.get("tokenizer_family") or MODEL_TYPE_TO_VOCAB[backbone["model_type"]]
    cfg = EvoConfig(
        base_model_name_or_path=raw.get("base_model_name_or_path", ""),
        backbone=backbone,
        num_latents=int(raw.get("num_latents", 16)),
        buffer_capacity=int(raw.get("buffer_capacity", 512)),
        lora_r=int(raw.get("lora_r", r)),
        lora_alpha=int(raw.get("lora_alpha", 2 * r)),
        embedding_dim=emb_dim,
        tokenizer_family=family,
    )
    with torch.device("meta"):
        model = EvoEmbeddingModel(cfg, lora_modules=lora_modules)
    expected = {("backbone", k): v for k, v in model.backbone.state_dict().items()}
    expected.update({("heads", "memory_queries"): model.memory_queries})
    for prefix in HEAD_PREFIXES:
        for k, v in getattr(model, prefix[:-1]).state_dict().items():
            expected[("heads", prefix + k)] = v
    # HF keeps some non-persistent buffers (rotary inv_freq) out of state_dict; ties are absent
    provided = {("backbone", k): v for k, v in parts["backbone"].items()}
    provided.update({("heads", k): v for k, v in parts["heads"].items()})
    missing = sorted(k for _, k in expected.keys() - provided.keys())
    unexpected = sorted(k for _, k in provided.keys() - expected.keys())
    if missing or unexpected:
        raise ModelLoadError(
            f"checkpoint {ckpt} does not match a {backbone['model_type']} backbone with hidden size "
            f"{cfg.hidden_size}: missing {missing[:6]}{' ...' if len(missing) > 6 else ''}; "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
        )
    bad = [
        f"{k}: checkpoint {tuple(provided[(p, k)].shape)} vs model {tuple(v.shape)}"
        for (p, k), v in expected.items()
        if tuple(provided[(p, k)].shape) != tuple(v.shape)
    ]
    if bad:
        raise ModelLoadError(f"shape mismatch in {ckpt}: " + "; ".join(bad[:6]))

    torch_dtype = parse_dtype(dtype)
    model = model.to_empty(device=device)
    model.backbone.load_state_dict(parts["backbone"], strict=False, assign=False)
    model.memory_queries.data.copy_(parts["heads"]["memory_queries"])
    for prefix in HEAD_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in parts["heads"].items() if k.startswith(prefix)}
        getattr(model, prefix[:-1]).load_state_dict(sub, strict=True)
    _reinit_rotary(model)
    model = model.to(dtype=torch_dtype)
    model.eval()

    tokenizer = _load_tokenizer(ckpt, family, tokenizer_path)
    vocab_rows = model.backbone.embed_tokens.weight.shape[0]
    # Special ids alone cannot tell the vocabularies apart one way round: every Qwen3 id is
    # inside a Qwen3.5 table. The sizes can: a checkpoint pads its table only a little past its
    # tokenizer (released: 151669 -> 151936, 248077 -> 248320), never by a whole vocabulary.
    slack = max(1024, vocab_rows // 32)
    if tokenizer.vocab_size > vocab_rows or vocab_rows - tokenizer.vocab_size > slack:
        raise ModelLoadError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the model's embedding table "
            f"(backbone vocab_size) has {vocab_rows} rows: checkpoint and tokenizer do not belong together "
            f"(a {backbone['model_type']} backbone needs the {MODEL_TYPE_TO_VOCAB[backbone['model_type']]} vocabulary)"
        )
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        tid = tokenizer.special_id(special)
        if tid >= vocab_rows:
            raise ModelLoadError(
                f"tokenizer {tokenizer.source} ({family}) gives {special} id {tid}, outside the model's "
                f"{vocab_rows}-row embedding table: checkpoint and tokenizer do not belong together"
            )
    return LoadedModel(model=model, tokenizer=tokenizer, fingerprint=checkpoint_fingerprint(ckpt), path=ckpt)


def _reinit_rotary(model: EvoEmbeddingModel) -> None:
    """Rotary inverse frequencies are non-persistent buffers (not in the checkpoint): after
    materialising from the meta device they are garbage, so the module is rebuilt from config."""
    rot = model.backbone.rotary_emb
    model.backbone.rotary_emb = type(rot)(rot.config).to(model.memory_queries.device)


def _load_tokenizer(ckpt: Path, family: str, override: str | None) -> QwenTokenizer:
    if override:
        return load_tokenizer_file(override, family)
    if (ckpt / "tokenizer.json").is_file():
        return load_tokenizer_file(ckpt / "tokenizer.json", family)
    try:
        return load_qwen_tokenizer(family)
    except TokenizerError as exc:
        raise ModelLoadError(f"no tokenizer for {ckpt}: {exc}") from exc
