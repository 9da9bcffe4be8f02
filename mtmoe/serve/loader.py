"""Prefetch loads, and the slow tier's channel they queue for, run from the compute thread.

A policy reserves slots at MoE layer j (`LayerCache.reserve_prefetch`, in the compute thread) and
submits the loads here. A load *starts* when the slow tier's channel is free for it (queued loads
in submission order; an on-demand load claims the channel at once, ahead of those still queued:
`store.Channel`) and is *ready* once the channel has carried its bytes; without a simulated tier
(`serve.slow_gbps` 0) it starts when submitted and is ready at once. Until it starts it is QUEUED
and can be cancelled (another prediction takes its slot) or taken over by compute; once started it
is LOADING, and READY when ready. The copy into the slot is made when the load starts, by the
compute thread (`store.copy_into`; on a GPU it is queued on a side CUDA stream).

No other thread copies, because on a CPU some core must run the memcpy and waking another one
costs the compute thread more than the copy. `scripts/bench_serve.py`'s 8-expert pre-gated model,
1/4 of the experts resident in a shared pool, `pregate`, speed vs all resident, each pair in one
process, interleaved, median of 4 rounds, on this project's 2-core box: loads from the page cache,
a Python loader thread (what this module was before: it takes turns with compute for the GIL
between compute's many small kernels) 0.86x vs the copies made here 0.92x; each copy forked onto
a torch inter-op thread (TorchScript, no GIL) 0.90x vs here 0.93x, and over a simulated 1.5 GB/s
tier 0.85x vs 0.91x (the Python thread there: 0.78x).

`pump()` brings the states up to the present; the caches call it before every decision that reads
them (their `pump` argument), so the states they see are the ones a loader running alongside
would have produced.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Optional

from mtmoe.serve.cache import LayerCache, Slot
from mtmoe.serve.store import Channel


class Loader:
    def __init__(self, channel: Optional[Channel]):
        self._channel = channel
        self._queued: deque[tuple[LayerCache, Slot, int, float]] = deque()  # (cache, slot, expert, submitted at)
        self._loading: list[tuple[LayerCache, Slot, int]] = []  # started, not seen carried yet

    def submit(self, cache: LayerCache, jobs: list[tuple[Slot, int]]) -> None:
        """Queues `cache`'s reserved (slot, expert) loads for the channel."""
        if jobs:
            now = time.perf_counter()
            self._queued.extend((cache, slot, expert, now) for slot, expert in jobs)
            self.pump()

    def pump(self) -> None:
        """Starts the queued loads the channel has reached by now (copying each into its slot), and
        marks READY those it has carried."""
        if not self._queued and not self._loading:
            return
        now = time.perf_counter()
        while self._queued:
            cache, slot, expert, submitted = self._queued[0]
            if not cache.is_queued(slot, expert):  # cancelled, or taken over by compute
                self._queued.popleft()
                continue
            ready_at = submitted if self._channel is None else \
                self._channel.start_by(cache.layout.nbytes, submitted, now)
            if ready_at is None:  # the channel is still busy with earlier reads
                break
            self._queued.popleft()
            if cache.start(slot, expert, ready_at):
                self._loading.append((cache, slot, expert))
        if self._loading:
            self._loading = [job for job in self._loading if not job[0].settle(job[1], job[2], now)]

    def pending(self) -> bool:
        return bool(self._queued or self._loading)

    def wait_idle(self) -> None:
        """Returns once every submitted load is ready, failed or cancelled (tests, benchmark warm-ups)."""
        while self.pending():
            self.pump()
            if self.pending():
                time.sleep(1e-4)

    def close(self) -> None:
        """Drops what is still queued (nothing runs in the background)."""
        self._queued.clear()
        self._loading.clear()
