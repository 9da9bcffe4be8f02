"""Collects a sample-efficiency sweep (or any multirun of mtmoe-train) into one table and a plot.

    python scripts/collect_sweep.py runs/sample_efficiency

Per job dir: `results.json` (final validation: loss, greedy BLEU/chrF per direction on
`data.val_lines` lines), `train_log.jsonl` (training and validation records), `.hydra/config.yaml`.
A job initialised from a dense checkpoint (EfD) has its curve shifted by the dense steps it
inherited, so every curve's x axis counts all updates the model received. Writes
`<sweep>/summary.json`, `<sweep>/summary.md` and `<sweep>/valid_loss.png`, prints the table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import yaml


def inherited_steps(config: dict) -> int:
    source = (config.get("init") or {}).get("from_dense") or ""
    match = re.search(r"step(\d{8})", str(source))
    return int(match.group(1)) if match else 0


def collect_job(job_dir: Path) -> dict | None:
    results_path = job_dir / "results.json"
    if not results_path.is_file():
        return None
    results = json.loads(results_path.read_text())
    config = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text()) if (job_dir / ".hydra").is_dir() else {}
    records = [json.loads(line) for line in (job_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    offset = inherited_steps(config)
    train = [r for r in records if r.get("kind") == "train"]
    valid = [(r["step"] + offset, r["valid_loss"]) for r in records if r.get("kind") == "valid"]
    directions = results.get("directions", {})
    bleu = {d: m.get("bleu") for d, m in directions.items() if m.get("bleu") is not None}
    overrides_path = job_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.is_file() else []
    return {"job": job_dir.name, "overrides": [o for o in overrides if not o.startswith("hydra.")],
            "steps": results["step"] + offset, "inherited_steps": offset,
            "valid_loss": results.get("valid_loss"), "valid_bleu": results.get("valid_bleu"),
            "bleu": bleu, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train) if train else None,
            "train_minutes": results.get("train_minutes"), "valid_curve": valid}


def label(job: dict, jobs: list[dict]) -> str:
    """The job's overrides that not every job of the sweep shares (what the sweep varied)."""
    shared = set.intersection(*(set(j.get("overrides", [])) for j in jobs))
    return " ".join(o for o in job.get("overrides", []) if o not in shared) or "-"


def table(jobs: list[dict]) -> str:
    directions = sorted({d for j in jobs for d in j["bleu"]})
    head = ["job", "settings", "steps", "val loss", "val BLEU (mean)", *directions, "tgt tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j in jobs:
        cells = [j["job"], label(j, jobs), str(j["steps"]), f"{j['valid_loss']:.3f}" if j["valid_loss"] is not None else "-",
                 f"{j['valid_bleu']:.2f}" if j["valid_bleu"] is not None else "-",
                 *(f"{j['bleu'][d]:.2f}" if d in j["bleu"] else "-" for d in directions),
                 f"{j['tokens_per_s']:.0f}" if j["tokens_per_s"] else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(jobs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j in jobs:
        if j["valid_curve"]:
            steps, losses = zip(*j["valid_curve"])
            ax.plot(steps, losses, marker="o", label=f"{j['job']}: {label(j, jobs)}")
    ax.set_xlabel("updates (EfD includes its dense steps)")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir")
    args = parser.parse_args()
    sweep = Path(args.sweep_dir)
    if not sweep.is_dir():
        parser.error(f"{sweep}: no such folder (give a sweep's hydra.sweep.dir)")
    jobs = [j for j in (collect_job(d) for d in sorted(sweep.iterdir()) if d.is_dir()) if j]
    if not jobs:
        sys.exit(f"{sweep}: no finished jobs (no */results.json)")
    (sweep / "summary.json").write_text(json.dumps(jobs, indent=1))
    text = table(jobs)
    (sweep / "summary.md").write_text(text)
    plot(jobs, sweep / "valid_loss.png")
    print(text)


if __name__ == "__main__":
    main()
