"""relu² forward+backward: autograd's `F.relu(h).square()` vs engine.activation.relu_squared.

    .venv/bin/python scripts/bench_relu2.py                 # [8192, 512] fp32 (the bench's expert activations)
    .venv/bin/python scripts/bench_relu2.py --rows 4096 --cols 1024 --threads 1

Both variants run round-robin in one process (one step of each in turn, after warm-up) and the
figure is the median per variant and the ratio of medians; the values and grads are also checked
equal, so the faster one is the same computation.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.activation import relu_squared  # noqa: E402
from engine.malloc import keep_freed_memory  # noqa: E402


def step(fn, h, g):
    h.grad = None
    fn(h).backward(g)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--cols", type=int, default=512)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    h = torch.randn(a.rows, a.cols, requires_grad=True)
    g = torch.randn(a.rows, a.cols)
    variants = {"autograd relu().square()": lambda x: F.relu(x).square(), "relu_squared": relu_squared}
    ref_out, ref_grad = None, None
    for name, fn in variants.items():
        out = fn(h)
        out.backward(g)
        if ref_out is None:
            ref_out, ref_grad = out.detach(), h.grad.clone()
        else:
            assert torch.equal(out.detach(), ref_out) and torch.allclose(h.grad, ref_grad, rtol=1e-6, atol=0), name
        h.grad = None
    times = {name: [] for name in variants}
    for r in range(a.repeats + 5):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            step(fn, h, g)
            if r >= 5:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["autograd relu().square()"])
    print(f"[{a.rows}, {a.cols}] fp32, threads={torch.get_num_threads()}, {a.repeats} repeats")
    for name, t in times.items():
        print(f"  {name:26s} median {1000 * statistics.median(t):6.2f} ms  min {1000 * min(t):6.2f} ms  "
              f"ratio {statistics.median(t) / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
