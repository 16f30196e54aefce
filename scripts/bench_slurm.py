"""What does `moectl run --slurm` add over a bare `sbatch --wait` of the same command, and how long
does the 6-leg tiny sweep take as parallel Slurm jobs vs serially on this machine?

    eval "$(bash scripts/local_slurm.sh start)"
    .venv/bin/python scripts/bench_slurm.py overhead --runs 5 --steps 5
    .venv/bin/python scripts/bench_slurm.py sweep --max-parallel 2

overhead: `moectl run --slurm --no-commit --device cpu --preset tiny --steps N --quiet` (a fresh
process: guards, directory, code snapshot, records, sbatch --hold + release, following the job to
its end, which writes the summary and report) in a throw-away git repository whose `.moectl.toml`
runs this checkout's engine, against a script running the exact command from that run's
command.txt (fresh output directory each time) submitted two ways: `sbatch --wait` (which polls the
controller with growing sleeps, so its wall time is quantised to those), and `sbatch` followed by
`squeue` every 0.1 s until the job has left the queue (the job's own latency). Interleaved, so
load drifts hit all three alike.

sweep: `moectl sweep sweeps/tiny_grid.toml --no-commit` (legs one by one here) against the same
with `--slurm --max-parallel K` (legs as jobs, K at once, and the report job), in fresh repositories.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench_run import make_repo  # noqa: E402


def overhead(runs: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_slurm_") as tmp:
        tmp = Path(tmp)
        repo, art = make_repo(tmp), tmp / "artifacts"
        env = {**os.environ, "PYTHONPATH": str(REPO), "MOECTL_ARTIFACT_ROOT": str(art)}
        moectl = [sys.executable, "-m", "moectl", "run", "--slurm", "--no-commit", "--device", "cpu", "--preset", "tiny",
                  "--steps", str(steps), "--quiet"]
        wrapped, bare, polled, command = [], [], [], None
        for i in range(runs):
            for kind in (("moectl", "bare", "polled") if i % 2 == 0 else ("polled", "bare", "moectl")):
                if kind == "moectl":
                    t0 = time.perf_counter()
                    subprocess.run(moectl, cwd=repo, env=env, check=True, capture_output=True, timeout=600)
                    wrapped.append(time.perf_counter() - t0)
                    newest = max(art.glob("*/command.txt"), key=lambda p: p.stat().st_mtime)
                    command = newest.read_text().strip()
                    continue
                out = tmp / f"{kind}{i}"
                script = tmp / f"{kind}{i}.sh"
                line = command.replace(str(newest.parent), str(out))
                script.write_text(f"#!/bin/bash\n#SBATCH --output={out}.out\ncd {repo}\n{line} > {out}.log 2>&1\n")
                t0 = time.perf_counter()
                if kind == "bare":
                    subprocess.run(["sbatch", "--wait", "--quiet", str(script)], env=env, check=True, timeout=600)
                    bare.append(time.perf_counter() - t0)
                    continue
                job = subprocess.run(["sbatch", "--parsable", str(script)], env=env, check=True, timeout=60,
                                     capture_output=True, text=True).stdout.strip()
                while subprocess.run(["squeue", "-h", "-j", job, "-o", "%i"], env=env, capture_output=True, text=True,
                                     timeout=60).stdout.strip():
                    time.sleep(0.1)
                polled.append(time.perf_counter() - t0)
        med = statistics.median
        return {"runs": runs, "steps": steps, "moectl_s": wrapped, "sbatch_wait_s": bare, "sbatch_polled_s": polled,
                "median_moectl_s": med(wrapped), "median_sbatch_wait_s": med(bare), "median_sbatch_polled_s": med(polled),
                "overhead_vs_sbatch_wait_s": med(wrapped) - med(bare),
                "overhead_vs_polled_s": med(wrapped) - med(polled)}


def sweep(max_parallel: int) -> dict:
    out = {}
    for kind, extra in (("serial_local", []), (f"slurm_max_parallel_{max_parallel}", ["--slurm", "--max-parallel", str(max_parallel)])):
        with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
            tmp = Path(tmp)
            repo, art = make_repo(tmp), tmp / "artifacts"
            shutil.copy(REPO / "sweeps" / "tiny_grid.toml", repo / "tiny_grid.toml")
            env = {**os.environ, "PYTHONPATH": str(REPO), "MOECTL_ARTIFACT_ROOT": str(art)}
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "moectl", "sweep", "tiny_grid.toml", "--no-commit", "--quiet",
                                "--override", "no_other_training", *extra],
                               cwd=repo, env=env, capture_output=True, text=True, timeout=3600)
            out[kind] = {"wall_s": time.perf_counter() - t0, "exit": r.returncode}
            if r.returncode != 0:
                out[kind]["tail"] = (r.stdout + r.stderr)[-2000:]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("overhead", "sweep"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--max-parallel", type=int, default=2)
    args = p.parse_args()
    result = overhead(args.runs, args.steps) if args.what == "overhead" else sweep(args.max_parallel)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
