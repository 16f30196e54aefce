"""`moectl sync`: mirror runs into the trackers of `[tracking]` after the fact (moectl/tracking.py)."""
from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from moectl.cli.common import app, error, handle_errors, print_json, stderr, stdout, stops_like_ctrl_c
from moectl.cli.options import ConfigOpt, JsonOpt
from moectl.errors import EXIT_OK, EXIT_USAGE, GuardRefused, Interrupted


@app.command("sync")
@handle_errors
def sync_cmd(
    ctx: typer.Context,
    runs: Annotated[Optional[List[str]], typer.Argument(help="Runs to mirror (id, tag, prefix or path); none = every run of this project not yet mirrored.", metavar="[RUN]...", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be mirrored; contact no tracker.")] = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Mirror finished runs (imported ones too) into MLflow / W&B, as configured in \\[tracking].

    Without RUN: every finished run of this project that a configured tracker does not hold yet —
    never mirrored, failed (tracker down, not installed), or mirrored before the config named
    another target. With RUN: those runs, checked against each tracker again. Another
    repository's runs in a shared artifact root (run.json `repo`, as `moectl summary` reads it)
    are left out, and refused when named: that project's own `moectl sync` mirrors them.
    Idempotent either way: a run is found again by its moectl run id (MLflow tag
    `moectl_run_id`, W&B run id derived from it) and only what the tracker lacks is sent, so
    nothing is duplicated. Each run's run.json records what was mirrored where (`tracking`).

    Exit codes: 0 every mirror succeeded, 2 no tracker configured, a run not finished or another
    repository's, or a tracker failed (named on stderr, recorded in run.json; run `moectl sync`
    again to retry), 3 a local store where moectl may not write, 130 interrupted (Ctrl-C,
    SIGTERM: stops at once; the mirror cut short is not recorded, so `moectl sync` retries it).

    Examples:
      [bold]moectl sync[/bold]                        (retry whatever has not been mirrored)
      [bold]moectl sync bufreuse static_cap1p0[/bold]  (mirror or re-check two runs)
      [bold]moectl sync --dry-run --json[/bold]
    """
    from moectl.config import load_config
    from moectl.tracking import mirror_run, mlflow_local_store, sync_plan, wandb_local_dir, warning_lines

    stops_like_ctrl_c(ctx)  # SIGTERM/SIGHUP: as Ctrl-C, exit 130, nothing half-recorded
    cfg = load_config(config)
    plan = sync_plan(cfg, runs or [])
    if dry_run:
        if json_out:
            print_json([{"run": rec.id, "trackers": names} for rec, names in plan])
        else:
            for rec, names in plan:
                stdout.print(f"{rec.id}: {', '.join(names)}", markup=False)
            if not plan:
                stdout.print("nothing to sync: every finished run is mirrored", markup=False)
        raise typer.Exit(EXIT_OK)

    store = mlflow_local_store(cfg) if any("mlflow" in names for _, names in plan) else None
    wandb_dir = wandb_local_dir(cfg) if any("wandb" in names for _, names in plan) else None
    if store is not None or wandb_dir is not None:
        # What the paths guard of `moectl run` says of a tracker's local files, exit 3 as there.
        from moectl.guards import tracker_store_problems
        from moectl.probes import _real, tracker_in_work_tree

        mirrored = ("[tracking] mlflow_uri",) * (store is not None) + ("$WANDB_DIR",) * (wandb_dir is not None)
        problems = tracker_store_problems(_real(store) if store else None, _real(cfg.artifact_root),
                                          [_real(p) for p in cfg.read_only],
                                          [(label, p) for label, p in tracker_in_work_tree(cfg) if label in mirrored],
                                          _real(wandb_dir) if wandb_dir else None)
        if problems:
            raise GuardRefused("; ".join(problems) + " — fix [tracking] or [paths] in the config, or $WANDB_DIR")
    rows, failed = [], 0
    for i, (rec, names) in enumerate(plan):
        try:
            results = mirror_run(cfg, rec, only=names)
        except KeyboardInterrupt:
            left = len(plan) - i - 1
            more = f", {left} more run(s) not attempted" if left else ""
            raise Interrupted(f"interrupted while mirroring run {rec.id}{more}; `moectl sync` retries what "
                              "was not mirrored") from None
        for r in results:
            failed += r.state.status == "failed"
            rows.append({"run": rec.id, "tracker": r.tracker, **r.state.model_dump(mode="json"),
                         "added": r.added, "note": r.note})
            if not json_out and r.state.status == "mirrored":
                stdout.print(f"{rec.id}: {describe(r)}", markup=False)
        for line in warning_lines(rec.id, results):
            stderr.print(f"warning: {line}", markup=False)
    if json_out:
        print_json(rows)
    elif not plan:
        stdout.print("nothing to sync: every finished run is mirrored", markup=False)
    if failed:
        error(f"{failed} mirror(s) failed; run.json records them and `moectl sync` retries them")
        raise typer.Exit(EXIT_USAGE)
    raise typer.Exit(EXIT_OK)


def describe(result) -> str:
    """`mirrored to mlflow (run 3f2a..., +40 metric points, +12 params, +3 files): URL`."""
    state, added = result.state, result.added
    parts = [f"run {state.run_id}"] if state.run_id else []
    parts += [f"+{n} {what.replace('_', ' ')}" for what, n in added.items()]
    text = f"mirrored to {result.tracker}" + (f" ({', '.join(parts)})" if parts else "")
    if result.note:
        text += f"; {result.note}"
    elif state.location:
        text += f": {state.location}"
    return text
