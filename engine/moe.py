"""Mixture-of-Experts layer: router -> dispatcher -> stacked experts -> combine.

    moe = MoELayer(MoEConfig(dim=..., n_experts=8, top_k=2, expert_hidden=2*dim, cap=1.0))
    out_BTD, aux = moe(x_BTD)
    aux.loss          scalar tensor: balance_coeff * switch_loss + z_coeff * z_loss (0 if both off)
    aux.tokens_per_expert_E   float tensor [E]: assignments routed to each expert (before drops)
    aux.dropped       float scalar tensor: assignments dropped by capacity (0 when dropless)
    aux.assignments   int: tokens * top_k (python int, known from shapes)

Balancing (cfg.balance): `loss` adds the Switch loss (balance_coeff); `none` adds nothing; `bias` is
DeepSeek-V3's aux-loss-free scheme: a per-expert bias buffer `expert_bias_E` is added to the router
probabilities for the top-k CHOICE only (the gate weights stay the unbiased probabilities, so no
gradient ever reaches the bias), and after each optimizer step `update_expert_bias` moves it by
+-balance_rate toward equal load (the loop passes counts summed over micro-batches and ranks, so
every rank applies the same update and the biases never drift apart).

Dispatchers (cfg.dispatch; "auto" = padded for cap > 0, grouped for cap == 0):
  padded   capacity C = ceil(cap * N * top_k / E), at most N, rounded up to 8; tokens gathered into an [E, C, D]
           buffer, two torch.bmm; assignments past C are dropped first come first served (token
           order) and contribute nothing (the residual carries the token). Static shapes, no host
           sync: compiles with torch.compile(fullgraph=True, dynamic=False).
  grouped  dropless: assignments sorted by expert, torch._grouped_mm over int32 offsets (on CPU in
           eager mode, engine.blocked_mlp's per-expert GEMMs instead). Where _grouped_mm is needed
           but missing or refuses the dtype/strides, a padded dispatch with C = N (no expert can
           receive more than N assignments, so nothing drops) stands in: slower, correct.
           With cap > 0 it is a ValueError (it is dropless by definition; use padded or loop).
  loop     the obviously-correct reference: a Python loop over experts with host syncs. It honours
           cap too (keeps the first C assignments per expert), so it is the reference for drops.

How tokens move (padded and grouped): the N*K assignments are stable-sorted by expert, so each
expert's assignments stay in token order. Dispatch and combine are then pure gathers through that
permutation, and they are custom autograd Functions whose backward is again a gather (never a
scatter-add, never an [N, E] one-hot): that is what keeps the MoE layer near the dense MLP's cost.

Expert parallelism (`shard_experts`, engine.ep): the router and the dispatch above stay on each
rank, over its own tokens and all E experts; only the expert GEMMs move. padded: the [E, C, D]
buffer is cut into N chunks of E/N experts, one all-to-all (equal splits, no host sync) brings each
rank its experts' slots from every source ([E/N, N*C, D], one bmm), a second brings the outputs
back. grouped: the expert-sorted rows go to their expert's rank with the counts exchanged first
(one host sync per layer for the split sizes), are regrouped source-major -> expert-major for the
grouped GEMM, and return the same way. Everything before and after is unchanged, so drops,
gates and the custom backward are exactly those of the single-rank path.
"""
from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import ep as ep_comm
from engine.activation import relu_squared
from engine.blocked_mlp import blocked_ok, blocked_relu2_mlp, cpu_eager

DISPATCHES = ("auto", "padded", "grouped", "loop")
BALANCES = ("loss", "bias", "none")


@dataclass
class MoEConfig:
    dim: int
    n_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 0  # 0 -> 2 * dim
    cap: float = 1.0  # capacity factor; 0 = dropless
    dispatch: str = "auto"  # auto | padded | grouped | loop
    balance_coeff: float = 0.01  # Switch loss coefficient (balance == "loss" only)
    z_coeff: float = 0.0
    fp8: bool = False
    balance: str = "loss"  # loss | bias | none
    balance_rate: float = 1e-3  # bias step per optimizer step (balance == "bias")

    @property
    def hidden(self) -> int:
        return self.expert_hidden or 2 * self.dim

    def resolved_dispatch(self) -> str:
        if self.dispatch == "auto":
            return "padded" if self.cap > 0 else "grouped"
        return self.dispatch

    def validate(self) -> None:
        """ValueError with one line naming the bad option."""
        if self.dim < 1 or self.hidden < 1:
            raise ValueError(f"dim and expert_hidden must be >= 1, got {self.dim} and {self.hidden}")
        if self.n_experts < 1:
            raise ValueError(f"--n-experts must be >= 1, got {self.n_experts}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"--top-k must be between 1 and --n-experts ({self.n_experts}), got {self.top_k}")
        if not (self.cap >= 0 and math.isfinite(self.cap)):
            raise ValueError(f"--cap must be >= 0 (0 = dropless), got {self.cap}")
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"--dispatch must be one of {', '.join(DISPATCHES)}, got {self.dispatch!r}")
        if self.dispatch == "padded" and self.cap == 0:
            raise ValueError("--dispatch padded needs --cap > 0 (use grouped or auto for dropless)")
        if self.dispatch == "grouped" and self.cap > 0:
            raise ValueError(f"--dispatch grouped is dropless; it takes --cap 0, got {self.cap} (use padded)")
        if self.balance_coeff < 0 or self.z_coeff < 0:
            raise ValueError("--balance-coeff and z_coeff must be >= 0")
        if self.balance not in BALANCES:
            raise ValueError(f"--balance must be one of {', '.join(BALANCES)}, got {self.balance!r}")
        if not (self.balance_rate > 0 and math.isfinite(self.balance_rate)):
            raise ValueError(f"--balance-rate must be > 0, got {self.balance_rate}")
        if self.fp8:
            from engine.fp8 import check_fp8_shape

            check_fp8_shape("experts", dim=self.dim, expert_hidden=self.hidden)


