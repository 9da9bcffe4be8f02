"""Model shapes, the MoE router's rules, and the dispatch against a per-token reference."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY
from mtmoe.config import MoEConfig, ModelConfig, TrainAppConfig, validate
from mtmoe.errors import ConfigError
from mtmoe.model.moe import MoEFFN, Router, assign_slots, capacity_tensor, expert_capacity
from mtmoe.model.seq2seq import build_model



def batch(vocab=100, b=3, s=7, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (b, s), generator=g)
    tgt = torch.randint(4, vocab, (b, t), generator=g)
    src[0, 4:] = 0
    tgt[1, 3:] = 0
    return src, tgt


@pytest.mark.parametrize("moe", [MoEConfig(enabled=False), MoEConfig(num_experts=4, top_k=1),
                                 MoEConfig(num_experts=4, top_k=2)], ids=["dense", "top1", "top2"])
def test_forward_shapes(moe):
    model = build_model(100, TINY, moe)
    src, tgt = batch()
    logits, (aux, z), stats = model(src, tgt)
    assert logits.shape == (3, 5, 100)
    assert aux.shape == () and z.shape == ()
    n_moe = 2 if moe.enabled else 0  # layer 1 of encoder and of decoder
    assert len(stats) == n_moe and model.moe_layer_names() == (["enc1", "dec1"] if moe.enabled else [])
    if moe.enabled:
        assert stats[0]["load"].shape == (4,)
        assert torch.isclose(stats[0]["load"].sum(), torch.tensor(1.0))
        assert stats[0]["tokens"] == (src != 0).sum()  # padding is not routed
    logits.sum().backward()


def test_experts_do_not_depend_on_layout():
    """Expert e has the same initial weights whether built with ep_size 1 or as rank 1 of ep_size 2."""
    full = MoEFFN(16, 32, num_experts=4, ep_size=1, init_seed=7)
    half = MoEFFN(16, 32, num_experts=4, ep_size=2, ep_rank=1, init_seed=7)
    assert list(half.global_expert_ids) == [2, 3]
    assert torch.equal(full.experts.w1[2], half.experts.w1[0])
    assert torch.equal(full.experts.w2[3], half.experts.w2[1])
    a = build_model(50, TINY, MoEConfig(ep_size=1))
    b = build_model(50, TINY, MoEConfig(ep_size=2), ep_rank=1)
    assert torch.equal(a.embed.weight, b.embed.weight)
    assert torch.equal(a.decoder[1].ffn.gate.wg.weight, b.decoder[1].ffn.gate.wg.weight)


def test_capacity_never_exceeded_and_top2_distinct():
    torch.manual_seed(0)
    router = Router(16, num_experts=4, top_k=2, capacity_factor=0.5, min_capacity=1, use_rts=True)
    x = torch.randn(200, 16)
    keep = torch.ones(200, dtype=torch.bool)
    keep[150:] = False
    plan, aux, z, stats = router(x, keep)
    assert plan.capacity == expert_capacity(150, 4, 2, 0.5, 1)
    assert (plan.expert[:, 0] != plan.expert[:, 1]).all()
    for e in range(4):
        slots = plan.slot[plan.kept & (plan.expert == e)]
        assert len(slots) <= plan.capacity
        assert len(set(slots.tolist())) == len(slots)  # no two tokens share a slot
    assert not plan.kept[150:].any()  # padding never takes capacity
    assert (plan.weight[~plan.kept] == 0).all()
    assert stats["dropped"] > 0


def test_position_rule_drops_latest_tokens():
    """Without RTS, an overflowing expert keeps the earliest positions."""
    expert = torch.zeros(10, 1, dtype=torch.long)  # every token chose expert 0
    valid = torch.ones(10, 1, dtype=torch.bool)
    slots = assign_slots(expert, valid, num_experts=2, priority=None)
    assert slots[:, 0].tolist() == list(range(10))
    rts = assign_slots(expert, valid, 2, priority=torch.tensor([9., 8, 7, 6, 5, 4, 3, 2, 1, 0]))
    assert rts[:, 0].tolist() == list(range(9, -1, -1))


def reference_moe(layer: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """Slow path: each token through its top-k experts, one at a time (no capacity limit)."""
    out = torch.zeros_like(x)
    probs = layer.gate.wg(x).float().softmax(-1)
    for i in range(x.shape[0]):
        p, e = probs[i].topk(layer.gate.top_k)
        if layer.gate.top_k > 1:
            p = p / p.sum()
        for w, idx in zip(p, e):
            out[i] += w * layer.experts.forward_expert(int(idx), x[i][None])[0]
    return out


@pytest.mark.parametrize("top_k", [1, 2])
def test_dispatch_equals_per_token_reference(top_k):
    torch.manual_seed(0)
    layer = MoEFFN(16, 32, num_experts=4, top_k=top_k, capacity_factor=0.0, eval_capacity_factor=0.0, init_seed=1)
    layer.eval()
    x = torch.randn(2, 9, 16)
    y, _, stats = layer(x)
    assert torch.allclose(y.view(-1, 16), reference_moe(layer, x.view(-1, 16)), atol=1e-5)
    assert stats["dropped"] == 0


def test_padding_does_not_change_real_outputs():
    torch.manual_seed(0)
    model = build_model(100, TINY, MoEConfig(num_experts=4, capacity_factor=0.0)).eval()
    src, tgt = batch()
    with torch.no_grad():
        full, _, _ = model(src[:1, :4], tgt[:1])
        padded, _, _ = model(src[:1], tgt[:1])  # src[0, 4:] is padding
    assert torch.allclose(full, padded, atol=1e-5)


def test_config_validation_names_the_field():
    cfg = TrainAppConfig()
    cfg.moe.num_experts, cfg.moe.ep_size = 6, 4
    with pytest.raises(ConfigError, match=r"moe.num_experts=6 is not divisible by moe.ep_size=4"):
        validate(cfg, world_size=4)
    cfg.moe.num_experts, cfg.moe.ep_size = 4, 2
    cfg.train.max_steps = 10
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible by moe.ep_size=2"):
        validate(cfg, world_size=3)
    cfg.moe.top_k = 3
    with pytest.raises(ConfigError, match=r"moe.top_k=3"):
        validate(cfg, world_size=2)
    cfg.moe.top_k, cfg.moe.pregate = 1, True  # base model: 3+3 layers, MoE every 2nd -> one per stack
    cfg.model.encoder_layers = cfg.model.decoder_layers = 3
    with pytest.raises(ConfigError, match=r"moe.pregate=true needs two MoE layers in a stack"):
        validate(cfg, world_size=2)
    cfg.moe.pregate, cfg.moe.every = False, 4  # 3+3 layers: no 4th layer, so no MoE layer at all
    with pytest.raises(ConfigError, match=r"moe.every=4 with 3\+3 layers makes no layer an MoE layer"):
        validate(cfg, world_size=2)
    cfg.moe.every, cfg.moe.top_k = 2, 2
    for kept, message in (({"enc1": [2]}, r"moe.kept_experts.enc1=\[2\] keeps fewer experts than moe.top_k=2"),
                          ({"dec1": [0, 4]}, r"moe.kept_experts.dec1=\[0, 4\]: expert ids must be distinct and in"),
                          ({"dec1": [1, 1]}, r"moe.kept_experts.dec1=\[1, 1\]: expert ids must be distinct")):
        cfg.moe.kept_experts = kept
        with pytest.raises(ConfigError, match=message):
            validate(cfg, world_size=2)
    cfg.moe.kept_experts = {}
    with pytest.raises(ConfigError, match=r"moe.kept_experts names \['enc2'\]: not MoE layers of this model "
                                          r"\(those are \['enc1', 'dec1'\]\)"):
        build_model(100, cfg.model, MoEConfig(num_experts=4, kept_experts={"enc1": [0, 1], "enc2": [0, 1]}))
    for value in (float("inf"), float("nan")):
        cfg.moe.capacity_factor = value
        with pytest.raises(ConfigError, match=r"moe.capacity_factor=(inf|nan) must be a finite number"):
            validate(cfg, world_size=2)


def test_capacity_never_exceeds_the_assignments_and_zero_capacity_dispatches():
    """A huge capacity factor means no limit (it overflowed int64 into min_capacity before); with
    min_capacity=0 and no real token the capacity is 0, which the reference dispatch handles too."""
    assert expert_capacity(150, 4, 2, 1e30, 1) == 300
    assert int(capacity_tensor(torch.tensor(150), 4, 2, 1e30, 1)) == 300
    assert expert_capacity(150, 4, 2, 0.5, 1) == int(capacity_tensor(torch.tensor(150), 4, 2, 0.5, 1)) == 38
    torch.manual_seed(0)
    layer = MoEFFN(16, 32, num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=0).train()
    x, keep = torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool)
    outputs = []
    for dispatch in ("grouped", "reference"):
        layer.dispatch = dispatch
        outputs.append(layer(x, keep)[0])
    assert torch.equal(outputs[0], outputs[1]) and not outputs[0].any()


@pytest.mark.parametrize("top_k", [1, 2])
def test_rts_drops_are_position_independent(top_k):
    """Every token prefers expert 0 (then 1); capacity holds a quarter of them. Over many draws RTS
    keeps each position about equally often; the position rule keeps exactly the earliest ones."""
    n, capacity_factor, trials = 64, 1.0 / top_k, 400  # capacity = k * n / 4 * factor = 16 per expert
    x = torch.randn(n, 8).abs() + 0.5
    keep_counts = {choice: torch.zeros(n) for choice in range(top_k)}
    for use_rts in (True, False):
        router = Router(8, num_experts=4, top_k=top_k, capacity_factor=capacity_factor, min_capacity=1,
                        use_rts=use_rts)
        with torch.no_grad():
            router.wg.weight.zero_()
            router.wg.weight[0] = 2.0
            router.wg.weight[1] = 1.0
        router.train()
        for t in range(trials if use_rts else 1):
            torch.manual_seed(t)
            plan, _, _, _ = router(x, torch.ones(n, dtype=torch.bool))
            assert plan.capacity == 16
            assert (plan.expert[:, 0] == 0).all() and (top_k == 1 or (plan.expert[:, 1] == 1).all())
            for choice in range(top_k):
                kept = plan.kept[:, choice]
                assert int(kept.sum()) == 16  # the expert is full, never over
                if use_rts:
                    keep_counts[choice] += kept.float()
                else:
                    assert kept.nonzero().flatten().tolist() == list(range(16))  # earliest positions
    for choice in range(top_k):
        share = keep_counts[choice] / trials  # expected 0.25 everywhere; binomial sd ~0.022
        assert (share - 0.25).abs().max() < 0.11, share
        assert abs(share[: n // 2].mean() - share[n // 2:].mean()) < 0.03


def test_expert_without_tokens_still_gets_a_zero_gradient():
    """Experts run only on their kept rows; one that received no token must still produce a
    (zero) gradient, or ZeRO-2's gradient partitioning desynchronises across ranks."""
    torch.manual_seed(0)
    layer = MoEFFN(16, 32, num_experts=4, top_k=1, capacity_factor=2.0, init_seed=1)
    with torch.no_grad():
        layer.gate.wg.weight.zero_()
        layer.gate.wg.weight[0] = 1.0  # every token prefers expert 0
    x = torch.rand(1, 6, 16) + 0.1
    y, (aux, z), _ = layer(x)
    (y.sum() + aux).backward()
    grads = layer.experts.w1.grad  # [E, F, D]: one gradient for the stacked experts
    assert grads is not None and grads[0].abs().sum() > 0
    for e in (1, 2, 3):
        assert grads[e].abs().sum() == 0


