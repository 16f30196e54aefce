"""Where a run executes: a local process (runner.execute_run) or a Slurm job. One seam for `run`,
`sweep`, `wait` and `cancel`; guards, records, report and commit are the same code either way.

    backend = choose_backend(cfg, slurm_flag)        # "local" | "slurm" ([cluster] backend, --slurm)
    outcome = submit_run(cfg, request, JobOptions(nodes=2))   # Slurm: guards here, the rest in the job
    final = follow(outcome.record, progress)         # what `run --slurm` does unless --detach
    code = wait_for([...records], timeout_s)         # `moectl wait`
    cancel_runs([...records])                        # `moectl cancel`

A Slurm run, step by step:
1. Guards on the submitting machine: config, git, venv, paths, fresh_dir, disk. gpus_idle and the
   run lock are the node's business (moectl/job.py checks them inside the job, on the GPUs Slurm
   allocated); here they read `skipped`. A refusal submits nothing and writes nothing.
2. The fresh run directory, command.txt, git.diff, and the code snapshot `code/` (HEAD + git.diff,
   gitops.snapshot_code): the job runs that, not the working tree of hours later.
3. job.json (the config, plan and job options the job needs) and job.sh (the sbatch script).
4. run.json `queued`, then sbatch --hold, run.json gets the job id (`released` false), then
   scontrol release, then `released` true (see moectl/slurm.py for why in that order). A job Slurm
   rejects leaves the run `failed` with Slurm's message - never `queued` forever; so does a moectl
   killed between sbatch and release: the first `wait` (or follower) that finds the job still held
   and its submitter gone cancels it (`settle_abandoned_hold`). A Slurm sweep releases its legs
   itself (JobOptions.release), once all of them and its report job are queued (sweep.cluster).
5. The job (moectl/job.py) writes `running`, trains, writes the end, the report and its commit.
   Here we only read: run.json and metrics.jsonl for progress, Slurm for whether the job lives.

A run is settled when its record is final AND Slurm no longer has its job live: a job on its way
to a requeue is SIGTERMed like a cancelled one, and only after its record says so does it go back
to `queued` (moectl/job.py); its job stays in the queue throughout, so nobody takes it for the end.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional, Sequence

from pydantic import BaseModel

from moectl import gitops, slurm, store
from moectl.config import Config, MoectlFile
from moectl.errors import (
    EXIT_GUARD, EXIT_INTERRUPTED, EXIT_OK, EXIT_TRAINING, EXIT_USAGE, GuardRefused, MoectlError, UsageError,
)
from moectl.guards import check_request, passed
from moectl.plan import RunPlan, RunRequest
from moectl.progress import MetricsFollower, NullProgress, ProgressSink
from moectl.records import UNSETTLED, GuardResult, RunRecord, save_model, write_text_atomic

JOB_SPEC = "job.json"
JOB_SCRIPT = "job.sh"
CODE_DIR = "code"
# Guards that only mean something on the node that trains: checked inside the job (moectl/job.py).
JOB_GUARDS = ("gpus_idle", "no_other_training")
POLL_S = 1.0
# An imported run is settled and measured: `wait` on it (or on a group holding it) is 0, not "training failed".
EXIT_OF_STATUS = {"completed": EXIT_OK, "imported": EXIT_OK, "failed": EXIT_TRAINING, "refused": EXIT_GUARD,
                  "interrupted": EXIT_INTERRUPTED}


def choose_backend(cfg: Config, slurm_flag: bool) -> str:
    return "slurm" if slurm_flag or cfg.cluster.backend == "slurm" else "local"


@dataclass
class JobOptions:
    nodes: Optional[int] = None  # None: [cluster] nodes
    requeue: bool = False
    commit: bool = True  # the job commits its report (run --no-commit: False)
    dependency: Optional[str] = None  # sbatch --dependency (sweeps: at most K legs in flight)
    # run --baseline: the job's report compares against it (one run, or a repeat group's completed runs)
    baseline: "Optional[RunRecord | list[RunRecord]]" = None
    summary: bool = True  # refresh EXPERIMENTS.md with the report ([report] summary)
    # launch.compile_fallback inside the job (moectl.job): sweep legs, --detach, repeat groups; a
    # followed single `run --slurm` re-submits the --compile none run from its follower instead.
    fallback_in_job: bool = False
    # ... and that re-run trains the failed run's code snapshot (and records its git state), not
    # the working tree as it is by then (SPEC §11: the job runs the code taken at submit).
    code_of: Optional[RunRecord] = None
    # False: the job is left held (`released` false) for the caller to let go with release_run - a
    # sweep, once every leg and its report job are queued (sweep.cluster.submit_sweep).
    release: bool = True


class ConfigSnapshot(BaseModel):
    """The resolved config as the submitter had it (a job must not re-read a config edited since)."""

    config: dict
    config_path: Optional[str]
    root: str
    artifact_root: str
    report_dir: str
    read_only: list[str]
    python: str

    @staticmethod
    def fields_of(cfg: Config) -> dict:
        return dict(config=cfg.file.model_dump(mode="json", exclude_unset=True),
                    config_path=str(cfg.path) if cfg.path else None, root=str(cfg.root),
                    artifact_root=str(cfg.artifact_root), report_dir=str(cfg.report_dir),
                    read_only=[str(p) for p in cfg.read_only], python=str(cfg.python))

    def to_config(self) -> Config:
        return Config(file=MoectlFile.model_validate(self.config), path=Path(self.config_path) if self.config_path else None,
                      root=Path(self.root), artifact_root=Path(self.artifact_root), report_dir=Path(self.report_dir),
                      read_only=[Path(p) for p in self.read_only], python=Path(self.python))

    @classmethod
    def load(cls, run_dir: Path):
        return cls.model_validate_json((Path(run_dir) / JOB_SPEC).read_text(encoding="utf-8"))


class JobSpec(ConfigSnapshot):
    """Everything a run's job needs, frozen at submit time (`<run dir>/job.json`)."""

    plan: RunPlan
    nodes: int
    rdzv_port: int
    requeue: bool
    commit: bool
    summary: bool
    baseline: Optional[str] = None  # the run directory the report compares against (run --baseline) ...
    baseline_group: list[str] = []  # ... or, for a repeat group, every completed repeat's directory
    request: Optional[RunRequest] = None  # what was asked: a compile fallback in the job re-plans from it
    fallback_in_job: bool = False  # JobOptions.fallback_in_job


