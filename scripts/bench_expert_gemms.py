"""The expert GEMMs alone: dense mm vs bmm (padded) vs torch._grouped_mm (grouped), fwd+bwd.

    .venv/bin/python scripts/bench_expert_gemms.py              # torch's default threads
    .venv/bin/python scripts/bench_expert_gemms.py --threads 1

engine.bench's default shape: 8 experts x 1024 rows, D=256, expert hidden 512 (up and down
projections), against the iso-FLOP dense pair (4096 rows, hidden 1024). No routing, no activation:
what separates the padded and grouped layers' GEMM time from dense's. Round-robin in one process,
medians after 5 warm-up rounds, ratios to dense.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.malloc import keep_freed_memory  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rounds", type=int, default=25)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    E, C, D, H = 8, 1024, 256, 512
    A = E * C
    x_AD = torch.randn(A, D, requires_grad=True)
    w_up_EDH = torch.randn(E, D, H, requires_grad=True)
    w_down_EHD = torch.randn(E, H, D, requires_grad=True)
    offs_E = torch.arange(1, E + 1, dtype=torch.int32) * C
    g_AD = torch.randn(A, D)
    x_ND = torch.randn(A // 2, D, requires_grad=True)
    w1_DH = torch.randn(D, 2 * H, requires_grad=True)
    w2_HD = torch.randn(2 * H, D, requires_grad=True)
    g_ND = torch.randn(A // 2, D)
    params = (x_AD, w_up_EDH, w_down_EHD, x_ND, w1_DH, w2_HD)

    def dense():
        (x_ND @ w1_DH @ w2_HD).backward(g_ND)

    def bmm():
        x_ECD = x_AD.view(E, C, D)
        torch.bmm(torch.bmm(x_ECD, w_up_EDH), w_down_EHD).view(A, D).backward(g_AD)

    def grouped():
        h_AH = torch._grouped_mm(x_AD, w_up_EDH, offs=offs_E)
        torch._grouped_mm(h_AH, w_down_EHD, offs=offs_E).backward(g_AD)

    variants = {"dense mm": dense, "bmm (padded)": bmm, "_grouped_mm (grouped)": grouped}
    times = {name: [] for name in variants}
    for r in range(a.rounds + 5):
        for name, fn in variants.items():
            for t in params:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            if r >= 5:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["dense mm"])
    print(f"expert GEMMs fwd+bwd, fp32, threads={torch.get_num_threads()}, {a.rounds} rounds")
    for name, t in times.items():
        print(f"  {name:24s} median {1000 * statistics.median(t):7.2f} ms  ratio {statistics.median(t) / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
