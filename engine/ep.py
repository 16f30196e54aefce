"""Expert parallelism (`--ep N`): each group of N ranks splits every MoE layer's E experts, E/N each.

    ep = ExpertParallel.setup(n=2)              # after init_process_group, on every rank
    model.shard_experts(ep)                     # rank keeps experts [i*E/N, (i+1)*E/N), i = ep.index
    DDP(model) ignoring model.expert_params()   # the rest of the model stays data parallel
    loss.backward(); ep.reduce_grads(experts)   # once per optimizer step, after the last micro-batch
    ep.clip_grad_norm(dense, experts, 1.0)      # the norm of the whole model, not of this rank's part

Ranks: world W = W/N EP groups x N. EP group g is ranks gN .. gN+N-1 (neighbours, so on a GPU node
the all-to-all stays inside the node); its member i holds expert shard i. The ranks holding the same
shard (i, i+N, i+2N, ...) form an expert-DP group, where expert gradients are summed.

Tokens travel with `all_to_all_single` on the EP group's own process group (never the default one:
DDP's reducer issues its all-reduces on the default group from backward hooks, and two streams of
collectives on one group must be issued in the same order on every rank). The forward exchange is a
custom autograd Function whose backward is the reverse exchange (same splits, swapped).

Why expert gradients are divided by W: under DDP a weight's gradient is the mean over the W ranks
of each rank's gradient. Under EP an expert's gradient on its rank already sums the contributions of
all N ranks of its EP group (their tokens came to it, their output gradients came back through the
all-to-all); summing over its expert-DP group then covers all W ranks' tokens, once each.

Checkpoints stay shape-independent: `full_state` gathers the experts of EP group 0 (and their AdamW
moments) to rank 0, one tensor at a time into host memory, in the layout an EP-1 run has, and
`shard_optimizer_state` cuts a loaded full state down to this rank's experts. So a run may resume
under another --ep or another world size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class ExpertParallel:
    size: int  # N: ranks that split one layer's experts
    index: int  # this rank's shard, 0 .. N-1
    world: int
    group: object  # the EP group's process group (all-to-all, gathers)
    dp_group: Optional[object]  # ranks holding the same shard (None when W == N: nothing to sum)

    @staticmethod
    def setup(n: int) -> "ExpertParallel":
        """Collective: every rank calls it, in the same order (new_group is collective)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % n:
            raise ValueError(f"--ep {n} does not divide the world size {world}")
        group = dp_group = None
        for g in range(world // n):
            ranks = list(range(g * n, (g + 1) * n))
            pg = dist.new_group(ranks)
            if rank in ranks:
                group = pg
        for i in range(n):
            ranks = list(range(i, world, n))
            pg = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                dp_group = pg
        return ExpertParallel(size=n, index=rank % n, world=world, group=group, dp_group=dp_group)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a tensor stacked over experts (dim 0)."""
        per = full.shape[0] // self.size
        return full[self.index * per : (self.index + 1) * per]

    # ---- gradients ------------------------------------------------------------------------

    def reduce_grads(self, expert_params: list[torch.Tensor]) -> None:
        """Expert grads -> the mean over all W ranks' tokens (see the module docstring), one
        flat all-reduce over the expert-DP group. A missing grad (no token reached this rank's
        experts) counts as zeros, so every rank takes part and AdamW sees a grad."""
        for p in expert_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in expert_params]
        if self.dp_group is not None:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.dp_group)
            for g, f in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(f.view_as(g))
        torch._foreach_div_(grads, self.world)

    def clip_grad_norm(self, dense_params, expert_params, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over the whole model: the dense grads are the same on
        every rank, the expert grads are this EP group's shards, so their squares are summed over
        the EP group. Same clip coefficient (max_norm / (norm + 1e-6), at most 1) as torch's."""
        dense = [p.grad for p in dense_params if p.grad is not None]
        experts = [p.grad for p in expert_params if p.grad is not None]
        device = (dense + experts)[0].device

        def sum_sq(grads):
            return torch.stack([g.float().square().sum() for g in grads]).sum() if grads else torch.zeros((), device=device)

        expert_sq = sum_sq(experts)
        dist.all_reduce(expert_sq, group=self.group)
        total = (sum_sq(dense) + expert_sq).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(dense + experts, coef)
        return total  # a tensor, like torch's: no host sync here

    # ---- checkpoints ----------------------------------------------------------------------

    def gather_to_first(self, shard: torch.Tensor) -> Optional[torch.Tensor]:
        """Collective over the EP group: on its member 0, the shards of every member stacked back
        along dim 0, in host memory; None on the others. One tensor at a time, to one rank: the
        full experts never sit on every device at once (an all-gather of the weights and both AdamW
        moments put more expert memory on each rank at a save than DDP holds, which is what EP is
        there to avoid)."""
        first = self.index == 0
        parts = [torch.empty_like(shard) for _ in range(self.size)] if first else None
        dist.gather(shard.contiguous(), parts, dst=dist.get_global_rank(self.group, 0), group=self.group)
        return torch.cat([part.cpu() for part in parts]) if first else None

    def full_state(self, model_state: dict, expert_names: list[str], optim_state: dict,
                   expert_idx: list[int]) -> tuple[Optional[dict], Optional[dict]]:
        """(model, optimizer) state dicts with every expert tensor gathered to the full E, on global
        rank 0 (the one that writes); (None, None) elsewhere. Collective over EP group 0 (ranks
        0..N-1): the other groups hold the same experts and take no part."""
        if dist.get_rank() >= self.size:
            return None, None
        first = self.index == 0
        model_state = dict(model_state)
        for name in expert_names:
            model_state[name] = self.gather_to_first(model_state[name])
        state = dict(optim_state["state"])
        for i in expert_idx:
            state[i] = {k: self.gather_to_first(v) if _is_per_expert(v) else v for k, v in state[i].items()}
        return (model_state, {**optim_state, "state": state}) if first else (None, None)

    def shard_optimizer_state(self, optim_state: dict, expert_idx: list[int]) -> dict:
        state = dict(optim_state["state"])
        for i in expert_idx:
            if i in state:
                state[i] = {k: self.shard(v).clone() if _is_per_expert(v) else v for k, v in state[i].items()}
        return {**optim_state, "state": state}

    def param_memory(self, expert_numel_full: int) -> dict:
        per_rank = expert_numel_full // self.size
        return {"ep": self.size, "expert_params_per_rank": per_rank, "expert_params_ddp": expert_numel_full}


def _is_per_expert(v) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() >= 1  # AdamW's moments; its `step` is a scalar


# ---- token exchange ----------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """rows of x_RD: the first in_splits[0] to rank 0 of the group, ...; -> out_splits[j] rows from
    rank j. Backward: the gradients go back the way the rows came (splits swapped)."""

    @staticmethod
    def forward(ctx, x_RD, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x_RD.new_empty((sum(out_splits), *x_RD.shape[1:]))
        dist.all_to_all_single(out, x_RD.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


@torch.compiler.disable  # a collective with host-side split sizes: eager, a graph break under compile
def all_to_all(x_RD: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x_RD, out_splits, in_splits, group)


@torch.compiler.disable
def exchange_counts(counts_E: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
    """counts_E (this rank's assignments per global expert) -> [N, E/N]: row j = how many rows rank j
    sends to each of this rank's experts. The split sizes of the token exchange, known to both ends."""
    out = torch.empty_like(counts_E)
    dist.all_to_all_single(out, counts_E.contiguous(), group=ep.group)
    return out.view(ep.size, -1)


class Permute(torch.autograd.Function):
    """y = x[perm] for a permutation: backward is the gather through its inverse (no scatter-add)."""

    @staticmethod
    def forward(ctx, x_RD, perm_R, inv_R):
        ctx.save_for_backward(inv_R)
        return x_RD.index_select(0, perm_R)

    @staticmethod
    def backward(ctx, grad_RD):
        (inv_R,) = ctx.saved_tensors
        return grad_RD.index_select(0, inv_R), None, None


def source_to_expert_major(counts_SE: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Received rows come grouped by source rank, then by local expert; the grouped GEMM wants them
    by local expert, then source. -> (perm_R: expert-major row -> received row, its inverse)."""
    S, E = counts_SE.shape
    start_SE = (torch.cumsum(counts_SE.reshape(-1), 0) - counts_SE.reshape(-1)).view(S, E)
    counts_ES, start_ES = counts_SE.t().reshape(-1), start_SE.t().reshape(-1)
    block_R = torch.repeat_interleave(torch.arange(S * E, device=counts_SE.device), counts_ES, output_size=total)
    em_start_B = torch.cumsum(counts_ES, 0) - counts_ES
    perm_R = start_ES[block_R] + torch.arange(total, device=counts_SE.device) - em_start_B[block_R]
    inv_R = torch.empty_like(perm_R).scatter_(0, perm_R, torch.arange(total, device=counts_SE.device))
    return perm_R, inv_R


def check_ep(ep: int, n_experts: int) -> None:
    """ValueError (one line) for an --ep the experts cannot be split by."""
    if ep < 1:
        raise ValueError(f"--ep must be >= 1, got {ep}")
    if n_experts % ep:
        raise ValueError(f"--ep {ep} does not divide --n-experts {n_experts} (each rank holds n_experts / ep)")
