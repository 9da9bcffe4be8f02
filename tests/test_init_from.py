"""Experts from Dense (EfD) and Aggregation of Experts (AoE): weight mapping and an end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import TINY, run_cli, tiny_overrides
from mtmoe.config import MoEConfig
from mtmoe.model.seq2seq import Seq2Seq, build_model
from mtmoe.train.init_from import aggregate_experts, experts_from_dense, load_into



def moe_prefixes(model: Seq2Seq) -> list[str]:
    return [Seq2Seq.moe_layer_prefix(name) for name in model.moe_layer_names()]


def sample_batch():
    torch.manual_seed(0)
    return torch.randint(4, 100, (3, 7)), torch.randint(4, 100, (3, 5))


def test_efd_first_forward_equals_the_dense_model():
    """Top-2 with renormalised weights and no dropping: every token gets p1 E(x) + p2 E(x) = E(x)
    with all experts equal to the dense FFN, so the MoE model computes the dense model's output
    (to float rounding of p1 + p2 = 1)."""
    dense = build_model(100, TINY, MoEConfig(enabled=False), seed=3).eval()
    moe = build_model(100, TINY, MoEConfig(num_experts=4, top_k=2), seed=5).eval()
    load_into(moe, experts_from_dense(dense.state_dict(), moe_prefixes(moe), 4), allow_missing_gates=True)
    src, tgt = sample_batch()
    with torch.no_grad():
        want, _, _ = dense(src, tgt)
        got, _, _ = moe(src, tgt)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    # Gates stay fresh (the MoE model's own init), experts are copies.
    assert torch.equal(moe.encoder[1].ffn.experts.w1[3], dense.encoder[1].ffn.ffn.fc1.weight)


def test_efd_noise_makes_experts_differ_deterministically():
    dense = build_model(100, TINY, MoEConfig(enabled=False), seed=3)
    a = experts_from_dense(dense.state_dict(), ["encoder.1.ffn.", "decoder.1.ffn."], 4, noise=0.01, seed=1)
    b = experts_from_dense(dense.state_dict(), ["encoder.1.ffn.", "decoder.1.ffn."], 4, noise=0.01, seed=1)
    w = [a[f"encoder.1.ffn.experts.{e}.fc1.weight"] for e in range(4)]
    assert not torch.equal(w[0], w[1])
    assert torch.equal(w[2], b["encoder.1.ffn.experts.2.fc1.weight"])  # same seed, same noise
    base = dense.state_dict()["encoder.1.ffn.ffn.fc1.weight"]
    assert (w[0] - base).std() < 0.02 * base.std()


def test_aoe_concatenates_experts_and_gates_and_averages_the_rest():
    a = build_model(100, TINY, MoEConfig(num_experts=2), seed=1).state_dict()
    b = build_model(100, TINY, MoEConfig(num_experts=3), seed=2).state_dict()
    merged = aggregate_experts(a, b, 2, 3)
    model = build_model(100, TINY, MoEConfig(num_experts=5), seed=9)
    load_into(model, merged)
    gate = model.encoder[1].ffn.gate.wg.weight
    assert gate.shape == (5, 32) and len(model.encoder[1].ffn.experts) == 5
    assert torch.equal(gate[:2], a["encoder.1.ffn.gate.wg.weight"]) and torch.equal(gate[2:], b["encoder.1.ffn.gate.wg.weight"])
    assert torch.equal(model.decoder[1].ffn.experts.w2[4], b["decoder.1.ffn.experts.2.fc2.weight"])
    assert torch.equal(model.decoder[1].ffn.experts.w2[1], a["decoder.1.ffn.experts.1.fc2.weight"])
    shared = "encoder.0.self_attn.q_proj.weight"
    assert torch.allclose(model.state_dict()[shared], (a[shared] + b[shared]) / 2)


def test_expert_parallel_rank_gets_its_global_experts():
    full = build_model(100, TINY, MoEConfig(num_experts=4), seed=1).state_dict()
    rank1 = build_model(100, TINY, MoEConfig(num_experts=4, ep_size=2), ep_rank=1, seed=7)
    load_into(rank1, full)
    assert torch.equal(rank1.encoder[1].ffn.experts.w1[0], full["encoder.1.ffn.experts.2.fc1.weight"])


@pytest.mark.slow
def test_train_from_dense_end_to_end(tmp_path, corpus, cache_dir):
    """A dense run, then `init.from_dense=<run>`: the MoE run starts from the dense model's loss,
    far below a random start."""
    dense = tmp_path / "dense"
    extra = {"train.log_every": 1, "train.valid_bleu": "never"}
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, dense, steps=30, **{"moe": "dense", **extra}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    efd = tmp_path / "efd"
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, efd, steps=2, **{
        "moe.top_k": 2, "moe.every": 1, "init.from_dense": str(dense), **extra}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initial weights: experts from dense" in proc.stdout + proc.stderr

    def first_loss(run):
        return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()][0]["loss"]

    dense_log = [json.loads(line) for line in (dense / "train_log.jsonl").read_text().splitlines()]
    dense_start, dense_end = dense_log[0]["loss"], [r for r in dense_log if r.get("kind") == "train"][-1]["loss"]
    assert first_loss(efd) < dense_end + 0.3 * (dense_start - dense_end)

    # Fine-tuning that MoE model into pre-gated form: same weights, routing from the previous layer.
    pregated = tmp_path / "pregated"
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, pregated, steps=2, **{
        "moe.top_k": 2, "moe.every": 1, "moe.pregate": "true", "init.from_moe": str(efd), **extra}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all weights from the MoE model" in proc.stdout + proc.stderr and "(now pre-gated)" in proc.stdout + proc.stderr
    assert first_loss(pregated) < dense_end + 0.3 * (dense_start - dense_end)

    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, tmp_path / "bad", steps=2, **{
        "model.d_ff": 128, "init.from_dense": str(dense)}))
    assert proc.returncode == 2 and "its architecture differs from this run's" in proc.stderr and "d_ff" in proc.stderr
    # a vocabulary of the same size trained on other text (fewer lines): every row would land on another
    # token; refused naming a differing id (before, the run started silently)
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, tmp_path / "other_vocab", steps=2, **{
        "data.max_train_lines": 150, "moe.top_k": 2, "moe.every": 1, "init.from_dense": str(dense)}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "its vocabulary" in proc.stderr and "is not this run's" in proc.stderr and "token ids" in proc.stderr
