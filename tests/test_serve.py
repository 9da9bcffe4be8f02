"""Serving with only some experts resident (mtmoe.serve): the LRU cache and its accounting, the
expert store, prefetch policies, and outputs identical to the all-resident model for every
policy and cache size, on plain, pruned and int8 models."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import TINY, run_cli
from mtmoe.config import MoEConfig, ServeConfig
from mtmoe.data.vocab import EOS_ID
from mtmoe.errors import ConfigError, ExportError
from mtmoe.formats.export_format import load_export
from mtmoe.model.generation import translate, translate_ids
from mtmoe.model.quantized import QuantizedExperts, quantize_experts
from mtmoe.model.seq2seq import Seq2Seq, build_model
from mtmoe.model.transformer import FeedForward
from mtmoe.serve import policies
from mtmoe.serve import store as store_module
from mtmoe.serve.cache import LOADING, QUEUED, LayerCache, SlotPool
from mtmoe.serve.loader import Loader
from mtmoe.serve.layout import ExpertLayout
from mtmoe.serve.metrics import ServeMetrics, merge_summaries
from mtmoe.serve.runtime import OffloadedExperts, load_for_serving, offload
from mtmoe.serve.store import Channel, DiskStore
from mtmoe.serve.validate import cache_sizes, check_serve

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models decode fastest on one thread (the runtime's compute thread makes every copy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Two MoE layers per stack (moe.every=1: enc0, enc1, dec0, dec1), so speculative prefetching has
# a next layer to predict.


# -- a store in memory, for the cache alone ----------------------------------------------------
class MemoryStore:
    """Blobs of `experts` (FeedForward modules) held in a dict; records every copy. `channel`: a
    simulated slow tier that on-demand reads queue for, as DiskStore's do."""

    def __init__(self, experts, layer="L", channel=None):
        self.layout = ExpertLayout.of(experts[0])
        self.blobs = {(layer, e): self.layout.pack(m.state_dict()) for e, m in enumerate(experts)}
        self.reads = []
        self.channel = channel

    def copy_into(self, layer, expert, dst):
        self.reads.append(expert)
        dst.copy_(self.blobs[layer, expert])

    read_into = DiskStore.read_into  # copy_into, once the channel (if any) has carried the blob


def make_cache(capacity, num_experts=4, channel=None, loader=None):
    torch.manual_seed(0)
    experts = [FeedForward(8, 16).eval() for _ in range(num_experts)]
    store = MemoryStore(experts, channel=channel)
    metrics = ServeMetrics(["L"], "none", {"L": capacity}, 0, "layer")
    blueprint = copy.deepcopy(experts[0]).to("meta")
    cache = LayerCache("L", blueprint, store.layout, num_experts, capacity, store, metrics, torch.device("cpu"),
                       pump=loader.pump if loader else None)
    return cache, store, metrics, experts


def make_channel_cache(capacity, seconds):
    """make_cache with a loader and a simulated channel carrying one expert in `seconds`."""
    channel = Channel(ExpertLayout.of(FeedForward(8, 16)).nbytes / seconds / 1e9)
    loader = Loader(channel)
    return (*make_cache(capacity, channel=channel, loader=loader), loader)


def counts(metrics):
    s = metrics.summary()
    return {k: s[k] for k in ("activations", "hits", "prefetch_hits", "late_prefetches", "misses", "prefetch_loads",
                              "wasted_prefetches")}


def test_lru_evicts_least_recently_used_and_counts_hits():
    cache, store, metrics, experts = make_cache(capacity=2)
    x = torch.randn(3, 8)
    for e in (0, 1, 0, 2):  # 2 evicts 1 (0 was used after it)
        with cache.use(e) as module:
            assert torch.equal(module(x), experts[e](x))  # the slot computes expert e exactly
    assert cache.resident() == [0, 2]
    with cache.use(1):  # evicts 0, now the least recently used
        pass
    assert cache.resident() == [2, 1]
    assert store.reads == [0, 1, 2, 1]
    assert counts(metrics) == {"activations": 5, "hits": 1, "prefetch_hits": 0, "late_prefetches": 0, "misses": 4,
                               "prefetch_loads": 0, "wasted_prefetches": 0}
    s = metrics.summary()
    assert s["hit_rate"] == 0.2
    assert s["bytes_moved"] == 4 * store.layout.nbytes
    assert s["peak_resident_expert_bytes"] == 2 * store.layout.nbytes  # two slots, allocated once


def test_prefetch_hits_and_wasted_prefetches():
    cache, store, metrics, _ = make_cache(capacity=2)

    def prefetch(*experts):
        jobs = cache.reserve_prefetch(experts)
        for slot, e in jobs:
            cache.fill(slot, e)
        return [e for _, e in jobs]

    with cache.use(0):
        pass
    assert prefetch(3, 1, 2) == [3]  # more than the cache holds: one slot stays for on-demand loads
    with cache.use(0):
        pass
    with cache.use(1):  # evicts 0, not the least recently used 3: prefetched and not used yet
        pass
    assert cache.resident() == [3, 1]
    with cache.use(3):  # a prefetch hit
        pass
    assert prefetch(2) == [2]  # evicts 1 (least recently used)
    with cache.use(3):  # a plain hit
        pass
    assert prefetch(0) == [0]  # evicts 2, prefetched and never used: wasted
    assert cache.resident() == [3, 0]
    assert counts(metrics) == {"activations": 5, "hits": 3, "prefetch_hits": 1, "late_prefetches": 0, "misses": 2,
                               "prefetch_loads": 3, "wasted_prefetches": 1}


def test_queued_prefetch_taken_over_by_compute():
    """A prefetch the loader has not started yet is loaded by compute itself, once."""
    cache, store, metrics, _ = make_cache(capacity=2)
    (slot, expert), = cache.reserve_prefetch([2])
    with cache.use(2):
        pass
    cache.fill(slot, expert)  # the loader comes late: nothing left to do
    assert store.reads == [2]
    assert counts(metrics)["late_prefetches"] == 1 and counts(metrics)["prefetch_loads"] == 0


def test_channel_starts_a_queued_read_once_free_and_claims_nothing_before():
    """store.Channel: a read queued behind others starts when the channel has carried them (an
    idle channel starts it when it was queued), and until it starts it claims no time."""
    channel = Channel(gbps=1e-9)  # one byte per second: times below are byte counts
    assert channel.start_by(2, queued_at=10.0, now=10.0) == 12.0  # idle: starts at once
    assert channel.start_by(3, queued_at=10.0, now=11.0) is None  # behind it: not started by 11
    assert channel.free_at == 12.0  # and it claimed nothing
    assert channel.start_by(3, queued_at=10.0, now=13.0) == 15.0  # started at 12, when the first was carried
    assert channel.start_by(1, queued_at=20.0, now=30.0) == 21.0  # idle since 15: started when queued
    before = time.perf_counter()
    assert channel.claim(1) >= before + 1.0  # an on-demand read reaching it now


