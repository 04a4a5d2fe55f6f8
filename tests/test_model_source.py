"""Checkpoints by hub id (issue #11): `EVOSTREAM_CHECKPOINT=owner/name` resolves through
huggingface_hub from a cache in the hub's own on-disk layout, with HF_HUB_OFFLINE=1 (no hub is
ever contacted), and the backbone config comes from the base model's hub id the same way."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from schemas.turns import ChatMessage, TurnInput
from tests.support.hubcache import put_checkpoint_dir, put_repo
from workers.engine import load_engine
from workers.loading import ModelLoadError, checkpoint_fingerprint, load_checkpoint
from workers.model_source import is_hub_id, resolve_checkpoint_dir
from workers.tiny_checkpoint import cached_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO_ID = "MiG-NJU/EvoEmbedding-0.8B"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _embed(lm) -> np.ndarray:
    eng = load_engine(lm)
    turns = [TurnInput(conversation_id="c", seq=0, messages=[ChatMessage(role="user", content="my cat is Tom")])]
    return np.concatenate([np.stack([o.embedding for o in eng.step({}, turns)]),
                           eng.embed_queries([(None, "cat name")])])


def test_hub_id_or_path() -> None:
    assert is_hub_id("MiG-NJU/EvoEmbedding-0.8B")
    assert is_hub_id("Qwen/Qwen3.5-2B")
    assert not is_hub_id("/models/EvoEmbedding-2B")
    assert not is_hub_id("./ckpt/x")
    assert not is_hub_id("models")           # one component: a relative path
    assert not is_hub_id("a/b/c")            # three components: a relative path
    assert not is_hub_id("")


def test_checkpoint_by_hub_id_from_offline_cache(hub_cache: Path) -> None:
    local = cached_tiny_checkpoint("qwen3", "tiny")
    snap = put_checkpoint_dir(hub_cache, REPO_ID, local)
    lm = load_checkpoint(REPO_ID)
    assert lm.path == snap
    assert lm.fingerprint == checkpoint_fingerprint(local)  # same bytes, same model identity
    assert np.array_equal(_embed(lm), _embed(load_checkpoint(local)))


def test_checkpoint_revision_from_offline_cache(hub_cache: Path) -> None:
    local = cached_tiny_checkpoint("qwen3", "tiny")
    put_checkpoint_dir(hub_cache, REPO_ID, local, revision="main")
    other = put_checkpoint_dir(hub_cache, REPO_ID, cached_tiny_checkpoint("qwen3", "tiny", seed=1), revision="v2")
    assert resolve_checkpoint_dir(REPO_ID, "v2") == other
    assert load_checkpoint(REPO_ID, revision="v2").fingerprint != load_checkpoint(REPO_ID).fingerprint
    with pytest.raises(ModelLoadError, match=r"'MiG-NJU/EvoEmbedding-0.8B' at revision 'v9' is not available"):
        load_checkpoint(REPO_ID, revision="v9")


def test_hub_id_not_cached_is_one_clear_error(hub_cache: Path) -> None:
    with pytest.raises(ModelLoadError) as ei:
        load_checkpoint("MiG-NJU/EvoEmbedding-4B")
    msg = str(ei.value)
    assert "checkpoint 'MiG-NJU/EvoEmbedding-4B' is not available" in msg
    assert str(hub_cache) in msg and "HF_HUB_OFFLINE is set" in msg
    assert "\n" not in msg


def test_backbone_config_by_base_model_hub_id(hub_cache: Path, tmp_path: Path) -> None:
    """The released layout names its backbone by hub id only: its config.json comes from the
    hub cache, so no EVOSTREAM_BACKBONE_CONFIG path is needed."""
    src = cached_tiny_checkpoint("qwen3", "tiny")
    ckpt = tmp_path / "released"
    shutil.copytree(src, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    backbone = cfg.pop("backbone_config")
    cfg["base_model_name_or_path"] = "Qwen/Qwen3-4B-Instruct-2507"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"'Qwen/Qwen3-4B-Instruct-2507' is not available.*"
                                              r"set EVOSTREAM_BACKBONE_CONFIG"):
        load_checkpoint(ckpt)
    put_repo(hub_cache, "Qwen/Qwen3-4B-Instruct-2507", {"config.json": json.dumps(backbone).encode()})
    lm = load_checkpoint(ckpt)
    assert lm.model.config.backbone["hidden_size"] == backbone["hidden_size"]
    assert np.array_equal(_embed(lm), _embed(load_checkpoint(src)))
    # the same hub id given explicitly as the backbone config
    assert load_checkpoint(ckpt, backbone_config="Qwen/Qwen3-4B-Instruct-2507").model.config.backbone == \
        lm.model.config.backbone


def test_worker_serves_a_checkpoint_given_by_hub_id(tmp_path: Path, kafka_bootstrap: str, redis_url: str,
                                                    topic_factory) -> None:
    """The whole worker path: `EVOSTREAM_CHECKPOINT=<hub id>` resolved from the offline cache,
    the model loaded, partitions taken; the fingerprint is the local checkpoint's."""
    from tests.support.workers import PipelineEnv, WorkerProc

    cache = tmp_path / "hub"
    local = cached_tiny_checkpoint("qwen3", "tiny")
    put_checkpoint_dir(cache, REPO_ID, local)
    penv = PipelineEnv(kafka_bootstrap, redis_url, topic_factory(1), topic_factory(1), topic_factory(1), 1,
                       checkpoint=REPO_ID, extra={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    w = WorkerProc(penv, tmp_path, "hub").start()
    try:
        w.wait_ready(timeout=180)
        log = w.log_path.read_text()
        assert f"resolving checkpoint {REPO_ID} through the hub cache" in log
        assert f"checkpoint fingerprint {checkpoint_fingerprint(local)}" in log
        assert "ready: 1 partition of" in log
    finally:
        w.stop()
