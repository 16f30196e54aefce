"""`moectl run` as a library: guards -> fresh directory -> records -> torchrun -> summary -> report -> commit.

    outcome = execute_run(cfg, request, progress=make_progress(stdout_is_tty()))
    outcome.exit_code   # 0 completed, 3 a guard refused, 4 training failed, 130 interrupted

`moectl sweep` runs every leg through `execute_run` too (with `exp_dir` inside the sweep directory),
so there is exactly one launch path. The run record is written atomically at every state change
(created -> running -> completed | failed | interrupted); the run lock is held from just before the
directory is created until the record is final, and released on every path (a sweep's legs run
under the sweep's own lock instead, held from its first leg to its end: `run_lock`).

A trainer whose metrics come from its stdout ([metrics] source = "stdout") is launched the same way;
its output lines go through moectl.stdout_metrics on their way to train.log, which writes the run's
metrics.jsonl in the engine's schema, so everything after the launch reads it like the engine's.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from engine.schema import EXIT_COMPILE_FAILED
from moectl import gitops, store
from moectl.config import Config
from moectl.errors import (
    EXIT_GUARD, EXIT_INTERRUPTED, EXIT_OK, EXIT_TRAINING, EXIT_USAGE, GuardRefused, Interrupted, MoectlError,
)
from moectl.guards import check_request, passed, wait_until_clear
from moectl.launch import LaunchResult, launch, supervised
from moectl.lock import Lock, acquire
from moectl.metrics import RunMetrics, compare, read_metrics
from moectl.plan import RunPlan, RunRequest, command_text
from moectl.progress import NullProgress, ProgressSink
from moectl.records import RUN_RECORD, GitInfo, GuardResult, RunRecord
from moectl.stdout_metrics import LiveMetricsWriter, StdoutFormat, StdoutParser
from moectl.report import commit_message, find_run_report, not_committed, not_written, run_report, write_report
from moectl.text import without_stop_tracebacks
from moectl.tracking import Mirrored, mirror_run
from moectl.trainer import follows_engine_contract, script_path


@dataclass
class RunOutcome:
    exit_code: int
    plan: RunPlan
    guards: list[GuardResult]
    record: Optional[RunRecord] = None  # None when a guard refused (nothing was written)
    report: Optional[Path] = None
    commit: Optional[str] = None
    commit_error: Optional[str] = None  # the report was written but could not be committed
    commit_found: bool = False  # `commit` is another process's: it had committed the report meanwhile
    compile_failed: bool = False  # the engine exited with EXIT_COMPILE_FAILED
    extra_paths: list[Path] = field(default_factory=list)
    tracking: list[Mirrored] = field(default_factory=list)  # one per tracker of [tracking]


def execute_run(
    cfg: Config,
    request: RunRequest,
    *,
    progress: Optional[ProgressSink] = None,
    baseline: "Optional[RunRecord | Sequence[RunRecord]]" = None,
    sweep_id: Optional[str] = None,
    commit: bool = True,
    extra_commit_paths: Callable[[RunRecord], Sequence[Path]] = lambda record: (),
    echo: bool = False,
    on_wait: Optional[Callable[[list[GuardResult], float], None]] = None,
    on_start: Optional[Callable[[RunRecord], None]] = None,
    on_commit_wait: Optional[Callable[[Path], None]] = None,
    on_recorded: Optional[Callable[[RunRecord], None]] = None,
    on_mirror: Optional[Callable[[list[str]], None]] = None,
    run_lock: Optional[Lock] = None,
) -> RunOutcome:
    """Run one guarded training run to its end. Never raises for a refusal or a failed run: the
    outcome says what happened. Raises MoectlError only for problems outside the run itself.
    `run_lock`: the run lock, held already by the caller (a sweep, from its first leg to its end,
    so nobody starts between two legs): used as it is, neither taken nor released here."""
    progress = progress or NullProgress()
    if request.wait_gpus_s:
        plan, obs, results = wait_until_clear(cfg, request, request.wait_gpus_s, on_wait=on_wait)
    else:
        plan, obs, results = check_request(cfg, request)
    outcome = RunOutcome(exit_code=EXIT_OK, plan=plan, guards=results)
    if not passed(results):
        outcome.exit_code = EXIT_GUARD
        return outcome

    try:
        lock = acquire(cfg.artifact_root, plan.run_id, command_text(plan)) if run_lock is None else None
    except GuardRefused as exc:
        # Another live moectl holds the lock - taken since the guard looked, when two start at once.
        # `--override no_other_training` is a person saying "run beside it anyway": run unlocked
        # rather than refuse what they overrode, and record the override as used.
        if "no_other_training" not in plan.overrides:
            raise
        lock = None
        results = [r.model_copy(update={"ok": False, "overridden": True, "message": exc.message})
                   if r.name == "no_other_training" else r for r in results]
        outcome.guards = results
    try:
        exp_dir = Path(plan.exp_dir)
        record = new_record(plan, obs, results, sweep_id=sweep_id, repo=cfg.root)
        outcome.record = record
        launched = False  # (until then, a run whose record cannot be written leaves nothing behind)
        taken, made = None, False
        # The directory is made inside the try below: a Ctrl-C as it is made (a signal lands as
        # mkdir returns) removes it again, one a moment later is recorded - never an empty
        # directory no command lists.
        try:
            try:
                store.create_run_dir(exp_dir)
            except MoectlError as exc:  # appeared since the fresh_dir guard looked: still a refusal
                taken = GuardRefused(exc.message)  # (and another's directory: nothing recorded in it)
                raise taken from None
            made = True
            write_run_files(cfg, plan)
            store.save_run(record)

            record.status = "running"
            record.started_at = store.now_iso()
            store.save_run(record)
            store.reserve_space(exp_dir)  # for its last record, should the disk fill while it trains
            if on_start is not None:
                on_start(record)
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **plan.env}
            parser = stdout_parser(cfg, plan)
            argv = supervised(plan.argv) if cfg.launch.launcher == "python" else plan.argv
            launched = True
            result = launch(
                argv, cwd=cfg.root, env=env, log_path=Path(plan.files["train.log"]),
                metrics_path=Path(plan.files["metrics.jsonl"]), progress=progress, echo=echo,
                output_metrics=LiveMetricsWriter(Path(plan.files["metrics.jsonl"]), parser) if parser else None,
            )
        except BaseException as exc:  # the record must not say created/running once we are gone
            if exc is taken:
                raise
            # launch() turns signals into a clean stop; a KeyboardInterrupt here came just before it.
            stopped = isinstance(exc, KeyboardInterrupt)
            if stopped and not made and _removed_if_empty(exp_dir):  # stopped as it was made: nothing in it
                raise Interrupted(f"interrupted before run {record.id} started; {exp_dir} is removed") from None
            record.status = "interrupted" if stopped else "failed"
            record.finished_at = store.now_iso()
            record.error = "interrupted before training started" if stopped else f"moectl: {type(exc).__name__}: {exc}"
            record.exit_code = EXIT_INTERRUPTED if stopped else None
            try:
                store.save_final(record)
            except OSError as unsaved:  # (a full disk, a read-only directory: the error above, often)
                raise _not_recorded(record, exc, unsaved, launched) from None
            if on_recorded is not None:  # a sweep's leg says so too, with its run (not left `pending`)
                on_recorded(record)
            if isinstance(exc, OSError) and not launched:  # (git.diff on a full disk, say): which run
                raise MoectlError(f"run {record.id} did not start: {_reason(exc)}; its record says so") from None
            raise

        try:
            outcome.exit_code, outcome.compile_failed = finish_record(record, result, plan, parser)
        except OSError as exc:
            if Path(exc.filename or "") != Path(record.exp_dir) / RUN_RECORD:
                raise
            raise _end_not_recorded(record, exc) from None
    finally:
        if lock is not None:
            lock.release()

    report_and_commit(cfg, outcome, baseline=baseline, commit=commit, extra_commit_paths=extra_commit_paths,
                      on_commit_wait=on_commit_wait, on_recorded=on_recorded, on_mirror=on_mirror)
    return outcome


def new_record(plan: RunPlan, obs, results: list[GuardResult], *, sweep_id: Optional[str] = None,
               status: str = "created", repo: Optional[Path] = None) -> RunRecord:
    """The record of a run about to start (local) or be submitted (Slurm)."""
    return RunRecord(
        id=plan.run_id,
        tag=plan.tag,
        status=status,
        created_at=store.now_iso(),
        argv=plan.argv,
        options=plan.options,
        git=GitInfo(branch=obs.git.branch, commit=obs.git.head, dirty=obs.git.dirty),
        guards=results,
        # Every --override given (SPEC §5: recorded), whether or not its guard had to be passed over;
        # the guards themselves say which were (`overridden`).
        overrides=list(dict.fromkeys([*plan.overrides, *(r.name for r in results if r.overridden)])),
        exp_dir=plan.exp_dir,
        host=socket.gethostname(),
        repo=str(Path(repo).resolve()) if repo is not None else None,
        pid=os.getpid(),
        gpus=[g.name for g in (obs.nvml.gpus or [])] if plan.device == "cuda" else [],
        driver=obs.nvml.driver if plan.device == "cuda" else None,
        sweep=sweep_id,
        notes=plan.notes,
        window=plan.window,
        warmup_steps=plan.warmup_steps,
        group=plan.group,
        repeat=plan.repeat,
    )


def fallback_record(plan: RunPlan, failed: RunRecord) -> RunRecord:
    """The queued record of `failed`'s `--compile none` re-run made inside its Slurm job
    (moectl.job): it trains the same code snapshot on the same allocation, so what `new_record`
    would take from the observations (git, guards, host, GPUs) is `failed`'s."""
    return RunRecord(
        id=plan.run_id,
        tag=plan.tag,
        status="queued",
        created_at=store.now_iso(),
        argv=plan.argv,
        options=plan.options,
        git=failed.git.model_copy(),
        guards=[g.model_copy() for g in failed.guards],
        overrides=list(failed.overrides),
        exp_dir=plan.exp_dir,
        host=failed.host,
        repo=failed.repo,
        pid=os.getpid(),
        gpus=list(failed.gpus),
        driver=failed.driver,
        sweep=failed.sweep,
        notes=plan.notes,
        window=plan.window,
        warmup_steps=plan.warmup_steps,
        group=plan.group,
        repeat=plan.repeat,
        backend=failed.backend,
        job_id=failed.job_id,
        nodes=failed.nodes,
    )