def test_loader_prefetch_is_ready_once_the_channel_has_carried_it():
    """A prefetch is copied when the channel starts it and READY only once the channel has carried
    it: compute needing it earlier waits (a late prefetch). One queued behind it and cancelled (its
    slot taken by a newer prediction) is never copied and takes no channel time: the next starts
    when the first is carried."""
    seconds = 0.06  # per expert on the simulated channel
    cache, store, metrics, experts, loader = make_channel_cache(capacity=2, seconds=seconds)
    loader.submit(cache, cache.reserve_prefetch([1, 2], fill=True))
    assert (cache._lru[1].state, cache._lru[2].state, store.reads) == (LOADING, QUEUED, [1])
    carried = cache._lru[1].ready_at
    loader.submit(cache, cache.reserve_prefetch([3], fill=True))  # 1 is loading: 3 takes 2's slot
    assert sorted(cache._lru) == [1, 3] and store.reads == [1]
    x = torch.randn(3, 8)
    with cache.use(1) as module:  # still on the channel: compute waits for it
        assert time.perf_counter() >= carried
        assert torch.equal(module(x), experts[1](x))
    with cache.use(3) as module:  # started when 1 was carried, not after a slot for 2
        assert torch.equal(module(x), experts[3](x))
    assert store.reads == [1, 3] and store.channel.free_at == pytest.approx(carried + seconds, abs=1e-9)
    assert counts(metrics) == {"activations": 2, "hits": 0, "prefetch_hits": 0, "late_prefetches": 2,
                               "misses": 0, "prefetch_loads": 2, "wasted_prefetches": 1}
    assert not loader.pending()


def test_loader_queued_prefetch_taken_over_goes_on_the_channel_at_once():
    """A queued prefetch compute needs now is read by compute at once, on the channel behind the
    read it carries already (ahead of any still queued); the other prefetch is then a hit."""
    seconds = 0.04
    cache, store, metrics, _, loader = make_channel_cache(capacity=3, seconds=seconds)
    loader.submit(cache, cache.reserve_prefetch([1, 2, 3], fill=True))
    carried = cache._lru[1].ready_at
    with cache.use(3):  # queued behind 2: compute reads it now, after 1
        assert time.perf_counter() >= carried + seconds
    assert store.reads == [1, 3]
    with cache.use(1):  # carried meanwhile: a prefetch hit
        pass
    loader.wait_idle()  # 2 starts after 3 (which went ahead of it)
    assert store.reads == [1, 3, 2] and cache._lru[2].ready_at == pytest.approx(carried + 2 * seconds, abs=1e-9)
    assert counts(metrics) == {"activations": 2, "hits": 1, "prefetch_hits": 1, "late_prefetches": 1,
                               "misses": 0, "prefetch_loads": 2, "wasted_prefetches": 0}


def test_held_experts_stay_resident():
    """Held experts are never evicted (on-demand loads and prefetches use the other slots), at
    most capacity - 1 are held, and holding others releases them."""
    cache, store, metrics, _ = make_cache(capacity=3, num_experts=6)
    for slot, e in cache.hold([5, 4, 3]):  # only 2 of 3 slots may be held
        cache.fill(slot, e)
    assert cache.held() == [5, 4] and sorted(cache.resident()) == [4, 5]
    for e in (0, 1, 2, 0, 3):
        with cache.use(e):
            pass
    assert sorted(cache.resident()) == [3, 4, 5]  # 0, 1, 2 took turns in the one free slot
    for slot, e in cache.reserve_prefetch([1, 2], fill=True):  # room for one besides the held two
        cache.fill(slot, e)
    assert sorted(cache.resident()) == [1, 4, 5]
    for slot, e in cache.hold([0]):  # 4 and 5 are no longer held: the least recently used (5) goes
        cache.fill(slot, e)
    assert cache.held() == [0] and sorted(cache.resident()) == [0, 1, 4]
    with cache.use(2):  # evicts 4, now older than 1
        pass
    assert sorted(cache.resident()) == [0, 1, 2]


def test_streaming_loads_a_calls_missing_experts_in_order():
    """plan_call reserves the call's missing experts in free slots (not one the call still needs
    or a held one); each finished expert frees its slot for the next."""
    cache, store, metrics, _ = make_cache(capacity=3, num_experts=6)
    for slot, e in cache.hold([0]):
        cache.fill(slot, e)
    with cache.use(1):
        pass
    jobs = cache.plan_call([1, 0, 2, 3, 4])  # 1 and 0 resident; one free slot for 2
    assert [e for _, e in jobs] == [2]
    assert cache.after_use(1) != [] and cache.after_use(0) == []  # 1's slot takes 3; 0 is held
    assert sorted(e for e, slot in cache._lru.items()) == [0, 2, 3]
    for e in (2, 3):
        with cache.use(e):  # taken over by compute: the loader never ran (late prefetches)
            pass
    assert [e for _, e in cache.after_use(2)] == [4]
    assert counts(metrics)["late_prefetches"] == 2 and store.reads == [0, 1, 2, 3]


def test_failed_stream_load_whose_slot_went_to_a_later_expert():
    """A prefetch of the call's first expert fails in the loader (its slot is freed) after the call
    was planned, and streaming gives that slot to a later expert of the call: the expert needed now
    takes a slot from a later one (which then loads on demand) instead of finding none."""
    cache, store, metrics, _ = make_cache(capacity=2, num_experts=6)
    jobs = cache.reserve_prefetch([1, 2], fill=True)  # both slots queued for 1 and 2
    assert cache.plan_call([1, 2, 3]) == []  # 3 has no slot yet: 1 and 2 are needed first
    failing = store.read_into
    store.read_into = lambda layer, expert, dst: (_ for _ in ()).throw(OSError("simulated read error"))
    slot, expert = jobs[0]
    cache.fill(slot, expert)  # the load of 1 fails: its slot is freed
    store.read_into = failing
    assert cache.after_use(0) != []  # streaming moves on: the free slot is reserved for 3
    for e in (1, 2, 3):
        with cache.use(e) as module:
            assert module is not None
        cache.after_use(e)
    assert counts(metrics)["activations"] == 3


def make_shared(size, layers=("A", "B"), num_experts=4, shares=None):
    """Caches of `layers` (different experts each) drawing on one pool of `size` slots, each with a
    share of 1 (or `shares`); `size` None: each layer a pool of its own share."""
    torch.manual_seed(0)
    shares = shares or {name: 1 for name in layers}
    experts = {name: [FeedForward(8, 16).eval() for _ in range(num_experts)] for name in layers}
    store = MemoryStore(experts[layers[0]], layers[0])
    for name in layers[1:]:
        store.blobs.update({(name, e): store.layout.pack(m.state_dict()) for e, m in enumerate(experts[name])})
    metrics = ServeMetrics(list(layers), "none", shares, 0, "model" if size else "layer")
    pool = SlotPool(size, store.layout.nbytes) if size else None
    caches = {name: LayerCache(name, copy.deepcopy(experts[name][0]).to("meta"), store.layout, num_experts,
                               shares[name], store, metrics, torch.device("cpu"), pool) for name in layers}
    return caches, store, metrics, experts


