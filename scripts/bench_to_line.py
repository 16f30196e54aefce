"""engine.schema.to_line of another revision against this checkout's, interleaved in one process.

    .venv/bin/python scripts/bench_to_line.py --rev fafcf84 [--rounds 9] [--records 50000]

Both versions of engine/schema.py are loaded side by side (the other one from `git show REV:...`),
their lines checked equal, then timed round-robin over the same step records; medians and ratio.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses look their module up by name)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="the git revision to compare against (e.g. HEAD~1)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--records", type=int, default=50_000)
    args = ap.parse_args()
    text = subprocess.run(["git", "-C", str(REPO), "show", f"{args.rev}:engine/schema.py"], check=True,
                          capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "schema_rev.py").write_text(text)
        old = load(Path(tmp) / "schema_rev.py", "schema_rev")
    new = load(REPO / "engine" / "schema.py", "schema_here")
    recs = [new.StepMetrics(step=i, loss=3.0 - i * 1e-6, aux_loss=0.1, lr=1e-3, dt_ms=100.0 + i % 7,
                            tok_per_sec=1e6 + i, mfu=30.0, peak_mem_mib=1000.0, drop_frac=0.01,
                            expert_load_max=1.2, elapsed_s=i * 0.1) for i in range(args.records)]
    assert [old.to_line(r) for r in recs[:1000]] == [new.to_line(r) for r in recs[:1000]], "the lines differ"
    times: dict[str, list[float]] = {"rev": [], "here": []}
    for _ in range(args.rounds):
        for name, fn in (("rev", old.to_line), ("here", new.to_line)):
            t = time.perf_counter()
            for r in recs:
                fn(r)
            times[name].append(time.perf_counter() - t)
    rev, here = statistics.median(times["rev"]), statistics.median(times["here"])
    print(f"{args.records} step lines, median of {args.rounds}: {args.rev} {rev * 1e3:.0f} ms "
          f"({rev / args.records * 1e6:.1f} us/line), here {here * 1e3:.0f} ms "
          f"({here / args.records * 1e6:.1f} us/line), ratio {here / rev:.3f}")


if __name__ == "__main__":
    main()
