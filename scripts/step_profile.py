"""Where one rank's training step of the main job goes, against the compute bound of this CPU.

    python scripts/step_profile.py [--steps 20] [--out bench/main_job/step_profile]

On one thread (what each of the main job's 2 ranks gets), with the main job's model and batches
(`+experiment=main`, rank 0's stream), in a world of one with all 4 experts local (no all-to-all,
no gradient all-reduce: the parts of a step that are the model's own):
- the step's parts, timed separately over `--steps` steps after warm-up: forward + loss, backward,
  gradient clipping + Adam (torch's fused Adam, as the main job);
- the FLOPs of forward + backward per target token (torch's FlopCounterMode: matmuls and attention,
  and the experts' grouped GEMMs, `torch._grouped_mm`, which it does not count by itself);
- the matmul rate of one core on the model's own GEMM shapes (tokens x d_model x d_ff, and the
  output projection tokens x d_model x vocab), fp32.
The compute bound is that rate / FLOPs per token: the target tokens/s one rank could reach if the
step were nothing but its matmuls at that rate. Compare with the main job's logged throughput per
rank (train_log.jsonl `tokens_per_s` / 2): the gap between the world-of-one step and the run is
what the 2-rank run adds (all-to-all, gradient all-reduce, waiting for the slower rank).
Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main_job_config(extra: list[str]):
    from mtmoe.cli.common import compose_train_config

    return compose_train_config(["+experiment=main", "moe.ep_size=1", "parallel=none", *extra])


def matmul_gflops(m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """fp32 GEMM rate of this thread for [m, k] @ [k, n] (best of 3 timed bursts)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            count += 1
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - start) / 1e9)
    return best


def grouped_mm_flops(a: torch.Tensor, b: torch.Tensor, offs=None, *args, **kwargs) -> int:
    """FLOPs of `torch._grouped_mm(a, b, offs=...)`, which FlopCounterMode counts as 0: 2 x rows x
    inner x columns summed over the groups. `offs` [G] ends the groups along the ragged dimension
    (what lies past offs[-1] is not computed): 2d x 3d, the experts' forward and input gradient:
    rows; 2d x 2d, the weight gradient: inner; 3d x 2d: columns. 3d x 3d: G batched GEMMs."""
    rows, inner, columns = a.shape[-2], a.shape[-1], b.shape[-1]
    ragged = int(offs[-1]) if offs is not None else None  # a host read: this runs only under the counter
    if ragged is not None and a.dim() == 2:
        rows, inner = (ragged, inner) if b.dim() == 3 else (rows, ragged)
    elif ragged is not None and b.dim() == 2:
        columns = ragged
    groups = a.shape[0] if a.dim() == 3 and b.dim() == 3 else 1
    return 2 * groups * rows * inner * columns


