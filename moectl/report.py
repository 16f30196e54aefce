"""Markdown reports (SPEC §9): one per run, compare tables, and their commit messages.

Pure functions from records to text; committing happens in the caller. `write_report` writes a
new report under a fresh name, claimed atomically (`report_path` only picks one). The tables use
the seed study's precision: tok/sec, dt, memory and minutes to 2 decimals, MFU to 4.
"""
from __future__ import annotations

import math

import re
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from moectl.metrics import MARK, MEAN_METRICS, METRICS, Comparison, MetricValue, mark_footnote
from moectl.records import RunRecord, Summary

# metric -> (column title, decimals)
COLUMNS: dict[str, tuple[str, int]] = {
    "tok_per_sec": ("tok/sec", 2),
    "dt_ms": ("dt (ms)", 2),
    "mfu": ("MFU %", 4),
    "peak_mem_mib": ("peak mem (MiB)", 2),
    "total_time_min": ("total (min)", 2),
    "final_loss": ("final loss", 4),
    "drop_frac": ("drop frac", 4),
    "expert_load_max": ("max expert load", 4),
}

# The resolved engine settings a report shows (in this order), when the engine reported them.
ENGINE_KEYS = (
    "preset", "n_layer", "dim", "n_head", "n_experts", "top_k", "expert_hidden", "moe_freq", "cap",
    "dispatch", "balance", "balance_rate", "ep", "expert_params_per_rank", "dense", "fp8", "fp8_dense", "compile",
    "compile_mode", "dtype", "seq_len", "device_batch_size",
    "total_batch_size", "grad_accum", "steps", "lr", "data", "vocab_size", "n_params",
    "flops_per_token", "torch_version",
)

# Options worth naming in a label, in order: "static cap1.0 fp8 bufreuse".
_LABEL_KEYS = ("compile", "cap", "fp8", "dense", "dispatch", "balance", "ep")


def fmt(value: Optional[float], decimals: int) -> str:
    return "—" if value is None else f"{value:.{decimals}f}"


NOT_FINITE = "NaN"  # how a table shows a figure that was not finite (a diverged run's final loss)


def fmt_delta(delta: Optional[float]) -> str:
    return "" if delta is None else f"{delta:+.2f}%"


def is_marked(summary: Optional[Summary], metric: str) -> bool:
    """A tail mean of a run with no step past its warm-up (shown with MARK, never recommended)."""
    return (summary is not None and not summary.clean and metric in MEAN_METRICS
            and getattr(summary, metric) is not None)


def summary_cell(summary: Optional[Summary], metric: str, decimals: int) -> str:
    """One metric of a record's summary for a table: the value, MARK when it is warm-up only,
    NaN for the final loss of a run that diverged (its null is not a missing figure)."""
    if metric == "final_loss" and summary is not None and summary.final_loss_not_finite:
        return NOT_FINITE
    text = fmt(getattr(summary, metric) if summary is not None else None, decimals)
    return text + (MARK if is_marked(summary, metric) else "")


def marked_footnote(summaries: list[Optional[Summary]]) -> list[str]:
    """The footnote under a table holding marked figures (nothing when none is marked)."""
    marked = [s for s in summaries if s is not None and any(is_marked(s, m) for m in MEAN_METRICS)]
    return ["", mark_footnote(marked[0].warmup_steps)] if marked else []


def run_label(record: RunRecord) -> str:
    """A short human name from the options that matter most, then the tag."""
    opts = record.options or {}
    parts = []
    for key in _LABEL_KEYS:
        v = opts.get(key)
        if v is None or v is False:
            continue
        if key == "cap":  # (a record written before inf was refused holds one: no crash on it)
            c = float(v)
            parts.append(f"cap{c:.1f}" if math.isfinite(c) and c == int(c) else f"cap{c:g}")
        elif key in ("fp8", "dense"):
            parts.append(key)
        elif key == "dispatch" and v == "auto":
            continue
        elif key == "balance":
            if v != "loss":  # the default: not worth a word
                parts.append(f"bal{v}")
        elif key == "ep":
            if int(v) > 1:
                parts.append(f"ep{v}")
        else:
            parts.append(str(v))
    tag = record.tag or record.id
    if tag not in parts:
        parts.append(tag)
    return " ".join(parts)


