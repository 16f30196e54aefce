"""The run store: experiment directories and their records on disk (SPEC §6).

    <artifact_root>/<YYYYmmdd_HHMMSS>_<project>-<tag>/run.json   (+ command.txt, git.diff,
                                                                   train.log, metrics.jsonl, ckpt_root/)
    <artifact_root>/<sweep id>/sweep.json + one such run directory per leg

Directories are created with one `os.mkdir` (atomic: two launches can never share one) and never
reused. Records are written atomically (`records.write_json_atomic`). Reading is forgiving: a
corrupt run.json is reported and skipped, never a crash.

A run whose moectl died without saying so (SIGKILL, the OOM killer, a reboot) is settled by the
first moectl that reads it (`settle_stale`): once none of its training processes is left, its
run.json becomes `interrupted (moectl was killed)` with its metrics summarised, its sweep leg
`interrupted`, and the run lock it left is removed. Until then — training still stopping, or a
store this process cannot write — it is *shown* as `stale` and left as it is.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from pydantic import Field, ValidationError, model_validator

from engine.schema import METRICS_FILENAME, RunSummary, StepMetrics, to_line
from moectl.atomic import ensure_dir, read_regular_bytes
from moectl.config import MetricsSection
from moectl.errors import UsageError
from moectl.metrics import LOSS_WARNING, MetricsFile, loss_warning, read_metrics, tail_summary
from moectl.records import (
    RUN_RECORD, SWEEP_RECORD, UNSETTLED, RunRecord, Summary, SweepRecord, save_model, write_text_atomic,
)
from moectl.runindex import owner_gone, parse_time, run_dirs  # noqa: F401  (parse_time: re-exported)

ID_TIME_FORMAT = "%Y%m%d_%H%M%S"


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
    ensure_dir(path.parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        raise UsageError(f"experiment directory already exists (never reused): {path}") from None
    return path


# --- records -------------------------------------------------------------------------------------


class StoredRun(RunRecord):
    """A RunRecord as read from disk, plus what the store observed about it.

    `stale` and `stopping` are excluded from serialisation, so saving a StoredRun writes back exactly
    the record.
    """

    stale: bool = Field(default=False, exclude=True)
    # Stale, and not settled because a process of its training still runs (settle_stale looked):
    # it ends `interrupted` once that process is gone (`wait` keeps waiting meanwhile).
    stopping: bool = Field(default=False, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _status_written(cls, data):
        # moectl writes every field; a record without its status was cut or edited, and the
        # constructor's default (`created`) would read it as a run killed before it started.
        if isinstance(data, dict) and "status" not in data:
            raise ValueError("status: Field required")
        return data

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


# Room held for a run's last record write: a disk that fills while it trains (its checkpoints,
# metrics, anyone's files) would leave run.json saying `running`, later read as a killed moectl.
# A few record pages: a failed run's record with its 40-line error tail, and its sweep.json after it.
RESERVE = ".moectl-reserve"
RESERVE_BYTES = 32 * 1024


def reserve_space(run_dir: Path) -> None:
    """Hold RESERVE_BYTES in the run's directory until `save_final` (best effort: a disk too full
    for it runs without, as before)."""
    path = Path(run_dir) / RESERVE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.write(fd, os.urandom(RESERVE_BYTES))  # (no fallocate here: blocks that do not compress away)
    except OSError:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def release_space(run_dir: Path) -> bool:
    """Give back the room `reserve_space` held; whether there was any."""
    try:
        os.unlink(Path(run_dir) / RESERVE)
        return True
    except OSError:
        return False


def save_final(record: RunRecord) -> Path:
    """`save_run` of a record's last word, on the room `reserve_space` held when the disk is full
    now; the room is given back either way."""
    try:
        return save_run(record)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not release_space(Path(record.exp_dir)):
            raise
        return save_run(record)
    finally:
        release_space(Path(record.exp_dir))


@contextlib.contextmanager
def record_lock(run_dir: Path) -> Iterator[None]:
    """One read-modify-write of a run's record at a time (see `update_run`; a Slurm run's submitter,
    its job and a reader settling it take it too: moectl/execution.py)."""
    import fcntl

    try:
        fh = open(Path(run_dir) / ".record.lock", "a")
    except OSError:  # a read-only run directory: the save below fails and says so anyway
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def update_run(record: RunRecord, change: Callable[[RunRecord], None]) -> Path:
    """Apply `change` to `record` and to the run.json on disk, and save that: the fields `change`
    sets, and whatever another command recorded since `record` was read. A command holding a copy
    read minutes ago (`moectl sync` over a slow tracker, beside a `moectl commit` of the same run)
    would otherwise write back its stale copy and erase the other's result. A record that cannot
    be read back (gone, corrupt) is saved as `record` is."""
    change(record)
    run_dir = Path(record.exp_dir)
    with record_lock(run_dir):
        try:
            on_disk = load_run(run_dir)
        except UsageError:
            return save_run(record)
        change(on_disk)
        return save_run(on_disk)


def load_run(run_dir: Path) -> StoredRun:
    """Read one run directory's record. Raises CorruptRecord (exit 2) when it cannot be read."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_RECORD
    try:
        text = read_regular_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise CorruptRecord(f"no {RUN_RECORD} in {run_dir}") from None
    except OSError as exc:
        raise CorruptRecord(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:  # bytes no JSON writer produced: skipped like any corrupt record
        raise CorruptRecord(f"corrupt {path}: not UTF-8 text (byte {exc.start})") from None
    try:
        rec = StoredRun.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "record"
        raise CorruptRecord(f"corrupt {path}: {where}: {first.get('msg', 'invalid')}") from None
    recorded_exp_dir = rec.exp_dir
    # The directory is the truth about where the run lives (it may have been moved).
    rec.exp_dir = str(run_dir.resolve())
    rec.stale = is_stale(rec)
    if rec.stale and rec.backend == "slurm" and _recorded_status(run_dir) not in UNSETTLED:
        return load_run(run_dir)  # its job wrote the end just before it left the queue
    if rec.stale and rec.backend != "slurm":  # a Slurm run stays `stale` until wait/follow end it
        return settle_stale(run_dir, rec, recorded_exp_dir)
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


def is_stale(record: RunRecord, host: Optional[str] = None) -> bool:
    """A `created`/`running` run whose owner is gone (runindex.owner_gone: a dead or reused pid,
    or a Slurm job no longer in the queue)."""
    return owner_gone(record.status, record.pid, record.host, record.started_at, record.created_at,
                      record.backend, record.job_id, this_host=host, released=record.released)


# --- settling the runs of a killed moectl --------------------------------------------------------

KILLED = "interrupted (moectl was killed)"
_LOG_TAIL_LINES = 40  # as many as launch keeps for a run it saw to the end
# Engine config keys that only say where a run wrote (already in the record as exp_dir).
_RUN_SPECIFIC = ("out_dir", "ckpt_dir")


def apply_metrics(record: RunRecord, metrics: MetricsFile, window: int, warmup_steps: int) -> None:
    """What a record takes from its metrics.jsonl once the training is over: the tail summary
    (SPEC §7), the engine's resolved configuration and torch version, a note on malformed lines,
    the warning of a loss that went NaN/inf (`metrics.loss_warning`). The one place for it, whether
    moectl saw the run to its end or a reader settles it later.

    A run resumed from a checkpoint (a requeued Slurm job, `--resume`) is summarised over its final
    stretch only: the steps from the last start, past that process's own warm-up (tail_summary
    adds the resume step to the warm-up, as it does for every other reader: metrics.stretch_warmup)."""
    # Also for a run without a step: its summary says so (steps 0, nulls), a contract key like any other.
    record.summary = tail_summary(metrics, window, warmup_steps)
    if metrics.start is not None:
        record.engine = {k: v for k, v in metrics.start.config.items() if k not in _RUN_SPECIFIC}
        record.torch_version = metrics.start.config.get("torch_version")
    if metrics.skipped:
        note = f"{metrics.skipped} malformed metrics lines skipped"
        record.notes = f"{record.notes}; {note}" if record.notes else note
    # A diverged run is a warning (shown by `show`, `runs` and the report), never a silent figure.
    # Its status stays what the trainer's exit made it: the steps ran and were measured.
    warning = loss_warning(metrics)
    record.warnings = [w for w in record.warnings if not w.startswith(LOSS_WARNING)] + ([warning] if warning else [])


def settle_stale(run_dir: Path, rec: StoredRun, recorded_exp_dir: Optional[str] = None) -> StoredRun:
    """Finalise a stale run (its moectl is dead) as `interrupted (moectl was killed)`; return what
    a reader should show. Called by `load_run`, so every command that reads the store does it.

    - Not while a process of its training is alive (stopping after moectl's death, or left with
      no watchdog): its metrics may still grow, so it stays `stale` until the next read.
    - The content is a function of the files alone (summary from metrics.jsonl with the window
      recorded at launch; `finished_at` = when the run last wrote, the newest mtime of
      metrics.jsonl and train.log; `exit_code` null, since the moectl that collects torchrun's
      status died first), so two readers settling it at once write the same bytes, atomically.
    - Then the run lock, if it still names this dead owner, is removed, and a `running` leg in
      the sweep.json beside the run becomes `interrupted` (what `sweep --resume` reruns).
    - A store this process cannot write leaves everything as it was: shown `stale`, no error.
    """
    if _training_alive(rec, recorded_exp_dir):
        rec.stopping = True
        return rec
    metrics_path, log_path = run_dir / METRICS_FILENAME, run_dir / "train.log"
    final = rec.model_copy(deep=True)
    final.exp_dir = recorded_exp_dir or rec.exp_dir  # run.json keeps what it said; only the status settles
    metrics = read_metrics(metrics_path)
    defaults = MetricsSection()  # records from before these fields: the defaults of that time's config
    apply_metrics(final, metrics, rec.window or defaults.window,
                  rec.warmup_steps if rec.warmup_steps is not None else defaults.warmup_steps)
    final.status = "interrupted"
    final.finished_at = _last_written(metrics_path, log_path) or rec.started_at or rec.created_at
    finished = "; its training had finished (metrics.jsonl ends with its summary)" if metrics.summary else ""
    from moectl.text import without_stop_tracebacks

    tail = without_stop_tracebacks(log_tail(log_path))  # (torchrun stopped by its moectl's death: no news)
    final.error = KILLED + finished + (f"\n{tail}" if tail else "")
    release_space(run_dir)  # what its dead moectl held for its last record: for this one, or free
    try:
        if _recorded_status(run_dir) in UNSETTLED:  # not settled by another reader meanwhile
            save_model(run_dir / RUN_RECORD, final)
    except OSError:
        return rec  # not ours to write (read-only mount, another user's store): keep showing it stale
    from moectl.lock import release_if_dead  # here, as psutil: reading settled runs never pays for it

    for root in (run_dir.parent, run_dir.parent.parent):  # a run's root, or a sweep leg's
        try:
            release_if_dead(root, rec.pid, rec.id)
        except OSError:
            pass  # the record is settled; a lock we cannot remove is still taken over by the next run
    try:
        _settle_sweep_leg(run_dir.parent / SWEEP_RECORD, rec.id)
    except OSError:
        pass  # leg_status shows the leg as its settled run anyway
    final.exp_dir = rec.exp_dir
    final.stale = False
    return final


def _training_alive(rec: RunRecord, recorded_exp_dir: Optional[str]) -> bool:
    """Is a process of this run's training still alive: torchrun (argv as recorded) or anything
    given `--out-dir` this run's directory (the workers)?"""
    import psutil

    out_dirs = {rec.exp_dir, recorded_exp_dir}
    argv = list(rec.argv)
    out_dirs |= {b for a, b in zip(argv, argv[1:]) if a == "--out-dir"}
    out_dirs.discard(None)
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if proc.info["pid"] == me or not cmd:
            continue
        if cmd == argv or any(a == "--out-dir" and b in out_dirs for a, b in zip(cmd, cmd[1:])) \
                or any(a.startswith("--out-dir=") and a.split("=", 1)[1] in out_dirs for a in cmd):
            return True
    return False


def _recorded_status(run_dir: Path) -> Optional[str]:
    try:
        data = json.loads((run_dir / RUN_RECORD).read_text(encoding="utf-8"))
    except ValueError:
        return None
    return data.get("status") if isinstance(data, dict) else None


def _last_written(*paths: Path) -> Optional[str]:
    """The newest mtime of `paths` (those that exist), in the records' timestamp format."""
    times = []
    for path in paths:
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            pass
    if not times:
        return None
    return datetime.fromtimestamp(max(times)).astimezone().isoformat(timespec="milliseconds")


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log (read from its end: a log may be large)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            data = fh.read()
    except OSError:
        return ""
    from moectl.text import tail_line

    # As the tee keeps a live run's tail: text, each line bounded (a killed run's is read from here).
    return "\n".join(tail_line(line) for line in data.decode("utf-8", errors="replace").splitlines()[-lines:])


def _settle_sweep_leg(sweep_path: Path, run_id: str) -> None:
    """The sweep.json beside a settled run: its leg still `running` with that run becomes
    `interrupted` (the sweep's moectl is the run's, and it is dead)."""
    try:
        sweep = SweepRecord.model_validate_json(sweep_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except ValidationError:
        return  # not ours to repair here: sweep listings report it
    legs = [leg for leg in sweep.legs if leg.run_id == run_id and leg.state == "running"]
    for leg in legs:
        leg.state = "interrupted"
    if legs:
        save_model(sweep_path, sweep)


# --- listing and lookup --------------------------------------------------------------------------


@dataclass
class Scan:
    runs: list[StoredRun] = field(default_factory=list)  # newest first
    corrupt: list[str] = field(default_factory=list)  # one message per unreadable run.json


def _sort_key(rec: RunRecord) -> tuple[float, str]:
    return (parse_time(rec.created_at) or 0.0, rec.id)


def scan_runs(root: Path) -> Scan:
    out = Scan()
    for run_dir in run_dirs(Path(root)):
        try:
            out.runs.append(load_run(run_dir))
        except CorruptRecord as exc:
            out.corrupt.append(exc.message)
    out.runs.sort(key=_sort_key, reverse=True)
    return out


def list_runs(root: Path) -> list[StoredRun]:
    """Every readable run under `root`, newest first (corrupt records skipped: see scan_runs)."""
    return scan_runs(root).runs


def _prefer_ours(tagged: list[StoredRun], ours: Optional[Callable[[Optional[str]], bool]]) -> list[StoredRun]:
    """Runs sharing a tag, this project's first: two repositories writing to one artifact root (the
    default ~/.cache one is shared) both tag a run `base`, and `moectl compare base x` typed in one
    of them means its own, however recent the other's. Only another project's: those."""
    if ours is None or len({r.repo for r in tagged}) < 2:
        return tagged
    return [r for r in tagged if ours(r.repo)] or tagged


def resolve_run(root: Path, ref: str, runs: Optional[Sequence[StoredRun]] = None,
                ours: Optional[Callable[[Optional[str]], bool]] = None) -> StoredRun:
    """A RUN argument (SPEC §4) -> its record.

    Accepts a path to a run directory, a run id, a tag, or a unique prefix of an id or tag. An
    exact id or tag beats any prefix; a tag shared by several runs means the most recent (of this
    project's, when `ours` (moectl.gitops.same_repository) says some are); an ambiguous prefix
    lists its candidates. Pass `runs` (newest first) to resolve many refs with one scan of the store.
    """
    if not ref.strip():
        raise UsageError("an empty RUN: give a run id, a tag, a unique prefix of either, or a run directory")
    as_path = Path(ref).expanduser()
    if (as_path / RUN_RECORD).is_file():
        return load_run(as_path)
    if os.sep in ref:
        raise UsageError(f"not a run directory (no {RUN_RECORD}): {ref}")
    runs = list_runs(root) if runs is None else runs
    same_id = [rec for rec in runs if rec.id == ref]
    if len(same_id) > 1:
        # Two sweeps' legs started in the same second with one tag: one name, two runs. Which one is
        # meant is not ours to guess: their directories tell them apart.
        raise UsageError(f"ambiguous run reference {ref!r}: {len(same_id)} runs have this id; give its directory",
                         lines=[rec.exp_dir for rec in same_id])
    if same_id:
        return same_id[0]
    tagged = [rec for rec in runs if rec.tag == ref]
    if tagged:  # newest first: the most recent run with this tag
        return _prefer_ours(tagged, ours)[0]
    by_id = [r for r in runs if r.id.startswith(ref)]
    id_hits = {r.id for r in by_id}
    by_tag = [r for r in runs if r.tag and r.tag.startswith(ref) and r.id not in id_hits]
    candidates = by_id + by_tag
    if not candidates:
        named = Path(root) / ref
        if ref not in (".", "..") and (named / RUN_RECORD).is_file():  # its record is there but unreadable
            load_run(named)  # raises, saying what is wrong with it
        # A run whose record cannot be read is not "no run": name the unreadable ones it could be.
        unreadable = [run_dir for run_dir in run_dirs(Path(root))
                      if ref in run_dir.name and run_dir.name not in {r.id for r in runs}]
        if unreadable:
            raise UsageError(f"no readable run matches {ref!r} under {root}; unreadable record(s) there that may "
                             "be it (`moectl show <directory>` says what is wrong)", lines=[str(d) for d in unreadable[:20]])
        raise UsageError(f"no run matches {ref!r} under {root}")
    if len(candidates) == 1:
        return candidates[0]
    if not by_id and len({r.tag for r in by_tag}) == 1:
        return _prefer_ours(by_tag, ours)[0]  # a prefix of one tag that several runs share: the most recent
    names = sorted({r.id for r in by_id} | {f"{r.id} (tag {r.tag})" for r in by_tag})
    raise UsageError(f"ambiguous run reference {ref!r}: {len(names)} runs match", lines=names[:20])


def resolve_runs(root: Path, refs: Sequence[str],
                 ours: Optional[Callable[[Optional[str]], bool]] = None) -> list[StoredRun]:
    """Resolve several RUN arguments with a single scan of the store."""
    runs = list_runs(root)
    return [resolve_run(root, ref, runs, ours) for ref in refs]


# --- import --------------------------------------------------------------------------------------


def import_run(
    root: Path,
    project: str,
    name: str,
    steps: Sequence[StepMetrics],
    extras: Optional[dict[str, Any]] = None,
    source: Optional[str] = None,
    repo: Optional[str] = None,
    window: int = 50,
    warmup_steps: int = 0,
) -> RunRecord:
    """Write an existing run's metrics into a fresh run directory with status `imported`.

    `extras` may carry `peak_mem_mib`, `total_time_s`, `world_size`, `planned_steps`, `skipped`
    and `format`. metrics.jsonl is written in the engine's own schema, so an imported run reads
    exactly like a native one. Its run.json is written last: listings show only directories
    holding one, so an import killed midway never shows as a half run (its directory stays, unlisted).
    """
    if not steps:
        raise UsageError("nothing to import: no steps")
    extras = dict(extras or {})
    root = Path(root).expanduser()
    ensure_dir(root)  # (a file there: named, not `[Errno 17] File exists`)
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
    imported = MetricsFile(steps=list(steps), summary=summary_line)
    summary: Summary = tail_summary(imported, window, warmup_steps)
    diverged = loss_warning(imported)  # as a live run's record says it (`runs` marks it, `show` prints it)

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
        repo=repo,
        options={k: extras[k] for k in ("format", "planned_steps") if extras.get(k) is not None},
        warnings=list(extras.get("warnings") or []) + ([diverged] if diverged else []),
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
