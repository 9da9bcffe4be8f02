"""The background thread that performs prefetch loads, oldest request first.

A policy reserves slots at MoE layer j (`LayerCache.reserve_prefetch`, in the compute thread) and
queues the copies here; they run while layer j and the attention of the next layer compute. On a
CPU, torch's copy releases the GIL, so the copy and the compute thread's kernels run side by side;
on a GPU the copy is queued on a side CUDA stream (`store.PinnedStore`).
"""

from __future__ import annotations

import queue
import threading

from mtmoe.serve.cache import LayerCache, Slot


class Loader:
    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mtmoe-expert-loader", daemon=True)
        self._thread.start()

    def submit(self, cache: LayerCache, jobs: list[tuple[Slot, int]]) -> None:
        for slot, expert in jobs:
            self._jobs.put((cache, slot, expert))

    def wait_idle(self) -> None:
        """Returns once every queued load has been performed or skipped."""
        self._jobs.join()

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                cache, slot, expert = job
                cache.fill(slot, expert)  # never raises: a failed prefetch is logged and left to compute
            finally:
                self._jobs.task_done()
