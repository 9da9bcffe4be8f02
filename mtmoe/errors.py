"""The errors mtmoe's apps turn into one clear line (`mtmoe.cli.common.friendly_errors`).

A module of its own at the bottom of the package, so that every layer can raise them without
importing anything above it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


class CheckpointError(RuntimeError):
    """A missing or unreadable checkpoint; the message names the path."""


class ExportError(RuntimeError):
    """A missing or unusable checkpoint/export; the message names the path."""
