"""The mtmoe vs HF NLLB-MoE suite (bench/vs_hf) end to end at a tiny size, so it cannot rot.

Needs transformers (`pip install -e ".[bench]"`); skipped without it."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import ROOT

pytest.importorskip("transformers", minversion="5", reason="the bench compares with transformers' NLLB-MoE: "
                                                            "pip install -e '.[bench]'")
sys.path.insert(0, str(ROOT))

from bench.vs_hf.decoding import MtmoeLengthRule, generated_tokens  # noqa: E402
from bench.vs_hf.memory import measure  # noqa: E402
from bench.vs_hf.report import bar_chart  # noqa: E402
from bench.vs_hf.suite import main  # noqa: E402
from bench.vs_hf.systems import build_hf, compose_config, hf_sparse_layers, parameter_counts  # noqa: E402


@pytest.mark.slow
def test_models_match_and_hf_dispatch_is_fixed():
    """Same parameters by kind; the same layers are MoE; the fixed dispatch runs every expert."""
    import torch

    from mtmoe.model.seq2seq import build_model

    cfg = compose_config("top2", ["model=tiny", "model.encoder_layers=4"])
    mtmoe_counts = parameter_counts(build_model(300, cfg.model, cfg.moe))
    hf = build_hf(cfg, 300, fixed_dispatch=True)
    assert parameter_counts(hf) == mtmoe_counts
    assert [layer.is_sparse for layer in hf.model.encoder.layers] == [False, True, False, True]
    ran = set()
    for e, expert in hf_sparse_layers(hf)["encoder"][0].experts.items():
        expert.register_forward_hook(lambda module, args, out, e=e: ran.add(e))
    src = torch.randint(4, 300, (4, 12))
    hf(input_ids=src, attention_mask=torch.ones_like(src), decoder_input_ids=src, labels=src)
    assert ran == {f"expert_{e}" for e in range(cfg.moe.num_experts)}


def test_length_rule_and_token_count():
    """EOS is forced once a row reaches its limit; counts stop at the first EOS (HF pads with EOS)."""
    import torch

    rule = MtmoeLengthRule(torch.tensor([3, 5]), beam=2)
    scores = rule(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 10))
    assert torch.isinf(scores[:2]).sum() == 2 * 9 and scores[0, 3] == 0  # rows of sentence 0: only EOS left
    assert torch.isinf(scores[2:]).sum() == 2 * 3  # sentence 1: PAD, BOS, UNK banned
    assert generated_tokens(torch.tensor([[7, 8, 3, 3, 3], [7, 3, 3, 3, 3], [7, 7, 7, 7, 7]])) == 3 + 2 + 5


@pytest.mark.slow
def test_suite_tiny(corpus, cache_dir, tmp_path):
    out = tmp_path / "bench"
    results = main(["--size", "tiny", "--set", f"data.corpus_dir={corpus}", "--set", "data.vocab_size=300",
                    "--set", f"data.cache_dir={cache_dir}", "--set", "train.max_tokens=256", "--threads", "1",
                    "--warmup", "1", "--train-batches", "1", "--repeats", "2", "--decode-sentences", "6",
                    "--decode-batch", "3", "--no-memory", "--out", str(out),
                    "--systems", "mtmoe_top1,mtmoe_dense,mtmoe_dropless,mtmoe_reference"])
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "results.png"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["parameters"]["mtmoe"]["total"] == saved["parameters"]["hf"]["total"]
    for name in ("mtmoe", "hf", "hf_fixed", "mtmoe_top1", "mtmoe_dense", "mtmoe_dropless", "mtmoe_reference"):
        assert len(results["training"]["1"][name]["rounds"]) == 2
        assert results["training"]["1"][name]["tokens_per_s"] > 0
    for name in ("mtmoe", "hf", "hf_fixed"):
        assert results["decoding"][name]["sentences"] == 6 and results["decoding"][name]["tokens_generated"] > 0
    table = (out / "results.md").read_text()
    assert "| train target tok/s, 1 thread(s) |" in table
    assert "| train target tok/s, 1 thread(s) | mtmoe top-2, reference dispatch |" in table  # MoE / dense rows
    # `--systems mtmoe` (no variant): the chart leaves out the MoE-vs-dense panel instead of failing
    only_compared = {**saved, "training": {t: {n: r[n] for n in ("mtmoe", "hf", "hf_fixed")}
                                           for t, r in saved["training"].items()}}
    bar_chart(only_compared, tmp_path / "compared.png")
    assert (tmp_path / "compared.png").stat().st_size > 0


@pytest.mark.slow
def test_plain_training_step_on_the_cpu(corpus, cache_dir):
    """The GPU suite's mtmoe step (plain loop, no DeepSpeed) runs and learns on the CPU too."""
    import torch

    from mtmoe.data.prepare import prepare_training_data

    from bench.vs_hf.training import PlainStep, training_batches

    cfg = compose_config("top2", ["model=tiny", f"data.corpus_dir={corpus}", "data.vocab_size=300",
                                  f"data.cache_dir={cache_dir}", "train.max_tokens=256", "train.warmup_steps=1"])
    data = prepare_training_data(cfg.data)
    step = PlainStep(cfg, len(data.vocab), torch.device("cpu"))
    batch = training_batches(data, cfg, 1)[0]
    losses = [step(batch) for _ in range(4)]
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("system,phase", [("mtmoe", "train"), ("hf", "decode")])
def test_memory_process(corpus, cache_dir, system, phase):
    """One system's phase in its own process reports its memory (the suite runs 3 systems x 2 phases)."""
    overrides = ["model=tiny", f"data.corpus_dir={corpus}", "data.vocab_size=300", f"data.cache_dir={cache_dir}",
                 "train.max_tokens=256"]
    m = measure({"system": system, "phase": phase, "moe": "top2", "overrides": overrides, "threads": 1, "steps": 1,
                 "sentences": 3, "batch_size": 3, "beam": 2, "src": "en", "tgt": "de"})
    assert m["system"] == system and m["phase"] == phase
    assert 0 < m["rss_ready_mib"] <= m["peak_rss_mib"] and m["setup_peak_rss_mib"] > 0
