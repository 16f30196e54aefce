"""Where a d12-moe MoE layer's time goes on one GPU, next to its iso-FLOP dense MLP.

    OUT=/tmp/prof python3 scripts/gpu_profile.py            # CUDA: the d12 layer shape
    OUT=/tmp/prof python3 scripts/gpu_profile.py --device cpu --tokens 1024 --dim 64   # a smoke run

One layer as engine.train runs it: fp32 parameters and residual, autocast bf16, forward + backward
with the aux loss, eager and torch.compile(dynamic=False). Each variant is timed round-robin as
engine.bench times (synced, median), then profiled: the kernels by self device time go to
$OUT/profile_<name>.txt.
`gpu_check.sh` measured the whole model; this splits the MoE layer's extra time into its parts.

    OUT=/tmp/prof python3 scripts/gpu_profile.py --model     # the whole d12-moe model instead
    OUT=/tmp/prof python3 scripts/gpu_profile.py --model --device cpu --preset tiny   # a smoke run

--model builds engine.train's d12-moe model three times (cap 1.0 padded, cap 0 grouped, dense),
compiled static as `--compile static` does, and times fwd+bwd micro-steps of 16 x 1024 tokens:
wall ms (synced) beside the device ms the profiler saw and the host's launch ms (until the calls
return, before the sync), so a gap that one layer does not show (host-bound launches, a sync, a
copy outside the layer) is found; top kernels per variant go to
$OUT/model_<name>.txt. On the H200 grouped trained 63 ms a step (8 micro-steps) behind padded,
and the one-layer profile explained ~14 ms of it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.bench import bench_layers, time_round_robin  # noqa: E402


VARIANTS = {"dense": "dense", ("padded", 1.0): "padded_cap1", ("grouped", 0.0): "grouped"}


def make_layers(dim, experts, top_k, hidden, device):
    """engine.bench's layers, fp32 masters as engine.train keeps them (autocast makes the bf16)."""
    layers = bench_layers(dim, experts, top_k, hidden, [k for k in VARIANTS if k != "dense"], device, torch.float32)
    return {VARIANTS[k]: layer for k, layer in layers.items()}


def step_fn(layer, x, g, device, use_bf16):
    def step():
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = layer(F.rms_norm(x, (x.size(-1),)))
        if isinstance(out, tuple):
            out, aux = out
            torch.autograd.backward([out.float(), aux.loss], [g, None])
        else:
            out.float().backward(g)
    return step


