"""The GPT: shapes, layer placement, MoE stats, and FLOPs counted against the module's own parameters."""
import math

import torch

from engine.flops import active_matmul_params, flops_per_token, mfu_pct
from engine.model import GPT, GPTConfig, MLP
from engine.moe import MoELayer


def small(**kw) -> GPTConfig:
    base = dict(depth=4, aspect_ratio=16, head_dim=16, seq_len=32, vocab_size=256, n_experts=4, top_k=2,
                expert_hidden_mult=2.0, moe_freq=1, cap=0.0, dispatch="loop")
    base.update(kw)
    return GPTConfig(**base)


def count_active_from_module(model: GPT) -> int:
    """Independent count: every parameter except wte; stacked expert tensors (3-D, inside a MoE
    layer) count only the top_k of n_experts a token visits."""
    cfg = model.cfg
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("wte."):
            continue
        total += p.numel()
    for module in model.modules():
        if isinstance(module, MoELayer):
            for p in module.parameters():
                if p.dim() == 3:
                    total -= p.numel() - p.numel() * cfg.top_k // cfg.n_experts
    return total


def router_params(model: GPT) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, MoELayer) for p in m.parameters() if p.dim() == 2)


def test_initial_loss_is_uniform_and_stats_have_layer_rows():
    torch.manual_seed(0)
    cfg = small()
    model = GPT(cfg)
    idx_BT = torch.randint(0, 256, (2, 32))
    out = model(idx_BT, torch.roll(idx_BT, -1, dims=1))
    # lm_head starts near zero, so the first loss is the uniform one: ln(vocab)
    assert abs(out["loss"].item() - math.log(cfg.padded_vocab)) < 0.05
    assert out["aux_loss"].dim() == 0 and out["aux_loss"].item() > 0
    counts_LE = out["tokens_per_expert_LE"]
    assert counts_LE.shape == (4, 4)
    # routing counts every assignment before drops: tokens * top_k per layer
    assert torch.all(counts_LE.sum(dim=1) == 2 * 32 * 2)
    assert out["dropped"].item() == 0  # cap 0 = dropless
    assert model.assignments(2 * 32) == 4 * 2 * 32 * 2


def test_moe_layer_placement_and_dense_baseline():
    cfg = small(moe_freq=2)
    model = GPT(cfg)
    assert [isinstance(b.mlp, MoELayer) for b in model.blocks] == [False, True, False, True]
    dense = GPT(small(moe_freq=2, dense=True))
    assert not any(isinstance(m, MoELayer) for m in dense.modules())
    hidden = [b.mlp.c_fc.out_features for b in dense.blocks]
    # iso-FLOP twins sit where the MoE layers were: hidden = top_k * expert_hidden
    assert hidden == [4 * 64, 2 * 128, 4 * 64, 2 * 128]
    assert all(isinstance(b.mlp, MLP) for b in dense.blocks)
    out = dense(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    assert out["tokens_per_expert_LE"].shape == (0, 4) and out["aux_loss"].item() == 0


def test_active_params_match_module_count():
    for kw in (dict(), dict(moe_freq=2), dict(dense=True), dict(n_experts=8, top_k=1, moe_freq=3)):
        model = GPT(small(**kw))
        assert active_matmul_params(model.cfg) == count_active_from_module(model), kw


def test_dense_is_iso_flop_with_moe():
    moe, dense = GPT(small()), GPT(small(dense=True))
    # Same active matmul work per token; the MoE model only adds its routers (D x E per layer).
    assert count_active_from_module(moe) - router_params(moe) == count_active_from_module(dense)
    assert flops_per_token(moe.cfg) - 6 * router_params(moe) == flops_per_token(dense.cfg)
    attn = 12 * moe.cfg.n_layer * moe.cfg.n_head * moe.cfg.head_dim * moe.cfg.seq_len
    assert flops_per_token(dense.cfg) == 6 * count_active_from_module(dense) + attn


def test_d12_moe_flops_and_mfu_formula():
    cfg = GPTConfig(depth=12, aspect_ratio=64, head_dim=64, seq_len=1024, vocab_size=32768, n_experts=8, top_k=2)
    D, V, H = 768, 32768, 1536
    per_layer = 4 * D * D + D * 8 + 2 * 2 * D * H
    assert active_matmul_params(cfg) == D * V + 12 * per_layer
    fpt = flops_per_token(cfg)
    assert fpt == 6 * (D * V + 12 * per_layer) + 12 * 12 * 12 * 64 * 1024
    assert mfu_pct(fpt, 1e5, None, 1) is None
    assert math.isclose(mfu_pct(fpt, 8e5, 989e12, 8), 100 * fpt * 8e5 / (989e12 * 8))


def test_rejects_bad_configs():
    for kw, needle in ((dict(cap=-1.0), "--cap"), (dict(top_k=0), "--top-k"), (dict(top_k=5), "larger than"),
                       (dict(head_dim=24), "multiple"), (dict(moe_freq=0), "--moe-freq")):
        try:
            small(**kw).validate()
        except ValueError as exc:
            assert needle in str(exc)
        else:
            raise AssertionError(f"{kw} accepted")


def test_the_size_bound_counts_the_weights_a_built_model_has():
    # GPTConfig.validate refuses a model past MAX_PARAMS by its approx_params (torch-free, for moectl):
    # the estimate must be the model's own count, not a number off by orders of magnitude.
    for kw in ({}, {"depth": 12, "aspect_ratio": 64, "n_experts": 8, "top_k": 2}, {"moe_freq": 2, "depth": 4},
               {"dense": True, "depth": 4}, {"vocab_size": 50304, "depth": 2}):
        cfg = GPTConfig(**kw)
        with torch.device("meta"):
            model = GPT(cfg)
        built = sum(p.numel() for p in model.parameters())
        assert 0.8 < cfg.approx_params() / built < 1.25, (kw, cfg.approx_params(), built)
