"""Runs as two CSV tables (`moectl export RUN... --csv DIR`), the seed study's two exports:

    DIR/steps.csv    run, step, loss, aux_loss, lr, dt_ms, tok_per_sec, mfu, peak_mem_mib,
                     drop_frac, expert_load_max, elapsed_s         (one row per step per run)
    DIR/summary.csv  run, tag, status, steps, tok_per_sec, dt_ms, mfu, peak_mem_mib,
                     total_time_min, final_loss, drop_frac, expert_load_max, window,
                     warmup_steps, window_steps, clean, error             (one row per run)

`run` is the run id (unique, and what every RUN argument accepts). Missing values are empty cells;
a loss that was not finite (a diverged run's steps, and then its final loss) is `nan`.
Step values are written with Python's shortest round-trip repr, so `moectl import steps.csv
--format csv --run ID` reads back exactly the numbers the engine wrote; summary means are rounded
to 12 significant digits. The summary is the SPEC §7 tail-window summary recomputed from
metrics.jsonl with the given window and warm-up (the recorded one when the metrics are gone):
`window_steps` is how many steps the window covered, `clean` is false when the run had no step past
its warm-up (its tail means then include compile / warm-up). Each file is replaced atomically
(temp file + rename).
"""
from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Sequence

from engine.schema import METRICS_FILENAME, StepMetrics
from moectl.errors import UsageError
from moectl.metrics import read_metrics, tail_summary
from moectl.atomic import atomic_file, ensure_dir
from moectl.records import RunRecord, Summary

STEPS_CSV = "steps.csv"
SUMMARY_CSV = "summary.csv"
# Every field of the engine's step line, in its order: a new engine metric is exported for free.
STEP_FIELDS = [f.name for f in fields(StepMetrics) if f.name != "type"]
STEP_COLUMNS = ["run", *STEP_FIELDS]
SUMMARY_METRICS = ["tok_per_sec", "dt_ms", "mfu", "peak_mem_mib", "total_time_min", "final_loss", "drop_frac",
                   "expert_load_max"]
SUMMARY_COLUMNS = ["run", "tag", "status", "steps", *SUMMARY_METRICS, "window", "warmup_steps", "window_steps",
                   "clean", "error"]
_DERIVED = {"tok_per_sec", "dt_ms", "mfu", "drop_frac", "expert_load_max", "total_time_min"}
_ERROR_LINE = re.compile(r"(Error|Exception)\b|error:", re.IGNORECASE)
_WORKER_DIED = re.compile(r"failed \(exitcode: -?\d+\)")  # torchrun: "... failed (exitcode: -9) local_rank: 0"
_MAX_ERROR_CHARS = 300


@dataclass
class ExportResult:
    steps_csv: Path
    summary_csv: Path
    runs: int
    step_rows: int
    without_steps: list[str]  # run ids that had no metrics steps (summary row only)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest string that reads back as the same float
    return value


def _tidy(name: str, value: Any) -> Any:
    """Derived numbers (tail means, minutes) to 12 significant digits: 670.3136, not the mean's
    670.3135999999997. Recorded values (final loss, peak memory, every step) stay exact."""
    if name in _DERIVED and isinstance(value, float):
        return float(f"{value:.12g}")
    return value


def _summary_value(summary: Optional[Summary], metric: str) -> Any:
    """A summary figure as the CSV holds it: a diverged run's final loss is nan, not an empty cell."""
    if summary is None:
        return None
    if metric == "final_loss" and summary.final_loss_not_finite:
        return float("nan")
    return _tidy(metric, getattr(summary, metric))


def error_line(error: Optional[str]) -> str:
    """A record's error (often a multi-line log tail) as one line: the last line that names an
    error (`RuntimeError: ...`, `error: ...`), else the first line (`interrupted by SIGINT`)."""
    lines = [ln.strip() for ln in (error or "").splitlines() if ln.strip()]
    if not lines:
        return ""
    named = [ln for ln in lines if _ERROR_LINE.search(ln)]
    # torchrun's report of a worker that died without a word (SIGKILL): no error line of its own,
    # and the first line of the tail is some progress line.
    died = [ln for ln in lines if _WORKER_DIED.search(ln)]
    line = named[-1] if named else died[-1] if died else lines[0]
    return line if len(line) <= _MAX_ERROR_CHARS else line[: _MAX_ERROR_CHARS - 1] + "…"


def _status(rec: RunRecord) -> str:
    return getattr(rec, "display_status", rec.status)  # StoredRun shows a dead owner as `stale`


def _csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    return buf.getvalue()


def export_csv(runs: Sequence[RunRecord], out_dir: Path, window: int, warmup_steps: int = 0) -> ExportResult:
    """Write DIR/steps.csv and DIR/summary.csv for `runs` (DIR created if missing)."""
    if not runs:
        raise UsageError("nothing to export: no runs")
    if window < 1:
        raise UsageError(f"window must be >= 1, got {window}")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--csv must be a directory, not a file: {out_dir}")

    step_rows: list[dict[str, Any]] = []
    summary_rows: list[dict[str, Any]] = []
    without_steps: list[str] = []
    for rec in runs:
        metrics = read_metrics(Path(rec.exp_dir) / METRICS_FILENAME)
        for s in metrics.steps:
            step_rows.append({"run": rec.id, **{name: getattr(s, name) for name in STEP_FIELDS}})
        summary: Optional[Summary]
        if metrics.steps:
            summary, n_steps = tail_summary(metrics, window, warmup_steps), len(metrics.steps)
        else:
            without_steps.append(rec.id)
            summary = rec.summary  # the record's own numbers, with the window they were made with
            n_steps = (summary.run_steps or summary.steps) if summary is not None else 0  # the run's, not the window's
        summary_rows.append({
            "run": rec.id, "tag": rec.tag, "status": _status(rec), "steps": n_steps,
            **{m: _summary_value(summary, m) for m in SUMMARY_METRICS},
            "window": summary.window if summary else window,
            "warmup_steps": summary.warmup_steps if summary else warmup_steps,
            "window_steps": summary.steps if summary else 0,
            "clean": ("true" if summary.clean else "false") if summary else "",
            "error": error_line(rec.error),
        })

    made = [d for d in (out_dir, *out_dir.parents) if not os.path.lexists(d)]  # what ensure_dir creates
    ensure_dir(out_dir)
    steps_path, summary_path = out_dir / STEPS_CSV, out_dir / SUMMARY_CSV
    for path in (steps_path, summary_path):  # before either is written: a rename that fails second
        if path.is_dir() and not path.is_symlink():  # would leave a new summary.csv beside the old steps.csv
            raise UsageError(f"{path} is a directory; the export writes a file there: nothing was written")
    # Both files are written (and fsynced) before either replaces its old one: a full disk or an
    # odd target leaves the old pair, never a steps.csv of these runs beside a summary.csv of others.
    try:
        with atomic_file(steps_path) as steps_fh, atomic_file(summary_path) as summary_fh:
            steps_fh.write(_csv_text(STEP_COLUMNS, step_rows))
            summary_fh.write(_csv_text(SUMMARY_COLUMNS, summary_rows))
    except OSError:
        for d in made:  # nothing written: no empty DIR made for it left behind either
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return ExportResult(steps_path, summary_path, len(summary_rows), len(step_rows), without_steps)
