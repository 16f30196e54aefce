"""float8 GEMMs with dynamic per-tensor scaling, through torch._scaled_mm.

    from engine.fp8 import Float8Linear, fp8_supported, fp8_mm, fp8_bmm
    ok, why = fp8_supported(torch.device("cuda"))   # (False, "needs compute capability >= 8.9 ...")
    lin = Float8Linear(256, 512, bias=False)        # drop-in for nn.Linear
    y_MN = fp8_mm(x_MK, w_NK)                       # x @ w.T, like F.linear
    y_ECH = fp8_bmm(x_ECD, w_EDH)                   # batched, per-expert weight scales

Recipe (the "tensorwise" one of torchao): forward quantises activations and weights to e4m3 with a
scale from each tensor's amax (computed on device, no host sync); backward quantises the incoming
gradient to e5m2 (more range, gradients have outliers) and runs both gradient GEMMs through
_scaled_mm as well, reusing the fp8 copies saved by forward (so activations are kept in 1 byte).

Layout rules we follow everywhere, because cuBLASLt enforces them (CPU is lenient, but we keep one
behaviour on both so CPU tests catch what a GPU would refuse): the first operand is row-major, the
second column-major, and the two dims of the second operand are multiples of 16. The contracting
dim of the weight-gradient GEMM is the token dim M, so M is zero-padded to a multiple of 16 inside
(zero rows change no sum); K and N are model dims, and a bad one is a ValueError with one line.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn if hasattr(torch, "float8_e4m3fn") else None
E5M2 = torch.float8_e5m2 if hasattr(torch, "float8_e5m2") else None
_ALIGN = 16


def fp8_supported(device) -> tuple[bool, str]:
    """(True, "") where float8 _scaled_mm runs on this device, else (False, one-line reason)."""
    device = torch.device(device)
    if E4M3 is None or not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no float8 dtypes / torch._scaled_mm"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            name = torch.cuda.get_device_name(device)
            return False, f"fp8 needs compute capability >= 8.9 (Ada/Hopper); {name} is {cap[0]}.{cap[1]}"
        return True, ""
    if device.type == "cpu":
        # CPU support arrived later than the dtypes; probe once with a tiny GEMM.
        try:
            a = torch.zeros(_ALIGN, _ALIGN, dtype=E4M3)
            one = torch.ones((), dtype=torch.float32)
            torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001 - any failure means "not here"
            return False, f"torch._scaled_mm fails on CPU in torch {torch.__version__}: {str(exc).splitlines()[0]}"
        return True, ""
    return False, f"fp8 is not supported on device type {device.type!r}"


def cpu_gemm_speeds(n: int = 64, repeats: int = 3) -> tuple[float, float]:
    """(float8 torch._scaled_mm, fp32 mm) GFLOP/s of one n x n x n GEMM on this CPU, best of repeats.

    Why: torch's CPU _scaled_mm can be a reference kernel. On a 2-core Sapphire Rapids Xeon (torch
    2.13) it ran at 0.06-0.09 GFLOP/s, 500-1000x under fp32, and a 1-step tiny --fp8 run took 50 s; a run
    that slow should say so at its start instead of looking hung. 64^3 costs ~10 ms at that speed."""
    import time

    a = torch.randn(n, n)
    aq = a.to(E4M3)
    one = torch.ones(())
    speeds = []
    for fn in (lambda: torch._scaled_mm(aq, aq.t(), scale_a=one, scale_b=one, out_dtype=torch.float32),
               lambda: a @ a):
        fn()  # first call: kernel selection, lazy init
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        speeds.append(2 * n**3 / max(best, 1e-9) / 1e9)
    return speeds[0], speeds[1]


def check_fp8_shape(what: str, **dims: int) -> None:
    """ValueError (one line) unless every named dim is a multiple of 16."""
    bad = {k: v for k, v in dims.items() if v % _ALIGN}
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise ValueError(f"fp8 {what}: {shown} must be a multiple of {_ALIGN} for torch._scaled_mm")


def _quantize(x: torch.Tensor, dtype, dims=None):
    """x -> (x_fp8, dequant scale). Per-tensor amax (or per-slice when dims are given)."""
    fmax = torch.finfo(dtype).max
    xf = x.float()
    amax = xf.abs().amax() if dims is None else xf.abs().amax(dim=dims, keepdim=True)
    # clamp_min: an all-zero tensor (zero-init w_down at step 0) would otherwise give inf scales.
    scale = fmax / amax.clamp_min(1e-12)
    q = (xf * scale).clamp(-fmax, fmax).to(dtype).contiguous()  # row-major, whatever x was
    return q, scale.reciprocal()


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """Same values, column-major storage (what _scaled_mm wants for its second operand)."""
    return t.t().contiguous().t()


def _smm(a, b, sa, sb, out_dtype):
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out_dtype)


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    pad = (-t.shape[0]) % _ALIGN
    return F.pad(t, (0, 0, 0, pad)) if pad else t


class _Fp8MM(torch.autograd.Function):
    """y_MN = x_MK @ w_NK.T with e4m3 operands, e5m2 gradient, fp32 accumulate."""

    @staticmethod
    def forward(ctx, x_MK, w_NK, grad_dtype):
        M = x_MK.shape[0]
        xq, sx = _quantize(_pad_rows(x_MK), E4M3)
        wq, sw = _quantize(w_NK, E4M3)
        y = _smm(xq, wq.t(), sx, sw, x_MK.dtype)[:M]
        ctx.save_for_backward(xq, sx, wq, sw)
        ctx.grad_dtype, ctx.M, ctx.x_dtype, ctx.w_dtype = grad_dtype, M, x_MK.dtype, w_NK.dtype
        return y

    @staticmethod
    def backward(ctx, g_MN):
        xq, sx, wq, sw = ctx.saved_tensors
        gq, sg = _quantize(_pad_rows(g_MN.contiguous()), ctx.grad_dtype)
        # grad_x [M,K] = g [M,N] @ w [N,K]; w must be column-major as the second operand.
        gx = _smm(gq, _col_major(wq), sg, sw, ctx.x_dtype)[: ctx.M]
        # grad_w [N,K] = g.T [N,M] @ x [M,K]; contracting over (padded) tokens.
        gw = _smm(gq.t().contiguous(), _col_major(xq), sg, sx, ctx.w_dtype)
        return gx, gw, None


def fp8_mm(x_MK: torch.Tensor, w_NK: torch.Tensor, grad_dtype=None) -> torch.Tensor:
    """x @ w.T (F.linear without bias) in float8. K and N must be multiples of 16."""
    check_fp8_shape("matmul", K=x_MK.shape[-1], N=w_NK.shape[0])
    lead = x_MK.shape[:-1]
    y = _Fp8MM.apply(x_MK.reshape(-1, x_MK.shape[-1]), w_NK, grad_dtype or E5M2)
    return y.view(*lead, w_NK.shape[0])


class _Fp8BMM(torch.autograd.Function):
    """y_ECH = x_ECD @ w_EDH, per-expert scales for both operands.

    torch has no batched _scaled_mm on CPU (and _scaled_grouped_mm wants row-wise scales and sm90),
    so this loops over E calls of _scaled_mm: E is small (8) and each GEMM is large, so the loop
    costs E kernel launches, not a host sync. Quantisation itself is batched.
    """

    @staticmethod
    def forward(ctx, x_ECD, w_EDH, grad_dtype):
        E, C, _ = x_ECD.shape
        x_ECD = F.pad(x_ECD, (0, 0, 0, (-C) % _ALIGN))
        xq, sx = _quantize(x_ECD, E4M3, dims=(1, 2))  # sx: [E,1,1]
        wq, sw = _quantize(w_EDH, E4M3, dims=(1, 2))
        wq_EHD = wq.transpose(1, 2).contiguous()  # so wq_EHD[e].t() is column-major [D,H]
        y = torch.stack([_smm(xq[e], wq_EHD[e].t(), sx[e, 0], sw[e, 0], x_ECD.dtype) for e in range(E)])
        ctx.save_for_backward(xq, sx, wq, sw)
        ctx.grad_dtype, ctx.C, ctx.x_dtype, ctx.w_dtype = grad_dtype, C, x_ECD.dtype, w_EDH.dtype
        return y[:, :C]

    @staticmethod
    def backward(ctx, g_ECH):
        xq, sx, wq, sw = ctx.saved_tensors
        E, C = g_ECH.shape[0], ctx.C
        g_ECH = F.pad(g_ECH.contiguous(), (0, 0, 0, (-C) % _ALIGN))
        gq, sg = _quantize(g_ECH, ctx.grad_dtype, dims=(1, 2))
        gx, gw = [], []
        for e in range(E):
            # grad_x [C,D] = g [C,H] @ w[e].T [H,D]: w[e] is [D,H] row-major, so its .t() is column-major.
            gx.append(_smm(gq[e], wq[e].t(), sg[e, 0], sw[e, 0], ctx.x_dtype))
            # grad_w [D,H] = x[e].T [D,C] @ g [C,H]
            gw.append(_smm(xq[e].t().contiguous(), _col_major(gq[e]), sx[e, 0], sg[e, 0], ctx.w_dtype))
        return torch.stack(gx)[:, :C], torch.stack(gw), None


def fp8_bmm(x_ECD: torch.Tensor, w_EDH: torch.Tensor, grad_dtype=None) -> torch.Tensor:
    """torch.bmm in float8 for the padded expert buffers. D and H must be multiples of 16."""
    check_fp8_shape("batched matmul", D=x_ECD.shape[-1], H=w_EDH.shape[-1])
    return _Fp8BMM.apply(x_ECD, w_EDH, grad_dtype or E5M2)


class Float8Linear(nn.Linear):
    """nn.Linear whose matmul runs in float8 (bias, if any, is added in the input dtype).

    The master weight stays in its own dtype; only the GEMM operands are quantised, per call.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        check_fp8_shape("Linear", in_features=in_features, out_features=out_features)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Float8Linear":
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
                  device=lin.weight.device, dtype=lin.weight.dtype)
        new.load_state_dict(lin.state_dict())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The output takes x's dtype and the weight grad the weight's: no casts needed here.
        y = fp8_mm(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)
