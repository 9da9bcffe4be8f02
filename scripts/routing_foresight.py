#!/usr/bin/env python
"""How early can an MoE layer's routing be predicted? For each MoE layer of an export, applies the
layer's router (after its FFN norm) to the hidden state at earlier points of the forward pass and
counts how often the predicted first choice is the expert the layer then really picks, per token.
This is what the language-aware serving policy's ahead predictions rest on
(`mtmoe.serve.policies.prediction_points`).

Points, earliest first: `prev_ffn_in` (the previous layer's FFN input), `layer_in` (the layer's
input), `after_self_attn` (decoder layers: after the self-attention), and `prev_step` (decoder: the
expert the same beam row used at the previous step). The source sentences are decoded one per call,
as an interactive server would.

    python scripts/routing_foresight.py --export runs/bench_serve/export --beam 1 --lines 60
    python scripts/routing_foresight.py --export runs/main/export --beam 4 --lines 100 --out bench/serve/main

Writes <out>/routing_foresight.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtmoe.cli.common import friendly_errors  # noqa: E402
from mtmoe.data.corpus import load_test_set  # noqa: E402
from mtmoe.formats.export_format import load_export  # noqa: E402
from mtmoe.model.generation import translate  # noqa: E402
from mtmoe.paths import resolve  # noqa: E402
from mtmoe.serve.policies import moe_stacks, prediction_points  # noqa: E402

POINTS = ("prev_ffn_in", "layer_in", "after_self_attn", "prev_step")


class Recorder:
    """Captures the hidden states [N, D] at the serving policy's prediction points of each MoE layer
    (`prediction_points`, so this measures what the policy predicts from) and scores the predictions
    once the MoE layer has run."""

    def __init__(self, model):
        self.states: dict[tuple[str, str], tuple[torch.Tensor, object]] = {}  # (layer, point) -> (x, norm)
        self.right: Counter = Counter()
        self.total: Counter = Counter()
        self.previous: dict[str, torch.Tensor] = {}
        self.handles = []
        for stack_name, layers in moe_stacks(model).items():
            stack = model.encoder if stack_name == "enc" else model.decoder
            for name, moe in layers:
                j = int(name[3:])
                for module, norm in prediction_points(stack, j, stack_name == "dec"):
                    point = ("layer_in" if module is stack[j] else
                             "prev_ffn_in" if j > 0 and module is stack[j - 1].ffn else "after_self_attn")
                    self._capture(module, (name, point), norm)
                self._capture(moe, (name, "routed"), None)  # the MoE layer's own (normalised) input
                self.handles.append(moe.register_forward_hook(self._score(name, moe)))

    def _capture(self, module, key, norm):
        def hook(_module, args):
            self.states[key] = (args[0].detach().reshape(-1, args[0].shape[-1]), norm)
        self.handles.append(module.register_forward_pre_hook(hook))

    def _score(self, name: str, moe):
        def hook(_module, _args, _out):
            with torch.no_grad():
                actual = moe.gate.select(self.states[name, "routed"][0])[3][:, 0]
                for point in POINTS[:3]:
                    if (name, point) in self.states:
                        x, norm = self.states[name, point]
                        x = x if norm is None else norm(x)
                        self._count(name, point, moe.gate.select(x)[3][:, 0], actual)
                if name.startswith("dec"):
                    before = self.previous.get(name)
                    if before is not None and before.shape == actual.shape:
                        self._count(name, "prev_step", before, actual)
                    self.previous[name] = actual
        return hook

    def _count(self, layer: str, point: str, predicted: torch.Tensor, actual: torch.Tensor) -> None:
        self.right[layer, point] += int((predicted == actual).sum())
        self.total[layer, point] += actual.numel()


@friendly_errors
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", required=True)
    ap.add_argument("--test", default="data/multi30k/test_2016_flickr")
    ap.add_argument("--direction", default="en-de")
    ap.add_argument("--beam", type=int, default=1)
    ap.add_argument("--lines", type=int, default=60)
    ap.add_argument("--out", default=None, help="folder for routing_foresight.json/.md (default: print only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, vocab, _ = load_export(resolve(args.export))
    src, tgt = args.direction.split("-")
    lines = load_test_set(resolve(args.test), [src])[src][:args.lines]
    recorder = Recorder(model)
    for line in lines:
        recorder.previous.clear()  # prev_step: within one sentence
        translate(model, vocab, [line], tgt, args.beam)
    layers = sorted({layer for layer, _ in recorder.total}, key=lambda n: (n[:3] != "enc", int(n[3:])))
    table = {layer: {point: round(recorder.right[layer, point] / recorder.total[layer, point], 3)
                     for point in POINTS if recorder.total[layer, point]} for layer in layers}
    tokens = {layer: max(recorder.total[layer, p] for p in POINTS) for layer in layers}
    md = [f"Routing foresight of `{args.export}`: {args.direction}, {len(lines)} lines decoded one at a time, beam "
          f"{args.beam}. Share of tokens whose expert (first choice) the layer's router, applied at the point, "
          "predicts.", "", "| layer | tokens | " + " | ".join(POINTS) + " |", "|---|---:|" + "---:|" * len(POINTS)]
    for layer in layers:
        md.append(f"| {layer} | {tokens[layer]} | " + " | ".join(str(table[layer].get(p, "-")) for p in POINTS) + " |")
    print("\n".join(md))
    if args.out:
        out = resolve(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "routing_foresight.json").write_text(json.dumps(
            {"export": args.export, "direction": args.direction, "beam": args.beam, "lines": len(lines),
             "share_predicted": table, "tokens": tokens}, indent=1))
        (out / "routing_foresight.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
