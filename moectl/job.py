"""Inside a Slurm job: `python -m moectl.job RUN_DIR`, started by the run's job.sh from its code
snapshot. The submitting moectl did the machine-independent guards and wrote `queued`; here:

1. the node's guards: gpus_idle on the GPUs Slurm allocated (an earlier job's zombie holding
   memory is the common case) and the run lock (below). A refusal records `refused` + why, exit 3;
2. run.json `running` (restarts = SLURM_RESTART_COUNT; a restart resumes from the last checkpoint);
3. torchrun through moectl.launch (one node: `--standalone`; several: srun starts one agent per
   node, c10d rendezvous at the first node's NodeAddr, the job id as rendezvous id);
4. the record's end, the report and its commit (runner.finish_record, runner.report_and_commit:
   the same code as a local run). Exit code: 0 / 3 / 4 / 130, as `moectl run`.
5. launch.compile_fallback for a sweep leg, a `run --slurm --detach` or a `--repeat` run: when
   the engine failed to compile, the same job makes the `--compile none` re-run as a run of its
   own beside this one (its own directory, job.json, record, report and commit; a sweep's new leg
   `<tag>_fallback_none`, as a local sweep records it) and runs it as it ran this one. A followed
   `run --slurm` re-submits that run from the follower instead (moectl.cli.cluster).

The run lock on a shared filesystem: a pid means nothing on another node, so the lock is
`<run dir>/.job.lock` naming the Slurm job. It keeps a second job off this run directory (a job
submitted twice, a stray `sbatch job.sh`); the same job after a requeue, or a lock whose job Slurm
no longer runs, takes it over. Which GPUs are free is Slurm's allocation plus gpus_idle.

Requeue: `scontrol requeue` (or preemption) SIGTERMs the job like scancel does. Both end torchrun
cleanly; then Slurm's own count of restarts tells them apart: if it grew, the job is going back to
the queue and run.json says `queued` again, not `interrupted`. With `run --requeue`, the
`--signal=B:USR1@...` Slurm sends before the time limit makes this process requeue its own job.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Optional

from moectl import slurm, store
from moectl.config import Config
from moectl.errors import EXIT_GUARD, EXIT_INTERRUPTED, EXIT_OK, MoectlError
from moectl.execution import (
    JOB_GUARDS, JobSpec, compile_fallback_of, job_live, read_record, save_leg, save_run_and_leg,
)
from moectl.guards import guard_gpus_idle
from moectl.launch import launch
from moectl.plan import RunPlan
from moectl.progress import NullProgress
from moectl.records import UNSETTLED, GuardResult, RunRecord

JOB_LOCK = ".job.lock"
RESUMABLE = ("queued", "running", "interrupted")  # states this job (re)starts a run from


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "--sweep":
        from moectl.sweep.cluster import finish_sweep_job

        return finish_sweep_job(Path(args[1]))
    if len(args) != 1:
        print("usage: python -m moectl.job RUN_DIR | --sweep SWEEP_DIR", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    spec = JobSpec.load(run_dir)
    cfg, plan = spec.to_config(), spec.plan
    record = read_record(run_dir)
    job_id = os.environ.get("SLURM_JOB_ID", "")
    restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if record.status not in RESUMABLE:
        fallback = compile_fallback_of(record)
        if fallback is not None and fallback.status in RESUMABLE:
            # requeued while its compile fallback ran: that run goes on (from its last checkpoint)
            return main([fallback.exp_dir])
        print(f"moectl.job: run {record.id} is already {record.status}; nothing to do", file=sys.stderr)
        return EXIT_OK

    if record.job_id and record.job_id != job_id and job_live(record) is True:
        # A second job of this run (`sbatch <run>/job.sh` again while its own job lives): the run
        # is that job's. Its record is left alone - refusing here wrote `refused` over a live run.
        print(f"moectl.job: run {record.id} belongs to Slurm job {record.job_id}, which is still live; "
              "this job leaves it alone", file=sys.stderr)
        return EXIT_GUARD

    results = node_guards(cfg, plan, run_dir, job_id)
    record.guards = [r for r in record.guards if r.name not in JOB_GUARDS] + results
    record.overrides = sorted(set(record.overrides) | {r.name for r in results if r.overridden})
    if not all(r.ok or r.overridden for r in results):
        why = "; ".join(f"{r.name}: {r.message}" for r in results if not (r.ok or r.overridden))
        record.status, record.exit_code, record.finished_at = "refused", EXIT_GUARD, store.now_iso()
        record.error = f"refused inside Slurm job {job_id} on {socket.gethostname()}: {why}"
        if next(r for r in results if r.name == "no_other_training").ok:
            (run_dir / JOB_LOCK).unlink(missing_ok=True)  # ours: taken by node_guards
        save_run_and_leg(record)
        print(record.error, file=sys.stderr)
        return EXIT_GUARD

    record.status, record.started_at = "running", record.started_at or store.now_iso()
    record.host, record.pid, record.job_id, record.restarts = socket.gethostname(), os.getpid(), job_id, restart
    record.error, record.released = None, True  # (it runs: it was released)
    _record_command(record, plan, job_argv(spec, plan, job_id))
    save_run_and_leg(record)  # (under the record's lock: the submitter may be recording the release just now)

    from moectl.runner import RunOutcome, finish_record, report_and_commit, stdout_parser

    parser = stdout_parser(cfg, plan, spec.nodes)  # a trainer whose metrics come from its output ([metrics] source)
    try:
        result = _train(spec, plan, run_dir, job_id, restart, parser)
    except BaseException as exc:  # the record must not say `running` once this job is gone
        record.status, record.finished_at = "failed", store.now_iso()
        record.error = f"moectl in Slurm job {job_id}: {type(exc).__name__}: {exc}"
        save_run_and_leg(record)
        raise
    finally:
        (run_dir / JOB_LOCK).unlink(missing_ok=True)

    job = _job_after_signal(job_id) if result.interrupted else None
    if job is not None and job.restarts > restart:  # scancel does not count a restart; a requeue does
        record.status = "queued"
        record.error = requeue_note(result.signal_name, restart + 1, _has_checkpoint(Path(plan.ckpt_dir)))
        save_run_and_leg(record)
        return EXIT_INTERRUPTED

    outcome = RunOutcome(exit_code=EXIT_OK, plan=plan, guards=record.guards, record=record)
    with store.record_lock(run_dir):  # one final word at a time (execution.settle_gone_job takes it too)
        before = read_record(run_dir)
        outcome.exit_code, outcome.compile_failed = finish_record(record, result, plan, parser)
        if job is not None and job.reason == "TimeLimit" and record.status == "interrupted":
            # Say why, not only which signal: it is the answer to "where did my run go" the next morning.
            record.error = (f"stopped by Slurm at the job's time limit ({job.time_limit or cfg.cluster.time}) with "
                            f"{result.signal_name}; `run --requeue` resumes such a run from its last checkpoint"
                            + (f"\n{result.log_tail}" if result.log_tail else ""))
        if before.status not in UNSETTLED:
            record.warnings.append(settled_before_note(before))
        store.save_run(record)
    save_leg(record)  # the sweep's leg is settled before its report is committed
    baseline = ([read_record(Path(d)) for d in spec.baseline_group] if spec.baseline_group
                else read_record(Path(spec.baseline)) if spec.baseline else None)
    # The record gets its report, commit and commit_error: the follower shows them, `moectl commit RUN` retries.
    report_and_commit(cfg, outcome, baseline=baseline, commit=spec.commit, extra_commit_paths=_summary_paths(cfg, spec))
    if outcome.compile_failed and spec.fallback_in_job:
        fallback_dir = make_fallback_run(cfg, spec, record)
        if fallback_dir is not None:
            print(f"moectl.job: torch.compile failed; re-running as {fallback_dir.name} with --compile none "
                  "(launch.compile_fallback)")
            return main([str(fallback_dir)])
    return outcome.exit_code


def settled_before_note(before: RunRecord) -> str:
    """The warning of a run this job ends after someone else settled it (pure).

    Slurm can report a job ended while its moectl runs on: NODE_FAIL, a node the controller lost
    that trains on, and a `wait` elsewhere then settles the run from Slurm's word (`interrupted`,
    execution.settle_gone_job). This job's end is what its processes did - the steps trained, the
    trainer's exit, the report and commit that follow - so it stands: a result is never thrown away
    for a guess. Never silently: the record keeps what was settled before, when and why, for `show`,
    `runs` (its `!`) and the report, since that earlier answer may have been shown already."""
    why = (before.error or "").splitlines()[0] if before.error else "no reason recorded"
    return (f"settled `{before.status}` at {before.finished_at} before this job's moectl recorded the run's end "
            f"({why}); that moectl ran on and its end stands")


def requeue_note(signal_name: str, restart: int, checkpointed: bool) -> str:
    """The record's word while a requeued job waits: what its restart will do - go on from a
    checkpoint, or (none saved: no --save-every, or stopped before the first) train from step 0."""
    resumes = ("resumes from its last checkpoint" if checkpointed
               else "starts again from step 0: no checkpoint was saved (-- --save-every N saves them)")
    return f"requeued by Slurm after {signal_name} (restart {restart} {resumes})"


def make_fallback_run(cfg: Config, spec: JobSpec, failed: RunRecord) -> Optional[Path]:
    """The `--compile none` re-run of a run whose engine failed to compile, set up beside it as a
    queued run of this job (step 5 of the docstring); None when launch.compile_fallback says no."""
    import shutil
    from datetime import datetime

    from moectl.execution import JOB_SPEC, JOB_SCRIPT
    from moectl.plan import command_file_text, plan_run
    from moectl.records import save_model, write_text_atomic
    from moectl.runner import fallback_record, record_fallback_request

    retry = record_fallback_request(cfg, spec.request, failed) if spec.request is not None else None
    if retry is None:
        return None
    run_dir = Path(failed.exp_dir)
    # As resolved for the failed run (not re-resolved here: `auto` has no NVML reading to go by).
    retry = retry.model_copy(update={"device": spec.plan.device, "nproc": spec.plan.nproc,
                                     "exp_dir": None, "parent_dir": str(run_dir.parent)})
    plan = plan_run(cfg, retry, datetime.now(), None, nodes=spec.nodes, data_here=False)
    if failed.sweep:
        from moectl.sweep.store import add_fallback_leg, locked_sweep

        if not add_fallback_leg(run_dir.parent, of_run=failed.id, run_id=plan.run_id):
            return None
    fallback_dir = Path(plan.exp_dir)
    created = False
    try:
        store.create_run_dir(fallback_dir)
        created = True
        Path(plan.ckpt_dir).mkdir(exist_ok=True)  # (as runner.write_run_files makes it)
        write_text_atomic(Path(plan.files["command.txt"]), command_file_text(plan, fallback_dir / "code"))
        # The very code that failed, and the diff that went with it: the repository may have moved
        # on since the submission (runner.write_run_files would diff it as it is now).
        shutil.copytree(run_dir / "code", fallback_dir / "code", symlinks=True)
        if (run_dir / "git.diff").is_file():
            shutil.copyfile(run_dir / "git.diff", plan.files["git.diff"])
        fallback_spec = spec.model_copy(update={"plan": plan, "request": retry, "fallback_in_job": False})
        save_model(fallback_dir / JOB_SPEC, fallback_spec)
        # This job runs it; the script is there so that `sbatch job.sh` could run it again alone.
        write_text_atomic(fallback_dir / JOB_SCRIPT, slurm.batch_script(
            run_id=plan.run_id, run_dir=fallback_dir, code_dir=fallback_dir / "code", python=plan.python,
            cluster=cfg.cluster, nodes=spec.nodes, requeue=spec.requeue))
        store.save_run(fallback_record(plan, failed))
    except BaseException:
        # Half set up: no run, no leg (the sweep's report must not look for a run that never was).
        if failed.sweep:
            with locked_sweep(run_dir.parent) as sweep:
                sweep.legs = [leg for leg in sweep.legs if leg.run_id != plan.run_id]
        if created:
            shutil.rmtree(fallback_dir, ignore_errors=True)  # ours, made just now, half written
        raise
    failed.fallback_run = plan.run_id
    store.save_run(failed)
    return fallback_dir


def job_argv(spec: JobSpec, plan: RunPlan, job_id: str) -> list[str]:
    """The command this job runs: the plan's torchrun on one node; on several, srun starting one
    torchrun per node with a c10d rendezvous at the first node (known only inside the allocation)."""
    if spec.nodes <= 1:
        return list(plan.argv)
    head = slurm.head_address(os.environ["SLURM_JOB_NODELIST"])
    port = slurm.rendezvous_port(spec.rdzv_port, job_id)  # its own: another job may share the first node
    return slurm.multinode_argv(list(plan.argv), nnodes=spec.nodes, head=head, port=port, job_id=job_id)


def _record_command(record: RunRecord, plan: RunPlan, argv: list[str]) -> None:
    """run.json's argv and command.txt say what ran: for several nodes, the srun command, not the
    one-node torchrun planned at submission."""
    from moectl.plan import command_file_text
    from moectl.records import write_text_atomic

    if argv != record.argv:
        record.argv = argv
        write_text_atomic(Path(plan.files["command.txt"]),
                          command_file_text(plan.model_copy(update={"argv": argv}), Path(plan.exp_dir) / "code"))


def _train(spec: JobSpec, plan: RunPlan, run_dir: Path, job_id: str, restart: int, parser):
    """torchrun on this node (one node) or on every node (srun), from the code snapshot."""
    argv = job_argv(spec, plan, job_id)
    if restart and _has_checkpoint(Path(plan.ckpt_dir)):
        argv += ["--resume", "latest"]  # the engine trims metrics.jsonl to the checkpoint's step
    elif restart:
        # No checkpoint to go on from: the run starts over, and the engine refuses to write over
        # metrics it did not resume from. The earlier attempt's steps stay beside, not in, the run's.
        old = Path(plan.files["metrics.jsonl"])
        if old.exists():
            aside = old.with_name(f"{old.name}.attempt{restart - 1}")
            k = 1
            while aside.exists():  # (a restart number Slurm reused: the earlier attempt stays too)
                aside, k = old.with_name(f"{old.name}.attempt{restart - 1}-{k}"), k + 1
            old.rename(aside)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **plan.env}
    # The snapshot first, even where [launch] env sets PYTHONPATH: the job trains the guarded code.
    code = str(run_dir / "code")
    env["PYTHONPATH"] = code + (f":{env['PYTHONPATH']}" if env.get("PYTHONPATH") else "")
    requeue_on_signal = _requeue_on_usr1(job_id) if spec.requeue else None
    try:
        from moectl.stdout_metrics import LiveMetricsWriter

        metrics_path = Path(plan.files["metrics.jsonl"])
        result = launch(argv, cwd=Path(code), env=env, log_path=Path(plan.files["train.log"]),
                        metrics_path=metrics_path, progress=NullProgress(),
                        output_metrics=LiveMetricsWriter(metrics_path, parser) if parser else None)
    finally:
        if requeue_on_signal is not None:
            signal.signal(signal.SIGUSR1, requeue_on_signal)

    return result


def node_guards(cfg: Config, plan: RunPlan, run_dir: Path, job_id: str) -> list[GuardResult]:
    """gpus_idle on the GPUs Slurm allocated, and the run-directory lock (see the docstring)."""
    from moectl.probes import GitState, Observed, read_nvml

    overrides = set(plan.overrides)
    gpu_cfg = cfg
    allocated = slurm.allocated_gpus()
    if allocated is not None:
        file = cfg.file.model_copy(deep=True)
        file.gpu.devices = allocated
        gpu_cfg = Config(file=file, path=cfg.path, root=cfg.root, artifact_root=cfg.artifact_root,
                         report_dir=cfg.report_dir, read_only=cfg.read_only, python=cfg.python)
    nvml = read_nvml(gpu_cfg.gpu.devices) if plan.device == "cuda" else None
    obs = Observed(git=GitState(is_repo=True), nvml=nvml)
    gpus = guard_gpus_idle(gpu_cfg, plan, obs)
    lock = _take_run_lock(run_dir, job_id)
    results = [gpus, lock]
    for r in results:
        r.overridable = True
        if not r.ok and r.name in overrides:
            r.overridden = True
    return results


def _take_run_lock(run_dir: Path, job_id: str) -> GuardResult:
    path = run_dir / JOB_LOCK
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = path.read_text(encoding="utf-8").strip() if path.exists() else ""
            if holder and holder != job_id:
                try:
                    info = slurm.job_info(holder)
                except MoectlError:
                    info = None
                if info is not None and info.live:
                    return GuardResult(name="no_other_training", ok=False,
                                       message=f"Slurm job {holder} already trains this run directory")
            path.unlink(missing_ok=True)  # ours after a requeue, or its job is gone: take it over
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(job_id + "\n")
        return GuardResult(name="no_other_training", ok=True, message=f"run lock held by Slurm job {job_id}")


def _has_checkpoint(ckpt_dir: Path) -> bool:
    return ckpt_dir.is_dir() and any(ckpt_dir.glob("model_*.pt"))


def _job_after_signal(job_id: str) -> Optional[slurm.JobInfo]:
    """After a SIGTERM, what Slurm says of this job: one more restart than this run of it means a
    requeue; reason TimeLimit, the time limit (its state is COMPLETING until this job exits)."""
    try:
        return slurm.job_info(job_id)
    except MoectlError:
        return None


def _requeue_on_usr1(job_id: str):
    """Before the time limit Slurm sends USR1 (--signal=B:USR1@...): requeue this job, which
    SIGTERMs it (torchrun stops cleanly) and queues it again. The handler only wakes a thread."""
    wake = threading.Event()

    def requeue_when_woken() -> None:
        wake.wait()
        try:
            slurm.requeue(job_id)
        except MoectlError as exc:
            print(f"moectl.job: {exc.message}", file=sys.stderr)

    threading.Thread(target=requeue_when_woken, daemon=True).start()
    return signal.signal(signal.SIGUSR1, lambda signum, frame: wake.set())


def _summary_paths(cfg: Config, spec: JobSpec):
    def paths(record: RunRecord):
        if not (spec.summary and cfg.report.summary):
            return []
        from moectl.summary import write_summary

        try:
            return [write_summary(cfg)]
        except MoectlError as exc:
            print(f"moectl.job: EXPERIMENTS.md not refreshed: {exc.message}", file=sys.stderr)
            return []
    return paths


if __name__ == "__main__":
    sys.exit(main())
