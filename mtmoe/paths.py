"""Where things live: the project root (bundled data, conf/) and user-given paths."""

from __future__ import annotations

import os
from pathlib import Path

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