@dataclass
class Submitted:
    exit_code: int  # EXIT_OK once submitted; EXIT_GUARD when a submit-side guard refused
    plan: RunPlan
    guards: list[GuardResult]
    record: Optional[RunRecord] = None  # None when refused (nothing written)


def deferred_to_job(results: list[GuardResult]) -> list[GuardResult]:
    """The submit-side verdicts: the guards that belong to the node become `skipped` (pure)."""
    out = []
    for r in results:
        if r.name in JOB_GUARDS:
            r = GuardResult(name=r.name, ok=True, skipped=True, overridable=r.overridable,
                            message="checked inside the Slurm job, on the node it runs on")
        out.append(r)
    return out


def submit_run(cfg: Config, request: RunRequest, options: JobOptions, *, sweep_id: Optional[str] = None,
               now: Optional[datetime] = None, on_queued: Optional[Callable[[RunRecord], None]] = None) -> Submitted:
    """Steps 1-4 of the module docstring. Raises UsageError when Slurm is missing or rejects the job
    (the run is then recorded `failed` with Slurm's message). `on_queued` runs once the record names
    the job and before the job is released (a sweep records the leg's run there)."""
    from moectl.runner import new_record, write_run_files

    slurm.require()
    nodes = options.nodes if options.nodes is not None else cfg.cluster.nodes
    if nodes < 1:
        raise UsageError(f"--nodes: must be at least 1 (got {nodes})")
    plan, obs, results = check_request(cfg, request, now, nodes=nodes, data_here=False)
    results = deferred_to_job(results)
    if not passed(results):
        return Submitted(exit_code=EXIT_GUARD, plan=plan, guards=results)

    base_runs = [options.baseline] if isinstance(options.baseline, RunRecord) else list(options.baseline or [])
    run_dir = Path(plan.exp_dir)
    try:
        store.create_run_dir(run_dir)
    except MoectlError as exc:  # appeared since the fresh_dir guard looked: still a refusal
        raise GuardRefused(exc.message) from None
    record = new_record(plan, obs, results, sweep_id=sweep_id, status="queued", repo=cfg.root)
    record.backend, record.nodes = "slurm", nodes
    try:
        write_run_files(cfg, plan, cwd=run_dir / CODE_DIR)  # the job runs from the code snapshot
        code_dir = run_dir / CODE_DIR
        if options.code_of is not None:  # the very code (and diff) of the run this one re-runs
            import shutil

            earlier = Path(options.code_of.exp_dir)
            shutil.copytree(earlier / CODE_DIR, code_dir, symlinks=True)
            if (earlier / "git.diff").is_file():
                shutil.copyfile(earlier / "git.diff", plan.files["git.diff"])
            record.git = options.code_of.git.model_copy()
        else:
            gitops.snapshot_code(cfg.root, obs.git.head or "HEAD", Path(plan.files["git.diff"]), code_dir)
            _ignored_script_into(cfg, code_dir)
        spec = JobSpec(
            **ConfigSnapshot.fields_of(cfg), plan=plan, nodes=nodes,
            rdzv_port=cfg.cluster.rdzv_port, requeue=options.requeue,
            commit=options.commit and not plan.no_commit, summary=options.summary,
            baseline=base_runs[-1].exp_dir if base_runs else None,
            baseline_group=[r.exp_dir for r in base_runs] if len(base_runs) > 1 else [],
            request=request, fallback_in_job=options.fallback_in_job,
        )
        save_model(run_dir / JOB_SPEC, spec)
        script = run_dir / JOB_SCRIPT
        write_text_atomic(script, slurm.batch_script(run_id=plan.run_id, run_dir=run_dir, code_dir=code_dir,
                                                    python=plan.python, cluster=cfg.cluster, nodes=nodes,
                                                    requeue=options.requeue))
        store.save_run(record)
        record.job_id = slurm.submit(script, dependency=options.dependency)
        record.released = False
        store.save_run(record)
        if on_queued is not None:
            on_queued(record)
        if options.release:
            release_run(record)
    except BaseException as exc:
        # Nothing runs this run now (or the job was never let go): say so, never `queued` forever.
        if record.job_id is not None:
            try:
                slurm.cancel([record.job_id])
            except MoectlError:
                pass
        record.status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        record.finished_at = store.now_iso()
        if isinstance(exc, KeyboardInterrupt):
            record.error = ("interrupted while it was submitted; its job was cancelled before it started" if record.job_id
                            else "interrupted before it was submitted")
        else:
            record.error = exc.message if isinstance(exc, MoectlError) else f"moectl: {type(exc).__name__}: {exc}"
        store.save_run(record)
        if record.sweep:  # the sweep's leg says so too, naming this run (it stayed `pending`, the run orphaned)
            from moectl.sweep.store import update_leg

            try:
                update_leg(Path(record.exp_dir).parent, record.status, run_id=record.id, tag=record.tag)
            except MoectlError:
                pass
        raise
    return Submitted(exit_code=EXIT_OK, plan=plan, guards=results, record=record)


