#!/usr/bin/env python
"""How many expert loads serving with some experts resident cannot avoid, and what they cost.

Decodes --lines lines of one direction with the plain all-resident model, one sentence per call
(as scripts/bench_serve.py does), and records every MoE call: the layer and the experts that got
rows. From that trace, per fast-tier size and budget (`serve.budget`: each layer its own slots, or
one pool for the model):

- Belady's rule (evict the expert whose next use is farthest away; optimal for the number of
  loads, Belady 1966) gives the fewest loads any eviction policy can do with, knowing the future;
  LRU (what `serve.prefetch=none` does) is beside it;
- at a slow tier of --gbps GB/s each load of an expert blob takes nbytes / bandwidth, so with no
  load hidden behind compute the speed vs all-resident is at most T / (T + loads x t_load), T the
  measured all-resident decoding time. A prefetch policy can only beat that by overlapping loads
  with compute; `hide for 0.9x` is the share of Belady's loads it must hide to reach 0.9x;
- per sentence, the distinct experts the encoder needs (it routes the whole sentence at once) and
  the decoder needs (one token per step), and the time until the decoder starts;
- with the shared budget, the speed a prefetcher reaches that knows the future exactly, as far as
  it reaches (`FORESIGHTS`: the next MoE call, the current sentence, either plus the direction's
  usual encoder experts for the next request, every sentence): a simulation of one slow-tier
  channel and the pool's slots on the recorded calls and their compute times (`prefetch_stall`).
  It says what is out of reach for any predictor with that knowledge, before the runtime's own
  costs (its bookkeeping and the predictions' compute, which the simulation leaves out).

    python scripts/serve_bound.py --export runs/bench_serve/export --lines 60 --out bench/serve/bound

Writes <out>/results.json and <out>/results.md and prints the table.
"""

from __future__ import annotations

import argparse
import bisect
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtmoe.cli.common import friendly_errors  # noqa: E402
from mtmoe.config import ServeConfig  # noqa: E402
from mtmoe.data.corpus import load_test_set  # noqa: E402
from mtmoe.formats.export_format import ROUTING_FILE, load_export, read_routing_stats  # noqa: E402
from mtmoe.model.generation import translate  # noqa: E402
from mtmoe.paths import resolve  # noqa: E402
from mtmoe.serve.layout import ExpertLayout  # noqa: E402
from mtmoe.serve.policies import direction_ranking  # noqa: E402
from mtmoe.serve.validate import cache_sizes  # noqa: E402
from bench.results import write_results  # noqa: E402

SIZES = {"1/4": 0.25, "1/2": 0.5}

Access = tuple[str, int]  # (MoE layer, expert)


def record(model, vocab, lines: list[str], tgt: str, beam: int
           ) -> tuple[list[list[Access]], list[dict], list[list[tuple[int, float]]]]:
    """Per sentence: its expert accesses in execution order, its timings (all-resident), and per
    access (its MoE call's number in the sentence, its compute seconds): from the call's start to
    the next call's (the sentence's end after its last call), split evenly over the call's experts;
    the time before a sentence's first call goes to the previous sentence's last access."""
    calls: list[tuple[str, list[int], float]] = []
    for name, layer in model.moe_layer_map().items():
        def forward(x, counts, _forward=layer.experts.forward, _name=name):
            calls.append((_name, [e for e, n in enumerate(counts.tolist()) if n], time.perf_counter()))
            return _forward(x, counts)
        layer.experts.forward = forward
    traces, sentences, compute = [], [], []
    for line in lines:
        first, started = len(calls), time.perf_counter()
        translate(model, vocab, [line], tgt, beam)
        seconds = time.perf_counter() - started
        mine = calls[first:]
        traces.append([(name, e) for name, experts, _ in mine for e in experts])
        ends = [t for _, _, t in mine[1:]] + [started + seconds]
        compute.append([(call, (end - t) / len(experts))
                        for call, ((_, experts, t), end) in enumerate(zip(mine, ends)) for _ in experts])
        if mine and len(compute) > 1 and compute[-2]:
            call, last = compute[-2][-1]
            compute[-2][-1] = (call, last + mine[0][2] - started)
        first_dec = next((t for name, _, t in mine if name.startswith("dec")), started + seconds)
        sentences.append({"seconds": seconds, "encoder_s": first_dec - started,
                          "enc_distinct": len({(n, e) for n, es, _ in mine if n.startswith("enc") for e in es}),
                          "dec_distinct": len({(n, e) for n, es, _ in mine if n.startswith("dec") for e in es}),
                          "activations": sum(len(es) for _, es, _ in mine)})
    return traces, sentences, compute


