"""Runs that execute as Slurm jobs: `run --slurm` (its Slurm half), `wait`, `cancel`.
Logic lives in moectl/execution.py; this renders it."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moectl.cli.common import app, error, error_json, handle_errors, print_json, stderr, stdout, stops_like_ctrl_c
from moectl.cli.options import ConfigOpt, JsonOpt
from moectl.errors import EXIT_GUARD, EXIT_INTERRUPTED, EXIT_OK, UsageError


def slurm_flags_need_slurm(*, nodes, detach: bool, requeue: bool) -> None:
    given = [name for name, on in (("--nodes", nodes is not None), ("--detach", detach), ("--requeue", requeue)) if on]
    if given:
        raise UsageError(f"{given[0]} needs --slurm (or [cluster] backend = \"slurm\")")


def run_on_slurm(cfg, request, *, nodes, detach: bool, requeue: bool, quiet: bool, json_out: bool,
                 baseline=None) -> None:
    """`moectl run --slurm`: submit, then follow the job (unless --detach) and end as a local run does."""
    from moectl.cli.env import _render_check, check_json, job_view
    from moectl.execution import JobOptions, exit_code_of_record, follow, submit_run
    from moectl.progress import progress_for
    from moectl.runner import record_fallback_request
    from moectl.store import run_json

    if nodes is not None and nodes < 1:
        raise UsageError(f"--nodes: must be at least 1 (got {nodes})")
    out = lambda text: stdout.print(text, markup=False)  # noqa: E731

    def on_state(current):
        # The end is rendered below; here only what happens on the way (started, requeued, restarted).
        if json_out or current.status not in ("queued", "running"):
            return
        if current.status == "running":
            out(f"running: Slurm job {current.job_id} on {current.host}"
                + (f" (restart {current.restarts})" if current.restarts else ""))
        elif current.error:  # back in the queue after a requeue
            out(f"queued again: {current.error}")

    previous: list[dict] = []  # a compile failure's run, when its --compile none re-run follows
    failed = None  # ... and its record: the re-run trains that run's code snapshot
    while True:
        submitted = submit_run(cfg, request, JobOptions(nodes=nodes, requeue=requeue, summary=cfg.report.summary,
                                                         baseline=baseline, fallback_in_job=detach, code_of=failed))
        if submitted.record is None:
            shown, where = job_view(cfg, submitted.plan, nodes if nodes is not None else cfg.cluster.nodes)
            refused = "a guard refused the run; nothing was submitted"
            if json_out:
                print_json({**check_json(shown, submitted.guards, False), "command_where": where,
                            **error_json(refused, EXIT_GUARD), **({"previous_attempts": previous} if previous else {})})
            else:
                _render_check(shown, submitted.guards, False, where=where)
            error(refused)
            raise typer.Exit(EXIT_GUARD)
        record = submitted.record
        if not json_out:
            out(f"submitted {record.id} as Slurm job {record.job_id} ({record.nodes} node(s)) -> {record.exp_dir}")
        if detach:
            if json_out:
                print_json({"id": record.id, "job_id": record.job_id, "exp_dir": record.exp_dir, "status": record.status})
            else:
                out(f"detached: `moectl wait {record.id}` follows it, `moectl cancel {record.id}` stops it")
            raise typer.Exit(EXIT_OK)

        progress = progress_for(json_out, quiet)
        try:
            final = follow(record, progress, on_state=on_state)
        except KeyboardInterrupt:
            progress.close()
            from moectl.execution import read_record

            try:
                queued = read_record(Path(record.exp_dir)).status == "queued"
            except Exception:  # noqa: BLE001 - only the wording depends on it
                queued = False
            goes_on = "stays in the queue" if queued else "keeps running"
            error(f"detached: Slurm job {record.job_id} {goes_on}; `moectl cancel {record.id}` "
                  f"(or scancel {record.job_id}) stops it, `moectl wait {record.id}` follows it again")
            raise typer.Exit(EXIT_INTERRUPTED)
        progress.close()
        # launch.compile_fallback, as a local run does: the engine failed to compile in the job, so
        # the same run goes again with --compile none, as its own run (and its own job).
        retry = record_fallback_request(cfg, request, final)
        if retry is None:
            break
        previous.append(run_json(final))
        failed = final
        if not json_out:
            _render_final(final)
            out("torch.compile failed in the job: submitting a re-run with --compile none (launch.compile_fallback)")
        request = retry
    code = exit_code_of_record(final)
    if json_out:
        print_json({**run_json(final), "previous_attempts": previous})
    else:
        _render_final(final)
    raise typer.Exit(code)


def run_group_on_slurm(cfg, group: str, requests, *, nodes, detach: bool, requeue: bool, json_out: bool,
                       baseline=None) -> None:
    """`moectl run --slurm --repeat N`: the N runs of a repeat group as N jobs side by side (Slurm
    schedules them as it can), then - unless --detach - wait for all of them and end as a local
    group does: the first failure's exit code, or 0."""
    from moectl.execution import exit_code_of_record, wait_for
    from moectl.store import run_json

    if nodes is not None and nodes < 1:
        raise UsageError(f"--nodes: must be at least 1 (got {nodes})")
    out = lambda text: stdout.print(text, markup=False)  # noqa: E731
    records = []
    try:
        _submit_group(cfg, group, requests, records, nodes=nodes, requeue=requeue, json_out=json_out,
                      baseline=baseline)
    except KeyboardInterrupt:
        # Stopped before the group was whole: no part of it is left queued (as a sweep stopped while
        # submitting). Following the jobs is another matter: Ctrl-C there only detaches (below).
        if not records:
            raise
        from moectl.errors import Interrupted, MoectlError
        from moectl.execution import cancel_runs

        try:
            cancel_runs(records)
            said = f"its {len(records)} queued run(s) were cancelled"
        except MoectlError as exc:
            said = f"cancelling its queued runs failed ({exc.message}): `moectl cancel {group}` stops them"
        raise Interrupted(f"interrupted while submitting repeat group {group}; {said}") from None
    if detach:
        if json_out:
            print_json({"group": group, "runs": [{"id": r.id, "job_id": r.job_id, "exp_dir": r.exp_dir,
                                                  "status": r.status} for r in records]})
        else:
            out(f"detached: repeat group {group}; `moectl wait {group}` follows its runs, `moectl cancel {group}` stops them")
        raise typer.Exit(EXIT_OK)
    try:
        finals = wait_for(records)
    except KeyboardInterrupt:
        error(f"detached: the jobs of group {group} keep running; `moectl cancel {group}` stops them, "
              f"`moectl wait {group}` follows them again")
        raise typer.Exit(EXIT_INTERRUPTED)
    codes = [exit_code_of_record(r) for r in finals]
    # The point of repeats, as a local `run --repeat` ends: the group's mean and between-runs error,
    # when every repeat of this group completed (a --compile none re-run measures another configuration).
    from moectl.cli.runs import group_mean_line, group_summary_json, group_summary_of

    done = [r.exp_dir for r in finals if r.status == "completed" and r.group == group]
    summary = group_summary_of(cfg, done) if len(done) == len(finals) else None
    if json_out:
        print_json({"group": group, "repeats": len(finals), "runs": [run_json(r) for r in finals],
                    "summary": group_summary_json(*summary) if summary else None})
    else:
        for final in finals:
            _render_final(final)
        out(f"repeat group {group}: {sum(1 for r in finals if r.status == 'completed')}/{len(finals)} completed; "
            "`moectl compare` on its tag shows them as one entry with the between-run error")
        if summary:
            out(f"group {group}: " + group_mean_line(*summary, len(finals)))
        fallbacks = sorted({r.group for r in finals if r.group and r.group != group})
        if fallbacks:  # torch.compile failed in the jobs: their --compile none re-runs are a group of their own
            out(f"torch.compile failed in the jobs; their --compile none re-runs are group {', '.join(fallbacks)} "
                f"(tag {next(r.tag for r in finals if r.group in fallbacks)})")
    raise typer.Exit(next((c for c in codes if c != EXIT_OK), EXIT_OK))


