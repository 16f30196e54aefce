"""How much wall time does a whole `moectl run` add over the bare torchrun command it prints?

    .venv/bin/python scripts/bench_run.py                 # tiny preset, 5 steps, 5 runs each
    .venv/bin/python scripts/bench_run.py --runs 3 --steps 2

`moectl run --no-commit --device cpu --preset tiny --steps N` (a fresh process: start-up, config,
all eight guards, directory and records, torchrun, progress, summary, report, EXPERIMENTS.md) in a
throw-away git repository whose `.moectl.toml` runs this checkout's engine, against the exact
command from its `command.txt` run bare with output to a file (`sh -c "$(cat command.txt)" >
train.log`), each in a fresh output directory, interleaved so machine load drifts hit both alike.
`--override no_other_training` keeps other people's torchruns on a shared machine from refusing
the run (on a quiet machine the guard passes anyway; it is still evaluated and timed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    repo.mkdir()
    (repo / ".moectl.toml").write_text(
        f'[project]\nname = "bench"\nbranch = "main"\nvenv = "{Path(sys.executable).parent.parent}"\n\n'
        f'[launch]\nmodule = "engine.train"\nenv = {{ PYTHONPATH = "{REPO}", OMP_NUM_THREADS = "1" }}\n'
    )
    for args in (["init", "-q", "-b", "main"], ["add", ".moectl.toml"],
                 ["-c", "user.name=bench", "-c", "user.email=bench@example.com", "commit", "-q", "-m", "cfg"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True)
    return repo


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_run_") as tmp:
        tmp = Path(tmp)
        repo, art = make_repo(tmp), tmp / "artifacts"
        env = {**os.environ, "PYTHONPATH": str(REPO), "MOECTL_ARTIFACT_ROOT": str(art)}
        moectl = [sys.executable, "-m", "moectl", "run", "--no-commit", "--device", "cpu", "--preset", "tiny",
                  "--steps", str(args.steps), "--override", "no_other_training", "--quiet"]
        wrapped, bare, command = [], [], None
        for i in range(args.runs):
            order = ("moectl", "bare") if i % 2 == 0 else ("bare", "moectl")
            for kind in order:
                if kind == "moectl":
                    t0 = time.perf_counter()
                    r = subprocess.run(moectl + ["--tag", f"r{i}"], cwd=repo, env=env, capture_output=True, text=True)
                    wrapped.append(time.perf_counter() - t0)
                    if r.returncode != 0:
                        sys.exit(f"moectl run failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
                    exp = max(art.glob(f"*_bench-r{i}"))
                    if command is None:
                        command = (exp / "command.txt").read_text().strip()
                        first_exp = str(exp)
                else:  # run 0 starts with moectl, so the command is known by now
                    out = tmp / f"bare{i}"
                    out.mkdir()
                    cmd = command.replace(first_exp, str(out))  # a fresh --out-dir / --ckpt-dir per run
                    t0 = time.perf_counter()
                    with open(out / "train.log", "w") as log:
                        r = subprocess.run(["sh", "-c", cmd], cwd=repo, stdout=log, stderr=subprocess.STDOUT)
                    bare.append(time.perf_counter() - t0)
                    if r.returncode != 0:
                        sys.exit(f"bare command failed ({r.returncode}): {cmd}")
            print(f"run {i}: moectl {wrapped[-1]:.2f} s, bare {bare[-1]:.2f} s, load {os.getloadavg()[0]:.2f}",
                  file=sys.stderr)

    res = {"runs": args.runs, "steps": args.steps, "command": command,
           "moectl_median_s": statistics.median(wrapped), "bare_median_s": statistics.median(bare),
           "moectl_s": wrapped, "bare_s": bare}
    res["overhead_s"] = res["moectl_median_s"] - res["bare_median_s"]
    res["ratio"] = res["moectl_median_s"] / res["bare_median_s"]
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"moectl run median {res['moectl_median_s']:.2f} s | bare torchrun median {res['bare_median_s']:.2f} s | "
              f"overhead {res['overhead_s']:+.2f} s (x{res['ratio']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
