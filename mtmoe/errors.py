"""The errors mtmoe's apps turn into one clear line (`mtmoe.cli.common.friendly_errors`): bad input
or config (exit code 2), a diverged run (exit code 3).

A module of its own at the bottom of the package, so that every layer can raise them without
importing anything above it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


class CheckpointError(RuntimeError):
    """A missing or unreadable checkpoint; the message names the path."""


class ExportError(RuntimeError):
    """A missing or unusable checkpoint/export; the message names the path."""


class CorpusError(ValueError):
    """Bad corpus input; the message names the file (and line)."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses; the message says where to resume from."""
