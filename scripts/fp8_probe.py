"""Which float8 GEMM calls does this GPU's cuBLASLt take? A few seconds; prints one line per case.

    python3 scripts/fp8_probe.py            # CUDA (sm89+); scripts/gpu_check.sh runs it for EXTRAS=fp8

Why: on an H200 (torch 2.11+cu130) `--fp8` trained 30 compiled steps, then the eager validation
pass failed in engine.fp8's expert GEMM with CUBLAS_STATUS_NOT_SUPPORTED from cublasLtMatmul
(m 1536, n 4096, k 768: the d12 up-projection). The algorithm heuristic had accepted the call, so
what differs is something the heuristic is not told: a pointer's alignment (the scales are views
at a 4-byte offset, sx[e, 0]), the output dtype (fp32 where the residual stream is fp32), or the
eager path itself. Each case below changes one of those on the d12 shape.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.fp8 import E4M3, fp8_bmm  # noqa: E402

E, C, D, H = 8, 4096, 768, 1536


def attempt(name, fn):
    try:
        out = fn()
        torch.cuda.synchronize()
        finite = bool(torch.isfinite(out.float()).all())
        print(f"{name:<52} ok{'' if finite else ' (non-finite output)'}", flush=True)
    except Exception as exc:  # a probe: every failure is the finding
        print(f"{name:<52} FAIL {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("fp8_probe: no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name()} | torch {torch.__version__} | cuda {torch.version.cuda}")
    a = torch.randn(C, D, device=dev).to(E4M3)  # row-major first operand
    b_HD = torch.randn(E, H, D, device=dev).to(E4M3)  # b_HD[e].t() is a column-major [D, H]
    scales_E11 = torch.rand(E, 1, 1, device=dev) + 0.5
    for out_dtype in (torch.bfloat16, torch.float32):
        tag = str(out_dtype).removeprefix("torch.")
        fresh = lambda: torch.ones((), device=dev)  # noqa: E731
        attempt(f"_scaled_mm out {tag}, scales fresh 0-d",
                lambda: torch._scaled_mm(a, b_HD[1].t(), scale_a=fresh(), scale_b=fresh(), out_dtype=out_dtype))
        attempt(f"_scaled_mm out {tag}, scales views at offset 4 B",
                lambda: torch._scaled_mm(a, b_HD[1].t(), scale_a=scales_E11[1, 0], scale_b=scales_E11[1, 0],
                                         out_dtype=out_dtype))
        attempt(f"_scaled_mm out {tag}, scales views at offset 0",
                lambda: torch._scaled_mm(a, b_HD[0].t(), scale_a=scales_E11[0, 0], scale_b=scales_E11[0, 0],
                                         out_dtype=out_dtype))
    w_EDH = torch.randn(E, D, H, device=dev) * 0.02
    for x_dtype in (torch.bfloat16, torch.float32):
        tag = str(x_dtype).removeprefix("torch.")
        x_ECD = torch.randn(E, C, D, device=dev, dtype=x_dtype)
        with torch.no_grad():
            attempt(f"fp8_bmm eager no_grad, x {tag}", lambda: fp8_bmm(x_ECD, w_EDH))
        attempt(f"fp8_bmm eager fwd+bwd, x {tag}",
                lambda: torch.autograd.grad(fp8_bmm(x_ECD.requires_grad_(), w_EDH.requires_grad_()).sum(), x_ECD)[0])
        compiled = torch.compile(fp8_bmm, dynamic=False)
        with torch.no_grad():
            attempt(f"fp8_bmm compiled no_grad, x {tag}", lambda: compiled(x_ECD, w_EDH))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            attempt(f"fp8_bmm eager no_grad under autocast, x {tag}", lambda: fp8_bmm(x_ECD, w_EDH))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
