"""Lay files out as a Hugging Face hub cache, so hub code paths run for real with no network.

The layout huggingface_hub reads (https://huggingface.co/docs/huggingface_hub/guides/manage-cache):

    <HF_HUB_CACHE>/models--ORG--NAME/
        blobs/<sha256 of the content>                 the files' bytes
        snapshots/<40-hex commit>/<path in the repo>  relative symlinks to ../../blobs/... (copies where
                                                      symlinks are not allowed, as on Windows)
        refs/<branch or tag>                          the commit hash, no newline

`offline_hub(monkeypatch, root)` points HF_HOME / HF_HUB_CACHE at an empty cache under `root` and sets
HF_HUB_OFFLINE=1, both in the environment and in huggingface_hub.constants (which reads them at import);
`add_to_hub_cache(cache, repo_id, source)` puts a folder (or {path: bytes}) in it as one commit.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def offline_hub(monkeypatch, root: str | Path) -> Path:
    """An empty hub cache under `root`, made the one huggingface_hub uses, offline. Returns the cache."""
    from huggingface_hub import constants

    home = Path(root) / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    for var, value in (("HF_HOME", str(home)), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def repo_folder(cache: str | Path, repo_id: str, repo_type: str = "model") -> Path:
    return Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"


def add_to_hub_cache(cache: str | Path, repo_id: str, source: str | Path | dict[str, bytes],
                     refs: tuple[str, ...] = ("main",), commit: str | None = None,
                     repo_type: str = "model") -> Path:
    """Put the files of `source` (a folder, read recursively, or {relative path: bytes}) into the hub cache
    `cache` as commit `commit` (by default a hash of the contents) of `repo_id`, with each name in `refs`
    (branches or tags) pointing at it. Returns the snapshot folder."""
    if isinstance(source, dict):
        files = {str(k): v for k, v in source.items()}
    else:
        root = Path(source)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    digest = hashlib.sha1()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    commit = commit or digest.hexdigest()
    repo = repo_folder(cache, repo_id, repo_type)
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = blobs / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:
            link.write_bytes(data)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        ref_path = repo / "refs" / ref
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        ref_path.write_text(commit)
    return snapshot
