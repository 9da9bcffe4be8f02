"""Training and validation loss per step of the main-job runs in bench/main_job/logs/ -> curves.png.

    python bench/main_job/plot_curves.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    fig, (train_ax, valid_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for log in sorted((HERE / "logs").glob("*.jsonl")):
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and r["loss"] is not None]
        valid = [(r["step"], r["valid_loss"]) for r in records if r.get("kind") == "valid"]
        if train:
            train_ax.plot(*zip(*train), label=log.stem)
        if valid:
            valid_ax.plot(*zip(*valid), marker="o", label=log.stem)
    for ax, name in ((train_ax, "training loss (CE, label smoothing as each run had it)"), (valid_ax, "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    train_ax.set_ylim(2, 7)
    fig.tight_layout()
    fig.savefig(HERE / "curves.png", dpi=120)


if __name__ == "__main__":
    main()