def release_run(record: RunRecord) -> None:
    """Let the run's job go (`scontrol release`: held since sbatch), then record `released` true."""
    slurm.release(record.job_id)
    # The job may be writing `running` by now: only this field changes, under the record's lock
    # (the job takes it for that write, moectl/job.py).
    store.update_run(record, lambda rec: setattr(rec, "released", True))


# --- observing a submitted run -------------------------------------------------------------------


def read_record(run_dir: Path) -> RunRecord:
    """run.json as written (no stale settling: that asks Slurm; callers here ask it themselves)."""
    return RunRecord.model_validate_json((Path(run_dir) / "run.json").read_text(encoding="utf-8"))


def save_run_and_leg(record: RunRecord) -> None:
    """run.json (under the record's lock: store.update_run's read-modify-writes never interleave
    with it), and the state of its leg in the sweep.json beside it (under the sweep's lock)."""
    with store.record_lock(Path(record.exp_dir)):
        store.save_run(record)
    save_leg(record)


def job_live(record: RunRecord) -> Optional[bool]:
    """Is the run's Slurm job still pending or running? None when Slurm cannot be asked."""
    return _ask_slurm(record)[0]


def _ask_slurm(record: RunRecord, deadline: Optional[float] = None) -> tuple[Optional[bool], Optional[slurm.JobInfo]]:
    """(job_live, what Slurm said of the job): one scontrol call for a poll that needs both. No
    answer by `deadline` (a waiting command's own, monotonic) is no answer: (None, None)."""
    if record.job_id is None:
        return False, None
    try:
        with slurm.answering_by(deadline):
            info = slurm.job_info(record.job_id)
    except MoectlError:
        return None, None
    return info is not None and info.live, info


