"""The suite's outputs: machine description, markdown tables, bar chart."""

from __future__ import annotations

import os
import platform
import textwrap
from pathlib import Path

NAMES = {"mtmoe": "mtmoe (top-2)", "hf": "HF NLLB-MoE", "hf_fixed": "HF NLLB-MoE, fixed dispatch",
         "mtmoe_top1": "mtmoe MoE (top-1)", "mtmoe_dense": "mtmoe dense", "mtmoe_dropless": "mtmoe top-2 dropless",
         "mtmoe_reference": "mtmoe top-2, reference dispatch"}
COMPARED = ("mtmoe", "hf", "hf_fixed")
MOE_SYSTEMS = ("mtmoe", "mtmoe_top1", "mtmoe_dropless", "mtmoe_reference")  # compared with mtmoe_dense


def machine(device=None) -> dict:
    """CPU model, cores, SIMD flags that matter for torch on a CPU, library versions; the GPU's
    name when `device` is a CUDA device."""
    import torch
    import transformers

    try:  # a GPU machine may lack py-cpuinfo or DeepSpeed: the table then says so
        import cpuinfo

        info = cpuinfo.get_cpu_info()
    except ImportError:
        info = {}
    try:
        import deepspeed

        deepspeed_version = deepspeed.__version__
    except ImportError:
        deepspeed_version = "not installed"
    flags = set(info.get("flags", []))
    gpu = torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None
    return {"cpu": info.get("brand_raw", platform.processor()), "logical_cpus": os.cpu_count(),
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "deepspeed": deepspeed_version,
            "platform": platform.platform()}


def _training_label(key: str) -> str:
    return "train target tok/s, CUDA bf16" if key == "cuda" else f"train target tok/s, {key} thread(s)"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "–"


def _row(label: str, values: dict, fmt: str, goal: str = "", higher_is_better: bool = True) -> str:
    """| label | mtmoe | HF | HF fixed | mtmoe vs HF | mtmoe vs HF fixed | goal |"""
    cells = [format(values[n], fmt) if values.get(n) is not None else "–" for n in COMPARED]
    if higher_is_better:
        ratios = [_ratio(values.get("mtmoe"), values.get(n)) for n in ("hf", "hf_fixed")]
    else:
        ratios = [_ratio(values.get(n), values.get("mtmoe")) for n in ("hf", "hf_fixed")]
    return f"| {label} | " + " | ".join(cells + ratios + [goal]) + " |"


