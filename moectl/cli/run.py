"""`moectl run`: guards -> fresh directory -> torchrun -> live progress -> record -> report -> commit."""
from __future__ import annotations

import typer

from moectl.cli.common import (app, error, error_json, handle_errors, print_json, printable, recover_dead_index_lock,
                               stderr, stdout, stops_like_ctrl_c)
from moectl.cli.options import (
    BalanceOpt, BalanceRateOpt, BaselineOpt, CapOpt, CompileOpt, ConfigOpt, DetachOpt, DeviceOpt, DispatchOpt,
    DryRunOpt, EpOpt, ExpDirOpt, ExtraArgs, Fp8Opt, JsonOpt, NoCommitOpt, NodesOpt, NotesOpt, NprocOpt, OverrideOpt,
    PresetOpt, QuietOpt, RepeatOpt, RequeueOpt, SeedOpt, SlurmOpt, StepsOpt, TagOpt, WaitGpusOpt, request_kwargs,
)
from moectl.errors import EXIT_GUARD, EXIT_INTERRUPTED, EXIT_OK, GuardRefused, Interrupted, MoectlError, UsageError


@app.command(context_settings={"allow_interspersed_args": False})
@handle_errors
def run(
    ctx: typer.Context,
    cap: CapOpt = None,
    tag: TagOpt = None,
    compile: CompileOpt = None,
    fp8: Fp8Opt = None,
    dispatch: DispatchOpt = None,
    balance: BalanceOpt = None,
    balance_rate: BalanceRateOpt = None,
    ep: EpOpt = None,
    steps: StepsOpt = None,
    seed: SeedOpt = None,
    preset: PresetOpt = None,
    device: DeviceOpt = None,
    nproc: NprocOpt = None,
    exp_dir: ExpDirOpt = None,
    wait_gpus: WaitGpusOpt = None,
    override: OverrideOpt = None,
    no_commit: NoCommitOpt = False,
    dry_run: DryRunOpt = False,
    baseline: BaselineOpt = None,
    notes: NotesOpt = None,
    quiet: QuietOpt = False,
    slurm: SlurmOpt = False,
    nodes: NodesOpt = None,
    detach: DetachOpt = False,
    requeue: RequeueOpt = False,
    repeat: RepeatOpt = 1,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
    extra: ExtraArgs = None,
) -> None:
    """Run one guarded training run: every guard, a fresh timestamped directory, torchrun from the
    project's venv, live progress, the run record, a report, and a commit of that report (and of
    EXPERIMENTS.md, refreshed with it unless \\[report] summary = false) - nothing of yours.

    A run that passes its guards prints them as one line
    (`guards: 7 passed, gpus_idle skipped (cpu run: ...)`); a refusal and
    --dry-run print the full table, as `moectl check` does.

    Exit codes: 0 completed, 2 bad options/config, 3 a guard refused, 4 training failed, 130 interrupted.

    Examples:
      [bold]moectl run --cap 1.0 --tag bufreuse[/bold]
      [bold]moectl run --preset tiny --device cpu --steps 20 --no-commit[/bold]
      [bold]moectl run --cap 0 --dry-run -- --seed 3[/bold]          (engine args after --)
      [bold]moectl run --slurm --nodes 2 --nproc 8 --tag big[/bold]   (a Slurm job; follows it to its end)
      [bold]moectl run --slurm --detach --requeue -- --save-every 50[/bold]
      [bold]moectl run --cap 1.0 --tag bufreuse --repeat 3[/bold]    (seeds 0, 1, 2: one group)
    """
    from moectl.cli.env import _render_check, check_as_run, check_error_json, check_json
    from moectl.config import load_config
    from moectl.guards import summary_line
    from moectl.plan import make_request
    from moectl.progress import progress_for
    from moectl.gitops import same_repository
    from moectl.repeats import repeat_requests, resolve_baseline
    from moectl.runner import execute_run, fallback_request

    stops_like_ctrl_c(ctx)
    try:
        request = make_request(**request_kwargs(
            cap=cap, tag=tag, compile=compile, fp8=fp8, dispatch=dispatch, steps=steps, preset=preset,
            device=device, nproc=nproc, exp_dir=exp_dir, wait_gpus=wait_gpus, override=override, extra=extra, seed=seed,
            balance=balance, balance_rate=balance_rate, ep=ep,
            no_commit=no_commit, notes=notes,
        ))
        cfg = load_config(config)
        if wait_gpus is not None:
            from moectl.execution import choose_backend

            if choose_backend(cfg, slurm) == "slurm":  # (it was accepted, and the job looked once)
                raise UsageError("--wait-gpus: not with --slurm: Slurm decides when the job starts, and the job "
                                 "checks the GPUs it was given once, on its node")
        if not no_commit:
            from moectl.gitops import lock_wait_s

            lock_wait_s()  # a bad MOECTL_GIT_LOCK_WAIT is said now, not once training is over
        # a group (its id, or its tag) is its completed runs, as `compare --baseline` takes it
        base_record = (resolve_baseline(cfg.artifact_root, baseline, ours=same_repository(cfg.root))
                       if baseline else None)
        if dry_run:  # exactly what `moectl check` with these options prints
            ok = check_as_run(cfg, request, slurm=slurm, nodes=nodes, detach=detach, requeue=requeue, repeat=repeat,
                              json_out=json_out)
            raise typer.Exit(EXIT_OK if ok else EXIT_GUARD)
        recover_dead_index_lock(cfg)
    except MoectlError as exc:  # (a usage error, or a probe that could not look: --dry-run --json still says ok/guards)
        if dry_run and json_out:
            print_json(check_error_json(exc))
        raise  # (a plain --json run: handle_errors prints the error document)
    from moectl.cli.cluster import run_on_slurm, slurm_flags_need_slurm
    from moectl.execution import choose_backend

    if choose_backend(cfg, slurm) == "slurm":
        if repeat > 1:
            from moectl.cli.cluster import run_group_on_slurm

            group, requests = repeat_requests(cfg, request, repeat)
            run_group_on_slurm(cfg, group, requests, nodes=nodes, detach=detach, requeue=requeue,
                               json_out=json_out, baseline=base_record)
        run_on_slurm(cfg, request, nodes=nodes, detach=detach, requeue=requeue, quiet=quiet, json_out=json_out,
                     baseline=base_record)
        return
    slurm_flags_need_slurm(nodes=nodes, detach=detach, requeue=requeue)

    # What a person reads goes to stdout; with --json stdout is the JSON document's, so to stderr.
    say = (lambda text: (stderr if json_out else stdout).print(text, markup=False))  # noqa: E731

    def on_wait(results, waited_s):
        waiting = ", ".join(r.name for r in results if not (r.ok or r.overridden))
        say(f"waiting for {waiting} ({waited_s:.0f}s so far)")

    group_lock = None  # --repeat N: the run lock, held from the first repeat to the last (below)

    def on_start(record):
        if group_lock is not None:  # (named: a reader settling this run after a SIGKILL frees the lock too)
            group_lock.relabel(run_id=record.id)
        # Guards that let the run start are one line; the table is for refusals and `check`.
        say(summary_line(record.guards))
        say(f"run {record.id} -> {record.exp_dir}")

    def on_commit_wait(lock) -> None:
        # The run is over; a silent pause here would look like a hang.
        stderr.print(f"waiting for {lock} (another git process holds it) to commit the report", markup=False)

    def summary_paths(record):
        # EXPERIMENTS.md is refreshed and committed with the report (`report.summary` turns it off).
        if not cfg.report.summary:
            return []
        from moectl.errors import MoectlError
        from moectl.summary import write_summary

        try:
            return [write_summary(cfg)]
        except MoectlError as exc:
            error(f"EXPERIMENTS.md not refreshed: {exc.message}")
            return []

    def on_mirror(trackers) -> None:
        # A tracker server that does not answer holds the result for its timeouts: said, not silent.
        say(f"mirroring to {', '.join(trackers)} (never fails the run; Ctrl-C skips it, `moectl sync` retries)")

    def attempts(request) -> tuple[int, dict]:
        """One run to its end, re-run with --compile none when its compile failed; (exit code, the
        --json object: the last attempt's, any earlier one under `previous_attempts`)."""
        previous: list[dict] = []
        while True:
            progress = progress_for(json_out, quiet)
            stopped = None  # Ctrl-C while the trackers got their copy: the run's result is shown all the same
            try:
                outcome = execute_run(cfg, request, progress=progress, baseline=base_record,
                                      on_wait=on_wait, on_start=on_start, extra_commit_paths=summary_paths,
                                      on_commit_wait=on_commit_wait, on_mirror=on_mirror, run_lock=group_lock)
            except Interrupted as exc:
                if exc.outcome is None:
                    raise
                outcome, stopped = exc.outcome, exc
            finally:
                progress.close()
            if outcome.record is None:  # refused: nothing written
                if not json_out:
                    _render_check(outcome.plan, outcome.guards, False)
                error(REFUSED)
                # (with the keys of every --json failure, README "Commands", beside check's guards)
                return EXIT_GUARD, {**check_json(outcome.plan, outcome.guards, False), **error_json(REFUSED, EXIT_GUARD),
                                    **({"previous_attempts": previous} if previous else {})}
            retry = fallback_request(cfg, request, outcome)
            data = _outcome_json(outcome)
            if not json_out:
                _render_outcome(outcome)
            else:  # the outcome in one line where a person (or a log) looks, the record on stdout
                say(_status_line(outcome.record))
                if outcome.commit_error:
                    error(f"report not committed: {outcome.commit_error}")
            _warn_not_mirrored(outcome)
            if stopped is not None:
                error(stopped.message)
                return EXIT_INTERRUPTED, {**data, "interrupted": stopped.message, "previous_attempts": previous}
            if retry is None:
                return outcome.exit_code, {**data, "previous_attempts": previous}
            previous.append(data)
            say("torch.compile failed: re-running with --compile none (launch.compile_fallback)")
            request = retry

    if repeat == 1:
        code, data = attempts(request)
        if json_out:
            print_json(data)
        raise typer.Exit(code)
    # --repeat N: the same configuration N times, seeds seed, seed+1, ..., one group; the first
    # run that does not complete ends the group there (its exit code is the command's).
    group, requests = repeat_requests(cfg, request, repeat)
    # One run lock for the whole group, as a sweep holds one for its legs: each repeat letting go
    # of it at its end let a `moectl run` in (while a repeat's report commit waited for git, say),
    # which the next repeat's guard then refused, leaving the group cut short.
    from moectl.lock import acquire

    try:
        group_lock = acquire(cfg.artifact_root, None, f"moectl run --repeat {repeat} (group {group})")
    except GuardRefused:
        group_lock = None  # another moectl holds it: the first repeat's guards say so (or, overridden, run beside it)
    runs: list[dict] = []
    code = EXIT_OK
    between = False  # stopped before a repeat had a record of its own (its guards, its start)
    try:
        for i, one in enumerate(requests, start=1):
            say(f"repeat {i}/{repeat} of group {group} (seed {one.seed})")
            if group_lock is not None:
                group_lock.relabel(run_id=None)  # (until this repeat's run is made: on_start names it)
            try:
                code, data = attempts(one)
            except KeyboardInterrupt as exc:  # the repeats that ran are still the group's: said below
                error(getattr(exc, "message", None) or "interrupted")
                code, between = EXIT_INTERRUPTED, True
                break
            runs.append(data)
            if code != EXIT_OK:
                break
    finally:  # on every path: Ctrl-C, SIGTERM (as Ctrl-C), an error; a SIGKILL leaves it stale
        if group_lock is not None:
            group_lock.release()
    # The point of repeats: the group's mean and its between-runs error, right away.
    from moectl.cli.runs import group_mean_line, group_summary_json, group_summary_of

    # Only this group's runs: a repeat whose compile failed ends as its --compile none re-run, which
    # measures another configuration and is a group of its own (`<group>_fallback_none`).
    done = [d["exp_dir"] for d in runs if d.get("status") == "completed" and d.get("group") == group]
    summary = group_summary_of(cfg, done) if len(done) == repeat else None
    if json_out:  # summary: null unless every repeat completed (a mean over some of them would mislead)
        print_json({"group": group, "repeats": repeat, "runs": runs, "exit_code": code,
                    "summary": group_summary_json(*summary) if summary else None})
    if code == EXIT_OK:  # (what a person reads: on stdout, or beside --json's document on stderr)
        fallbacks = sorted({d["group"] for d in runs if d.get("group") and d["group"] != group})
        if summary:
            say(f"group {group}: " + group_mean_line(*summary, repeat))
            say(f"group {group}: {repeat} runs; compare, show, plot and export take the whole group by its "
                f"tag {requests[0].tag}")
        else:
            say(f"group {group}: {len(done)}/{repeat} completed; no group mean")
        if fallbacks:  # torch.compile failed: the figures are the re-runs', under their own group and tag
            tags = sorted({d["tag"] for d in runs if d.get("group") in fallbacks})
            say(f"torch.compile failed in {repeat - len(done)} of {repeat} repeats; their --compile none "
                f"re-runs are group {', '.join(fallbacks)} (tag {', '.join(tags)})")
            for fb in fallbacks:  # the figures a person was waiting for, under the group they belong to
                fb_done = [d["exp_dir"] for d in runs if d.get("group") == fb and d.get("status") == "completed"]
                if len(fb_done) >= 2:
                    say(f"group {fb}: " + group_mean_line(*group_summary_of(cfg, fb_done), len(fb_done)))
    if code != EXIT_OK and (between or len(runs) < repeat):
        def not_run(first: int) -> str:
            return f"repeat {first} was not run" if first == repeat else f"repeats {first}-{repeat} were not run"

        if between:  # (its record, if it got one, says how far it came: `moectl runs`)
            stderr.print(f"group {group}: interrupted at repeat {len(runs) + 1} of {repeat}"
                         + (f"; {not_run(len(runs) + 2)}" if len(runs) + 1 < repeat else ""), markup=False)
        else:
            last = runs[-1]
            # A run record says its status; a refusal before anything was written is the guards' verdict.
            how = last.get("status") or ("refused by its guards, nothing written" if last.get("ok") is False else f"exit {code}")
            stderr.print(f"group {group}: stopped at repeat {len(runs)} of {repeat} ({how}); {not_run(len(runs) + 1)}",
                         markup=False)
    raise typer.Exit(code)


