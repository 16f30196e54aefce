"""A nanochat-style GPT whose MLPs are Mixture-of-Experts layers every `moe_freq` layers.

    rotary embeddings · QK-norm · parameter-free RMSNorm · relu² MLP · untied wte / lm_head ·
    logit softcap · no biases · F.scaled_dot_product_attention (causal)

Every size derives from `depth` (dim = depth * aspect_ratio, n_head = dim // head_dim), as in
nanochat, so a preset is a handful of knobs. Layer i is MoE when `i % moe_freq == moe_freq - 1`
(moe_freq=1: every layer; moe_freq=2: layers 1, 3, 5, ...; the first layer stays dense because an
early dense block is the common choice). A moe_freq past the depth, which would make no MoE layer,
is refused: `dense=True` is how a dense model is asked for.
`dense=True` swaps every MoE MLP for a dense relu² MLP with hidden = top_k * expert_hidden: the
iso-FLOP baseline (same active matmul FLOPs, less the router's D x E).

forward() returns the mean cross-entropy and the summed MoE aux loss separately (both are logged)
plus MoE statistics as tensors. Nothing in forward reads a tensor back to the host: the loop does
one host sync per optimizer step, after the step.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.activation import relu_squared
from engine.blocked_mlp import dense_relu2_mlp
from engine.config import GPTConfig  # noqa: F401  (torch-free: moectl checks options with it)
from engine.moe import MoEConfig, MoELayer


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    # Parameter-free: nanochat finds the learnable gain unnecessary at these scales.
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x_BHTd: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor) -> torch.Tensor:
    d = x_BHTd.size(-1) // 2
    x1, x2 = x_BHTd[..., :d], x_BHTd[..., d:]
    return torch.cat([x1 * cos_Td + x2 * sin_Td, x2 * cos_Td - x1 * sin_Td], dim=-1)


def make_linear(cfg: GPTConfig, n_in: int, n_out: int) -> nn.Linear:
    """A bias-free Linear, float8 when --fp8-dense (imported lazily: fp8 is optional)."""
    if cfg.fp8_dense:
        from engine.fp8 import Float8Linear

        return Float8Linear(n_in, n_out, bias=False)
    return nn.Linear(n_in, n_out, bias=False)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_q = make_linear(cfg, cfg.dim, cfg.dim)
        self.c_k = make_linear(cfg, cfg.dim, cfg.dim)
        self.c_v = make_linear(cfg, cfg.dim, cfg.dim)
        self.c_proj = make_linear(cfg, cfg.dim, cfg.dim)

    def forward(self, x_BTD, cos_Td, sin_Td):
        B, T, D = x_BTD.shape
        q_BHTd = self.c_q(x_BTD).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k_BHTd = self.c_k(x_BTD).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v_BHTd = self.c_v(x_BTD).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        # Rotary first, then QK-norm (nanochat's order): bounded logits without a learned scale.
        q_BHTd = rms_norm(apply_rotary(q_BHTd, cos_Td, sin_Td))
        k_BHTd = rms_norm(apply_rotary(k_BHTd, cos_Td, sin_Td))
        y_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTd, is_causal=True)
        return self.c_proj(y_BHTd.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """Dense relu² MLP (also the --dense iso-FLOP stand-in for an MoE layer)."""

    def __init__(self, cfg: GPTConfig, hidden: int):
        super().__init__()
        self.c_fc = make_linear(cfg, cfg.dim, hidden)
        self.c_proj = make_linear(cfg, hidden, cfg.dim)

    def forward(self, x_BTD):
        if type(self.c_fc) is nn.Linear:  # float8 layers stay layers; plain ones may go blocked on CPU
            return dense_relu2_mlp(x_BTD, self.c_fc.weight, self.c_proj.weight)
        return self.c_proj(relu_squared(self.c_fc(x_BTD)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.attn = Attention(cfg)
        self.is_moe = cfg.is_moe_layer(layer)
        if self.is_moe:
            self.mlp = MoELayer(
                MoEConfig(
                    dim=cfg.dim,
                    n_experts=cfg.n_experts,
                    top_k=cfg.top_k,
                    expert_hidden=cfg.expert_hidden,
                    cap=cfg.cap,
                    dispatch=cfg.dispatch,
                    balance_coeff=cfg.balance_coeff,
                    z_coeff=cfg.z_coeff,
                    fp8=cfg.fp8,
                    balance=cfg.balance,
                    balance_rate=cfg.balance_rate,
                )
            )
        elif cfg.dense and cfg.was_moe_layer(layer):
            self.mlp = MLP(cfg, cfg.top_k * cfg.expert_hidden)  # iso-FLOP twin of the MoE layer
        else:
            self.mlp = MLP(cfg, cfg.dense_hidden)

    def forward(self, x_BTD, cos_Td, sin_Td):
        x_BTD = x_BTD + self.attn(rms_norm(x_BTD), cos_Td, sin_Td)
        if self.is_moe:
            y_BTD, aux = self.mlp(rms_norm(x_BTD))
            return x_BTD + y_BTD, aux
        return x_BTD + self.mlp(rms_norm(x_BTD)), None


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.padded_vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.lm_head = nn.Linear(cfg.dim, cfg.padded_vocab, bias=False)
        cos_Td, sin_Td = self._rotary(cfg.seq_len, cfg.head_dim)
        self.register_buffer("cos_Td", cos_Td, persistent=False)
        self.register_buffer("sin_Td", sin_Td, persistent=False)
        self.n_moe_layers = sum(b.is_moe for b in self.blocks)
        self.init_weights()

    @staticmethod
    def _rotary(seq_len: int, head_dim: int, base: float = 10000.0):
        inv_freq_d = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles_Td = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq_d)
        return angles_Td.cos(), angles_Td.sin()

    @torch.no_grad()
    def init_weights(self):
        # nanochat's recipe: unit-std embeddings, near-zero lm_head, uniform(±sqrt(3/fan_in)) for
        # matrices, zero output projections so every block starts as the identity.
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            mats = [block.attn.c_q, block.attn.c_k, block.attn.c_v]
            if not block.is_moe:
                mats.append(block.mlp.c_fc)
                nn.init.zeros_(block.mlp.c_proj.weight)
            for lin in mats:
                bound = 3**0.5 * lin.weight.size(1) ** -0.5
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            # MoE layers keep the initialisation of engine.moe (its reset_parameters).

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor):
        """-> dict(loss, aux_loss, tokens_per_expert_LE, dropped): all tensors, no host sync.

        tokens_per_expert_LE is one row per MoE layer ([0, E] when the model has none);
        dropped is the total over MoE layers. assignments is known from shapes: see assignments().
        """
        B, T = idx_BT.shape
        x_BTD = rms_norm(self.wte(idx_BT))
        cos_Td, sin_Td = self.cos_Td[:T], self.sin_Td[:T]
        aux_loss = x_BTD.new_zeros((), dtype=torch.float32)
        dropped = x_BTD.new_zeros((), dtype=torch.float32)
        counts = []
        for block in self.blocks:
            x_BTD, aux = block(x_BTD, cos_Td, sin_Td)
            if aux is not None:
                aux_loss = aux_loss + aux.loss.float()
                dropped = dropped + aux.dropped.float()
                counts.append(aux.tokens_per_expert_E.float())
        x_BTD = rms_norm(x_BTD)
        logits_BTV = self.lm_head(x_BTD).float()
        logits_BTV = self.cfg.softcap * torch.tanh(logits_BTV / self.cfg.softcap)
        loss = F.cross_entropy(logits_BTV.view(B * T, -1), targets_BT.reshape(B * T))
        if counts:
            tokens_per_expert_LE = torch.stack(counts)
        else:
            tokens_per_expert_LE = x_BTD.new_zeros((0, self.cfg.n_experts), dtype=torch.float32)
        return {"loss": loss, "aux_loss": aux_loss, "tokens_per_expert_LE": tokens_per_expert_LE, "dropped": dropped}

    def moe_layers(self) -> list[MoELayer]:
        return [b.mlp for b in self.blocks if b.is_moe]

    def shard_experts(self, ep) -> None:
        """Expert parallelism (engine.ep): every MoE layer keeps this rank's E/N experts."""
        for layer in self.moe_layers():
            layer.shard_experts(ep)

    def expert_param_names(self) -> list[str]:
        """Qualified names of the expert weights: what EP shards and DDP must leave alone."""
        return [f"blocks.{i}.mlp.{name}" for i, b in enumerate(self.blocks) if b.is_moe
                for name in b.mlp.expert_param_names()]

    def update_expert_bias(self, tokens_per_expert_LE: torch.Tensor) -> None:
        """After an optimizer step (--balance bias): one row of counts per MoE layer, whole step, all ranks."""
        for layer, counts_E in zip(self.moe_layers(), tokens_per_expert_LE):
            layer.update_expert_bias(counts_E)

    def assignments(self, n_tokens: int) -> int:
        """Token->expert assignments in one forward over n_tokens tokens (all MoE layers)."""
        return self.n_moe_layers * n_tokens * self.cfg.top_k
