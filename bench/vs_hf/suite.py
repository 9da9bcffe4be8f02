"""The side-by-side suite: mtmoe vs HF NLLB-MoE (and mtmoe's dense baseline) in one run.

    python scripts/bench_vs_hf.py                          # default size, ~10 min on a 2-core CPU
    python scripts/bench_vs_hf.py --size tiny --threads 1 --train-batches 2 --decode-sentences 8
    python scripts/bench_vs_hf.py --set data.corpus_dir=/my/corpus --set data.vocab_size=300
    python scripts/bench_vs_hf.py --device cuda --size big --out bench/vs_hf/cuda_big   # on a GPU

Systems (all from random weights, fp32, dropout 0):
  mtmoe        `moe=top2` preset (4 experts in every 2nd layer, capacity factor 1.5, RTS) in its
               DeepSpeed engine for training, the plain model for decoding
  hf           NllbMoeForConditionalGeneration with the same dimensions, top-2, capacity and MoE layers
  hf_fixed     the same with transformers 4.x's expert dispatch (see `systems.fix_hf_dispatch`)
  mtmoe_top1   `moe=top1` preset (capacity factor 1.25) and
  mtmoe_dense  `moe=dense` (same d_ff): the MoE overhead at equal active FLOPs per token
  mtmoe_dropless     top-2, `moe.capacity_factor=0` (no capacity: every token reaches its experts)
  mtmoe_reference    top-2 with `moe.dispatch=reference` (the capacity-buffer index dispatch the
                     grouped dispatch replaced): before/after in one run
The default systems are the first five on a CPU and all seven on a GPU (`--systems` picks).

On a GPU (`--device cuda`): every system trains in a plain PyTorch loop on the device under bf16
autocast with fused AdamW (mtmoe's DeepSpeed engine on a GPU is the trainer's business), decoding
runs under bf16 autocast, and memory is each system's peak allocated GPU memory in training, built
alone before the timed rounds.

Measurements: training target tokens/s at each `--threads` count, all five systems in one process
in alternating rounds after warm-up, median over rounds; beam search sentences/s and generated
tokens/s on `--decode-sentences` lines of the test set (mtmoe, hf, hf_fixed, alternating per
batch); peak RSS of each system's training and decoding phase in its own process. Writes
results.json, results.md and results.png to `--out` and prints the markdown.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from dataclasses import asdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mtmoe.data.corpus import load_test_set
from mtmoe.data.prepare import prepare_training_data
from mtmoe.device import resolve_device
from mtmoe.model.seq2seq import build_model
from mtmoe.paths import resolve

from bench.results import write_results
from bench.vs_hf import report
from bench.vs_hf.decoding import alternate_decoding, make_decoder, sentence_batches
from bench.vs_hf.memory import measure
from bench.vs_hf.systems import (SIZES, active_parameters, build_hf, compose_config, model_vocab,
                                 parameter_counts)
from bench.vs_hf.training import alternate, make_train_step, peak_training_memory, training_batches

PRESETS = {"mtmoe": "top2", "hf": "top2", "hf_fixed": "top2", "mtmoe_top1": "top1", "mtmoe_dense": "dense",
           "mtmoe_dropless": "top2", "mtmoe_reference": "top2"}
SYSTEM_OVERRIDES = {"mtmoe_dropless": ["moe.capacity_factor=0"], "mtmoe_reference": ["moe.dispatch=reference"]}
CPU_SYSTEMS = ("mtmoe", "hf", "hf_fixed", "mtmoe_top1", "mtmoe_dense")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--size", choices=sorted(SIZES), default="default", help="model size preset")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--systems", default="", help=f"comma-separated subset of {','.join(PRESETS)} "
                    "(default: the first five on a CPU, all on a GPU); mtmoe, hf and hf_fixed are always run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra Hydra override for every mtmoe config (e.g. data.vocab_size=300); repeatable")
    ap.add_argument("--threads", default="1,2", help="torch thread counts for training (decoding uses the first)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps per system and thread count")
    ap.add_argument("--train-batches", type=int, default=8, help="timed training batches per round")
    ap.add_argument("--repeats", type=int, default=3, help="training rounds (median)")
    ap.add_argument("--decode-sentences", type=int, default=500)
    ap.add_argument("--decode-batch", type=int, default=64, help="sentences per decoding batch, both systems")
    ap.add_argument("--decode-repeats", type=int, default=1, help="decoding passes (median)")
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--direction", default="en-de")
    ap.add_argument("--memory-steps", type=int, default=10, help="training steps in each memory process")
    ap.add_argument("--memory-sentences", type=int, default=128, help="sentences in each decoding memory process")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--out", default="bench/vs_hf")
    return ap.parse_args(argv)


def count_parameters(configs: dict, vocab_size: int) -> dict[str, dict[str, int]]:
    """Parameters by kind of every system (mtmoe as the plain model; DeepSpeed adds none)."""
    counts = {}
    for name, cfg in configs.items():
        model = build_model(vocab_size, cfg.model, cfg.moe) if name.startswith("mtmoe") else build_hf(cfg, vocab_size)
        counts[name] = parameter_counts(model)
        counts[name]["active"] = active_parameters(counts[name], cfg)
    return counts


def run_training(configs: dict, data, args, threads: list[int], device: torch.device) -> dict[str, dict]:
    """{threads (or "cuda"): {system: {tokens_per_s (median), rounds}}} on the same batches for all
    systems; on a GPU also {"peak_memory_gib": {system: GiB}} (each system built alone first)."""
    vocab_size = model_vocab(args.size, len(data.vocab))
    batches = training_batches(data, configs["mtmoe"], args.warmup + args.train_batches * args.repeats)
    results = {}
    if device.type == "cuda":
        results["peak_memory_gib"] = {
            name: round(peak_training_memory(lambda cfg=cfg, name=name: make_train_step(name, cfg, vocab_size, device),
                                             batches[:args.memory_steps], device), 3)
            for name, cfg in configs.items()}
        print("peak GPU memory (GiB): " + ", ".join(f"{k} {v}" for k, v in results["peak_memory_gib"].items()),
              flush=True)
        threads = [threads[0]]
    steps = {name: make_train_step(name, cfg, vocab_size, device) for name, cfg in configs.items()}
    for n in threads:
        torch.set_num_threads(n)
        key = "cuda" if device.type == "cuda" else str(n)
        rates = alternate(steps, batches, args.warmup, args.repeats)
        results[key] = {name: {"tokens_per_s": statistics.median(r), "rounds": r} for name, r in rates.items()}
        print(f"training, {key}: "
              + ", ".join(f"{name} {v['tokens_per_s']:.0f} tok/s" for name, v in results[key].items()), flush=True)
    timed = batches[args.warmup:]
    results["batches"] = {"warmup": args.warmup, "timed_per_round": args.train_batches, "rounds": args.repeats,
                          "mean_target_tokens": sum(b.num_target_tokens for b in timed) / len(timed),
                          "mean_source_tokens": sum(b.num_source_tokens for b in timed) / len(timed),
                          "mean_sentences": sum(len(b.src) for b in timed) / len(timed)}
    return results


def run_decoding(configs: dict, data, args, threads: int, device: torch.device) -> dict:
    """Beam search speed of mtmoe, hf and hf_fixed (and mtmoe_reference when it runs) on the same
    batches of test sentences."""
    cfg = configs["mtmoe"]
    torch.set_num_threads(threads)
    src, tgt = args.direction.split("-")
    lines = load_test_set(str(Path(cfg.data.corpus_dir) / cfg.data.test_prefix), [src])[src][:args.decode_sentences]
    batches = sentence_batches(data.vocab, lines, args.decode_batch)
    names = [*report.COMPARED, *(n for n in ("mtmoe_reference",) if n in configs)]
    systems = {name: make_decoder(name, configs[name], model_vocab(args.size, len(data.vocab)), device) for name in names}
    results = alternate_decoding(systems, batches, data.vocab.tag_id(tgt), args.beam, args.decode_repeats)
    print("decoding: " + ", ".join(f"{name} {r['sentences_per_s']:.2f} sent/s, {r['tokens_per_s']:.0f} tok/s"
                                   for name, r in results.items()), flush=True)
    return {**results, "threads": threads, "batches": len(batches), "batch_size": args.decode_batch,
            "direction": args.direction}


def run_memory(overrides: list[str], args, threads: int) -> dict:
    """{phase: {system: memory.run's numbers}}: one process per system and phase, two at a time."""
    src, tgt = args.direction.split("-")
    specs = [{"system": name, "phase": phase, "moe": PRESETS[name], "overrides": overrides, "threads": threads,
              "size": args.size,
              "steps": args.memory_steps, "sentences": args.memory_sentences, "batch_size": args.decode_batch,
              "beam": args.beam, "src": src, "tgt": tgt}
             for phase in ("train", "decode") for name in report.COMPARED]
    with ThreadPoolExecutor(2) as pool:
        measured = list(pool.map(measure, specs))
    out: dict = {}
    for m in measured:
        out.setdefault(m.pop("phase"), {})[m.pop("system")] = m
    return out


def setup_notes(configs: dict, training: dict, decoding: dict, beam: int) -> list[str]:
    """What the numbers mean and where the systems differ."""
    top2 = configs["mtmoe"]
    b = training["batches"]
    return [
        f"Training batches: mtmoe BatchStream (train.max_tokens={top2.train.max_tokens}, seed {top2.train.seed}, "
        f"12 directions), {b['mean_sentences']:.1f} sentences, {b['mean_source_tokens']:.0f} source and "
        f"{b['mean_target_tokens']:.0f} target tokens per batch on average; {b['warmup']} warm-up steps, "
        f"{b['rounds']} rounds of {b['timed_per_round']} steps, systems alternating; median round.",
        "A training step: forward, backward, grad-norm clipping at "
        f"{top2.train.clip_norm}, Adam (lr {top2.train.lr}, betas {top2.train.betas}) and the inverse-sqrt lr "
        "schedule. mtmoe: DeepSpeed engine (world of one), label-smoothed CE "
        f"({top2.train.label_smoothing}) + aux loss {top2.moe.aux_loss_weight}; HF: plain PyTorch loop, CE + aux "
        f"loss {top2.moe.aux_loss_weight} (output_router_logits=True).",
        f"MoE: {top2.moe.num_experts} experts in layer(s) every {top2.moe.every} of both stacks, top-2, training "
        f"capacity ceil(2 * real tokens / E * {top2.moe.capacity_factor}) (min {top2.moe.min_capacity}) for both "
        "(HF's router capacity is set per batch to mtmoe's value), padding not routed, no dropping in eval. "
        f"mtmoe uses Random Token Selection (use_rts={top2.moe.use_rts}); NLLB-MoE drops by position.",
        "MoE step time / dense step time: each mtmoe MoE system vs `moe=dense` (same d_ff) on the same batches; "
        "top-1 (`moe=top1`, capacity factor 1.25) does the dense model's FFN FLOPs per token (plus the router), top-2 "
        "doubles the FFN FLOPs of the MoE layers; ratio = dense tok/s / MoE tok/s = step-time ratio.",
        "HF NLLB-MoE in transformers 5.x dispatches tokens wrongly (NllbMoeExperts.forward one-hot encodes the "
        "top-1 mask as if it held expert ids): expert 0 runs all (token, non-top-1 expert) pairs, expert 1 all "
        "top-1 pairs, other experts never run, i.e. E x N expert rows instead of 2N. `HF NLLB-MoE, fixed "
        "dispatch` replaces that method with transformers 4.x's dispatch (tokens with a non-zero combine weight).",
        "Attention: mtmoe uses F.scaled_dot_product_attention; NLLB-MoE declares no SDPA support and runs eager "
        "attention. Positions: sinusoidal without parameters in both (HF offsets position ids by pad+1).",
        f"Decoding: {decoding['mtmoe']['sentences']} sentences of {top2.data.test_prefix} "
        f"({decoding['direction']}), sorted by length, {decoding['batches']} batches of {decoding['batch_size']} "
        f"for every system, beam {beam}, length penalty 1.0. mtmoe: mtmoe.model.generation.translate_ids on the plain model; HF: "
        "generate(num_beams) with a logits processor applying mtmoe's rules (PAD/BOS/UNK banned, EOS forced at "
        "mtmoe's per-sentence limit floor(1.5 * source length + 10)). Random weights rarely choose EOS earlier, "
        "so both generate about the same tokens (row 'decode tokens generated'). mtmoe drops finished sentences "
        "from the batch; HF keeps computing them until the whole batch is done.",
        "Memory: one fresh process per system and phase imports, prepares the data, builds the system, resets "
        "the RSS high-water mark and runs the phase; 'peak RSS' is VmHWM then (the phase's peak, with "
        "everything resident: imports, corpus, model), 'RSS before' the resident size when the phase starts. "
        "mtmoe's training process also imports DeepSpeed, HF's imports transformers.",
    ]


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.monotonic()
    load_before = os.getloadavg()
    threads = [int(t) for t in args.threads.split(",")]
    device = resolve_device(args.device, "--device")  # the apps' decision (attention kernels included), for every system
    overrides = SIZES[args.size] + list(args.set)
    names = [n for n in args.systems.split(",") if n] or list(CPU_SYSTEMS if device.type == "cpu" else PRESETS)
    unknown = sorted(set(names) - set(PRESETS))
    if unknown:
        raise SystemExit(f"--systems: unknown {unknown} (known: {', '.join(PRESETS)})")
    names = list(dict.fromkeys([*report.COMPARED, *names]))
    configs = {name: compose_config(PRESETS[name], overrides + SYSTEM_OVERRIDES.get(name, [])) for name in names}
    data = prepare_training_data(configs["mtmoe"].data)
    parameters = count_parameters(configs, model_vocab(args.size, len(data.vocab)))
    torch.set_num_threads(threads[0])
    training = run_training(configs, data, args, threads, device)
    decoding = run_decoding(configs, data, args, threads[0], device)
    gpu_memory = training.pop("peak_memory_gib", None)
    memory = {} if args.no_memory or device.type == "cuda" else run_memory(overrides, args, threads[0])
    notes = setup_notes(configs, training, decoding, args.beam)
    if device.type == "cuda":
        notes.insert(0, "GPU run: every system trains in a plain PyTorch loop on the device (mtmoe: its Seq2Seq and "
                        "compute_loss, no DeepSpeed) under bf16 autocast with fused AdamW; decoding under bf16 autocast. "
                        "Peak GPU memory: each system built alone, max allocated over "
                        f"{args.memory_steps} training steps minus what was allocated before.")
    results = {"machine": {**report.machine(device), "load_average_1_5_15_min": {"start": load_before,
                                                                            "end": os.getloadavg()}},
               "settings": {"size": args.size, "device": str(device), "systems": names,
                            "model_vocab": model_vocab(args.size, len(data.vocab)),
                            "overrides": overrides, "threads": threads, "beam": args.beam,
                            "model": asdict(configs["mtmoe"].model), "moe": asdict(configs["mtmoe"].moe),
                            "vocab_size": len(data.vocab), "memory_steps": args.memory_steps,
                            "memory_sentences": args.memory_sentences},
               "parameters": parameters, "training": {k: v for k, v in training.items() if k != "batches"},
               "training_batches": training["batches"], "decoding": decoding, "memory": memory,
               "gpu_memory_gib": gpu_memory, "notes": notes,
               "seconds": round(time.monotonic() - started, 1)}
    out = resolve(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = report.markdown(results)
    write_results(out, results, table)
    report.bar_chart(results, out / "results.png")
    print("\n" + table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'} "
          f"({results['seconds']:.0f} s)")
    return results