def test_shared_pool_gives_slots_to_whichever_layer_needs_them():
    """budget=model: a layer takes the least recently used slot of any layer (on a miss only while
    it holds fewer than its share; a prediction always), computes its own expert in it, and the
    pool's slots are all the memory there is."""
    caches, store, metrics, experts = make_shared(size=3)
    a, b = caches["A"], caches["B"]
    x = torch.randn(3, 8)
    for name, e in (("A", 0), ("A", 1), ("A", 2), ("B", 0)):  # B's expert evicts A's least recently used (0)
        with caches[name].use(e) as module:
            assert torch.equal(module(x), experts[name][e](x))  # the layer's own expert e, not the other's
    assert a.resident() == [1, 2] and b.resident() == [0]
    with a.use(0) as module:  # back to A: evicts A's 1, now the least recently used of the pool
        assert torch.equal(module(x), experts["A"][0](x))
    assert a.resident() == [2, 0] and b.resident() == [0]
    with b.use(1):  # a miss of a layer holding its share (1) recycles its own slot, though A's 2 is older
        pass
    assert a.resident() == [2, 0] and b.resident() == [1]
    for slot, e in b.reserve_prefetch([2], fill=True):  # a prediction borrows: the pool's least recently used
        b.fill(slot, e)
    assert a.resident() == [0] and b.resident() == [1, 2]
    assert metrics.summary()["peak_resident_expert_bytes"] == 3 * store.layout.nbytes  # 3 slots, each allocated once


def test_shared_pool_spares_other_layers_holds_and_prefetches():
    """Another layer's held experts are never taken; its unused prefetches are not taken by a
    prefetch (the other layer's bet on its coming call), and by an on-demand load only when
    nothing else can go."""
    caches, store, metrics, _ = make_shared(size=3, layers=("A", "B", "C"))
    a, b, c = caches["A"], caches["B"], caches["C"]
    a.capacity = 2  # a share of 2: one expert may be held
    for slot, e in a.hold([3]):
        a.fill(slot, e)
    for slot, e in b.reserve_prefetch([1], fill=True):
        b.fill(slot, e)
    with c.use(0):  # the third, free slot
        pass
    jobs = c.reserve_prefetch([1, 2])
    assert [e for _, e in jobs] == [1]  # into C's own slot; A's held 3 and B's prefetched 1 stay
    for slot, e in jobs:
        c.fill(slot, e)
    with c.use(2):  # on demand: C's own unused prefetch goes before B's
        pass
    assert a.resident() == [3] and b.resident() == [1] and c.resident() == [2]
    with c.use(2), c.use(0):  # C's slot is pinned: B's unused prefetch is all that can go
        pass
    assert a.resident() == [3] and b.resident() == [] and c.resident() == [2, 0]
    assert counts(metrics)["wasted_prefetches"] == 2  # C's 1 and B's 1


def test_shared_pool_stale_prefetch_of_another_layer_loads_nothing():
    """A prefetch job of layer A whose slot went to layer B, which then queued its own expert with
    the same number there: A's late job must not copy A's expert into B's slot."""
    caches, store, metrics, experts = make_shared(size=1)
    a, b = caches["A"], caches["B"]
    (stale_slot, stale_expert), = a.reserve_prefetch([1], fill=True)
    with b.use(1):  # on demand, nothing else to take: B takes A's queued slot
        pass
    with a.use(0):  # A takes it back for its 0 (on demand)
        pass
    (slot, expert), = b.reserve_prefetch([1], fill=True)  # B queues its 1 in the same slot
    assert (slot, expert) == (stale_slot, stale_expert)
    a.fill(stale_slot, stale_expert)  # the loader reaches A's old job: the slot is B's now
    b.fill(slot, expert)
    x = torch.randn(3, 8)
    with b.use(1) as module:
        assert torch.equal(module(x), experts["B"][1](x))
    assert store.reads == [1, 0, 1]


def test_serve_bound_counts_the_runtimes_loads_and_belady_bounds_them():
    """scripts/serve_bound.py: its LRU count equals the loads of the runtime's caches (no prefetch)
    on the same accesses, per layer and shared; Belady never needs more; a hand-traced case."""
    spec = importlib.util.spec_from_file_location("serve_bound", ROOT / "scripts" / "serve_bound.py")
    bound = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bound)
    hand = [("A", 0), ("A", 1), ("B", 0), ("A", 2), ("A", 0)]
    assert bound.count_loads(hand, {"A": 1, "B": 1}, True, "lru") == 5  # B borrows A's 0; A recycles its own
    assert bound.count_loads(hand, {"A": 1, "B": 1}, True, "belady") == 4
    rng = np.random.default_rng(0)
    layers = ("A", "B", "C")
    accesses = [(layers[i], int(e)) for i, e in zip(rng.integers(0, 3, 300), rng.integers(0, 4, 300))]
    shares = {"A": 1, "B": 2, "C": 1}
    for pooled in (False, True):
        caches, store, _, _ = make_shared(sum(shares.values()) if pooled else None, layers, shares=shares)
        for name, e in accesses:
            with caches[name].use(e):
                pass
        lru = bound.count_loads(accesses, shares, pooled, "lru")
        assert lru == len(store.reads)
        assert bound.count_loads(accesses, shares, pooled, "belady") <= lru
    assert bound.count_loads(accesses, shares, True, "belady") <= bound.count_loads(accesses, shares, False, "belady")


def test_serve_bound_prefetch_simulation_hand_traced():
    """scripts/serve_bound.py's prefetch simulation on hand-traced cases (loads of 0.5 s, one channel;
    (stall s, loads, hits)): a load overlaps the previous call's compute only if it is foreseen, and
    knowledge is acted on only once its call (next call) or sentence has started; a slot still
    computing is not evicted."""
    spec = importlib.util.spec_from_file_location("serve_bound", ROOT / "scripts" / "serve_bound.py")
    bound = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bound)
    A, B, C = ("L", 0), ("L", 1), ("L", 2)
    one_sentence = [[A, B]], [[(0, 1.0), (1, 1.0)]]
    # A's load stalls the start; B's runs while A computes
    assert bound.prefetch_stall(*one_sentence, 2, 0.5, "next call") == (0.5, 2, 1)
    two_sentences = [[A], [B]], [[(0, 1.0)], [(0, 1.0)]]
    assert bound.prefetch_stall(*two_sentences, 2, 0.5, "stream") == (0.5, 2, 1)
    assert bound.prefetch_stall(*two_sentences, 2, 0.5, "sentence") == (1.0, 2, 0)  # B unknown until it starts
    assert bound.prefetch_stall(*two_sentences, 2, 0.5, "sentence + direction", [B]) == (0.5, 2, 1)  # guessed
    assert bound.prefetch_stall(*two_sentences, 2, 0.5, "sentence + direction", [C]) == (1.0, 3, 0)  # wrong guess
    assert bound.prefetch_stall(*two_sentences, 2, 0.5, "next call + direction", [B]) == (0.5, 2, 1)
    three_calls = [[A, B, C]], [[(0, 1.0), (1, 0.1), (2, 1.0)]]
    # next call: C is revealed when B's call starts (1.5 s) and lands at 2.0 s, 0.4 s after it is needed
    stall, loads, hits = bound.prefetch_stall(*three_calls, 3, 0.5, "next call")
    assert abs(stall - 0.9) < 1e-9 and (loads, hits) == (3, 1)
    assert bound.prefetch_stall(*three_calls, 3, 0.5, "sentence") == (0.5, 3, 2)
    # one slot: nothing overlaps (the slot computing cannot take the next expert): every load stalls
    assert bound.prefetch_stall([[A, B, A]], [[(0, 1.0), (1, 1.0), (2, 1.0)]], 1, 0.5, "stream") == (1.5, 3, 0)
    assert bound.prefetch_stall(*one_sentence, 2, 0.0, "stream") == (0.0, 2, 2)


