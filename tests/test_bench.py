"""engine.bench: the MoE-vs-dense benchmark's --json contract (a smoke run on a small shape)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SLOW_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--tokens", "256", "--dim", "32", "--experts", "4", "--top-k", "2", "--warmup", "1", "--repeats", "3"]


def ratio_tolerance(num: float, den: float) -> float:
    """The most a ratio rounded to 4 decimals can differ from `num / den` recomputed from figures
    each rounded to 3 decimals (engine.bench's --json rounding), when the code is right: the ratio's
    own rounding (5e-5) plus the worst corner of num in [num ± e], den in [den ± e], e = 5e-4:
    (num + e) / (den - e) - num / den = e (num + den) / (den (den - e)). A dense time near 0.4 ms
    makes that ~0.005, more than any fixed relative tolerance we could pick (issue 7)."""
    e = 5e-4
    assert den > e, f"dense time {den} ms is too small to check a ratio against"
    return 5e-5 + e * (num + den) / (den * (den - e)) + 1e-9  # + float slack on the roundings


def bench(*args):
    return subprocess.run([sys.executable, "-m", "engine.bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_bench_json_contract_small_shape():
    proc = bench("--json", *SMALL)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert res["device"] == "cpu" and res["tokens"] == 256 and res["dtype"] == "fp32"
    assert res["dense_ms"] > 0
    assert [(r["dispatch"], r["cap"]) for r in res["results"]] == [("padded", 1.0), ("grouped", 0.0), ("loop", 0.0)]
    for r in res["results"]:
        assert set(r) >= {"dispatch", "cap", "ms", "ratio_to_dense", "min_ms", "min_ratio_to_dense", "drop_frac"}
        assert r["ms"] > 0
        assert abs(r["ratio_to_dense"] - r["ms"] / res["dense_ms"]) <= ratio_tolerance(r["ms"], res["dense_ms"]), (r, res["dense_ms"])
        assert abs(r["min_ratio_to_dense"] - r["min_ms"] / res["dense_min_ms"]) <= ratio_tolerance(
            r["min_ms"], res["dense_min_ms"]), (r, res["dense_min_ms"])
        assert r["min_ms"] <= r["ms"]  # a minimum never exceeds the median
    assert res["results"][1]["drop_frac"] == 0.0  # grouped is dropless


def test_bench_human_output_and_bad_option(capsys):
    # In-process (the subprocess test above covers `python -m`): main() is the same entry point.
    from engine.bench import main

    assert main(SMALL) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[0] == "dense"
    assert [ln.split()[0] for ln in lines[2:]] == ["padded", "grouped", "loop"]
    assert all("x dense" in ln for ln in lines[2:])
    with pytest.raises(SystemExit) as exc:
        main(["--top-k", "9", *SMALL[:6]])  # top-k > experts
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--top-k must be between" in err
    for argv, said in ((["--tokens", "0"], "--tokens must be >= 1, got 0"), (["--repeats", "0"], "--repeats must be >= 1"),
                       (["--threads", "-1"], "--threads must be >= 0")):  # were an IndexError / "no median"
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.strip().startswith(f"error: {said}"), err


FAULTS_PER_STEP = """
import resource, sys, torch
from engine.bench import _step
from engine.malloc import keep_freed_memory
from engine.moe import MoEConfig, MoELayer
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.manual_seed(0)
layer = MoELayer(MoEConfig(dim=256, n_experts=8, top_k=2, expert_hidden=512, cap=1.0))
x = torch.randn(1, 4096, 256, requires_grad=True)
g = torch.randn_like(x)
for _ in range(8):  # the heap grows to the step's peak over the first few steps, in either mode
    _step(layer, x, g)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    _step(layer, x, g)
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def test_keep_freed_memory_stops_refaulting_every_step():
    """engine.malloc: with glibc's thresholds a padded MoE layer at the bench's shape faults in fresh
    pages step after step (its large buffers come from mmap and go back on free, and the heap top is
    trimmed); kept, the pages are reused. The witness is glibc's default mmap threshold (128 KiB)
    held static: left dynamic, glibc raises it by itself after some frees, and whether the plain
    steady state refaults then depends on the order of the step's allocations (it did 10-18k faults
    a step, and 2.6k once the relu² backward allocated fewer buffers: a witness that moves with
    unrelated changes). Static: measured ~38k faults a step plain, 0-300 kept. Page faults are
    counted by the kernel: no timing involved."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")  # glibc's default value, static
    # Side by side (one thread each): a process's faults are its own, whatever runs beside it.
    procs = {mode: subprocess.Popen([sys.executable, "-c", FAULTS_PER_STEP, mode], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mode in ("plain", "keep")}
    out = {}
    try:
        for mode, proc in procs.items():
            out[mode], err = proc.communicate(timeout=120)
            assert proc.returncode == 0, (mode, err[-2000:])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    plain_kept, plain = out["plain"].split()
    keep_kept, keep = out["keep"].split()
    assert keep_kept == "True"  # Linux + glibc here: the settings took
    assert float(plain) > 20000, plain  # > 80 MiB of fresh pages a step (measured: ~38k faults)
    assert float(keep) < float(plain) / 20, (keep, plain)  # measured: 0-300 against ~38k


@pytest.mark.slow
def test_gpu_profile_script_runs_on_cpu_and_writes_its_tables(tmp_path):
    """scripts/gpu_profile.py is only ever run for real on a lent GPU, in one short call: a typo
    found there costs device time, so its whole path (eager and compiled timings, the profiles)
    runs here on a small CPU shape."""
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, "scripts/gpu_profile.py", "--device", "cpu", "--tokens", "256", "--dim", "32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=SLOW_TIMEOUT_S - 30, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "profile.json").read_text())
    assert res["shape"] == [[1, 256, 32], 32, 8, 2, 64]
    for mode in ("eager", "compiled"):
        assert set(res[f"{mode}_ms"]) == {"dense", "padded_cap1", "grouped"}
        assert all(ms > 0 for ms in res[f"{mode}_ms"].values())
        assert res[f"{mode}_ratio"]["dense"] == 1.0
    assert res["graph_breaks"] == {}
    for name in ("dense", "padded_cap1", "grouped", "eager_padded_cap1", "eager_grouped"):
        assert "aten::" in (tmp_path / f"profile_{name}.txt").read_text(), name


@pytest.mark.slow
def test_bench_parts_gmm_compiled_checks_and_times_both_variants():
    """The A/B behind docs/benchmarks.md's custom-op figures: it checks the two compiled grouped
    MLPs equal before timing them, and prints one line per variant."""
    proc = subprocess.run([sys.executable, "scripts/bench_parts.py", "gmm-compiled", "--rows", "64", "--repeats", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=SLOW_TIMEOUT_S - 30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("gmm-compiled: bf16")
    assert [l.split()[0] for l in lines[1:]] == ["custom", "torch._grouped_mm"]


def test_bench_parts_breakdown_times_each_part_of_the_padded_layer():
    """The breakdown behind docs/benchmarks.md's Intel table: one line per part, in order, each with
    its ratio to the dense MLP, and the whole padded layer last."""
    proc = subprocess.run([sys.executable, "scripts/bench_parts.py", "breakdown", "--repeats", "2", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "breakdown: fp32, threads=1, 2 rounds"
    names = [line.split(" median ")[0].strip() for line in lines[1:]]
    assert names == ["dense", "experts", "router", "dispatch + combine", "bookkeeping", "padded layer"]
    ratios = {n: float(line.rsplit("ratio", 1)[1]) for n, line in zip(names, lines[1:])}
    assert ratios["dense"] == 1.0 and 0 < ratios["router"] < ratios["padded layer"]
