"""The encoder-decoder MoE translation model: the one model definition that training wraps in
DeepSpeed, export saves and decoding runs.

Embeddings are shared by encoder input, decoder input and the output projection (tied), scaled by
sqrt(D). MoE FFNs replace dense FFNs in every `moe.every`-th layer of both stacks.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mtmoe.config import MoEConfig, ModelConfig
from mtmoe.data.vocab import PAD_ID
from mtmoe.errors import ConfigError
from mtmoe.model.keys import layer_name, layer_prefix
from mtmoe.model.moe import MoEFFN, RoutingRelay
from mtmoe.model.partitioned import writable
from mtmoe.model.transformer import DecoderLayer, DenseFFN, EncoderLayer, Positions


def is_moe_layer(index: int, moe: MoEConfig) -> bool:
    return moe.enabled and index % moe.every == moe.every - 1


class TiedProjection(nn.Module):
    """x [..., D] -> logits [..., V] through the embedding's weight (tied). A module of its own so
    that a sharding wrapper gathers the weight around this call as around any module's (ZeRO-3
    registers it here as an external parameter: decoding calls `decode`, not the model's forward);
    the embedding is held outside the module tree, so the state dict names the weight once."""

    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self.__dict__["tied"] = embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.tied.weight)


class Seq2Seq(nn.Module):
    """Pre-LN Transformer encoder-decoder with optional MoE FFN layers.

    forward(src [B, S], tgt_in [B, T]) -> (logits [B, T, V], (aux_loss, z_loss), stats per MoE layer).
    """

    def __init__(self, vocab_size: int, model: ModelConfig, moe: MoEConfig, ep_rank: int = 0,
                 init_seed: int = 1):
        super().__init__()
        self.model_cfg, self.moe_cfg, self.vocab_size = model, moe, vocab_size
        d = model.d_model
        self.embed = nn.Embedding(vocab_size, d, padding_idx=PAD_ID)
        with writable(self.embed.weight), torch.no_grad():
            nn.init.normal_(self.embed.weight, std=d ** -0.5)
            self.embed.weight[PAD_ID].zero_()
        self.embed_scale = math.sqrt(d)
        self.project = TiedProjection(self.embed)
        self.positions = Positions(model.positions, model.max_positions, d)
        self.dropout = nn.Dropout(model.dropout)

        def ffn(stack: str, index: int, position: int) -> nn.Module:
            if is_moe_layer(index, moe):
                return MoEFFN(d, model.d_ff, moe.num_experts, moe.top_k, model.dropout, model.activation,
                              moe.capacity_factor, moe.eval_capacity_factor, moe.min_capacity,
                              moe.use_rts, moe.ep_size, ep_rank, init_seed=init_seed * 100 + position,
                              kept_experts=moe.kept_experts.get(layer_name(stack, index)), dispatch=moe.dispatch,
                              expert_storage=moe.expert_storage)
            return DenseFFN(d, model.d_ff, model.dropout, model.activation)

        self.encoder = nn.ModuleList(
            EncoderLayer(d, model.n_heads, ffn("enc", i, i), model.dropout, model.attention_dropout)
            for i in range(model.encoder_layers))
        self.decoder = nn.ModuleList(
            DecoderLayer(d, model.n_heads, ffn("dec", i, model.encoder_layers + i), model.dropout,
                         model.attention_dropout)
            for i in range(model.decoder_layers))
        self.encoder_norm = nn.LayerNorm(d)
        self.decoder_norm = nn.LayerNorm(d)
        unknown = sorted(set(moe.kept_experts) - set(self.moe_layer_names()))
        if unknown:  # a misnamed layer would keep all its experts, unnoticed
            raise ConfigError(f"moe.kept_experts names {unknown}: not MoE layers of this model "
                              f"(those are {self.moe_layer_names()})")
        if moe.enabled and moe.pregate:
            for stack in (self.encoder, self.decoder):
                layers = [layer.ffn for layer in stack if isinstance(layer.ffn, MoEFFN)]
                relay = RoutingRelay([m.gate for m in layers])
                for index, m in enumerate(layers):
                    m.relay, m.relay_index = relay, index

    # -- pieces -------------------------------------------------------------------------------
    def _embed(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.embed(tokens) * self.embed_scale + self.positions(tokens.shape[1], offset)
        return self.dropout(x)

    def encode(self, src: torch.Tensor):
        """src [B, S] -> (memory [B, S, D], keep [B, S], aux list, stats list)."""
        keep = src != PAD_ID
        x = self._embed(src)
        aux, stats = [], []
        for layer in self.encoder:
            x, a, s = layer(x, keep)
            aux.append(a)
            stats.append(s)
        return self.encoder_norm(x), keep, aux, stats

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, memory_keep: torch.Tensor,
               cache: Optional[list] = None, offset: int = 0, project: bool = True):
        """tgt_in [B, T] -> (logits [B, T, V], aux list, stats list). With `cache` (a list with one
        dict per layer) this is one incremental step: T=1 at position `offset`. `project=False`
        returns the final hidden states [B, T, D] instead of logits (routing telemetry needs no
        vocabulary projection, the largest single matmul)."""
        keep = tgt_in != PAD_ID
        x = self._embed(tgt_in, offset)
        aux, stats = [], []
        for i, layer in enumerate(self.decoder):
            x, a, s = layer(x, keep, memory, memory_keep, None if cache is None else cache[i])
            aux.append(a)
            stats.append(s)
        x = self.decoder_norm(x)
        return (self.project(x) if project else x), aux, stats

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor):
        memory, memory_keep, enc_aux, enc_stats = self.encode(src)
        logits, dec_aux, dec_stats = self.decode(tgt_in, memory, memory_keep)
        losses = [a for a in enc_aux + dec_aux if a is not None]
        zero = logits.new_zeros(())
        aux_loss = sum((a[0] for a in losses), zero)
        z_loss = sum((a[1] for a in losses), zero)
        stats = [s for s in enc_stats + dec_stats if s is not None]
        return logits, (aux_loss, z_loss), stats

    # -- introspection ------------------------------------------------------------------------
    def moe_layers(self) -> Iterator[tuple[str, MoEFFN]]:
        """(module path, MoEFFN) of every MoE layer, in forward order."""
        for name, module in self.named_modules():
            if isinstance(module, MoEFFN):
                yield name, module

    def moe_layer_map(self) -> dict[str, MoEFFN]:
        """{short name: MoEFFN} in forward order, e.g. {'enc1': ..., 'dec1': ...}: the one lookup of
        MoE layers by the names routing statistics, configs and serving use."""
        return {name: self.get_submodule(layer_prefix(name)[:-1]) for name in self.moe_layer_names()}

    @staticmethod
    def moe_layer_prefix(name: str) -> str:
        """Short MoE layer name -> state-dict prefix: `enc1` -> `encoder.1.ffn.` (`mtmoe.model.keys`)."""
        return layer_prefix(name)

    def moe_layer_names(self) -> list[str]:
        """Short names of the MoE layers in forward order, e.g. ['enc1', 'dec1']."""
        names = []
        for stack, layers in (("enc", self.encoder), ("dec", self.decoder)):
            for i in range(len(layers)):
                if is_moe_layer(i, self.moe_cfg):
                    names.append(layer_name(stack, i))
        return names


def build_model(vocab_size: int, model: ModelConfig, moe: MoEConfig, ep_rank: int = 0, seed: int = 1) -> Seq2Seq:
    """The model with deterministic initial weights for a given seed (the same on every rank)."""
    torch.manual_seed(seed)
    return Seq2Seq(vocab_size, model, moe, ep_rank=ep_rank, init_seed=seed)
