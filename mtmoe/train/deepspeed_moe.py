"""Plugging mtmoe's MoE FFN into DeepSpeed's MoE machinery.

DeepSpeed's engine treats a module as an MoE layer when it is an instance of
`deepspeed.moe.layer.MoE`: it then creates the expert-parallel and expert-data-parallel groups
(`deepspeed.utils.groups`), all-reduces expert gradients over the expert-data-parallel group only,
and checkpoints each expert to its own file with global expert ids. Expert parameters must carry
`allreduce=False` and `group_name`, which `split_params_into_different_moe_groups_for_optimizer`
uses to put them in their own optimizer groups.

`DeepSpeedMoEFFN` is that container around an mtmoe `MoEFFN`. It reuses DeepSpeed's public pieces
(`MoE`, `Experts`, `MOELayer`, groups) for structure, parameter tagging and process groups, holds
the *same* gate and expert modules (no copies), and runs the mtmoe router and dispatch in forward.
Its state-dict names (`deepspeed_moe.gate.wg.weight`,
`deepspeed_moe.experts.deepspeed_experts.<i>.*`: the stacked expert group shows one entry set per
local expert, see mtmoe.model.experts) are the ones DeepSpeed's checkpoint code expects;
`mtmoe.formats.ds_checkpoint.to_plain_name` maps them back to the plain model's names.
"""

from __future__ import annotations

from torch import nn

from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer

from mtmoe.model.moe import MoEFFN, moe_forward


class _RouterGroupLayer(MOELayer):
    """DeepSpeed's MOELayer hands the expert-parallel group to its gate through `_set_ep_group`,
    a DeepSpeed name the mtmoe Router does not carry: the group goes to `Router.ep_group` here."""

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group
        self.gate.ep_group = ep_group


class DeepSpeedMoEFFN(MoE):
    """DeepSpeed `MoE` whose gate is the mtmoe Router and whose experts are the layer's ExpertGroup."""

    def __init__(self, layer: MoEFFN):
        nn.Module.__init__(self)  # MoE.__init__ would build a TopKGate and copies of one expert
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.ep_size = layer.ep_size
        self.expert_group_name = f"ep_size_{layer.ep_size}"
        self.num_experts = layer.num_experts
        self.num_local_experts = len(layer.experts)
        experts = Experts(nn.Identity(), num_local_experts=0, expert_group_name=self.expert_group_name)
        experts.deepspeed_experts = layer.experts
        experts.num_local_experts = self.num_local_experts
        for p in layer.experts.parameters():  # what Experts.__init__ does for its own copies
            p.allreduce = False
            p.group_name = self.expert_group_name
        self.deepspeed_moe = _RouterGroupLayer(layer.gate, experts, self.expert_group_name, self.ep_size,
                                      self.num_local_experts)
        self.relay, self.relay_index = layer.relay, layer.relay_index  # pre-gating (moe.pregate)
        self.dispatch = layer.dispatch

    def forward(self, x, keep=None):
        """Same contract as MoEFFN.forward: x [B, T, D], keep [B, T] -> (y, (aux, z), stats)."""
        return moe_forward(self.deepspeed_moe.gate, self.deepspeed_moe.experts.deepspeed_experts, x, keep,
                           self.relay, self.relay_index, self.dispatch)


def wrap_moe_layers(model: nn.Module) -> int:
    """Replaces every MoEFFN in `model` by a DeepSpeedMoEFFN holding the same modules.
    Returns the number of layers wrapped."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, MoEFFN)]
    for name, layer in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, DeepSpeedMoEFFN(layer))
    return len(targets)