def settled(record: RunRecord) -> bool:
    """Final record and no live job (a requeued job's record goes back to `queued`, and its job
    stays live, so an `interrupted` written on the way to a requeue is not taken as the end)."""
    return record.status not in UNSETTLED and job_live(record) is False


def gone_job_end(status: str, job_id: Optional[str], info: Optional[slurm.JobInfo]) -> tuple[str, str]:
    """(the state, the error) of a run whose job is gone while its record says `status` (pure;
    `info`, what Slurm still says of the job). A job that ended before moectl started in it failed
    to start, unless Slurm says it was CANCELLED: an scancel of the pending job, or `moectl cancel`
    of a sweep whose report job settled the leg first - cancelled before it started, `interrupted`
    as every cancelled run. A job that did start was killed before moectl wrote the end: `interrupted`."""
    how = f" ({info.state}, exit {info.exit_code})" if info is not None else ""
    if status != "queued":
        return "interrupted", f"Slurm job {job_id} ended{how} without moectl recording its end"
    if info is not None and info.state == "CANCELLED":
        return "interrupted", f"Slurm job {job_id} was cancelled{how} before moectl started in it"
    if info is None:  # forgotten by the controller, and no accounting to ask: say what is not known
        return "failed", (f"Slurm job {job_id} ended before moectl started in it, and Slurm no longer knows how "
                          "(cancelled, or failed to start; it keeps a finished job MinJobAge seconds)")
    return "failed", f"Slurm job {job_id} ended{how} before moectl started in it"


def _job_info_or_none(job_id: Optional[str]) -> Optional[slurm.JobInfo]:
    """What the controller says of the job, or - forgotten past MinJobAge - the accounting."""
    try:
        info = slurm.job_info(job_id) if job_id else None
    except MoectlError:
        return None
    return info if info is not None or not job_id else slurm.accounted_end(job_id)


NEVER_STARTS_PREFIX = "Slurm will never start job"


def settle_unstartable(record: RunRecord, info: Optional[slurm.JobInfo]) -> Optional[RunRecord]:
    """A queued run whose job Slurm accepted but will never start as asked (`info`, what Slurm said
    of it: slurm.never_starts - more nodes than the partition has, memory no node has): its job
    cancelled and the record `failed` saying why - instead of a follower and `wait` waiting on it
    forever. None while the job may still start."""
    why = slurm.never_starts(info) if record.status == "queued" else None
    if why is None:
        return None
    try:
        slurm.cancel([record.job_id])
    except MoectlError:
        return None
    current = read_record(Path(record.exp_dir))
    if current.status != "queued":
        return current
    current.status, current.finished_at = "failed", store.now_iso()
    current.error = (f"{NEVER_STARTS_PREFIX} {record.job_id} as asked: {why}; it was cancelled - ask for what "
                     "the cluster has ([cluster] in .moectl.toml, --nodes)")
    save_run_and_leg(current)
    return current


