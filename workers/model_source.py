"""Where a checkpoint comes from: a local directory, or a model hub id resolved by
`huggingface_hub` (its cache, its token, its offline mode).

Why through huggingface_hub and not our own downloader: operators of every embedding server
already have a populated hub cache (`HF_HUB_CACHE` / `HF_HOME`), a token (`HF_TOKEN` or
`huggingface-cli login`) and know `HF_HUB_OFFLINE=1`; honouring exactly those is what makes
`EVOSTREAM_CHECKPOINT=MiG-NJU/EvoEmbedding-0.8B` behave like every other server.

A spec is a local path when it exists as one (or starts with `/`, `./`, `../`, `~`); else a
string of the form `owner/name` is a hub id. The released checkpoints name their backbone by
hub id only (`base_model_name_or_path`); `backbone_config_from_hub` fetches only that
model's `config.json` the same way, so no second path has to be configured.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: What a checkpoint needs; weights of other formats, READMEs, images are not downloaded.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelNotAvailable(ValueError):
    """A hub id that is neither in the local hub cache nor downloadable (offline, no network,
    no access). The message says which, and how to fix it."""


def is_hub_id(spec: str) -> bool:
    """True when `spec` names a hub repository rather than a local path."""
    s = spec.strip()
    if not s or s.startswith(("/", "./", "../", "~")) or Path(s).exists():
        return False
    return bool(_HUB_ID.match(s))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but at call time (its constant is read once
    at import, which would ignore a variable set later in the same process)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _cache_dir() -> str | None:
    # Read at call time for the same reason as hub_offline(); None = huggingface_hub's default.
    return os.environ.get("HF_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None)


def _not_available(repo_id: str, revision: str | None, exc: Exception, what: str) -> ModelNotAvailable:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    rev = f" at revision {revision!r}" if revision else ""
    cache = _cache_dir() or "the default hub cache"
    if isinstance(exc, GatedRepoError):
        why = "access is gated: accept its terms on the hub and set HF_TOKEN"
    elif isinstance(exc, RepositoryNotFoundError):
        why = "no such repository on the hub (or it is private: set HF_TOKEN)"
    elif isinstance(exc, RevisionNotFoundError):
        why = "no such revision"
    elif hub_offline():
        why = f"not in {cache} and HF_HUB_OFFLINE is set (download it once where the hub is reachable)"
    else:
        why = f"not in {cache} and the hub could not be reached ({type(exc).__name__})"
    return ModelNotAvailable(f"{what} {repo_id!r}{rev} is not available: {why}")


def resolve_checkpoint_dir(spec: str, revision: str | None = None) -> Path:
    """The local directory of checkpoint `spec` (a path, or a hub id fetched into / found in
    the hub cache). Raises ModelNotAvailable for a hub id that cannot be had."""
    if not is_hub_id(spec):
        return Path(spec).expanduser()
    from huggingface_hub import snapshot_download

    log.info("resolving checkpoint %s%s through the hub cache", spec, f"@{revision}" if revision else "")
    try:
        path = snapshot_download(spec, revision=revision, cache_dir=_cache_dir(), allow_patterns=CHECKPOINT_FILES,
                                 local_files_only=hub_offline())
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one clear message
        err = _not_available(spec, revision, exc, "checkpoint")
        raise ModelNotAvailable(f"{err} (nor is there a local directory {spec!r})") from exc
    return Path(path)


def backbone_config_from_hub(repo_id: str, revision: str | None = None) -> dict[str, Any]:
    """The base model's `config.json`, by hub id, from the hub cache (or downloaded)."""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=_cache_dir(),
                               local_files_only=hub_offline())
    except Exception as exc:  # noqa: BLE001
        raise _not_available(repo_id, revision, exc, "backbone config of") from exc
    return json.loads(Path(path).read_text())


__all__ = ["CHECKPOINT_FILES", "ModelNotAvailable", "backbone_config_from_hub", "hub_offline", "is_hub_id",
           "resolve_checkpoint_dir"]
