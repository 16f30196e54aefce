"""The run store's read path without the record models: where runs live, whether their owner is
alive, and every record as `runs --json` prints it (SPEC §6, §7a).

moectl/store.py holds the pydantic records and everything that writes them; this module is what
`status` and `runs --json` need, in the standard library only. `scan_run_json` reads each run.json,
takes its validated form from the memo of this artifact root (moectl/validated.py) when the bytes
were validated before, and hands every run that needs more than reading to store.py:

- bytes never validated: validated now (pydantic), then remembered;
- a record that does not validate: store.py's error message, the run skipped as `corrupt`;
- a run whose owner is gone (stale): store.py settles it (or shows it `stale`) as it always did.

So the output is exactly `[run_json(r) for r in store.scan_runs(root).runs]` — a test holds the two
equal — and a store whose records were all seen before is listed without importing pydantic.
"""
from __future__ import annotations

import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Optional

from moectl.atomic import read_regular_bytes

RUN_RECORD = "run.json"
SWEEP_RECORD = "sweep.json"
# A run in one of these may still change; the others are final.
UNSETTLED = ("created", "queued", "running")
# A pid is "the same process" only if it started no later than this after the record was made.
# Records carry second-precision times, so allow for rounding plus clock jitter.
PID_REUSE_SLACK_S = 2.0


def run_dirs(root: Path) -> Iterable[Path]:
    """Top-level run directories, and the leg directories of sweep directories (one level down)."""
    try:
        children = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        from moectl.errors import UsageError

        raise UsageError(f"artifact_root {root} is not a directory (MOECTL_ARTIFACT_ROOT or [paths] artifact_root)") from None
    for entry in children:
        if entry.name.startswith("."):
            continue
        try:
            if not entry.is_dir():
                continue
        except OSError:  # a symlink loop: no directory, so no run (one stray link must not stop a listing)
            continue
        path = Path(entry.path)
        try:
            is_run = (path / RUN_RECORD).exists()
            legs = sorted(path.iterdir()) if not is_run and (path / SWEEP_RECORD).exists() else []
        except OSError:  # cannot look inside (no permission): listed, so that reading its record says why
            yield path
            continue
        if is_run:
            yield path
        for leg in legs:
            try:
                if leg.is_dir() and (leg / RUN_RECORD).exists():
                    yield leg
            except OSError:
                yield leg


def parse_time(text: Optional[str]) -> Optional[float]:
    if not text:
        return None
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # naive: local time
    return dt.timestamp()


def owner_gone(status: str, pid: Optional[int], host: Optional[str], started_at: Optional[str],
               created_at: Optional[str], backend: str = "local", job_id: Optional[str] = None,
               this_host: Optional[str] = None, released: Optional[bool] = None) -> bool:
    """Is this `created`/`queued`/`running` run's owner gone? Its pid is dead (or a zombie), or the
    pid now belongs to a process that started after the run did (pid reuse). Runs owned by another
    host, or with no recorded pid, cannot be judged from here and are taken at their word. A Slurm
    run's owner is its job: gone once Slurm has no live job by that id, or once nobody will ever
    release the job it holds since submission (`abandoned_hold`)."""
    if backend == "slurm" and job_id is not None:
        if status not in UNSETTLED:
            return False
        answered, info = _slurm_job(job_id)
        return answered and (info is None or not info.live
                             or abandoned_hold(status, released, pid, host, created_at, info, this_host))
    if status not in UNSETTLED or pid is None:
        return False
    if host and host != (this_host or socket.gethostname()):
        return False
    import psutil  # only here: listing settled runs never pays for it

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        started = proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True
    except psutil.Error:
        return False  # access denied: it exists; assume it is ours
    recorded = parse_time(started_at) or parse_time(created_at)
    return recorded is not None and started > recorded + PID_REUSE_SLACK_S


# A controller that did not answer, by the cluster asked (SLURM_CONF) -> until when it is not asked
# again about another run's job. A slurmctld that is down makes each scontrol retry for 18 s, and
# `runs`, `status` and `wait` look at every queued or running Slurm run of the store: one silence
# is enough to take all of their records at their word.
_SLURM_SILENCE_S = 60.0
_slurm_silent_until: dict[Optional[str], float] = {}
# Clusters asked `scontrol ping` (milliseconds, down or up) before this process's first job query:
# a down controller is then known at once, not after scontrol's 18 s of retries (per command: each
# `runs`, `show`, `status` is a process of its own).
_slurm_pinged: set[Optional[str]] = set()