def settle_abandoned_hold(record: RunRecord, info: Optional[slurm.JobInfo]) -> Optional[RunRecord]:
    """A queued run whose job is still held since its submission, its submitting moectl dead before
    `scontrol release` (runindex.abandoned_hold): its job cancelled and the record `interrupted`,
    saying so. None while that is not the case.

    Cancelled, not released: the submission was interrupted (as a Ctrl-C there ends, submit_run),
    and SPEC §6 ends a killed moectl's run `interrupted`. Releasing it would start, unasked and
    perhaps hours later, a run nobody saw submitted - a sweep leg whose sweep never got its other
    legs or its report job; `sweep --resume` reruns an interrupted leg, and a run is one command away."""
    from moectl.runindex import abandoned_hold

    if not abandoned_hold(record.status, record.released, record.pid, record.host, record.created_at, info):
        return None
    try:
        slurm.cancel([record.job_id])
    except MoectlError:
        return None
    run_dir = Path(record.exp_dir)
    with store.record_lock(run_dir):
        current = read_record(run_dir)
        if current.status != "queued" or current.released is not False:
            return current
        current.status, current.finished_at = "interrupted", store.now_iso()
        current.error = (f"interrupted while it was submitted: the moectl that submitted it (pid {record.pid} on "
                         f"{record.host}) was gone before it released Slurm job {record.job_id}, held since "
                         "sbatch; the job was cancelled before it started")
        store.save_run(current)
    save_leg(current)
    return current


def save_leg(record: RunRecord) -> None:
    """The state of a sweep leg's run in the sweep.json beside it (save_run_and_leg's second half:
    taken outside the record's lock, which a sweep's report job takes inside the sweep's)."""
    if record.sweep:
        from moectl.sweep.store import update_leg

        update_leg(Path(record.exp_dir).parent, record.status, run_id=record.id)


def exit_code_of_record(record: RunRecord) -> int:
    """SPEC §8 for one settled run: what it asked of Slurm never could start is a usage error (2)."""
    if record.status == "failed" and (record.error or "").startswith(NEVER_STARTS_PREFIX):
        return EXIT_USAGE
    if getattr(record, "stale", False):  # its moectl died: it ends `interrupted`, whoever writes that
        return EXIT_INTERRUPTED
    return EXIT_OF_STATUS.get(record.status, EXIT_TRAINING)


def settle_gone_job(record: RunRecord) -> RunRecord:
    """A run whose job is gone while its record says queued/running: `failed` if it never started
    (a job that failed to start), `interrupted` if it was cancelled before it started or if it did
    start (killed past KillWait) - `gone_job_end`. Written once, under the record's lock: the job's
    moectl may be writing the run's end just now, on a node Slurm lost (NODE_FAIL) where it ran on
    (moectl/job.py: that end then stands, saying what was settled before it)."""
    info = _job_info_or_none(record.job_id)
    run_dir = Path(record.exp_dir)
    with store.record_lock(run_dir):
        current = read_record(run_dir)
        if current.status not in UNSETTLED:
            return current
        status, error = gone_job_end(current.status, current.job_id, info)
        tail = store.log_tail(run_dir / f"slurm-{current.job_id}.out", 10)
        current.status, current.error = status, error + (f"\n{tail}" if tail else "")
        current.finished_at = store.now_iso()
        if current.status == "interrupted":
            _summarise_what_ran(current)
        store.save_run(current)
    save_leg(current)
    return current