def test_zero_row_expert_call_loads_nothing():
    cache, store, metrics, _ = make_cache(capacity=1)
    out = OffloadedExperts(cache).forward_expert(3, torch.zeros(0, 8))
    assert out.shape == (0, 8)
    assert store.reads == [] and cache.resident() == [] and counts(metrics)["activations"] == 0
    assert metrics.summary()["peak_resident_expert_bytes"] == 0


def test_metrics_of_several_processes_merge():
    """mtmoe-eval workers: counters add up, the peak is one process's, speed is the job's."""
    summaries = []
    for hits, peak in ((3, 100), (1, 300)):
        m = ServeMetrics(["L"], "none", {"L": 1}, 400, "layer")
        m.add("L", activations=4, hits=hits, misses=4 - hits, bytes_moved=10, stall_s=0.5, resident_bytes=peak)
        summaries.append(m.summary())
    merged = merge_summaries(summaries, sentences=20, seconds=4.0)
    assert (merged["activations"], merged["hits"], merged["hit_rate"], merged["bytes_moved"]) == (8, 4, 0.5, 20)
    assert merged["stall_s"] == 1.0 and merged["peak_resident_expert_bytes"] == 300
    assert merged["sentences_per_s"] == 5.0 and merged["processes"] == 2


# -- random models, served from a store -------------------------------------------------------
def random_model(top_k=1, kept=None, bits=None, seed=0):
    """A random tiny MoE model, 4 experts in every FFN, EOS likelier so hypotheses end at varied lengths."""
    moe = MoEConfig(num_experts=4, top_k=top_k, every=1, kept_experts=kept or {})
    model = build_model(60, TINY, moe, seed=seed).eval()
    with torch.no_grad():
        model.embed.weight[EOS_ID] *= 3.0
    if bits:
        quantize_experts(model, bits)
    return model


SENTENCES = [np.random.default_rng(0).integers(4, 60, size=n) for n in (2, 7, 4, 11, 5)]


def decode_all(model):
    """Beam 4 on a batch, and greedy one sentence at a time (batch-1 serving)."""
    return (translate_ids(model, SENTENCES, tag_id=4, beam=4),
            [translate_ids(model, [s], tag_id=4, beam=1)[0] for s in SENTENCES])


def fake_routing(model):
    """Routing statistics in routing.json's form for en-de: each layer prefers its experts in
    reverse id order (the language policy's seeding and holding; outputs never depend on them)."""
    layers = {name: len(layer.experts) for name, layer in model.moe_layers()}
    names = model.moe_layer_names()
    stats = {name: {"share": [float(e + 1) / sum(range(1, n + 1)) for e in range(n)]}
             for name, n in zip(names, layers.values())}
    return {"layers": names, "overall": stats, "by_direction": {"en-de": stats},
            "by_language": {"en": {k: v for k, v in stats.items() if k.startswith("enc")},
                            "de": {k: v for k, v in stats.items() if k.startswith("dec")}}}


