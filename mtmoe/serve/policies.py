"""Prefetch policies. A policy is whatever calls `prefetch(layer, experts)` (a layer name such as
`dec3`, experts of that layer most wanted first) ahead of the layer's forward:

- `none`: nothing is prefetched; experts load on demand.
- `speculative` (Mixtral-offloading, Eliseev & Mazur 2023): a forward pre-hook on MoE layer j
  applies the router of the next MoE layer of the same stack (enc -> enc, dec -> dec) to layer j's
  FFN input and prefetches the experts it would pick, while layer j computes. A guess: layer j+1's
  router really sees a later hidden state. The first MoE layer of a stack gets no prefetch.
- `pregate`: a model trained with moe.pregate=true decides layer j+1's routing at layer j and hands
  the plan to its routing relay (`mtmoe.model.moe.RoutingRelay`, the `relay` attribute of its
  MoEFFN modules); the policy subscribes to it, so the prefetch is the exact plan.
- `language`: uses what is known before decoding starts, the request's direction, and the routing
  statistics stored with the export (routing.json): see Language.

A policy is built by `install_policy(name, model, runtime)`; it may call runtime.prefetch(layer,
experts, fill) and runtime.hold(layer, experts), and read runtime.capacities and runtime.routing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from mtmoe.config import PrefetchPolicy, check_choice
from mtmoe.errors import ConfigError
from mtmoe.model.moe import MoEFFN, Router, RoutingRelay

log = logging.getLogger("mtmoe")

Prefetch = Callable[[str, Sequence[int]], None]


class Policy(Protocol):
    def close(self) -> None: ...


def moe_stacks(model) -> dict[str, list[tuple[str, MoEFFN]]]:
    """{'enc': [(name, layer), ...], 'dec': [...]}: the MoE layers of each stack in forward order."""
    stacks: dict[str, list] = {"enc": [], "dec": []}
    for name, layer in model.moe_layer_map().items():
        stacks[name[:3]].append((name, layer))
    return stacks


def predicted_choices(router: Router, x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """The experts the real tokens would pick among their top-k at `router`'s layer.

    x [N, D], keep [N] bool or None (every token real) -> expert ids [N', k] (N' real tokens),
    numbered as the layer's expert modules (the kept ones when pruned): the router's own choice
    (`Router.choose`), without capacity (serving runs with no token dropped)."""
    top_e = router.choose(x)
    return top_e if keep is None else top_e[keep]


HOST_COUNT_MAX = 64
"""Up to this many ids are counted on the host (a decoding step's few tokens: one `tolist` and a
loop cost less than bincount and a `tolist` of its result); more, with bincount."""


def predicted_ranking(router: Router, x: torch.Tensor, keep: Optional[torch.Tensor]) -> list[int]:
    """What a prediction hook prefetches: `predicted_choices`, most chosen first (`ranked_choices`)."""
    return ranked_choices(predicted_choices(router, x, keep), router.num_experts)


def ranked_choices(choices: torch.Tensor, num_experts: int) -> list[int]:
    """The experts in `choices` (ids of any shape; ids outside 0..num_experts-1, such as padding
    or dropped choices, left out), the most chosen first (ties: lower id first). On the host: a
    prediction runs at every MoE layer of every decoding step."""
    ids = choices.reshape(-1)
    if ids.numel() > HOST_COUNT_MAX:
        ids = ids[(ids >= 0) & (ids < num_experts)]
        return ranked_counts(torch.bincount(ids, minlength=num_experts).tolist())
    counts = [0] * num_experts
    for e in ids.tolist():
        if 0 <= e < num_experts:
            counts[e] += 1
    return ranked_counts(counts)


def ranked_counts(counts: Sequence[float]) -> list[int]:
    """Indices of `counts` (or shares, on the host) with a nonzero value, largest first, ties by
    lower index (the sort is stable)."""
    return sorted((e for e, n in enumerate(counts) if n > 0), key=lambda e: -counts[e])


def direction_ranking(routing: dict, layer: str, src: str, tgt: str) -> Optional[list[int]]:
    """`layer`'s experts with a nonzero share of src-tgt's routing in an export's routing statistics
    (routing.json), largest first: the direction's own, else the source language's in an encoder
    layer and the target language's in a decoder layer; None when neither is there."""
    stats = routing.get("by_direction", {}).get(f"{src}-{tgt}", {}).get(layer)
    if stats is None:
        stats = routing.get("by_language", {}).get(src if layer.startswith("enc") else tgt, {}).get(layer)
    return None if stats is None else ranked_counts(stats["share"])


