"""Which dtype the model computes in, chosen by measurement, and which CPU kernels ran.

Why measure instead of assuming: bfloat16 halves the bytes a matmul reads, but on a CPU it is
only faster when the CPU has bf16 matrix instructions the kernels use (AMX tiles on Sapphire
Rapids and later; AVX512-BF16 dot products are slower than fp32 FMAs on some parts). The same
code measured bf16 at 0.47x of fp32's time on one machine of this project's kind and 1.38x-1.69x
on others (issue #22). So:

- `EVOSTREAM_DTYPE=auto` runs `probe_compute_dtype` at start: the model's own projection and MLP
  matmuls, timed in float32 and in bfloat16 on this host, and picks bfloat16 only when it is
  clearly faster (`BF16_MARGIN`). On CUDA, auto is bfloat16 (tensor cores) without a probe.
- The *state* a worker stores is float32 under `auto`, whatever the host computed in: a fleet of
  mixed hosts then shares one state format (issue #17: a bf16 worker refuses fp32 states), and
  bfloat16 *storage* stays a separate lever (EVOSTREAM_STATE_STORAGE_DTYPE, exact round trip:
  each turn's latents are rounded to it as they are applied, workers/state.py).
- What ran is reported: the CPU model, its bf16/AMX flags, torch's CPU capability, and the oneDNN
  implementation of a bf16 matmul as oneDNN itself names it (e.g. `brg_matmul:avx512_core_bf16`
  or `brg_matmul:avx512_core_amx`), captured from its verbose log.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from workers.evo_model import parse_dtype

BF16_MARGIN = 0.9
"""bfloat16 is chosen when its probe time is below this fraction of float32's."""

_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


@dataclass(frozen=True)
class CpuFacts:
    model: str
    cores: int
    flags: tuple[str, ...]            # the bf16-relevant subset of /proc/cpuinfo flags present
    torch_capability: str             # torch.backends.cpu.get_cpu_capability()
    onednn_bf16: bool                 # torch reports oneDNN bf16 support on this CPU

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags

    def describe(self) -> str:
        return (f"{self.model} ({self.cores} CPUs; torch CPU capability {self.torch_capability}; "
                f"flags {' '.join(self.flags) or 'none of ' + '/'.join(_FLAGS)})")


def cpu_facts(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuFacts:
    model, flags = "unknown CPU", set()
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    if m:
        model = m.group(1).strip()
    f = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    if f:
        flags = set(f.group(1).split())
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    return CpuFacts(model=model, cores=os.cpu_count() or 1, flags=tuple(x for x in _FLAGS if x in flags),
                    torch_capability=str(torch.backends.cpu.get_cpu_capability()), onednn_bf16=bf16)


@contextlib.contextmanager
def _captured_fd1() -> Iterator[list[str]]:
    """oneDNN writes its verbose log to the process's stdout (fd 1) from C: capture it there."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(1)
        try:
            os.dup2(tmp.fileno(), 1)
            yield out
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            out.extend(tmp.read().decode("utf-8", "replace").splitlines())


def onednn_matmul_impl(dtype: torch.dtype = torch.bfloat16, k: int = 256) -> str:
    """The oneDNN implementation a `dtype` linear layer runs on this CPU ('' when the op does not
    go through oneDNN, e.g. float32 matmuls, which use the BLAS)."""
    x, w = torch.randn(8, k, dtype=dtype), torch.randn(k, k, dtype=dtype)
    try:
        with _captured_fd1() as lines:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                torch.nn.functional.linear(x, w)
    except (RuntimeError, OSError):
        return ""
    for line in lines:
        parts = line.split(",")
        if len(parts) > 6 and parts[2] == "primitive" and parts[3] == "exec" and "matmul" in parts[5]:
            return parts[6]
    return ""


@dataclass
class ProbeResult:
    chosen: str                       # "float32" | "bfloat16"
    reason: str
    float32_ms: float | None = None
    bfloat16_ms: float | None = None
    positions: int = 0
    bf16_kernel: str = ""
    cpu: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if not self.float32_ms or self.bfloat16_ms is None:
            return None
        return self.bfloat16_ms / self.float32_ms

    def describe(self) -> str:
        timing = (f"bf16/fp32 time {self.ratio:.2f}x ({self.bfloat16_ms:.1f} / {self.float32_ms:.1f} ms over "
                  f"{self.positions} positions, oneDNN bf16 matmul: {self.bf16_kernel or 'not oneDNN'})"
                  if self.ratio is not None else "")
        return f"compute dtype {self.chosen}: {self.reason}" + (f"; {timing}" if timing else "")


def _probe_calls(model: torch.nn.Module, positions: int) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """One decoder layer's MLP and its token mixer's projections, each with an input of its own
    width: where the FLOPs of a position are (float32; cast per dtype by `_time`)."""
    layer = model.backbone.layers[0]
    g = torch.Generator().manual_seed(0)
    hidden = model.config.hidden_size
    calls = [(layer.mlp, torch.randn(1, positions, hidden, generator=g))]
    mixer = getattr(layer, "self_attn", None) or getattr(layer, "linear_attn", None)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj"):
        mod = getattr(mixer, name, None)
        width = getattr(getattr(mod, "base_layer", mod), "in_features", None)
        if mod is not None and width:
            calls.append((mod, torch.randn(1, positions, width, generator=g)))
    return calls


def _time(calls: list[tuple[torch.nn.Module, torch.Tensor]], dtype: torch.dtype, reps: int) -> float:
    """Fastest of `reps` runs over the calls in `dtype` (copies: the model is not touched)."""
    work = [(copy.deepcopy(m).to(dtype), x.to(dtype)) for m, x in calls]
    with torch.no_grad():
        for m, x in work:  # warm-up (kernel selection, weight packing)
            m(x)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for m, x in work:
                m(x)
            best = min(best, time.perf_counter() - t0)
    return 1000 * best


def probe_compute_dtype(model: torch.nn.Module, *, positions: int = 256, reps: int = 3) -> ProbeResult:
    """Time the model's own layer-0 matmuls over `positions` rows in float32 and bfloat16 (the
    fastest of `reps`, after a warm-up; a few hundred ms at the 0.8B shape) and choose."""
    facts = cpu_facts()
    calls = _probe_calls(model, positions)
    t32 = _time(calls, torch.float32, reps)
    t16 = _time(calls, torch.bfloat16, reps)
    kernel = onednn_matmul_impl(torch.bfloat16)
    if t16 < BF16_MARGIN * t32:
        chosen, reason = "bfloat16", f"bf16 measured faster than fp32 on this CPU (< {BF16_MARGIN:g}x)"
    else:
        chosen, reason = "float32", f"bf16 not measured faster than fp32 on this CPU (needs < {BF16_MARGIN:g}x)"
    return ProbeResult(chosen, reason, t32, t16, positions, kernel, asdict(facts))


def choose_compute_dtype(model: torch.nn.Module, device: str) -> ProbeResult:
    """`EVOSTREAM_DTYPE=auto`: bfloat16 on CUDA; on CPU, what the probe measures faster."""
    if device.startswith("cuda"):
        return ProbeResult("bfloat16", "CUDA: bf16 tensor cores (no probe)")
    return probe_compute_dtype(model)


def state_dtype_for(setting: str) -> torch.dtype:
    """The dtype of the memory a worker with EVOSTREAM_DTYPE=`setting` stores and reads: the
    compute dtype when one is named, float32 under auto (one state format for a mixed fleet)."""
    return torch.float32 if setting == "auto" else parse_dtype(setting)