def markdown(results: dict) -> str:
    """The results as markdown: the side-by-side table, MoE overhead, parameters, set-up."""
    m, s = results["machine"], results["settings"]
    on_gpu = bool(m.get("gpu"))
    where = (f"{m['gpu']} (bf16 autocast); host {m['cpu']}" if on_gpu else
             f"{m['cpu']}, {m['logical_cpus']} logical CPUs (avx2 {m['avx2']}, avx512f {m['avx512f']}, "
             f"avx512_bf16 {m['avx512_bf16']})")
    lines = [f"# mtmoe vs HF NLLB-MoE ({s['size']} size)", "",
             f"{where}; torch {m['torch']}, transformers {m['transformers']}, "
             f"deepspeed {m['deepspeed']}. {'bf16 autocast' if on_gpu else 'fp32 throughout'}. "
             f"Suite time {results['seconds']:.0f} s. Load average "
             f"(1 min) {m['load_average_1_5_15_min']['start'][0]:.2f} at the start, "
             f"{m['load_average_1_5_15_min']['end'][0]:.2f} at the end (other work on the machine skews timings).",
             "",
             "| metric | " + " | ".join(NAMES[n] for n in COMPARED)
             + " | mtmoe vs HF | mtmoe vs HF fixed | goal |", "|---" * 7 + "|"]
    for threads, train in results["training"].items():
        rates = {n: train[n]["tokens_per_s"] for n in COMPARED}
        lines.append(_row(_training_label(threads), rates, ".0f", ">= 1.5x HF"))
    dec = results["decoding"]
    lines.append(_row(f"decode sent/s (beam {s['beam']}, {dec['threads']} thread(s))",
                      {n: dec[n]["sentences_per_s"] for n in COMPARED}, ".2f", ">= 1.5x HF"))
    lines.append(_row("decode generated tok/s", {n: dec[n]["tokens_per_s"] for n in COMPARED}, ".1f"))
    lines.append(_row("decode tokens generated", {n: dec[n]["tokens_generated"] for n in COMPARED}, "d"))
    for phase in ("train", "decode"):
        mem = results.get("memory", {}).get(phase)
        if mem:
            lines.append(_row(f"peak RSS MiB during {phase}", {n: mem[n]["peak_rss_mib"] for n in COMPARED},
                              ".0f", higher_is_better=False))
            lines.append(_row(f"RSS MiB before the {phase} phase", {n: mem[n]["rss_ready_mib"] for n in COMPARED},
                              ".0f", higher_is_better=False))
    gpu_memory = results.get("gpu_memory_gib")
    if gpu_memory:
        lines.append(_row("peak GPU memory GiB, training", {n: gpu_memory[n] for n in COMPARED}, ".2f",
                          "<= HF", higher_is_better=False))
    lines.append(_row("parameters", {n: results["parameters"][n]["total"] for n in COMPARED}, ",d",
                      higher_is_better=False))
    lines += ["", "Ratios: throughput mtmoe/other (higher is better for mtmoe); memory and parameters "
              "other/mtmoe.", "", "## MoE step time / dense step time (mtmoe, same batches)", "",
              "Top-1 does the dense model's FFN FLOPs per token; top-2 doubles the FFN of the MoE layers.", "",
              "| run | system | tok/s | dense tok/s | step time / dense | peak GPU GiB |", "|---" * 6 + "|"]
    for threads, train in results["training"].items():
        if "mtmoe_dense" not in train:
            continue
        dense = train["mtmoe_dense"]["tokens_per_s"]
        for name in MOE_SYSTEMS:
            if name in train:
                rate = train[name]["tokens_per_s"]
                memory = f"{gpu_memory[name]:.2f}" if gpu_memory else "–"
                lines.append(f"| {_training_label(threads)} | {NAMES[name]} | {rate:.0f} | {dense:.0f} | "
                             f"{dense / rate:.3f} | {memory} |")
    if "mtmoe_reference" in results["decoding"]:
        lines += ["", "## Dispatch: grouped (default) vs the capacity-buffer reference, mtmoe top-2", "",
                  "| metric | grouped | reference | grouped / reference |", "|---" * 4 + "|"]
        for threads, train in results["training"].items():
            if "mtmoe_reference" in train:
                a, b = train["mtmoe"]["tokens_per_s"], train["mtmoe_reference"]["tokens_per_s"]
                lines.append(f"| {_training_label(threads)} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
        a, b = dec["mtmoe"]["sentences_per_s"], dec["mtmoe_reference"]["sentences_per_s"]
        lines.append(f"| decode sent/s (beam {s['beam']}) | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
    lines += ["", "## Parameters by kind", "", "| kind | " + " | ".join(NAMES[n] for n in results["parameters"])
              + " |", "|---" * (1 + len(results["parameters"])) + "|"]
    kinds = sorted({k for counts in results["parameters"].values() for k in counts} - {"total", "active"})
    for kind in kinds + ["total", "active"]:
        lines.append(f"| {kind} | " + " | ".join(f"{c.get(kind, 0):,}" for c in results["parameters"].values()) + " |")
    lines += ["", "## Set-up", ""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def bar_chart(results: dict, path: Path) -> None:
    """One panel per measurement, one bar per system (skipped, saying so, without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {path}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"train tok/s ({t}{'' if t == 'cuda' else ' thr'})", {n: r[n]["tokens_per_s"] for n in COMPARED})
              for t, r in results["training"].items()]
    dec = results["decoding"]
    panels.append((f"decode sent/s (beam {results['settings']['beam']})",
                   {n: dec[n]["sentences_per_s"] for n in COMPARED}))
    panels.append(("decode generated tok/s", {n: dec[n]["tokens_per_s"] for n in COMPARED}))
    for phase, mem in results.get("memory", {}).items():
        panels.append((f"peak RSS MiB ({phase})", {n: mem[n]["peak_rss_mib"] for n in COMPARED}))
    if results.get("gpu_memory_gib"):
        panels.append(("peak GPU GiB (train)", dict(results["gpu_memory_gib"])))
    first = next(iter(results["training"].values()))
    panels.append(("mtmoe MoE vs dense tok/s", {n: first[n]["tokens_per_s"] for n in (*MOE_SYSTEMS, "mtmoe_dense")
                                               if n in first and n != "mtmoe"}))
    panels = [(title, values) for title, values in panels if values]  # (no variant run: no MoE-vs-dense bars)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    colors = {"mtmoe": "tab:blue", "hf": "tab:orange", "hf_fixed": "tab:red", "mtmoe_top1": "tab:cyan",
              "mtmoe_dense": "tab:gray", "mtmoe_dropless": "tab:green", "mtmoe_reference": "tab:purple"}
    for ax, (title, values) in zip(axes[0], panels):
        names = list(values)
        bars = ax.bar(range(len(names)), [values[n] for n in names], color=[colors[n] for n in names])
        ax.bar_label(bars, fmt="%.0f" if max(values.values()) >= 100 else "%.1f", fontsize=7)
        ax.set_xticks(range(len(names)), [textwrap.fill(NAMES[n], 14) for n in names], fontsize=6)
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"mtmoe vs HF NLLB-MoE — {results['machine'].get('gpu') or results['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
