"""The run store: experiment directories and their records on disk (SPEC §6).

    <artifact_root>/<YYYYmmdd_HHMMSS>_<project>-<tag>/run.json   (+ command.txt, git.diff,
                                                                   train.log, metrics.jsonl, ckpt_root/)
    <artifact_root>/<sweep id>/sweep.json + one such run directory per leg

Directories are created with one `os.mkdir` (atomic: two launches can never share one) and never
reused. Records are written atomically (`records.write_json_atomic`). Reading is forgiving: a
corrupt run.json is reported and skipped, never a crash, and a run whose owner died without
saying so (SIGKILL, reboot) is *shown* as `stale` — its run.json is never rewritten on read.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from pydantic import Field, ValidationError

from engine.schema import METRICS_FILENAME, RunSummary, StepMetrics, to_line
from moectl.errors import UsageError
from moectl.records import RUN_RECORD, SWEEP_RECORD, RunRecord, Summary, save_model, write_text_atomic

ID_TIME_FORMAT = "%Y%m%d_%H%M%S"
# A pid is "the same process" only if it started no later than this after the record was made.
# Records carry second-precision times, so allow for rounding plus clock jitter.
_PID_REUSE_SLACK_S = 2.0


def now_iso() -> str:
    """The timestamp format of every record: local time with offset, millisecond precision."""
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def run_id(project: str, tag: str, now: Optional[datetime] = None) -> str:
    """`20260224_182427_moe-bufreuse`: sortable, readable, the directory name of a run."""
    now = now or datetime.now()
    return f"{now.strftime(ID_TIME_FORMAT)}_{project}-{tag}"


def create_run_dir(path: Path) -> Path:
    """Create a fresh experiment directory atomically. An existing one is an error, never reused."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path)
    except FileExistsError:
        raise UsageError(f"experiment directory already exists (never reused): {path}") from None
    return path


# --- records -------------------------------------------------------------------------------------


class StoredRun(RunRecord):
    """A RunRecord as read from disk, plus what the store observed about it.

    `stale` is excluded from serialisation, so saving a StoredRun writes back exactly the record.
    """

    stale: bool = Field(default=False, exclude=True)

    @property
    def display_status(self) -> str:
        return "stale" if self.stale else self.status

    @property
    def run_dir(self) -> Path:
        return Path(self.exp_dir)


class CorruptRecord(UsageError):
    """run.json exists but is not a readable record (half-written by a non-moectl tool, edited...)."""


def save_run(record: RunRecord) -> Path:
    """Write `<exp_dir>/run.json` atomically. Call at every state change."""
    path = Path(record.exp_dir) / RUN_RECORD
    save_model(path, record)
    return path