def _submit_group(cfg, group: str, requests, records: list, *, nodes, requeue: bool, json_out: bool, baseline) -> None:
    """Submit a repeat group's jobs one by one, each record appended to `records` once queued."""
    from moectl.cli.env import _render_check, check_json, job_view
    from moectl.execution import JobOptions, submit_run
    from moectl.store import run_json

    out = lambda text: stdout.print(text, markup=False)  # noqa: E731
    for request in requests:
        # launch.compile_fallback inside each job: N jobs, N possible re-runs, and wait_for follows
        # each failed run on to its re-run, whether this command or a later `moectl wait` waits.
        submitted = submit_run(cfg, request, JobOptions(nodes=nodes, requeue=requeue, summary=cfg.report.summary,
                                                         baseline=baseline, fallback_in_job=True))
        if submitted.record is None:  # the submitting machine's guards: the rest would be refused too
            shown, where = job_view(cfg, submitted.plan, nodes if nodes is not None else cfg.cluster.nodes)
            if not json_out:
                _render_check(shown, submitted.guards, False, where=where)
            error(f"a guard refused repeat {len(records) + 1} of group {group}; nothing more was submitted"
                  + (f" ({len(records)} already queued: `moectl cancel {group}` stops them)" if records else ""))
            if json_out:
                print_json({**check_json(shown, submitted.guards, False), "command_where": where, "group": group,
                            "runs": [run_json(r) for r in records]})
            raise typer.Exit(EXIT_GUARD)
        records.append(submitted.record)
        if not json_out:
            r = submitted.record
            out(f"submitted {r.id} (seed {request.seed}) as Slurm job {r.job_id} ({r.nodes} node(s)) -> {r.exp_dir}")