def follow(record: RunRecord, progress: Optional[ProgressSink] = None,
           timeout_s: Optional[float] = None, on_state: Optional[Callable[[RunRecord], None]] = None) -> RunRecord:
    """Feed the run's metrics to `progress` until it settles; return its final record. Raises
    TimeoutError when `timeout_s` passes first (the job keeps running). `on_state` sees each new status."""
    progress = progress or NullProgress()
    run_dir = Path(record.exp_dir)
    follower = MetricsFollower(run_dir / "metrics.jsonl")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last_status = None
    gone_since: Optional[float] = None
    try:
        while True:
            for rec in follower.poll():
                progress.record(rec)
            current = read_record(run_dir)
            # (A requeue the poll missed goes running -> running: its restart count tells.)
            if (current.status, current.restarts) != last_status:
                last_status = (current.status, current.restarts)
                if on_state is not None:
                    on_state(current)
            live, info = _ask_slurm(current, deadline)
            unstartable = settle_unstartable(current, info) or settle_abandoned_hold(current, info)
            if unstartable is not None:
                return unstartable
            if current.status not in UNSETTLED and live is False:
                for rec in follower.poll(final=True):
                    progress.record(rec)
                return current
            if current.status in UNSETTLED and live is False:
                # The job wrote nothing final and is gone; give a record written just as the
                # job ended one more look before calling it.
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > 3 * POLL_S:
                    return settle_gone_job(current)
            else:
                gone_since = None
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(current.id)
            time.sleep(POLL_S)
    finally:
        follower.close()


def exit_code_of(records: Sequence[RunRecord]) -> int:
    """`wait`'s exit code: the worst of the runs (interrupted > refused > failed > completed)."""
    codes = [exit_code_of_record(r) for r in records]
    for code in (EXIT_INTERRUPTED, EXIT_GUARD, EXIT_USAGE, EXIT_TRAINING):
        if code in codes:
            return code
    return EXIT_OK


