"""Compute precision chosen by measurement (issue #22): the probe picks what it measured faster,
reports the kernels that ran, and `EVOSTREAM_DTYPE=auto` keeps the memory in float32 whatever the
host computes in (bf16 compute and bf16 storage are separate levers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_engine_parity import make_turns
from workers import precision
from workers.engine import load_engine
from workers.tiny_checkpoint import build_tiny_model, cached_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cpu_facts_read_the_model_and_the_bf16_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 "
                    "amx_tile amx_bf16 amx_int8\n")
    facts = precision.cpu_facts(info)
    assert facts.model == "Example CPU 9000"
    assert facts.flags == ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8") and facts.amx
    assert "Example CPU 9000" in facts.describe() and "amx_bf16" in facts.describe()


@pytest.mark.parametrize("bf16_ms, chosen", [(50.0, "bfloat16"), (95.0, "float32"), (160.0, "float32")])
def test_the_probe_chooses_what_it_measured(monkeypatch: pytest.MonkeyPatch, bf16_ms: float, chosen: str) -> None:
    monkeypatch.setattr(precision, "_time", lambda calls, dtype, reps: 100.0 if dtype == torch.float32 else bf16_ms)
    got = precision.probe_compute_dtype(build_tiny_model("qwen3", "tiny"))
    assert got.chosen == chosen and got.ratio == pytest.approx(bf16_ms / 100.0)
    assert chosen in got.describe()


def test_the_probe_runs_the_models_matmuls_and_names_the_kernel() -> None:
    got = precision.probe_compute_dtype(build_tiny_model("qwen3_5", "tiny"), positions=64, reps=1)
    assert got.float32_ms and got.float32_ms > 0 and got.bfloat16_ms and got.bfloat16_ms > 0
    assert got.cpu["model"] and got.cpu["torch_capability"]
    if got.cpu["onednn_bf16"]:  # this project's machines: oneDNN runs bf16 matmuls and says which kernel
        assert "bf16" in got.bf16_kernel or "amx" in got.bf16_kernel, got.bf16_kernel


def test_auto_computes_in_the_chosen_dtype_and_keeps_float32_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = cached_tiny_checkpoint("qwen3", "tiny")
    monkeypatch.setattr("workers.engine.choose_compute_dtype",
                        lambda model, device: precision.ProbeResult("bfloat16", "forced by the test"))
    auto = load_engine(ckpt, dtype="auto")
    fp32 = load_engine(ckpt)
    assert auto.compute_dtype == torch.bfloat16 and auto.state_dtype == torch.float32
    assert auto.precision is not None and auto.precision.chosen == "bfloat16"
    turns = make_turns("p", [(6, 5)] * 4, seed=3)
    sa, sf = {}, {}
    for t in turns:
        (oa,), (of,) = auto.step(sa, [t]), fp32.step(sf, [t])
        assert oa.delta.latents.dtype == torch.float32
        cos = float(np.dot(oa.embedding, of.embedding))
        assert cos > 0.99, cos
    assert sa["p"].dtype == torch.float32 and sa["p"].latents.dtype == torch.float32
    # the memory a bf16-computing auto worker writes is the float32 format a float32 worker reads
    assert precision.state_dtype_for("auto") == torch.float32 == fp32.state_dtype
    assert precision.state_dtype_for("bfloat16") == torch.bfloat16