class Speculative:
    def __init__(self, model, prefetch: Prefetch):
        self._prefetch = prefetch
        self._handles = []
        for layers in moe_stacks(model).values():
            for (_, layer), (next_name, next_layer) in zip(layers, layers[1:]):
                hook = self._hook(next_name, next_layer.gate)
                self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        if not self._handles:
            every = getattr(getattr(model, "moe_cfg", None), "every", "?")
            log.warning("serve.prefetch=speculative has nothing to predict from: this model has one MoE layer "
                        "per stack (moe.every=%s), and a prediction is made by the next MoE layer's router, so "
                        "experts load on demand (prefetch=none). Models with two or more MoE layers per stack "
                        "(e.g. moe.every=1) can prefetch", every)

    def _hook(self, next_name: str, router: Router):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["x"]  # [B, T, D]: this layer's FFN input
            keep = args[1] if len(args) > 1 else kwargs.get("keep")  # [B, T] bool or None
            tokens = x.reshape(-1, x.shape[-1])
            keep = None if keep is None else keep.reshape(-1)
            with torch.no_grad():
                self._prefetch(next_name, predicted_ranking(router, tokens, keep))
        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


class Pregate:
    """Subscribes to the model's routing relays (one per stack), which call their listeners with
    (index of the MoE layer in the stack whose plan was just computed, expert ids [N, k] of that
    layer, numbered as its expert modules; padding tokens included). The relay also reports the
    first MoE layer's own plan just before its experts run, which gives its loads a head start."""

    def __init__(self, model, prefetch: Prefetch):
        self._prefetch = prefetch
        relays: dict[int, tuple[RoutingRelay, dict[int, tuple[str, int]]]] = {}  # id -> (relay, index -> layer)
        for layers in moe_stacks(model).values():
            for name, layer in layers:
                if isinstance(layer.relay, RoutingRelay):
                    relays.setdefault(id(layer.relay), (layer.relay, {}))[1][layer.relay_index] = (name, len(layer.experts))
        if not relays:
            raise ConfigError("serve.prefetch=pregate needs a model trained with moe.pregate=true "
                              "(this one has no routing relay)")
        self._subscriptions = []
        for relay, layers in relays.values():
            listener = self._listener(layers)
            relay.listeners.append(listener)
            self._subscriptions.append((relay, listener))

    def _listener(self, layers: dict[int, tuple[str, int]]):
        def listen(index: int, experts: torch.Tensor) -> None:
            name, num_experts = layers[index]
            self._prefetch(name, ranked_choices(experts, num_experts))
        return listen

    def close(self) -> None:
        for relay, listener in self._subscriptions:
            relay.listeners.remove(listener)


def prediction_points(stack, index: int, decoder: bool) -> list[tuple[nn.Module, Optional[nn.Module]]]:
    """Where the language policy applies layer `index`'s router ahead, earliest first: (module whose
    forward pre-hook sees the hidden state [B, T, D] as its first argument, norm to apply to it
    first or None). `stack` is the encoder's or decoder's list of layers.

    The earliest and the latest of: the previous layer's FFN input (already normalised by that
    layer's FFN norm); the layer's own input; in a decoder layer, the state after its
    self-attention (the input of its cross-attention norm). The earliest gives a load the most
    time, the latest sees a state closest to the router's own; one between (a decoder layer's
    input) added neither time nor hits enough to pay for a prediction at every decoding step:
    8-expert model of scripts/bench_serve.py, 1/4 shared, in one process, vs all resident, with it
    and without: 0.84x / 0.87x from the page cache, 0.81x / 0.83x over 1.5 GB/s, 0.68x / 0.69x
    over 0.5 GB/s, hit rates within 0.01."""
    layer = stack[index]
    earliest = (stack[index - 1].ffn, None) if index > 0 else (layer, layer.ffn_norm)
    latest = (layer.cross_attn_norm, layer.ffn_norm) if decoder else (layer, layer.ffn_norm)
    return [earliest] if earliest == latest else [earliest, latest]


