"""`moectl sweep --slurm`: every leg a Slurm job, at most K in flight, the final report a job of its own.

    outcome = submit_sweep(cfg, sweep, opts, max_parallel=2, ui=ui)   # returns once all are queued

1. Guards for the first leg on this machine (as `run --slurm`: the node's guards run in each job);
   a refusal writes nothing.
2. The sweep directory and sweep.json (legs `pending`), then one `execution.submit_run` per leg,
   its job left held. Leg i waits for leg i-K (`--dependency=afterany:<job of leg i-K>`): Slurm
   keeps at most K legs in flight, nobody has to stay at a terminal to start the next one.
3. One more job, `python -m moectl.job --sweep SWEEP_DIR`, with `--dependency=afterany:` every leg:
   when the last leg settles it writes the comparison, recommendation, figures, sweep report and
   EXPERIMENTS.md and commits them (`finish_sweep_job`, the same `finish_sweep` as a local sweep).
4. Only then are the legs released (`scontrol release`, each run's `released` true). A submitter
   killed before that leaves held legs only, with no report job or with one that waits for them:
   as for a single run (execution.settle_abandoned_hold) the next `wait` or `sweep --resume` cancels
   each and settles it `interrupted`, and the resume runs it again. Released at once instead, the
   legs of a half-submitted sweep ran on with no report job after them, and no report was written.

sweep.json has many writers here (the submitter, every leg's job, the final job), so each change
is a read-modify-write under the sweep's lock (sweep.store.locked_sweep). Each leg's job commits
its own run report; several finishing together commit one after another (gitops' compare-and-swap
on the branch ref retries after re-reading HEAD), so none is lost.
"""
from __future__ import annotations

import os
import shlex
import socket
from pathlib import Path
from typing import Optional

from moectl import slurm, store
from moectl.config import Config
from moectl.errors import EXIT_GUARD, EXIT_INTERRUPTED, EXIT_OK, MoectlError
from moectl.execution import (
    ConfigSnapshot, JobOptions, deferred_to_job, exit_code_of, read_record, release_run, settle_abandoned_hold,
    settle_gone_job, submit_run,
)
from moectl.guards import check_request, passed
from moectl.records import UNSETTLED, RunRecord, SweepRecord, write_text_atomic
from moectl.sweep.report import claim_sweep_report
from moectl.sweep.run import (
    SweepOptions, SweepOutcome, SweepUI, _create_sweep_dir, _leg_notes, finish_sweep, leg_request, refuse_unplannable_legs,
)
from moectl.sweep.store import load_sweep, locked_sweep, save_sweep, settled, update_leg

SWEEP_JOB_SPEC = "sweep_job.json"
SWEEP_JOB_SCRIPT = "sweep_job.sh"


class SweepJobSpec(ConfigSnapshot):
    """What the final report job needs (`<sweep dir>/sweep_job.json`)."""

    baseline: Optional[str] = None
    no_commit: bool = False
    chain: list[str]
    carried: list[str]  # run directories of legs completed in the sweeps this one resumes


