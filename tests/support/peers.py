"""System peers (Debian packages) that some tests drive as real processes: kcat, stunnel4,
Debian's TLS-enabled redis-server. scripts/system-deps.sh installs them (`make setup`).

A missing peer is a FAILURE where the suite could have had it -- in CI (CI=true) and when
running as root (who can `apt-get install` it) -- so that a green run cannot hide tests that
never ran (issue #20). Only a developer without root skips them, and the pytest summary then
names the missing peers (tests/conftest.py). Use the `peer` marker on a test or module
(`pytest.mark.peer("kcat", "kcat", "kafkacat")`: package, then the commands that provide it),
or call `require_peer` from a fixture.
"""

from __future__ import annotations

import os
import shutil

import pytest

SKIP_PREFIX = "missing system peer"


def must_have_peers() -> bool:
    """CI, or root (who could install the peer): a missing peer fails instead of skipping."""
    ci = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
    return ci or (hasattr(os, "geteuid") and os.geteuid() == 0)


def peer_path(package: str, *commands: str) -> str | None:
    for cmd in commands or (package,):
        found = shutil.which(cmd)
        if found:
            return found
    return None


def require_peer(package: str, *commands: str) -> str:
    """Path of the peer's command; skips (developer without root) or fails (CI, root) without it."""
    found = peer_path(package, *commands)
    if found:
        return found
    what = f"{SKIP_PREFIX} {package} (Debian package; scripts/system-deps.sh installs it)"
    if must_have_peers():
        pytest.fail(f"{what}: in CI or as root a missing peer is an error, not a skip", pytrace=False)
    pytest.skip(what)
    raise AssertionError("unreachable")