def _render_final(record) -> None:
    from moectl.cli.run import _render_outcome
    from moectl.runner import RunOutcome

    if record.status == "refused":
        error(record.error or "refused inside the job")
        return
    report = Path(record.report) if record.report else None
    outcome = RunOutcome(exit_code=0, plan=None, guards=record.guards, record=record,  # type: ignore[arg-type]
                         report=report, commit=record.commit, commit_error=record.commit_error,
                         commit_found=record.commit_found)
    if report is not None and record.commit and not record.commit_found:  # the job committed it: name what it holds
        from moectl.gitops import files_of_commit

        outcome.extra_paths = [Path(f) for f in files_of_commit(report.parent, record.commit) if Path(f).name != report.name]
    _render_outcome(outcome)
    if record.status == "interrupted" and record.error:
        stdout.print(f"  {record.error.splitlines()[0]}", markup=False)


def _resolve_targets(cfg, refs: list[str], sweeps: Optional[list] = None):
    """RUN, GROUP or SWEEP arguments -> run records: a sweep, every leg that has a run (and the
    sweep itself appended to `sweeps`, when given); a repeat group (its id, or a tag whose latest
    run is in one), every run of the group whatever its state."""
    from moectl import store
    from moectl.gitops import same_repository
    from moectl.repeats import means_group
    from moectl.sweep.store import find_sweep, find_sweep_runs

    runs = store.list_runs(cfg.artifact_root)
    ours = same_repository(cfg.root)
    out: list = []
    for ref in refs:
        legs = find_sweep_runs(cfg.artifact_root, ref, runs, ours)
        if legs is not None:
            out += legs
            if sweeps is not None:
                sweeps.append(find_sweep(cfg.artifact_root, ref, ours=ours))
            continue
        group = [r for r in runs if r.group == ref]
        if not group:
            rec = store.resolve_run(cfg.artifact_root, ref, runs, ours)
            group = [r for r in runs if r.group == rec.group] if means_group(ref, rec) else [rec]
        out += sorted(group, key=lambda r: (r.repeat or 0, r.id))
    from moectl.execution import run_key

    seen: set[str] = set()  # (by directory: two sweeps' legs may share an id)
    return [r for r in out if not (run_key(r) in seen or seen.add(run_key(r)))]