def submit_sweep(cfg: Config, sweep: SweepRecord, opts: SweepOptions, *, max_parallel: Optional[int],
                 ui: SweepUI, carried: dict[str, RunRecord], chain: list[str]) -> SweepOutcome:
    slurm.require()
    todo = [leg for leg in sweep.legs if not settled(leg, sweep.legs)]
    refuse_unplannable_legs(cfg, todo, opts, data_here=False)
    _, _, results = check_request(cfg, leg_request(todo[0], opts, cfg.artifact_root / "_preflight"), data_here=False)
    results = deferred_to_job(results)
    if not passed(results):
        lines = [f"{r.name}: {r.message}" for r in results if not (r.ok or r.overridden)]
        ui.say("a guard refused the sweep; nothing was submitted")
        return SweepOutcome(exit_code=EXIT_GUARD, sweep=None, refused=lines, messages=lines)

    sweep_dir = _create_sweep_dir(cfg, sweep.name + ("-resume" if sweep.resumed_from else ""))
    sweep.id, sweep.exp_dir, sweep.created_at = sweep_dir.name, str(sweep_dir), store.now_iso()
    sweep.pid, sweep.host = os.getpid(), socket.gethostname()  # a resume while this process runs it is refused
    save_sweep(sweep)
    k = max_parallel if max_parallel is not None else cfg.cluster.max_parallel
    ui.say(f"sweep {sweep.id} -> {sweep_dir} ({len(todo)} of {len(sweep.legs)} legs to submit"
           + (f", at most {min(k, len(todo))} at once)" if k else ", all at once)"))
    jobs: list[str] = []
    submitted: list[RunRecord] = []
    report_job: Optional[str] = None
    try:
        for leg in todo:
            dependency = f"afterany:{jobs[len(jobs) - k]}" if k and len(jobs) >= k else None
            request = leg_request(leg, opts, sweep_dir, _leg_notes(leg, sweep))
            out = submit_run(cfg, request, JobOptions(dependency=dependency, commit=not opts.no_commit, summary=False,
                                                         fallback_in_job=True, release=False),
                             sweep_id=sweep.id,
                             on_queued=lambda record, tag=leg.tag: update_leg(sweep_dir, "queued", run_id=record.id, tag=tag))
            if out.record is None:  # the first leg passed these guards; a later one may not (fresh_dir)
                raise MoectlError(f"leg {leg.tag}: " + "; ".join(f"{r.name}: {r.message}" for r in out.guards if not r.ok))
            jobs.append(out.record.job_id)
            submitted.append(out.record)
            ui.say(f"leg {leg.tag}: run {out.record.id}, Slurm job {out.record.job_id}"
                   + (f" (after job {dependency.split(':')[1]})" if dependency else ""))
        report_job = _submit_report_job(cfg, sweep, sweep_dir, opts, jobs, carried, chain)
        ui.say(f"final report: Slurm job {report_job}, after every leg")
        # Only now is any leg let go: a moectl killed before this point leaves every leg held and
        # unreleased, which the next `wait`/`sweep --resume` cancels and settles `interrupted`
        # (execution.settle_abandoned_hold) - never legs running on with no report job after them.
        # Killed during the releases, the legs not yet let go are settled so, and the report job,
        # already queued, reports the sweep as it ended.
        for record in submitted:
            release_run(record)
    except BaseException:
        # Half a sweep in the queue helps nobody: cancel what was submitted, so no leg stays queued
        # (the report job first: it would start as the legs end, to report a sweep that never ran).
        from moectl.execution import cancel_runs

        try:
            slurm.cancel([report_job] if report_job else [])
            cancel_runs(submitted)
        except MoectlError as exc:
            ui.say(f"could not cancel the legs already submitted: {exc.message}")
        raise
    return SweepOutcome(exit_code=EXIT_OK, sweep=load_sweep(sweep_dir), jobs=[*jobs, report_job])


def _submit_report_job(cfg: Config, sweep: SweepRecord, sweep_dir: Path, opts: SweepOptions, jobs: list[str],
                       carried: dict[str, RunRecord], chain: list[str]) -> str:
    """The final report job (`python -m moectl.job --sweep SWEEP_DIR`, after every leg's job),
    recorded in sweep.json; returns its job id."""
    spec = SweepJobSpec(**ConfigSnapshot.fields_of(cfg), baseline=opts.baseline, no_commit=opts.no_commit,
                        chain=[*chain, sweep.id], carried=[r.exp_dir for r in carried.values()])
    from moectl.records import save_model

    save_model(sweep_dir / SWEEP_JOB_SPEC, spec)
    script = sweep_dir / SWEEP_JOB_SCRIPT
    write_text_atomic(script, "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name={slurm.JOB_NAME_PREFIX}{sweep.id}",
        f"#SBATCH --output={sweep_dir / 'slurm-%j.out'}",
        f"#SBATCH --chdir={sweep_dir}",
        "#SBATCH --nodes=1",
        *(f"#SBATCH {opt}" for opt in ([f"--partition={cfg.cluster.partition}"] if cfg.cluster.partition else [])
          + ([f"--account={cfg.cluster.account}"] if cfg.cluster.account else [])),
        "cd /  # moectl is the venv's: no module of the snapshot stands in for one it imports (slurm.batch_script)",
        f"exec {shlex.quote(str(cfg.python))} -m moectl.job --sweep {shlex.quote(str(sweep_dir))}",
        "",
    ]))
    report_job = slurm.submit(script, dependency="afterany:" + ":".join(jobs), hold=False)
    with locked_sweep(sweep_dir) as current:
        current.report_job = report_job
    return report_job