def served(model, tmp_path, **serve):
    """A copy of `model` offloaded through a store cut from its own weights (the language policy
    set to en-de)."""
    weights = tmp_path / "model.safetensors"
    if not weights.exists():
        save_file({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, str(weights))
    model = copy.deepcopy(model)
    language = serve.get("prefetch") == "language"
    runtime = offload(model, weights, ServeConfig(**serve), routing=fake_routing(model) if language else None)
    runtime.set_direction("en", "de")
    return model, runtime


@pytest.mark.parametrize("variant", ["plain", "top2", "pruned", "int8"])
@pytest.mark.parametrize("policy", ["none", "speculative", "language"])
def test_offloaded_outputs_equal_resident(tmp_path, variant, policy):
    """Token ids identical to the all-resident model, greedy and beam, with 1 (2 for top-2),
    half and all experts resident in each layer's own slots (budget=layer; the shared pool:
    test_shared_budget_outputs_equal_resident); the speculative and language policies really prefetch."""
    kept = {"enc0": [0, 2, 3], "enc1": [1, 3], "dec0": [0, 1, 2, 3], "dec1": [0, 3]}
    model = random_model(top_k=2 if variant == "top2" else 1, kept=kept if variant == "pruned" else None,
                         bits=8 if variant == "int8" else None)
    if variant == "int8":
        assert isinstance(model.encoder[0].ffn.experts, QuantizedExperts)
    reference = decode_all(model)
    for size in ((2, 0.5, 4) if variant == "top2" else (1, 0.5, 4)):
        offloaded, runtime = served(model, tmp_path, experts_per_layer=size, prefetch=policy, budget="layer")
        with runtime:
            assert decode_all(offloaded) == reference, f"experts_per_layer={size}"
        s = runtime.metrics.summary()
        assert s["activations"] > 0 and s["hits"] + s["late_prefetches"] + s["misses"] == s["activations"]
        if variant == "pruned":
            assert {name: cache.num_experts for name, cache in runtime.caches.items()} == \
                {name: len(ids) for name, ids in kept.items()}
        if policy in ("speculative", "language") and size != 4:
            assert s["prefetch_loads"] > 0 and s["prefetch_hits"] > 0
        if policy == "none":
            assert s["prefetch_loads"] == 0


@pytest.mark.parametrize("variant", ["plain", "top2", "pruned", "int8"])
@pytest.mark.parametrize("policy", ["none", "speculative", "language"])
def test_shared_budget_outputs_equal_resident(tmp_path, variant, policy):
    """serve.budget=model: token ids identical to the all-resident model with the layers' slots
    pooled, a layer really holding more than its share, and the pool never exceeded."""
    kept = {"enc0": [0, 2, 3], "enc1": [1, 3], "dec0": [0, 1, 2, 3], "dec1": [0, 3]}
    model = random_model(top_k=2 if variant == "top2" else 1, kept=kept if variant == "pruned" else None,
                         bits=8 if variant == "int8" else None)
    reference = decode_all(model)
    size = 2 if variant == "top2" else 1
    offloaded, runtime = served(model, tmp_path, experts_per_layer=size, prefetch=policy, budget="model")
    most = {name: 0 for name in runtime.caches}
    for name, cache in runtime.caches.items():  # records how many slots each layer has at any time
        reserve = cache._reserve

        def counting(slot, expert, state, prefetched, _cache=cache, _reserve=reserve, _name=name):
            _reserve(slot, expert, state, prefetched)  # under the pool's lock: present() would wait for it
            most[_name] = max(most[_name], len(_cache._lru))
        cache._reserve = counting
    with runtime:
        assert decode_all(offloaded) == reference
    s = runtime.metrics.summary()
    share = dict(s["experts_per_layer"])
    assert any(most[name] > share[name] for name in most), (most, share)
    nbytes = next(iter(runtime.caches.values())).layout.nbytes
    assert s["peak_resident_expert_bytes"] <= sum(share.values()) * nbytes
    if policy != "none":
        assert s["prefetch_hits"] > 0


def test_speculative_prediction_is_the_routers_choice():
    """predicted_choices picks what Router.forward picks (plain and pruned routers); Router.choose
    (from the logits) equals Router.select's choice (from the probabilities)."""
    model = random_model(top_k=2, kept={"enc1": [0, 2, 3]})
    x, keep = torch.randn(50, 32), torch.rand(50) > 0.2
    for name in ("enc0", "enc1"):
        router = model.get_submodule(model.moe_layer_prefix(name)[:-1]).gate
        with torch.no_grad():
            plan = router(x, keep)[0]
            assert torch.equal(router.choose(x), router.select(x)[3])
            assert torch.equal(policies.predicted_choices(router, x, keep), plan.expert[keep])
            assert torch.equal(policies.predicted_choices(router, x, None), router.select(x)[3])


def test_ranked_choices_most_chosen_first_on_both_paths():
    """Most chosen first, ties by lower id, out-of-range ids left out; counted on the host for a
    few ids and with bincount for many, with the same result."""
    few = torch.tensor([[0], [3], [1], [3], [0], [-1], [4]])
    assert policies.ranked_choices(few, 4) == [0, 3, 1]
    many = few.repeat(20, 1)  # 140 ids > HOST_COUNT_MAX
    assert many.numel() > policies.HOST_COUNT_MAX and policies.ranked_choices(many, 4) == [0, 3, 1]
    assert policies.ranked_choices(torch.zeros(0, 1, dtype=torch.long), 4) == []
    assert policies.ranked_counts([0.0, 0.25, 0.75]) == [2, 1]


def test_wrong_speculative_prefetch_gives_identical_output(tmp_path, monkeypatch):
    """Every speculative guess replaced by experts the next router did not pick: all prefetches
    are wasted or overruled, outputs stay identical."""
    model = random_model()
    reference = decode_all(model)
    right = policies.predicted_choices

    def wrong(router, x, keep):
        picked = set(right(router, x, keep).reshape(-1).tolist())
        return torch.tensor([e for e in range(router.num_experts) if e not in picked], dtype=torch.long)
    monkeypatch.setattr(policies, "predicted_choices", wrong)
    offloaded, runtime = served(model, tmp_path, experts_per_layer=1, prefetch="speculative")
    with runtime:
        assert decode_all(offloaded) == reference
    s = runtime.metrics.summary()
    assert s["prefetch_loads"] > 0 and s["wasted_prefetches"] > 0


@pytest.mark.parametrize("policy", ["speculative", "language"])
def test_failed_or_slow_prefetches_fall_back_to_on_demand_loads(tmp_path, policy):
    """Prefetches (and streamed loads) whose copy fails when the channel starts them, or that are
    still on the channel when compute needs them (a 0.5 MB/s slow tier: a 16 KB expert takes
    32 ms, longer than the compute between prediction and use even on a loaded box), change
    nothing but the timing."""
    model = random_model()
    reference = decode_all(model)

    offloaded, runtime = served(model, tmp_path, experts_per_layer=2, prefetch=policy)
    runtime.wait_idle()  # the language policy's seeding loads, before the store starts failing
    failed = []

    def failing(layer, expert, dst):
        failed.append((layer, expert))
        raise OSError("simulated read error")
    for cache in runtime.caches.values():  # prefetches fail; on-demand reads (read_into) work
        cache._store = type("FailingStore", (), {"read_into": staticmethod(cache._store.read_into),
                                                 "copy_into": staticmethod(failing)})()
    runtime.metrics.reset()
    with runtime:
        assert decode_all(offloaded) == reference
    assert failed and runtime.metrics.summary()["prefetch_loads"] == 0

    offloaded, runtime = served(model, tmp_path, experts_per_layer=2, prefetch=policy, slow_gbps=0.0005)
    with runtime:
        assert translate_ids(offloaded, SENTENCES[:2], tag_id=4, beam=1) == \
            translate_ids(model, SENTENCES[:2], tag_id=4, beam=1)
    s = runtime.metrics.summary()
    assert s["late_prefetches"] > 0 and s["stall_s"] > 0


def test_unrouted_experts_are_never_loaded(tmp_path):
    """A 2-token source, top-1: in each encoder MoE layer at most 2 of 4 experts have rows, and
    exactly those are read from the store."""
    model = random_model()
    offloaded, runtime = served(model, tmp_path, experts_per_layer=4)
    src = torch.tensor([[7, EOS_ID]])
    with runtime, torch.no_grad():
        _, _, _, stats = offloaded.encode(src)
        routed = {name: set(torch.nonzero(s["routed"]).flatten().tolist()) for name, s in zip(("enc0", "enc1"), stats)}
        for name in ("enc0", "enc1"):
            assert set(runtime.caches[name].resident()) == routed[name] and len(routed[name]) <= 2
        assert runtime.caches["dec0"].resident() == []
    s = runtime.metrics.summary()
    assert s["activations"] == sum(len(r) for r in routed.values()) == s["misses"]


def test_expert_store_is_safetensors_and_rebuilt_when_stale(tmp_path):
    model = random_model()
    offloaded, runtime = served(model, tmp_path, experts_per_layer=2)
    runtime.close()
    store = tmp_path / "experts.safetensors"
    with safe_open(str(store), framework="pt") as f:
        assert sorted(f.keys()) == sorted(f"{layer}.{e}" for layer in ("enc0", "enc1", "dec0", "dec1") for e in range(4))
        meta = f.metadata()
        layout = ExpertLayout.from_json(json.loads(meta["layers"])["dec1"]["layout"])
        blob = f.get_tensor("dec1.2")
    assert blob.dtype == torch.uint8 and blob.numel() == layout.nbytes
    assert torch.equal(layout.views(blob)["fc1.weight"], model.decoder[1].ffn.experts.w1[2])

    other = random_model(seed=5)  # new weights in the same file: the store follows
    save_file({k: v.clone() for k, v in other.state_dict().items()}, str(tmp_path / "model.safetensors"))
    offloaded, runtime = served(other, tmp_path, experts_per_layer=2)
    with runtime:
        assert decode_all(offloaded) == decode_all(other)


def test_simulated_slow_tier_is_one_channel_shared_by_all_reads(tmp_path):
    """serve.slow_gbps: reads from two threads at once queue for one channel of that bandwidth (an
    on-demand load and a prefetch do not each get the full bandwidth): two blobs take at least
    twice one blob's time, and each read returns only once its blob has been carried."""
    served(random_model(), tmp_path, experts_per_layer=2)[1].close()
    with safe_open(str(tmp_path / "experts.safetensors"), framework="pt") as f:
        nbytes = f.get_tensor("enc0.0").numel()
    seconds = 0.05  # per blob
    store = DiskStore(tmp_path / "experts.safetensors", {}, slow_gbps=nbytes / seconds / 1e9)
    dst = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(2)]
    finished = []
    started = time.perf_counter()

    def read(i):
        store.read_into("enc0", i, dst[i])
        finished.append(time.perf_counter() - started)
    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert min(finished) >= seconds and max(finished) >= 2 * seconds
    with safe_open(str(tmp_path / "experts.safetensors"), framework="pt") as f:
        assert all(torch.equal(dst[i], f.get_tensor(f"enc0.{i}")) for i in range(2))


def test_pregate_policy_prefetches_the_relayed_plan(tmp_path):
    model = build_model(60, TINY, MoEConfig(num_experts=4, top_k=1, every=1, pregate=True), seed=0).eval()
    reference = decode_all(model)
    offloaded, runtime = served(model, tmp_path, experts_per_layer=1, prefetch="pregate")
    with runtime:
        assert decode_all(offloaded) == reference
    s = runtime.metrics.summary()
    assert s["prefetch_loads"] > 0 and s["prefetch_hits"] > 0


