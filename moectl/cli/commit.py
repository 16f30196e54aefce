"""`moectl commit RUN`: commit a run's report later, once whatever stopped its commit is fixed."""
from __future__ import annotations

from moectl.cli.common import app, handle_errors, print_json, stderr, stdout
from moectl.cli.options import ConfigOpt, JsonOpt, RunArg


@app.command("commit")
@handle_errors
def commit_cmd(
    run: RunArg,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Commit a run's report whose own commit was stopped (and EXPERIMENTS.md); nothing else.

    For when the wrong branch was checked out as a long run ended, or another git process held
    .git/index.lock past the wait (MOECTL_GIT_LOCK_WAIT seconds, default 10): fix that, then run
    this. Also commits a `run --no-commit` report - only as moectl wrote it: an edit of yours to
    it, staged or not, is refused and left as it is - and writes then commits the report of a run
    whose moectl was killed after its training, before the report. A report already committed is
    left alone.

    Exit codes: 0 committed or already committed, 2 unknown run or no report, a run of another
    repository (run.json `repo`; commit it there), or git could not sign or has no
    user.name/user.email, 3 refused: wrong branch, detached HEAD, git still busy,
    git refusing the branch update (a reference-transaction hook), your own edits in the
    report, or the run's own moectl still writing and committing its report; nothing moved.

    A repeat group (its id, or the tag of `run --repeat N --no-commit`) commits the report of
    each of its repeats that ended (--json: {"group", "runs": [...]}).

    Examples:
      [bold]moectl commit 20250224_182427_moe-bufreuse[/bold]
      [bold]moectl commit bufreuse --json[/bold]
    """
    from moectl.commit import commit_run_report, refuse_other_project
    from moectl.config import load_config
    from moectl.gitops import same_repository
    from moectl.repeats import means_group
    from moectl.store import list_runs, resolve_run

    cfg = load_config(config)
    runs = list_runs(cfg.artifact_root)
    # A repeat group (its id, or a tag whose newest run is one of its repeats, as `compare` reads
    # it): every repeat that ended has a report of its own, all committed, one after another.
    group = run if any(r.group == run for r in runs) else None
    if group is None:
        record = resolve_run(cfg.artifact_root, run, runs, same_repository(cfg.root))
        group = record.group if means_group(run, record) else None
    # Another project's run or group (a shared artifact root): said as such, not as "no report".
    members = [r for r in runs if r.group == group] if group else []
    refuse_other_project(cfg, members[0] if members else record)
    records = (sorted((r for r in runs if r.group == group and r.status in ("completed", "failed", "interrupted")),
                      key=lambda r: (r.repeat or 0, r.id)) if group else [record])
    if not records:
        from moectl.errors import UsageError

        raise UsageError(f"group {group} has no run that ended yet: reports are written when a run ends")

    def on_wait(lock) -> None:
        stderr.print(f"waiting for {lock} (another git process holds it)", markup=False)

    done = []
    for record in records:  # the first refusal stops it (the same cause would stop the rest); those before stay
        result = commit_run_report(cfg, record, on_wait=on_wait)
        for line in result.warnings:
            stderr.print(f"warning: {line}", markup=False)
        done.append({"run": result.run_id, "report": str(result.report), "paths": [str(p) for p in result.paths],
                     "commit": result.commit, "created": result.created})
        if json_out:
            continue
        if result.created:
            names = ", ".join(p.name for p in result.paths)
            stdout.print(f"committed {result.commit[:10]} ({names}; nothing else)", markup=False)
        else:
            stdout.print(f"{result.report.name} is already committed in {result.commit[:10]}; nothing to do", markup=False)
    if json_out:
        print_json({"group": group, "runs": done} if group else done[0])
