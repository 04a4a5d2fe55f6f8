"""A model hub cache populated on disk in huggingface_hub's own layout, for offline tests.

    <cache>/models--<owner>--<name>/blobs/<sha256>             file contents
    <cache>/models--<owner>--<name>/snapshots/<commit>/<file>  -> ../../blobs/<sha256>
    <cache>/models--<owner>--<name>/refs/<revision>            the commit hash

With HF_HUB_OFFLINE=1 and HF_HUB_CACHE=<cache>, huggingface_hub resolves the repository from
here and never opens a connection: exactly what an operator's pre-populated cache looks like.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def put_repo(cache: Path, repo_id: str, files: dict[str, bytes], *, revision: str = "main",
             commit: str | None = None) -> Path:
    """Store `files` ({name: bytes}) as one commit of `repo_id`; returns the snapshot dir."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()))
                                    .encode()).hexdigest()
    snap = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        blob = repo_dir / "blobs" / digest
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    return snap


def put_checkpoint_dir(cache: Path, repo_id: str, ckpt: Path, **kw: str) -> Path:
    """Store every file of a local checkpoint directory as `repo_id`."""
    files = {str(p.relative_to(ckpt)): p.read_bytes() for p in sorted(ckpt.rglob("*")) if p.is_file()}
    return put_repo(cache, repo_id, files, **kw)
