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
from typing import Callable, Optional, Protocol, Sequence

import torch

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


def predicted_counts(router: Router, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """How many real tokens would pick each expert of `router`'s layer among their top-k.

    x [N, D], keep [N] bool -> counts [E] (E: the layer's experts, the kept ones when pruned,
    numbered as the layer's expert modules): the router's own selection (`Router.select`), without
    capacity (serving runs with no token dropped)."""
    top_e = router.select(x)[3]
    return torch.bincount(top_e[keep].reshape(-1), minlength=router.num_experts)


def ranked(counts: torch.Tensor) -> list[int]:
    """Experts with a nonzero count, the most demanded first (ties: lower id first)."""
    order = torch.argsort(-counts, stable=True)
    return order[counts[order] > 0].tolist()


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
            keep = torch.ones(tokens.shape[0], dtype=torch.bool, device=x.device) if keep is None else keep.reshape(-1)
            with torch.no_grad():
                self._prefetch(next_name, ranked(predicted_counts(router, tokens, keep)))
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
            ids = experts.reshape(-1)
            ids = ids[(ids >= 0) & (ids < num_experts)]  # padding or dropped choices may be marked out of range
            self._prefetch(name, ranked(torch.bincount(ids, minlength=num_experts)))
        return listen

    def close(self) -> None:
        for relay, listener in self._subscriptions:
            relay.listeners.remove(listener)


class Language:
    """`serve.prefetch=language`. Multilingual MoE layers route by language (a decoder layer by
    target language, an encoder layer by source language), and the direction of a request is known
    before it is decoded. So:

    - `set_direction(src, tgt)` (the runtime's, called before a direction's requests) ranks each
      MoE layer's experts by their share of that direction's routing in the stored statistics
      (`by_direction`; without it, the source language's share in encoder layers and the target
      language's in decoder layers), holds the top ones in the layer's cache (never evicted) and
      fills the other slots with the next ones. Decoder layers hold capacity - 1 (a decoding step
      needs one or two experts; one slot serves the rest); encoder layers hold capacity - 2, since
      the encoder runs a whole sentence at once, needs most of a layer's experts, and streams them
      through two slots (one computes while the other loads).
    - Ahead: a forward pre-hook one sub-layer before each MoE layer (the FFN of the previous layer
      of the stack, dense or MoE; for a stack's first layer, the layer itself through its FFN norm)
      applies the MoE layer's router to that input, for every token (in the encoder the whole
      sentence), and fills the layer's free slots with the predicted experts, most demanded first,
      while the layers in between compute.
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
        for stack_name, layers in self._layers.items():
            stack = model.encoder if stack_name == "enc" else model.decoder
            for name, layer in layers:
                overall = self._routing.get("overall", {}).get(name)
                if overall is None or len(overall["share"]) != len(layer.experts):
                    raise ConfigError(f"serve.prefetch=language: the routing statistics do not match MoE layer "
                                      f"{name} ({len(layer.experts)} experts); re-export the model")
                index = int(name[3:])
                if index > 0:
                    hook = self._hook(name, layer.gate, None)
                    self._handles.append(stack[index - 1].ffn.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    hook = self._hook(name, layer.gate, stack[0].ffn_norm)
                    self._handles.append(stack[0].register_forward_pre_hook(hook, with_kwargs=True))

    def _hook(self, name: str, router: Router, norm):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["x"]  # [B, T, D]
            keep = args[1] if len(args) > 1 else kwargs.get("keep")  # [B, T] bool or None
            tokens = x.reshape(-1, x.shape[-1])
            keep = torch.ones(tokens.shape[0], dtype=torch.bool, device=x.device) if keep is None else keep.reshape(-1)
            with torch.no_grad():
                if norm is not None:
                    tokens = norm(tokens)
                self._runtime.prefetch(name, ranked(predicted_counts(router, tokens, keep)), fill=True)
        return hook

    def ranking(self, layer: str, src: str, tgt: str) -> list[int]:
        """`layer`'s experts with a nonzero share of the direction's routing, largest first."""
        stats = self._routing.get("by_direction", {}).get(f"{src}-{tgt}", {}).get(layer)
        if stats is None:
            stats = self._routing.get("by_language", {}).get(src if layer.startswith("enc") else tgt, {}).get(layer)
        if stats is None:
            log.warning("serve.prefetch=language: no routing statistics for %s-%s at %s; its cache is not seeded",
                        src, tgt, layer)
            return []
        return ranked(torch.tensor(stats["share"]))

    def set_direction(self, src: str, tgt: str) -> None:
        for stack_name, layers in self._layers.items():
            for name, _ in layers:
                order = self.ranking(name, src, tgt)
                capacity = self._runtime.capacities[name]
                self._runtime.hold(name, order[:max(capacity - (2 if stack_name == "enc" else 1), 0)])
                self._runtime.prefetch(name, order[:capacity], fill=True)

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
