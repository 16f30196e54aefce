"""Bring existing training logs into the engine's metrics schema (`moectl import`).

Four formats, one result (`ParsedLog`: engine `StepMetrics` plus run-level extras):

- `nanochat` and `regex`: a trainer's stdout, read by moectl/stdout_metrics.py, the parser a live
  `moectl run` of a stdout-parsed trainer uses. nanochat's `base_train` lines, e.g.
  `step 00279/00280 (99.64%) | loss: 3.723798 | bal: 24.0192 | lrm: 1.00 | dt: 637.19ms |
  tok/sec: 822,814 | bf16_mfu: 9.96 | epoch: 1 | total time: 2.97m | eta: 0.0m`
  plus `Peak memory usage: 18987.83MiB` and `Total training time: 2.97m`. Fields may be missing,
  extra or reordered; every other line is ignored. `regex`: `[metrics] step`/`patterns` of
  .moectl.toml or `--pattern FIELD=REGEX`.
- `jsonl`: the engine's own metrics.jsonl.
- `csv`: a step table with a header: the seed study's columns (`run,step,loss,bal,dt_ms,tok_sec,
  bf16_mfu`) or the engine's field names (what `moectl export --csv` writes).

A step line that looks like a step but cannot be read is skipped and counted, never fatal.
A file that is missing, empty or has no step at all is a UsageError: nothing gets imported.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from engine.schema import StepMetrics
from moectl.errors import UsageError
from moectl.stdout_metrics import NON_NEGATIVE, PATTERN_FIELDS, StdoutFormat, loss_number, number as _number, parse_text

FORMATS = ("nanochat", "regex", "jsonl", "csv")


def format_of(path: Path) -> str:
    """The format `moectl import` assumes when none is given: by the file's suffix (`.jsonl`: the
    engine's own metrics, `.csv`: a step table, as `moectl export` writes), else nanochat's log."""
    suffix = Path(path).suffix.lower()
    return {".jsonl": "jsonl", ".csv": "csv"}.get(suffix, "nanochat")


@dataclass
class ParsedLog:
    steps: list[StepMetrics] = field(default_factory=list)  # sorted by step, last occurrence wins
    peak_mem_mib: Optional[float] = None
    total_time_s: Optional[float] = None
    planned_steps: Optional[int] = None
    world_size: Optional[int] = None
    skipped: int = 0
    format: str = ""
    warnings: list[str] = field(default_factory=list)  # patterns that never matched


# --- nanochat, regex: the live parser (moectl.stdout_metrics) ------------------------------------


def parse_stdout(text: str, fmt: StdoutFormat) -> ParsedLog:
    """A trainer's output through the same parser a live `moectl run` uses, so an old log imports
    exactly as a live run of it would have parsed (same steps, same rank/noise/traceback rules)."""
    parser, steps = parse_text(text, fmt, finished=True)
    ordered = parser.in_step_order(steps)  # (before the warnings: it counts the unprinted steps again)
    return ParsedLog(
        steps=ordered, peak_mem_mib=parser.peak_mem_mib,
        total_time_s=parser.total_time_s, planned_steps=parser.planned_steps, skipped=parser.skipped,
        format=fmt.kind, warnings=parser.warnings() if steps else [],
    )


def parse_nanochat(text: str) -> ParsedLog:
    return parse_stdout(text, NANOCHAT)


NANOCHAT = StdoutFormat.build("nanochat")


def regex_format(metrics, patterns: list[str]) -> StdoutFormat:
    """`--format regex`: `[metrics]` step/tokens_per_step/patterns of .moectl.toml, overridden by
    `--pattern FIELD=REGEX` (FIELD: step, tokens_per_step or a metrics field). UsageError when bad."""
    step = metrics.step if metrics is not None else None
    tokens = metrics.tokens_per_step if metrics is not None else None
    fields = dict(metrics.patterns) if metrics is not None else {}
    given: set[str] = set()
    for item in patterns:
        name, sep, regex = item.partition("=")
        name = name.strip()
        if not sep or not name or not regex:
            raise UsageError(f"--pattern {item!r}: use FIELD=REGEX, e.g. --pattern 'loss=loss ([\\d.]+)'")
        if name in given:  # the last one silently won: a loss read by the wrong pattern
            raise UsageError(f"--pattern {name}=...: given twice; give each field once")
        given.add(name)
        if name not in ("step", "tokens_per_step") and name not in PATTERN_FIELDS:
            raise UsageError(f"--pattern {item!r}: {name} is not a field of the metrics schema "
                             f"(step, tokens_per_step, {', '.join(PATTERN_FIELDS)})")
        if name == "step":
            step = regex
        elif name == "tokens_per_step":
            tokens = regex
        else:
            fields[name] = regex
    if step is None:
        raise UsageError("--format regex needs a step pattern: --pattern 'step=iter (\\d+):' "
                         "or [metrics] step in .moectl.toml")
    try:
        return StdoutFormat.build("regex", step, tokens, fields)
    except ValueError as exc:
        raise UsageError(f"--pattern: {exc}") from None


# --- jsonl ---------------------------------------------------------------------------------------


def parse_jsonl(text: str) -> ParsedLog:
    """The engine's own metrics.jsonl, read exactly as `moectl` reads a native run's."""
    from moectl.metrics import parse_metrics_text

    mf = parse_metrics_text(text)
    # A figure that is never below zero, written negative (a -1 for "unknown" by another writer of
    # the schema): missing from its step, as the log and csv importers have it, not averaged in.
    steps = [replace(s, **{k: None for k in NON_NEGATIVE if (getattr(s, k) or 0) < 0}) for s in mf.steps]
    out = ParsedLog(format="jsonl", steps=steps, skipped=mf.skipped)
    if mf.start is not None:
        out.planned_steps, out.world_size = mf.start.steps, mf.start.world_size
    if mf.summary is not None:
        out.peak_mem_mib, out.total_time_s = mf.summary.peak_mem_mib, mf.summary.total_time_s
        out.world_size = mf.summary.world_size
    return out


# --- csv -----------------------------------------------------------------------------------------

# Seed-study column -> engine field. Engine field names map to themselves.
_CSV_ALIASES = {"bal": "aux_loss", "tok_sec": "tok_per_sec", "bf16_mfu": "mfu"}
_STEP_FIELDS = {
    "loss", "aux_loss", "lr", "dt_ms", "tok_per_sec", "mfu", "peak_mem_mib", "drop_frac",
    "expert_load_max", "elapsed_s",
}


def parse_csv(text: str, run: Optional[str] = None) -> ParsedLog:
    """A step table. With a `run` column holding several runs, `run` picks one (else an error)."""
    try:
        return _parse_csv(text, run)
    except csv.Error as exc:  # a cell past the csv module's field limit (131072 characters), a NUL
        raise UsageError(f"csv cannot be read: {exc}") from None


def _parse_csv(text: str, run: Optional[str]) -> ParsedLog:
    out = ParsedLog(format="csv")
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if "step" not in header:
        raise UsageError(f"csv has no 'step' column (header: {','.join(header) or 'none'})")
    if "loss" not in header:  # every step needs one: say the column, not "N malformed lines"
        raise UsageError(f"csv has no 'loss' column (header: {','.join(header)})")
    # Keys as the header names them, spaces around them dropped (`run, step, loss` is a header too).
    rows = [{(k.strip() if isinstance(k, str) else k): v for k, v in r.items()} for r in reader]
    # `cat a.csv b.csv > both.csv` repeats the header inside: a header again, not a run named "run"
    rows = [r for r in rows if any(k is not None and (v or "").strip() != k for k, v in r.items())]
    if "run" in header:
        names = sorted({(r.get("run") or "").strip() for r in rows} - {""})
        if run is not None:
            if run not in names:
                raise UsageError(f"csv has no run {run!r} (runs: {', '.join(names)})")
            rows = [r for r in rows if (r.get("run") or "").strip() == run]
        elif len(names) > 1:
            raise UsageError(f"csv holds {len(names)} runs, pick one with --run: {', '.join(names)}")
    if rows and not text.endswith(("\n", "\r")) and None in rows[-1].values():
        # The last row has no newline and fewer cells than the header: cut mid-write (a copy taken
        # while the trainer wrote it). Its last cell may be a truncated number (822814 -> 82281),
        # so it is not read. A whole last row without a newline (some exporters) is read as is.
        cut = rows.pop()
        out.warnings.append(f"the csv's last line has no newline and only {sum(v is not None for v in cut.values())} of "
                            f"{len(header)} columns, so its step {str(cut.get('step') or '?').strip()} was not read "
                            "(cut mid-write); if it is whole, complete the row and import again")
    by_step: dict[int, StepMetrics] = {}
    repeated = 0
    for row in rows:
        try:
            kwargs: dict[str, float] = {}
            for key, raw in row.items():
                if key is None or raw is None:
                    continue  # ragged row
                name = _CSV_ALIASES.get(key.strip(), key.strip())
                if name != "loss" and raw.strip().lower() in ("nan", "-nan", "inf", "-inf", "-"):
                    continue  # a figure the step lacks: that cell is missing, the step (and its loss) is not
                if name in _STEP_FIELDS and raw.strip() != "":
                    # a diverged step's loss is `nan` (as `moectl export` writes it): a step, not a bad row
                    value = (loss_number if name == "loss" else _number)(raw.strip())
                    if name in NON_NEGATIVE and value < 0:
                        continue  # a -1 placeholder (or garbage) for a figure that cannot be negative: missing
                    kwargs[name] = value
            step = _step_number(str(row.get("step", "")).strip())
            if not 0 <= step < 2**53:  # steps count from 0 (and fit a JSON number exactly): a bad row
                raise ValueError(f"step {step}")
            if "loss" not in kwargs:
                raise ValueError("no loss")
            repeated += step in by_step
            by_step[step] = StepMetrics(step=step, **kwargs)
        except (ValueError, TypeError, AttributeError):
            out.skipped += 1
    out.steps = [by_step[k] for k in sorted(by_step)]
    if repeated:
        out.warnings.append(f"{repeated} row(s) repeated the step number of an earlier row: each step keeps its last "
                            "row (a resumed run's steps run again, or two runs in one table without a run column?)")
    _time_from_step_times(out)
    return out


def _time_from_step_times(out: ParsedLog) -> None:
    """A table without elapsed_s (the seed study's): training time as the sum of its step times,
    each dt standing for the steps missing before it too - the rule of stdout-parsed logs
    (moectl.stdout_metrics), so a csv imports with the total time its log would have had."""
    if any(s.elapsed_s is not None for s in out.steps) or not any(s.dt_ms is not None for s in out.steps):
        return
    elapsed, prev, missing = 0.0, None, 0
    for i, s in enumerate(out.steps):
        gap = s.step - prev - 1 if prev is not None else 0
        prev = s.step
        if s.dt_ms is not None:
            elapsed += s.dt_ms / 1000.0 * (1 + gap)
            missing += gap
        out.steps[i] = replace(s, elapsed_s=elapsed)
    if missing:
        out.warnings.append(f"{missing} steps are not in the csv: training time counts each row's dt for the steps "
                            "missing before it (dt x steps since the previous row: an estimate)")


def _step_number(cell: str) -> int:
    """`12`, or `12.0` as pandas writes an integer column that holds a gap; never `12.5`."""
    try:
        return int(cell)
    except ValueError:
        value = float(cell)
        if not value.is_integer():
            raise ValueError(f"step {cell}") from None
        return int(value)


def _run_facts_from_summary_csv(path: Path, run: Optional[str], parsed: ParsedLog) -> None:
    """`moectl export` writes the run-wide peak memory and total time (the engine's summary line:
    the final eval and save included) to summary.csv beside steps.csv, never into steps.csv: read
    them back from there, so an export imports with the figures it was exported with."""
    summary = path.with_name("summary.csv")
    if path.name != "steps.csv" or not summary.is_file():
        return
    try:
        rows = list(csv.DictReader(io.StringIO(summary.read_text(encoding="utf-8"))))
        matching = [r for r in rows if run is not None and (r.get("run") or "").strip() == run]
        row = matching[0] if matching else rows[0] if run is None and len(rows) == 1 else None
        if row is None:
            return
        if parsed.peak_mem_mib is None and (row.get("peak_mem_mib") or "").strip():
            parsed.peak_mem_mib = float(row["peak_mem_mib"])
        if parsed.total_time_s is None and (row.get("total_time_min") or "").strip():
            parsed.total_time_s = float(row["total_time_min"]) * 60.0
    except (OSError, ValueError, UnicodeDecodeError, csv.Error):
        return  # a summary.csv that is not export's: the steps alone, as before


# --- entry point ---------------------------------------------------------------------------------


def load_log(path: Path, fmt: str, run: Optional[str] = None, stdout_format: Optional[StdoutFormat] = None) -> ParsedLog:
    """Read and parse one log. Raises UsageError (exit 2) for anything not importable."""
    if str(path) == "-" and not Path("-").exists():  # (a file named `-` is a file)
        raise UsageError("LOG -: a log is read from a file, not from stdin (a pipe is gone for a retry); "
                         "save it to a file and import that")
    path = Path(path).expanduser()
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give the log file in it")
    if path.exists() and not path.is_file():  # /dev/stdin, a FIFO: read once, gone for a retry
        raise UsageError(f"{path} is not a regular file (a pipe or device?): save the log to a file and import that")
    if not path.is_file():
        raise UsageError(f"log file not found: {path}")
    try:
        # Git's test for a binary file (a NUL in its first 8000 bytes), before reading it all: a
        # checkpoint or an archive given by mistake was read whole and decoded (1.5 GB of memory
        # for a 200 MB file) to end in "no step lines". UTF-16 text has NULs: its BOM says so.
        with open(path, "rb") as fh:
            head = fh.read(8000)
        if b"\0" in head and head[:2] not in (b"\xff\xfe", b"\xfe\xff"):
            raise UsageError(f"{path} is not a text log (binary data in its first bytes: a checkpoint or an "
                             "archive?); give the training log")
        # -sig: Excel writes CSVs with a BOM. Bytes decoded, not read_text: its newline translation
        # would make every `\r` of a redrawn progress bar a newline of its own (stdout_metrics.split_lines).
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    # UTF-16 with its BOM: what PowerShell's `>` and Excel's "Unicode text" write.
    text = (raw.decode("utf-16", errors="replace") if raw[:2] in (b"\xff\xfe", b"\xfe\xff")
            else raw.decode("utf-8-sig", errors="replace"))
    if not text.strip():
        raise UsageError(f"log file is empty: {path}")
    if fmt == "nanochat":
        parsed = parse_nanochat(text)
    elif fmt == "regex":
        if stdout_format is None:
            raise UsageError("--format regex needs patterns (moectl.importers.regex_format)")
        parsed = parse_stdout(text, stdout_format)
    elif fmt == "jsonl":
        parsed = parse_jsonl(text)
    else:
        parsed = parse_csv(text, run=run)
        _run_facts_from_summary_csv(path, run, parsed)
    if not parsed.steps:
        extra = f" ({parsed.skipped} malformed step lines)" if parsed.skipped else ""
        others = ", ".join(f for f in FORMATS if f != fmt)
        raise UsageError(f"no step lines in {path} as {fmt}{extra}; another format? --format {others.replace(', ', '|')}")
    return parsed
