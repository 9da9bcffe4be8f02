"""The serving runtime: a Seq2Seq whose experts are served from a slow-tier store through
per-layer LRU caches (on one shared pool of slots, or a pool each: serve.budget), with prefetching.

`offload(model, weights, serve)` replaces each MoEFFN's `experts` (an ExpertGroup, see
mtmoe.model.experts) with OffloadedExperts, another ExpertGroup: the dispatch hands it the rows of
each expert and it runs expert i from the layer's cache. Everything else (embeddings, attention,
routers, norms) stays resident and untouched, and decoding code does not know the difference, so
outputs are those of the all-resident model. An expert with no rows touches neither the cache
nor the store.

`load_for_serving(export_dir, serve)` builds an export's model this way without ever reading its
experts into memory: the model is constructed, its (freshly initialised) experts are swapped out
and dropped, and only the non-expert tensors of model.safetensors are loaded.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from mtmoe.config import ServeConfig
from mtmoe.data.vocab import Vocab
from mtmoe.errors import ConfigError
from mtmoe.formats.export_format import (build_model, load_export, load_weights, read_export_config, read_routing_stats,
                                         read_weights)
from mtmoe.model.experts import ExpertGroup
from mtmoe.model.keys import experts_prefix
from mtmoe.model.moe import MoEFFN
from mtmoe.model.seq2seq import Seq2Seq
from mtmoe.serve.cache import LayerCache, SlotPool
from mtmoe.serve.layout import ExpertLayout
from mtmoe.serve.loader import Loader
from mtmoe.serve.metrics import ServeMetrics
from mtmoe.serve.policies import install_policy
from mtmoe.serve.store import DiskStore, LayerSpec, PinnedStore, open_store
from mtmoe.serve.validate import cache_sizes, check_serve, offloading

log = logging.getLogger("mtmoe")

Submit = Callable[[LayerCache, list], None]
"""Starts (slot, expert) loads of a cache (Loader.submit)."""


class OffloadedExperts(ExpertGroup):
    """Stands in for `MoEFFN.experts` (the ExpertGroup interface): runs each expert that has rows
    from the layer's cache. Holds no parameters: the experts live in the cache's slots and the
    store. An expert with no rows is neither loaded nor run.

    `stream` (language-aware serving): when a call's experts are known (execution_order), their
    missing ones are loaded in execution order while the others compute (LayerCache.plan_call)."""

    def __init__(self, cache: LayerCache, stream: Optional[Submit] = None):
        super().__init__()
        self.cache = cache
        self.stream = stream
        self.num_local = cache.num_experts

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [R, D] rows grouped by expert (`counts` [L]) -> [R, D]; padding rows 0."""
        rows = counts.tolist()  # serving decides loads on the host anyway
        starts = [sum(rows[:i]) for i in range(len(rows))]
        out = x.new_zeros(x.shape)  # an expert maps D -> D
        for i in self.execution_order(rows):
            if rows[i]:
                out[starts[i]:starts[i] + rows[i]] = self.forward_expert(i, x[starts[i]:starts[i] + rows[i]])
        return out

    def forward_expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # no tokens: nothing to load
            return x.new_zeros(x.shape)
        with self.cache.use(index) as expert:
            y = expert(x)
        if self.stream is not None:  # its slot may now take the call's next missing expert
            self.stream(self.cache, self.cache.after_use(index))
        return y

    def execution_order(self, filled: Sequence[int]) -> list[int]:
        """The order the experts run in: those already resident first (least recently used first),
        then those being loaded, then the rest by index. In index order, the loads for the first
        missing experts would evict resident ones still needed later in the same call (the encoder,
        which runs a whole sentence at once, needs most experts of a layer). With `stream`, the
        missing ones of this call are queued for loading in that order."""
        present = [e for e in self.cache.present() if filled[e] > 0]
        chosen = set(present)
        order = present + [e for e in range(len(self)) if e not in chosen]
        if self.stream is not None:
            self.stream(self.cache, self.cache.plan_call([e for e in order if filled[e] > 0]))
        return order

    def blueprint(self) -> nn.Module:
        return self.cache.blueprint()

    def extra_repr(self) -> str:
        return f"{self.cache.capacity} of {self.cache.num_experts} experts resident (or its share of a shared pool)"


