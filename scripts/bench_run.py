"""How much wall time does a whole `moectl run` add over the bare torchrun command it prints?

    .venv/bin/python scripts/bench_run.py                 # tiny preset, 5 steps, 5 runs each
    .venv/bin/python scripts/bench_run.py --runs 3 --steps 2
    .venv/bin/python scripts/bench_run.py --trainer stdout --steps 50   # a foreign, stdout-parsed trainer

`moectl run --no-commit --device cpu --preset tiny --steps N` (a fresh process: start-up, config,
all eight guards, directory and records, torchrun, progress, summary, report, EXPERIMENTS.md) in a
throw-away git repository whose `.moectl.toml` runs this checkout's engine, against the exact
command from its `command.txt` run bare with output to a file (`sh -c "$(cat command.txt)" >
train.log`), each in a fresh output directory, interleaved so machine load drifts hit both alike.
`--override no_other_training` keeps other people's torchruns on a shared machine from refusing
the run (on a quiet machine the guard passes anyway; it is still evaluated and timed).

`--trainer stdout` measures the same for a trainer moectl knows only by its output (issue 10):
tests/fixtures/foreign_trainer.py, printing nanoGPT-style `iter N: loss X, time Yms, mfu Z%` lines,
committed into the throw-away repository as `train.py` and run under torchrun with
`[metrics] source = "stdout"`, so moectl's extra work includes parsing every line live and writing
metrics.jsonl from it. The bare side runs the same `command.txt`, nothing parsed.
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


STDOUT_TRAINER = """
[launch]
script = "train.py"
launcher = "torchrun"
args = ["--sleep=0.02"]
env = { OMP_NUM_THREADS = "1" }

[launch.options]
steps = "--max_iters={}"

[metrics]
source = "stdout"
format = "regex"
step = 'iter (\\d+):'
[metrics.patterns]
loss = 'loss ([\\d.]+)'
dt_ms = 'time ([\\d.]+)ms'
mfu = 'mfu (-?[\\d.]+)%'
"""


def make_repo(root: Path, trainer: str = "engine") -> Path:
    repo = root / "repo"
    repo.mkdir()
    head = f'[project]\nname = "bench"\nbranch = "main"\nvenv = "{Path(sys.executable).parent.parent}"\n'
    if trainer == "engine":
        head += f'\n[launch]\nmodule = "engine.train"\nenv = {{ PYTHONPATH = "{REPO}", OMP_NUM_THREADS = "1" }}\n'
    else:
        head += STDOUT_TRAINER
        (repo / "train.py").write_text((REPO / "tests" / "fixtures" / "foreign_trainer.py").read_text())
    (repo / ".moectl.toml").write_text(head)
    for args in (["init", "-q", "-b", "main"], ["add", ".moectl.toml", *(["train.py"] if trainer != "engine" else [])],
                 ["-c", "user.name=bench", "-c", "user.email=bench@example.com", "commit", "-q", "-m", "cfg"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True)
    return repo


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--trainer", choices=("engine", "stdout"), default="engine",
                   help="engine: engine.train's tiny preset; stdout: a foreign trainer whose output moectl parses")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_run_") as tmp:
        tmp = Path(tmp)
        repo, art = make_repo(tmp, args.trainer), tmp / "artifacts"
        env = {**os.environ, "PYTHONPATH": str(REPO), "MOECTL_ARTIFACT_ROOT": str(art)}
        preset = ["--preset", "tiny"] if args.trainer == "engine" else []
        moectl = [sys.executable, "-m", "moectl", "run", "--no-commit", "--device", "cpu", *preset,
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

    res = {"trainer": args.trainer, "runs": args.runs, "steps": args.steps, "command": command,
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
