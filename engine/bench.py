"""MoE layer vs its iso-FLOP dense MLP: forward+backward time of one layer, per dispatch.

    python -m engine.bench                       # CPU, fp32, 4096 tokens, D=256, E=8, top-2, hidden 2D
    python -m engine.bench --device cuda --json  # bf16 on GPU, one JSON object on stdout

The dense MLP has hidden = top_k * expert_hidden, so at cap 1.0 with balanced routing both do the
same GEMM FLOPs and the ratio measures what routing, dispatch and combine cost. All variants are
timed round-robin in one process (one repeat of each in turn), so a noisy neighbour on a shared
machine slows every variant alike instead of one; the figure is the median over repeats.
On CPU the process keeps freed memory (engine.malloc, as engine.train does); --plain-malloc
measures with glibc's defaults instead.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn

from engine.malloc import keep_freed_memory
from engine.blocked_mlp import dense_relu2_mlp
from engine.moe import MoEConfig, MoELayer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class DenseMLP(nn.Module):
    """The iso-FLOP baseline: relu² MLP, hidden = top_k * expert_hidden, computed as model.MLP
    computes it (on CPU in row blocks, as the experts are: engine.blocked_mlp)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return dense_relu2_mlp(x, self.c_fc.weight, self.c_proj.weight)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(layer, x, g):
    """One forward+backward; grads set to None first so accumulation costs nothing extra."""
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    out = layer(x)
    if isinstance(out, tuple):  # MoE: (out, aux); the aux loss is part of the real backward
        out, aux = out
        torch.autograd.backward([out, aux.loss], [g, None])
    else:
        out.backward(g)


def time_round_robin(variants: dict, warmup: int, repeats: int, sync=lambda: None) -> dict[str, list[float]]:
    """ms per call of each variant (a no-argument callable), timed one call of each in turn so that
    a noisy neighbour slows every variant alike; the first `warmup` rounds are not kept."""
    times: dict = {k: [] for k in variants}
    for i in range(warmup + repeats):
        for key, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[key].append((time.perf_counter() - t0) * 1e3)
    return times


def bench_layers(dim, experts, top_k, hidden, variants, device="cpu", dtype=torch.float32) -> dict:
    """{"dense": the iso-FLOP dense MLP, (dispatch, cap): a MoE layer per variant} (also the part
    benchmarks' layers: scripts/bench_parts.py)."""
    layers = {"dense": DenseMLP(dim, top_k * hidden).to(device, dtype)}
    for dispatch, cap in variants:
        cfg = MoEConfig(dim=dim, n_experts=experts, top_k=top_k, expert_hidden=hidden, cap=cap, dispatch=dispatch)
        moe = MoELayer(cfg)
        nn.init.normal_(moe.w_down_EHD, std=hidden**-0.5)  # non-zero, like a trained layer
        layers[(dispatch, cap)] = moe.to(device, dtype)
    return layers


def run_bench(device="cpu", tokens=4096, dim=256, experts=8, top_k=2, hidden=0, dtype=None,
              warmup=3, repeats=10, variants=(("padded", 1.0), ("grouped", 0.0), ("loop", 0.0)),
              seed=0) -> dict:
    device = torch.device(device)
    dtype = dtype or ("bf16" if device.type == "cuda" else "fp32")
    hidden = hidden or 2 * dim
    torch.manual_seed(seed)
    x = torch.randn(1, tokens, dim, device=device, dtype=DTYPES[dtype], requires_grad=True)
    g = torch.randn_like(x)
    layers = bench_layers(dim, experts, top_k, hidden, variants, device, DTYPES[dtype])
    times = time_round_robin({k: (lambda layer=layer: _step(layer, x, g)) for k, layer in layers.items()},
                             warmup, repeats, sync=lambda: _sync(device))
    dense_ms = statistics.median(times["dense"])
    dense_min = min(times["dense"])  # noise only ever adds time: min is the quiet-machine estimate
    results = []
    for dispatch, cap in variants:
        with torch.no_grad():
            aux = layers[(dispatch, cap)](x)[1]
        ms = statistics.median(times[(dispatch, cap)])
        results.append({
            "dispatch": dispatch, "cap": cap, "ms": round(ms, 3), "ratio_to_dense": round(ms / dense_ms, 4),
            "drop_frac": round(float(aux.dropped) / aux.assignments, 4),
            "min_ms": round(min(times[(dispatch, cap)]), 3),
            "min_ratio_to_dense": round(min(times[(dispatch, cap)]) / dense_min, 4),
        })
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name, "tokens": tokens, "dim": dim, "experts": experts, "top_k": top_k,
        "expert_hidden": hidden, "dtype": dtype, "threads": torch.get_num_threads(),
        "repeats": repeats, "dense_ms": round(dense_ms, 3), "dense_min_ms": round(dense_min, 3),
        "results": results,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=0, help="expert hidden (default 2 * dim)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default fp32 on cpu, bf16 on cuda")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--plain-malloc", action="store_true", help="CPU: glibc's default malloc settings (see engine.malloc)")
    a = p.parse_args(argv)
    # Shapes and counts, by name: a 0 or negative one was an IndexError or "no median for empty data".
    for flag, value, least in (("--tokens", a.tokens, 1), ("--dim", a.dim, 1), ("--hidden", a.hidden, 0),
                               ("--repeats", a.repeats, 1), ("--warmup", a.warmup, 0), ("--threads", a.threads, 0)):
        if value < least:
            p.exit(2, f"error: {flag} must be >= {least}, got {value}\n")
    kept = a.device == "cpu" and not a.plain_malloc and keep_freed_memory()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "error: --device cuda but CUDA is not available\n")
    try:
        res = run_bench(a.device, a.tokens, a.dim, a.experts, a.top_k, a.hidden, a.dtype, a.warmup, a.repeats)
    except ValueError as exc:
        p.exit(2, f"error: {exc}\n")
    res["malloc"] = "keep_freed" if kept else "default"
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"{res['device']} {res['dtype']} threads={res['threads']}: {res['tokens']} tokens, D={res['dim']}, "
          f"E={res['experts']}, top-{res['top_k']}, expert hidden {res['expert_hidden']} "
          f"(median of {res['repeats']}, fwd+bwd, malloc {res['malloc']})")
    print(f"  {'dense':<18}{res['dense_ms']:9.2f} ms  (min {res['dense_min_ms']:.2f} ms)")
    for r in res["results"]:
        label = f"{r['dispatch']} cap {r['cap']:g}"
        print(f"  {label:<18}{r['ms']:9.2f} ms  {r['ratio_to_dense']:.3f}x dense  drop {r['drop_frac']:.3f}"
              f"  (min {r['min_ms']:.2f} ms, {r['min_ratio_to_dense']:.3f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