def _outcome_json(outcome) -> dict:
    from moectl.store import run_json

    data = run_json(outcome.record)
    data["report"] = str(outcome.report) if outcome.report else None
    data["commit"] = outcome.commit
    data["commit_error"] = outcome.commit_error
    return data


def _status_line(record) -> str:
    """`completed: ID`, `failed: ID (trainer exit 1)`, `interrupted: ID (by SIGINT)`. The code is
    the trainer's (run.json `exit_code`), said as such: moectl's own exit is 4 for any failed run."""
    if record.status == "interrupted" and (record.error or "").startswith("interrupted by "):
        how = " (" + record.error.splitlines()[0].removeprefix("interrupted ") + ")"  # (by SIGINT): not torchrun's code
    else:
        how = f" (trainer exit {record.exit_code})" if record.status == "failed" and record.exit_code else ""
    return f"{record.status}: {record.id}{how}"


REFUSED = "a guard refused the run; nothing was written"

# The failed runs whose record's error is moectl's reason on its first line, then the log tail.
REASONS_BEFORE_TAIL = ("no step line in the trainer's output", "no step could be read from the trainer's output",
                       "the trainer exited 0 but")


def _render_outcome(outcome) -> None:
    from moectl.metrics import MARK, left_out, mark_footnote

    record = outcome.record
    out = lambda text: stdout.print(text, markup=False)  # noqa: E731
    s = record.summary
    out(_status_line(record))
    if s is not None and not s.steps and not s.run_steps:
        out("  no step was measured")  # (not "tail50 over 0 steps (warm-up only)")
    elif s is not None:
        mark = "" if s.clean else MARK
        after = ((" (warm-up only)" if not s.clean else f" after {left_out(s.warmup_steps, s.resumed_at)}"
                  if s.resumed_at else f" after {s.warmup_steps} warm-up") if s.warmup_steps else "")
        parts = [f"tail{s.window} over {min(s.steps, s.window)} steps{after}"]
        if s.tok_per_sec is not None:
            parts.append(f"{s.tok_per_sec:,.0f} tok/s{mark}")
        if s.dt_ms is not None:
            parts.append(f"{s.dt_ms:.2f} ms/step{mark}")
        if s.mfu is not None:
            parts.append(f"MFU {s.mfu:.2f}%{mark}")
        if s.final_loss is not None:
            parts.append(f"loss {s.final_loss:.4f}")
        elif s.final_loss_not_finite:
            parts.append("loss NaN")
        out("  " + " | ".join(parts))
        if not s.clean and s.steps:
            out("  " + mark_footnote(s.warmup_steps))
    for warning in record.warnings:
        out(f"  warning: {warning}")
    if record.status == "failed" and record.error:
        lines = record.error.strip().splitlines()
        if lines and lines[0].startswith(REASONS_BEFORE_TAIL):
            out(f"  error: {printable(lines[0])}")  # moectl's reason, above the log tail (which is not it)
            lines = lines[1:]
        if lines:  # (a trainer that printed nothing has no tail to show)
            out("  log tail:")
            for line in lines[-5:]:
                out(f"    {printable(line)}")
    if outcome.report:
        out(f"  report: {outcome.report}")
    if outcome.commit and outcome.commit_found:  # (someone else's commit: nothing of this run's to name in it)
        out(f"  report already committed in {outcome.commit[:10]}, not by this run; nothing committed")
    elif outcome.commit:  # (extra_paths: those the commit holds, read back from it)
        names = ", ".join(p.name for p in [outcome.report, *outcome.extra_paths] if p is not None)
        out(f"  committed {outcome.commit[:10]} ({names}; nothing else)")
    elif outcome.commit_error:
        error(f"report not committed: {outcome.commit_error}")
    if outcome.tracking:
        from moectl.cli.tracking import describe

        for result in outcome.tracking:
            if result.state.status == "mirrored":
                out(f"  {describe(result)}")


def _warn_not_mirrored(outcome) -> None:
    """A tracker that failed is a warning on stderr (the run's outcome and exit code stand)."""
    from moectl.cli.common import stderr
    from moectl.tracking import warning_lines

    for line in warning_lines(outcome.record.id, outcome.tracking):
        stderr.print(f"warning: {line}", markup=False)
