"""Training tasks as plugins. A task turns the tokenized corpus into example *sources* (one per
direction or language) that the batch stream mixes; adding a task is one module here (registered
with `@register_task`) plus a `conf/tasks/*.yaml` entry for its parameters."""

from mtmoe.data.tasks.base import Source, Task, build_sources, register_task  # noqa: F401
from mtmoe.data.tasks import denoising, translation  # noqa: F401  (registers the built-in tasks)
