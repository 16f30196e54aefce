"""relu²: the MLP and expert activation (nanochat's), with a two-pass backward.

`F.relu(h).square()` costs two passes forward (relu, square) and four backward under autograd:
pow's backward (h.pow(1), × 2, × grad) and then relu's threshold_backward. But
d/dh relu(h)² = 2·relu(h), zero exactly where relu is, so the backward is one product with the
saved relu output: grad · r · 2 (two passes, no mask). On CPU these passes over the [tokens, hidden]
activations are most of a layer's non-GEMM time (docs/benchmarks.md, issue 11), and the MoE layer
has one per expert GEMM pair, like the dense MLP. torch.compile traces the Function and fuses it
as it fused the two ops.
"""
from __future__ import annotations

import torch


class _ReluSquared(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        r = torch.relu(h)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return torch.mul(grad, r).mul_(2.0)


def relu_squared(h: torch.Tensor) -> torch.Tensor:
    """relu(h)², the same values as F.relu(h).square(), with the cheaper backward."""
    return _ReluSquared.apply(h)