@dataclass
class MoEAux:
    loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    dropped: torch.Tensor
    assignments: int


def capacity(cap: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """Slots per expert: ceil(cap * N * K / E), at most N (an expert gets each token at most once,
    so more slots could never fill: a huge --cap allocated until the OOM killer came), rounded up
    to a multiple of 8.

    Integer arithmetic only (cap as an exact fraction): under `torch.compile(dynamic=True)` N is
    a symbolic int, and float math on it makes a symbolic float dynamo cannot lift to a shape.
    Builtin min, not torch.sym_min: dynamo turns min of SymInts into sym_min itself, while
    torch.sym_min of two plain ints (every static compile) is a graph break in torch 2.11: on an
    H200 that cut padded d12-moe from 484k to 283k tok/s and added 7 GiB of peak memory."""
    # The simplest fraction within a denominator of 1e9 is the decimal as written (1.1 -> 11/10, not
    # the binary float's 2476979795053773/2251799813685248, whose product can land a hair past an
    # integer), with every digit a person types kept: --cap 1.00001 is not 1.0 (a bound of 10,000 was).
    num, den = Fraction(cap).limit_denominator(10**9).as_integer_ratio()
    c = min(-(-(num * n_tokens * top_k) // (den * n_experts)), n_tokens)
    return max(8, -(-c // 8) * 8)


# ----------------------------------------------------------------------------------------------
# Router


def route(x_ND, router_weight_ED, top_k: int, balance_coeff: float, z_coeff: float, bias_E=None):
    """Softmax top-k over fp32 logits. -> (weights_NK fp32, experts_NK, counts_E, loss).

    The weights are the chosen probabilities renormalised to sum to 1 when top_k > 1; with top-1
    the weight is the probability itself (Switch Transformer's gate): renormalised, it would be 1
    for every token and the router would learn nothing from the task loss.
    bias_E (aux-loss-free balancing) shifts which experts are chosen, never the weights they get.
    CPU eager: _RouteCPU, the same values and grads in fewer, wider ops; elsewhere (CUDA, compile)
    the composable version below, which Inductor fuses itself. Autocast is off inside: the router
    is E columns wide, so fp32 costs next to nothing, and near-ties between experts are decided
    in fp32 (under autocast the logits GEMM, and on CPU the softmax, ran in bf16)."""
    with torch.autocast(x_ND.device.type, enabled=False):
        if cpu_eager(x_ND):
            return _RouteCPU.apply(x_ND.float(), router_weight_ED.float(), top_k, balance_coeff, z_coeff, bias_E)
        return _route_composable(x_ND, router_weight_ED, top_k, balance_coeff, z_coeff, bias_E)


def _route_composable(x_ND, router_weight_ED, top_k, balance_coeff, z_coeff, bias_E=None):
    N, E = x_ND.shape[0], router_weight_ED.shape[0]
    logits_NE = F.linear(x_ND.float(), router_weight_ED.float())
    probs_NE = logits_NE.softmax(dim=-1)
    if bias_E is None:
        weights_NK, experts_NK = probs_NE.topk(top_k, dim=-1)
    else:
        experts_NK = (probs_NE.detach() + bias_E).topk(top_k, dim=-1).indices
        weights_NK = probs_NE.gather(1, experts_NK)
    if top_k > 1:
        weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
    # Per-expert counts as a compare-and-sum over [N*K, E]: static shape (bincount's is data
    # dependent), no host sync, and a plain reduction that Inductor fuses. Not a scatter-add:
    # compiled, index_add_ on int64 becomes aten's sort-based index_put (Triton has no int64
    # atomic add), 0.4 ms a layer on an H200, a quarter of the compiled MoE layer (issue 11).
    experts_A = experts_NK.reshape(-1)
    counts_E = (experts_A.unsqueeze(1) == torch.arange(E, device=x_ND.device)).sum(0)
    loss = logits_NE.new_zeros(())
    if balance_coeff > 0:
        # Switch loss E * sum_e f_e * P_e: f = fraction of assignments (no grad), P = mean prob.
        frac_E = counts_E.float() / (N * top_k)
        loss = loss + balance_coeff * E * (frac_E * probs_NE.mean(0)).sum()
    if z_coeff > 0:
        loss = loss + z_coeff * torch.logsumexp(logits_NE, dim=-1).square().mean()
    return weights_NK, experts_NK, counts_E, loss


def _top_k_over_experts(scores_EN, k: int):
    """-> (values_KN, indices_KN): each token's (column's) k largest scores, largest first, the
    first expert on ties (torch.max's rule). k passes of max over the E rows: on CPU each is a
    vectorised pass over N, where topk over a row of 8 costs ~5x one pass (issue 11, Intel Xeon)."""
    v_1N, i_1N = scores_EN.max(0, keepdim=True)
    if k == 1:
        return v_1N, i_1N
    vals, idxs, rest_EN = [v_1N], [i_1N], scores_EN.clone()
    for _ in range(k - 1):
        rest_EN.scatter_(0, idxs[-1], float("-inf"))  # never chosen twice
        v_1N, i_1N = rest_EN.max(0, keepdim=True)
        vals.append(v_1N)
        idxs.append(i_1N)
    return torch.cat(vals), torch.cat(idxs)


class _RouteCPU(torch.autograd.Function):
    """route() on CPU in eager mode: one node with a hand-written backward.

    Why: at the bench's shape the router is ~30 small ops over [N, E] forward and backward, and on a
    2-core Xeon it cost 6% of the dense MLP's step (issue 11). Transposed to [E, N], softmax and the
    top-k passes run along N (vectorised) instead of along E = 8, and the backward is the chain rule
    written out: renormalisation, a scatter into [E, N], the Switch and z-loss terms, softmax's
    backward, two small GEMMs. tests/test_moe.py checks it against _route_composable's autograd."""

    @staticmethod
    def forward(ctx, x_ND, w_ED, top_k: int, balance_coeff: float, z_coeff: float, bias_E):
        N, E = x_ND.shape[0], w_ED.shape[0]
        logits_EN = w_ED @ x_ND.t()
        probs_EN = logits_EN.softmax(dim=0)
        if bias_E is None:
            top_KN, experts_KN = _top_k_over_experts(probs_EN, top_k)
        else:  # the bias picks the experts; the gates stay the unbiased probabilities
            experts_KN = _top_k_over_experts(probs_EN + bias_E.to(probs_EN).unsqueeze(1), top_k)[1]
            top_KN = probs_EN.gather(0, experts_KN)
        sum_1N = top_KN.sum(0, keepdim=True) if top_k > 1 else None
        gates_KN = top_KN / sum_1N if top_k > 1 else top_KN
        counts_E = torch.bincount(experts_KN.view(-1), minlength=E)  # eager CPU: a data-dependent shape is fine
        loss = probs_EN.new_zeros(())
        frac_E = lse_N = None
        if balance_coeff > 0:
            frac_E = counts_E.float() / (N * top_k)
            loss = loss + balance_coeff * E * torch.dot(frac_E, probs_EN.mean(1))
        if z_coeff > 0:
            lse_N = torch.logsumexp(logits_EN, dim=0)
            loss = loss + z_coeff * lse_N.square().mean()
        ctx.save_for_backward(x_ND, w_ED, probs_EN, experts_KN, gates_KN, sum_1N, frac_E, lse_N)
        ctx.coeffs = (balance_coeff, z_coeff)
        experts_NK = experts_KN.t()
        ctx.mark_non_differentiable(experts_NK, counts_E)
        return gates_KN.t(), experts_NK, counts_E, loss

    @staticmethod
    def backward(ctx, grad_gates_NK, _experts, _counts, grad_loss):
        x_ND, w_ED, probs_EN, experts_KN, gates_KN, sum_1N, frac_E, lse_N = ctx.saved_tensors
        balance_coeff, z_coeff = ctx.coeffs
        E, N = probs_EN.shape
        # gates = top / sum(top): d top_k = (g_k - <g, gates>) / sum(top); top-1: gates = top
        g_KN = grad_gates_NK.t()
        if sum_1N is None:
            g_top_KN = g_KN
        else:
            g_top_KN = (g_KN - (g_KN * gates_KN).sum(0, keepdim=True)).div_(sum_1N)
        g_probs_EN = torch.zeros_like(probs_EN).scatter_(0, experts_KN, g_top_KN)
        if frac_E is not None:  # Switch loss: d/dP[e, n] = coeff * E * f_e / N
            g_probs_EN.add_((frac_E * (grad_loss * balance_coeff * E / N)).unsqueeze(1))
        g_logits_EN = torch._softmax_backward_data(g_probs_EN, probs_EN, 0, probs_EN.dtype)
        if lse_N is not None:  # z-loss: d/dlogits = 2 z lse / N * softmax
            g_logits_EN.add_(probs_EN * (lse_N * (grad_loss * 2 * z_coeff / N)))
        g_x = g_logits_EN.t() @ w_ED if ctx.needs_input_grad[0] else None
        g_w = g_logits_EN @ x_ND if ctx.needs_input_grad[1] else None
        return g_x, g_w, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Token movement: gathers both ways (custom Functions so backward is a gather, not a scatter-add)


def _per_k(t_A: torch.Tensor, K: int) -> torch.Tensor:
    """[N*K] (token-major) -> [K, N] contiguous, so each top-k slot is one cheap 1-D index."""
    return t_A.view(-1, K).t().contiguous()


# Why loops over k (K is 1-2, a Python constant, not data): on CPU a per-k gather fused with an
# add/addcmul is ~2x faster than gathering [N, K, D] and reducing over the middle dim (or a bmm
# with 4096 tiny matrices). Under torch.compile the loop unrolls.


# CPU eager: the gathers of _Dispatch's backward and _Combine run GATHER_CHUNK_ROWS rows at a
# time, so the rows just gathered are still in cache when the multiply, add or dot that follows reads
# them (engine.blocked_mlp does the same for the MLPs): ~10% off dispatch + combine on a 2-core Xeon
# (docs/benchmarks.md, issue 11). Elsewhere one chunk: on CUDA more kernels would only cost launches,
# and compiled graphs fuse these passes themselves.
GATHER_CHUNK_ROWS = 1024


def _chunk_rows(t: torch.Tensor, rows: int) -> int:
    return GATHER_CHUNK_ROWS if cpu_eager(t) else rows


def _gather_sum(src_RD, idx_KN, w_KN1):
    """out_ND[n] = sum_k w_KN1[k, n] * src_RD[idx_KN[k, n]] (w_KN1 None: weights of 1)."""
    K, N = idx_KN.shape
    step = _chunk_rows(src_RD, N)
    if step >= N:  # one chunk: each gather's own buffer, scaled in place
        out_ND = src_RD.index_select(0, idx_KN[0])
        if w_KN1 is not None:
            out_ND.mul_(w_KN1[0])
        for k in range(1, K):
            g_ND = src_RD.index_select(0, idx_KN[k])
            if w_KN1 is None:
                out_ND.add_(g_ND)
            else:
                out_ND.addcmul_(g_ND, w_KN1[k])
        return out_ND
    out_ND = src_RD.new_empty(N, src_RD.shape[1])
    tmp_RD = src_RD.new_empty(step, src_RD.shape[1]) if K > 1 else None
    for a in range(0, N, step):
        b = min(N, a + step)
        out = torch.index_select(src_RD, 0, idx_KN[0, a:b], out=out_ND[a:b])
        if w_KN1 is not None:
            out.mul_(w_KN1[0, a:b])
        for k in range(1, K):
            g = torch.index_select(src_RD, 0, idx_KN[k, a:b], out=tmp_RD[: b - a])
            if w_KN1 is None:
                out.add_(g)
            else:
                out.addcmul_(g, w_KN1[k, a:b])
    return out_ND


class _Dispatch(torch.autograd.Function):
    """rows_SD = x_ND[src_token_S]; each token feeds K slots.

    backward: grad_x[n] = sum_k grad_rows[slot_A[n*K+k]] (times keep_A, which masks dropped ones).
    """

    @staticmethod
    def forward(ctx, x_ND, src_token_S, slot_A, keep_A, K: int):
        ctx.save_for_backward(slot_A, keep_A)
        ctx.K = K
        return x_ND.index_select(0, src_token_S)

    @staticmethod
    def backward(ctx, grad_SD):
        slot_A, keep_A = ctx.saved_tensors
        K = ctx.K
        keep_KN1 = _per_k(keep_A, K).unsqueeze(-1).to(grad_SD.dtype) if keep_A.numel() else None
        return _gather_sum(grad_SD, _per_k(slot_A, K), keep_KN1), None, None, None, None


class _Combine(torch.autograd.Function):
    """out_ND = sum_k gate_NK[n, k] * y_SD[slot_NK[n, k]].

    backward: grad_y[s] = gate[a] * grad_out[a // K] for the assignment a filling slot s (zero for
    an empty slot, which keeps padding out of the expert weight grads); grad_gate[a] = <y[s], grad_out[a // K]>.
    """

    @staticmethod
    def forward(ctx, y_SD, gate_A, slot_A, src_assign_S, valid_S, K: int):
        out_ND = _gather_sum(y_SD, _per_k(slot_A, K), _per_k(gate_A, K).unsqueeze(-1))
        ctx.save_for_backward(y_SD, gate_A, slot_A, src_assign_S, valid_S)
        ctx.K = K
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND):
        y_SD, gate_A, slot_A, src_assign_S, valid_S = ctx.saved_tensors
        need_y, need_gate = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Everything in slot space from one gather of the output grad: grad_y = gate * rows and
        # grad_gate = <y, rows> per slot, then a tiny [N*K] gather back to assignments. (A dropped
        # assignment reads a wrong slot here, but its gate was multiplied by keep = 0 upstream.)
        gate_S1 = None
        if need_y:
            gate_S = gate_A.index_select(0, src_assign_S)
            if valid_S.numel():
                gate_S = gate_S * valid_S.to(gate_S.dtype)  # empty slots: grad exactly 0
            gate_S1 = gate_S.unsqueeze(-1)
        tok_S = src_assign_S // ctx.K
        S = tok_S.shape[0]
        step = _chunk_rows(grad_ND, S)
        if step >= S:
            rows_SD = grad_ND.index_select(0, tok_S)
            dot_S = torch.linalg.vecdot(y_SD, rows_SD) if need_gate else None
            grad_y = rows_SD.mul_(gate_S1) if need_y else None
        else:  # chunk by chunk: the rows are in cache for the dot and the scaling
            rows_SD = grad_ND.new_empty(S, grad_ND.shape[1])
            dot_S = y_SD.new_empty(S) if need_gate else None
            for a in range(0, S, step):
                b = min(S, a + step)
                rows = torch.index_select(grad_ND, 0, tok_S[a:b], out=rows_SD[a:b])
                if need_gate:
                    torch.linalg.vecdot(y_SD[a:b], rows, out=dot_S[a:b])
                if need_y:
                    rows.mul_(gate_S1[a:b])
            grad_y = rows_SD if need_y else None
        grad_gate = dot_S.index_select(0, slot_A) if need_gate else None
        return grad_y, grad_gate, None, None, None, None


def _sort_by_expert(experts_A, counts_E):
    """-> (order_A: sorted position -> assignment, rank_A: assignment -> sorted position, start_E)."""
    A = experts_A.shape[0]
    # int32 keys: a radix sort of half the passes of int64's (expert ids are < E anyway).
    order_A = torch.sort(experts_A.to(torch.int32), stable=True).indices
    rank_A = torch.empty_like(order_A).scatter_(0, order_A, torch.arange(A, device=experts_A.device))
    start_E = torch.cumsum(counts_E, 0) - counts_E
    return order_A, rank_A, start_E


def capacity_slots(experts_A, counts_E, C: int):
    """padded's bookkeeping: -> (keep_A, slot_A, valid_EC, src_assign_S).

    Assignment side: an assignment's position within its expert is its sorted rank minus the
    expert's start; it is kept when that is < C, in slot e * C + position (a dropped one points at
    slot 0, and its gate is zeroed). Slot side: slot (e, p) holds sorted assignment start_e + p when
    p < count_e (valid_EC). Empty slots gather some real token (finite values): their outputs are
    never read and their grads are exactly zero, so they change nothing, and no buffer is zero-filled."""
    A = experts_A.shape[0]
    order_A, rank_A, start_E = _sort_by_expert(experts_A, counts_E)
    pos_A = rank_A - start_E.index_select(0, experts_A)
    keep_A = pos_A < C
    slot_A = torch.where(keep_A, experts_A * C + pos_A, 0)
    p_C = torch.arange(C, device=experts_A.device)
    valid_EC = p_C < counts_E.unsqueeze(1)
    src_assign_S = order_A.index_select(0, (start_E.unsqueeze(1) + p_C).clamp(max=A - 1).view(-1))
    return keep_A, slot_A, valid_EC, src_assign_S


# ----------------------------------------------------------------------------------------------
# Expert GEMMs (relu², like nanochat's MLP; engine/activation.py). On CPU in eager mode the experts
# go through engine.blocked_mlp: one expert's GEMMs and relu² back to back while its activations
# are in cache, as the dense MLP does with blocks of rows.


def _experts_bmm(x_ECD, w_up_EDH, w_down_EHD, fp8: bool):
    if fp8:
        from engine.fp8 import fp8_bmm

        return fp8_bmm(relu_squared(fp8_bmm(x_ECD, w_up_EDH)), w_down_EHD)
    if blocked_ok(x_ECD):
        E, C, D = x_ECD.shape
        return blocked_relu2_mlp(x_ECD.reshape(E * C, D), w_up_EDH, w_down_EHD, [C] * E).view(E, C, D)
    return torch.bmm(relu_squared(torch.bmm(x_ECD, w_up_EDH)), w_down_EHD)


# torch._grouped_mm runs on CPU in fp32, but its meta (fake tensor) kernel insists on bf16, so
# torch.compile cannot trace an fp32 call. For fp32 we wrap it in a custom op with our own shape
# function; its backward calls the same op (x-grad: g @ w^T per group; w-grad: x^T @ g grouped over
# tokens), which also hands _grouped_mm contiguous grads (its CPU backward breaks on stride-0 ones).
# bf16 (every CUDA run) is traced as torch._grouped_mm itself: Inductor lowers it to the aten
# kernel (or, under max-autotune, its Triton template) and the compiled graph calls it without
# the custom op's Python dispatch, ~50 us a call (6 calls a layer, fwd + bwd; docs/benchmarks.md).
@torch.library.custom_op("engine_moe::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


@_grouped_mm_op.register_fake
def _(a, b, offs):
    if b.dim() == 3:  # [M, K] x [G, K, N] -> [M, N]
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])  # [K, M] x [M, N] grouped over M


def _grouped_mm_setup(ctx, inputs, output):
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _grouped_mm_backward(ctx, grad):
    x_MK, w_GKN, offs = ctx.saved_tensors
    grad = grad.contiguous()
    gx = _grouped_mm_op(grad, w_GKN.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    gw = _grouped_mm_op(x_MK.t(), grad, offs) if ctx.needs_input_grad[1] else None
    return gx, gw, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _grouped_mm_eager(a, b, offs):
    return torch._grouped_mm(a, b, offs=offs)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, dim: int, hidden: int) -> tuple[bool, str]:
    """Whether torch._grouped_mm takes these operands (else the dropless path uses padded bmm)."""
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no _grouped_mm"
    ok_dtypes = (torch.bfloat16,) if device.type == "cuda" else (torch.float32, torch.bfloat16)
    if dtype not in ok_dtypes:
        return False, f"_grouped_mm on {device.type} takes {ok_dtypes}, not {dtype}"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return False, "_grouped_mm needs compute capability >= 9.0"
    item = torch.empty((), dtype=dtype).element_size()
    if (dim * item) % 16 or (hidden * item) % 16:
        return False, f"_grouped_mm needs 16-byte row strides; dim={dim}, hidden={hidden} in {dtype} are not"
    return True, ""


# ----------------------------------------------------------------------------------------------
# The layer


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.dispatch = cfg.resolved_dispatch()
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.w_up_EDH = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim, cfg.hidden))
        self.w_down_EHD = nn.Parameter(torch.empty(cfg.n_experts, cfg.hidden, cfg.dim))
        self.ep = None  # engine.ep.ExpertParallel once shard_experts() ran
        if cfg.balance == "bias":  # a buffer: saved in checkpoints, never a parameter (no grad, no optimizer)
            self.register_buffer("expert_bias_E", torch.zeros(cfg.n_experts))
        else:
            self.expert_bias_E = None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.router.weight, std=self.cfg.dim**-0.5)
        nn.init.normal_(self.w_up_EDH, std=self.cfg.dim**-0.5)
        nn.init.zeros_(self.w_down_EHD)

    def shard_experts(self, ep) -> None:
        """Keep only this rank's E/N experts (engine.ep). Called after init (and after loading a
        full checkpoint), so every rank's shard is its slice of the very same full weights."""
        if self.cfg.fp8 or self.dispatch == "loop":
            raise ValueError("--ep > 1 takes the padded or grouped dispatch without --fp8")
        self.ep = ep
        self.w_up_EDH = nn.Parameter(ep.shard(self.w_up_EDH.detach()).clone())
        self.w_down_EHD = nn.Parameter(ep.shard(self.w_down_EHD.detach()).clone())

    def expert_param_names(self) -> list[str]:
        return ["w_up_EDH", "w_down_EHD"]

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """DeepSeek-V3's update after an optimizer step: +rate for an under-loaded expert, -rate
        for an over-loaded one (centred, so the biases do not drift as a whole). Pass the counts
        of the whole step, all ranks: each rank then applies the same update."""
        if self.expert_bias_E is None:
            return
        load_E = tokens_per_expert_E.to(self.expert_bias_E)
        delta_E = self.cfg.balance_rate * torch.sign(load_E.mean() - load_E)
        self.expert_bias_E.add_(delta_E - delta_E.mean())

    def forward(self, x_BTD: torch.Tensor):
        B, T, D = x_BTD.shape
        cfg = self.cfg
        x_ND = x_BTD.reshape(B * T, D)
        weights_NK, experts_NK, counts_E, loss = route(
            x_ND, self.router.weight, cfg.top_k, cfg.balance_coeff if cfg.balance == "loss" else 0.0,
            cfg.z_coeff, self.expert_bias_E,
        )
        # Under autocast (bf16 training on GPU) the experts compute in the autocast dtype:
        # _grouped_mm is not an autocast op and on CUDA takes bf16 only, so without this cast the
        # fp32 residual stream would send dropless runs to the slow padded stand-in.
        if torch.is_autocast_enabled(x_ND.device.type):
            x_ND = x_ND.to(torch.get_autocast_dtype(x_ND.device.type))
        # Expert GEMMs run in the activation dtype (params may be fp32 masters; no-op if equal).
        w_up = self.w_up_EDH.to(x_ND.dtype)
        w_down = self.w_down_EHD.to(x_ND.dtype)
        gate_A = weights_NK.reshape(-1).to(x_ND.dtype)
        experts_A = experts_NK.reshape(-1)
        if self.dispatch == "loop":
            out_ND, dropped = self._loop(x_ND, experts_NK, weights_NK.to(x_ND.dtype), w_up, w_down)
        elif self.dispatch == "padded":
            C = capacity(cfg.cap, x_ND.shape[0], cfg.top_k, cfg.n_experts)
            out_ND, dropped = self._padded(x_ND, experts_A, gate_A, counts_E, C, w_up, w_down)
        else:
            # On CPU in eager mode the blocked expert MLP needs no _grouped_mm (nor its alignment).
            ok = blocked_ok(x_ND) or grouped_mm_supported(x_ND.device, x_ND.dtype, D, cfg.hidden)[0]
            if cfg.fp8:
                out_ND = self._grouped_fp8(x_ND, experts_A, gate_A, counts_E, w_up, w_down)
            elif ok and self.ep is not None:
                out_ND = self._grouped_ep(x_ND, experts_A, gate_A, counts_E, w_up, w_down)
            elif ok:
                out_ND = self._grouped(x_ND, experts_A, gate_A, counts_E, w_up, w_down)
            else:  # dropless stand-in: C = N slots per expert can never overflow
                out_ND, _ = self._padded(x_ND, experts_A, gate_A, counts_E, -(-x_ND.shape[0] // 8) * 8, w_up, w_down)
            dropped = x_ND.new_zeros((), dtype=torch.float32)
        aux = MoEAux(loss, counts_E.float(), dropped, B * T * cfg.top_k)
        return out_ND.view(B, T, D), aux

    def _padded(self, x_ND, experts_A, gate_A, counts_E, C: int, w_up, w_down):
        E, K = self.cfg.n_experts, self.cfg.top_k
        keep_A, slot_A, valid_EC, src_assign_S = capacity_slots(experts_A, counts_E, C)
        gate_A = gate_A * keep_A.to(gate_A.dtype)
        buf_ECD = _Dispatch.apply(x_ND, src_assign_S // K, slot_A, keep_A, K).view(E, C, -1)
        y_ECD = _experts_bmm(buf_ECD, w_up, w_down, self.cfg.fp8) if self.ep is None else self._slots_ep(buf_ECD, w_up, w_down)
        out_ND = _Combine.apply(y_ECD.view(E * C, -1), gate_A, slot_A, src_assign_S, valid_EC.view(-1), K)
        dropped = (counts_E - C).clamp(min=0).sum().float()
        return out_ND, dropped

    def _slots_ep(self, buf_ECD, w_up, w_down):
        """padded under EP: chunk j of the slots (experts of rank j) goes to rank j and comes back."""
        E, C, D = buf_ECD.shape
        n, group = self.ep.size, self.ep.group
        El = E // n
        splits = [El * C] * n
        recv_RD = ep_comm.all_to_all(buf_ECD.view(E * C, D), splits, splits, group)  # [src, El, C] rows
        x_EnCD = recv_RD.view(n, El, C, D).transpose(0, 1).reshape(El, n * C, D)
        y_EnCD = _experts_bmm(x_EnCD, w_up, w_down, False)
        send_RD = y_EnCD.view(El, n, C, D).transpose(0, 1).reshape(n * El * C, D)
        return ep_comm.all_to_all(send_RD, splits, splits, group).view(E, C, D)

    def _grouped(self, x_ND, experts_A, gate_A, counts_E, w_up, w_down):
        K = self.cfg.top_k
        order_A, rank_A, _ = _sort_by_expert(experts_A, counts_E)
        none = experts_A.new_empty(0, dtype=torch.bool)  # no masks: every assignment is kept
        x_AD = _Dispatch.apply(x_ND, order_A // K, rank_A, none, K)
        if blocked_ok(x_AD):  # CPU: the counts are host memory already, .tolist() syncs nothing
            y_AD = blocked_relu2_mlp(x_AD, w_up, w_down, counts_E.tolist())
        else:
            # torch._grouped_mm itself wherever it can be (eager, and compiled bf16): the custom op
            # costs a Python dispatch per call. Our grads into it are contiguous (relu² / _Combine
            # backward), so its own backward is fine.
            traceable = x_AD.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
            gmm = _grouped_mm_eager if traceable else _grouped_mm_op
            offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
            y_AD = gmm(relu_squared(gmm(x_AD, w_up, offs_E)), w_down, offs_E)
        return _Combine.apply(y_AD, gate_A, rank_A, order_A, none, K)

    # Eager even inside a compiled model: the rows a rank receives vary every step, and a compiled
    # graph over them would recompile every step under --compile static (seen: 16 s steps on tiny).
    @torch.compiler.disable
    def _grouped_ep(self, x_ND, experts_A, gate_A, counts_E, w_up, w_down):
        """grouped under EP: this rank's sorted rows to their experts' ranks and back."""
        K, ep = self.cfg.top_k, self.ep
        order_A, rank_A, _ = _sort_by_expert(experts_A, counts_E)
        none = experts_A.new_empty(0, dtype=torch.bool)
        x_AD = _Dispatch.apply(x_ND, order_A // K, rank_A, none, K)
        recv_counts_SE = ep_comm.exchange_counts(counts_E, ep)
        send_splits = counts_E.view(ep.size, -1).sum(1).tolist()  # the host sync of the split sizes
        recv_splits = recv_counts_SE.sum(1).tolist()
        total = sum(recv_splits)
        x_RD = ep_comm.all_to_all(x_AD, recv_splits, send_splits, ep.group)
        if total:
            perm_R, inv_R = ep_comm.source_to_expert_major(recv_counts_SE, total)
            x_RD = ep_comm.Permute.apply(x_RD, perm_R, inv_R)
            rows_E = recv_counts_SE.sum(0)
            if blocked_ok(x_RD):
                y_RD = blocked_relu2_mlp(x_RD, w_up, w_down, rows_E.tolist())
            else:
                offs_E = torch.cumsum(rows_E, 0).to(torch.int32)
                y_RD = _grouped_mm_eager(relu_squared(_grouped_mm_eager(x_RD, w_up, offs_E)), w_down, offs_E)
            y_RD = ep_comm.Permute.apply(y_RD, inv_R, perm_R)
        else:  # no row for this rank's experts: nothing to compute, nothing to send back
            y_RD = x_RD
        y_AD = ep_comm.all_to_all(y_RD, send_splits, recv_splits, ep.group)
        return _Combine.apply(y_AD, gate_A, rank_A, order_A, none, K)

    # Eager even inside a compiled model, as _grouped_ep: traced, each expert's row count (read on
    # the host for the loop below) was a guard, and --compile static recompiled every step (81 s
    # steps on tiny, seen). A graph break by design, said once at start (engine.train).
    @torch.compiler.disable
    def _grouped_fp8(self, x_ND, experts_A, gate_A, counts_E, w_up, w_down):
        # No batched scaled grouped GEMM on CPU (and CUDA's wants row-wise scales), so dropless fp8
        # loops over experts with per-expert _scaled_mm; the group sizes cost one host sync.
        from engine.fp8 import fp8_mm

        K = self.cfg.top_k
        order_A, rank_A, _ = _sort_by_expert(experts_A, counts_E)
        none = experts_A.new_empty(0, dtype=torch.bool)
        x_AD = _Dispatch.apply(x_ND, order_A // K, rank_A, none, K)
        ys, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                h = relu_squared(fp8_mm(x_AD[start : start + n], w_up[e].t()))
                ys.append(fp8_mm(h, w_down[e].t()))
            start += n
        return _Combine.apply(torch.cat(ys), gate_A, rank_A, order_A, none, K)

    def _loop(self, x_ND, experts_NK, weights_NK, w_up, w_down):
        """Reference: per expert, its assignments in token order, the first C kept (cap > 0)."""
        cfg = self.cfg
        C = capacity(cfg.cap, x_ND.shape[0], cfg.top_k, cfg.n_experts) if cfg.cap > 0 else None
        out_ND = torch.zeros_like(x_ND)
        dropped = 0
        for e in range(cfg.n_experts):
            rows, slots = (experts_NK == e).nonzero(as_tuple=True)  # row-major = token order
            if C is not None and len(rows) > C:
                dropped += len(rows) - C
                rows, slots = rows[:C], slots[:C]
            if len(rows) == 0:
                continue
            if cfg.fp8:
                from engine.fp8 import fp8_mm

                y = fp8_mm(relu_squared(fp8_mm(x_ND[rows], w_up[e].t())), w_down[e].t())
            else:
                y = relu_squared(x_ND[rows] @ w_up[e]) @ w_down[e]
            out_ND = out_ND.index_add(0, rows, y * weights_NK[rows, slots, None])
        return out_ND, torch.tensor(float(dropped), device=x_ND.device)