# Slurm's pending reason for a job held by its owner: `sbatch --hold` (moectl's submission) or `scontrol hold`.
HELD_BY_USER = "JobHeldUser"


def abandoned_hold(status: str, released: Optional[bool], pid: Optional[int], host: Optional[str],
                   created_at: Optional[str], info: Any, this_host: Optional[str] = None) -> bool:
    """Is this queued run's job held since its submission by a moectl that died before `scontrol
    release` (SIGKILL between the two, moectl/execution.py step 4)? Nobody will ever let it go: it
    would sit in the queue, and the run show `queued`, for ever. The record says it was not released
    (None, an older record: not judged), Slurm says the job is pending on a user hold (`info`, its
    slurm.JobInfo), and the submitter - the record's pid and host until the job writes its own - is
    gone. A job the person held on purpose after its release is left alone (released True); so is one
    whose submitter ran on another host, which cannot be judged from here (taken at its word)."""
    return (status == "queued" and released is False and info is not None and info.state == "PENDING"
            and info.reason == HELD_BY_USER
            and owner_gone(status, pid, host, None, created_at, this_host=this_host))


def _slurm_job(job_id: str) -> tuple[bool, Any]:
    """(whether Slurm answered, what it said of the job: slurm.JobInfo, None when it knows none).
    Where Slurm cannot be asked (no controller, not a Slurm host) the record is taken at its word."""
    import time

    from moectl import slurm
    from moectl.errors import MoectlError

    if slurm.available() is not None:
        return False, None
    cluster = os.environ.get("SLURM_CONF")
    if cluster not in _slurm_pinged:
        _slurm_pinged.add(cluster)
        if slurm.controller_problem() is not None:
            _slurm_silent_until[cluster] = time.monotonic() + _SLURM_SILENCE_S
    if time.monotonic() < _slurm_silent_until.get(cluster, 0.0):
        return False, None
    try:
        info = slurm.job_info(job_id)
    except MoectlError:
        _slurm_silent_until[cluster] = time.monotonic() + _SLURM_SILENCE_S
        return False, None
    return True, info


def _validated(text: bytes) -> Optional[dict[str, Any]]:
    """run.json's bytes as the record model reads and dumps them, or None when they do not validate."""
    from pydantic import ValidationError

    from moectl.store import StoredRun

    try:
        return StoredRun.model_validate_json(text).model_dump(mode="json")
    except ValidationError:
        return None


def scan_run_json(root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every readable run under `root` as `runs --json` prints it (run.json; `status` shown as
    `stale` for a dead owner, the recorded one then in `recorded_status`), newest first, and one
    message per unreadable record. The same as store.scan_runs + store.run_json, by construction."""
    from moectl.validated import Memo, digest

    root = Path(root)
    memo = Memo(f"runs-{digest(str(root.absolute()))}")
    runs: list[dict[str, Any]] = []
    corrupt: list[str] = []
    for run_dir in run_dirs(root):
        data = None
        try:
            text = read_regular_bytes(run_dir / RUN_RECORD)
        except OSError:
            text = None  # store.load_run words the error
        if text is not None:
            data = memo.get(text)
            if data is None:
                data = _validated(text)
                if data is not None:
                    memo.put(text, data)
        if data is not None:
            data = dict(data, exp_dir=str(run_dir.resolve()))  # the directory is the truth (moved runs)
            if not owner_gone(data["status"], data["pid"], data["host"], data["started_at"], data["created_at"],
                              data["backend"], data["job_id"], released=data.get("released")):
                runs.append(data)
                continue
        # Not readable, not valid, or its owner is gone: the store reads it (and settles it).
        from moectl.store import CorruptRecord, load_run, run_json

        try:
            runs.append(run_json(load_run(run_dir)))
        except CorruptRecord as exc:
            corrupt.append(exc.message)
    memo.save()
    runs.sort(key=lambda r: (parse_time(r["created_at"]) or 0.0, r["id"]), reverse=True)
    return runs, corrupt
