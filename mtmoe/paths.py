"""Where things live: the project root (bundled data, conf/) and user-given paths."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
"""mtmoe-train's config groups (`data/`, `model/`, `moe/`, ...)."""
TOOLS_CONF_DIR = PROJECT_ROOT / "conf_tools"
"""The configs of mtmoe-eval, mtmoe-export and mtmoe-translate (apart, so that mtmoe-train does not
offer them as a config group)."""


def resolve(path: str | os.PathLike) -> Path:
    """Absolute path for a user path or corpus prefix.

    `~` is expanded. A relative path is taken from the current directory when it (or, for a
    corpus prefix like `data/multi30k/val`, its folder) exists there, else from the project root,
    so the bundled `data/multi30k` works from any directory."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_absolute():
        return p
    for base in (Path.cwd(), PROJECT_ROOT):
        if (base / p).exists() or (base / p).parent.is_dir() and p.parent != Path("."):
            return (base / p).absolute()
    return p.absolute()


def output_path(path: str | os.PathLike) -> Path:
    """Absolute path for something to be written (`out=`, `data.cache_dir`): `~` expanded, a relative
    path always from the current directory. Unlike `resolve`, never the project root: where the
    current directory lacks the folder, the output makes it rather than landing in the checkout."""
    return Path(os.path.expanduser(str(path))).absolute()


def publish_file(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """`write(file)` into a temporary file of its own in `path`'s folder, renamed to `path` when
    whole -> `path`. Processes that make the same cache file at once (the ranks of a launch, jobs
    sharing a cache folder) each write their own file, and a reader sees a whole file or none. The
    file gets the mode any new file of this process gets (the umask's; mkstemp's would be 0600), so
    a cache folder shared between users stays readable to them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # exclusive: never another process's file
            write(f)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