# The name part of a report file, in bytes: with the time before it, a `-NNNN` after it, a sweep
# figure's `_expert_load_max.png` and the atomic writer's `.<name>.moectl-<pid>.XXXXXXXX.tmp`, every file
# name stays under the filesystem's 255 (a tag may be up to ~235: the run directory's limit).
REPORT_NAME_MAX = 180


def _report_stem(name: str, now: Optional[datetime]) -> str:
    now = now or datetime.now()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "report"
    safe = safe.encode()[:REPORT_NAME_MAX].decode(errors="ignore")  # the report says the whole name
    return f"{now.strftime('%Y%m%d_%H%M')}_{safe}"


def report_path(report_dir: Path, name: str, now: Optional[datetime] = None) -> Path:
    """`<report_dir>/<YYYYmmdd_HHMM>_<name>.md`, with `-2`, `-3`... if that file already exists.
    Only picks a name: two writers may pick the same one; `write_report` claims it atomically."""
    stem = _report_stem(name, now)
    path = Path(report_dir) / f"{stem}.md"
    n = 1
    while path.exists():
        n += 1
        path = Path(report_dir) / f"{stem}-{n}.md"
    return path


def write_report(report_dir: Path, name: str, text: str, now: Optional[datetime] = None) -> Path:
    """Write `text` as a new report `<report_dir>/<YYYYmmdd_HHMM>_<name>.md` (`-2`, `-3`... when
    taken) and return its path. Each name is claimed with atomic.create_new_file, which never
    replaces a file: two moectl processes finishing in the same minute with the same name (a
    repeat group's Slurm jobs side by side) each get their own report."""
    from moectl.atomic import create_new_file, remove_dead_temp_files

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    for leftover in (report_dir, report_dir / "figures"):  # a killed moectl's, shown by `git status`
        remove_dead_temp_files(leftover)
    stem = _report_stem(name, now)
    for n in range(1, 10_000):
        path = report_dir / (f"{stem}.md" if n == 1 else f"{stem}-{n}.md")
        try:
            if not path.exists() and create_new_file(path, text):
                return path
        except OSError as exc:  # a full disk: its write error names no file, and the report's is the one
            raise OSError(exc.errno, exc.strerror, exc.filename or str(path)) from None
    raise FileExistsError(f"no free report name for {stem} in {report_dir}")


def commit_message(record: RunRecord, baseline: Optional[RunRecord] = None,
                   comparison: Optional[Comparison] = None) -> str:
    """`report: static cap1.0 bufreuse — 806400 tok/s (+2.70% vs static_cap1p0)`. With `comparison`
    (the report's own, baseline first) the baseline's figure is that table's: a repeat group's mean."""
    label = run_label(record)
    tps = record.summary.tok_per_sec if record.summary else None
    # A warm-up-only figure says so in the subject too: a log of subjects is read without tables.
    warmup_only = " [warm-up only]" if is_marked(record.summary, "tok_per_sec") else ""
    if record.status in ("failed", "interrupted"):
        # An interrupted run's exit code is torchrun's answer to the signal (1), not a failure to
        # report: the signal says what happened ("interrupted by SIGINT" in the record's error).
        why = (record.error or "").splitlines()[0] if record.error else ""
        if record.status == "interrupted":
            code = f" ({why.removeprefix('interrupted by ')})" if why.startswith("interrupted by ") else ""
        else:
            code = f" (trainer exit {record.exit_code})" if record.exit_code is not None else ""
        head = f"report: {label} — {record.status}{code}"
        return head + (f", {tps:.0f} tok/s so far{warmup_only}" if tps is not None else "")
    if tps is None:
        return f"report: {label} — {record.status}, no throughput recorded"
    msg = f"report: {label} — {tps:.0f} tok/s"
    base_row = next((r for r in comparison.runs if r.id == comparison.baseline), None) if comparison else None
    if base_row is not None:
        base_tps, base_name = base_row.metrics["tok_per_sec"].value, base_row.tag or base_row.id
        base_marked = base_row.metrics["tok_per_sec"].marked
    else:
        base_tps = baseline.summary.tok_per_sec if baseline is not None and baseline.summary else None
        base_name = baseline.tag or baseline.id if baseline is not None else None
        base_marked = baseline is not None and is_marked(baseline.summary, "tok_per_sec")
    if base_tps:
        msg += f" ({(tps - base_tps) / abs(base_tps) * 100:+.2f}% vs {base_name})"
        if not warmup_only and base_marked:
            warmup_only = " [baseline warm-up only]"
    return msg + warmup_only