def write_run_files(cfg: Config, plan: RunPlan, cwd: Optional[Path] = None) -> None:
    """command.txt and git.diff: what ran (from `cwd`, default the repository root), from which
    uncommitted changes (`gitops.git_diff`'s bytes as git wrote them: the user's files need not be
    UTF-8); and ckpt_root/, empty until the trainer saves, so every run has SPEC §6's files - one
    stopped or failed before its first checkpoint too. (Not for a trainer of the user's given it by
    `[launch.options] ckpt_dir`: one that makes it with a plain mkdir would fail on ours.)"""
    from moectl.atomic import atomic_file
    from moectl.plan import command_file_text
    from moectl.trainer import follows_engine_contract

    if follows_engine_contract(cfg.launch, cfg.metrics) or "ckpt_dir" not in (cfg.launch.options or {}):
        Path(plan.ckpt_dir).mkdir(exist_ok=True)
    _write_text(Path(plan.files["command.txt"]), command_file_text(plan, cwd or cfg.root))
    diff = gitops.git_diff(cfg.root)
    diff = _keep_an_unversioned_script(cfg, plan) + diff
    with atomic_file(Path(plan.files["git.diff"]), "wb") as fh:
        fh.write(diff)


def _keep_an_unversioned_script(cfg: Config, plan: RunPlan) -> bytes:
    """A `[launch] script` that no commit nor diff holds (outside the repository, or git-ignored)
    is copied into the run directory, so the record still says what ran; -> git.diff's first line
    saying so (b"" when git has it)."""
    import shutil

    script = script_path(cfg.launch, cfg.root)
    why = gitops.why_not_in_diff(cfg.root, script) if script is not None and script.is_file() else None
    if why is None:
        return b""
    copy = Path(plan.exp_dir) / "trainer_script" / script.name
    copy.parent.mkdir(exist_ok=True)
    shutil.copy2(script, copy)
    return os.fsencode(f"# moectl: the trainer script {script} is {why}, so no diff holds it: "
                       f"its copy is {copy.relative_to(plan.exp_dir)}\n")