def test_pregate_routes_each_moe_layer_from_the_previous_layers_input():
    """moe.pregate: MoE layer j's routing is its own router applied to MoE layer j-1's FFN input
    (the first layer routes itself); parameters are those of the normal model, so a normal
    checkpoint loads into the pre-gated form (fine-tuning into pre-gating)."""
    model_cfg = ModelConfig(d_model=32, n_heads=2, d_ff=64, encoder_layers=4, decoder_layers=4, dropout=0.0)
    moe_cfg = MoEConfig(num_experts=4, top_k=2, every=1, capacity_factor=0.0, pregate=True)
    model = build_model(100, model_cfg, moe_cfg).eval()
    normal = build_model(100, model_cfg, MoEConfig(num_experts=4, top_k=2, every=1, capacity_factor=0.0)).eval()
    assert model.state_dict().keys() == normal.state_dict().keys()
    model.load_state_dict(normal.state_dict())

    inputs, routed = {}, {}
    layers = [m for _, m in model.moe_layers() if m.relay is model.encoder[0].ffn.relay]  # encoder stack
    for j, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda mod, args, j=j: inputs.__setitem__(j, args[0].reshape(-1, 32)))
    layers[0].relay.listeners.append(lambda index, expert: routed.__setitem__(index, expert.clone()))
    src, tgt_in = batch()
    with torch.no_grad():
        model(src, tgt_in)
        for j in range(len(layers)):
            source = inputs[max(j - 1, 0)]  # what layer j's routing is computed from
            expected = layers[j].gate.wg(source).float().softmax(-1).topk(2, dim=-1).indices
            assert torch.equal(routed[j], expected)
        own = layers[2].gate.wg(inputs[2]).float().softmax(-1).topk(2, dim=-1).indices
        assert not torch.equal(routed[2], own)  # really routed from an earlier hidden state
        # Same weights, different routing source: outputs differ from the normal model's.
        assert not torch.allclose(model(src, tgt_in)[0], normal(src, tgt_in)[0])