def not_committed(reason: str, run_id: str) -> str:
    """Why a run's report was not committed, and the command that commits it once that is fixed."""
    return f"{reason}; the report is kept: commit it with `moectl commit {run_id}` once that is resolved"


def not_written(reason: str, run_id: str) -> str:
    """Why a run's report could not be written (a full disk), and the command that writes it from
    the run's record and commits it once that is fixed."""
    return f"{reason}; the run is recorded: `moectl commit {run_id}` writes its report and commits it once that is resolved"


def compare_commit_message(comparison: Comparison) -> str:
    """`report: compare bufreuse vs static_cap1p0 — 806400 tok/s (+2.70%)`; with several runs,
    the fastest one is named (the fastest clean one: a warm-up-only figure is named only when no
    run has another, and then marked)."""
    base = next(r for r in comparison.runs if r.id == comparison.baseline)
    others = [r for r in comparison.runs if r.id != base.id]
    names = ", ".join(r.tag or r.id for r in others[:3]) + (f" +{len(others) - 3} more" if len(others) > 3 else "")
    msg = f"report: compare {names} vs {base.tag or base.id}"
    with_tps = [r for r in others if r.metrics["tok_per_sec"].value is not None]
    clean = [r for r in with_tps if not r.metrics["tok_per_sec"].marked]
    if with_tps:
        best = max(clean or with_tps, key=lambda r: r.metrics["tok_per_sec"].value)
        mv = best.metrics["tok_per_sec"]
        who = "" if len(others) == 1 else f"best {best.tag or best.id} "
        msg += f" — {who}{mv.value:.0f} tok/s" + (f" ({mv.delta_pct:+.2f}%)" if mv.delta_pct is not None else "")
        if mv.marked:
            msg += " [warm-up only]"
        elif not base.clean and mv.delta_pct is not None:
            msg += " [baseline warm-up only]"
    return msg


