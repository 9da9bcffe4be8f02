"""Crash-safe files: atomic replace, fsync, and the sha256 manifest a checkpoint tag is sealed with.

A directory sealed by `write_manifest` holds `manifest.json` (size and sha256 of every file);
`verify` checks a directory against it, so a truncated or corrupt save is told apart from a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

MANIFEST = "manifest.json"
STATE_JSON = "mtmoe_state.json"
"""The mtmoe training state mirrored into each checkpoint tag (a tag without a manifest but with
this file was written before manifests existed)."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Makes a rename or new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fsync_file(path)
    except OSError:
        pass


def write_atomic(path: Path, text: str) -> None:
    """Replaces `path` with `text` so that readers see the old or the new content, never a mix, and
    a power loss leaves one of them (the new file is on disk before its rename)."""
    tmp = _staging_name(path)
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _replace_durably(tmp, path)


def copy_atomic(source: Path, path: Path) -> None:
    """`write_atomic` for a copy of the file `source`."""
    tmp = _staging_name(path)
    shutil.copyfile(source, tmp)
    fsync_file(tmp)
    _replace_durably(tmp, path)


def _staging_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _replace_durably(tmp: Path, path: Path) -> None:
    """Renames the synced `tmp` over `path` and syncs the folder, so that the rename survives a power loss."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_manifest(tag_dir: Path) -> dict:
    files = {}
    for path in sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[str(path.relative_to(tag_dir))] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    manifest = {"format": 1, "files": files}
    write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def verify(tag_dir: Path, check_hashes: bool = True) -> Optional[str]:
    """None when `tag_dir` matches its manifest, else the first problem (naming the file).

    A checkpoint without a manifest (written before manifests existed) is accepted unverified."""
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        return None if (tag_dir / STATE_JSON).is_file() else f"{tag_dir}: no {MANIFEST} (incomplete save)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, OSError) as e:
        return f"{manifest_path}: unreadable manifest ({e})"
    for name, expected in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path}: {size} bytes, the manifest says {expected['bytes']} (truncated?)"
        if check_hashes and sha256_of(path) != expected["sha256"]:
            return f"{path}: sha256 differs from the manifest (corrupt)"
    return None