def test_router_logits_are_fp32_under_bf16_autocast():
    """The router's matmul runs in fp32 whatever the autocast (bf16 logits flip near-tied choices)."""
    torch.manual_seed(0)
    router = Router(64, 8, top_k=2)
    x = torch.randn(256, 64)
    fp32 = router.wg(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert router.wg(x).dtype == torch.bfloat16  # what autocast does to the linear layer itself
        logits, probs, top_p, top_e = router.select(x)
        chosen = router.choose(x)
    assert logits.dtype == probs.dtype == top_p.dtype == torch.float32
    torch.testing.assert_close(logits, fp32, rtol=1e-6, atol=1e-6)
    assert torch.equal(top_e, fp32.topk(2, dim=-1)[1]) and torch.equal(chosen, top_e)


def test_validation_batches_keep_the_token_budget_and_the_loss():
    """Validation loss batches lines of similar length within `max_tokens` (it took max_tokens // 64
    lines whatever their length: 128 lines of 256 tokens for a 4k budget), and its mean token NLL is
    the one of the lines taken one at a time."""
    import dataclasses
    from types import SimpleNamespace

    import numpy as np
    import torch.nn.functional as F

    from mtmoe.data.batching import collate
    from mtmoe.train.validation import direction_loss

    rng = np.random.default_rng(0)
    lines = {lang: [rng.integers(10, 100, size=int(n)) for n in rng.integers(1, 120, size=50)] for lang in ("en", "de")}
    class Valid:  # what direction_loss reads of a TokenizedCorpus
        def line(self, lang, i):
            return lines[lang][i]

        def __len__(self):
            return 50

    data = SimpleNamespace(valid=Valid(), vocab=SimpleNamespace(tag_id=lambda lang: 5))
    model = build_model(100, dataclasses.replace(TINY, max_positions=128), MoEConfig(enabled=False)).eval()
    shapes = []
    model.register_forward_pre_hook(lambda m, args: shapes.append((args[0].shape, args[1].shape)))
    loss = direction_loss(model, data, "en", "de", max_tokens=640, max_len=128)
    assert len(shapes) > 1 and all(b * max(s, t) <= 640 for (b, s), (_, t) in shapes)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(50):
            batch = collate([lines["en"][i]], [lines["de"][i]], [5], 128)
            logits, _, _ = model(batch.src, batch.tgt_in)
            nll += F.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), reduction="sum").item()
            count += batch.num_target_tokens
    assert loss == pytest.approx(nll / count, rel=1e-5)
