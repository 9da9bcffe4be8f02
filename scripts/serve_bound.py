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
  the decoder needs (one token per step), and the time until the decoder starts.

    python scripts/serve_bound.py --export runs/bench_serve/export --lines 60 --out bench/serve/bound

Writes <out>/results.json and <out>/results.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtmoe.config import ServeConfig  # noqa: E402
from mtmoe.data.corpus import load_test_set  # noqa: E402
from mtmoe.formats.export_format import load_export  # noqa: E402
from mtmoe.model.generation import translate  # noqa: E402
from mtmoe.paths import resolve  # noqa: E402
from mtmoe.serve.layout import ExpertLayout  # noqa: E402
from mtmoe.serve.validate import cache_sizes  # noqa: E402

SIZES = {"1/4": 0.25, "1/2": 0.5}

Access = tuple[str, int]  # (MoE layer, expert)


def record(model, vocab, lines: list[str], tgt: str, beam: int) -> tuple[list[list[Access]], list[dict]]:
    """Per sentence: its expert accesses in execution order, and its timings (all-resident)."""
    calls: list[tuple[str, list[int], float]] = []
    for name, layer in model.moe_layer_map().items():
        def forward(x, counts, _forward=layer.experts.forward, _name=name):
            calls.append((_name, [e for e, n in enumerate(counts.tolist()) if n], time.perf_counter()))
            return _forward(x, counts)
        layer.experts.forward = forward
    traces, sentences = [], []
    for line in lines:
        first, started = len(calls), time.perf_counter()
        translate(model, vocab, [line], tgt, beam)
        seconds = time.perf_counter() - started
        mine = calls[first:]
        traces.append([(name, e) for name, experts, _ in mine for e in experts])
        first_dec = next((t for name, _, t in mine if name.startswith("dec")), started + seconds)
        sentences.append({"seconds": seconds, "encoder_s": first_dec - started,
                          "enc_distinct": len({(n, e) for n, es, _ in mine if n.startswith("enc") for e in es}),
                          "dec_distinct": len({(n, e) for n, es, _ in mine if n.startswith("dec") for e in es}),
                          "activations": sum(len(es) for _, es, _ in mine)})
    return traces, sentences


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
    traces, sentences = record(model, vocab, texts[args.warmup_lines:args.warmup_lines + args.lines], tgt, args.beam)
    accesses = [a for trace in traces for a in trace]
    n = len(sentences)
    nbytes = max(ExpertLayout.of(layer.experts.blueprint()).nbytes for layer in layers.values())
    load_s = nbytes / (args.gbps * 1e9)
    decode_s = sum(s["seconds"] for s in sentences)
    top_k = max(layer.gate.top_k for layer in layers.values())
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
            rows.append(row)
    mean = lambda key: round(sum(s[key] for s in sentences) / n, 4)  # noqa: E731
    setup = {"export": str(export), "direction": args.direction, "lines": n, "beam": args.beam, "gbps": args.gbps,
             "expert_bytes": nbytes, "load_ms": round(load_s * 1e3, 3), "moe_layers": len(layers),
             "experts_per_layer": {name: len(layer.experts) for name, layer in layers.items()},
             "ms_per_sentence": round(decode_s / n * 1e3, 2), "encoder_ms_per_sentence": round(mean("encoder_s") * 1e3, 2),
             "activations_per_sentence": mean("activations"), "enc_distinct_per_sentence": mean("enc_distinct"),
             "dec_distinct_per_sentence": mean("dec_distinct")}
    out = resolve(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    table = markdown(setup, rows)
    (out / "results.md").write_text(table + "\n")
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
    lines += ["", "- Belady: evicts the expert used farthest in the future (the fewest loads any eviction rule "
              "achieves, with the future known); LRU: the runtime's rule, what serve.prefetch=none does (shared "
              "pool: a miss takes another layer's slot only while its layer holds fewer than its share). "
              "Speed bound, no overlap: "
              "all-resident time / (that + loads x load time), i.e. every load stalls compute.",
              "- A policy beats the no-overlap bound only by loading ahead while compute runs; the last column "
              "is how much of Belady's load time must be hidden that way for 0.9x of all-resident."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
