"""relu² MLPs on CPU computed block by block of rows: the MoE experts and the dense MLP.

    y_ND = blocked_relu2_mlp(x_ND, w_up_GDH, w_down_GHD, rows_per_group)  # group g: relu(x @ w_up[g])² @ w_down[g]
    y_BTD = dense_relu2_mlp(x_BTD, c_fc.weight, c_proj.weight)            # one group; nn.Linear's [out, in] weights

Why blocks: a relu² MLP is two GEMMs around memory-bound passes over its [rows, hidden]
activations (relu, square; in backward the product with relu(h)). Done whole, each pass streams a
[N, H] tensor (16 MiB at the bench's shape) through main memory while the GEMMs wait. Done for one
block of rows at a time (up GEMM -> relu² -> down GEMM, and the same in backward), the block's
activations (a few MiB) are still in cache when the next op reads them. A MoE layer is cut into
such blocks by its experts already: each expert is one block (or a few, when it has many rows); the
dense MLP is one group cut into row blocks, so the two are computed alike and engine.bench's ratio
still measures only what routing costs.

What backward keeps: x, the weights and relu(h) — relu(h)² is recomputed per block, in cache — one
[N, H] activation less than autograd's chain of mm -> relu² -> mm. The ×2 of relu²'s derivative
rides on the GEMMs' alpha instead of a pass of its own.

Where (`blocked_ok`): CPU eager only. Under torch.compile, inductor fuses relu² into one kernel
itself and a Python loop of GEMMs would only break the graph; on CUDA the experts use one batched or
grouped GEMM (a loop of small ones would be launch-bound). Measured on the 2-core dev VM
(docs/benchmarks.md, issue 11): about 2% off the dense MLP, 3-4% off the padded and grouped layers.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from engine.activation import relu_squared

# Rows per block: as many as keep one block's [rows, hidden] activations near this size. On the
# 2-core dev VM (scripts/bench_parts.py blocked --block-mib) the dense MLP gains most at 4-8 MiB
# (1024-2048 rows of 1024 fp32) and nothing at 1 MiB or as one whole block.
BLOCK_BYTES = 4 << 20
# scripts/bench_parts.py blocked and the tests switch it to time and check both paths; the
# environment turns it off for a whole process (ENGINE_BLOCKED_MLP=0: the CUDA code path on CPU).
ENABLED = os.environ.get("ENGINE_BLOCKED_MLP", "1") != "0"


def cpu_eager(t: torch.Tensor) -> bool:
    """Whether t is computed op by op on CPU (not traced by torch.compile): where the engine's
    cache-sized loops pay (these MLPs; engine.moe's router and gathers). Elsewhere a loop of small
    ops only costs CUDA launches or breaks a graph that fuses them anyway."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def blocked_ok(x: torch.Tensor) -> bool:
    """Whether an MLP over x takes the blocked path: CPU, eager."""
    return ENABLED and cpu_eager(x)


def row_blocks(rows_per_group: list[int], hidden: int, itemsize: int) -> list[tuple[int, int]]:
    """(rows, group) for consecutive blocks of rows, each group cut into blocks of at most
    BLOCK_BYTES of activations; empty groups get no block."""
    step = max(1, BLOCK_BYTES // (hidden * itemsize))
    return [(min(step, n - b), g) for g, n in enumerate(rows_per_group) for b in range(0, n, step)]


class _BlockedReluSquaredMLP(torch.autograd.Function):
    # blocks: consecutive (rows, group) pairs covering x_ND. Views come from one split / unbind
    # each (not a slice per block): the loop is Python, and at ~10 blocks a layer its overhead shows.
    @staticmethod
    def forward(ctx, x_ND, w_up_GDH, w_down_GHD, blocks):
        N, D = x_ND.shape
        sizes = [rows for rows, _ in blocks]
        r_NH = x_ND.new_empty(N, w_up_GDH.shape[2])  # relu(h): the one activation kept for backward
        y_ND = x_ND.new_empty(N, D)
        w_up, w_down = w_up_GDH.unbind(0), w_down_GHD.unbind(0)
        for x, r, y, (_, g) in zip(x_ND.split(sizes), r_NH.split(sizes), y_ND.split(sizes), blocks):
            torch.mm(x, w_up[g], out=r).relu_()
            torch.mm(r * r, w_down[g], out=y)
        ctx.save_for_backward(x_ND, w_up_GDH, w_down_GHD, r_NH)
        ctx.blocks = blocks
        return y_ND

    @staticmethod
    def backward(ctx, grad_ND):
        x_ND, w_up_GDH, w_down_GHD, r_NH = ctx.saved_tensors
        need_x, need_up, need_down = ctx.needs_input_grad[:3]
        blocks = ctx.blocks
        sizes = [rows for rows, _ in blocks]
        # empty_like keeps the weights' strides (a transposed nn.Linear weight stays transposed),
        # so the grads come back in the parameters' own layout. The first block of a group writes
        # its grad with beta=0 (the buffer's old contents are ignored, NaN included, as addmm
        # documents); later blocks of the same group add to it.
        gx_ND = torch.empty_like(x_ND) if need_x else None
        g_up = torch.empty_like(w_up_GDH) if need_up else None
        g_down = torch.empty_like(w_down_GHD) if need_down else None
        gxs = gx_ND.split(sizes) if need_x else [None] * len(blocks)
        g_ups = g_up.unbind(0) if need_up else None
        g_downs = g_down.unbind(0) if need_down else None
        w_up_t, w_down_t = w_up_GDH.transpose(1, 2).unbind(0), w_down_GHD.transpose(1, 2).unbind(0)
        written = set()
        for x, r, gy, gx, (_, g) in zip(x_ND.split(sizes), r_NH.split(sizes), grad_ND.contiguous().split(sizes),
                                        gxs, blocks):
            beta = 1 if g in written else 0
            written.add(g)
            if need_down:  # dW_down = relu(h)²ᵀ · dy
                torch.addmm(g_downs[g], (r * r).t(), gy, beta=beta, out=g_downs[g])
            if need_up or need_x:
                half_dh = torch.mm(gy, w_down_t[g]).mul_(r)  # dh / 2 = (dy · W_downᵀ) · relu(h)
                if need_up:  # dW_up = xᵀ · dh
                    torch.addmm(g_ups[g], x.t(), half_dh, beta=beta, alpha=2, out=g_ups[g])
                if need_x:  # dx = dh · W_upᵀ
                    torch.addmm(gx, half_dh, w_up_t[g], beta=0, alpha=2, out=gx)
        for g in range(w_up_GDH.shape[0]):
            if g not in written:  # a group with no rows: its weights had no effect
                for grad in (g_up, g_down):
                    if grad is not None:
                        grad[g].zero_()
        return gx_ND, g_up, g_down, None


def blocked_relu2_mlp(x_ND, w_up_GDH, w_down_GHD, rows_per_group: list[int]) -> torch.Tensor:
    """Each group's consecutive rows of x_ND through relu(x @ w_up[g])² @ w_down[g] -> [N, D].

    rows_per_group (host ints) must sum to N; x and the weights share one dtype."""
    if sum(rows_per_group) != x_ND.shape[0] or len(rows_per_group) != w_up_GDH.shape[0]:
        raise ValueError(f"rows_per_group {rows_per_group} does not cover {x_ND.shape[0]} rows in {w_up_GDH.shape[0]} groups")
    blocks = row_blocks(rows_per_group, w_up_GDH.shape[2], x_ND.element_size())
    return _BlockedReluSquaredMLP.apply(x_ND, w_up_GDH, w_down_GHD, blocks)


def dense_relu2_mlp(x: torch.Tensor, w_fc_HD: torch.Tensor, w_proj_DH: torch.Tensor) -> torch.Tensor:
    """relu(x @ w_fcᵀ)² @ w_projᵀ over the last dim of x, with nn.Linear's [out, in] weights.

    Blocked where blocked_ok and x shares the weights' dtype. Under autocast the Linear layers' own
    casts are wanted (fp32 master weights, bf16 compute), so that path stays F.linear's."""
    if blocked_ok(x) and x.dtype == w_fc_HD.dtype and not torch.is_autocast_enabled(x.device.type):
        x_ND = x.reshape(-1, x.shape[-1])
        y_ND = blocked_relu2_mlp(x_ND, w_fc_HD.t().unsqueeze(0), w_proj_DH.t().unsqueeze(0), [x_ND.shape[0]])
        return y_ND.view(x.shape)
    return F.linear(relu_squared(F.linear(x, w_fc_HD)), w_proj_DH)
