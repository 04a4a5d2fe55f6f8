"""Loading EvoEmbedding checkpoints in the released layout, and refusing broken ones clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from schemas.turns import ChatMessage, TurnInput
from workers.engine import load_engine
from workers.loading import ModelLoadError, load_checkpoint
from workers.tiny_checkpoint import cached_tiny_checkpoint

FAMILIES = ["qwen3", "qwen3_5"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _copy(family: str, dst: Path) -> Path:
    src = cached_tiny_checkpoint(family, "tiny")
    shutil.copytree(src, dst)
    return dst


def _edit_weights(ckpt: Path, fn) -> None:
    f = ckpt / "model.safetensors"
    w = load_file(str(f))
    w = fn(dict(w))
    save_file(w, str(f), metadata={"format": "pt"})


def _edit_config(ckpt: Path, fn) -> None:
    f = ckpt / "config.json"
    cfg = json.loads(f.read_text())
    fn(cfg)
    f.write_text(json.dumps(cfg))


def _turns() -> list[TurnInput]:
    return [
        TurnInput(conversation_id="c", seq=0, messages=[ChatMessage(role="user", content="my cat is called Tom"),
                                                        ChatMessage(role="assistant", content="nice name")]),
        TurnInput(conversation_id="c", seq=1, messages=[ChatMessage(role="user", content="what is his name?")]),
    ]


def _embed(path_or_loaded, **kw) -> np.ndarray:
    eng = load_engine(path_or_loaded, **kw)
    outs = eng.step({}, _turns())
    q = eng.embed_queries([(None, "cat name")])
    return np.concatenate([np.stack([o.embedding for o in outs]), q])


@pytest.fixture(scope="module")
def reference_embeddings():
    return {fam: _embed(cached_tiny_checkpoint(fam, "tiny")) for fam in FAMILIES}


# --------------------------------------------------------------------------------------------
# good checkpoints
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path, reference_embeddings):
    lm = load_checkpoint(cached_tiny_checkpoint(family, "tiny"))
    lm.model.save_pretrained(tmp_path / "again", tokenizer=lm.tokenizer)
    lm2 = load_checkpoint(tmp_path / "again")
    sd1, sd2 = lm.model.reference_state_dict(), lm2.model.reference_state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert lm2.tokenizer.fingerprint == lm.tokenizer.fingerprint
    assert lm2.model.config.backbone["model_type"] == lm.model.config.backbone["model_type"]
    assert np.array_equal(_embed(lm2), reference_embeddings[family])
    # the released key layout: PEFT-wrapped backbone with both adapters, plus the heads
    keys = load_file(str(tmp_path / "again" / "model.safetensors")).keys()
    assert any(k.startswith("model.base_model.model.") and ".lora_A.memory_generator." in k for k in keys)
    assert any(".lora_B.retriever." in k for k in keys)
    assert {"memory_queries", "latent_to_mem.0.weight", "mem_to_latent.0.weight",
            "mem_to_emb.0.weight", "mem_to_emb.2.weight"} <= set(keys)


@pytest.mark.parametrize("family", FAMILIES)
def test_emb_model_keys_are_ignored(family, tmp_path, reference_embeddings):
    ckpt = _copy(family, tmp_path / "ck")

    def add_static_embedder(w):
        w["emb_model.embed_tokens.weight"] = torch.randn(10, 8)
        w["emb_model.layers.0.self_attn.q_proj.weight"] = torch.randn(8, 8)
        return w

    _edit_weights(ckpt, add_static_embedder)
    assert np.array_equal(_embed(ckpt), reference_embeddings[family])


def test_bfloat16_close_to_float32(reference_embeddings):
    ckpt = cached_tiny_checkpoint("qwen3", "tiny")
    lm = load_checkpoint(ckpt, dtype="bfloat16")
    assert lm.model.dtype == torch.bfloat16
    eng = load_engine(lm)
    assert eng.new_state().dtype == torch.bfloat16
    got = _embed(lm)
    assert got.dtype == np.float32
    want = reference_embeddings["qwen3"]
    cos = (got * want).sum(axis=1)
    assert np.all(cos > 0.97), cos
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_checkpoint(cached_tiny_checkpoint("qwen3", "tiny"), dtype="int8")


# --------------------------------------------------------------------------------------------
# broken checkpoints: one clear error naming the problem
# --------------------------------------------------------------------------------------------
def test_missing_config(tmp_path):
    ckpt = _copy("qwen3", tmp_path / "ck")
    (ckpt / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_checkpoint(ckpt)


def test_wrong_model_type(tmp_path):
    ckpt = _copy("qwen3", tmp_path / "ck")
    _edit_config(ckpt, lambda c: c.update(model_type="bert"))
    with pytest.raises(ModelLoadError, match=r"model_type 'bert', expected 'EvoRAG'"):
        load_checkpoint(ckpt)


def test_unsupported_backbone(tmp_path):
    ckpt = _copy("qwen3", tmp_path / "ck")
    _edit_config(ckpt, lambda c: c["backbone_config"].update(model_type="llama"))
    with pytest.raises(ModelLoadError, match=r"backbone model_type 'llama' is not supported"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_retriever_adapter(family, tmp_path):
    ckpt = _copy(family, tmp_path / "ck")
    _edit_weights(ckpt, lambda w: {k: v for k, v in w.items() if ".retriever." not in k})
    with pytest.raises(ModelLoadError, match=r"lacks LoRA adapter\(s\) \['retriever'\]"):
        load_checkpoint(ckpt)


def test_no_adapters_at_all(tmp_path):
    ckpt = _copy("qwen3", tmp_path / "ck")
    _edit_weights(ckpt, lambda w: {k: v for k, v in w.items() if ".lora_" not in k})
    with pytest.raises(ModelLoadError, match=r"no LoRA adapter weights"):
        load_checkpoint(ckpt)


def test_shape_mismatch_names_the_tensor(tmp_path):
    ckpt = _copy("qwen3", tmp_path / "ck")

    def other_hidden(w):
        w["memory_queries"] = torch.zeros(1, 16, 32)
        return w

    _edit_weights(ckpt, other_hidden)
    with pytest.raises(ModelLoadError, match=r"shape mismatch.*memory_queries: checkpoint \(1, 16, 32\) vs model \(1, 16, 64\)"):
        load_checkpoint(ckpt)


def test_missing_backbone_weight(tmp_path):
    ckpt = _copy("qwen3", tmp_path / "ck")
    _edit_weights(ckpt, lambda w: {k: v for k, v in w.items() if "layers.3.mlp.down_proj.base_layer" not in k})
    with pytest.raises(ModelLoadError, match=r"missing \['layers\.3\.mlp\.down_proj\.base_layer\.weight'\]"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("key", ["classifier.weight", "model.base_model.model.model.layers.0.extra_proj.weight"])
def test_unexpected_keys(tmp_path, key):
    ckpt = _copy("qwen3", tmp_path / "ck")

    def add(w):
        w[key] = torch.zeros(4, 4)
        return w

    _edit_weights(ckpt, add)
    short = key.removeprefix("model.base_model.model.model.")
    with pytest.raises(ModelLoadError, match=r"unexpected.*" + short.replace(".", r"\.")):
        load_checkpoint(ckpt)


def test_lora_rank_disagreeing_with_config(tmp_path):
    ckpt = _copy("qwen3", tmp_path / "ck")
    _edit_config(ckpt, lambda c: c.update(lora_r=64))
    with pytest.raises(ModelLoadError, match=r"LoRA rank in weights is 8 but config\.json says lora_r=64"):
        load_checkpoint(ckpt)


def test_no_weights(tmp_path):
    ckpt = _copy("qwen3", tmp_path / "ck")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("family,other", [("qwen3", "qwen3_5"), ("qwen3_5", "qwen3")])
def test_tokenizer_of_the_other_family(family, other, tmp_path):
    """Both directions. Qwen3.5 model + Qwen3 tokenizer is the dangerous one: every Qwen3
    special id lies inside the Qwen3.5 table, so only the vocabulary sizes give it away."""
    ckpt = _copy(family, tmp_path / "ck")
    shutil.copy(cached_tiny_checkpoint(other, "tiny") / "tokenizer.json", ckpt / "tokenizer.json")
    with pytest.raises(ModelLoadError, match=r"checkpoint and tokenizer do not belong together"):
        load_checkpoint(ckpt)
    # and the same through the explicit override
    ok = _copy(family, tmp_path / "ok")
    with pytest.raises(ModelLoadError, match=r"do not belong together"):
        load_checkpoint(ok, tokenizer_path=str(cached_tiny_checkpoint(other, "tiny") / "tokenizer.json"))


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_without_tokenizer_uses_the_family_vocabulary(family, tmp_path, reference_embeddings):
    ckpt = _copy(family, tmp_path / "ck")
    (ckpt / "tokenizer.json").unlink()
    lm = load_checkpoint(ckpt)
    assert lm.tokenizer.family == family
    assert np.array_equal(_embed(lm), reference_embeddings[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_released_layout_without_backbone_config(family, tmp_path, reference_embeddings):
    """Released checkpoints only name the base model's hub id; no hub is reachable."""
    ckpt = _copy(family, tmp_path / "ck")
    cfg = json.loads((ckpt / "config.json").read_text())
    backbone = cfg.pop("backbone_config")
    cfg["base_model_name_or_path"] = "Qwen/Qwen3-4B-Instruct-2507" if family == "qwen3" else "Qwen/Qwen3.5-2B"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"not available offline.*: set EVOSTREAM_BACKBONE_CONFIG"):
        load_checkpoint(ckpt)

    # the fix: point at the base model's config.json ...
    bb = tmp_path / "base_config.json"
    bb.write_text(json.dumps(backbone))
    assert np.array_equal(_embed(load_checkpoint(ckpt, backbone_config=str(bb))), reference_embeddings[family])
    assert np.array_equal(_embed(ckpt, backbone_config=str(bb)), reference_embeddings[family])
    # ... or put it next to the weights
    (ckpt / "backbone").mkdir()
    shutil.copy(bb, ckpt / "backbone" / "config.json")
    assert np.array_equal(_embed(ckpt), reference_embeddings[family])


def test_multimodal_qwen35_base_config_is_accepted(tmp_path, reference_embeddings):
    """The Qwen3.5 base models ship a multimodal config with the text part under text_config."""
    ckpt = _copy("qwen3_5", tmp_path / "ck")
    cfg = json.loads((ckpt / "config.json").read_text())
    text = cfg.pop("backbone_config")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    wrapper = {"model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"],
               "text_config": {k: v for k, v in text.items() if k != "model_type"},
               "vision_config": {"depth": 2}}
    bb = tmp_path / "config.json"
    bb.write_text(json.dumps(wrapper))
    assert np.array_equal(_embed(load_checkpoint(ckpt, backbone_config=str(bb))), reference_embeddings["qwen3_5"])