def wait_for(records: Sequence[RunRecord], timeout_s: Optional[float] = None) -> list[RunRecord]:
    """Block until every run settles (local runs: their moectl writes the end; Slurm runs: as
    `follow`). A failed run whose job went on to its `--compile none` re-run (a sweep leg, a
    detached or repeat run: moectl.job) ends as that re-run. Raises TimeoutError naming the runs still going."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    # Keyed by directory: a run id is unique within its directory only (two sweeps started in one
    # second give their legs the same ids), and waiting on both sweeps waits on all their runs.
    pending = {run_key(r): r for r in records}
    done: dict[str, RunRecord] = {}
    while True:
        for key, rec in list(pending.items()):
            current = _settle_once(rec, deadline)
            if current is None:
                continue
            stand_in = compile_fallback_of(current)
            if stand_in is not None:  # its job re-ran it with --compile none: that run's end is its end
                pending[key] = stand_in
                continue
            done[key] = current
            del pending[key]
        if not pending:
            final = [done[run_key(r)] for r in records]
            seen: set[str] = set()  # a failed leg and its fallback leg, both asked for: the fallback once
            return [r for r in final if not (run_key(r) in seen or seen.add(run_key(r)))]
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(", ".join(sorted(r.id for r in pending.values())))
        time.sleep(POLL_S)


def run_key(record: RunRecord) -> str:
    """What tells two runs apart: their directory (ids repeat across sweep directories)."""
    return os.path.realpath(record.exp_dir)


def compile_fallback_of(record: RunRecord) -> Optional[RunRecord]:
    """The `--compile none` re-run a Slurm job made of this failed run (moectl.job), if any."""
    if record.status != "failed" or not record.fallback_run:
        return None
    try:
        return read_record(Path(record.exp_dir).parent / record.fallback_run)
    except (OSError, ValueError, MoectlError):
        return None


def _settle_once(record: RunRecord, deadline: Optional[float] = None) -> Optional[RunRecord]:
    """The final record when the run has settled, else None (one look; Slurm's answer by `deadline`)."""
    run_dir = Path(record.exp_dir)
    if record.backend != "slurm":
        current = store.load_run(run_dir)  # settles a local run whose moectl died
        if current.status not in UNSETTLED:
            return current
        # Its moectl is dead but a process of its training still runs (stopping within seconds of
        # that death, by PDEATHSIG): not settled yet, the next look settles it `interrupted`. Stale
        # with nothing left alive, only a store this process cannot write keeps it so: it is over.
        return current if current.stale and not current.stopping else None
    current = read_record(run_dir)
    live, info = _ask_slurm(current, deadline)
    unstartable = settle_unstartable(current, info) or settle_abandoned_hold(current, info)
    if unstartable is not None:
        return unstartable
    if live is None:
        return None
    if current.status not in UNSETTLED and not live:
        return current
    if current.status in UNSETTLED and not live:
        time.sleep(POLL_S)  # a record written as the job ended: one more look
        again = read_record(run_dir)
        return again if again.status not in UNSETTLED else settle_gone_job(again)
    return None


def cancel_runs(records: Sequence[RunRecord], timeout_s: float = 60.0) -> list[RunRecord]:
    """scancel the runs' jobs and wait for each to settle. A job cancelled while still pending never
    ran moectl, so its record is ended here: `interrupted`, cancelled before it started."""
    records = [_stand_in(r) for r in records]  # a job gone on to its --compile none re-run: cancel that
    jobs = [r for r in records if r.backend == "slurm" and r.job_id and r.status in UNSETTLED]
    local = [r.id for r in records if r.backend != "slurm" and r.status in UNSETTLED]
    if local:
        raise UsageError(f"not a Slurm run: {', '.join(local)} (stop a local run with Ctrl-C in its terminal)")
    slurm.cancel([r.job_id for r in jobs])
    out = []
    deadline = time.monotonic() + timeout_s
    for rec in jobs:
        while True:
            current = read_record(Path(rec.exp_dir))
            live = job_live(current)
            if live is False:
                if current.status in UNSETTLED:
                    current = _end_cancelled(current)
                out.append(current)
                break
            if time.monotonic() > deadline:
                raise MoectlError(f"Slurm job {rec.job_id} of {rec.id} still runs {timeout_s:.0f} s after scancel")
            time.sleep(POLL_S)
    return out


def _stand_in(record: RunRecord) -> RunRecord:
    """The run that stands for `record` now: its compile-fallback re-run's (and so on), or itself."""
    seen = {run_key(record)}
    while (fallback := compile_fallback_of(record)) is not None and run_key(fallback) not in seen:
        seen.add(run_key(fallback))
        record = fallback
    return record


def _end_cancelled(record: RunRecord) -> RunRecord:
    time.sleep(POLL_S)  # the job's own `interrupted` may be on its way
    run_dir = Path(record.exp_dir)
    with store.record_lock(run_dir):  # (and written once: see settle_gone_job)
        current = read_record(run_dir)
        if current.status not in UNSETTLED:
            return current
        # Queued again after a requeue, it had trained already: what it trained is summarised.
        started = current.status == "running" or bool(current.restarts)
        current.status = "interrupted"
        current.finished_at = store.now_iso()
        current.error = f"cancelled (scancel {current.job_id})" + ("" if started else " before it started")
        if started:
            _summarise_what_ran(current)
        store.save_run(current)
    save_leg(current)
    return current


def _summarise_what_ran(record: RunRecord) -> None:
    """A run whose job's moectl was killed before it wrote the end (a trainer slow to stop outlasts
    Slurm's KillWait, the OOM killer): what it trained is still summarised, as SPEC §6 wants of an
    interrupted run."""
    from moectl.metrics import read_metrics

    metrics = read_metrics(Path(record.exp_dir) / "metrics.jsonl")
    if metrics.steps and record.summary is None:
        store.apply_metrics(record, metrics, record.window or 50, record.warmup_steps or 0)


def _ignored_script_into(cfg: Config, code_dir: Path) -> None:
    """A git-ignored `[launch] script` inside the repository is in no commit and no diff, so the
    snapshot lacks it and the job would not find it: copied to its place there (a script outside
    the repository runs from where it is)."""
    import shutil

    from moectl.trainer import script_path

    script = script_path(cfg.launch, cfg.root)
    if script is None:
        return
    try:
        rel = script.resolve().relative_to(cfg.root.resolve())
    except ValueError:
        return
    there = code_dir / rel
    if not there.exists() and script.is_file():
        there.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(script, there)
