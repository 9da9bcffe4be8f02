"""Parallel layouts compute the same training run: world 1 (2 micro-batches per step) vs 2 CPU
ranks with data parallelism, expert parallelism, ZeRO-1/2 and CPU optimizer offload. Same seed,
same global batches, no token dropping (routing is then layout-independent): the per-step losses
and the final parameters (all experts, consolidated from each layout's checkpoint) agree to fp32
tolerance. This is what catches expert gradients scaled by ep_size, wrong loss normalisation under
data parallelism, or a ZeRO partition that loses an expert group."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli, run_deepspeed, tiny_overrides

STEPS = 6
TOLERANCE = 2e-5  # largest |difference| of any final parameter (fp32, different reduction orders)
LAYOUTS = {
    # name: (ranks, overrides); `parallel=` picks a conf/parallel/ preset
    "dp2": (2, {}),
    "ep2": (2, {"parallel": "ed"}),
    "ep2_zero1": (2, {"parallel": "ez", "train.zero_stage": 1}),
    "ep2_zero2": (2, {"parallel": "ez"}),
    "dp2_zero2_offload": (2, {"train.zero_stage": 2, "train.offload_optimizer": "cpu"}),
    "ep2_zero2_offload": (2, {"parallel": "ez_offload"}),
}


def parity_args(corpus, cache_dir, run_dir, **extra):
    return tiny_overrides(corpus, cache_dir, run_dir, steps=STEPS, **{
        "train.log_every": 1, "train.valid_bleu": "never", "train.warmup_steps": 2, "train.lr": 3e-3,
        "moe.capacity_factor": 0, "model.dropout": 0.0, "data.val_lines": 4, **extra})


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("kind") == "train"]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    from mtmoe.export.artifact import consolidated_state_dict

    return consolidated_state_dict(run_dir / "checkpoints" / f"step{STEPS:08d}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, cache_dir):
    """World of one, 2 micro-batches per step: the global batch of a 2-rank run."""
    run_dir = tmp_path_factory.mktemp("parity") / "world1"
    proc = run_cli("mtmoe-train", parity_args(corpus, cache_dir, run_dir, **{"train.accumulate": 2}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, losses(run_dir), final_weights(run_dir)


def test_reference_trained(reference):
    """Guards the parity tests: 6 steps move the weights far beyond their tolerance."""
    from mtmoe.export.artifact import _configs
    from mtmoe.model.seq2seq import build_model

    run_dir, ref_losses, ref_weights = reference
    desc = json.loads((run_dir / "model.json").read_text())
    initial = build_model(desc["vocab_size"], *_configs(desc), seed=1).state_dict()
    change = max((ref_weights[k] - initial[k]).abs().max().item() for k in ref_weights)
    assert change > 100 * TOLERANCE and ref_losses[-1] < ref_losses[0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_world_of_one(layout, reference, tmp_path, corpus, cache_dir):
    ranks, extra = LAYOUTS[layout]
    run_dir = tmp_path / layout
    proc = run_deepspeed("mtmoe.train", parity_args(corpus, cache_dir, run_dir, **extra), num_ranks=ranks)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    _, ref_losses, ref_weights = reference
    got = losses(run_dir)
    assert len(got) == STEPS
    assert got == pytest.approx(ref_losses, rel=1e-5, abs=1e-5)
    weights = final_weights(run_dir)
    assert sorted(weights) == sorted(ref_weights)
    # Key-projection biases are left out: softmax ignores a shift shared by all keys, so their exact
    # gradient is 0 and what they get is rounding noise that Adam scales up to lr-sized steps.
    diffs = {k: (weights[k] - ref_weights[k]).abs().max().item() for k in weights if not k.endswith("k_proj.bias")}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < TOLERANCE, f"largest parameter difference {diffs[worst]:.2e} ({worst})"
