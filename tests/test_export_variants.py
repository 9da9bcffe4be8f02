"""Expert pruning and int8/int4 quantization of exports."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from helpers import TINY
from mtmoe.config import MoEConfig, PruneConfig, validate_prune
from mtmoe.errors import ConfigError, ExportError
from mtmoe.export.prune import direction_keep, global_keep, keep_count, prune_state_dict
from mtmoe.model.moe import MoEFFN
from mtmoe.model.quantized import QMAX, QuantLinear, dequantize, pack_int4, quantize, unpack_int4
from mtmoe.model.seq2seq import Seq2Seq, build_model



@pytest.mark.parametrize("top_k", [1, 2])
def test_pruned_layer_equals_full_layer_on_tokens_routed_to_kept_experts(top_k):
    torch.manual_seed(0)
    full = MoEFFN(16, 32, num_experts=6, top_k=top_k, eval_capacity_factor=0.0, init_seed=3).eval()
    kept = [1, 2, 4] if top_k == 1 else [0, 2, 3, 5]
    pruned = MoEFFN(16, 32, num_experts=6, top_k=top_k, eval_capacity_factor=0.0, kept_experts=kept).eval()
    state = {f"x.ffn.{k}": v for k, v in full.state_dict().items()}
    pruned_state = prune_state_dict({k.replace("x.ffn.", "encoder.1.ffn."): v for k, v in state.items()},
                                    {"enc1": kept})
    pruned.load_state_dict({k.replace("encoder.1.ffn.", ""): v for k, v in pruned_state.items()})
    assert len(pruned.experts) == len(kept)
    x = torch.randn(1, 400, 16)
    with torch.no_grad():
        y_full, _, _ = full(x)
        y_pruned, _, _ = pruned(x)
        choices = full.gate.wg(x[0]).softmax(-1).topk(top_k, dim=-1).indices  # [N, k]
    routed_to_kept = torch.isin(choices, torch.tensor(kept)).all(dim=1)
    assert routed_to_kept.sum() > 20 and (~routed_to_kept).sum() > 20
    assert torch.allclose(y_full[0, routed_to_kept], y_pruned[0, routed_to_kept], atol=1e-6)
    # Tokens whose choice was pruned now go to kept experts only.
    assert not torch.allclose(y_full[0, ~routed_to_kept], y_pruned[0, ~routed_to_kept], atol=1e-6)


def test_keep_rules():
    tele = {"layers": ["enc1"], "overall": {"enc1": {"share": [0.1, 0.5, 0.15, 0.25]}},
            "by_direction": {"en-de": {"enc1": {"share": [0.05, 0.6, 0.3, 0.05]}}}}
    assert keep_count(0.5, 4) == 2 and keep_count(3, 4) == 3 and keep_count(0.3, 4) == 2
    assert 0.28 * 25 > 7 and keep_count(0.28, 25) == 7 and keep_count(0.29, 25) == 8  # float noise is not an expert
    assert global_keep(tele, 2) == {"enc1": [1, 3]}
    assert global_keep(tele, 0.25) == {"enc1": [1]}
    assert direction_keep(tele, "en-de", 0.9) == {"enc1": [1, 2]}
    assert direction_keep(tele, "en-de", 0.5) == {"enc1": [1]}
    assert direction_keep(tele, "en-de", 0.5, min_experts=2) == {"enc1": [1, 2]}
    # shares are stored rounded to 5 decimals (these sum to 0.99999): mass=1 keeps the experts with
    # traffic, not the one without
    rounded = {"layers": ["enc1"], "by_direction": {"en-de": {"enc1": {"share": [0.33333, 0.33333, 0.33333, 0.0]}}}}
    assert direction_keep(rounded, "en-de", 1.0) == {"enc1": [0, 1, 2]}


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_bounded_per_channel(bits):
    torch.manual_seed(0)
    w = torch.randn(64, 33) * torch.linspace(0.01, 3, 64)[:, None]  # very different channel ranges
    q, scale = quantize(w, bits)
    assert q.min() >= -QMAX[bits] - 1 and q.max() <= QMAX[bits]
    err = (dequantize(q, scale) - w).abs().amax(dim=1)
    assert (err <= scale / 2 + 1e-6).all()
    assert torch.allclose(scale, w.abs().amax(dim=1) / QMAX[bits])


def test_int4_packing_round_trips():
    q = torch.randint(-8, 8, (5, 7), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 4)
    assert torch.equal(unpack_int4(packed, 7), q)


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.3)])
def test_quant_linear_close_to_float(bits, tol):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    ql = QuantLinear.from_linear(lin, bits)
    x = torch.randn(10, 64)
    rel = (ql(x) - lin(x)).norm() / lin(x).norm()
    assert rel < tol


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_experts_stay_on_the_models_device(bits):
    """Quantizing a model that is on another device (export with device=cuda) builds its quantized
    experts there: checked on the meta device, where a copy to or from the CPU fails as it would on
    a GPU (before, the codes were made on the CPU and the routing pass after it failed)."""
    from mtmoe.model.quantized import QuantizedExperts, quantize_experts

    model = build_model(60, TINY, MoEConfig(num_experts=4, top_k=1)).to("meta")
    assert quantize_experts(model, bits) == 2 * 4 * len(model.moe_layer_names())
    layers = [m.experts for m in model.modules() if isinstance(getattr(m, "experts", None), QuantizedExperts)]
    assert layers and all(t.device.type == "meta" for layer in layers for t in layer.state_dict().values())


def test_pruned_quantized_export_loads_without_deepspeed(tmp_path, corpus, cache_dir):
    """A checkpoint -> pruned + int4 export -> loads with torch + safetensors only, the record of
    what was kept is in config.json, and expert bytes shrink accordingly."""
    from helpers import clean_env, run_cli, tiny_overrides

    run_dir = tmp_path / "run"
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, run_dir, steps=4,
                                                 **{"train.valid_bleu": "never", "data.directions": "pivot"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, half = tmp_path / "full", tmp_path / "half4"
    assert run_cli("mtmoe-export", [f"checkpoint={run_dir}", f"out={full}"]).returncode == 0
    proc = run_cli("mtmoe-export", [f"checkpoint={full}", f"out={half}", "prune.keep=0.5", "quant=int4",
                                    f"prune.calibration={corpus}/val"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((half / "config.json").read_text())
    kept = {layer: len(ids) for layer, ids in config["pruning"]["kept"].items()}
    assert sum(kept.values()) == 4 and min(kept.values()) >= 1  # half of the model's 8, spent by the loss
    trained = config["training"]["directions"]  # pivot: to and from English only
    assert sorted(config["pruning"]["calibration_directions"]) == sorted(trained) and all("en" in d for d in trained)
    assert set(config["pruning"]["calibration_loss"]["increase"]) == set(trained)
    assert config["quantization"]["bits"] == 4
    import subprocess

    script = f"""
