"""How much wall time does moectl's launcher add over the bare torchrun command?

    .venv/bin/python scripts/bench_launch.py                       # tiny preset, 5 steps, 5 runs each
    .venv/bin/python scripts/bench_launch.py --module tests.fixtures.fake_engine --steps 20

Runs the same argv `--runs` times bare (`subprocess.run`, output to a file, as a person would with
`> train.log`) and `--runs` times through `moectl.launch.launch` (tee to train.log, metrics follower,
plain progress sink), interleaved so that machine load drifts hit both alike, and prints the medians
and their difference. Each run gets a fresh output directory.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moectl.launch import launch  # noqa: E402
from moectl.progress import PlainProgress  # noqa: E402


def torchrun_argv(module: str, nproc: int, steps: int, out_dir: Path, extra: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", module, "--steps", str(steps), "--out-dir", str(out_dir)]
    if module == "engine.train":
        argv += ["--preset", "tiny", "--device", "cpu"]
    return argv + extra


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--module", default="engine.train")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--trivial", action="store_true",
                   help="time `python -c pass` instead of torchrun: the launcher's fixed cost, with less noise")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("extra", nargs="*", help="more engine arguments (after --)")
    args = p.parse_args()

    # The same environment for both (launch would add PYTHONUNBUFFERED itself): only the launcher differs.
    env = {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    bare_s, launched_s = [], []
    with tempfile.TemporaryDirectory(prefix="bench_launch_") as tmp:
        for i in range(args.runs):
            # Alternate which goes first, so neither always runs on a warmer page cache.
            order = ("bare", "launch") if i % 2 == 0 else ("launch", "bare")
            for kind in order:
                out = Path(tmp) / f"{kind}{i}"
                out.mkdir()
                if args.trivial:
                    argv = [sys.executable, "-c", "pass"]
                else:
                    argv = torchrun_argv(args.module, args.nproc, args.steps, out, args.extra)
                t0 = time.perf_counter()
                if kind == "bare":
                    with open(out / "train.log", "wb") as log:
                        rc = subprocess.run(argv, cwd=REPO, env={**os.environ, **env}, stdout=log,
                                            stderr=subprocess.STDOUT).returncode
                    bare_s.append(time.perf_counter() - t0)
                else:
                    r = launch(argv, cwd=REPO, env=env, log_path=out / "train.log",
                               metrics_path=out / "metrics.jsonl", progress=PlainProgress(stream=io.StringIO()))
                    rc = r.exit_code
                    launched_s.append(time.perf_counter() - t0)
                if rc != 0:
                    print(f"{kind} run {i} failed with exit code {rc}; see {out / 'train.log'}", file=sys.stderr)
                    print((out / "train.log").read_text()[-2000:], file=sys.stderr)
                    return 1

    bare, launched = statistics.median(bare_s), statistics.median(launched_s)
    result = {"module": "python -c pass" if args.trivial else args.module, "nproc": args.nproc, "steps": args.steps, "runs": args.runs,
              "bare_median_s": round(bare, 3), "launch_median_s": round(launched, 3),
              "overhead_s": round(launched - bare, 3),
              "bare_s": [round(x, 3) for x in bare_s], "launch_s": [round(x, 3) for x in launched_s]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['module']} x{args.nproc}, {args.steps} steps, {args.runs} runs each (interleaved)")
        print(f"  bare            median {bare:7.3f} s   {result['bare_s']}")
        print(f"  through launch  median {launched:7.3f} s   {result['launch_s']}")
        print(f"  overhead        {launched - bare:+.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