def held_count(stack: str, capacity: int, hold: bool) -> int:
    """How many of a layer's experts the language policy holds for the direction (never evicted).

    Encoder layers: capacity - 2. The encoder runs a whole sentence at once and needs most of a
    layer's experts; it streams them through two slots (one computes while the other loads).
    Decoder layers: capacity - 1 when `hold` (a step needs one or two experts; one slot serves the
    rest), else none, leaving every slot to the ahead predictions."""
    if stack == "enc":
        return max(capacity - 2, 0)
    return max(capacity - 1, 0) if hold else 0


@dataclass(frozen=True)
class Mode:
    """How the language policy serves one MoE layer: `predict` (apply its router ahead and prefetch
    the predicted experts) and `hold` (keep the direction's top experts resident, `held_count`)."""
    predict: bool
    hold: bool


DECODER_MODES = (Mode(predict=True, hold=False), Mode(predict=True, hold=True), Mode(predict=False, hold=True))
ENCODER_MODES = (Mode(predict=True, hold=True), Mode(predict=False, hold=True))


class ModeChooser:
    """Which `Mode` serves a layer, chosen by measuring each on the layer's own calls.

    What pays depends on the expert size, the slow tier, the model's speed and the box, so it is
    measured rather than modelled: the layer's hit rate over `window` calls in each mode, then the
    best (ties: the earlier mode) for `commit` windows, then each again. Measured on the main job's
    model (scripts/bench_serve.py, 2 of 4 experts resident in each layer's own slots, beam 4,
    en-de): where loads are RAM copies, predictions with every slot free hit 0.88-0.90, with the
    top expert held 0.84; at a simulated 0.5 GB/s tier (4 MiB experts, ~8 ms a load, longer than a
    decoding step) a prediction cannot land in time and its load keeps a slot busy, so holding with
    on-demand loads is what pays (predicting: 0.47-0.55, LRU on demand alone: 0.68)."""

    def __init__(self, modes: Sequence[Mode], window: int = 64, commit: int = 8):
        self.modes, self.window, self.commit = tuple(modes), window, commit
        self.mode = self.modes[0]
        self._calls = 0
        self._start: Optional[tuple[int, int]] = None  # (hits, activations) at the window's start
        self._rates: dict[Mode, float] = {}  # hit rate of each mode's last trial window
        self._committed = 0  # windows left in the committed mode

    def after_call(self, hits: int, activations: int) -> Optional[Mode]:
        """Called once per call of the layer with its cumulative counters; returns the new mode
        when it changes, else None."""
        if self._start is None or activations < self._start[1]:  # first call, or the counters were reset:
            self._start, self._calls = (hits, activations), 0  # the window starts after this call
            return None
        self._calls += 1
        if self._calls < self.window:
            return None
        done = activations - self._start[1]
        rate = (hits - self._start[0]) / done if done else 0.0
        self._calls, self._start = 0, (hits, activations)
        before = self.mode
        if self._committed:
            self._committed -= 1
            if not self._committed:  # re-measure every mode, from the first
                self._rates.clear()
                self.mode = self.modes[0]
        else:
            self._rates[self.mode] = rate
            untried = [m for m in self.modes if m not in self._rates]
            if untried:
                self.mode = untried[0]
            else:
                self.mode = max(self.modes, key=lambda m: self._rates[m])  # max keeps the first of equals
                self._committed = self.commit
        return self.mode if self.mode != before else None


