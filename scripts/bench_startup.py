"""How fast does moectl start, next to the tools people already type in a loop (gpustat)?

    .venv/bin/python scripts/bench_startup.py                 # 15 rounds, markdown table
    .venv/bin/python scripts/bench_startup.py --rounds 25 --json
    .venv/bin/python scripts/bench_startup.py --runs 100          # a store of 100 runs

Installs gpustat into a throw-away venv (once, under --cache-dir; nothing touches the project's
.venv), then times whole commands as a person's shell would run them: `gpustat --json` and the
moectl commands that people run most (`status`, `status --json`, `runs --json`, `--help`), in
rounds. Each round runs every command once, in a rotated order, so that load drifting over the
minute hits all of them alike. Reported: per-command median and min wall time, and the ratio of
medians to gpustat's (the target is <= 1.0).

moectl runs from this checkout's .venv, in a scratch git repository with a committed .moectl.toml
and an artifact root holding imported runs (--runs, default 1), so `status`/`runs` do their real
work (git probes, process scan, lock, store) and are not measuring an error path. An untimed first
pass fills the bytecode caches and moectl's memo of validated files (a person's first command
does the same); the rounds then time what every later command costs. NVML: whatever this machine
has (no GPU here means both tools take their "no NVML" path).
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
VENV_PY = REPO / ".venv" / "bin" / "python"


def ensure_gpustat(cache_dir: Path) -> Path:
    """A venv with gpustat in it (created on first use); returns its gpustat executable."""
    venv = cache_dir / "gpustat-venv"
    exe = venv / "bin" / "gpustat"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "gpustat"], check=True)
    return exe


def scratch_project(tmp: Path, n_runs: int = 1) -> tuple[Path, dict]:
    """A git repo with a .moectl.toml, and an artifact root with `n_runs` imported runs in it."""
    repo = tmp / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    (repo / ".moectl.toml").write_text('[project]\nname = "moe"\nbranch = "main"\nvenv = ""\n')
    subprocess.run([*git, "add", ".moectl.toml"], check=True)
    subprocess.run([*git, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", "cfg"], check=True)
    # Its own cache too: the untimed first pass validates the config and the records once, as a
    # person's first `moectl status` would, and the timed rounds read them back (moectl/validated.py).
    env = {**os.environ, "MOECTL_ARTIFACT_ROOT": str(tmp / "artifacts"), "MOECTL_CACHE_DIR": str(tmp / "cache"),
           "NO_COLOR": "1"}
    # Bytecode caches as every normal install has them: pip compiled gpustat's (and typer's, ...)
    # when it installed them; moectl's own modules, in this editable checkout, get theirs on the
    # untimed first pass. A shell with PYTHONDONTWRITEBYTECODE=1 (this sandbox sets it) would
    # otherwise recompile moectl from source on every start and time the compiler.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    code = ("import sys; from pathlib import Path; from engine.schema import StepMetrics; "
            "from moectl.store import import_run\n"
            "for i in range(int(sys.argv[2])):\n"
            "    steps = [StepMetrics(step=s, loss=3.0, dt_ms=100.0, tok_per_sec=1000.0 + s + i, mfu=1.0) for s in range(60)]\n"
            "    import_run(Path(sys.argv[1]), 'moe', f'bench{i}', steps, source='bench')\n")
    subprocess.run([str(VENV_PY), "-c", code, env["MOECTL_ARTIFACT_ROOT"], str(n_runs)], cwd=REPO, env=env, check=True)
    return repo, env


def time_once(argv: list[str], cwd: Path, env: dict) -> float:
    # No `timeout=`: with one, Popen.wait polls with sleeps of up to 50 ms, which would round every
    # figure up to the next 50 ms step.
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "moectl-bench-startup")
    p.add_argument("--runs", type=int, default=1, help="imported runs in the store (default 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args()
    if not VENV_PY.exists():
        print(f"error: {VENV_PY} missing; run `bash scripts/dev.sh setup` first", file=sys.stderr)
        return 2

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    gpustat = ensure_gpustat(args.cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    try:
        repo, env = scratch_project(tmp, args.runs)
        moectl = [str(VENV_PY), "-m", "moectl"]
        commands = {
            "gpustat --json": [str(gpustat), "--json"],
            "moectl status": [*moectl, "status"],
            "moectl status --json": [*moectl, "status", "--json"],
            "moectl runs --json": [*moectl, "runs", "--json"],
            "moectl --help": [*moectl, "--help"],
        }
        names = list(commands)
        for name in names:  # one untimed pass: page cache, .pyc files
            time_once(commands[name], repo, env)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                times[name].append(time_once(commands[name], repo, env))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base = statistics.median(times["gpustat --json"])
    rows = [{"command": n, "median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3),
             "ratio_to_gpustat": round(statistics.median(t) / base, 2)} for n, t in times.items()]
    if args.json:
        print(json.dumps({"rounds": args.rounds, "runs": args.runs, "load_avg": os.getloadavg(), "results": rows}))
        return 0
    print(f"{args.rounds} rounds, interleaved; {args.runs} run(s) in the store; "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("| command | median | min | median / gpustat |\n|---|---|---|---|")
    for row in rows:
        print(f"| `{row['command']}` | {row['median_s']:.3f} s | {row['min_s']:.3f} s | {row['ratio_to_gpustat']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
