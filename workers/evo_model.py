"""EvoEmbedding: the model, its checkpoint loading, and its two forward passes, in one file.

A frozen Qwen backbone carries two LoRA adapters over the same weights: `memory_generator`
(active while turning a turn into `num_latents` memory latents) and `retriever` (active while
embedding a turn or a query against the memory). Three small heads move vectors between the
backbone's hidden space and the memory / embedding spaces:

    latent_to_mem  = ReLU(Linear(H, H))          hidden state at a query slot -> memory latent
    mem_to_latent  = Linear(H, H)                memory latent -> input embedding for the LM
    mem_to_emb     = Linear(E, E)(ReLU(Linear(H, E)))   pooled hidden -> embedding (E = 1024)

The backbone is run as the bare transformer (no LM head: only the last hidden state is used,
and computing 150k-vocabulary logits per position would dominate the cost for nothing).
LoRA is applied unmerged, exactly as PEFT computes it in eval mode
(`base(x) + lora_B(lora_A(x)) * alpha / r`), so numbers match a PEFT-wrapped reference.

Checkpoint layout (a transformers save of the reference wrapper): `config.json` with
model_type "EvoRAG" and safetensors keys `model.base_model.model.<backbone>...` with
`.base_layer.weight` / `.lora_A.<adapter>.weight` / `.lora_B.<adapter>.weight` on adapted
projections, plus `memory_queries`, `latent_to_mem.0.*`, `mem_to_latent.0.*`, `mem_to_emb.{0,2}.*`
and optionally `emb_model.*` (ignored: only the "native" evaluation mode uses it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from workers.tokenizer import MODEL_TYPE_TO_VOCAB, QwenTokenizer, TokenizerError, load_qwen_tokenizer, load_tokenizer_file

log = logging.getLogger(__name__)

ADAPTERS = ("memory_generator", "retriever")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "model.base_model.model."
HEAD_PREFIXES = ("latent_to_mem.", "mem_to_latent.", "mem_to_emb.")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as an EvoEmbedding model; says what is wrong."""


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass
class EvoConfig:
    base_model_name_or_path: str
    backbone: dict[str, Any]           # the backbone's HF config (text part), incl. model_type
    num_latents: int = 16
    buffer_capacity: int = 512
    lora_r: int = 64
    lora_alpha: int = 128
    embedding_dim: int = 1024
    tokenizer_family: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.backbone["hidden_size"])

    @property
    def model_type(self) -> str:
        return str(self.backbone["model_type"])

    def to_json(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update(
            model_type="EvoRAG",
            architectures=["EvoRAGModel"],
            base_model_name_or_path=self.base_model_name_or_path,
            num_latents=self.num_latents,
            buffer_capacity=self.buffer_capacity,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            embedding_dim=self.embedding_dim,
            tokenizer_family=self.tokenizer_family,
            backbone_config=self.backbone,
        )
        return out


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
            raise CheckpointError(str(exc)) from exc
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
            raise CheckpointError(
                f"{ckpt_dir}/config.json names backbone {base!r}, whose config is not available offline{hub_error}: "
                "set EVOSTREAM_BACKBONE_CONFIG to the base model's config.json (or its hub id), or put "
                f"that config.json in {ckpt_dir}/backbone/"
            )
    if "text_config" in src and "hidden_size" not in src:  # multimodal Qwen3.5 wrapper config
        text = dict(src["text_config"])
        text.setdefault("model_type", "qwen3_5_text")
        src = text
    if src.get("model_type") not in MODEL_TYPE_TO_VOCAB:
        raise CheckpointError(
            f"backbone model_type {src.get('model_type')!r} is not supported; supported: {sorted(MODEL_TYPE_TO_VOCAB)}"
        )
    return src


def _make_backbone(backbone: dict[str, Any]) -> nn.Module:
    kwargs = {k: v for k, v in backbone.items() if k not in ("model_type", "architectures", "transformers_version")}
    mt = backbone["model_type"]
    if mt == "qwen3":
        from transformers import Qwen3Config
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Model

        return Qwen3Model(Qwen3Config(**kwargs))
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextModel

    return Qwen3_5TextModel(Qwen3_5TextConfig(**kwargs))


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------
class AdapterSwitch:
    """Which adapter the LoRA layers add right now; shared by every LoRA layer of one model."""

    def __init__(self) -> None:
        self.active: str | None = None


class LoRALinear(nn.Module):
    """A frozen Linear plus named low-rank adapters, one of which is active at a time."""

    def __init__(self, base: nn.Linear, switch: AdapterSwitch, r: int, alpha: int, adapters: Iterable[str]):
        super().__init__()
        self.base_layer = base
        self.switch = switch
        self.scaling = alpha / r
        self.lora_A = nn.ModuleDict({a: nn.Linear(base.in_features, r, bias=False) for a in adapters})
        self.lora_B = nn.ModuleDict({a: nn.Linear(r, base.out_features, bias=False) for a in adapters})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        name = self.switch.active
        if name is not None:
            out = out + self.lora_B[name](self.lora_A[name](x)) * self.scaling
        return out


def _wrap_lora(backbone: nn.Module, switch: AdapterSwitch, r: int, alpha: int, only: set[str] | None) -> list[str]:
    wrapped = []
    for name, module in list(backbone.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and child_name in LORA_TARGETS and (only is None or full in only):
                setattr(module, child_name, LoRALinear(child, switch, r, alpha, ADAPTERS))
                wrapped.append(full)
    return wrapped


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class EvoEmbeddingModel(nn.Module):
    def __init__(self, config: EvoConfig, lora_modules: set[str] | None = None):
        super().__init__()
        self.config = config
        H, E, L = config.hidden_size, config.embedding_dim, config.num_latents
        self.backbone = _make_backbone(config.backbone)
        self.switch = AdapterSwitch()
        self.lora_modules = _wrap_lora(self.backbone, self.switch, config.lora_r, config.lora_alpha, lora_modules)
        self.memory_queries = nn.Parameter(torch.zeros(1, L, H))
        self.latent_to_mem = nn.Sequential(nn.Linear(H, H), nn.ReLU())
        self.mem_to_latent = nn.Sequential(nn.Linear(H, H))
        self.mem_to_emb = nn.Sequential(nn.Linear(H, E), nn.ReLU(), nn.Linear(E, E))
        self.requires_grad_(False)
        self.eval()

    # -- small accessors -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.memory_queries.device

    @property
    def dtype(self) -> torch.dtype:
        return self.memory_queries.dtype

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed_tokens(ids)

    # -- the forward pass both adapters share ---------------------------------------------
    @torch.no_grad()
    def run(self, embeds: torch.Tensor, mask: torch.Tensor | None, adapter: str) -> torch.Tensor:
        """Last-layer hidden states of `embeds` (B, T, H) under `adapter`.
        With a mask (left padding): position ids restart at 0 after each row's padding
        (padding itself gets 1), as the reference does, so a row's numbers do not depend on how
        much padding it got. Without one: every row starts at column 0 (right padding or
        none) and positions are 0..T-1."""
        if adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {adapter!r}")
        if mask is None:
            pos = torch.arange(embeds.shape[1], device=embeds.device).expand(embeds.shape[0], -1)
        else:
            pos = (torch.cumsum(mask, dim=1) - 1).masked_fill(mask == 0, 1)
        self.switch.active = adapter
        try:
            out = self.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False)
        finally:
            self.switch.active = None
        return out.last_hidden_state

    @torch.no_grad()
    def pool_embedding(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """(B, H) hidden at the end-of-text position -> (B, E) L2-normalised float32."""
        vec = self.mem_to_emb(self.latent_to_mem(last_hidden))
        return F.normalize(vec.float(), p=2, dim=-1, eps=1e-12)

    # -- persistence -------------------------------------------------------------------------
    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the reference wrapper's key names (PEFT-wrapped backbone)."""
        out: dict[str, torch.Tensor] = {}
        bb_prefix = PEFT_PREFIX + "model."
        for k, v in self.backbone.state_dict().items():
            out[bb_prefix + k] = v
        out["memory_queries"] = self.memory_queries.data
        for prefix in HEAD_PREFIXES:
            for k, v in getattr(self, prefix[:-1]).state_dict().items():
                out[prefix + k] = v
        # the reference's PEFT save writes `lora_A.<adapter>.weight`; ours names it the same
        return {k: v.detach().contiguous() for k, v in out.items()}

    def save_pretrained(self, directory: str | Path, tokenizer: QwenTokenizer | None = None) -> None:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(self.reference_state_dict(), str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg = self.config.to_json()
        cfg["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save(d / "tokenizer.json")


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
        raise CheckpointError(f"no *.safetensors in {ckpt}")
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


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError as exc:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32 or bfloat16") from exc


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
        raise CheckpointError(str(exc)) from exc
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(f"{ckpt} is not a checkpoint directory (no config.json)")
    raw = json.loads((ckpt / "config.json").read_text())
    if raw.get("model_type") != "EvoRAG":
        raise CheckpointError(f"{ckpt}/config.json has model_type {raw.get('model_type')!r}, expected 'EvoRAG'")
    backbone = _backbone_config_from(raw, ckpt, backbone_config)
    weights = _read_safetensors(ckpt)

    parts: dict[str, dict[str, torch.Tensor]] = {"backbone": {}, "heads": {}, "unknown": {}}
    for k, v in weights.items():
        mapped = _map_key(k)
        if mapped is not None:
            parts[mapped[0]][mapped[1]] = v
    if parts["unknown"]:
        raise CheckpointError(f"unexpected keys in {ckpt}: {sorted(parts['unknown'])[:5]} ...")

    # which projections carry adapters, and with which names / rank, is read off the weights
    lora_keys = [k for k in parts["backbone"] if ".lora_A." in k or ".lora_B." in k]
    if not lora_keys:
        raise CheckpointError(f"{ckpt} has no LoRA adapter weights (expected {ADAPTERS})")
    found_adapters = {k.split(".lora_")[1].split(".")[1] for k in lora_keys}
    missing_adapters = set(ADAPTERS) - found_adapters
    if missing_adapters:
        raise CheckpointError(f"{ckpt} lacks LoRA adapter(s) {sorted(missing_adapters)}; found {sorted(found_adapters)}")
    lora_modules = {k.split(".lora_")[0] for k in lora_keys}
    r = parts["backbone"][next(k for k in lora_keys if ".lora_A." in k)].shape[0]
    if r != raw.get("lora_r", r):
        raise CheckpointError(f"LoRA rank in weights is {r} but config.json says lora_r={raw.get('lora_r')}")

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
        raise CheckpointError(
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
        raise CheckpointError(f"shape mismatch in {ckpt}: " + "; ".join(bad[:6]))

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
        raise CheckpointError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the model's embedding table "
            f"(backbone vocab_size) has {vocab_rows} rows: checkpoint and tokenizer do not belong together "
            f"(a {backbone['model_type']} backbone needs the {MODEL_TYPE_TO_VOCAB[backbone['model_type']]} vocabulary)"
        )
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        tid = tokenizer.special_id(special)
        if tid >= vocab_rows:
            raise CheckpointError(
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
        raise CheckpointError(f"no tokenizer for {ckpt}: {exc}") from exc


def env_default_threads() -> None:
    """Leave one core to the event loop / broker on small machines."""
    n = os.cpu_count() or 1
    if n <= 2:
        torch.set_num_threads(max(1, n))