def test_pregate_listener_prefetches_the_plans_experts_most_demanded_first():
    """The relay's plan [N, k] becomes a prefetch of its experts, most tokens first (ties: lower id),
    ids out of range (padding, dropped choices) left out."""
    model = build_model(60, TINY, MoEConfig(num_experts=4, top_k=1, every=1, pregate=True), seed=0).eval()
    calls = []
    policy = policies.Pregate(model, lambda layer, experts: calls.append((layer, experts)))
    name, layer = policies.moe_stacks(model)["dec"][1]
    layer.relay.listeners[-1](layer.relay_index, torch.tensor([[2], [0], [2], [-1], [4], [1], [0], [2], [3], [1]]))
    policy.close()
    assert calls == [(name, [2, 0, 1, 3])] and not layer.relay.listeners


def test_language_policy_holds_the_directions_experts(tmp_path, caplog):
    """set_direction holds each layer's most used experts for the direction (encoder: capacity - 2;
    decoder: none in its first mode, predictions alone; capacity - 1 in a mode that holds) and
    fills the rest; a direction without statistics seeds nothing."""
    model = random_model()
    offloaded, runtime = served(model, tmp_path, experts_per_layer=3, prefetch="language")  # en-de
    with runtime:
        runtime.wait_idle()
        assert {name: cache.held() for name, cache in runtime.caches.items()} == \
            {"enc0": [3], "enc1": [3], "dec0": [], "dec1": []}  # fake_routing prefers high ids
        assert all(sorted(cache.resident()) == [1, 2, 3] for cache in runtime.caches.values())
        runtime.policy._modes["dec1"].mode = policies.Mode(predict=True, hold=True)
        runtime.set_direction("en", "de")
        assert runtime.caches["dec1"].held() == [3, 2] and runtime.caches["dec0"].held() == []
        with caplog.at_level("WARNING", logger="mtmoe"):
            runtime.set_direction("fr", "cs")
        assert "no routing statistics for fr-cs at enc0" in caplog.text
        assert all(cache.held() == [] for cache in runtime.caches.values())


def test_mode_chooser_measures_each_mode_and_keeps_the_best():
    """A window in each mode, then the best for `commit` windows, then each again from the first;
    counters reset (a benchmark's warm-up) restart the window."""
    a, b, c = policies.DECODER_MODES
    chooser = policies.ModeChooser([a, b, c], window=2, commit=2)
    hits = acts = 0
    changes = []

    def calls(n, rate):
        nonlocal hits, acts
        for _ in range(n):
            acts += 10
            hits += int(10 * rate)
            changes.append(chooser.after_call(hits, acts))

    assert chooser.mode == a and chooser.after_call(0, 0) is None  # the first call starts the window
    calls(2, 0.5)
    assert chooser.mode == b and changes[-1] == b
    calls(2, 0.9)
    assert chooser.mode == c
    calls(2, 0.9)  # a tie with b: the earlier mode
    assert chooser.mode == b and chooser._rates == {a: 0.5, b: 0.9, c: 0.9}
    calls(4, 0.1)  # committed for 2 windows whatever happens meanwhile
    assert chooser.mode == a and chooser._rates == {}  # then each again, from the first
    calls(2, 0.8)
    calls(2, 0.3)
    calls(2, 0.7)
    assert chooser.mode == a
    chooser = policies.ModeChooser([a, b], window=2, commit=2)
    chooser.after_call(100, 1000)
    chooser.after_call(0, 0)  # reset: this call starts the window again
    assert chooser.after_call(5, 10) is None
    assert chooser.after_call(10, 20) == b and chooser._rates == {a: 0.5}


def test_language_policy_switching_modes_keeps_outputs(tmp_path):
    """Modes switched between decoding steps (ModeChoosers with a tiny window: predictions on and
    off, holds taken and released) change which experts are resident, never the outputs."""
    model = random_model()
    reference = decode_all(model)
    offloaded, runtime = served(model, tmp_path, experts_per_layer=2, prefetch="language")
    holds, modes = [], set()

    class Recording(policies.ModeChooser):
        def after_call(self, hits, activations):
            modes.add(self.mode)
            return super().after_call(hits, activations)

    with runtime:
        for name, chooser in runtime.policy._modes.items():
            runtime.policy._modes[name] = Recording(chooser.modes, window=2, commit=1)
        real_hold = runtime.hold
        runtime.hold = lambda layer, experts: (holds.append((layer, list(experts))), real_hold(layer, experts))
        assert decode_all(offloaded) == reference
    assert ("dec0", [3]) in holds and ("dec0", []) in holds  # holds were taken and released
    assert modes == set(policies.DECODER_MODES)  # every mode served calls


def test_prediction_points():
    """The language policy's ahead predictions for a layer: the earliest and the latest of the
    previous layer's FFN input (from the second layer on), the layer's input, and in a decoder
    layer the state after self-attention."""
    model = random_model()
    enc, dec = model.encoder, model.decoder
    assert policies.prediction_points(enc, 0, decoder=False) == [(enc[0], enc[0].ffn_norm)]
    assert policies.prediction_points(enc, 1, decoder=False) == [(enc[0].ffn, None), (enc[1], enc[1].ffn_norm)]
    assert policies.prediction_points(dec, 0, decoder=True) == [
        (dec[0], dec[0].ffn_norm), (dec[0].cross_attn_norm, dec[0].ffn_norm)]
    assert policies.prediction_points(dec, 1, decoder=True) == [
        (dec[0].ffn, None), (dec[1].cross_attn_norm, dec[1].ffn_norm)]


def test_language_policy_on_a_model_with_dense_layers_first(tmp_path):
    """MoE in every second layer (the main job's layout): the MoE layer's router is applied ahead at
    the dense FFN before it; outputs identical, the prefetches are used."""
    moe = MoEConfig(num_experts=4, top_k=1, every=2)
    model = build_model(60, TINY, moe, seed=0).eval()
    reference = decode_all(model)
    for size in (1, 2):
        offloaded, runtime = served(model, tmp_path, experts_per_layer=size, prefetch="language")
        with runtime:
            assert decode_all(offloaded) == reference
        s = runtime.metrics.summary()
        assert s["prefetch_loads"] > 0 and s["prefetch_hits"] > 0


def test_language_policy_needs_routing_statistics(tmp_path, exports):
    model = random_model()
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    with pytest.raises(ConfigError, match="serve.prefetch=language needs the routing statistics"):
        offload(copy.deepcopy(model), weights, ServeConfig(experts_per_layer=1, prefetch="language"))
    old = tmp_path / "old_export"
    shutil.copytree(exports["full"], old)
    (old / "routing.json").unlink()
    with pytest.raises(ExportError, match=r"routing.json: missing \(this export has no routing statistics.* "
                                          r"Re-export it: mtmoe-export checkpoint="):
        load_for_serving(old, ServeConfig(experts_per_layer=1, prefetch="language"))