def _table(header: list[str], rows: list[list[str]], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _cell(mv: MetricValue, decimals: int, is_baseline: bool) -> str:
    if mv.not_finite:
        return NOT_FINITE
    text = fmt(mv.value, decimals)
    if mv.value is None:
        return text
    if mv.marked:
        text += MARK
    if mv.stderr is not None:
        text += f" ±{mv.stderr:.{decimals}f}"
    if not is_baseline and mv.delta_pct is not None:
        text += f" ({fmt_delta(mv.delta_pct)}{'*' if mv.beyond_noise else ''})"
    elif not is_baseline and mv.beyond_noise:  # a baseline of 0 (cap 0's drop fraction): no %, still a verdict
        text += " (from 0*)"
    return text


def compare_markdown(comparison: Comparison) -> str:
    """The tail table of a comparison: value ± stderr (Δ% vs baseline, * = beyond noise)."""
    header = ["run", "steps"] + [COLUMNS[m][0] for m in METRICS]
    rows = []
    for r in comparison.runs:
        is_base = r.id == comparison.baseline
        name = (r.tag or r.id) + (f" (×{r.n_repeats} runs)" if r.n_repeats > 1 else "") + (" (baseline)" if is_base else "")
        rows.append([name, str(r.steps)] + [_cell(r.metrics[m], COLUMNS[m][1], is_base) for m in METRICS])
    base = next((r for r in comparison.runs if r.id == comparison.baseline), None)
    lines = _table(header, rows)
    warmup = comparison.warmup_steps
    lines += [
        "",
        f"Tail window: the last {comparison.window} steps of each run"
        + (f" past its first {warmup} (warm-up: compile, allocator; `[metrics] warmup_steps`)" if warmup else "")
        + ". Values are tail means "
        "(tok/sec, dt, MFU, drop) or run totals (peak mem = max, total time, final loss = last step).",
        "`±` is the standard error of the tail mean: for a single run within-run, sample std / √n_eff "
        "with n_eff the window's effective sample size (autocorrelation-corrected, never above n); "
        "for a repeat group (×N runs) between-runs, the std of the N tail means / √N, each value "
        "their mean. `(+x.xx%)` is the delta vs "
        f"the baseline `{base.tag or base.id if base else comparison.baseline}`; `*` marks a delta "
        "beyond noise: |a − b| > k·√(se_a² + se_b²), k = Student's t at 95% (never below 2) for the errors' "
        "degrees of freedom (Welch): a repeat group's N − 1, a single run's n_eff − 1.",
    ]
    if any(mv.marked for r in comparison.runs for mv in r.metrics.values()):
        lines.append(mark_footnote(warmup))
    lines += [f"- {note}" for note in comparison.notes]
    return "\n".join(lines) + "\n"


def _options_table(options: dict[str, Any]) -> list[str]:
    if not options:
        return ["(none recorded)"]
    return _table(["option", "value"], [[k, f"`{v}`"] for k, v in sorted(options.items())], right_from=2)


def run_report(
    record: RunRecord,
    comparison_vs_baseline: Optional[Comparison] = None,
    notes: Optional[str] = None,
) -> str:
    """The markdown report of one run."""
    exp = Path(record.exp_dir)
    lines = [f"# {run_label(record)} — {record.status}", ""]
    lines += [
        f"- run: `{record.id}`" + (f" (tag `{record.tag}`)" if record.tag else ""),
        f"- status: **{record.status}**" + (f", exit code {record.exit_code}" if record.exit_code is not None else ""),
        f"- created: {record.created_at}"
        + (f" · started: {record.started_at}" if record.started_at else "")
        + (f" · finished: {record.finished_at}" if record.finished_at else ""),
    ]
    if record.git.commit:
        dirty = " (dirty: see git.diff)" if record.git.dirty else ""
        lines.append(f"- git: `{record.git.branch or 'detached'}` @ `{record.git.commit[:12]}`{dirty}")
    if record.host or record.gpus:
        lines.append(f"- host: {record.host or '?'}" + (f" · GPUs: {', '.join(record.gpus)}" if record.gpus else ""))
    if record.backend == "slurm" and record.job_id:
        restarts = f" · requeued {record.restarts} time(s)" if record.restarts else ""
        lines.append(f"- Slurm job {record.job_id} on {record.nodes or 1} node(s){restarts}")
    if record.source:
        lines.append(f"- imported from: `{record.source}`")
    lines.append(f"- experiment directory: [`{exp}`]({exp.as_uri() if exp.is_absolute() else exp})")
    files = [n for n in ("run.json", "command.txt", "git.diff", "train.log", "metrics.jsonl") if (exp / n).exists()]
    if files:
        lines.append("- files: " + " · ".join(f"[{n}]({(exp / n).as_uri()})" for n in files))
    if notes or record.notes:
        lines += ["", "## Notes", "", notes or record.notes or ""]
    lines += ["", "## Options", ""] + _options_table(record.options)
    command = recorded_command(record)
    if command:
        lines += ["", "```", command, "```"]
    engine = {k: record.engine[k] for k in ENGINE_KEYS if record.engine.get(k) is not None}
    if engine:
        lines += ["", "## Engine configuration (as the engine resolved it)", ""]
        lines += _table(["setting", "value"], [[k, f"`{v}`"] for k, v in engine.items()], right_from=2)

    lines += ["", "## Tail summary", ""]
    s = record.summary
    if s is None:
        lines.append("No metrics were recorded.")
    else:
        header = ["window", "steps in it"] + [COLUMNS[m][0] for m in METRICS]
        row = [str(s.window), str(s.steps)] + [summary_cell(s, m, COLUMNS[m][1]) for m in METRICS]
        lines += _table(header, [row], right_from=0)
        if s.warmup_steps and s.clean and s.steps:  # (warm-up only: the note below says the opposite, and why)
            last = s.first_step + s.warmup_steps - 1
            if s.resumed_at:  # the steps before ran in an earlier process: left out, but no warm-up
                own = (f"; steps {s.resumed_at}–{last} are its warm-up (compile, allocator; `[metrics] warmup_steps`)"
                       if last >= s.resumed_at else "")
                lines.append(f"\nThe run resumed at step {s.resumed_at}: steps {s.first_step}–{s.resumed_at - 1} ran "
                             f"in an earlier process{own}. No tail mean counts them.")
            else:
                lines.append(f"\nSteps {s.first_step}–{last} are warm-up (compile, allocator; "
                             "`[metrics] warmup_steps`): no tail mean counts them.")
        if not s.steps and not s.run_steps:
            lines.append("\nNo step was measured.")
        elif not s.clean and s.steps:
            lines.append(f"\n**{s.note[:1].upper()}{s.note[1:]}.**")
            lines += marked_footnote([s])
        elif s.steps < s.window:
            past = "its resume and warm-up" if s.resumed_at else "the warm-up"
            lines.append(f"\nThe run has only {s.steps} steps past {past}: the tail covers all of them."
                         if s.warmup_steps else f"\nThe run has only {s.steps} steps: the tail covers all of them.")

    if record.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in record.warnings]

    if comparison_vs_baseline is not None:
        lines += ["", "## Against the baseline", "", compare_markdown(comparison_vs_baseline).rstrip()]

    overridden = list(record.overrides) + [
        g.name for g in record.guards if g.overridden and g.name not in record.overrides
    ]
    if overridden:
        lines += ["", "## Overrides (guards skipped knowingly)", ""]
        for name in overridden:
            g = next((g for g in record.guards if g.name == name), None)
            lines.append(f"- `{name}`" + (f": {g.message}" if g else ""))
    if record.error and record.status != "completed":
        # A fence longer than any backtick run in the text: a log line of ``` must not end the block.
        fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", record.error)), default=0))
        lines += ["", "## Error", "", fence, record.error.rstrip(), fence]
    return "\n".join(lines) + "\n"


def recorded_command(record: RunRecord) -> str:
    """The command as it ran, to paste: the run's command.txt (`cd <repo> && <env> <argv>`: without
    the env a pasted command may take other threads or another PYTHONPATH), else its argv quoted."""
    import shlex

    try:
        text = (Path(record.exp_dir) / "command.txt").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return text or " ".join(shlex.quote(a) for a in record.argv)


def find_run_report(report_dir: Path, run_id: str) -> Optional[Path]:
    """The run's report: a `<report_dir>/*.md` whose header names the run (`- run: \\`<id>\\``, as
    `run_report` writes it; file names carry the time and tag, not the id). The newest
    one if there are several."""
    needle = f"- run: `{run_id}`"
    hits = []
    for path in Path(report_dir).glob("*.md"):
        try:
            with open(path, encoding="utf-8") as fh:
                header = [fh.readline() for _ in range(5)]
        except (OSError, UnicodeDecodeError):
            continue
        if any(line.startswith(needle) for line in header):
            hits.append(path)
    return max(hits, key=lambda p: (p.stat().st_mtime_ns, p.name)) if hits else None
