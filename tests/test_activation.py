"""engine.activation.relu_squared: the same values and gradients as autograd's F.relu(h).square()."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.activation import relu_squared


def _grads(fn, h, g):
    h = h.detach().clone().requires_grad_(True)
    out = fn(h)
    out.backward(g)
    return out.detach(), h.grad


def test_values_and_grads_equal_autograds_relu_square():
    torch.manual_seed(0)
    h = torch.randn(257, 129)
    h[0, :8] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0, -3.0, 1e18, -1e18])  # the kink, tiny and huge values
    g = torch.randn(257, 129)
    out, grad = _grads(relu_squared, h, g)
    ref_out, ref_grad = _grads(lambda x: F.relu(x).square(), h, g)
    assert torch.equal(out, ref_out)
    assert torch.equal(grad, ref_grad)  # ×2 is exact, so grad·r·2 rounds exactly as autograd's grad·(2·r)
    assert (grad[h <= 0] == 0).all()


def test_gradcheck_float64():
    h = torch.randn(6, 5, dtype=torch.float64)
    h[h.abs() < 1e-3] = 0.5  # away from the kink, where the derivative is defined
    assert torch.autograd.gradcheck(relu_squared, (h.requires_grad_(True),))


def test_bf16():
    torch.manual_seed(1)
    h = torch.randn(64, 32).bfloat16()
    g = torch.randn(64, 32).bfloat16()
    out, grad = _grads(relu_squared, h, g)
    ref_out, ref_grad = _grads(lambda x: F.relu(x).square(), h, g)
    assert out.dtype == grad.dtype == torch.bfloat16
    assert torch.equal(out, ref_out) and torch.allclose(grad.float(), ref_grad.float(), rtol=1e-2, atol=0)