def finish_record(record: RunRecord, result: LaunchResult, plan: RunPlan,
                  parser: Optional[StdoutParser] = None) -> tuple[int, bool]:
    """The record of a run whose torchrun has exited: summary, status, exit code, error; saved.
    `parser`: the stdout parser of a trainer whose metrics come from its output. Returns (moectl's
    exit code, whether the engine failed to compile)."""
    if parser is not None:
        record.warnings = parser.warnings()
    if result.log_error:
        record.warnings.append(result.log_error)
    metrics = read_metrics(Path(plan.files["metrics.jsonl"]))
    store.apply_metrics(record, metrics, plan.window, plan.warmup_steps)  # adds a NaN-loss warning
    if metrics.start is not None and plan.device == "cuda" and not record.gpus:
        record.gpus = [metrics.start.device]
    worker_code = result.worker_exit_code
    record.exit_code = worker_code if worker_code is not None else result.exit_code
    record.finished_at = store.now_iso()
    exit_code, compile_failed = EXIT_OK, False
    if result.interrupted:
        record.status = "interrupted"
        tail = without_stop_tracebacks(result.log_tail)  # (torchrun's answer to our SIGTERM: no news)
        record.error = f"interrupted by {result.signal_name}" + (f"\n{tail}" if tail else "")
        # moectl's own code (SPEC §8), not what torchrun happened to exit with once stopped (1, -15, -9)
        record.exit_code = exit_code = EXIT_INTERRUPTED
    elif parser is not None and parser.steps_seen == 0:
        # Exit 0 or not, a run that never printed a step measured nothing: it did not complete.
        record.status = "failed"
        record.error = parser.no_steps_reason() + (f"\n{result.log_tail}" if result.log_tail else "")
        exit_code = EXIT_TRAINING
    elif result.exit_code == 0 and metrics.n_steps == 0:
        # The trainer's own metrics.jsonl (source = "jsonl") with no step in the schema: measured nothing.
        record.status = "failed"
        bad = f" ({metrics.skipped} lines skipped: not the metrics schema of engine/schema.py)" if metrics.skipped else ""
        record.error = f"the trainer exited 0 but its metrics.jsonl holds no step{bad}" \
            + (f"\n{result.log_tail}" if result.log_tail else "")
        exit_code = EXIT_TRAINING
    elif result.exit_code == 0:
        record.status = "completed"
    else:
        record.status = "failed"
        blank = not result.log_tail.strip()  # (a trainer that printed only blank lines or colour codes)
        record.error = result.error or (None if blank else result.log_tail) or f"the trainer exited with {result.exit_code}"
        exit_code = EXIT_TRAINING
        compile_failed = worker_code == EXIT_COMPILE_FAILED
    store.save_final(record)
    return exit_code, compile_failed


