"""The fast tier of one MoE layer: the experts it holds in slots, least recently used evicted.

A slot is an expert module of the layer's own type (FeedForward, or its quantized form) whose
tensors are views into the slot's flat buffer uint8 [nbytes] (`layout.ExpertLayout.bind`);
loading expert e into it copies e's blob from the store into the buffer. Buffers are allocated
on a slot's first load and reused, so the resident expert bytes never exceed slots * nbytes.

The slots come from a `SlotPool` (`serve.budget`): `layer` gives each layer a pool of its own
`capacity` slots; `model` gives all MoE layers one pool with the sum of their capacities, and a
layer that needs a slot may take the least recently used one of any layer (a prediction always, a
miss while its layer holds fewer than its share: `_victim` says why). The shared pool exists
because a sentence's layers do not need their experts at the same time: the encoder runs once per
sentence and needs most experts of each of its layers then (a whole sentence is routed at once),
while each decoding step needs one or two experts of each decoder layer. With a budget per layer,
the encoder's slots sit idle while the decoder runs, and the decoder's while the encoder runs.
A layer's `capacity` stays its share: what it holds (`hold`) and seeds are counted against it.

Eviction is least recently used, with two refinements for prefetches: an on-demand load evicts
an expert that was prefetched and not used yet only when nothing else can go (the prefetch is a
bet on the coming call, and experts run in index order, so without this a call's first on-demand
loads would evict the experts prefetched for its later ones); and a prefetch wanting more experts
than the cache holds reserves one slot fewer, leaving a slot for the on-demand loads of the rest.

Language-aware serving (`serve.prefetch=language`) adds two things. Held experts (`hold`): the
ones the request's direction uses most stay resident across calls (never evicted; at most
capacity - 1, so a slot always remains for the others). Streaming (`plan_call`/`after_use`): once
a call's experts are known (the router has run, before any expert does), the missing ones are
reserved into slots the call does not need, in execution order, and each expert that finishes
frees its slot for the next, so loads overlap the computation of the call's other experts.

The compute thread drives a cache (`use`, from the MoE layer's forward; the policies'
reservations), and the loader (`mtmoe.serve.loader.Loader`) moves prefetches through their
states as the slow tier's channel carries them (`start`, `settle`; `pump`, given to the cache,
brings them up to date before each decision). Slot states are guarded by one lock. A slot is
EMPTY, QUEUED (reserved by a prefetch, not started on the channel), LOADING (started: copied,
and READY once the channel has carried it at `ready_at`; or being loaded by a thread's own
`_load`, `ready_at` infinite) or READY. The rules that make outputs independent of prefetching:

- compute only runs a slot that is READY with the expert it asked for, and pins it meanwhile;
- a pinned or LOADING slot is never evicted (so never overwritten under compute or a copy);
- a prefetch that compute needs now is taken over if still QUEUED (compute loads it at once, the
  channel carrying it ahead of the loads queued behind it), waited for if LOADING, and loaded
  again on demand if it failed. `fill` performs a reserved prefetch in the calling thread.

In a shared pool the layers' caches share the pool's lock, and a layer never takes another
layer's slot that is pinned, loading, held, needed by that layer's call in progress, or prefetched
and not used yet (a prefetch is a bet on a coming call: the earlier layer's comes first), except
for an on-demand load that has no other slot to go to.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from mtmoe.serve.layout import ExpertLayout
from mtmoe.serve.metrics import ServeMetrics
from mtmoe.serve.store import wait_until

log = logging.getLogger(__name__)

EMPTY, QUEUED, LOADING, READY = "empty", "queued", "loading", "ready"
INF = float("inf")


class Slot:
    """One place for an expert in the fast tier."""

    def __init__(self, index: int):
        self.index = index
        self.owner: Optional["LayerCache"] = None  # the layer whose expert it holds (or is reserved for)
        self.expert: Optional[int] = None
        self.used = 0  # pool clock of its last use or reservation (least recently used: smallest)
        self.state = EMPTY
        self.pins = 0  # compute calls running on this slot right now
        self.prefetched = False  # put here by a prefetch and not used since
        self.ready_at = INF  # LOADING: perf_counter time at which the channel has carried its expert
        self.copy_event = None  # GPU store: the CUDA event compute must wait for; CPU: None
        self.flat: Optional[torch.Tensor] = None  # uint8 [pool nbytes], allocated on the first load
        self.module: Optional[nn.Module] = None  # the owner's expert module computing with views into `flat`
        self.modules: dict[str, nn.Module] = {}  # layer name -> its expert module bound to `flat`


class ClosedStore:
    """The store of a released cache (`LayerCache.release`): any load is an error."""

    def _closed(self, *args, **kwargs):
        raise RuntimeError("the serving runtime was closed: this offloaded model cannot load experts any more "
                           "(load it again to decode)")

    copy_into = read_into = _closed


class SlotPool:
    """Slots shared by the LayerCaches drawing on it (one layer's, or every layer's), the lock that
    guards them and the clock that orders their uses. `nbytes`: a slot's buffer, the largest
    expert blob of its layers (a smaller one uses the buffer's first bytes)."""

    def __init__(self, size: int, nbytes: int):
        self.slots = [Slot(i) for i in range(size)]
        self.nbytes = nbytes
        self.lock = threading.Lock()
        self.caches: list["LayerCache"] = []
        self._clock = itertools.count(1)

    def tick(self) -> int:
        return next(self._clock)


class LayerCache:
    """LRU cache of one MoE layer's experts (`num_experts` of them in the store, `capacity` slots
    of its own, or its share of a shared `pool`).

    `blueprint` is one expert of the layer on the meta device: slots are copies of it bound to
    their buffers. `store` has `read_into` and `copy_into` (mtmoe.serve.store); `pump` is the
    loader's (None: no loader; prefetches are then performed with `fill`)."""

    def __init__(self, name: str, blueprint: nn.Module, layout: ExpertLayout, num_experts: int, capacity: int,
                 store, metrics: ServeMetrics, device: torch.device, pool: Optional[SlotPool] = None,
                 pump: Optional[Callable[[], None]] = None):
        self.name, self.layout, self.num_experts, self.capacity = name, layout, num_experts, capacity
        self._blueprint, self._store, self._metrics, self._device = blueprint, store, metrics, device
        self._pump = pump or (lambda: None)
        self._pool = pool if pool is not None else SlotPool(capacity, layout.nbytes)
        if self._pool.nbytes < layout.nbytes:
            raise ValueError(f"{name}: its experts ({layout.nbytes} bytes) do not fit the pool's slots "
                             f"({self._pool.nbytes} bytes)")
        self._pool.caches.append(self)
        self._lru: dict[int, Slot] = {}  # expert -> its slot (not EMPTY); slot.used orders them
        self._lock = self._pool.lock
        self._held: list[int] = []  # never evicted (hold)
        self._call_left: set[int] = set()  # streaming: experts of the current call not computed yet
        self._call_stream: list[int] = []  # streaming: its missing experts without a slot yet, in order

    def release(self) -> None:
        """Empties every slot of the pool, frees their buffers and lets go of the store (the runtime's
        close). Caches and slots refer to each other, so without this the slot buffers (on a GPU:
        device memory) and the store (on a GPU: every expert in pinned RAM) would live on until
        Python's cycle collector ran. The layer's experts cannot run afterwards."""
        with self._lock:
            for slot in self._pool.slots:
                slot.__init__(slot.index)
            self._pool.caches.clear()
            self._lru.clear()
            self._held.clear()
            self._call_left.clear()
            self._call_stream.clear()
            self._store = ClosedStore()

    # -- compute side ------------------------------------------------------------------------
    @contextmanager
    def use(self, expert: int) -> Iterator[nn.Module]:
        """The module of `expert`, resident for the duration of the block (loaded now if needed)."""
        slot = self._acquire(expert)
        try:
            if slot.copy_event is not None:
                torch.cuda.current_stream(self._device).wait_event(slot.copy_event)
            yield slot.module
        finally:
            with self._lock:
                slot.pins -= 1

    def _acquire(self, expert: int) -> Slot:
        """Pins and returns the READY slot of `expert`, counting a hit, late prefetch or miss."""
        started = time.perf_counter()
        outcome = None  # "late" once compute had to wait for, or take over, a pending prefetch
        while True:
            self._pump()  # prefetches the channel has carried by now are READY
            load = wait = None
            with self._lock:
                slot = self._lru.get(expert)
                if slot is not None:  # a started prefetch the loader has not settled yet may be carried
                    self._settle(slot, time.perf_counter())
                if slot is not None and slot.state == READY:
                    slot.pins += 1
                    slot.used = self._pool.tick()
                    if outcome is None:
                        self._metrics.add(self.name, activations=1, hits=1, prefetch_hits=int(slot.prefetched))
                    else:
                        self._count_stall(outcome, started)
                    slot.prefetched = False
                    return slot
                if slot is not None and slot.state == QUEUED:  # the channel has not started it: load it now
                    slot.state, slot.prefetched = LOADING, False
                    slot.pins += 1
                    load, outcome = slot, outcome or "late"
                elif slot is not None:  # LOADING: on the channel (or another thread loads it)
                    wait, outcome = slot, outcome or "late"
                else:  # not a slot whose expert the call still needs, unless every free one has one
                    # (a streamed load failed and its slot went to a later expert of the call:
                    # the expert needed now comes first; the later one loads on demand)
                    victim = (self._victim(protect=self._call_left - {expert}, spare_prefetched=True,
                                           borrow=len(self._lru) < self.capacity)
                              or self._victim(protect={expert}, spare_prefetched=True, borrow=True))
                    if victim is not None:
                        self._reserve(victim, expert, LOADING, prefetched=False)
                        victim.pins += 1
                        load, outcome = victim, outcome or "miss"
                    else:  # every free slot is mid-load: wait for the first to be carried
                        loading = [s for s in self._pool.slots if s.state == LOADING]
                        if not loading:
                            raise RuntimeError(f"{self.name}: no slot can take expert {expert} (all pinned)")
                        wait = min(loading, key=lambda s: s.ready_at)
            if load is not None:
                try:
                    self._load(load, expert, by_prefetch=False)
                except BaseException:
                    with self._lock:
                        load.pins -= 1
                    raise
                self._count_stall(outcome, started)
                return load
            if wait.ready_at == INF:  # another thread's own load: poll
                time.sleep(1e-4)
            else:  # a prefetch on the simulated channel
                wait_until(wait.ready_at)

    def _count_stall(self, outcome: str, started: float) -> None:
        stall = time.perf_counter() - started
        if outcome == "late":
            self._metrics.add(self.name, activations=1, late_prefetches=1, stall_s=stall)
        else:
            self._metrics.add(self.name, activations=1, misses=1, stall_s=stall)

    # -- prefetch side -----------------------------------------------------------------------
    def reserve_prefetch(self, experts: Sequence[int], fill: bool = False) -> list[tuple[Slot, int]]:
        """Reserves slots for `experts` (most wanted first) and returns the (slot, expert) loads to
        perform: all of them if the cache holds them, else as many as fit (`fill`) or one fewer,
        leaving a slot for on-demand loads. Held experts take no room from the others. Wanted
        experts already here become most recently used and are not evicted for the others; nothing
        pinned, loading or held is evicted."""
        self._pump()
        with self._lock:
            return self._reserve_wanted(list(dict.fromkeys(int(e) for e in experts)), fill)

    def _reserve_wanted(self, wanted: list[int], fill: bool) -> list[tuple[Slot, int]]:
        room = len(self._pool.slots) - sum(len(cache._held) for cache in self._pool.caches)
        others = [e for e in wanted if e not in self._held]
        others = others if len(others) <= room else others[: room if fill else room - 1]
        wanted = [e for e in wanted if e in self._held or e in others]
        protect = set(wanted)
        jobs = []
        for e in reversed(wanted):
            if e in self._lru:
                self._lru[e].used = self._pool.tick()
        for e in wanted:
            if e in self._lru:
                continue
            victim = self._victim(protect, spare_prefetched=False, borrow=True)
            if victim is None:
                break
            self._reserve(victim, e, QUEUED, prefetched=True)
            jobs.append((victim, e))
        return jobs

    def hold(self, experts: Sequence[int]) -> list[tuple[Slot, int]]:
        """Keeps `experts` (at most capacity - 1, most wanted first) resident from now on, instead of
        the ones held before; returns the loads of those not here yet (like reserve_prefetch)."""
        self._pump()
        with self._lock:
            self._held = list(dict.fromkeys(int(e) for e in experts))[: max(self.capacity - 1, 0)]
            return self._reserve_wanted(list(self._held), fill=True)

    def held(self) -> list[int]:
        with self._lock:
            return list(self._held)

    def plan_call(self, order: Sequence[int]) -> list[tuple[Slot, int]]:
        """Streaming: the experts the current call will run, in execution order. Reserves slots for
        the missing ones in that order, in slots holding nothing the call needs (and not held), and
        returns the loads to start now; `after_use` continues as slots free up."""
        self._pump()
        with self._lock:
            self._call_left = set(order)
            self._call_stream = [e for e in order if e not in self._lru]
            return self._stream()

    def after_use(self, expert: int) -> list[tuple[Slot, int]]:
        """Streaming: `expert` is done for the current call; its slot may take the next missing one."""
        if self._call_stream:
            self._pump()
        with self._lock:
            self._call_left.discard(expert)
            return self._stream() if self._call_stream else []

    def _stream(self) -> list[tuple[Slot, int]]:
        jobs = []
        while self._call_stream:
            expert = self._call_stream[0]
            if expert not in self._lru:
                victim = self._victim(protect=self._call_left, spare_prefetched=False, borrow=True)
                if victim is None:
                    break
                self._reserve(victim, expert, QUEUED, prefetched=True)
                jobs.append((victim, expert))
            self._call_stream.pop(0)
        return jobs

    def fill(self, slot: Slot, expert: int) -> None:
        """Performs a reserved prefetch now, in the calling thread (on the channel at once), unless
        compute took it over or it was cancelled meanwhile. A failure frees the slot (compute then
        loads on demand)."""
        with self._lock:
            if not self.is_queued(slot, expert):
                return
            slot.state = LOADING
        try:
            self._load(slot, expert, by_prefetch=True)
        except Exception as e:  # correctness never depends on a prefetch
            log.warning("prefetch of expert %d of %s failed (%s); it will load on demand", expert, self.name, e)

    # -- the loader's side (mtmoe.serve.loader) -----------------------------------------------
    def is_queued(self, slot: Slot, expert: int) -> bool:
        """`slot` still waits for the channel with this layer's `expert` (not cancelled, not taken over)."""
        return self._is_job(slot, expert, QUEUED)

    def _is_job(self, slot: Slot, expert: int, state: str) -> bool:
        return slot.owner is self and slot.expert == expert and slot.state == state

    def start(self, slot: Slot, expert: int, ready_at: float) -> bool:
        """The channel has started carrying a queued prefetch (`is_queued`), done at `ready_at`:
        the expert is copied into its slot now, which is LOADING until then. False if the copy
        failed (the slot is freed: compute loads the expert on demand)."""
        with self._lock:
            slot.state, slot.ready_at = LOADING, ready_at
            try:
                slot.copy_event = self._store.copy_into(self.name, expert, self._bind(slot))
            except Exception as e:  # correctness never depends on a prefetch
                log.warning("prefetch of expert %d of %s failed (%s); it will load on demand", expert, self.name, e)
                self._free(slot)
                return False
        self._metrics.add(self.name, bytes_moved=self.layout.nbytes, prefetch_loads=1)
        return True

    def settle(self, slot: Slot, expert: int, now: float) -> bool:
        """A started prefetch is READY once the channel has carried it (by `now`). True when the
        loader need not watch it any more."""
        with self._lock:
            if not self._is_job(slot, expert, LOADING):
                return True  # compute found it carried first
            return self._settle(slot, now)

    def _settle(self, slot: Slot, now: float) -> bool:
        """Lock held: a LOADING slot the channel has carried by `now` becomes READY (a thread's own
        load, `ready_at` infinite, never does here); True unless it is still loading."""
        if slot.state == LOADING and now >= slot.ready_at:
            slot.state = READY
        return slot.state != LOADING

    # -- shared ------------------------------------------------------------------------------
    def _load(self, slot: Slot, expert: int, by_prefetch: bool) -> None:
        """Copies `expert` into `slot` (LOADING, owned by the calling thread), then marks it READY."""
        try:
            with self._lock:
                dst = self._bind(slot)
            event = self._store.read_into(self.name, expert, dst)
        except BaseException:
            with self._lock:
                self._free(slot)
            raise
        with self._lock:
            slot.copy_event, slot.state = event, READY
        self._metrics.add(self.name, bytes_moved=self.layout.nbytes, prefetch_loads=int(by_prefetch))

    def _bind(self, slot: Slot) -> torch.Tensor:
        """Lock held: `slot`'s buffer (allocated on its first load) as this layer's expert module
        (`slot.module`); returns the bytes to copy the expert into."""
        if slot.flat is None:
            slot.flat = torch.empty(self._pool.nbytes, dtype=torch.uint8, device=self._device)
            self._metrics.add(self.name, resident_bytes=self._pool.nbytes)
        dst = slot.flat[:self.layout.nbytes]
        module = slot.modules.get(self.name)
        if module is None:  # the slot's first expert of this layer: a module of the layer's type on its bytes
            module = copy.deepcopy(self._blueprint)
            self.layout.bind(module, dst)
            slot.modules[self.name] = module.eval()
        slot.module = module
        return dst

    def _victim(self, protect, spare_prefetched: bool, borrow: bool) -> Optional[Slot]:
        """A slot to reuse (lock held): an empty one, else the least recently used READY or QUEUED
        slot that is not pinned and whose expert is not in `protect` (with `spare_prefetched`,
        unused prefetches last), of this layer or, in a shared pool and with `borrow`, another
        layer's that it does not hold, need in its call in progress or expect from a prefetch (for
        an on-demand load with nothing else to take, the last also); it is freed here.

        Who borrows: predictions (prefetches, streaming) always may, an on-demand load only while
        its layer has fewer slots than its share. A miss says nothing about the layer's coming
        calls, and under one LRU order for all layers the layer that runs least often loses its
        experts every time: the encoder runs once per sentence, and by the next sentence the
        decoder's ~20 steps have used every other slot more recently (measured, 8-expert model
        with half resident and no prefetch: encoder hit rate 0.50 with a budget per layer, 0.01
        shared with borrowing on every miss)."""
        for slot in self._pool.slots:
            if slot.state == EMPTY and slot.pins == 0:
                return slot
        candidates = [slot for e, slot in self._lru.items() if self._evictable(slot) and e not in protect]
        for cache in self._pool.caches if borrow else ():
            if cache is not self:
                candidates += [slot for e, slot in cache._lru.items()
                               if cache._evictable(slot) and e not in cache._call_left
                               and (spare_prefetched or not slot.prefetched)]
        if not candidates:
            return None
        if spare_prefetched:  # unused prefetches last (another layer's after this one's), else least recently used
            slot = min(candidates, key=lambda s: (s.prefetched, s.prefetched and s.owner is not self, s.used))
        else:
            slot = min(candidates, key=lambda s: s.used)
        if slot.prefetched:
            self._metrics.add(slot.owner.name, wasted_prefetches=1)
        slot.owner._free(slot)
        return slot

    def _evictable(self, slot: Slot) -> bool:
        """Lock held: `slot` (one of this layer's) is neither computing, loading nor held."""
        return slot.pins == 0 and slot.state in (READY, QUEUED) and slot.expert not in self._held

    def _reserve(self, slot: Slot, expert: int, state: str, prefetched: bool) -> None:
        slot.owner, slot.expert, slot.state, slot.prefetched, slot.copy_event = self, expert, state, prefetched, None
        slot.used = self._pool.tick()  # most recently used
        slot.ready_at = INF
        self._lru[expert] = slot

    def _free(self, slot: Slot) -> None:
        if slot.expert is not None and self._lru.get(slot.expert) is slot:
            del self._lru[slot.expert]
        slot.owner, slot.expert, slot.state, slot.prefetched = None, None, EMPTY, False

    # -- introspection -----------------------------------------------------------------------
    def blueprint(self) -> nn.Module:
        """A copy of the layer's expert module on the meta device (type and shapes, no memory)."""
        return copy.deepcopy(self._blueprint)

    def resident(self) -> list[int]:
        """Experts READY here, least recently used first."""
        self._pump()
        with self._lock:
            return [e for e, slot in self._by_use() if slot.state == READY]

    def present(self) -> list[int]:
        """Experts READY here (least recently used first), then those being loaded (oldest reservation first)."""
        self._pump()
        with self._lock:
            by_use = self._by_use()
            return [e for e, slot in by_use if slot.state == READY] + [e for e, slot in by_use if slot.state != READY]

    def _by_use(self) -> list[tuple[int, Slot]]:
        return sorted(self._lru.items(), key=lambda item: item[1].used)