def count_grouped_mm() -> None:
    """Teaches FlopCounterMode `grouped_mm_flops` (once; where this torch has `_grouped_mm`)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    op = getattr(torch.ops.aten, "_grouped_mm", None)
    if op is not None and op not in flop_registry:
        register_flop_formula(op, get_raw=True)(grouped_mm_flops)


def main(argv=None) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from mtmoe.data.batching import BatchStream
    from mtmoe.data.prepare import prepare_training_data, training_mixture
    from mtmoe.model.seq2seq import build_model
    from mtmoe.train.trainer import compute_loss

    from bench.vs_hf.training import make_optimizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra Hydra overrides")
    ap.add_argument("--out", default=str(ROOT / "bench" / "main_job" / "step_profile"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = main_job_config(args.set)
    data = prepare_training_data(cfg.data)
    sources, mixture = training_mixture(data, cfg.tasks, cfg.schedule, cfg.data)
    stream = BatchStream(sources, mixture.probs, {lang: data.vocab.tag_id(lang) for lang in cfg.data.langs},
                         cfg.train.max_tokens, cfg.data.max_len, cfg.train.seed, rank=0, world_size=2)
    batches = list(islice(iter(stream), args.warmup + args.steps))
    model = build_model(len(data.vocab), cfg.model, cfg.moe, 0, cfg.train.seed)
    model.train()
    optimizer = make_optimizer(model.parameters(), cfg, torch.device("cpu"))  # the main job's fused Adam
    parts = {"forward + loss": [], "backward": [], "clip + Adam": []}
    tokens = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        total, *_ = compute_loss(model, batch, cfg, 1.0 / batch.num_target_tokens, False)
        t1 = time.perf_counter()
        total.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i >= args.warmup:
            for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[name].append(seconds)
            tokens.append(batch.num_target_tokens)
    count_grouped_mm()
    flops = FlopCounterMode(display=False)
    counted = batches[args.warmup:args.warmup + 5]
    with flops:
        for batch in counted:
            total, *_ = compute_loss(model, batch, cfg, 1.0 / batch.num_target_tokens, False)
            total.backward()
    model.zero_grad(set_to_none=True)
    flops_per_token = flops.get_total_flops() / sum(b.num_target_tokens for b in counted)

    step_seconds = sum(sum(v) for v in parts.values())
    measured = sum(tokens) / step_seconds
    rows = cfg.train.max_tokens  # a batch's padded token budget: the GEMMs' row count
    gemm = {"ffn [%d x %d x %d]" % (rows, cfg.model.d_model, cfg.model.d_ff):
            matmul_gflops(rows, cfg.model.d_model, cfg.model.d_ff),
            "output projection [%d x %d x %d]" % (rows, cfg.model.d_model, len(data.vocab)):
            matmul_gflops(rows, cfg.model.d_model, len(data.vocab)),
            "attention-size [%d x %d x %d]" % (rows, cfg.model.d_model, cfg.model.d_model):
            matmul_gflops(rows, cfg.model.d_model, cfg.model.d_model)}
    rate = statistics.mean(gemm.values())
    result = {
        "config": "+experiment=main, world of one, all experts local, 1 thread, fp32",
        "steps": args.steps, "mean_target_tokens_per_step": round(sum(tokens) / len(tokens), 1),
        "seconds_per_step": {k: round(sum(v) / len(v), 4) for k, v in parts.items()},
        "target_tokens_per_s": round(measured, 1),
        "flops_per_target_token": round(flops_per_token),
        "achieved_gflops": round(measured * flops_per_token / 1e9, 2),
        "gemm_gflops_one_thread": {k: round(v, 2) for k, v in gemm.items()},
        "compute_bound_target_tokens_per_s": round(rate * 1e9 / flops_per_token, 1),
    }
    result["fraction_of_bound"] = round(measured / result["compute_bound_target_tokens_per_s"], 3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# One rank's training step of the main job ({result['config']})", "",
             f"{args.steps} steps of {result['mean_target_tokens_per_step']} target tokens on average "
             f"(`python scripts/step_profile.py`)", "", "| part | s/step | share |", "|---|---:|---:|"]
    for k, v in result["seconds_per_step"].items():
        lines.append(f"| {k} | {v:.4f} | {v / sum(result['seconds_per_step'].values()):.0%} |")
    lines += ["", "| figure | value |", "|---|---:|",
              f"| target tokens/s (one thread) | {result['target_tokens_per_s']:.0f} |",
              f"| FLOPs per target token (forward + backward) | {result['flops_per_target_token'] / 1e6:.1f} M |",
              f"| achieved GFLOP/s | {result['achieved_gflops']:.1f} |"]
    lines += [f"| GEMM GFLOP/s, {k} | {v:.1f} |" for k, v in result["gemm_gflops_one_thread"].items()]
    lines += [f"| compute bound, target tokens/s (mean GEMM rate / FLOPs per token) | "
              f"{result['compute_bound_target_tokens_per_s']:.0f} |",
              f"| measured / bound | {result['fraction_of_bound']:.2f} |"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
