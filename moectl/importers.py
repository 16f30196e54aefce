"""Bring existing training logs into the engine's metrics schema (`moectl import`).

Three formats, one result (`ParsedLog`: engine `StepMetrics` plus run-level extras):

- `nanochat`: nanochat `base_train` stdout, e.g.
  `step 00279/00280 (99.64%) | loss: 3.723798 | bal: 24.0192 | lrm: 1.00 | dt: 637.19ms |
  tok/sec: 822,814 | bf16_mfu: 9.96 | epoch: 1 | total time: 2.97m | eta: 0.0m`
  plus `Peak memory usage: 18987.83MiB` and `Total training time: 2.97m`. Fields may be missing,
  extra or reordered; every other line is ignored.
- `jsonl`: the engine's own metrics.jsonl.
- `csv`: a step table with a header: the seed study's columns (`run,step,loss,bal,dt_ms,tok_sec,
  bf16_mfu`) or the engine's field names (what `moectl export --csv` writes).

A step line that looks like a step but cannot be read is skipped and counted, never fatal.
A file that is missing, empty or has no step at all is a UsageError: nothing gets imported.
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from engine.schema import StepMetrics
from moectl.errors import UsageError

FORMATS = ("nanochat", "jsonl", "csv")


@dataclass
class ParsedLog:
    steps: list[StepMetrics] = field(default_factory=list)  # sorted by step, last occurrence wins
    peak_mem_mib: Optional[float] = None
    total_time_s: Optional[float] = None
    planned_steps: Optional[int] = None
    world_size: Optional[int] = None
    skipped: int = 0
    format: str = ""


# --- nanochat ------------------------------------------------------------------------------------

# Optional torchrun prefix ("[rank0]: ", "[default0]:"), then "step N" or "step N/M".
_STEP = re.compile(r"^\s*(?:\[[^\]]*\]:?\s*)?step\s+(\d+)(?:\s*/\s*(\d+))?\b(.*)$")
_PEAK = re.compile(r"Peak memory usage:\s*([\d,]+(?:\.\d+)?)\s*MiB", re.IGNORECASE)
_TOTAL = re.compile(r"Total training time:\s*([\d,]+(?:\.\d+)?)\s*(ms|s|m|min|h)\b", re.IGNORECASE)
_UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}

# nanochat key -> (StepMetrics field, scale). `bal` is the raw balance loss (what the engine
# calls aux_loss); `total time` is cumulative training time, i.e. the engine's elapsed_s.
_NANOCHAT_FIELDS = {
    "loss": "loss",
    "bal": "aux_loss",
    "aux_loss": "aux_loss",
    "lr": "lr",
    "dt": "dt_ms",
    "tok/sec": "tok_per_sec",
    "bf16_mfu": "mfu",
    "mfu": "mfu",
    "drop": "drop_frac",
    "drop_frac": "drop_frac",
    "total time": "elapsed_s",
}


def _number(text: str) -> float:
    """'822,814' -> 822814.0; '637.19ms' -> 637.19 (unit stripped by caller). Finite only."""
    value = float(text.replace(",", "").replace("_", ""))
    if not math.isfinite(value):
        raise ValueError(f"not finite: {text}")
    return value


def _duration_s(text: str) -> float:
    m = re.fullmatch(r"([\d,]+(?:\.\d+)?)\s*(ms|s|m|min|h)?", text.strip())
    if not m:
        raise ValueError(f"bad duration {text!r}")
    return _number(m.group(1)) * _UNIT_S[(m.group(2) or "s").lower()]


def _nanochat_step(step: int, rest: str) -> StepMetrics:
    kwargs: dict[str, float] = {}
    for part in rest.split("|"):
        key, sep, raw = part.partition(":")
        key = key.strip().lower()
        if not sep or key not in _NANOCHAT_FIELDS:
            continue  # "(99.64%)", "lrm", "epoch", "eta", anything new: not ours
        name = _NANOCHAT_FIELDS[key]
        raw = raw.strip()
        if name == "dt_ms":
            kwargs[name] = _duration_s(raw if raw[-1:].isalpha() else raw + "ms") * 1000.0
        elif name == "elapsed_s":
            kwargs[name] = _duration_s(raw)
        else:
            kwargs[name] = _number(raw.rstrip("%"))
    if "loss" not in kwargs:
        raise ValueError("no loss")
    return StepMetrics(step=step, **kwargs)


def parse_nanochat(text: str) -> ParsedLog:
    out = ParsedLog(format="nanochat")
    by_step: dict[int, StepMetrics] = {}
    for line in text.splitlines():
        m = _STEP.match(line)
        if m:
            try:
                by_step[int(m.group(1))] = _nanochat_step(int(m.group(1)), m.group(3))
                if m.group(2):
                    out.planned_steps = int(m.group(2))
            except (ValueError, TypeError):
                out.skipped += 1
            continue
        if (pm := _PEAK.search(line)) is not None:
            out.peak_mem_mib = _number(pm.group(1))
        elif (tm := _TOTAL.search(line)) is not None:
            out.total_time_s = _number(tm.group(1)) * _UNIT_S[tm.group(2).lower()]
    out.steps = [by_step[k] for k in sorted(by_step)]
    return out


# --- jsonl ---------------------------------------------------------------------------------------


def parse_jsonl(text: str) -> ParsedLog:
    """The engine's own metrics.jsonl, read exactly as `moectl` reads a native run's."""
    from moectl.metrics import parse_metrics_text

    mf = parse_metrics_text(text)
    out = ParsedLog(format="jsonl", steps=mf.steps, skipped=mf.skipped)
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
    out = ParsedLog(format="csv")
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if "step" not in header:
        raise UsageError(f"csv has no 'step' column (header: {','.join(header) or 'none'})")
    rows = list(reader)
    if "run" in header:
        names = sorted({(r.get("run") or "").strip() for r in rows} - {""})
        if run is not None:
            if run not in names:
                raise UsageError(f"csv has no run {run!r} (runs: {', '.join(names)})")
            rows = [r for r in rows if (r.get("run") or "").strip() == run]
        elif len(names) > 1:
            raise UsageError(f"csv holds {len(names)} runs, pick one with --run: {', '.join(names)}")
    by_step: dict[int, StepMetrics] = {}
    for row in rows:
        try:
            kwargs: dict[str, float] = {}
            for key, raw in row.items():
                if key is None or raw is None:
                    continue  # ragged row
                name = _CSV_ALIASES.get(key.strip(), key.strip())
                if name in _STEP_FIELDS and raw.strip() != "":
                    kwargs[name] = _number(raw.strip())
            step = int(str(row.get("step", "")).strip())
            if "loss" not in kwargs:
                raise ValueError("no loss")
            by_step[step] = StepMetrics(step=step, **kwargs)
        except (ValueError, TypeError, AttributeError):
            out.skipped += 1
    out.steps = [by_step[k] for k in sorted(by_step)]
    return out


# --- entry point ---------------------------------------------------------------------------------


def load_log(path: Path, fmt: str, run: Optional[str] = None) -> ParsedLog:
    """Read and parse one log. Raises UsageError (exit 2) for anything not importable."""
    path = Path(path).expanduser()
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if not path.is_file():
        raise UsageError(f"log file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise UsageError(f"log file is empty: {path}")
    if fmt == "nanochat":
        parsed = parse_nanochat(text)
    elif fmt == "jsonl":
        parsed = parse_jsonl(text)
    else:
        parsed = parse_csv(text, run=run)
    if not parsed.steps:
        extra = f" ({parsed.skipped} malformed step lines)" if parsed.skipped else ""
        raise UsageError(f"no step lines in {path} as {fmt}{extra}")
    return parsed
