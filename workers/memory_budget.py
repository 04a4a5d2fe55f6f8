"""Byte budgets of the model-side caches, sized from the machine when the operator says `auto`.

Why a budget at all: the segment-prefix cache (prefix_cache.py) and the query-ready memory
(query_cache.py) hold tensors per open conversation (tens of MiB each at the 0.8B shape,
docs/CAPACITY.md); without a byte bound a worker with many conversations would grow until the
kernel kills it. Why `auto` is the default: a fixed number is either too small for a large host
(every turn recomputes its segment) or too large for a small container (OOM). So `auto` takes a
fixed share of the memory the worker may really use:

- CPU: the cgroup's memory limit when one is set (a container or a Kubernetes pod; v2
  `memory.max`, v1 `memory.limit_in_bytes`), else the host's physical memory;
- CUDA: the device's total memory (the caches live next to the model on the device).

Each cache gets `AUTO_FRACTION` of it, clamped to [`AUTO_MIN`, `AUTO_MAX`]; the two caches
together therefore never take more than a quarter of the worker's memory, which leaves the rest
to the model weights, the state cache (EVOSTREAM_CACHE_MAX_BYTES) and activations. The resolved
numbers are logged at start and exported as gauges, and the worker's memory bound (chaos memory
scenario, docs/CAPACITY.md) counts them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

AUTO_FRACTION = 1 / 8
AUTO_MIN = 64 * 2**20
AUTO_MAX = 4 * 2**30

CacheBudget = int | Literal["auto"]

_CGROUP_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def host_memory_bytes() -> int:
    """Physical memory of the host (what `free` calls total)."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def cgroup_limit_bytes(files: tuple[Path, ...] = _CGROUP_FILES) -> int | None:
    """The memory limit of this process's cgroup, or None when unlimited or unreadable.
    (cgroup v1 reports "no limit" as a huge number near 2**63: treated as none.)"""
    for f in files:
        try:
            raw = f.read_text().strip()
        except OSError:
            continue
        if raw == "max" or not raw.isdigit():
            return None
        n = int(raw)
        return n if n < 2**60 else None
    return None


def worker_memory_bytes(device: str = "cpu") -> int:
    """The memory the caches of a worker on `device` compete for (see module docstring)."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        return int(torch.cuda.get_device_properties(index).total_memory)
    limit = cgroup_limit_bytes()
    host = host_memory_bytes()
    return min(limit, host) if limit is not None else host


def auto_cache_bytes(memory_bytes: int) -> int:
    """One cache's share of `memory_bytes`."""
    return int(min(AUTO_MAX, max(AUTO_MIN, memory_bytes * AUTO_FRACTION)))


def resolve_cache_bytes(value: CacheBudget, device: str = "cpu") -> int:
    """A configured budget in bytes: an int as it is (0 = off), `auto` from the machine."""
    if value == "auto":
        return auto_cache_bytes(worker_memory_bytes(device))
    n = int(value)
    if n < 0:
        raise ValueError(f"a cache budget must be >= 0 bytes or 'auto', not {value!r}")
    return n
