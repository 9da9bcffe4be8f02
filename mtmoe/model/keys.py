"""The state-dict key grammar of mtmoe's models, checkpoints and exports, owned here.

    encoder.1.ffn.experts.3.fc1.weight
    \\_____________/        \\_________/
    MoE layer prefix        expert tensor (fc1/fc2 weight/bias)
    (short name `enc1`)     of expert 3 of that layer

Every part of mtmoe that parses or builds such a name (initialisation from dense/MoE runs, pruning,
the serving store, export) goes through these functions, so the grammar is written once. Stacked
expert groups show the same per-expert names in their state dict (`mtmoe.model.experts`).
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

EXPERT_KEY = re.compile(r"^(?P<prefix>(?:encoder|decoder)\.\d+\.ffn\.)experts\.(?P<id>\d+)\.(?P<param>.+)$")
STACKS = {"enc": "encoder", "dec": "decoder"}


def layer_name(stack: str, index: int) -> str:
    """Short MoE layer name: ("encoder", 1) -> `enc1` (the names of routing statistics and configs)."""
    return f"{stack[:3]}{index}"


def layer_prefix(name: str) -> str:
    """Short MoE layer name -> state-dict prefix: `enc1` -> `encoder.1.ffn.`."""
    return f"{STACKS[name[:3]]}.{int(name[3:])}.ffn."


def expert_key(prefix: str, expert: int, param: str) -> str:
    """`encoder.1.ffn.` + 3 + `fc1.weight` -> `encoder.1.ffn.experts.3.fc1.weight`."""
    return f"{prefix}experts.{expert}.{param}"


def experts_prefix(prefix: str) -> str:
    """The prefix every expert tensor of the layer at `prefix` starts with."""
    return f"{prefix}experts."


class ExpertKey(NamedTuple):
    """`encoder.1.ffn.experts.3.fc1.weight` -> ("encoder.1.ffn.", 3, "fc1.weight")."""
    prefix: str
    expert: int
    param: str


def parse_expert_key(key: str) -> Optional[ExpertKey]:
    """The parts of an expert tensor's name; None for any other name."""
    m = EXPERT_KEY.match(key)
    return ExpertKey(m["prefix"], int(m["id"]), m["param"]) if m else None


def pruned_name(key: str, kept: dict[str, list[int]]) -> Optional[str]:
    """A state-dict name after pruning to `kept` ({layer: expert indices}): the kept experts of a
    layer renumbered 0..m-1 in the order given, None for a dropped expert, other names unchanged."""
    parts = parse_expert_key(key)
    if parts is None:
        return key
    for layer, ids in kept.items():
        if layer_prefix(layer) == parts.prefix:
            return expert_key(parts.prefix, ids.index(parts.expert), parts.param) if parts.expert in ids else None
    return key