def count_loads(accesses: list[Access], capacities: dict[str, int], pooled: bool, rule: str) -> int:
    """Loads of a cache serving `accesses` in order with `capacities` slots per layer (pooled: their
    sum shared by all layers), evicting by `rule`: 'belady' (the farthest next use, of any layer
    when pooled) or 'lru' (the runtime's rule on a miss: the layer's own least recently used expert,
    or the pool's while the layer holds fewer than its share, mtmoe.serve.cache)."""
    next_use, last = [0] * len(accesses), {}
    for i in range(len(accesses) - 1, -1, -1):
        next_use[i] = last.get(accesses[i], len(accesses))
        last[accesses[i]] = i
    resident: OrderedDict[Access, int] = OrderedDict()  # access -> its next use; order = recency
    loads = 0
    for i, key in enumerate(accesses):
        if key not in resident:
            loads += 1
            own = [k for k in resident if k[0] == key[0]]  # least recently used first
            full = len(resident) >= sum(capacities.values()) if pooled else len(own) >= capacities[key[0]]
            if full:
                if rule == "belady":
                    victim = max(list(resident) if pooled else own, key=lambda k: resident[k])
                else:
                    victim = own[0] if own and (not pooled or len(own) >= capacities[key[0]]) else next(iter(resident))
                del resident[victim]
        resident[key] = next_use[i]
        resident.move_to_end(key)
    return loads


FORESIGHTS = ("next call", "next call + direction", "sentence", "sentence + direction", "stream")
"""What the prefetcher of `prefetch_stall` knows of the future: the experts of the current and the
next MoE call of the sentence (what exact pre-gating gives: layer j+1's plan at layer j); all of
the current sentence's; every later sentence's too (a queue of requests whose routing is known in
advance). "+ direction": after what it knows, the direction's most used encoder experts (`guess`,
from the export's routing statistics: what is known of the next request without its text)."""


