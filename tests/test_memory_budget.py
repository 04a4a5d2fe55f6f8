"""Model-side cache budgets (issue #22): on by default, sized from the machine, never unbounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.cli.core import engine_config
from stream.settings import Settings
from workers import memory_budget as mb


def test_cgroup_limits_are_read_and_unlimited_is_none(tmp_path: Path) -> None:
    v2 = tmp_path / "memory.max"
    v2.write_text("max\n")
    assert mb.cgroup_limit_bytes((v2,)) is None
    v2.write_text("8589934592\n")
    assert mb.cgroup_limit_bytes((v2,)) == 8 * 2**30
    v1 = tmp_path / "memory.limit_in_bytes"
    v1.write_text(str(2**63 - 4096))  # cgroup v1's "no limit"
    assert mb.cgroup_limit_bytes((tmp_path / "absent", v1)) is None
    assert mb.cgroup_limit_bytes((tmp_path / "absent",)) is None


def test_auto_is_an_eighth_of_the_memory_within_bounds() -> None:
    assert mb.auto_cache_bytes(16 * 2**30) == 2 * 2**30
    assert mb.auto_cache_bytes(256 * 2**20) == mb.AUTO_MIN      # a tiny container: the floor
    assert mb.auto_cache_bytes(1 << 40) == mb.AUTO_MAX           # a huge host: the cap


def test_auto_follows_the_cgroup_limit_below_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mb, "cgroup_limit_bytes", lambda: 4 * 2**30)
    monkeypatch.setattr(mb, "host_memory_bytes", lambda: 16 * 2**30)
    assert mb.resolve_cache_bytes("auto") == 512 * 2**20
    monkeypatch.setattr(mb, "cgroup_limit_bytes", lambda: None)
    assert mb.resolve_cache_bytes("auto") == 2 * 2**30


def test_explicit_budgets_pass_through_and_negative_is_refused() -> None:
    assert mb.resolve_cache_bytes(0) == 0
    assert mb.resolve_cache_bytes(12345) == 12345
    with pytest.raises(ValueError):
        mb.resolve_cache_bytes(-1)


def test_a_worker_with_default_settings_runs_both_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("EVOSTREAM_PREFIX_CACHE_MAX_BYTES", "EVOSTREAM_QUERY_CACHE_MAX_BYTES", "EVOSTREAM_CONFIG"):
        monkeypatch.delenv(k, raising=False)
    cfg = engine_config(Settings())
    assert cfg.prefix_cache_max_bytes >= mb.AUTO_MIN and cfg.query_cache_max_bytes >= mb.AUTO_MIN
    monkeypatch.setenv("EVOSTREAM_PREFIX_CACHE_MAX_BYTES", "0")
    monkeypatch.setenv("EVOSTREAM_QUERY_CACHE_MAX_BYTES", "12345")
    cfg = engine_config(Settings())
    assert cfg.prefix_cache_max_bytes == 0 and cfg.query_cache_max_bytes == 12345
