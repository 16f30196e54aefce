"""FLOPs per token and MFU, nanochat's formula on ACTIVE parameters.

    flops/token = 6 * active_matmul_params + 12 * n_layer * n_head * head_dim * seq_len

6N: forward (2) + backward (4) per weight per token; the second term is attention's QK^T and AV
(not weights, so not in N). Active matmul params exclude the token embedding (a lookup, not a
matmul) but include lm_head, attention, dense MLPs, the router, and for each MoE layer only the
top_k experts a token actually visits. Counted from the config alone (no model needed), so a caller
can plan a run; tests check the count against the module's own parameters.

MFU% = 100 * flops/token * global tok/s / (peak FLOP/s per device * world size). The peak comes from
engine.schema's table (bf16 dense) or --peak-flops; it is None on CPU, and then so is MFU.
"""
from __future__ import annotations

from typing import Optional

from engine.model import GPTConfig
from engine.schema import peak_flops_for


def active_matmul_params(cfg: GPTConfig) -> int:
    D = cfg.dim
    total = D * cfg.padded_vocab  # lm_head (wte is a lookup: excluded)
    for i in range(cfg.n_layer):
        total += 4 * D * D  # q, k, v, proj
        if cfg.is_moe_layer(i):
            total += D * cfg.n_experts  # router
            total += cfg.top_k * 2 * D * cfg.expert_hidden  # top_k experts' up + down
        elif cfg.dense and cfg.was_moe_layer(i):
            total += 2 * D * cfg.top_k * cfg.expert_hidden  # the iso-FLOP dense twin
        else:
            total += 2 * D * cfg.dense_hidden
    return total


def flops_per_token(cfg: GPTConfig) -> int:
    attn = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.seq_len
    return 6 * active_matmul_params(cfg) + attn


def peak_flops(device_type: str, override: Optional[float] = None) -> tuple[Optional[float], str]:
    """(peak FLOP/s per device or None, device name). --peak-flops wins over the table."""
    if device_type == "cuda":
        import torch

        name = torch.cuda.get_device_name()
    else:
        import platform

        name = f"cpu ({platform.processor() or platform.machine()})"
    if override is not None:
        return float(override), name
    return (peak_flops_for(name) if device_type == "cuda" else None), name


def mfu_pct(flops_tok: float, tok_per_sec_global: float, peak: Optional[float], world_size: int) -> Optional[float]:
    if not peak:
        return None
    return 100.0 * flops_tok * tok_per_sec_global / (peak * world_size)