def timed(fns: dict, device, warmup=5, repeats=20) -> dict:
    """Median ms per call, round-robin (engine.bench's timing; synced on CUDA, so launch-bound
    calls show their CPU time: read the profiles' device time beside it)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = time_round_robin(fns, warmup, repeats, sync=sync)
    return {k: round(statistics.median(v), 4) for k, v in times.items()}


def profile(fn, device, path: Path, iters=5):
    from torch.profiler import ProfilerActivity, profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    with tprofile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    avgs = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            table = avgs.table(sort_by=key, row_limit=40, max_name_column_width=90)
            break
        except Exception:  # older/newer spellings of the sort key
            continue
    path.write_text(f"{iters} iterations\n{table}\n")
    return table


def device_ms_per_iter(prof, iters: int) -> float:
    """Kernel time only (events on the device, not the CPU-side aten rows that repeat it)."""
    total_us = 0.0
    for evt in prof.events():
        dtype = getattr(evt, "device_type", None)
        if dtype is not None and "CUDA" in str(dtype) and evt.device_time_total:
            total_us += evt.device_time_total
    return total_us / 1000 / iters


def model_section(device, out: Path, preset: str = "d12-moe", micro_steps: int = 6) -> dict:
    """The whole model of a preset, per variant: wall vs device ms per fwd+bwd micro-step."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    from engine.model import GPT
    from engine.train import model_config, resolve_options

    variants = {"padded_cap1": ["--cap", "1.0"], "grouped": ["--cap", "0"], "dense": ["--dense"]}
    result = {}
    for name, extra in variants.items():
        args = resolve_options(["--preset", preset, "--device", device.type, "--compile", "static", *extra])
        torch.manual_seed(0)
        model = GPT(model_config(args, 32768)).to(device)
        compiled = torch.compile(model, dynamic=False)
        B, T = args.device_batch_size, args.seq_len
        x_BT = torch.randint(0, 32768, (B, T), device=device)
        y_BT = torch.randint(0, 32768, (B, T), device=device)

        def micro():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                o = compiled(x_BT, y_BT)
            (o["loss"] + o["aux_loss"]).backward()

        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        micro()
        sync()
        compile_s = time.perf_counter() - t0
        for _ in range(2):
            micro()
        sync()
        walls, launches = [], []
        for _ in range(micro_steps):
            t0 = time.perf_counter()
            micro()  # returns once every kernel is queued: host time, unless the queue filled up
            launches.append((time.perf_counter() - t0) * 1000)
            sync()
            walls.append((time.perf_counter() - t0) * 1000)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with tprofile(activities=acts) as prof:
            for _ in range(3):
                micro()
            sync()
        dev_ms = device_ms_per_iter(prof, 3) if device.type == "cuda" else None
        table = ""
        for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
            try:
                table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90)
                break
            except Exception:  # older/newer spellings of the sort key
                continue
        (out / f"model_{name}.txt").write_text(f"3 micro-steps, {B} x {T} tokens each\n{table}\n")
        # launch_ms close to wall_ms: the GPU waited on the host (launch-bound; CUDA graphs help).
        result[name] = {"compile_s": round(compile_s, 1), "wall_ms": round(statistics.median(walls), 2),
                        "launch_ms": round(statistics.median(launches), 2),
                        "device_ms": None if dev_ms is None else round(dev_ms, 2),
                        "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None}
        print(f"model {name}: {result[name]}", flush=True)
        del model, compiled
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return result


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=16384)  # d12-moe: 16 x 1024 a micro-batch
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=240, help="skip later sections past this")
    p.add_argument("--model", action="store_true", help="profile the whole model instead of one layer")
    p.add_argument("--preset", default="d12-moe", help="--model's engine preset (tiny: a CPU smoke run)")
    a = p.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/gpu_profile"))
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    if a.model:
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "model": model_section(device, out, a.preset)}
        from torch._dynamo.utils import counters

        result["graph_breaks"] = {str(k): v for k, v in counters["graph_break"].items()}
        (out / "model.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result), flush=True)
        return 0
    hidden = a.hidden or 2 * a.dim
    use_bf16 = device.type == "cuda"
    t_start = time.monotonic()
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    x = torch.randn(a.tokens // 1024 or 1, min(a.tokens, 1024), a.dim, device=device, requires_grad=True)
    g = torch.randn_like(x)
    layers = make_layers(a.dim, a.experts, a.top_k, hidden, device)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "shape": [list(x.shape), a.dim, a.experts, a.top_k, hidden]}

    eager = {k: step_fn(l, x, g, device, use_bf16) for k, l in layers.items()}
    result["eager_ms"] = timed(eager, device)
    print("eager ms:", result["eager_ms"], flush=True)

    compiled = {}
    for k, l in layers.items():
        try:
            t0 = time.monotonic()
            c = torch.compile(l, dynamic=False)
            fn = step_fn(c, x, g, device, use_bf16)
            fn()
            compiled[k] = fn
            print(f"compiled {k} in {time.monotonic() - t0:.1f}s", flush=True)
        except Exception:
            traceback.print_exc()
    try:
        from torch._dynamo.utils import counters

        result["graph_breaks"] = {str(k): v for k, v in counters["graph_break"].items()}
        result["unique_graphs"] = counters["stats"]["unique_graphs"]
    except Exception as exc:
        result["graph_breaks"] = repr(exc)
    result["compiled_ms"] = timed(compiled, device) if compiled else {}
    print("compiled ms:", result["compiled_ms"], flush=True)
    for mode in ("eager_ms", "compiled_ms"):
        d = result[mode].get("dense")
        if d:
            result[mode.replace("_ms", "_ratio")] = {k: round(v / d, 3) for k, v in result[mode].items()}
    (out / "profile.json").write_text(json.dumps(result, indent=1))

    for name, fn in list(compiled.items()) + [(f"eager_{k}", f) for k, f in eager.items() if k != "dense"]:
        if time.monotonic() - t_start > a.budget_s:
            print(f"skip profile {name}: past --budget-s", flush=True)
            continue
        try:
            table = profile(fn, device, out / f"profile_{name}.txt")
            print(f"==== {name}\n" + "\n".join(table.splitlines()[:22]), flush=True)
        except Exception:
            traceback.print_exc()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