def prefetch_stall(traces: list[list[Access]], timing: list[list[tuple[int, float]]], capacity: int,
                   load_s: float, foresight: str, guess: Sequence[Access] = ()) -> tuple[float, int, int]:
    """(stall seconds, loads, hits: accesses that found their expert loaded) of the best prefetcher
    we know how to build with `foresight` (FORESIGHTS) and the runtime's constraints: one pool of
    `capacity` slots for all layers, one slow-tier channel carrying one load of `load_s` at a time,
    a loading slot unusable until its load ends, compute times those of the all-resident run
    (`record`).

    The rule is Cao, Felten, Karlin and Li's "aggressive" prefetching (SIGMETRICS 1995): whenever
    the channel is free, start loading the first expert the prefetcher knows will be needed and is
    not resident, evicting the resident one whose next known use is farthest (ties: least recently
    used), but only if that use is later than the one being loaded (else wait). It is near-optimal
    with full foresight, not optimal, so these figures are what a perfect predictor achieves with
    it: evidence of how far a policy can go, not a proof. Decisions are taken at expert calls and
    whenever the channel frees up before the next one."""
    accesses = [a for trace in traces for a in trace]
    compute = [seconds for t in timing for _, seconds in t]
    n = len(accesses)
    sentence_end, call_end = [0] * n, [0] * n  # exclusive ends of the access's sentence / next call
    i = 0
    for trace, t in zip(traces, timing):
        start, calls = i, [c for c, _ in t]
        for k, call in enumerate(calls):
            sentence_end[i + k] = start + len(trace)
            nxt = next((m for m in range(k, len(calls)) if calls[m] > call + 1), len(calls))
            call_end[i + k] = start + nxt
        i += len(trace)
    positions: dict[Access, list[int]] = {}
    for i, a in enumerate(accesses):
        positions.setdefault(a, []).append(i)
    far = n + len(guess) + 1

    def horizon(pos: int) -> tuple[int, Sequence[Access]]:
        """(end of the known real accesses, known accesses after them)."""
        if foresight == "stream":
            return n, ()
        limit = call_end[pos] if foresight.startswith("next call") else sentence_end[pos]
        return limit, (guess if foresight.endswith("+ direction") else ())

    def next_use(a: Access, pos: int, limit: int, tail: Sequence[Access]) -> int:
        p = positions.get(a, [])
        k = bisect.bisect_left(p, pos)
        if k < len(p) and p[k] < limit:
            return p[k]
        return limit + tail.index(a) if a in tail else far

    arrival: dict[Access, float] = {}  # resident or loading -> when its load ends (at most `channel`)
    last_use: dict[Access, int] = {}
    state = {"channel": 0.0, "loads": 0}  # the channel is free from `channel` on

    def victim_for(pos: int, limit: int, tail: Sequence[Access], exclude: Optional[Access]) -> Optional[Access]:
        """The resident expert to evict: the farthest next known use, then the least recently used."""
        candidates = [a for a in arrival if a != exclude]
        return max(candidates, key=lambda a: (next_use(a, pos, limit, tail), -last_use.get(a, -1)), default=None)

    def prefetch(pos: int, now: float, limit: int, tail: Sequence[Access]) -> None:
        """Loads ahead, knowing (limit, tail), while the channel is free before `now` (call pos's
        start, call pos - 1 computing until then)."""
        while state["channel"] <= now:
            channel = state["channel"]
            wanted = next((j for j in range(pos, limit) if accesses[j] not in arrival), None)
            if wanted is None:
                wanted = next((limit + k for k, a in enumerate(tail) if a not in arrival), None)
            if wanted is None:
                break
            key = accesses[wanted] if wanted < limit else tail[wanted - limit]
            if len(arrival) >= capacity:
                computing = accesses[pos - 1] if pos and channel < now else None  # its slot is in use
                victim = victim_for(pos, limit, tail, computing)
                if victim is None:  # the only slot is computing: it frees up when the call ends
                    state["channel"] = now
                    continue
                if next_use(victim, pos, limit, tail) <= wanted:
                    break
                del arrival[victim]
            arrival[key] = state["channel"] = channel + load_s
            state["loads"] += 1
        state["channel"] = max(state["channel"], now)  # idle until now: nothing worth loading was known

    now = stall = 0.0
    known, hits = None, 0
    for pos in range(n):
        if known is not None:  # between the calls, the channel works with what was known
            prefetch(pos, now, *known)
        if horizon(pos) != known:  # what this call reveals is acted on from its start
            known = horizon(pos)
            prefetch(pos, now, *known)
        key = accesses[pos]
        if key not in arrival:  # not foreseen (or no slot was free): an on-demand load
            if len(arrival) >= capacity:
                del arrival[victim_for(pos, *known, None)]
            arrival[key] = state["channel"] = max(state["channel"], now) + load_s
            state["loads"] += 1
        begin = max(now, arrival[key])
        stall += begin - now
        hits += begin == now
        last_use[key] = pos
        now = begin + compute[pos]
    return stall, state["loads"], hits