@app.command()
@handle_errors
def wait(
    ctx: typer.Context,
    targets: Annotated[list[str], typer.Argument(help="Runs (id, tag, prefix, path), repeat groups (id, or a tag whose latest run is in one) or sweeps (name or id).", metavar="RUN|SWEEP...")],
    timeout: Annotated[Optional[str], typer.Option("--timeout", help="Give up after this long, e.g. 90s, 30m, 2h (exit 130; the jobs keep running).", show_default=False)] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Block until the runs, or every leg of the sweeps, settle (and a Slurm sweep's final-report job
    has written and committed its report); exit as a run would.

    Exit codes: 0 all completed, 4 one failed, 3 one was refused inside its job, 130 one was
    interrupted (or --timeout passed first). A Slurm run whose job is gone without a word ends
    `failed` (never started) or `interrupted` (it did, or it was cancelled before it started). A
    run whose engine failed to compile and whose job re-ran it with --compile none
    (launch.compile_fallback: sweep legs, --detach, --repeat) ends as that re-run.

    Examples:
      [bold]moectl wait big[/bold]
      [bold]moectl wait capacity --timeout 2h[/bold]     (every leg of sweep `capacity`)
    """
    import time

    from moectl import slurm
    from moectl.cli.runs import _config  # reading the store needs no config file, as for show/export
    from moectl.execution import exit_code_of, wait_for
    from moectl.plan import parse_duration
    from moectl.store import run_json
    from moectl.sweep.cluster import wait_for_report_job

    stops_like_ctrl_c(ctx)  # a CI timeout's SIGTERM: exit 130 as Ctrl-C, not 143
    cfg = _config(config)
    timeout_s = parse_duration(timeout, "--timeout") if timeout is not None else None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    sweeps: list = []
    with slurm.answering_by(deadline):  # (a record's staleness is a question to Slurm too)
        records = _resolve_targets(cfg, targets, sweeps)
    try:
        final = wait_for(records, None if deadline is None else max(0.0, deadline - time.monotonic()))
        for sweep in sweeps:  # its legs settled; the report job writes and commits the sweep report
            wait_for_report_job(Path(sweep.exp_dir), deadline)
    except TimeoutError as exc:
        error(f"--timeout {timeout} passed; still going: {exc}")
        if json_out:  # where each one stands now: a polling caller learns the states, not only 130
            from moectl.execution import read_record
            from moectl.store import load_run

            # (a local run whose moectl died reads `stale`, as in `runs --json`: its training still stops)
            print_json([run_json(read_record(Path(r.exp_dir)) if r.backend == "slurm" else load_run(Path(r.exp_dir)))
                        for r in records])
        raise typer.Exit(EXIT_INTERRUPTED)
    from moectl.summary import resume_command
    from moectl.sweep.store import load_sweep

    for sweep in sweeps:  # its report job ended without the report (cancelled, failed): say how to get it
        current = load_sweep(Path(sweep.exp_dir))
        if current.report_job and current.finished_at is None and current.report is None:
            # A warning, not an error: the exit code is the legs' (SPEC §8: the training did what it
            # did), as a local sweep whose final report was cut short ends with its legs' code too.
            stderr.print(f"warning: sweep {current.id}: its final-report job {current.report_job} ended without "
                         f"writing the sweep report; `{resume_command(current)}` writes it", markup=False)
    if json_out:
        print_json([run_json(r) for r in final])
    else:
        asked = {r.id for r in records}
        for r in final:
            stood_in = r.id not in asked and r.notes  # a failed run's --compile none re-run: say whose
            stdout.print(f"{r.status}: {r.id}" + (f" (Slurm job {r.job_id})" if r.job_id else "")
                         + (f" — {r.notes}" if stood_in else ""), markup=False)
            if r.commit_error:  # the job could not commit its report (a branch switched meanwhile, ...)
                error(f"report not committed: {r.commit_error}")
    raise typer.Exit(exit_code_of(final))


@app.command()
@handle_errors
def cancel(
    targets: Annotated[list[str], typer.Argument(help="Runs, repeat groups or sweeps whose Slurm jobs to cancel.", metavar="RUN|SWEEP...")],
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """scancel the Slurm jobs of runs (or of every unfinished leg of sweeps); each record ends `interrupted`.

    Exit codes: 0 cancelled, or nothing left to cancel (finished runs are left as they are); 2 an
    unknown run, a local run (stop it with Ctrl-C where it runs), or Slurm not reachable.

    Examples:
      [bold]moectl cancel big[/bold]
      [bold]moectl cancel capacity[/bold]
    """
    from moectl.cli.runs import _config  # the records and Slurm are all it needs, as wait
    from moectl.execution import cancel_runs
    from moectl.store import run_json

    cfg = _config(config)
    records = _resolve_targets(cfg, targets)
    final = cancel_runs(records)
    if json_out:
        print_json([run_json(r) for r in final])
    elif not final:
        stdout.print("nothing to cancel: no queued or running Slurm job among them", markup=False)
    else:
        for r in final:
            stdout.print(f"{r.status}: {r.id} (Slurm job {r.job_id} cancelled)", markup=False)
