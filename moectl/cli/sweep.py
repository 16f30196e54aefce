"""`moectl sweep` (legs one by one, resumable) and `moectl summary` (EXPERIMENTS.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moectl.cli.common import (app, error, handle_errors, print_json, recover_dead_index_lock, stderr, stdout,
                               stops_like_ctrl_c)
from moectl.cli.options import ConfigOpt, DetachOpt, JsonOpt, OverrideOpt, SlurmOpt, WaitGpusOpt, PATH
from moectl.errors import EXIT_OK, UsageError


@app.command(no_args_is_help=True)
@handle_errors
def sweep(
    ctx: typer.Context,
    spec: Annotated[Optional[Path], typer.Argument(parser=PATH, help="Sweep spec (TOML): name, \\[common], \\[\\[legs]] or \\[grid].", show_default=False)] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="Run the legs of this sweep (id, unique prefix, name or path) that did not complete, in a fresh -resume directory (all completed but no final report: writes that report).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the legs and their exact commands; write nothing.")] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failed leg.")] = False,
    baseline: Annotated[Optional[str], typer.Option("--baseline", help="Leg tag to compare against (default: the first completed leg).", show_default=False)] = None,
    wait_gpus: WaitGpusOpt = None,
    override: OverrideOpt = None,
    no_commit: Annotated[bool, typer.Option("--no-commit", help="Write the reports but commit nothing.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live progress.")] = False,
    slurm: SlurmOpt = False,
    max_parallel: Annotated[Optional[int], typer.Option("--max-parallel", help="Slurm: legs in flight at once (default: \\[cluster] max_parallel, else all).", show_default=False)] = None,
    detach: DetachOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    r"""Run a sweep: every leg through the same guards, record, report and commit as `moectl run`
    (one after another here, or side by side as Slurm jobs with --slurm).

    One sweep directory holds the legs, with a sweep.json that stays true through failures, Ctrl-C
    and crashes. After each leg: its report, the sweep report, a commit. At the end: the comparison
    of all completed legs, the fastest leg, figures, a commit.

    Exit codes: 0 all legs completed, 2 bad spec/options, 3 a guard refused, 4 some leg failed, 130 interrupted.

    Spec example (capacity.toml):

      name = "capacity"
      \[common]
      compile = "static"
      \[\[legs]]
      tag = "static_cap1p0"
      cap = 1.0
      # or: \[grid]  cap = [0.0, 1.0]  compile = ["static", "none"]   (tags like static_cap1p0)
      # repeats = 3 (in \[common] or a leg): each leg 3 times, seeds seed, seed+1, seed+2,
      # compared as one group (mean of tail means ± between-runs error)

    Examples:
      [bold]moectl sweep sweeps/capacity.toml --dry-run[/bold]
      [bold]moectl sweep sweeps/capacity.toml --baseline static_cap0p0[/bold]
      [bold]moectl sweep --resume 20260224_172715_moe-capacity[/bold]
      [bold]moectl sweep sweeps/capacity.toml --slurm --max-parallel 4[/bold]   (legs side by side as Slurm jobs)

    With --slurm every leg is a Slurm job (at most --max-parallel at once) and one more job writes the
    final comparison, figures and report once the last leg settles; moectl follows them to the end
    unless --detach (then `moectl wait SWEEP`). --resume with --slurm resubmits only the unfinished legs.
    """
    from moectl.config import load_config
    from moectl.plan import make_request
    from moectl.progress import progress_for
    from moectl.sweep.run import (
        SweepOptions, SweepUI, _check_baseline, dry_run as plan_legs, plan_resume, resume_sweep, run_sweep,
    )
    from moectl.sweep.store import final_report_owed
    from moectl.sweep.spec import load_spec

    stops_like_ctrl_c(ctx)  # SIGTERM/SIGHUP between legs or while submitting them: as Ctrl-C (exit 130)
    if (spec is None) == (resume is None):
        raise UsageError("give a sweep spec (SPEC.toml) or --resume SWEEP, not both" if spec else
                         "give a sweep spec (SPEC.toml) or --resume SWEEP")
    if resume is not None and not resume.strip():
        raise UsageError("an empty SWEEP for --resume: give a sweep id, name, unique prefix, or its directory")
    # Flag values go through the same validation as `moectl run`'s (one line per bad option).
    make_request(wait_gpus=wait_gpus, overrides=list(override or []))
    opts = SweepOptions(fail_fast=fail_fast, baseline=baseline, wait_gpus=wait_gpus,
                        overrides=list(override or []), no_commit=no_commit)
    parsed = load_spec(spec) if spec is not None else None  # validated whole before the config is even read
    cfg = load_config(config)
    if parsed is not None:
        from moectl.sweep.run import check_name_fits

        check_name_fits(cfg, parsed.name)
    if parsed is not None and cfg.defaults.seed is not None:
        # repeats start at [defaults] seed, as `run --repeat` does (a leg's own seed still wins)
        parsed = load_spec(spec, default_seed=cfg.defaults.seed)
    if not no_commit:
        from moectl.gitops import lock_wait_s

        lock_wait_s()  # a bad MOECTL_GIT_LOCK_WAIT is said now, not after the last leg
    # What a person reads: on stdout, or with --json (stdout is the JSON document's) on stderr.
    out = lambda text: (stderr if json_out else stdout).print(text, markup=False)  # noqa: E731
    from moectl.execution import choose_backend

    # The flags the sweep would refuse, the dry run refuses too.
    on_slurm = choose_backend(cfg, slurm) == "slurm"
    if on_slurm:
        if max_parallel is not None and max_parallel < 1:
            raise UsageError(f"--max-parallel: must be at least 1 (got {max_parallel})")
        # Accepted and ignored before: the legs ran on after a failure, the jobs looked at the GPUs once.
        if fail_fast:
            raise UsageError("--fail-fast: not with --slurm: the legs go to Slurm together and run side by side "
                             "(`moectl cancel SWEEP` stops the rest)")
        if wait_gpus is not None:
            raise UsageError("--wait-gpus: not with --slurm: Slurm decides when each job starts, and a job checks "
                             "the GPUs it was given once, on its node")
    elif max_parallel is not None or detach:
        raise UsageError(f"{'--max-parallel' if max_parallel is not None else '--detach'} needs --slurm "
                         "(or [cluster] backend = \"slurm\")")

    if dry_run:
        if parsed is not None:
            name, legs, resumed_from, previous, owed = parsed.name, parsed.legs, None, None, False
        else:
            from moectl.sweep.store import list_sweeps, original_sweep

            old, legs, _, _ = plan_resume(cfg, resume)
            # as the resume's sweep.json will say: the chain's original, and the sweep it continues
            name, previous = old.name + "-resume", old.id
            resumed_from = original_sweep(old, {s.id: s for s in list_sweeps(cfg.artifact_root)})
            from moectl.sweep.cluster import report_job_ended

            owed = final_report_owed(old, legs, report_job_ended(old))
        _check_baseline(opts, legs)  # what the sweep itself would refuse, the dry run refuses
        planned = plan_legs(cfg, [leg for leg in legs if leg.state == "pending"], name, opts)
        if json_out:
            print_json({"name": name, "resumed_from": resumed_from, "previous": previous, "legs": planned,
                        "final_report_owed": owed})
        else:
            out(f"sweep {name}: {len(planned)} leg(s) to run" + (f" (resuming {previous})" if previous else ""))
            for leg in legs:
                if leg.state != "pending":
                    out(f"  {leg.tag}: {leg.state} (run {leg.run_id}), not re-run")
            for p in planned:
                out(f"  {p['tag']}: {p['command']}")
            if owed:
                out(f"  the final report of {previous} was never written: the resume writes and commits it")
        raise typer.Exit(EXIT_OK)
    recover_dead_index_lock(cfg)

    def on_wait(results, waited_s):
        waiting = ", ".join(r.name for r in results if not (r.ok or r.overridden))
        out(f"waiting for {waiting} ({waited_s:.0f}s so far)")

    def on_commit_wait(lock) -> None:
        # A leg (or the sweep) is over; a silent pause here would look like a hang. (`moectl run`'s line.)
        stderr.print(f"waiting for {lock} (another git process holds it) to commit the report", markup=False)

    ui = SweepUI(say=out, progress=lambda: progress_for(json_out, quiet), on_wait=on_wait,
                 on_commit_wait=on_commit_wait)
    submit = None
    if on_slurm:
        from moectl.sweep.cluster import submit_sweep

        submit = lambda cfg, sweep, opts, ui, carried, chain: submit_sweep(  # noqa: E731
            cfg, sweep, opts, max_parallel=max_parallel, ui=ui, carried=carried, chain=chain)
    outcome = run_sweep(cfg, parsed, opts, ui, submit) if parsed is not None else resume_sweep(cfg, resume, opts, ui, submit)
    if submit is not None and outcome.sweep is not None and not outcome.nothing_to_run:
        _follow_slurm_sweep(outcome, detach=detach, json_out=json_out, out=out)

    if json_out:
        print_json(outcome.to_json())
    for line in outcome.refused:
        error(f"refused: {line}")
    for line in outcome.messages:
        if line not in outcome.refused:
            out(f"note: {line}")
    if outcome.report:
        out(f"sweep report: {outcome.report}")
    if outcome.comparison is not None:
        from moectl.sweep.report import recommendation

        rec = recommendation(outcome.comparison)
        if rec:
            out(f"recommendation: {rec}")
    if outcome.commits:
        out(f"committed {len(outcome.commits)} commit(s), last {outcome.commits[-1][:10]} "
            f"({_committed_files(cfg.root, outcome.commits)}; nothing else)")
    unfinished = [leg for leg in outcome.sweep.legs if leg.state != "completed"] if outcome.sweep else []
    if unfinished and outcome.exit_code != EXIT_OK:
        from moectl.summary import resume_command

        # The next command, where the person is looking (EXPERIMENTS.md has it too).
        out(f"{len(unfinished)} leg(s) did not complete; resume them in a fresh directory: "
            f"{resume_command(outcome.sweep)}")
    elif outcome.sweep is not None and final_report_owed(outcome.sweep, outcome.sweep.legs):
        from moectl.summary import resume_command

        # Every leg completed, but the final report was cut short (Ctrl-C) or not committed.
        out(f"every leg completed, but the sweep's final report is not finished; write it: {resume_command(outcome.sweep)}")
    raise typer.Exit(outcome.exit_code)


def _committed_files(root: Path, commits: list[str]) -> str:
    """`5 reports, 4 figures, EXPERIMENTS.md`: the files the sweep's commits hold, by kind (each a
    file moectl wrote: the legs' and the sweep's reports, the final figures, the summary)."""
    from moectl.config import SUMMARY_NAME
    from moectl.gitops import files_of_commit

    files = {f for sha in commits for f in files_of_commit(root, sha)}
    figures = sum(1 for f in files if f.endswith(".png"))
    summary = any(Path(f).name == SUMMARY_NAME for f in files)  # (at the config's root, maybe not the repository's)
    reports = len(files) - figures - summary
    return ", ".join([f"{reports} report{'s' if reports != 1 else ''}"]
                     + ([f"{figures} figure{'s' if figures != 1 else ''}"] if figures else [])
                     + ([SUMMARY_NAME] if summary else []))


def _follow_slurm_sweep(outcome, *, detach: bool, json_out: bool, out) -> None:
    """`sweep --slurm` after submitting: return (--detach) or wait for the legs and the report job."""
    from moectl.errors import EXIT_INTERRUPTED
    from moectl.sweep.cluster import follow_sweep

    sweep = outcome.sweep
    if detach:
        if json_out:
            print_json(outcome.to_json())
        else:
            out(f"detached: `moectl wait {sweep.id}` follows it, `moectl cancel {sweep.id}` stops its legs")
        raise typer.Exit(EXIT_OK)
    try:
        final, code = follow_sweep(Path(sweep.exp_dir))
    except KeyboardInterrupt:
        error(f"detached: the legs keep running; `moectl cancel {sweep.id}` stops them, `moectl wait {sweep.id}` follows them")
        raise typer.Exit(EXIT_INTERRUPTED)
    outcome.sweep, outcome.exit_code = final, code
    outcome.report = Path(final.report) if final.report else None
    if json_out:
        print_json(outcome.to_json())
    else:
        for leg in final.legs:
            out(f"  {leg.tag}: {leg.state} (run {leg.run_id})")
        if final.report:
            out(f"sweep report: {final.report}")
        unfinished = [leg for leg in final.legs if leg.state != "completed"]
        if unfinished and code != EXIT_OK:  # the next command, as a local sweep ends
            from moectl.summary import resume_command

            out(f"{len(unfinished)} leg(s) did not complete; resume them in a fresh directory: {resume_command(final)}")
    raise typer.Exit(code)


@app.command()
@handle_errors
def summary(
    no_commit: Annotated[bool, typer.Option("--no-commit", help="Write EXPERIMENTS.md but do not commit it.")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", parser=PATH, help="Write here instead of <repo>/EXPERIMENTS.md (never committed): a new file, or one an earlier -o wrote.", show_default=False)] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Regenerate EXPERIMENTS.md from the run store and git: runtime status, every sweep with its
    table and conclusion, unfinished legs with the exact resume command, standalone runs, their
    repeat groups (mean ± between-runs error), moectl's latest report commits, the constraints from
    .moectl.toml. Commits it (only it).

    When nothing but the snapshot of the moment (timestamp, runtime status) would change, the file
    is left as it is (and committed, if HEAD's copy is older).

    Exit codes: 0 done; 2 bad config or -o, git could not sign or has no user.name/user.email, or
    the disk is full (the file goes back to what it was); 3 refused, nothing written: someone's own
    changes to EXPERIMENTS.md, a read-only tree or .git, the wrong branch or a detached HEAD
    (`--no-commit` writes it anyway), or git busy or refusing the commit (the file goes back to
    what it was).

    Examples:
      [bold]moectl summary[/bold]
      [bold]moectl summary --no-commit -o /tmp/handoff.md[/bold]
    """
    from moectl import gitops
    from moectl.cli.common import refuse_read_only
    from moectl.config import SUMMARY_NAME, load_config
    from moectl.errors import GuardRefused, MoectlError
    from moectl.summary import put_back, refresh_summary, summary_path

    cfg = load_config(config)
    commit = output is None and not no_commit
    # A killed moectl's .git/index.lock: finished or undone now, not only by a commit (a summary
    # with nothing new to commit would leave it blocking every git command, index out of date).
    recover_dead_index_lock(cfg)
    # As every file moectl writes (exit 3), and before anything is: the file, then where it goes.
    refuse_read_only(cfg, output if output is not None else summary_path(cfg), "-o" if output is not None else SUMMARY_NAME)
    if commit:
        try:
            gitops.check_branch(cfg.root, cfg.project.branch)
        except GuardRefused as exc:
            raise GuardRefused(f"{exc.message}; {SUMMARY_NAME} left as it is (`--no-commit` writes it without committing)") from None
    path, changed = refresh_summary(cfg, output)
    sha, failure = None, None
    # Up to date on disk is not committed: a `--no-commit` run refreshed the file and left HEAD's
    # copy behind (still saying `running`). The file on disk is moectl's here (refresh_summary
    # refuses one with anyone else's changes), so it is what goes in.
    if commit and (changed or gitops.committed_in(cfg.root, path) is None):
        try:
            sha = gitops.commit_paths(cfg.root, [path], "summary: regenerate EXPERIMENTS.md", branch=cfg.project.branch)
        except MoectlError as exc:
            failure = exc
            if changed:  # nothing half-done: the file goes back to what it was (summary.put_back)
                put_back(cfg, [path])
                changed = False
    if json_out:
        print_json({"path": str(path), "changed": changed, "commit": sha,
                    "commit_error": failure.message if failure else None})
    elif failure is None:
        said = ("regenerated" if changed else "up to date on disk, older in HEAD" if sha
                else "already up to date (only the timestamp and runtime snapshot would change)")
        stdout.print(f"{path}: {said}", markup=False)
        if sha:
            stdout.print(f"committed {sha[:10]} (EXPERIMENTS.md only)", markup=False)
    if failure is not None:
        error(f"{SUMMARY_NAME} not committed: {failure.message}; the file is left as it was")
        raise typer.Exit(failure.exit_code)