def _reason(exc: BaseException) -> str:
    """An error as one line: `path: reason` for a file's."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    if isinstance(exc, MoectlError):
        return exc.message
    return " ".join(str(exc).split()) or type(exc).__name__


def _end_not_recorded(record: RunRecord, exc: OSError) -> MoectlError:
    """A run whose training ended but whose last record cannot be written (run.json on a full disk
    even without the room held for it, or a read-only directory): said with what the training did,
    exit 4 for a failed one (SPEC §8). run.json keeps saying `running`, whole: atomic writes leave
    it as it was. There is no report: it would be of a run whose record says otherwise."""
    what, code = {"completed": ("completed", EXIT_USAGE),  # (not 0: neither recorded nor reported)
                  "failed": (f"failed (exit {record.exit_code})", EXIT_TRAINING),
                  "interrupted": ("was interrupted", EXIT_INTERRUPTED)}.get(
        record.status, (f"ended (exit {record.exit_code})", EXIT_USAGE))
    return MoectlError(f"run {record.id}: its training {what}, but its record could not be written "
                       f"({_reason(exc)}): run.json still says `running` and no report was written", code)


def _removed_if_empty(run_dir: Path) -> bool:
    """Remove `run_dir`, just made, when nothing is in it; whether it is gone (or never was made)."""
    try:
        os.rmdir(run_dir)  # (never more than an empty directory)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _not_recorded(record: RunRecord, exc: BaseException, unsaved: OSError, launched: bool) -> BaseException:
    """The error of a run that stopped on `exc` and whose record cannot say so (`unsaved`). Before
    the launch, nothing ran: the directory this run made (command.txt, git.diff, ckpt_root/, a
    run.json saying `created`) goes, rather than stay behind as a run nobody lists or cleans."""
    import shutil

    run_dir = Path(record.exp_dir)
    if launched:
        said = f"its record could not be written ({_reason(unsaved)}): run.json still says `running`"
        if isinstance(exc, KeyboardInterrupt):
            return Interrupted(f"run {record.id} interrupted; {said}")
        return MoectlError(f"run {record.id}: {_reason(exc)}; {said}")
    shutil.rmtree(run_dir, ignore_errors=True)
    left = f"{run_dir} could not be removed" if os.path.lexists(run_dir) else f"{run_dir} is removed"
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted(f"interrupted before run {record.id} started; {left}")
    if not isinstance(exc, (OSError, MoectlError)):
        return exc  # a bug of moectl's: said as one (exit 1)
    return MoectlError(f"run {record.id} did not start: {_reason(exc)}; {left}",
                       exc.exit_code if isinstance(exc, MoectlError) else EXIT_USAGE)


def report_and_commit(cfg: Config, outcome: RunOutcome, *, baseline: "Optional[RunRecord | Sequence[RunRecord]]" = None,
                      commit: bool = True,
                      extra_commit_paths: Callable[[RunRecord], Sequence[Path]] = lambda record: (),
                      on_commit_wait: Optional[Callable[[Path], None]] = None,
                      on_recorded: Optional[Callable[[RunRecord], None]] = None,
                      on_mirror: Optional[Callable[[list[str]], None]] = None) -> None:
    """The report of a recorded run, its commit (only the files moectl wrote) and the trackers'
    copies, into `outcome`. The run is over and recorded: nothing here changes its status.
    `on_mirror(trackers)`: called before the trackers' copies are made.
    `on_commit_wait(lock)`: called once if the commit starts waiting for another git's index.lock.
    `on_recorded(record)`: called first, on any branch (a sweep's leg state follows its run's).
    `extra_commit_paths(record)`: tracked files to refresh and commit with the report, called
    only on the project branch."""
    record, plan = outcome.record, outcome.plan
    report = None
    # One try from the start: a Ctrl-C while the report is made (its comparison, a sweep's leg
    # state) is recorded with the command that finishes it, as one while it commits is.
    try:
        if on_recorded is not None:
            on_recorded(record)
        # `baseline`: one run, or a repeat group's completed runs (run --baseline TAG_OF_A_GROUP): a group
        # compares as `compare` shows it, the mean of its tail means ± the between-runs error.
        base_runs = [baseline] if isinstance(baseline, RunRecord) else list(baseline or [])
        comparison = None
        if base_runs and any(b.summary is not None for b in base_runs) and record.summary is not None:
            from moectl.repeats import entry_metrics

            comparison = compare(
                [entry_metrics(base_runs, plan.window), _run_metrics(record)], baseline_index=0, window=plan.window,
                warmup_steps=plan.warmup_steps,
            )
        # A repeat's report is named after its repeat too: the group's runs end together.
        name = plan.tag + (f"-r{plan.repeat}" if plan.repeat else "")
        text = run_report(record, comparison, notes=plan.notes)
        try:
            report = write_report(cfg.report_dir, name, text)
        except OSError as exc:
            # A full disk, a report directory that cannot be written: the run is over and recorded as it
            # ended (its exit code stands); the record says why it has no report, and `moectl commit RUN`
            # writes that report from the record once there is room.
            report = None
            outcome.commit_error = not_written(f"cannot write the report {exc.filename or cfg.report_dir}: "
                                               f"{exc.strerror or exc}", record.id)
            record.commit_error = outcome.commit_error
            _save_late(outcome, lambda: store.save_run(record))
        if report is not None:
            outcome.report = report
            record.report = str(report)
            record.report_blob = gitops.blob_id(cfg.root, report, text)  # saved with `report` below
            _commit_report(cfg, outcome, report, base_runs, comparison, commit, extra_commit_paths, on_commit_wait)
    except KeyboardInterrupt:
        # Stopped between the report's writing and its commit's end (a sweep's own report being
        # written, the commit waiting for another git process): the run is over and recorded, its
        # report on disk; the record says where, and how to commit it, rather than only
        # "interrupted". (Stopped as the branch moved, the commit is whole - gitops puts its index
        # in - and is said as such.)
        if report is None and outcome.commit_error is None:  # (stopped as write_report returned: it is there)
            report = find_run_report(cfg.report_dir, record.id)
        if report is None:  # stopped before the report was written: `moectl commit` writes it from the record
            outcome.commit_error = outcome.commit_error or not_written("interrupted before the report was written",
                                                                       record.id)
            record.commit_error = outcome.commit_error
            _save_late(outcome, lambda: store.save_run(record))
            raise Interrupted(f"interrupted; {outcome.commit_error}") from None
        committing = commit and not plan.no_commit
        outcome.commit = gitops.committed_in(cfg.root, report) if committing else None
        if outcome.commit is None and committing:
            outcome.commit_error = not_committed("interrupted before the report was committed", record.id)
        record.report, record.commit, record.commit_error = str(report), outcome.commit, outcome.commit_error
        _save_late(outcome, lambda: store.save_run(record))
        raise Interrupted(f"interrupted; {outcome.commit_error}" if outcome.commit_error
                          else f"interrupted; the report was committed already ({outcome.commit[:10]})" if outcome.commit
                          else f"interrupted; the report is written ({report}; --no-commit)") from None
    # Trackers get a copy ([tracking]); one that fails is reported and retried by `moectl sync`,
    # never the run's outcome.
    from moectl.tracking import configured

    trackers = configured(cfg)
    if trackers and on_mirror is not None:  # (a server that does not answer takes its timeouts: not silent)
        on_mirror(trackers)
    try:
        outcome.tracking = mirror_run(cfg, record, report=report)
    except KeyboardInterrupt:
        # The run is over and recorded (above); only the trackers' copy was cut short, and what
        # was cut short is not recorded, so `moectl sync` finds it due. The outcome goes with the
        # interrupt: the command still shows the run's result.
        done = f"report committed ({outcome.commit[:10]})" if outcome.commit else "report written"
        raise Interrupted(f"interrupted while mirroring run {record.id} to its trackers; the run is recorded "
                          f"({record.status}, {done}); `moectl sync` mirrors it", outcome=outcome) from None


def _save_late(outcome: RunOutcome, save: Callable[[], object]) -> None:
    """A save of where a run's report is (or why there is none) into a record whose end is saved
    already. A disk that filled since (the room held for the end given back: store.save_final)
    leaves run.json as it ended - the run's outcome and exit code stand, said with the file, never
    an exit 2 in their place; `moectl commit RUN` finds the report and records it later."""
    try:
        save()
    except OSError as exc:
        said = f"run.json does not say so ({exc.filename or 'run.json'}: {exc.strerror or exc})"
        outcome.commit_error = f"{outcome.commit_error}; {said}" if outcome.commit_error else None
        if outcome.commit_error is None and outcome.commit is None:
            outcome.commit_error = said


def _commit_report(cfg: Config, outcome: RunOutcome, report: Path, base_runs: list[RunRecord], comparison,
                   commit: bool, extra_commit_paths: Callable[[RunRecord], Sequence[Path]],
                   on_commit_wait: Optional[Callable[[Path], None]]) -> None:
    """The commit of a written report (and the refreshed tracked files), saved in the record."""
    record, plan = outcome.record, outcome.plan
    # The branch the run was guarded on holds its report: with `branch = "*"` (any branch may
    # run) that is the one it started on, not one checked out while it trained.
    branch = record.git.branch if cfg.project.branch == "*" and record.git.branch else cfg.project.branch
    off_branch = gitops.off_branch(cfg.root, branch)
    # Off the project branch (a `git switch` while it trained), the tracked files moectl refreshes
    # (EXPERIMENTS.md, a sweep's report) are left alone: rewritten there, they would be a change
    # in someone else's branch that blocks switching back.
    outcome.extra_paths = list(extra_commit_paths(record)) if off_branch is None else []
    if commit and not plan.no_commit and off_branch is not None:
        outcome.commit_error = not_committed(off_branch, record.id)
    elif commit and not plan.no_commit:
        from moectl.summary import put_back  # (EXPERIMENTS.md as it was when nothing of ours is committed)

        try:  # (Ctrl-C while it waits for another git process: report_and_commit says how to commit)
            outcome.commit = gitops.commit_paths(
                cfg.root, [report, *outcome.extra_paths], commit_message(record, base_runs[-1] if base_runs else None, comparison),
                branch=branch,
                on_wait=on_commit_wait,
                unless_committed=report,
            )
        except BaseException as exc:
            put_back(cfg, outcome.extra_paths)  # `moectl commit` refreshes it again
            if not isinstance(exc, MoectlError):
                raise
            outcome.commit_error = not_committed(exc.message, record.id)
        if outcome.commit is not None:  # what the commit holds, read back: a file HEAD had as it is was left out
            outcome.extra_paths = gitops.paths_in_commit(cfg.root, outcome.commit, outcome.extra_paths)
        elif outcome.commit_error is None:
            # Another process committed the report while this one waited for git (the user's own
            # commit, say): that commit holds it, and the record says so. The files refreshed to go
            # with it are put back, as after a failed commit: nothing of moectl's is left changed.
            outcome.commit = gitops.committed_in(cfg.root, report)
            outcome.commit_found = outcome.commit is not None
            put_back(cfg, outcome.extra_paths)
            outcome.extra_paths = []

    # The record says where its report is and which commit holds it (`moectl commit RUN` fills a
    # commit in later; commit_error says why there is none yet). Read, changed and saved under the
    # record's lock: a commit another command recorded meanwhile is not written over with none.
    blob, theirs = record.report_blob, []

    def recorded(rec: RunRecord) -> None:
        rec.report, rec.report_blob = str(report), blob
        if outcome.commit is None and rec.commit is not None:
            theirs.append(rec.commit)
            rec.commit_found = True
        else:
            rec.commit, rec.commit_error, rec.commit_found = outcome.commit, outcome.commit_error, outcome.commit_found

    _save_late(outcome, lambda: store.update_run(record, recorded))
    if theirs:  # (and said as the one found above is)
        record.commit, record.commit_error, record.commit_found = theirs[-1], None, True
        outcome.commit, outcome.commit_error, outcome.commit_found = theirs[-1], None, True


def stdout_parser(cfg: Config, plan: RunPlan, nodes: int = 1) -> Optional[StdoutParser]:
    """The parser of a trainer whose metrics come from its output ([metrics] source = "stdout"), else None.
    `nodes`: how many nodes run `plan.nproc` processes each (a Slurm job's --nodes; the plan is per
    node), so the world size it records is every process of the run, as the engine's own is."""
    if cfg.metrics.source != "stdout":
        return None
    steps = plan.options.get("steps")
    return StdoutParser(StdoutFormat.from_config(cfg.metrics), planned_steps=steps if isinstance(steps, int) else None,
                        world_size=plan.nproc * nodes, device=plan.device)


