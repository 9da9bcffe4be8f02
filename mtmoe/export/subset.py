"""Per-direction expert subsets at load time (`subset.mass`): one full export serves any direction
with only the experts that direction needs.

The routing statistics stored with the export (routing.json, computed once by export_run on the
calibration set) give each MoE layer's share of a direction's routed tokens per expert. For
`subset.mass=0.9`, each layer keeps the fewest experts carrying 90 % of that share (at least
moe.top_k), exactly as `prune.direction` would at export time; only those experts' tensors are
read from model.safetensors, and the model is that export pruned to them (its router chooses among
them only, with the full softmax's weights), so outputs equal those of a pruned export with the
same kept set. What is held is measured on the loaded model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtmoe.data.vocab import Vocab
from mtmoe.errors import ConfigError
from mtmoe.export.prune import direction_keep
from mtmoe.formats.export_format import file_expert_bytes, load_export, read_export_config, read_routing_stats
from mtmoe.model.seq2seq import Seq2Seq


def expert_bytes(model: Seq2Seq) -> int:
    """Bytes of the expert tensors the model holds (parameters and buffers, e.g. int8 codes + scales)."""
    return sum(t.numel() * t.element_size() for _, layer in model.moe_layers()
               for t in layer.experts.state_dict().values())


def choose_subset(export_dir: str | Path, direction: str, mass: float) -> dict[str, list[int]]:
    """{MoE layer: indices (in model.safetensors) of the fewest experts carrying `mass` of
    `direction`'s routing}, from the export's stored routing statistics."""
    config = read_export_config(export_dir)
    if not config["moe"]["enabled"]:
        raise ConfigError("subset.mass: the model has no MoE layers")
    stats = read_routing_stats(export_dir)
    return direction_keep(stats, direction, mass, min_experts=config["moe"]["top_k"], field="subset")


def load_subset(export_dir: str | Path, direction: str, mass: float, device: torch.device | str = "cpu"
                ) -> tuple[Seq2Seq, Vocab, dict, dict]:
    """(model, vocabulary, config, held) of `export_dir` with only the experts `direction` needs;
    `held` reports what was kept and the expert bytes held vs the whole export's."""
    experts = choose_subset(export_dir, direction, mass)
    model, vocab, config = load_export(export_dir, experts=experts, device=device)
    total = file_expert_bytes(export_dir)
    held_bytes = expert_bytes(model)
    full = read_export_config(export_dir)["moe"]
    per_layer = {layer: len(full.get("kept_experts", {}).get(layer) or range(full["num_experts"]))
                 for layer in experts}
    held = {"direction": direction, "mass": mass, "kept": config["moe"]["kept_experts"],
            "experts_held": sum(len(ids) for ids in experts.values()), "experts_total": sum(per_layer.values()),
            "expert_bytes_held": held_bytes, "all_expert_bytes": total,
            "expert_share": round(held_bytes / total, 4) if total else None}
    config["subset"] = held
    return model, vocab, config, held


def format_held(held: dict) -> str:
    """One line for a terminal or a report table."""
    mib = 1 << 20
    kept = " ".join(f"{layer}={ids}" for layer, ids in held["kept"].items())
    return (f"subset {held['direction']} mass {held['mass']}: {held['experts_held']} of {held['experts_total']} "
            f"experts held ({kept}), {held['expert_bytes_held'] / mib:.2f} of {held['all_expert_bytes'] / mib:.2f} "
            f"MiB of expert weights")
