"""Parts of the MoE layer's step timed alone, each against what it replaces or competes with.

    .venv/bin/python scripts/bench_parts.py relu2                # relu²: autograd's vs engine.activation's
    .venv/bin/python scripts/bench_parts.py gemms --threads 1    # expert GEMMs: dense mm vs bmm vs _grouped_mm
    .venv/bin/python scripts/bench_parts.py blocked              # each layer with and without engine.blocked_mlp
    .venv/bin/python scripts/bench_parts.py gmm-compiled --rows 256   # compiled bf16: custom op vs torch._grouped_mm
    .venv/bin/python scripts/bench_parts.py breakdown            # a padded layer's parts, each alone, beside dense

relu2: forward+backward of relu² on [8192, 512] fp32 (the bench's expert activations), autograd's
`F.relu(h).square()` against `relu_squared`; values and grads are checked equal first, so the
faster one is the same computation.
gemms: the two expert GEMMs alone, forward+backward, at engine.bench's default shape (8 experts x
1024 rows, D=256, expert hidden 512) as padded's `bmm` and grouped's `torch._grouped_mm`, against
the iso-FLOP dense pair (4096 rows, hidden 1024): what separates their GEMM time from dense's.
blocked: the dense MLP and the padded and grouped MoE layers of engine.bench, each timed with its
relu² MLP(s) through engine.blocked_mlp and without; --block-mib sets the block size. Input and
weight grads are checked equal up to summation order first.
gmm-compiled: the grouped expert MLP (grouped GEMM, relu², grouped GEMM) in bf16 under
torch.compile(fullgraph=True), forward+backward, once through engine.moe's custom op and once as
torch._grouped_mm itself; --rows tokens over 8 experts, D=256, hidden 512 (few rows: the per-call
overhead shows, as it does on a GPU whose kernels take microseconds). Outputs and grads are checked
equal first.
breakdown: the padded cap 1.0 layer of engine.bench cut into its parts, each timed alone in the same
rounds as the dense MLP and the whole layer: the experts (engine.blocked_mlp on a fixed [8192, 256]
input), the router (route(), forward+backward), dispatch + combine (_Dispatch then _Combine with
no experts between, forward+backward, routing fixed) and the bookkeeping (sort, ranks, slots; no
grad). Parts do not add up to the whole exactly: in the layer they share caches and x's grad.
Variants run round-robin in one process (engine.bench.time_round_robin); medians after warm-up,
ratios to the first variant.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine.blocked_mlp  # noqa: E402  (its ENABLED and BLOCK_BYTES are set here)
from engine.activation import relu_squared  # noqa: E402
from engine.bench import _step, bench_layers, time_round_robin  # noqa: E402
from engine.malloc import keep_freed_memory  # noqa: E402


def relu2_variants(rows: int = 8192, cols: int = 512) -> dict:
    h = torch.randn(rows, cols, requires_grad=True)
    g = torch.randn(rows, cols)
    fns = {"autograd relu().square()": lambda x: F.relu(x).square(), "relu_squared": relu_squared}
    results = []
    for fn in fns.values():
        out = fn(h)
        out.backward(g)
        results.append((out.detach(), h.grad))
        h.grad = None
    (ref_out, ref_grad), (out, grad) = results
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad), "relu_squared differs from autograd's"

    def step(fn):
        h.grad = None
        fn(h).backward(g)

    return {name: (lambda fn=fn: step(fn)) for name, fn in fns.items()}


def gemm_variants() -> dict:
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

    def fresh(fn):
        def run():
            for t in (x_AD, w_up_EDH, w_down_EHD, x_ND, w1_DH, w2_HD):
                t.grad = None
            fn()
        return run

    def bmm():
        x_ECD = x_AD.view(E, C, D)
        torch.bmm(torch.bmm(x_ECD, w_up_EDH), w_down_EHD).view(A, D).backward(g_AD)

    def grouped():
        h_AH = torch._grouped_mm(x_AD, w_up_EDH, offs=offs_E)
        torch._grouped_mm(h_AH, w_down_EHD, offs=offs_E).backward(g_AD)

    return {"dense mm": fresh(lambda: (x_ND @ w1_DH @ w2_HD).backward(g_ND)),
            "bmm (padded)": fresh(bmm), "_grouped_mm (grouped)": fresh(grouped)}


def blocked_variants(block_mib: float) -> dict:
    engine.blocked_mlp.BLOCK_BYTES = int(block_mib * 2**20)
    x = torch.randn(1, 4096, 256, requires_grad=True)
    g = torch.randn_like(x)
    layers = {k if k == "dense" else k[0]: layer  # engine.bench's default shape
              for k, layer in bench_layers(256, 8, 2, 512, (("padded", 1.0), ("grouped", 0.0))).items()}

    def step(layer, blocked: bool):
        engine.blocked_mlp.ENABLED = blocked
        try:
            _step(layer, x, g)
        finally:
            engine.blocked_mlp.ENABLED = True

    for name, layer in layers.items():
        results = []
        for blocked in (False, True):
            step(layer, blocked)
            results.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
        for ref, got in zip(*results):  # equal up to fp32 summation order (blocks add weight grads in parts)
            assert (ref - got).abs().max() <= 1e-5 * ref.abs().max(), f"{name}: blocked grads differ"
    return {f"{name}{' blocked' if blocked else ''}": (lambda layer=layer, blocked=blocked: step(layer, blocked))
            for name, layer in layers.items() for blocked in (False, True)}


def gmm_compiled_variants(rows: int) -> dict:
    from engine.moe import _grouped_mm_op

    E, D, H = 8, 256, 512
    x_AD = torch.randn(rows, D, dtype=torch.bfloat16, requires_grad=True)
    w_up_EDH = torch.randn(E, D, H, dtype=torch.bfloat16, requires_grad=True)
    w_down_EHD = torch.randn(E, H, D, dtype=torch.bfloat16, requires_grad=True)
    cuts = torch.linspace(0, rows, E + 1)[1:].round().to(torch.int32)  # near-equal groups
    g_AD = torch.randn(rows, D, dtype=torch.bfloat16)

    def mlp(gmm):
        return lambda x, w1, w2, offs: gmm(relu_squared(gmm(x, w1, offs)), w2, offs)

    fns = {"custom op": mlp(_grouped_mm_op), "torch._grouped_mm": mlp(lambda a, b, offs: torch._grouped_mm(a, b, offs=offs))}
    compiled = {k: torch.compile(f, fullgraph=True, dynamic=False) for k, f in fns.items()}

    def step(fn):
        for t in (x_AD, w_up_EDH, w_down_EHD):
            t.grad = None
        fn(x_AD, w_up_EDH, w_down_EHD, cuts).backward(g_AD)
        return [x_AD.grad, w_up_EDH.grad, w_down_EHD.grad]

    ref, got = (step(f) for f in compiled.values())
    assert all(torch.equal(a, b) for a, b in zip(ref, got)), "custom op and torch._grouped_mm differ"
    return {k: (lambda f=f: step(f)) for k, f in compiled.items()}


def breakdown_variants() -> dict:
    import engine.moe as moe
    from engine.blocked_mlp import blocked_relu2_mlp

    E, K, C = 8, 2, moe.capacity(1.0, 4096, 2, 8)
    x_BTD = torch.randn(1, 4096, 256, requires_grad=True)
    g_BTD = torch.randn_like(x_BTD)
    layers = bench_layers(256, E, K, 512, (("padded", 1.0),))
    layer = layers[("padded", 1.0)]
    x_ND, g_ND = x_BTD.view(4096, 256), g_BTD.view(4096, 256)
    with torch.no_grad():
        gates_NK, experts_NK, counts_E, _ = moe.route(x_ND, layer.router.weight, K, 0.01, 0.0)
    experts_A = experts_NK.reshape(-1)

    def bookkeeping():  # what _padded computes before the dispatch
        return moe.capacity_slots(experts_A, counts_E, C)

    keep_A, slot_A, valid_EC, src_S = bookkeeping()
    valid_S = valid_EC.view(-1)
    gate_A = (gates_NK.reshape(-1) * keep_A).requires_grad_()
    x_SD = torch.randn(E * C, 256, requires_grad=True)
    g_SD = torch.randn(E * C, 256)

    def experts():
        for t in (x_SD, layer.w_up_EDH, layer.w_down_EHD):
            t.grad = None
        blocked_relu2_mlp(x_SD, layer.w_up_EDH, layer.w_down_EHD, [C] * E).backward(g_SD)

    def router():
        x_BTD.grad = layer.router.weight.grad = None
        gates, _, _, loss = moe.route(x_ND, layer.router.weight, K, 0.01, 0.0)
        torch.autograd.backward([gates, loss], [gates_NK, None])

    def dispatch_combine():
        x_BTD.grad = gate_A.grad = None
        buf_SD = moe._Dispatch.apply(x_ND, src_S // K, slot_A, keep_A, K)
        moe._Combine.apply(buf_SD, gate_A, slot_A, src_S, valid_S, K).backward(g_ND)

    return {"dense": lambda: _step(layers["dense"], x_BTD, g_BTD), "experts": experts, "router": router,
            "dispatch + combine": dispatch_combine, "bookkeeping": bookkeeping,
            "padded layer": lambda: _step(layer, x_BTD, g_BTD)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["relu2", "gemms", "blocked", "gmm-compiled", "breakdown"])
    p.add_argument("--rows", type=int, default=256, help="gmm-compiled: tokens (rows) over the 8 experts")
    p.add_argument("--block-mib", type=float, default=4.0, help="blocked: engine.blocked_mlp.BLOCK_BYTES in MiB")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=0, help="timed rounds (default: relu2 50, gemms 25)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    variants = {"relu2": relu2_variants, "gemms": gemm_variants,
                "blocked": lambda: blocked_variants(a.block_mib),
                "gmm-compiled": lambda: gmm_compiled_variants(a.rows), "breakdown": breakdown_variants}[a.part]()
    repeats = a.repeats or {"relu2": 50, "gemms": 25, "blocked": 15, "gmm-compiled": 50, "breakdown": 20}[a.part]
    times = time_round_robin(variants, warmup=5, repeats=repeats)
    base = statistics.median(next(iter(times.values())))
    print(f"{a.part}: {'bf16' if a.part == 'gmm-compiled' else 'fp32'}, threads={torch.get_num_threads()}, {repeats} rounds")
    for name, t in times.items():
        print(f"  {name:26s} median {statistics.median(t):7.2f} ms  min {min(t):7.2f} ms  "
              f"ratio {statistics.median(t) / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
