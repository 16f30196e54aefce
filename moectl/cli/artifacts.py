"""`moectl plot` and `moectl export`: figures and CSVs from the run store. Parse -> library -> render."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from moectl.cli.common import app, handle_errors, print_json, refuse_read_only, stderr, stdout
from moectl.cli.options import ConfigOpt, JsonOpt, PATH, path_text
from moectl.cli.runs import _config  # the store-reading config rule (file, or defaults + env root)

RunsArg = Annotated[List[str], typer.Argument(help="Runs: id, tag, unique prefix of either, or a run directory; a tag of a repeat group means all its runs.")]


def _resolve_unique(cfg, refs: list[str]):
    """Resolve RUN arguments with one store scan; a run named twice is used once. A tag whose
    latest run belongs to a repeat group means every completed run of the group (moectl.repeats)."""
    from moectl.gitops import same_repository
    from moectl.repeats import resolve_grouped

    records = [r for entry in resolve_grouped(cfg.artifact_root, refs, ours=same_repository(cfg.root)) for r in entry]
    seen: set[str] = set()
    unique = [r for r in records if not (r.id in seen or seen.add(r.id))]
    if len(unique) < len(records):
        stderr.print("warning: a run was named twice; using it once", markup=False)
    return unique


def _default_figure(metric: str, directory: Path = Path(".")) -> Path:
    """`<directory>/<metric>.png`, or `<metric>-2.png`, ... when that file exists: a figure nobody
    named never replaces a file (someone's own loss.png, tracked or not)."""
    path, n = directory / f"{metric}.png", 1
    while path.exists() or path.is_symlink():
        n += 1
        path = directory / f"{metric}-{n}.png"
    return path


@app.command("plot")
@handle_errors
def plot_cmd(
    runs: RunsArg,
    metric: Annotated[str, typer.Option("--metric", "-m", help="loss | tok_per_sec | mfu | dt_ms | aux_loss | drop_frac | expert_load_max | peak_mem_mib")] = "loss",
    output: Annotated[Optional[str], typer.Option("--output", "-o", parser=path_text, metavar="<path>", help="Figure file, replaced if it exists; the suffix picks the format (default: ./<metric>.png, or <metric>-2.png, ... rather than replace a file). A directory (one that exists, or a name ending in /, made if missing) gets that default name inside it.", show_default=False)] = None,
    title: Annotated[Optional[str], typer.Option("--title", help="Figure title (default: the metric's name).", show_default=False)] = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Per-step curves of one metric, one line per run, in one figure; prints its path.

    Needs the `plot` extra (pip install 'moectl\\[plot]'). The warm-up steps (config
    `metrics.warmup_steps`, which no summary counts) are shaded; where their tok/sec, dt or MFU would
    squash the curves they are drawn off scale, and the figure says so.

    Example:  [bold]moectl plot static_cap1p0 bufreuse --metric tok_per_sec -o tok_per_sec.png[/bold]
    """
    from moectl.plot import check_metric, make_plot

    check_metric(metric)  # before touching the store: a typo is the first thing to report
    cfg = _config(config)
    records = _resolve_unique(cfg, runs)
    if output is None:
        out = _default_figure(metric)
    elif output.endswith("/") or Path(output).expanduser().is_dir():  # `-o figures/`: in it, as cp puts a file
        out = _default_figure(metric, Path(output).expanduser())  # (make_plot makes a missing one)
    else:
        out = Path(output)
    refuse_read_only(cfg, out, "the figure")
    result = make_plot(records, metric, out, title, warmup_steps=cfg.metrics.warmup_steps)
    for line in result.skipped:
        stderr.print(f"warning: {line}", markup=False)
    path = result.path.resolve()
    if json_out:
        print_json({"path": str(path), "metric": metric, "runs": result.plotted,
                    "skipped": result.skipped, "off_scale": result.off_scale})
        return
    stdout.print(str(path), markup=False)


@app.command("export")
@handle_errors
def export_cmd(
    runs: RunsArg,
    csv_dir: Annotated[Path, typer.Option("--csv", parser=PATH, help="Directory for steps.csv and summary.csv (created if missing; both files replaced).")],
    window: Annotated[Optional[int], typer.Option("--window", "-w", min=1, help="Tail window of summary.csv (default: config metrics.window).", show_default=False)] = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Write per-step and summary CSVs of runs into a directory.

    DIR/steps.csv (run, step, every engine metric) and DIR/summary.csv (run, tag, status, steps, tail-window metrics, peak mem, total time,
    window, warm-up steps left out, steps in the window, clean = the window is past the warm-up, error line). Empty cells where a run lacks a value; steps.csv imports back with
    `moectl import DIR/steps.csv --format csv --run ID`.

    Example:  [bold]moectl export static_cap1p0 bufreuse --csv exports/capacity[/bold]
    """
    from moectl.export import export_csv

    cfg = _config(config)
    records = _resolve_unique(cfg, runs)
    refuse_read_only(cfg, csv_dir, "--csv")
    result = export_csv(records, csv_dir, window or cfg.metrics.window, cfg.metrics.warmup_steps)
    for run_id in result.without_steps:
        stderr.print(f"warning: {run_id}: no metrics steps; summary.csv has its recorded summary only", markup=False)
    if json_out:
        print_json({"steps_csv": str(result.steps_csv.resolve()), "summary_csv": str(result.summary_csv.resolve()),
                    "runs": result.runs, "step_rows": result.step_rows, "without_steps": result.without_steps})
        return
    stdout.print(str(result.steps_csv.resolve()), markup=False)
    stdout.print(str(result.summary_csv.resolve()), markup=False)
    stderr.print(f"exported {result.step_rows} step rows of {result.runs} run(s)", markup=False)