def direction_guess(routing: dict, direction: str, layers: Sequence[str], slots: int) -> list[Access]:
    """The direction's most used experts of `layers` (the encoder's), `slots` // len(layers) of each,
    ranked as the language policy ranks them (`direction_ranking`, from the export's routing
    statistics), in layer order: what a server knows of the next request's encoder before it has
    the request; [] without statistics for them."""
    src, tgt = direction.split("-")
    return [(name, e) for name in layers
            for e in (direction_ranking(routing, name, src, tgt) or [])[:slots // len(layers)]]


@friendly_errors
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", default="runs/bench_serve/export")
    ap.add_argument("--test", default="data/multi30k/test_2016_flickr")
    ap.add_argument("--direction", default="en-de")
    ap.add_argument("--lines", type=int, default=60)
    ap.add_argument("--warmup-lines", type=int, default=3)
    ap.add_argument("--beam", type=int, default=1)
    ap.add_argument("--gbps", type=float, default=0.5, help="slow-tier bandwidth, GB/s")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--out", default="bench/serve/bound")
    args = ap.parse_args()
    torch.set_num_threads(1)

    export = resolve(args.export)
    model, vocab, config = load_export(export)
    src, tgt = args.direction.split("-")
    texts = load_test_set(resolve(args.test), [src])[src]
    for line in texts[:args.warmup_lines]:
        translate(model, vocab, [line], tgt, args.beam)
    layers = model.moe_layer_map()
    traces, sentences, timing = record(model, vocab, texts[args.warmup_lines:args.warmup_lines + args.lines], tgt,
                                       args.beam)
    accesses = [a for trace in traces for a in trace]
    n = len(sentences)
    nbytes = max(ExpertLayout.of(layer.experts.blueprint()).nbytes for layer in layers.values())
    load_s = nbytes / (args.gbps * 1e9)
    decode_s = sum(s["seconds"] for s in sentences)
    top_k = max(layer.gate.top_k for layer in layers.values())
    routing = read_routing_stats(export) if (export / ROUTING_FILE).is_file() else None
    rows = []
    for label in args.sizes:
        capacities = cache_sizes(ServeConfig(experts_per_layer=SIZES[label]),
                                 {name: len(layer.experts) for name, layer in layers.items()}, top_k)
        for budget in ("layer", "model"):
            row = {"resident": label, "budget": budget, "slots": sum(capacities.values())}
            load_time = {}  # rule -> seconds of loading over all sentences
            for rule in ("belady", "lru"):
                loads = count_loads(accesses, capacities, budget == "model", rule)
                load_time[rule] = loads * load_s
                row[rule] = {"loads_per_sentence": round(loads / n, 2),
                             "hit_rate_no_prefetch": round(1 - loads / len(accesses), 3),
                             "speed_bound_no_overlap": round(decode_s / (decode_s + load_time[rule]), 3)}
            # 0.9x allows decode_s / 9 of stall: the rest of Belady's load time must overlap compute
            belady_s = load_time["belady"]
            row["hide_for_0.9x"] = round(max(0.0, 1 - decode_s / 9 / belady_s), 3) if belady_s else 0.0
            if budget == "model":  # the prefetch simulation has one pool (the runtime's default)
                row["prefetch_speed"] = {}
                encoder = [x for x in layers if x.startswith("enc")]
                # how many of each encoder layer's experts to guess: its share of the pool, or an
                # equal part of the whole pool; the better of the two is kept (a guess beyond the
                # share evicts decoder experts that the next step needs when only the next call
                # is known, and gains when the sentence is)
                per_layer = sorted({capacities[encoder[0]], row["slots"] // len(encoder)}) if encoder else []
                for foresight in FORESIGHTS:
                    guesses = [()]
                    if foresight.endswith("+ direction"):
                        guesses = [g for g in (direction_guess(routing, args.direction, encoder, k * len(encoder))
                                               for k in per_layer) if g] if routing else []
                    results = [(prefetch_stall(traces, timing, row["slots"], load_s, foresight, g), len(g))
                               for g in guesses]
                    if not results:
                        continue
                    (stall, loads, hits), guessed = min(results)
                    row["prefetch_speed"][foresight] = {"speed": round(decode_s / (decode_s + stall), 3),
                                                        "stall_ms_per_sentence": round(stall / n * 1e3, 2),
                                                        "hit_rate": round(hits / len(accesses), 3),
                                                        "loads_per_sentence": round(loads / n, 2),
                                                        "encoder_experts_guessed": guessed}
            rows.append(row)
    mean = lambda key: round(sum(s[key] for s in sentences) / n, 4)  # noqa: E731
    setup = {"export": str(export), "direction": args.direction, "lines": n, "beam": args.beam, "gbps": args.gbps,
             "expert_bytes": nbytes, "load_ms": round(load_s * 1e3, 3), "moe_layers": len(layers),
             "experts_per_layer": {name: len(layer.experts) for name, layer in layers.items()},
             "ms_per_sentence": round(decode_s / n * 1e3, 2), "encoder_ms_per_sentence": round(mean("encoder_s") * 1e3, 2),
             "activations_per_sentence": mean("activations"), "enc_distinct_per_sentence": mean("enc_distinct"),
             "dec_distinct_per_sentence": mean("dec_distinct")}
    out = resolve(args.out)
    table = markdown(setup, rows)
    write_results(out, {"setup": setup, "rows": rows}, table)
    print(table)


def markdown(setup: dict, rows: list[dict]) -> str:
    lines = [f"`{Path(setup['export']).name}` ({setup['moe_layers']} MoE layers), {setup['direction']}, "
             f"{setup['lines']} lines, beam {setup['beam']}, one sentence per call, all resident: "
             f"{setup['ms_per_sentence']} ms per sentence ({setup['encoder_ms_per_sentence']} ms until the decoder "
             f"starts), {setup['activations_per_sentence']} expert calls per sentence, distinct experts per sentence: "
             f"encoder {setup['enc_distinct_per_sentence']}, decoder {setup['dec_distinct_per_sentence']}. "
             f"A load at {setup['gbps']} GB/s: {setup['load_ms']} ms ({setup['expert_bytes'] / 2**20:.2f} MiB).", "",
             "| resident | budget | slots | Belady loads/sentence | LRU loads/sentence | Belady speed bound, no overlap "
             "| LRU, no overlap | share of Belady's loads to hide for 0.9x |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['resident']} | {r['budget']} | {r['slots']} | {r['belady']['loads_per_sentence']} | "
                     f"{r['lru']['loads_per_sentence']} | {r['belady']['speed_bound_no_overlap']:.3f}x | "
                     f"{r['lru']['speed_bound_no_overlap']:.3f}x | {r['hide_for_0.9x']:.2f} |")
    simulated = [r for r in rows if "prefetch_speed" in r]
    if simulated:
        known = [f for f in FORESIGHTS if any(f in r["prefetch_speed"] for r in simulated)]
        lines += ["", f"Prefetching with perfect knowledge of the future, as far as it reaches (one pool of slots, "
                  f"one {setup['gbps']} GB/s channel; speed vs all resident, stall ms per sentence, hit rate "
                  f"(calls that find their expert loaded), loads per sentence):", "",
                  "| resident | slots | " + " | ".join(f"knows: {f}" for f in known) + " |",
                  "|---|---:|" + "---:|" * len(known)]
        for r in simulated:
            cells = []
            for f in known:
                p = r["prefetch_speed"].get(f)
                cells.append(f"{p['speed']:.3f}x ({p['stall_ms_per_sentence']} ms, {p['hit_rate']:.2f}, "
                             f"{p['loads_per_sentence']})" if p else "-")
            lines.append(f"| {r['resident']} | {r['slots']} | " + " | ".join(cells) + " |")
    lines += ["", "- Belady: evicts the expert used farthest in the future (the fewest loads any eviction rule "
              "achieves, with the future known); LRU: the runtime's rule, what serve.prefetch=none does (shared "
              "pool: a miss takes another layer's slot only while its layer holds fewer than its share). "
              "Speed bound, no overlap: "
              "all-resident time / (that + loads x load time), i.e. every load stalls compute.",
              "- A policy beats the no-overlap bound only by loading ahead while compute runs; the last column "
              "is how much of Belady's load time must be hidden that way for 0.9x of all-resident."]
    if simulated:
        lines += ["- Prefetching table: a simulation on the same trace (`prefetch_stall`: Cao et al.'s "
                  "aggressive prefetching, which is near-optimal, not optimal; compute times of the all-resident "
                  "run, no runtime overhead). Knows: `next call` = the experts of the next MoE call of the "
                  "sentence (exact pre-gating); `sentence` = all of the current sentence's; `+ direction` = "
                  "after that, the direction's most used encoder experts (routing.json; each encoder layer's "
                  "share of the pool or an equal part of it, the better) for the next request; `stream` = "
                  "every later sentence's too."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
