"""engine.fp8: float8 GEMMs through torch._scaled_mm, forward and backward, against fp32.

Tolerance (relative Frobenius error vs the fp32 result): forward < 0.06, gradients < 0.10.
Why: e4m3 keeps 3 mantissa bits, so rounding a value costs up to 2^-4 = 6.25% of it, about 3.6%
RMS; a product of two rounded operands carries ~5% RMS, and a dot product of independent errors
keeps that relative size (measured ~3.7%). Gradients are rounded to e5m2 (2 mantissa bits, ~7%
RMS) before their GEMMs, on top of the e4m3 operand: ~6% measured. The bounds leave headroom for
the seed, not for a broken recipe: a missing scale or a transposed operand lands at >= 100%.
We also require the error to be > 0.5%, so the test fails if nothing was actually quantised.
"""
import pytest
import torch

from engine.fp8 import Float8Linear, fp8_bmm, fp8_mm, fp8_supported
from engine.moe import MoEConfig, MoELayer

FWD_TOL, BWD_TOL, MIN_ERR = 0.06, 0.10, 0.005


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def check_close_but_quantised(a, b, tol):
    err = rel(a, b)
    print(f'rel err {err:.4f} (bound {tol})')
    assert MIN_ERR < err < tol, err


def test_fp8_supported_on_cpu_and_reason_elsewhere():
    assert fp8_supported("cpu") == (True, "")
    ok, why = fp8_supported("meta")
    assert not ok and "meta" in why and "\n" not in why


@pytest.mark.parametrize("M", [64, 50])  # 50: the token dim is padded to 16 inside
def test_fp8_mm_forward_backward_vs_fp32(M):
    torch.manual_seed(0)
    x = torch.randn(M, 96, requires_grad=True)
    w = torch.randn(48, 96, requires_grad=True)
    g = torch.randn(M, 48)
    y = fp8_mm(x, w)
    y.backward(g)
    x32, w32 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y32 = x32 @ w32.T
    y32.backward(g)
    assert y.shape == y32.shape and y.dtype == torch.float32
    check_close_but_quantised(y, y32, FWD_TOL)
    check_close_but_quantised(x.grad, x32.grad, BWD_TOL)
    check_close_but_quantised(w.grad, w32.grad, BWD_TOL)


def test_fp8_bmm_forward_backward_vs_fp32():
    torch.manual_seed(0)
    x = torch.randn(4, 24, 64)
    x[1] *= 100.0  # experts with very different ranges: per-expert scales must cope
    x.requires_grad_()
    w = torch.randn(4, 64, 32, requires_grad=True)
    g = torch.randn(4, 24, 32)
    y = fp8_bmm(x, w)
    y.backward(g)
    x32, w32 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.bmm(x32, w32).backward(g)
    y32 = torch.bmm(x32, w32)
    for e in range(4):  # per expert, so the large expert cannot hide errors in the small ones
        check_close_but_quantised(y[e], y32[e], FWD_TOL)
        check_close_but_quantised(x.grad[e], x32.grad[e], BWD_TOL)
        check_close_but_quantised(w.grad[e], w32.grad[e], BWD_TOL)


def test_float8_linear_is_a_drop_in_for_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    f8 = Float8Linear.from_linear(lin)
    assert isinstance(f8, torch.nn.Linear)
    x = torch.randn(2, 10, 64)
    check_close_but_quantised(f8(x), lin(x), FWD_TOL)
    f8(x).square().sum().backward()
    assert f8.weight.grad.shape == lin.weight.shape and torch.isfinite(f8.weight.grad).all()


def test_zero_weights_do_not_produce_nan():
    # w_down starts at zero in MoE layers: amax = 0 must not turn into an inf scale.
    x = torch.randn(16, 32, requires_grad=True)
    w = torch.zeros(16, 32, requires_grad=True)
    y = fp8_mm(x, w)
    y.backward(torch.randn_like(y))
    assert torch.equal(y, torch.zeros_like(y)) and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "call,msg",
    [
        (lambda: fp8_mm(torch.randn(16, 40), torch.randn(16, 40)), "K=40 must be a multiple of 16"),
        (lambda: fp8_mm(torch.randn(16, 32), torch.randn(20, 32)), "N=20 must be a multiple of 16"),
        (lambda: fp8_bmm(torch.randn(2, 8, 24), torch.randn(2, 24, 16)), "D=24 must be a multiple of 16"),
        (lambda: Float8Linear(64, 10), "out_features=10 must be a multiple of 16"),
    ],
)
def test_bad_shapes_are_one_line_value_errors(call, msg):
    with pytest.raises(ValueError) as exc:
        call()
    assert msg in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("dispatch,cap", [("padded", 4.0), ("grouped", 0.0), ("loop", 0.0)])
def test_moe_layer_fp8_experts_vs_fp32(dispatch, cap):
    def build(fp8):
        torch.manual_seed(0)
        layer = MoELayer(MoEConfig(dim=64, n_experts=4, top_k=2, expert_hidden=128, cap=cap, dispatch=dispatch, fp8=fp8))
        torch.nn.init.normal_(layer.w_down_EHD, std=128**-0.5)
        return layer

    x = torch.randn(2, 40, 64)
    g = torch.randn(2, 40, 64)
    results = []
    for fp8 in (True, False):
        layer = build(fp8)
        xr = x.clone().requires_grad_()
        out, aux = layer(xr)
        (out * g).sum().backward()
        results.append((out, xr.grad, layer.w_up_EDH.grad, layer.w_down_EHD.grad))
    (o8, gx8, gu8, gd8), (o32, gx32, gu32, gd32) = results
    # Two fp8 GEMMs in a row (and relu² squaring the first one's error): allow the sum of two
    # forward budgets in the output, and the gradient budget twice over for the chained grads.
    check_close_but_quantised(o8, o32, 2 * FWD_TOL)
    for a, b in [(gx8, gx32), (gu8, gu32), (gd8, gd32)]:
        check_close_but_quantised(a, b, 2 * BWD_TOL)


def test_a_compiled_dropless_fp8_layer_compiles_once_not_once_per_routing():
    """Dropless fp8 loops over experts by their row counts, read on the host. Traced, every count
    was a guard: each new routing recompiled (`--compile static --cap 0 --fp8`: 60-80 s steps on
    the tiny preset). The loop runs eagerly instead - one graph break, the same graphs every step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(dim=64, n_experts=4, top_k=2, expert_hidden=128, cap=0.0, fp8=True))
    compiled = torch.compile(layer, backend="eager", dynamic=False)
    graphs = []
    for seed in range(5):  # another routing each call, as each training step brings
        x = torch.randn(2, 48, 64, generator=torch.Generator().manual_seed(seed))
        y, _ = compiled(x)
        ref, _ = layer(x)
        assert torch.allclose(y, ref)  # (the same eager loop either way)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[0], graphs  # nothing recompiled after the first call
    torch._dynamo.reset()
    counters.clear()