class Language:
    """`serve.prefetch=language`. Multilingual MoE layers route by language (a decoder layer by
    target language, an encoder layer by source language), and the direction of a request is known
    before it is decoded. So:

    - `set_direction(src, tgt)` (the runtime's, called before a direction's requests) ranks each
      MoE layer's experts by their share of that direction's routing in the stored statistics
      (`by_direction`; without it, the source language's share in encoder layers and the target
      language's in decoder layers), holds the top ones in the layer's cache (never evicted) and
      fills the other slots with the next ones; how many it holds is `held_count`'s rule.
    - Each layer's `Mode` (predict ahead or not; a decoder layer: hold or not) is measured on its
      own calls and the best kept (`ModeChooser`).
    - Ahead: the MoE layer's router (after the layer's FFN norm) is applied to the hidden state at
      up to two points before the layer's FFN runs, for every token (in the encoder the whole
      sentence), each time filling the layer's free slots with the predicted experts, most demanded
      first (`prediction_points`). The earlier guess gives a load the most time; the later one
      sees a hidden state closer to the one the router will see and replaces a wrong guess that has
      not started loading. One point is not enough (`scripts/routing_foresight.py`, en-de): on the
      main job's model (beam 4) the router applied at the previous FFN's input picks the expert the
      decoder's MoE layer then uses for 0.57 of the tokens, at the layer's input 0.89, after its
      self-attention 0.95; on the small 8-expert models of scripts/bench_serve.py (greedy, decoder
      layers 1-2) 0.63-0.77, 0.79-0.84 and 0.85-0.90; but the later the point, the less time a load has.
    - `streams`: the runtime loads each call's missing experts in execution order while the call's
      other experts compute (LayerCache.plan_call).
    """

    streams = True

    def __init__(self, model, runtime):
        if not runtime.routing:
            raise ConfigError("serve.prefetch=language needs the routing statistics of the export "
                              "(routing.json, written by mtmoe-export)")
        self._runtime, self._routing = runtime, runtime.routing
        self._handles = []
        self._layers = moe_stacks(model)
        self._order: dict[str, list[int]] = {}  # layer -> the direction's experts, most used first
        self._modes = {name: ModeChooser(DECODER_MODES if name.startswith("dec") else ENCODER_MODES)
                       for layers in self._layers.values() for name, _ in layers}
        for stack_name, layers in self._layers.items():
            stack = model.encoder if stack_name == "enc" else model.decoder
            for name, layer in layers:
                overall = self._routing.get("overall", {}).get(name)
                if overall is None or len(overall["share"]) != len(layer.experts):
                    raise ConfigError(f"serve.prefetch=language: the routing statistics do not match MoE layer "
                                      f"{name} ({len(layer.experts)} experts); re-export the model")
                points = prediction_points(stack, int(name[3:]), stack_name == "dec")
                for module, norm in points:
                    self._handles.append(module.register_forward_pre_hook(self._hook(name, layer.gate, norm),
                                                                          with_kwargs=True))
                self._handles.append(layer.register_forward_hook(self._after_call(name)))

    def _hook(self, name: str, router: Router, norm):
        def hook(module, args, kwargs):
            if not self._modes[name].mode.predict:
                return
            x = args[0] if args else kwargs["x"]  # [B, T, D]
            keep = args[1] if len(args) > 1 else kwargs.get("keep")  # [B, T] bool or None
            tokens = x.reshape(-1, x.shape[-1])
            keep = None if keep is None else keep.reshape(-1)
            with torch.no_grad():
                if norm is not None:
                    tokens = norm(tokens)
                self._runtime.prefetch(name, predicted_ranking(router, tokens, keep), fill=True)
        return hook

    def ranking(self, layer: str, src: str, tgt: str) -> list[int]:
        """`layer`'s experts with a nonzero share of the direction's routing, largest first
        (`direction_ranking`); [] with a warning when the statistics have none."""
        order = direction_ranking(self._routing, layer, src, tgt)
        if order is None:
            log.warning("serve.prefetch=language: no routing statistics for %s-%s at %s; its cache is not seeded",
                        src, tgt, layer)
            return []
        return order

    def _after_call(self, name: str):
        """MoE layer hook: counts the call for its ModeChooser and applies a new mode's holds."""
        def hook(module, args, output):
            counts = self._runtime.metrics.layers[name]
            if self._modes[name].after_call(counts.hits, counts.activations) is not None:
                self._hold(name)
        return hook

    def _hold(self, name: str) -> None:
        count = held_count(name[:3], self._runtime.capacities[name], self._modes[name].mode.hold)
        self._runtime.hold(name, self._order.get(name, [])[:count])

    def set_direction(self, src: str, tgt: str) -> None:
        for layers in self._layers.values():
            for name, _ in layers:
                self._order[name] = self.ranking(name, src, tgt)
                self._hold(name)
                self._runtime.prefetch(name, self._order[name][:self._runtime.capacities[name]], fill=True)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def install_policy(name: str, model, runtime) -> Optional[Policy]:
    """The policy `name` (serve.prefetch) attached to `model`, calling `runtime`'s prefetch (and
    hold); None for `none`."""
    if name == "none":
        return None
    if name == "speculative":
        return Speculative(model, runtime.prefetch)
    if name == "pregate":
        return Pregate(model, runtime.prefetch)
    if name == "language":
        return Language(model, runtime)
    check_choice("serve.prefetch", name, PrefetchPolicy)  # raises: not a policy handled above
    raise AssertionError(f"serve.prefetch={name!r} has no policy")