def test_mixed_requests_decode_by_direction(exports, tmp_path, monkeypatch):
    """Requests of mixed directions: one decoding call per direction, the runtime set to it first,
    translations in request order and identical to the all-resident model's."""
    from mtmoe.serve import requests as serve_requests

    model, vocab, _ = load_export(exports["full"])
    requests = [("en", "de", LINES[0]), ("de", "en", "Ein Hund."), ("en", "de", LINES[1]), ("en", "fr", LINES[2]),
                ("de", "en", "Zwei Männer.")]
    expected = [translate(model, vocab, [line], tgt, beam=2)[0] for _, tgt, line in requests]
    served_model, _, _, runtime = load_for_serving(exports["full"], ServeConfig(
        experts_per_layer=1, prefetch="language", store_dir=str(tmp_path)))
    calls, directions = [], []
    real_translate, real_set = serve_requests.translate, runtime.set_direction
    monkeypatch.setattr(serve_requests, "translate", lambda m, v, lines, tgt, *a: calls.append(len(lines))
                        or real_translate(m, v, lines, tgt, *a))
    monkeypatch.setattr(runtime, "set_direction", lambda src, tgt: directions.append(f"{src}-{tgt}") or real_set(src, tgt))
    with runtime:
        assert serve_requests.translate_requests(served_model, vocab, requests, runtime, beam=2) == expected
    assert directions == ["en-de", "de-en", "en-fr"] and calls == [2, 2, 1]
    with pytest.raises(ConfigError, match="unknown language 'xx'"):
        serve_requests.translate_requests(model, vocab, [("en", "xx", "A dog.")])


def test_pregate_needs_a_pregate_model(tmp_path):
    with pytest.raises(ConfigError, match="serve.prefetch=pregate needs a model trained with moe.pregate=true"):
        served(random_model(), tmp_path, experts_per_layer=1, prefetch="pregate")


# -- config errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("serve,message", [
    (dict(experts_per_layer=1, prefetch="oracle"), r"serve.prefetch='oracle': expected one of none, speculative"),
    (dict(experts_per_layer=0), r"serve.experts_per_layer=0 must be > 0"),
    (dict(experts_per_layer=1.5), r"serve.experts_per_layer=1.5: a count"),
    (dict(prefetch="speculative"), r"serve.prefetch=speculative needs serve.experts_per_layer"),
    (dict(experts_per_layer=1, slow_gbps=-1), r"serve.slow_gbps=-1 must be >= 0"),
    (dict(experts_per_layer=1, budget="global"), r"serve.budget='global': expected one of layer, model"),
])
def test_bad_serve_config(serve, message):
    with pytest.raises(ConfigError, match=message):
        check_serve(ServeConfig(**serve))


def test_cache_sizes():
    sizes = cache_sizes(ServeConfig(experts_per_layer=0.25), {"enc1": 8, "dec1": 3}, top_k=1)
    assert sizes == {"enc1": 2, "dec1": 1}  # fractions of each layer's own experts, rounded up
    assert cache_sizes(ServeConfig(experts_per_layer=6), {"enc1": 8, "dec1": 3}, top_k=2) == {"enc1": 6, "dec1": 3}
    # a fraction's float product is not rounded up past the count it names
    assert cache_sizes(ServeConfig(experts_per_layer=0.55), {"enc1": 100, "dec1": 50}, top_k=1) == {"enc1": 55, "dec1": 28}
    assert cache_sizes(ServeConfig(experts_per_layer=0.14), {"enc1": 50}, top_k=1) == {"enc1": 7}
    with pytest.raises(ConfigError, match=r"serve.experts_per_layer=0.25 keeps 1 of the 4 experts of MoE layer "
                                          r"enc1 resident, fewer than moe.top_k=2"):
        cache_sizes(ServeConfig(experts_per_layer=0.25), {"enc1": 4}, top_k=2)


# -- exports and the command line ----------------------------------------------------------------
LINES = ["A man is riding a bike.", "Two dogs play in the snow.", "A girl in a red dress.", "People walk."]


@pytest.mark.parametrize("kind", ["full", "pruned", "int8"])
def test_served_exports_equal_resident(exports, kind, tmp_path):
    model, vocab, config = load_export(exports[kind])
    reference = [translate(model, vocab, LINES, "de", beam=b) for b in (1, 2)]
    experts = len(model.encoder[1].ffn.experts)
    assert experts == (2 if kind == "pruned" else 4)
    for size in (1, 0.5, experts):
        served_model, _, _, runtime = load_for_serving(exports[kind], ServeConfig(
            experts_per_layer=size, prefetch="none", store_dir=str(tmp_path)))
        with runtime:
            assert [translate(served_model, vocab, LINES, "de", beam=b) for b in (1, 2)] == reference
        slots = sum(cache.capacity * cache.layout.nbytes for cache in runtime.caches.values())
        assert 0 < runtime.metrics.summary()["peak_resident_expert_bytes"] <= slots
    assert not (exports[kind] / "experts.safetensors").exists()  # serve.store_dir was used


def test_closing_the_runtime_frees_the_store_and_slots(tmp_path):
    """Caches and slots refer to each other: closing the runtime breaks that, so the store (on a GPU:
    every expert in pinned RAM) and the slot buffers go with the model, not when Python's cycle
    collector happens to run (mtmoe-eval's tuning loads a served model once per beam size). The
    model cannot decode after it."""
    import gc
    import weakref

    model, runtime = served(random_model(), tmp_path, experts_per_layer=2, budget="model")
    with runtime:
        decode_all(model)
    with pytest.raises(RuntimeError, match="the serving runtime was closed"):
        decode_all(model)
    gc.disable()
    try:
        model, runtime = served(random_model(), tmp_path, experts_per_layer=1)
        decode_all(model)
        store = weakref.ref(runtime.caches["dec1"]._store)
        buffer = weakref.ref(next(slot.flat for cache in runtime.caches.values() for slot in cache._pool.slots
                                  if slot.flat is not None))
        runtime.close()
        del model, runtime
        assert store() is None and buffer() is None
    finally:
        gc.enable()


def test_bad_export_files_are_named_before_decoding(exports, tmp_path, corpus):
    """A damaged model.safetensors served offloaded is named (it raised safetensors' own error), and
    telemetry of a dense export is refused before the test set is decoded (it failed after)."""
    from mtmoe.eval.run import evaluate_export

    broken = shutil.copytree(exports["full"], tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ExportError, match=r"broken/model.safetensors: unreadable"):
        load_for_serving(broken, ServeConfig(experts_per_layer=1, store_dir=str(tmp_path)))
    dense = shutil.copytree(exports["full"], tmp_path / "dense")
    config = json.loads((dense / "config.json").read_text())
    config["moe"]["enabled"] = False
    (dense / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"telemetry=true: .*dense is a dense model"):
        evaluate_export(dense, f"{corpus}/test_2016_flickr", langs=["en", "de"], telemetry=True)


def test_eval_times_decoding_without_loading(exports, tmp_path, corpus, monkeypatch):
    """mtmoe-eval's decode_seconds and sentences/s (and the serving summary's) count the beam searches,
    not loading the model or building the expert store (on a clock that only loading and decoding move)."""
    from mtmoe.eval import run

    clock = [0.0]

    def advancing(real, seconds):
        def call(*args, **kwargs):
            clock[0] += seconds
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(run, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))  # eval's clock alone
    monkeypatch.setattr(run, "load_for_serving", advancing(run.load_for_serving, 100.0))
    monkeypatch.setattr(run, "translate_per_penalty", advancing(run.translate_per_penalty, 1.0))
    report = run.evaluate_export(exports["full"], f"{corpus}/test_2016_flickr", directions=["en-de", "de-en"], beam=1,
                                 limit=2, serve=ServeConfig(experts_per_layer=2, store_dir=str(tmp_path)))
    assert report["decode_seconds"] == 2.0 and report["sentences_per_s"] == 2.0
    assert report["serving"]["sentences_per_s"] == 2.0


