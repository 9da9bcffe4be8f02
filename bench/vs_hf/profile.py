"""Where the time goes: torch.profiler op tables and cProfile call tables per system and phase.

    python -m bench.vs_hf.profile [--size tiny] [--steps 6] [--sentences 64] [--out bench/vs_hf/profile]

Profiles training steps (after warm-up) of mtmoe, hf_fixed and mtmoe_dense on the same batches
and one beam-search batch of mtmoe and hf_fixed, at one thread, and writes
`<out>/<system>_<phase>.txt` with the top operators by self CPU time (torch.profiler) and the top
Python functions by cumulative time (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _profile(fn, rows: int = 25) -> str:
    """Runs fn under torch.profiler, then under cProfile; both tables as text."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    calls = io.StringIO()
    pstats.Stats(profiler, stream=calls).sort_stats("cumulative").print_stats(rows * 2)
    return f"== torch.profiler, self CPU time ==\n{ops}\n== cProfile, cumulative ==\n{calls.getvalue()}"


def main(argv=None) -> None:
    from mtmoe.data.corpus import load_test_set
    from mtmoe.data.prepare import prepare_training_data

    from bench.vs_hf.decoding import make_decoder, sentence_batches
    from bench.vs_hf.suite import PRESETS
    from bench.vs_hf.systems import SIZES, compose_config, model_vocab
    from bench.vs_hf.training import make_train_step, training_batches

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="default")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench" / "vs_hf" / "profile"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = SIZES[args.size] + args.set
    configs = {name: compose_config(PRESETS[name], overrides) for name in ("mtmoe", "hf_fixed", "mtmoe_dense")}
    data = prepare_training_data(configs["mtmoe"].data)
    batches = training_batches(data, configs["mtmoe"], 3 + args.steps)
    for name, cfg in configs.items():
        step = make_train_step(name, cfg, model_vocab(args.size, len(data.vocab)))
        for batch in batches[:3]:
            step(batch)
        text = _profile(lambda: [step(b) for b in batches[3:]])
        (out / f"{name}_train.txt").write_text(text)
        print(f"wrote {out / f'{name}_train.txt'}", flush=True)
    lines = load_test_set(str(Path(configs["mtmoe"].data.corpus_dir) / configs["mtmoe"].data.test_prefix),
                          ["en"])["en"][:args.sentences]
    batch = sentence_batches(data.vocab, lines, args.sentences)[0]
    tag_id = data.vocab.tag_id("de")
    for name in ("mtmoe", "hf_fixed"):
        decode, model = make_decoder(name, configs["mtmoe"], model_vocab(args.size, len(data.vocab)))
        decode(model, batch[:4], tag_id, 4)
        text = _profile(lambda: decode(model, batch, tag_id, 4))
        (out / f"{name}_decode.txt").write_text(text)
        print(f"wrote {out / f'{name}_decode.txt'}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