def _run_metrics(record: RunRecord) -> RunMetrics:
    metrics = read_metrics(Path(record.exp_dir) / "metrics.jsonl")
    return RunMetrics(id=record.id, tag=record.tag, metrics=metrics, options=record.options, fallback=record.summary)


def _write_text(path: Path, text: str) -> None:
    from moectl.records import write_text_atomic

    write_text_atomic(path, text)


def fallback_request(cfg: Config, request: RunRequest, outcome: RunOutcome) -> Optional[RunRequest]:
    """The `--compile none` re-run of a run whose engine failed to compile (SPEC §3
    `launch.compile_fallback`), as its own run tagged `<tag>_fallback_none`; None when not due."""
    return _compile_fallback(cfg, request, compile_failed=outcome.compile_failed, tag=outcome.plan.tag,
                             run_id=outcome.plan.run_id, compile=outcome.plan.options.get("compile", "none"))


def record_fallback_request(cfg: Config, request: RunRequest, record: RunRecord) -> Optional[RunRequest]:
    """`fallback_request` for a run known by its finished record: a Slurm job's, followed from the
    submitting machine (its engine's exit code is the record's: finish_record keeps the worker's)."""
    failed = record.status == "failed" and record.exit_code == EXIT_COMPILE_FAILED
    return _compile_fallback(cfg, request, compile_failed=failed, tag=record.tag or request.tag or record.id,
                             run_id=record.id, compile=record.options.get("compile", "none"))


def _compile_fallback(cfg: Config, request: RunRequest, *, compile_failed: bool, tag: str, run_id: str,
                      compile: str) -> Optional[RunRequest]:
    # Exit 3 means "torch.compile failed" only in the engine's contract: a trainer of the user's own
    # (a script, or flags mapped by [launch.options]) may exit 3 for any reason of its own.
    if not (cfg.launch.compile_fallback and compile_failed) or compile == "none" \
            or not follows_engine_contract(cfg.launch, cfg.metrics):
        return None
    return request.model_copy(update={
        "compile": "none",
        "tag": f"{tag}_fallback_none",
        # a repeat's fallback joins a group of the fallbacks: they measure another configuration
        "group": f"{request.group}_fallback_none" if request.group else None,
        "exp_dir": None,
        "notes": f"compile fallback of {run_id} (engine exit {EXIT_COMPILE_FAILED}: torch.compile failed)",
    })