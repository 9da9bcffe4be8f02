"""What a run shows: a JSONL log of steps and validations, wandb (offline by default), a progress
bar with ETA, routing telemetry summaries and the training-curve plot. Only rank 0 writes."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from mtmoe.formats.integrity import write_atomic

log = logging.getLogger("mtmoe")


def summarize_routing(stats: list[dict], layer_names: list[str]) -> dict:
    """Per MoE layer: dropped-token share, load balance (max/mean expert load) and gate entropy."""
    out = {}
    for name, s in zip(layer_names, stats):
        load = s["load"]
        out[name] = {"dropped": round(float(s["dropped"]), 4),
                     "balance": round(float(load.max() / load.mean().clamp_min(1e-9)), 3),
                     "entropy": round(float(s["entropy"]), 3)}
    return out


def _step_of(line: str) -> float:
    """The step of a log line; a line cut by a crash counts as after every step (dropped)."""
    try:
        return json.loads(line).get("step", -1)
    except ValueError:
        return float("inf")


class RunLog:
    """Appends records to `train_log.jsonl` and mirrors them to wandb."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_cfg=None, config: Optional[dict] = None,
                 wandb_id: Optional[str] = None, resume_step: Optional[int] = None):
        """`resume_step`: the run resumed from this step (0: a fresh start); records after it (written
        by a run that died after its last checkpoint, or before its first) are dropped, so the log reads
        as one uninterrupted run."""
        self.enabled = enabled
        self.path = run_dir / "train_log.jsonl"
        if enabled and resume_step is not None and self.path.is_file():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if line.strip() and _step_of(line) <= resume_step]
            if kept != lines:  # (the run's whole history: never left half-written)
                write_atomic(self.path, "".join(line + "\n" for line in kept))
        self.wandb = None
        self.wandb_id = wandb_id
        if enabled and wandb_cfg is not None and wandb_cfg.mode != "disabled":
            try:
                import wandb

                os.environ.setdefault("WANDB_SILENT", "true")
                self.wandb = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name, mode=wandb_cfg.mode,
                                        dir=str(run_dir), config=config, id=wandb_id, resume="allow")
                self.wandb_id = self.wandb.id
            except Exception as e:  # logging must never stop training
                log.warning("wandb disabled: %s", e)
                self.wandb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            self.wandb.log(flat, step=record.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


class Progress:
    """Progress bar over steps (when max_steps is set) or over the time budget (ETA either way).

    It moves every step (tqdm redraws at most every 2 s); a resumed run starts at its step (or the
    training time it had spent), and a run that trained to its budget ends at total/total."""

    def __init__(self, enabled: bool, max_steps: int, max_minutes: float, start_step: int,
                 start_seconds: float = 0.0):
        self.enabled = enabled
        self.by_time = max_steps <= 0
        self.start = time.monotonic() - start_seconds
        self.bar = None
        if enabled:
            total = int(max_minutes * 60) if self.by_time else max_steps
            unit = "s" if self.by_time else "step"
            initial = int(start_seconds) if self.by_time else start_step
            self.bar = tqdm(total=total, initial=min(initial, total), unit=unit, dynamic_ncols=True,
                            mininterval=2.0, desc="train")

    def update(self, step: int) -> None:
        """Called after every step."""
        if self.bar is None:
            return
        n = min(self.bar.total, int(time.monotonic() - self.start)) if self.by_time else step
        self.bar.update(n - self.bar.n)

    def note(self, step: int, postfix: dict) -> None:
        """The latest logged figures (loss, tokens/s), shown beside the bar."""
        if self.bar is not None:
            self.bar.set_postfix(step=step, **postfix, refresh=False)

    def close(self) -> None:
        if self.bar is None:
            return
        if self.by_time:  # the loop ends when the time budget is spent
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def plot_training_curves(log_path: Path, out_path: Path) -> Optional[Path]:
    """train loss vs step, validation loss/BLEU vs step and the gradient norm before clipping vs
    step (log scale: its early spikes span decades), as one PNG."""
    if not log_path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    steps, losses, norms, vsteps, vloss, vbleu = [], [], [], [], [], []
    for line in log_path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a line cut by a crash
            continue
        if r.get("kind") == "train":
            steps.append(r["step"])
            losses.append(float("nan") if r["loss"] is None else r["loss"])  # None: all withheld
            norms.append(float("nan") if r.get("grad_norm") is None else r["grad_norm"])  # older logs have none
        elif r.get("kind") == "valid":
            vsteps.append(r["step"])
            vloss.append(r["valid_loss"])
            vbleu.append(r.get("valid_bleu"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    # Markers, so that a short run's single point shows; no offset on the axes (a single loss of
    # 5.948 would read "+5.948" over ticks at 0.00).
    axes[0].plot(steps, losses, ".-", label="train loss")
    if vsteps:
        axes[0].plot(vsteps, vloss, "o-", label="valid loss")
    axes[0].set_xlabel("step")
    axes[0].legend()
    if vsteps and any(b is not None for b in vbleu):
        axes[1].plot(vsteps, vbleu, "o-", color="tab:green")
    else:  # an empty panel would read as a broken plot
        axes[1].text(0.5, 0.5, "no validation BLEU in this log\n(train.valid_bleu: `never` logs none, `final`\n"
                     "the last validation's, `always` every validation's)", ha="center", va="center",
                     transform=axes[1].transAxes, color="0.4")
        axes[1].set_xticks([]), axes[1].set_yticks([])
    for ax in axes[:2]:
        ax.ticklabel_format(useOffset=False)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("valid BLEU (greedy, mean over directions)")
    if any(n > 0 for n in norms):  # nan compares False
        axes[2].plot(steps, norms, ".-", color="tab:red")
        axes[2].set_yscale("log")
        for axis_format in (axes[2].yaxis.set_major_formatter, axes[2].yaxis.set_minor_formatter):
            axis_format(FormatStrFormatter("%g"))  # 0.8, 2, 5, not 2x10^0
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("gradient norm before clipping (mean per record)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