class OffloadRuntime:
    """Owns the caches, the loader and the prefetch policy of one offloaded model.

    `prefetch(layer, experts)` is the one entry point of every policy. `budget` (serve.budget):
    `layer` gives each cache its own `capacities[name]` slots, `model` one pool of their sum.
    Close the runtime (or use it as a context manager) when done decoding: it drops the prefetches
    still queued, detaches the policy and frees the slots and the store."""

    def __init__(self, layers: dict[str, MoEFFN], specs: dict[str, LayerSpec], capacities: dict[str, int],
                 store, device: torch.device, model: Seq2Seq, policy: str, routing: Optional[dict], budget: str):
        all_bytes = sum(spec.layout.nbytes * spec.num_experts for spec in specs.values())
        self.metrics = ServeMetrics(list(layers), policy, capacities, all_bytes, budget)
        self.caches: dict[str, LayerCache] = {}
        self.capacities, self.routing = capacities, routing
        self.loader = Loader(store.channel)
        try:
            self.policy = install_policy(policy, model, self)
        except BaseException:
            self.loader.close()
            raise
        stream = self.loader.submit if getattr(self.policy, "streams", False) else None
        shared = None  # budget=layer: each cache makes its own pool
        if budget == "model":
            shared = SlotPool(sum(capacities.values()), max(spec.layout.nbytes for spec in specs.values()))
        for name, layer in layers.items():
            cache = LayerCache(name, layer.experts.blueprint(), specs[name].layout, specs[name].num_experts,
                               capacities[name], store, self.metrics, device, shared, self.loader.pump)
            layer.experts = OffloadedExperts(cache, stream)  # the resident experts are dropped here
            self.caches[name] = cache

    def prefetch(self, layer: str, experts: Sequence[int], fill: bool = False) -> None:
        """Starts loading `experts` of `layer` (most wanted first; as many as its cache holds, or
        one fewer unless `fill`)."""
        cache = self.caches[layer]
        self.loader.submit(cache, cache.reserve_prefetch(experts, fill))

    def hold(self, layer: str, experts: Sequence[int]) -> None:
        """Keeps `experts` of `layer` resident (at most its capacity - 1) and starts loading them."""
        cache = self.caches[layer]
        self.loader.submit(cache, cache.hold(experts))

    def set_direction(self, src: str, tgt: str) -> None:
        """The direction of the requests decoded next: a language-aware policy seeds and holds each
        layer's cache for it; other policies ignore it."""
        if hasattr(self.policy, "set_direction"):
            self.policy.set_direction(src, tgt)

    def wait_idle(self) -> None:
        """Waits until no prefetch is pending (tests, benchmark warm-ups)."""
        self.loader.wait_idle()

    def close(self) -> None:
        """Drops the prefetches still queued, detaches the policy and releases the caches' slots and
        the store (`LayerCache.release`): the model's offloaded experts cannot run after this."""
        if self.policy is not None:
            self.policy.close()
            self.policy = None
        self.loader.close()
        for cache in self.caches.values():
            cache.release()

    def __enter__(self) -> "OffloadRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def offload(model: Seq2Seq, weights: Path, serve: ServeConfig, store_path: Optional[Path] = None,
            routing: Optional[dict] = None, device: Optional[torch.device] = None) -> OffloadRuntime:
    """Serves `model`'s experts from a store cut from `weights` (a safetensors file holding them
    under the model's state-dict names, e.g. an export's model.safetensors), in place.

    The store is `store_path` (default: experts.safetensors beside `weights`), written on first
    use. The fast tier is `device` (default: the device of the model's routers; a model still on
    the CPU, moved to `device` after this, never holds its experts there): on a GPU the store is
    held in pinned CPU RAM, on a CPU it is the memory-mapped file. `routing`: the model's routing
    statistics (routing.json), which `serve.prefetch=language` needs."""
    check_serve(serve)
    layers = model.moe_layer_map()
    if not layers:
        raise ConfigError("serve.experts_per_layer: the model has no MoE layers to offload")
    if any(layer.ep_size != 1 for layer in layers.values()):
        raise ConfigError("serve: offloading needs all experts in one process (moe.ep_size=1)")
    top_k = max(layer.gate.top_k for layer in layers.values())
    capacities = cache_sizes(serve, {name: len(layer.experts) for name, layer in layers.items()}, top_k)
    specs = {name: LayerSpec(model.moe_layer_prefix(name), len(layer.experts), ExpertLayout.of(layer.experts.blueprint()))
             for name, layer in layers.items()}
    weights = Path(weights)
    store: DiskStore | PinnedStore = open_store(weights, Path(store_path or weights.with_name("experts.safetensors")),
                                                specs, serve.slow_gbps)
    device = torch.device(device) if device is not None else next(iter(layers.values())).gate.wg.weight.device
    if device.type == "cuda" and torch.cuda.is_available():
        if serve.slow_gbps:
            log.warning("serve.slow_gbps=%s is ignored on a GPU: experts are copied from pinned RAM at the "
                        "link's own speed (the simulated tier is for a model on the CPU)", serve.slow_gbps)
        store = PinnedStore(store, device)
    return OffloadRuntime(layers, specs, capacities, store, device, model, serve.prefetch, routing, serve.budget)


def store_path_for(export_dir: Path, serve: ServeConfig) -> Path:
    """experts.safetensors in the export dir, or a per-export name in serve.store_dir."""
    if not serve.store_dir:
        return export_dir / "experts.safetensors"
    tag = hashlib.sha1(str(export_dir.resolve()).encode()).hexdigest()[:8]
    return Path(serve.store_dir).expanduser() / f"{export_dir.name}-{tag}.experts.safetensors"


def load_for_serving(export_dir: str | Path, serve: Optional[ServeConfig], device: torch.device | str = "cpu"
                     ) -> tuple[Seq2Seq, Vocab, dict, Optional[OffloadRuntime]]:
    """(model in eval mode on `device`, vocabulary, config, runtime) of an export. Without offloading
    (`serve` None or serve.experts_per_layer None) this is `load_export` and the runtime is None.
    Offloaded on a GPU, the experts' fast tier is GPU memory and the store is held in pinned CPU RAM
    (`offload`). The model is built in CPU RAM, its freshly initialised experts dropped when the
    runtime takes their place, and only then moved to `device`: the experts of a model offloaded
    because they do not fit on the GPU never go there all at once."""
    d = Path(export_dir)
    if serve is not None:
        check_serve(serve)
    if not offloading(serve):
        return (*load_export(d, device=device), None)
    config = read_export_config(d)
    routing = read_routing_stats(d) if serve.prefetch == "language" else None
    model = build_model(config)  # quantized expert modules when quantized: the type the store must fill
    weights = d / "model.safetensors"
    runtime = offload(model, weights, serve, store_path_for(d, serve), routing, device=torch.device(device))
    try:
        prefixes = tuple(experts_prefix(model.moe_layer_prefix(name)) for name in runtime.caches)
        load_weights(model, read_weights(d, lambda key: None if key.startswith(prefixes) else key), d)
        model.to(device)  # everything but the experts, which the runtime's caches hold there
    except BaseException:
        runtime.close()
        raise
    return model.eval(), Vocab(d / "spm.model"), config, runtime
