"""What parsing a trainer's stdout costs moectl: seconds per 10,000 lines (issue 10).

    .venv/bin/python scripts/bench_stdout_parse.py            # 100,000 lines per format, 5 repeats
    .venv/bin/python scripts/bench_stdout_parse.py --json

Lines as the tee hands them over (newline kept), 9 in 10 a step line, the rest what a real log mixes
in (torchrun's warnings, a rank-1 line, plain prints), through moectl.stdout_metrics exactly as a
live run uses it: `parse` is StdoutParser.feed alone; `parse+write` is LiveMetricsWriter (parse,
then append and flush each record to a metrics.jsonl on disk: what `moectl run` really pays).
The median of the repeats is reported, per format (nanochat's built-in line, nanoGPT's regexes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from moectl.stdout_metrics import LiveMetricsWriter, StdoutFormat, StdoutParser

FORMATS = {
    "nanochat": (StdoutFormat.build("nanochat"),
                 "step {i:05d}/99999 (1.00%) | loss: 3.123456 | lrm: 1.00 | dt: 650.67ms | tok/sec: 806,400 | "
                 "bf16_mfu: 9.76 | total time: 1.23m | eta: 10.0m\n"),
    "nanogpt": (StdoutFormat.build("regex", step=r"iter (\d+):", tokens_per_step=r"tokens per iteration will be: ([\d,]+)",
                                   patterns={"loss": r"loss ([\d.]+)", "dt_ms": r"time ([\d.]+)ms", "mfu": r"mfu (-?[\d.]+)%"}),
                "iter {i}: loss 3.1235, time 650.67ms, mfu 9.76%\n"),
}
OTHER = ("W1127 12:00:00.123000 4242 torch/distributed/run.py:766] Setting OMP_NUM_THREADS\n",
         "[rank1]: some other rank's line\n", "saving checkpoint to out/ckpt.pt\n")


def lines_for(step_line: str, n: int) -> list[str]:
    return [step_line.format(i=i) if i % 10 else OTHER[i // 10 % 3] for i in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    out = {"lines": args.lines, "repeats": args.repeats, "per_10k_lines_s": {}}
    with tempfile.TemporaryDirectory(prefix="bench_parse_") as tmp:
        for name, (fmt, step_line) in FORMATS.items():
            lines = lines_for(step_line, args.lines)
            parse, write = [], []
            for r in range(args.repeats):
                parser = StdoutParser(fmt, planned_steps=args.lines)
                t0 = time.perf_counter()
                for line in lines:
                    parser.feed(line)
                parse.append(time.perf_counter() - t0)
                writer = LiveMetricsWriter(Path(tmp) / f"{name}{r}.jsonl", StdoutParser(fmt, planned_steps=args.lines))
                t0 = time.perf_counter()
                for line in lines:
                    writer(line)
                writer.close()
                write.append(time.perf_counter() - t0)
            scale = 10_000 / args.lines
            out["per_10k_lines_s"][name] = {"parse": statistics.median(parse) * scale,
                                            "parse+write": statistics.median(write) * scale}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for name, t in out["per_10k_lines_s"].items():
            print(f"{name:9} parse {t['parse'] * 1000:7.1f} ms / 10k lines | parse+write {t['parse+write'] * 1000:7.1f} ms / 10k lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
