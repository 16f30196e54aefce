"""Mixture-of-Experts layer: router -> dispatcher -> stacked experts -> combine.

SKELETON (interface only, loop dispatch). The engine-moe work replaces the internals with the
padded / grouped dispatchers; the public interface below is the contract model.py relies on.

    moe = MoELayer(MoEConfig(dim=..., n_experts=8, top_k=2, expert_hidden=2*dim, cap=1.0))
    out_BTD, aux = moe(x_BTD)
    aux.loss          scalar tensor: balance_coeff * switch_loss + z_coeff * z_loss (0 if both off)
    aux.tokens_per_expert_E   float tensor [E]: assignments routed to each expert (before drops)
    aux.dropped       float scalar tensor: assignments dropped by capacity (0 when dropless)
    aux.assignments   int: tokens * top_k (python int, known from shapes)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MoEConfig:
    dim: int
    n_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 0  # 0 -> 2 * dim
    cap: float = 1.0  # capacity factor; 0 = dropless
    dispatch: str = "auto"  # auto | padded | grouped | loop
    balance_coeff: float = 0.01
    z_coeff: float = 0.0
    fp8: bool = False


@dataclass
class MoEAux:
    loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    dropped: torch.Tensor
    assignments: int


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.expert_hidden or 2 * cfg.dim
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.w_up_EDH = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim, hidden))
        self.w_down_EHD = nn.Parameter(torch.empty(cfg.n_experts, hidden, cfg.dim))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.router.weight, std=self.cfg.dim**-0.5)
        nn.init.normal_(self.w_up_EDH, std=self.cfg.dim**-0.5)
        nn.init.zeros_(self.w_down_EHD)

    def forward(self, x_BTD: torch.Tensor):
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        logits_NE = self.router(x_ND).float()
        probs_NE = logits_NE.softmax(dim=-1)
        weights_NK, experts_NK = probs_NE.topk(self.cfg.top_k, dim=-1)
        weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        out_ND = torch.zeros_like(x_ND)
        for e in range(self.cfg.n_experts):
            rows, slots = (experts_NK == e).nonzero(as_tuple=True)
            h = F.relu(x_ND[rows] @ self.w_up_EDH[e]).square()
            y = (h @ self.w_down_EHD[e]) * weights_NK[rows, slots, None].to(x_ND.dtype)
            out_ND = out_ND.index_add(0, rows, y)
        E = self.cfg.n_experts
        counts_E = torch.bincount(experts_NK.flatten(), minlength=E).float()
        frac_E = counts_E / counts_E.sum()
        switch = E * (frac_E * probs_NE.mean(0)).sum()
        loss = self.cfg.balance_coeff * switch
        aux = MoEAux(loss, counts_E, torch.zeros((), device=x_BTD.device), B * T * self.cfg.top_k)
        return out_ND.view(B, T, D), aux
