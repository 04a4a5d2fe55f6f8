"""scripts/system-deps.sh fails loudly where it must install (CI, root) and only warns for a
developer without root (issue #20): run against a PATH where a peer is missing, with stand-ins
for `id` and `apt-get`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "system-deps.sh"
PEERS = ("kcat", "stunnel4", "redis-server", "redis-cli", "redis-sentinel")


def _path(tmp_path: Path, *, uid: int, apt: str | None, present: tuple[str, ...]) -> dict[str, str]:
    """A bin dir with bash's helpers, a fake `id -u`, an optional fake apt-get and the given peers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "env", "cat", "true", "false"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    for name in present:
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
    if apt is not None:
        (bin_dir / "apt-get").write_text(f"#!/bin/sh\n{apt}\n")
    for f in bin_dir.iterdir():
        if not f.is_symlink():
            f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(bin_dir)
    return env


def _run(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("bash") or "/bin/bash", str(SCRIPT)], env=env, capture_output=True,
                          text=True, timeout=60)


def test_nothing_missing_is_silent(tmp_path: Path) -> None:
    r = _run(_path(tmp_path, uid=1000, apt=None, present=PEERS))
    assert (r.returncode, r.stderr) == (0, "")


def test_developer_without_root_gets_a_warning_and_exit_0(tmp_path: Path) -> None:
    r = _run(_path(tmp_path, uid=1000, apt=None, present=PEERS[1:]))
    assert r.returncode == 0, r.stderr
    assert "missing kcat" in r.stderr and "will skip" in r.stderr


def test_ci_without_a_way_to_install_fails(tmp_path: Path) -> None:
    env = _path(tmp_path, uid=1000, apt=None, present=PEERS[1:])
    env["CI"] = "true"
    r = _run(env)
    assert r.returncode == 1, r.stderr
    assert "ERROR" in r.stderr and "kcat" in r.stderr


@pytest.mark.parametrize("apt", ["exit 100", 'case "$1" in update) exit 0;; *) exit 100;; esac'])
def test_root_with_failing_apt_fails(tmp_path: Path, apt: str) -> None:
    r = _run(_path(tmp_path, uid=0, apt=apt, present=PEERS[1:]))
    assert r.returncode == 1, r.stderr
    assert "ERROR: apt-get" in r.stderr


def test_root_when_apt_succeeds_but_the_peer_is_still_missing_fails(tmp_path: Path) -> None:
    r = _run(_path(tmp_path, uid=0, apt="exit 0", present=PEERS[1:]))
    assert r.returncode == 1, r.stderr
    assert "still missing after apt-get install: kcat" in r.stderr