def test_eval_report_path_is_checked_before_decoding(tmp_path):
    """mtmoe-eval's `out` is checked before any decoding (a folder or an unusable parent failed with
    a traceback after it, losing the work; a .txt name had its JSON overwritten by the table)."""
    from mtmoe.eval.run import check_report_path

    assert check_report_path(tmp_path / "new" / "eval.json") == tmp_path / "new" / "eval.json"
    assert (tmp_path / "new").is_dir()
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path / "new", r"is a folder: give a file name"),
                         (tmp_path / "r.txt", r"the report's table is written beside it with .txt"),
                         (tmp_path / "afile" / "r.json", r"afile/r.json: cannot make its folder")):
        with pytest.raises(ConfigError, match=message):
            check_report_path(out)


def test_offloaded_loading_moves_no_expert_to_the_device(exports, tmp_path, monkeypatch):
    """load_for_serving builds the model in CPU RAM and moves it to the device only once the runtime
    has taken the experts' place: a model offloaded because its experts do not fit on the GPU never
    has them all there."""
    moved = []
    real_to = Seq2Seq.to

    def to(self, *args, **kwargs):
        moved.append({type(layer.experts).__name__ for layer in self.moe_layer_map().values()})
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(Seq2Seq, "to", to)
    served_model, _, _, runtime = load_for_serving(exports["full"], ServeConfig(experts_per_layer=1,
                                                                                store_dir=str(tmp_path)))
    runtime.close()
    assert moved == [{"OffloadedExperts"}]


@pytest.mark.slow
def test_translate_and_eval_cli_serve(exports, tmp_path, corpus):
    model, vocab, _ = load_export(exports["full"])
    expected = translate(model, vocab, LINES, "de", beam=2)
    # The exports are shared by the pytest workers: serving writes its expert store elsewhere.
    proc = run_cli("mtmoe-translate", [f"model={exports['full']}", "src=en", "tgt=de", "beam=2",
                                       "serve.experts_per_layer=0.25", "serve.prefetch=none",
                                       f"serve.store_dir={tmp_path}"],
                   stdin="\n".join(LINES) + "\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == expected
    assert "serving: prefetch=none experts/layer={'enc1': 1, 'dec1': 1} budget=model hit rate" in proc.stderr

    out = tmp_path / "eval.json"
    proc = run_cli("mtmoe-eval", [f"model={exports['int8']}", f"test={corpus}/test_2016_flickr", "langs=[en,de]",
                                  "beam=1", "limit=4", f"out={out}", "serve.experts_per_layer=2",
                                  f"serve.store_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    serving = json.loads(out.read_text())["serving"]
    assert serving["sentences"] == 8 and serving["experts_per_layer"] == {"enc1": 2, "dec1": 2}
    assert 0 <= serving["hit_rate"] <= 1 and serving["bytes_moved"] > 0 and serving["stall_s"] >= 0
    assert "serving: prefetch=none" in proc.stdout and "serving: prefetch=none" in out.with_suffix(".txt").read_text()


def test_pinned_store_packs_blobs_into_segments_that_pinned_rounding_keeps(tmp_path):
    """The GPU store's page-locked RAM (store.copy_blobs / pack_segments): blobs are views into a
    few segments, never overlapping, each equal to its blob on disk; every segment but the last is a
    power of two (torch's pinned allocator rounds each allocation up to one), so the pinned bytes stay
    near the store's instead of ~2x with one allocation per expert."""
    def rounded(n):
        return 1 << (n - 1).bit_length()

    expert = 2 * 512 * 2048 * 4 + (2048 + 512) * 4  # a 512x2048 fp32 expert: 8.0 MB
    sizes = [expert] * 64
    segments, placed = store_module.pack_segments(sizes)
    assert all(n == store_module.PINNED_SEGMENT_BYTES for n in segments[:-1])
    spans = sorted((seg, off, off + n) for (seg, off), n in zip(placed, sizes))
    assert all(a[0] != b[0] or a[2] <= b[1] for a, b in zip(spans, spans[1:]))  # no overlap
    assert all(end <= segments[seg] and off % store_module.BLOB_ALIGN == 0 for seg, off, end in spans)
    per_expert, packed = sum(map(rounded, sizes)), sum(map(rounded, segments))
    assert per_expert > 1.9 * sum(sizes) and packed < 1.1 * sum(sizes)  # 1.91x vs 1.06x here
    big = 3 * store_module.PINNED_SEGMENT_BYTES // 2  # a blob larger than a segment: segments of 2x
    segments, placed = store_module.pack_segments([big, 10, big])
    assert segments == [2 * store_module.PINNED_SEGMENT_BYTES, big] and placed == [(0, 0), (0, big), (1, 0)]
    assert store_module.pack_segments([]) == ([], [])

    model = random_model(bits=8)
    _, runtime = served(model, tmp_path, experts_per_layer=2)
    runtime.close()
    specs = {name: store_module.LayerSpec(model.moe_layer_prefix(name), len(layer.experts),
                                          ExpertLayout.of(layer.experts.blueprint()))
             for name, layer in model.moe_layer_map().items()}
    disk = store_module.DiskStore(tmp_path / "experts.safetensors", specs)
    made = []
    segments, blobs = store_module.copy_blobs(disk, lambda n: made.append(n) or torch.empty(n, dtype=torch.uint8))
    assert made == [t.numel() for t in segments] and len(segments) == 1 and len(blobs) == 16
    for (name, e), blob in blobs.items():
        assert blob.untyped_storage().data_ptr() == segments[0].untyped_storage().data_ptr()
        expected = torch.empty(disk.nbytes(name), dtype=torch.uint8)
        disk.copy_into(name, e, expected)
        assert torch.equal(blob, expected)


# -- on a GPU -----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["plain", "int8", "pregate"])
@pytest.mark.parametrize("policy", ["none", "speculative", "language", "pregate"])
def test_offloaded_on_cuda_equals_resident_on_cuda(tmp_path, variant, policy):
    """On CUDA the fast tier is GPU memory and the store is pinned CPU RAM copied on a side stream
    (store.PinnedStore): token ids identical to the all-resident model on the same GPU, greedy and beam,
    with 1 and 2 of 4 experts resident, for every prefetch policy (pregate on a pre-gated model)."""
    if (policy == "pregate") != (variant == "pregate"):
        pytest.skip("the pregate policy serves a model trained with moe.pregate=true, and only it")
    if variant == "pregate":
        model = build_model(60, TINY, MoEConfig(num_experts=4, top_k=1, every=1, pregate=True), seed=0).eval()
    else:
        model = random_model(bits=8 if variant == "int8" else None)
    model = model.cuda()
    reference = decode_all(model)
    for size in (1, 2):
        offloaded, runtime = served(model, tmp_path, experts_per_layer=size, prefetch=policy)
        with runtime:
            assert next(offloaded.parameters()).device.type == "cuda"
            assert decode_all(offloaded) == reference, f"experts_per_layer={size}"
        s = runtime.metrics.summary()
        # experts really moved host -> GPU: on demand, or ahead of use (a GPU's copies are quick enough
        # for the language and pregate policies to leave no miss and no late prefetch at all)
        assert s["activations"] > 0 and s["bytes_moved"] > 0 and s["misses"] + s["prefetch_loads"] > 0
        if policy != "none":
            assert s["prefetch_loads"] > 0