def load_run(run_dir: Path) -> StoredRun:
    """Read one run directory's record. Raises CorruptRecord (exit 2) when it cannot be read."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_RECORD
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorruptRecord(f"no {RUN_RECORD} in {run_dir}") from None
    except OSError as exc:
        raise CorruptRecord(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        rec = StoredRun.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "record"
        raise CorruptRecord(f"corrupt {path}: {where}: {first.get('msg', 'invalid')}") from None
    # The directory is the truth about where the run lives (it may have been moved).
    rec.exp_dir = str(run_dir.resolve())
    rec.stale = is_stale(rec)
    return rec


def run_json(record: RunRecord) -> dict[str, Any]:
    """A record as `runs --json` / `show --json` print it: run.json, with `status` as displayed
    (`stale` for a dead owner) and the recorded status kept in `recorded_status`."""
    data = record.model_dump(mode="json")
    if isinstance(record, StoredRun) and record.stale:
        data["recorded_status"] = data["status"]
        data["status"] = "stale"
    return data


# --- stale detection -----------------------------------------------------------------------------


def _parse_time(text: Optional[str]) -> Optional[float]:
    if not text:
        return None
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # naive: local time
    return dt.timestamp()


def is_stale(record: RunRecord, host: Optional[str] = None) -> bool:
    """A `created`/`running` run whose owner is gone: its pid is dead (or a zombie), or the pid now
    belongs to a process that started after the run did (pid reuse). Runs owned by another host,
    or with no recorded pid, cannot be judged from here and are taken at their word."""
    if record.status not in ("created", "running") or record.pid is None:
        return False
    if record.host and record.host != (host or socket.gethostname()):
        return False
    import psutil  # only here: list_runs on completed runs never pays for it

    try:
        proc = psutil.Process(record.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        started = proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True
    except psutil.Error:
        return False  # access denied: it exists; assume it is ours
    recorded = _parse_time(record.started_at) or _parse_time(record.created_at)
    return recorded is not None and started > recorded + _PID_REUSE_SLACK_S


# --- listing and lookup --------------------------------------------------------------------------


@dataclass
class Scan:
    runs: list[StoredRun] = field(default_factory=list)  # newest first
    corrupt: list[str] = field(default_factory=list)  # one message per unreadable run.json


def _run_dirs(root: Path) -> Iterable[Path]:
    """Top-level run directories, and the leg directories of sweep directories (one level down)."""
    try:
        children = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for entry in children:
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if (path / RUN_RECORD).exists():
            yield path
        elif (path / SWEEP_RECORD).exists():
            for leg in sorted(path.iterdir()):
                if leg.is_dir() and (leg / RUN_RECORD).exists():
                    yield leg


def _sort_key(rec: RunRecord) -> tuple[float, str]:
    return (_parse_time(rec.created_at) or 0.0, rec.id)


def scan_runs(root: Path) -> Scan:
    out = Scan()
    for run_dir in _run_dirs(Path(root)):
        try:
            out.runs.append(load_run(run_dir))
        except CorruptRecord as exc:
            out.corrupt.append(exc.message)
    out.runs.sort(key=_sort_key, reverse=True)
    return out


def list_runs(root: Path) -> list[StoredRun]:
    """Every readable run under `root`, newest first (corrupt records skipped: see scan_runs)."""
    return scan_runs(root).runs


def resolve_run(root: Path, ref: str, runs: Optional[Sequence[StoredRun]] = None) -> StoredRun:
    """A RUN argument (SPEC §4) -> its record.

    Accepts a path to a run directory, a run id, a tag, or a unique prefix of an id or tag. An
    exact id or tag beats any prefix; a tag shared by several runs means the most recent; an
    ambiguous prefix lists its candidates. Pass `runs` (newest first) to resolve many refs with
    one scan of the store.
    """
    as_path = Path(ref).expanduser()
    if (as_path / RUN_RECORD).is_file():
        return load_run(as_path)
    if os.sep in ref:
        raise UsageError(f"not a run directory (no {RUN_RECORD}): {ref}")
    runs = list_runs(root) if runs is None else runs
    for rec in runs:
        if rec.id == ref:
            return rec
    for rec in runs:  # newest first: the most recent run with this tag
        if rec.tag == ref:
            return rec
    by_id = [r for r in runs if r.id.startswith(ref)]
    id_hits = {r.id for r in by_id}
    by_tag = [r for r in runs if r.tag and r.tag.startswith(ref) and r.id not in id_hits]
    candidates = by_id + by_tag
    if not candidates:
        raise UsageError(f"no run matches {ref!r} under {root}")
    if len(candidates) == 1:
        return candidates[0]
    if not by_id and len({r.tag for r in by_tag}) == 1:
        return by_tag[0]  # a prefix of one tag that several runs share: the most recent
    names = sorted({r.id for r in by_id} | {f"{r.id} (tag {r.tag})" for r in by_tag})
    raise UsageError(f"ambiguous run reference {ref!r}: {len(names)} runs match", lines=names[:20])


def resolve_runs(root: Path, refs: Sequence[str]) -> list[StoredRun]:
    """Resolve several RUN arguments with a single scan of the store."""
    runs = list_runs(root)
    return [resolve_run(root, ref, runs) for ref in refs]


# --- import --------------------------------------------------------------------------------------


def import_run(
    root: Path,
    project: str,
    name: str,
    steps: Sequence[StepMetrics],
    extras: Optional[dict[str, Any]] = None,
    source: Optional[str] = None,
    window: int = 50,
    warmup_steps: int = 0,
) -> RunRecord:
    """Write an existing run's metrics into a fresh run directory with status `imported`.

    `extras` may carry `peak_mem_mib`, `total_time_s`, `world_size`, `planned_steps`, `skipped`
    and `format`. metrics.jsonl is written in the engine's own schema, so an imported run reads
    exactly like a native one. The directory only appears once everything in it is written.
    """
    from moectl.metrics import MetricsFile, tail_summary

    if not steps:
        raise UsageError("nothing to import: no steps")
    extras = dict(extras or {})
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    summary_line = RunSummary(
        steps=len(steps),
        world_size=int(extras.get("world_size") or 0),  # 0 = unknown (logs rarely say)
        # The run-wide peak: the log's own figure, else the max over steps (readers of a
        # finished run's tail take the peak from this line).
        peak_mem_mib=extras.get("peak_mem_mib") if extras.get("peak_mem_mib") is not None
        else max((s.peak_mem_mib for s in steps if s.peak_mem_mib is not None), default=None),
        total_time_s=extras.get("total_time_s"),
        final_loss=steps[-1].loss,
    )
    summary: Summary = tail_summary(MetricsFile(steps=list(steps), summary=summary_line), window, warmup_steps)

    # Claim a fresh directory atomically (two imports in the same second get `-2`, `-3`...: a new
    # name, never a reused directory), write the metrics, and run.json last: listings only see
    # directories holding a run.json, so a crash mid-import never shows a half run.
    base = run_id(project, name)
    final, n = root / base, 1
    while True:
        try:
            final = create_run_dir(final)
            break
        except UsageError:
            n += 1
            final = root / f"{base}-{n}"
    now = now_iso()
    record = RunRecord(
        id=final.name,
        tag=name,
        status="imported",
        created_at=now,
        finished_at=now,
        exp_dir=str(final),
        summary=summary,
        source=source,
        host=socket.gethostname(),
        options={k: extras[k] for k in ("format", "planned_steps") if extras.get(k) is not None},
        notes=(f"imported from {extras.get('format', 'a')} log"
               + (f"; {extras['skipped']} malformed lines skipped" if extras.get("skipped") else "")),
    )
    try:
        lines = [to_line(s) for s in steps] + [to_line(summary_line)]
        write_text_atomic(final / METRICS_FILENAME, "\n".join(lines) + "\n")
        save_run(record)
    except BaseException:
        for child in final.iterdir():
            child.unlink()
        final.rmdir()
        raise
    return record
