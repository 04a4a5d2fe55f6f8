"""EvoEmbedding: the model and its two forward passes, in one file (loading: workers/loading.py).

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
`save_pretrained` writes the released layout (the reference wrapper's key names);
workers/loading.py reads it back, and any released checkpoint, with every check on the way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from workers.tokenizer import QwenTokenizer


ADAPTERS = ("memory_generator", "retriever")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "model.base_model.model."
HEAD_PREFIXES = ("latent_to_mem.", "mem_to_latent.", "mem_to_emb.")


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


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError as exc:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32 or bfloat16") from exc


def env_default_threads() -> None:
    """Leave one core to the event loop / broker on small machines."""
    n = os.cpu_count() or 1
    if n <= 2:
        torch.set_num_threads(max(1, n))