import sys, torch
sys.modules['deepspeed'] = None
from mtmoe.formats.export_format import load_export, export_bytes
model, vocab, config = load_export({str(half)!r})
assert len(model.encoder[1].ffn.experts) == {kept['enc1']}
src = torch.tensor([[vocab.tag_id('de')] + vocab.encode(['A dog.'])[0] + [3]])
logits, _, _ = model(src, torch.tensor([[2]]))
assert torch.isfinite(logits).all()
full, half = export_bytes({str(full)!r}), export_bytes({str(half)!r})
print(full['expert_bytes'], half['expert_bytes'])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full_bytes, half_bytes = map(int, proc.stdout.split())
    d, ff, layers = 32, 64, 2  # tiny: d_model, d_ff, MoE layers
    fp32_expert = 4 * (ff * d + ff + d * ff + d)
    int4_expert = (ff * d // 2 + 4 * ff + 4 * ff) + (d * ff // 2 + 4 * d + 4 * d)  # codes, scales, biases
    assert full_bytes == layers * 4 * fp32_expert
    assert half_bytes == sum(kept.values()) * int4_expert


def test_routing_telemetry_and_heatmap(tmp_path):
    from mtmoe.export.routing import collect_routing
    from mtmoe.eval.telemetry import plot_heatmap

    class FakeVocab:  # token ids straight from characters; tags 4..7
        tags = {"en": 4, "de": 5, "fr": 6}

        def encode(self, lines):
            return [[8 + ord(c) % 40 for c in line] for line in lines]

        def tag_id(self, lang):
            return self.tags[lang]

    model = build_model(60, TINY, MoEConfig(num_experts=4, top_k=2)).eval()
    texts = {"en": ["a cat", "the dog runs"], "de": ["eine Katze", "der Hund rennt"], "fr": ["un chat", "le chien"]}
    tele = collect_routing(model, FakeVocab(), texts, [("en", "de"), ("de", "en"), ("en", "fr")])
    assert tele["layers"] == ["enc1", "dec1"] and tele["num_experts"] == 4
    assert tele["experts"] == {"enc1": 4, "dec1": 4}
    # a pruned model: each layer's own count (num_experts stays the model's as trained)
    pruned = collect_routing(pruned_copy(model, {"enc1": [0, 1], "dec1": [0, 2, 3]}), FakeVocab(), texts, [("en", "de")])
    assert pruned["num_experts"] == 4 and pruned["experts"] == {"enc1": 2, "dec1": 3}
    assert len(pruned["overall"]["dec1"]["share"]) == 3
    assert set(tele["by_direction"]) == {"en-de", "de-en", "en-fr"}
    assert set(tele["by_language"]) == {"en", "de", "fr"}
    assert "enc1" not in tele["by_language"]["fr"]  # fr is only a target: decoder layers only
    for layer in ("enc1", "dec1"):
        for part in ("share", "prob_mass"):
            assert sum(tele["overall"][layer][part]) == pytest.approx(1.0, abs=1e-3)
    # top-2: every real encoder token makes 2 choices
    assert tele["by_direction"]["en-de"]["enc1"]["tokens"] == sum(len(s) + 2 for s in texts["en"])
    png = plot_heatmap(tele, tmp_path / "heat.png")
    assert png.stat().st_size > 1000


def test_coverage_rule_keeps_every_languages_top_expert():
    """Each language prefers a different expert while two shared experts carry the most overall:
    the global rule keeps the shared ones and starves languages; coverage keeps each one's top
    expert (decoder layers by target language, encoder layers by source language)."""
    from mtmoe.export.prune import coverage, coverage_keep

    # 6 experts; en, de, fr each put 0.55 on their own expert (4, 1, 5) and 0.45 on experts 0 and 2.
    own = {"en": 4, "de": 1, "fr": 5}

    def shares(lang):
        share = [0.25, 0.0, 0.2, 0.0, 0.0, 0.0]
        share[own[lang]] = 0.55
        return {"share": share}

    tele = {"layers": ["enc1", "dec1"],
            "overall": {layer: {"share": [0.25, 0.55 / 3, 0.2, 0.0, 0.55 / 3, 0.55 / 3]} for layer in ("enc1", "dec1")},
            "by_language": {"en": {"enc1": shares("en"), "dec1": shares("en")},
                            "de": {"dec1": shares("de")}, "fr": {"dec1": shares("fr")}}}
    assert global_keep(tele, 3) == {"enc1": [0, 1, 2], "dec1": [0, 1, 2]}  # en and fr lose their own expert
    kept = coverage_keep(tele, 3)
    assert kept["dec1"] == [1, 4, 5]  # every target language keeps its top expert
    assert kept["enc1"] == [0, 2, 4]  # only en is a source: its three experts
    cov = coverage(tele, kept)
    assert cov["dec1"] == {"de": 0.55, "en": 0.55, "fr": 0.55} and cov["enc1"] == {"en": 1.0}
    assert coverage(tele, global_keep(tele, 3))["dec1"] == {"de": 1.0, "en": 0.45, "fr": 0.45}
    assert coverage_keep(tele, 0.5)["dec1"] == [1, 4, 5]  # a fraction: 3 of 6
    with pytest.raises(ConfigError, match=r"prune.rule='best': expected one of loss, coverage, global"):
        validate_prune(PruneConfig(keep=2, rule="best"))


def test_coverage_rule_greedy_beyond_the_exhaustive_limit(monkeypatch):
    """Many experts: the greedy search still gives each language its top expert."""
    from mtmoe.export import prune

    monkeypatch.setattr(prune, "EXHAUSTIVE_LIMIT", 10)
    shares = np.zeros((4, 16))
    for lang, expert in enumerate((3, 7, 11, 15)):
        shares[lang, expert] = 0.6
        shares[lang, :3] = 0.4 / 3  # experts 0-2 shared, largest overall
    overall = shares.mean(axis=0)
    assert prune.best_cover(shares, overall, 4) == [3, 7, 11, 15]


class FakeVocab:
    """Token ids straight from characters; language tags 4..7."""
    tags = {"en": 4, "de": 5, "fr": 6}

    def encode(self, lines):
        return [[8 + ord(c) % 40 for c in line] for line in lines]

    def tag_id(self, lang):
        return self.tags[lang]


CALIBRATION = {"en": ["a cat sits", "the dog runs far", "two men"], "de": ["eine Katze", "der Hund rennt", "zwei"]}


def pruned_copy(model, kept):
    import copy

    moe = copy.deepcopy(model.moe_cfg)
    moe.kept_experts = kept
    pruned = Seq2Seq(model.vocab_size, model.model_cfg, moe).eval()
    pruned.load_state_dict(prune_state_dict(model.state_dict(), kept))
    return pruned


def test_direction_nll_equals_the_per_sentence_reference():
    """The calibration NLL (length-sorted batches, projection of the real positions only) equals
    the plain reference: each sentence alone through the model's forward, summed over tokens."""
    from mtmoe.data.batching import collate
    from mtmoe.export.calibrate import direction_nll

    model = build_model(60, TINY, MoEConfig(num_experts=4, top_k=1)).eval()
    vocab, pairs = FakeVocab(), [("en", "de"), ("de", "en")]
    ids = {lang: vocab.encode(lines) for lang, lines in CALIBRATION.items()}
    expected = {}
    with torch.no_grad():
        for src, tgt in pairs:
            total, tokens = 0.0, 0
            for s, t in zip(ids[src], ids[tgt]):
                batch = collate([np.array(s)], [np.array(t)], [vocab.tag_id(tgt)], TINY.max_positions)
                logits = model(batch.src, batch.tgt_in)[0][0]
                total += float(torch.nn.functional.cross_entropy(logits, batch.tgt_out[0], reduction="sum"))
                tokens += batch.tgt_out.numel()
            expected[f"{src}-{tgt}"] = total / tokens
    got = direction_nll(model, vocab, CALIBRATION, pairs, batch_sentences=2)
    assert got == pytest.approx(expected, abs=1e-5)


def test_loss_rule_keeps_the_set_whose_pruned_model_loses_least():
    """The loss rule's in-place restriction computes as the pruned model does, and the kept set of
    each layer is the one whose really pruned model has the smallest mean + worst NLL increase."""
    from mtmoe.export.calibrate import direction_nll, loss_keep, restricted, score

    model = build_model(60, TINY, MoEConfig(num_experts=4, top_k=1)).eval()
    pairs = [("en", "de"), ("de", "en")]
    src = torch.tensor([[5, 9, 12, 30, 3], [5, 14, 3, 0, 0]])
    tgt = torch.tensor([[2, 20, 21, 22], [2, 9, 0, 0]])
    layer = model.get_submodule(model.moe_layer_prefix("dec1")[:-1])
    with torch.no_grad(), restricted(layer, [1, 3]):
        logits = model(src, tgt)[0]
    assert torch.allclose(logits, pruned_copy(model, {"dec1": [1, 3]})(src, tgt)[0], atol=1e-5)
    assert len(layer.experts) == 4 and layer.gate.kept_experts is None  # restored

    kept, report = loss_keep(model, FakeVocab(), CALIBRATION, pairs, {"enc1": 2, "dec1": 2}, progress=lambda _: None)
    base = direction_nll(model, FakeVocab(), CALIBRATION, pairs)
    for name in ("enc1", "dec1"):
        scores = {}
        for ids in itertools.combinations(range(4), 2):
            nll = direction_nll(pruned_copy(model, {name: list(ids)}), FakeVocab(), CALIBRATION, pairs)
            scores[ids] = score({d: nll[d] - base[d] for d in nll})
        assert kept[name] == list(min(scores, key=scores.get))
        assert score(report["increase"][name]) == pytest.approx(min(scores.values()), abs=1e-3)


def test_restriction_computes_as_the_pruned_copy_in_every_layer_and_pregated():
    """Pre-gating routes MoE layer j from layer j-1 with layer j's router, held by the relay: the loss
    rule's restriction replaces it there too (before, the relayed plan chose among all experts while
    only the kept ones ran, and calibrating a pre-gated model raised). Every MoE layer of a model with
    more tokens per expert than the minimum capacity: the restricting router routes in eval mode, as
    the model does (before, it dropped tokens over the training capacity)."""
    src = torch.tensor([[5, 9, 12, 30, 3], [5, 14, 3, 0, 0]])
    tgt = torch.tensor([[2, 20, 21, 22], [2, 9, 0, 0]])
    for pregate in (False, True):
        check_restrictions(build_model(60, TINY, MoEConfig(num_experts=4, top_k=1, every=1, pregate=pregate),
                                       seed=0).eval(), src, tgt)


def check_restrictions(model, src, tgt):
    from mtmoe.export.calibrate import restricted

    for name in model.moe_layer_names():
        layer = model.get_submodule(model.moe_layer_prefix(name)[:-1])
        with torch.no_grad(), restricted(layer, [1, 3]):
            logits = model(src, tgt)[0]
        assert torch.allclose(logits, pruned_copy(model, {name: [1, 3]})(src, tgt)[0], atol=1e-5), name
        assert layer.gate.kept_experts is None and (layer.relay is None or layer.relay.routers[layer.relay_index]
                                                    is layer.gate)


def test_loss_rule_spends_the_model_budget_where_it_costs_least():
    """budget_keep (the loss rule's default): the kept total is the budget, every layer keeps at
    least min_experts, each step drops the (layer, expert) whose really pruned model (with the
    earlier drops) loses least, and the reported increase is the final pruned model's."""
    from mtmoe.export.calibrate import budget_keep, direction_nll, score

    model = build_model(60, TINY, MoEConfig(num_experts=4, top_k=1)).eval()
    pairs = [("en", "de"), ("de", "en")]
    kept, report = budget_keep(model, FakeVocab(), CALIBRATION, pairs, budget=3, min_experts=1,
                               progress=lambda _: None)
    assert sum(len(ids) for ids in kept.values()) == 3 and all(len(ids) >= 1 for ids in kept.values())
    base = direction_nll(model, FakeVocab(), CALIBRATION, pairs)

    def really(sets):
        nll = direction_nll(pruned_copy(model, sets), FakeVocab(), CALIBRATION, pairs)
        return {d: nll[d] - base[d] for d in nll}

    full = {"enc1": [0, 1, 2, 3], "dec1": [0, 1, 2, 3]}
    first = {(name, e): score(really({**full, name: [x for x in full[name] if x != e]}))
             for name in full for e in full[name]}
    assert (report["steps"][0]["layer"], report["steps"][0]["dropped"]) == min(first, key=first.get)
    assert len(report["steps"]) == 5
    final = really(kept)
    assert all(report["increase"][d] == pytest.approx(final[d], abs=1e-3) for d in final)
    with pytest.raises(ValueError, match="budget 1 < 1 expert"):
        budget_keep(model, FakeVocab(), CALIBRATION, pairs, budget=1, progress=lambda _: None)


def test_loss_rule_drops_experts_one_by_one_when_sets_are_many(monkeypatch):
    from mtmoe.export import calibrate

    monkeypatch.setattr(calibrate, "EXHAUSTIVE_SETS", 1)
    model = build_model(60, TINY, MoEConfig(num_experts=4, top_k=1)).eval()
    tried = []
    kept, _ = calibrate.loss_keep(model, FakeVocab(), CALIBRATION, [("en", "de")], {"enc1": 1, "dec1": 4},
                                  progress=tried.append)
    assert len(kept["enc1"]) == 1 and kept["dec1"] == [0, 1, 2, 3]
    assert len(tried) == 4 + 3 + 2  # sets of 3, then 2, then 1 (dec1 keeps everything: nothing tried)


def test_export_settings_that_cannot_apply_are_refused_before_the_weights_are_read(exports, trained, tmp_path,
                                                                                   monkeypatch):
    """export_run's API takes prune as a dict (or PruneConfig) and checks it like mtmoe-export, before
    any weights are read; quantizing a model without experts is refused (it recorded a quantization
    and changed nothing)."""
    from mtmoe.export import pipeline
    from mtmoe.export.pipeline import export_run
    from mtmoe.formats.export_format import load_export, write_export

    def never(*args, **kwargs):
        raise AssertionError("weights were read")

    with monkeypatch.context() as m:
        m.setattr(pipeline, "load_export", never)
        m.setattr(pipeline, "_load_run_model", never)
        for prune, message in [({"rule": "coverage", "keep": 0.5, "per_layer": True}, "prune.per_layer=True: not used"),
                               ({"direction": "all"}, "prune.direction=all: give one direction"),
                               ({"keep": 2, "direction": "en-de"}, "not both"),
                               ({"keep": 0.5, "calibraton": "x"}, r"prune.calibraton: unknown key \(did you mean prune.calibration\?\)")]:
            with pytest.raises(ConfigError, match=message):
                export_run(exports["full"], tmp_path / "x", prune=prune)
        with pytest.raises(ConfigError, match=r"routing.line: unknown key \(did you mean routing.lines\?\)"):
            export_run(exports["full"], tmp_path / "x", routing={"line": 5})
        # what only the model's config can tell: still refused before its weights are read
        sources = {**exports, "run": trained}
        for source, prune, quant, error, message in [
                ("full", {"keep": 5}, None, ConfigError, "prune.keep=5 exceeds the 4 experts per layer"),
                ("run", {"keep": 5}, None, ConfigError, "prune.keep=5 exceeds the 4 experts per layer"),
                ("run", {"direction": "xx-de"}, None, ConfigError, "unknown language 'xx'"),
                ("full", {"direction": "en-xx"}, None, ConfigError, "prune.direction='en-xx': .*unknown language 'xx'"),
                ("pruned", {"keep": 1}, None, ExportError, "already pruned"),
                ("int8", {"keep": 2}, None, ExportError, "prune before quantizing"),
                ("int8", None, "int4", ExportError, r"already quantized \(8 bits\)")]:
            with pytest.raises(error, match=message):
                export_run(sources[source], tmp_path / "x", prune=prune, quant=quant)
    assert not (tmp_path / "x").exists()
    _, vocab, config = load_export(exports["full"])
    dense = tmp_path / "dense"
    write_export(build_model(len(vocab), TINY, MoEConfig(enabled=False)), exports["full"] / "spm.model",
                 {**config, "model": dataclasses.asdict(TINY), "moe": {**config["moe"], "enabled": False}}, dense)
    with pytest.raises(ConfigError, match="quant=int8: .* has no MoE layers"):
        export_run(dense, tmp_path / "dense-int8", quant="int8", routing=None)
    assert not (tmp_path / "dense-int8").exists()


def test_exports_to_one_folder_take_turns(tmp_path):
    """Two exports to one out: the second waits for the first's lock on the folder (they shared one
    staging folder, and each could delete or move the other's half-written files), then refuses to
    replace what the first wrote unless it may overwrite."""
    import fcntl
    import os
    import threading

    from mtmoe.formats.export_format import write_export

    spm = tmp_path / "spm.model"
    spm.write_bytes(b"spm")
    out = tmp_path / "exp"
    model = build_model(60, TINY, MoEConfig(num_experts=4, top_k=1))
    fd = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # an export under way in this folder
    outcome = {}

    def second():
        try:
            write_export(model, spm, {"version": 2}, out, overwrite=False)
            outcome["second"] = "written"
        except ExportError as e:
            outcome["second"] = str(e)

    waiting = threading.Thread(target=second)
    waiting.start()
    waiting.join(timeout=2)
    assert waiting.is_alive() and sorted(p.name for p in tmp_path.iterdir()) == ["spm.model"]  # it waits, staging nothing
    out.mkdir()  # the first export's result appears, then its lock goes
    (out / "config.json").write_text(json.dumps({"version": 1}))
    os.close(fd)
    waiting.join(timeout=60)
    assert "was written while this export ran" in outcome["second"]
    assert json.loads((out / "config.json").read_text()) == {"version": 1}
    write_export(model, spm, {"version": 3}, out)  # overwrite (the default of write_export)
    assert json.loads((out / "config.json").read_text()) == {"version": 3}


def test_overwriting_an_export_keeps_one_complete_copy_at_any_point(tmp_path, monkeypatch):
    """write_export over an existing export: the old one is renamed aside and removed only after the
    new one is in place; a crash between the two renames leaves the old export whole at <out>.old
    (before, it was deleted first), and a finished overwrite leaves nothing beside `out`. The staging
    names are mtmoe's own: a user's `<out>.old` backup and `<out>.partial` folder are left alone, and
    a folder of someone else's at a staging name is refused, not deleted."""
    from pathlib import Path

    from mtmoe.formats.export_format import write_export

    spm = tmp_path / "spm.model"
    spm.write_bytes(b"spm")
    out = tmp_path / "exp"
    model = build_model(60, TINY, MoEConfig(num_experts=4, top_k=1))
    write_export(model, spm, {"version": 1}, out)
    shutil.copytree(out, tmp_path / "exp.old")  # the user's backup, and a folder of theirs
    (tmp_path / "exp.partial").mkdir()
    (tmp_path / "exp.partial" / "notes.txt").write_text("mine")
    write_export(model, spm, {"version": 2}, out)
    assert json.loads((out / "config.json").read_text()) == {"version": 2}
    assert json.loads((tmp_path / "exp.old" / "config.json").read_text()) == {"version": 1}
    assert (tmp_path / "exp.partial" / "notes.txt").read_text() == "mine"
    shutil.rmtree(tmp_path / "exp.old")
    shutil.rmtree(tmp_path / "exp.partial")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "spm.model"]
    (tmp_path / ".exp.mtmoe-partial").mkdir()
    (tmp_path / ".exp.mtmoe-partial" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"\.exp\.mtmoe-partial exists and was not left by an mtmoe export"):
        write_export(model, spm, {"version": 3}, out)
    shutil.rmtree(tmp_path / ".exp.mtmoe-partial")

    rename = Path.rename

    def crash_on_the_new_one(self, target):
        if self.name.endswith(".mtmoe-partial"):
            raise OSError("killed")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_the_new_one)
    with pytest.raises(OSError, match="killed"):
        write_export(model, spm, {"version": 3}, out)
    old = tmp_path / ".exp.mtmoe-old"
    assert json.loads((old / "config.json").read_text()) == {"version": 2}
    assert sorted(p.name for p in old.iterdir()) == ["config.json", "model.safetensors", "spm.model"]
    monkeypatch.undo()
    write_export(model, spm, {"version": 4}, out)  # the complete leftovers of the crash are cleared
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "spm.model"]
    # a kill while the replaced export was being deleted may have taken its config.json first: a
    # folder of nothing but an export's files is still a leftover
    old.mkdir()
    for name in ("model.safetensors", "spm.model"):
        (old / name).write_bytes(b"x")
    write_export(model, spm, {"version": 5}, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "spm.model"]
