"""Per-direction expert subsets at load time (subset.mass, mtmoe.export.subset) and the routing
statistics stored with every export (routing.json) that choose them."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open

from helpers import run_cli
from mtmoe.config import SubsetConfig
from mtmoe.errors import ConfigError, ExportError
from mtmoe.eval.run import evaluate_export
from mtmoe.export.pipeline import export_run
from mtmoe.export.subset import choose_subset, load_subset
from mtmoe.formats import export_format
from mtmoe.formats.export_format import load_export, read_routing_stats
from mtmoe.model.generation import translate

LINES = ["A man is riding a bike.", "Two dogs play in the snow.", "A girl in a red dress.", "People walk."]


def test_exports_store_routing_statistics(exports):
    """Every export has routing.json: per direction and language shares of the exported model's
    own experts (a pruned export's compact ones), named in config.json."""
    for kind, experts in (("full", 4), ("pruned", 2), ("int8", 4)):
        stats = read_routing_stats(exports[kind])
        config = json.loads((exports[kind] / "config.json").read_text())
        assert config["routing"]["file"] == "routing.json" and config["routing"]["lines_per_direction"] > 0
        assert stats["layers"] == ["enc1", "dec1"] and len(stats["by_direction"]) == 12
        assert all(len(stats["overall"][layer]["share"]) == experts for layer in stats["layers"])


def test_subset_holds_the_chosen_experts_and_equals_the_pruned_export(exports, tmp_path, monkeypatch):
    """subset.mass reads only the experts carrying that mass of the direction's routing; the model
    translates exactly as an export pruned for the direction with the same calibration."""
    full = exports["full"]
    stats = read_routing_stats(full)
    # the smallest top share over the layers: every layer keeps 1 to 2 of its 4 experts
    mass = min(max(stats["by_direction"]["en-de"][layer]["share"]) for layer in stats["layers"])
    chosen = choose_subset(full, "en-de", mass)
    assert all(1 <= len(ids) < 4 for ids in chosen.values())

    read = []
    real_safe_open = export_format.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.f = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

        def get_slice(self, key):  # the header's shape and dtype (sizes): no data is read
            return self.f.get_slice(key)

    monkeypatch.setattr(export_format, "safe_open", Recording)
    model, vocab, config, held = load_subset(full, "en-de", mass)
    monkeypatch.undo()
    expert_keys = {key for key in read if ".experts." in key}
    assert expert_keys == {f"{prefix}experts.{e}.{t}" for layer, ids in chosen.items()
                           for prefix in [model.moe_layer_prefix(layer)] for e in ids
                           for t in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
    assert {layer: len(m.experts) for layer, m in ((n, model.get_submodule(model.moe_layer_prefix(n)[:-1]))
                                                   for n in chosen)} == {k: len(v) for k, v in chosen.items()}
    with safe_open(str(full / "model.safetensors"), framework="pt") as f:
        chosen_bytes = sum(f.get_tensor(k).numel() * 4 for k in expert_keys)
        all_bytes = sum(f.get_tensor(k).numel() * 4 for k in f.keys() if ".experts." in k)
    assert held["expert_bytes_held"] == chosen_bytes and held["all_expert_bytes"] == all_bytes
    assert held["experts_held"] == sum(map(len, chosen.values())) and held["experts_total"] == 8

    routing = json.loads((full / "config.json").read_text())["routing"]
    pruned = export_run(full, tmp_path / "en-de", routing=None, prune={
        "direction": "en-de", "mass": mass, "calibration": routing["calibration"],
        "lines": routing["lines_per_direction"]})
    reference, _, pruned_config = load_export(pruned)
    assert pruned_config["pruning"]["kept"] == held["kept"] == chosen  # a full export: file ids are gate rows
    assert [translate(model, vocab, LINES, "de", beam=b) for b in (1, 3)] == \
        [translate(reference, vocab, LINES, "de", beam=b) for b in (1, 3)]


def test_subset_of_a_pruned_export_maps_to_gate_rows(exports):
    """A subset of a pruned export: the chosen file indices map to the original gate rows."""
    pruned = exports["pruned"]
    kept = json.loads((pruned / "config.json").read_text())["moe"]["kept_experts"]
    chosen = choose_subset(pruned, "en-de", 0.5)
    model, _, config, held = load_subset(pruned, "en-de", 0.5)
    assert config["moe"]["kept_experts"] == {layer: [kept[layer][i] for i in ids] for layer, ids in chosen.items()}
    assert held["experts_total"] == 4 and "routing" not in config


def test_eval_subset_per_direction(exports, corpus, tmp_path):
    out = tmp_path / "eval.json"
    report = evaluate_export(exports["full"], f"{corpus}/test_2016_flickr", langs=["en", "de"], beam=1, limit=4,
                             out=out, subset=SubsetConfig(mass=0.9))
    subset = json.loads(out.read_text())["subset"]
    assert subset["mass"] == 0.9 and set(subset["directions"]) == {"en-de", "de-en"}
    for direction, held in subset["directions"].items():
        assert held["kept"] == load_subset(exports["full"], direction, 0.9)[3]["kept"]
        assert 0 < held["expert_bytes_held"] <= held["all_expert_bytes"]
    assert "subset de-en mass 0.9" in report["table"]


def test_subset_errors(exports, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(exports["full"], old)
    (old / "routing.json").unlink()
    proc = run_cli("mtmoe-translate", [f"model={old}", "src=en", "tgt=de", "subset.mass=0.9"], stdin="A dog.\n")
    assert proc.returncode == 2 and "mtmoe: error:" in proc.stderr and "Re-export it: mtmoe-export" in proc.stderr
    with pytest.raises(ConfigError, match=r"subset.mass=1.5 must be in \(0, 1\]"):
        evaluate_export(exports["full"], "data/multi30k/test_2016_flickr", subset=SubsetConfig(mass=1.5))
    with pytest.raises(ConfigError, match="subset: no routing statistics for direction 'en-xx'"):
        choose_subset(exports["full"], "en-xx", 0.9)
    with pytest.raises(ExportError, match="routing.json: missing"):
        choose_subset(old, "en-de", 0.9)


def test_translate_cli_subset(exports):
    model, vocab, _, held = load_subset(exports["full"], "en-de", 0.9)
    proc = run_cli("mtmoe-translate", [f"model={exports['full']}", "src=en", "tgt=de", "beam=2", "subset.mass=0.9"],
                   stdin="\n".join(LINES) + "\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == translate(model, vocab, LINES, "de", beam=2)
    assert f"subset en-de mass 0.9: {held['experts_held']} of 8 experts held" in proc.stderr