def settle_abandoned_legs(sweep: SweepRecord) -> None:
    """Before a resume runs them again: the legs of `sweep` still held since sbatch, whose
    submitting moectl died before it let them go (execution.settle_abandoned_hold), cancelled and
    settled `interrupted` in run.json and sweep.json. Only shown `stale` otherwise, they ran again
    in the resume while their jobs stayed held in the queue for ever and their sweep said `queued`."""
    if slurm.available() is not None:
        return  # (no Slurm here: their records are taken at their word, as `runs` takes them)
    for leg in sweep.legs:
        if leg.state != "queued" or not leg.run_id:
            continue
        try:
            record = read_record(Path(sweep.exp_dir) / leg.run_id)
        except (OSError, ValueError):
            continue
        if record.backend != "slurm" or record.status != "queued" or record.released is not False:
            continue
        try:
            info = slurm.job_info(record.job_id)
        except MoectlError:
            continue
        settle_abandoned_hold(record, info)


def follow_sweep(sweep_dir: Path, timeout_s: Optional[float] = None) -> tuple[SweepRecord, int]:
    """Wait for every leg to settle and the report job to end; (the sweep as it ends, exit code)."""
    import time

    from moectl.execution import wait_for

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    sweep = load_sweep(sweep_dir)
    legs = [read_record(Path(sweep_dir) / leg.run_id) for leg in sweep.legs
            if leg.run_id and (Path(sweep_dir) / leg.run_id).is_dir()]
    final = wait_for(legs, timeout_s)
    wait_for_report_job(sweep_dir, deadline)
    return load_sweep(sweep_dir), exit_code_of(final)


def report_job_ended(sweep: SweepRecord) -> bool:
    """Has the sweep's final-report job ended (cancelled, failed, done)? False when it has none, is
    still pending or running, or Slurm cannot be asked."""
    if not sweep.report_job:
        return False
    try:
        info = slurm.job_info(sweep.report_job)
    except MoectlError:
        return False
    return info is None or not info.live


def wait_for_report_job(sweep_dir: Path, deadline: Optional[float] = None) -> None:
    """Block until the sweep's final-report job (if it has one) has ended: once every leg settled it
    still writes and commits the sweep report. Raises TimeoutError (naming the job) when the
    `time.monotonic()` deadline passes first; a Slurm that cannot be asked is asked again."""
    import time

    from moectl.execution import POLL_S

    sweep = load_sweep(sweep_dir)
    while sweep.report_job:
        with slurm.answering_by(deadline):  # (no answer, or none by the deadline: asked again)
            if report_job_ended(sweep):
                return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"the final-report job {sweep.report_job} of sweep {Path(sweep_dir).name}")
        time.sleep(POLL_S)


def finish_sweep_job(sweep_dir: Path) -> int:
    """Inside the final job: settle every leg from its run record, then `finish_sweep`."""
    spec = SweepJobSpec.model_validate_json((Path(sweep_dir) / SWEEP_JOB_SPEC).read_text(encoding="utf-8"))
    cfg = spec.to_config()
    runs: dict[str, RunRecord] = {}
    for path in spec.carried:
        try:
            rec = read_record(Path(path))
            runs[rec.id] = rec
        except (OSError, ValueError):
            pass
    with locked_sweep(sweep_dir) as sweep:
        for leg in sweep.legs:
            if not leg.run_id or leg.run_id in runs:
                continue
            rec = read_record(Path(sweep_dir) / leg.run_id)
            if rec.status in UNSETTLED:  # its job ended without a word (afterany: it has ended)
                rec = settle_gone_job(rec)
            runs[rec.id] = rec
            leg.state = rec.status if rec.status != "imported" else "completed"
    sweep = load_sweep(sweep_dir)
    opts = SweepOptions(baseline=spec.baseline, no_commit=spec.no_commit)
    out = SweepOutcome(exit_code=EXIT_OK, sweep=sweep)
    out.report = claim_sweep_report(cfg, sweep)
    leg_runs = [runs[leg.run_id] for leg in sweep.legs if leg.run_id in runs]
    code = exit_code_of(leg_runs)
    finish_sweep(cfg, sweep, runs, opts, out, EXIT_INTERRUPTED if code == EXIT_INTERRUPTED else EXIT_OK,
                 chain=spec.chain, notes=[])
    with locked_sweep(sweep_dir) as current:
        current.report = str(out.report)
    for line in out.messages:
        print(f"moectl.job: {line}")
    print(f"sweep report: {out.report}" + (f", commit {out.commits[-1]}" if out.commits else ""))
    return code
