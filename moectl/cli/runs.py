"""`moectl runs`, `show`, `compare`, `import`: reading the run store. Parse -> library -> render."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, List, Optional

import typer

if TYPE_CHECKING:  # rich is imported where a table is drawn: `--json` never pays for it
    from rich.table import Table

from moectl.cli.common import app, handle_errors, print_json, printable, stderr, stdout
from moectl.cli.options import ConfigOpt, JsonOpt, RunArg, PATH
from moectl.errors import GuardRefused, UsageError

STATUSES = ("created", "queued", "running", "completed", "failed", "interrupted", "refused", "imported", "stale")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")



def _config(path: Optional[Path], read_only: bool = False):
    """The config in force: --config, else the nearest .moectl.toml, else built-in defaults
    (reading the store needs no config file; MOECTL_ARTIFACT_ROOT still applies). `read_only`:
    a command that only reads the config (`runs`) takes it through the pydantic-free read path."""
    from moectl import config as c

    load, default = (c.read_config, c.read_default_config) if read_only else (c.load_config, c.default_config)
    if path is not None:
        return load(path)
    found = c.find_config()
    return load(found) if found else default()


def _warn_corrupt(messages: list[str]) -> None:
    if messages:
        stderr.print(f"warning: skipped {len(messages)} unreadable run record(s)", markup=False)
        for m in messages:
            stderr.print(f"  {m}", markup=False)


def _print_table(table: "Table") -> None:
    """Tables are never squeezed into 80 columns when piped or captured (rich's default then):
    a file or a pager can take a wide line, a folded number is useless. Nor on a terminal narrower
    than the table (80 or 100 columns, or TERM=dumb, which rich holds at 80): squeezed, rich cut
    numbers without a mark (22,719 tok/s shown as `22,71`) and shrank compare's run column to
    nothing. The table is drawn at its own width there, and the terminal wraps its lines."""
    from rich.measure import Measurement

    if stdout.is_terminal:
        needed = Measurement.get(stdout, stdout.options.update_width(10_000), table).maximum
        if needed <= stdout.width:
            stdout.print(table)
            return
        console = stdout.get()
        width = console.width
        console.width = needed  # (the same console: its colours and settings, wider for this one table)
        try:
            console.print(table, crop=False)
        finally:
            console.width = width
    else:
        from rich.console import Console

        Console(width=max(stdout.width, 200), highlight=False, soft_wrap=True).print(table)


def _num(value: Optional[float], decimals: int = 2) -> str:
    return "—" if value is None else f"{value:,.{decimals}f}"


# --- runs ----------------------------------------------------------------------------------------


@app.command("runs")
@handle_errors
def runs_cmd(
    json_out: JsonOpt = False,
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", min=0, help="Show at most N runs, newest first (0 = all).")] = None,
    status: Annotated[Optional[str], typer.Option("--status", help=f"Only runs with this status ({'|'.join(STATUSES)}).")] = None,
    config: ConfigOpt = None,
) -> None:
    """List the runs in the artifact root, newest first, with their tail-window metrics.

    Columns: id, status (stale = its moectl died without saying so), tag, repeat (2/3: the
    second run of a repeat group of three), key options, tail tok/sec, MFU, peak memory, total minutes; † marks a tail mean of a run that never got past
    its warm-up steps; ! marks a run whose record carries a warning (e.g. its loss went NaN),
    listed under the table. --json prints the run records as in run.json.

    Example:  [bold]moectl runs --status completed --limit 10[/bold]
    """
    if status is not None and status not in STATUSES:
        raise UsageError(f"unknown status {status!r} (choose from {', '.join(STATUSES)})")
    cfg = _config(config, read_only=True)
    if json_out:  # the records as they are, through the pydantic-free read path (typed in loops)
        from moectl.runindex import scan_run_json

        records, corrupt = scan_run_json(cfg.artifact_root)
        _warn_corrupt(corrupt)
        records = [r for r in records if status is None or r["status"] == status]
        print_json(records[:limit] if limit else records)
        return
    from moectl.metrics import MARK
    from moectl.repeats import planned_repeats
    from moectl.report import is_marked, marked_footnote
    from moectl.store import scan_runs

    scan = scan_runs(cfg.artifact_root)
    _warn_corrupt(scan.corrupt)
    runs = [r for r in scan.runs if status is None or r.display_status == status]
    if limit:
        runs = runs[:limit]
    if not runs:
        stdout.print(f"no runs under {cfg.artifact_root}", markup=False)
        return
    colours = {"completed": "green", "failed": "red", "interrupted": "yellow", "stale": "magenta", "running": "cyan",
               "queued": "blue", "refused": "red"}

    def status_cell(r) -> str:
        st = r.display_status
        # `!`: the record carries a warning (a loss that went NaN, a pattern that never matched), listed below
        return (f"[{colours[st]}]{st}[/]" if st in colours else st) + (" [yellow]![/]" if r.warnings else "")

    def opt(key, show=str):
        # The flag as given, else what the engine resolved it to (a preset's cap, compile, ...).
        def cell(r):
            value = {**(r.engine or {}), **(r.options or {})}.get(key)
            # `is`, not `in`: 0.0 == False, and cap 0 (dropless) is the ablation people look for
            return "" if value is None or value is False else show(value)
        return cell

    def metric(key, decimals):
        return lambda r: (_num(getattr(r.summary, key), decimals) + (MARK if is_marked(r.summary, key) else "")
                          if r.summary else "—")

    def repeat_cell(r) -> str:
        # `2/3`: the second of a group of three (`run --repeat 3`, sweep `repeats`); compare a tag to see the group
        if not r.repeat:
            return ""
        n = planned_repeats(r.group) if r.group else None
        return f"{r.repeat}/{n}" if n else str(r.repeat)

    columns = [  # (header, right-aligned, cell); job and option columns with no value in any row are dropped
        ("id", False, lambda r: r.id), ("status", False, status_cell), ("tag", False, lambda r: r.tag or ""),
        ("repeat", False, repeat_cell), ("job", False, lambda r: r.job_id or ""),
        ("preset", False, opt("preset")), ("cap", False, opt("cap")), ("compile", False, opt("compile")),
        ("fp8", False, opt("fp8", lambda v: "yes")),
        ("balance", False, opt("balance", lambda v: "" if v == "loss" else v)),
        ("ep", False, opt("ep", lambda v: "" if v == 1 else str(v))),
        ("tok/sec", True, metric("tok_per_sec", 0)), ("MFU %", True, metric("mfu", 2)),
        ("peak MiB", True, metric("peak_mem_mib", 0)), ("min", True, metric("total_time_min", 2)),
    ]
    cells = [[cell(r) for _, _, cell in columns] for r in runs]
    always = ("id", "status", "tag", "tok/sec", "MFU %", "peak MiB", "min")  # SPEC §4's columns, — when empty
    keep = [i for i, (h, _, _) in enumerate(columns) if h in always or any(row[i] not in ("", "—") for row in cells)]
    from rich.table import Table

    table = Table(title=f"runs in {cfg.artifact_root}", title_justify="left")
    for i in keep:
        header, right, _ = columns[i]
        table.add_column(header, justify="right" if right else "left", no_wrap=header != "tag", overflow="fold")
    for row in cells:
        table.add_row(*(row[i] for i in keep))
    _print_table(table)
    for line in marked_footnote([r.summary for r in runs]):
        if line:
            stdout.print(line, markup=False)
    for r in runs:
        if r.warnings:
            more = f" (+{len(r.warnings) - 1} more: `moectl show {r.id}`)" if len(r.warnings) > 1 else ""
            stdout.print(f"! {r.id}: {r.warnings[0]}{more}", markup=False)


# --- show ----------------------------------------------------------------------------------------


def _group_cell(rec) -> Optional[str]:
    """`<group id> (repeat 2 of 3; `moectl show <group id>` shows the group)`, None for a lone run."""
    if not rec.group:
        return None
    from moectl.repeats import planned_repeats

    n = planned_repeats(rec.group)
    which = f"repeat {rec.repeat}" + (f" of {n}" if n else "") if rec.repeat else "a repeat"
    return f"{rec.group} ({which}; `moectl show {rec.group}` shows the group)"

_SPARK = "▁▂▃▄▅▆▇█"
_NOT_FINITE = "×"


def sparkline(values: list[float], width: int = 48) -> str:
    """A one-line picture of a series: bucket means scaled onto eight block heights; a bucket
    holding a NaN/inf value (a diverged loss) is `×`, and the scale is the finite buckets'."""
    if not values:
        return ""
    n = min(width, len(values))
    buckets = [values[i * len(values) // n:(i + 1) * len(values) // n] for i in range(n)]
    means = [sum(b) / len(b) for b in buckets if b]
    finite = [m for m in means if math.isfinite(m)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    span = (hi - lo) or 1.0
    return "".join(_SPARK[min(7, int((m - lo) / span * 8))] if math.isfinite(m) else _NOT_FINITE for m in means)


@app.command("show")
@handle_errors
def show_cmd(
    run: RunArg,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Everything recorded for one run.

    The record, tail summary, guards, overrides, files, the error tail of a failed run, warnings
    (e.g. a metrics pattern that never matched), and a sparkline of loss and tok/sec. A tag whose
    latest run belongs to a repeat group shows the group: each repeat's tail figures and their
    mean ± the between-runs standard error; a run id shows that one run.

    Example:  [bold]moectl show bufreuse[/bold]
    """
    from engine.schema import METRICS_FILENAME
    from moectl.metrics import read_metrics
    from moectl.gitops import same_repository
    from moectl.repeats import planned_repeats, resolve_entries
    from moectl.store import list_runs, run_json

    cfg = _config(config)
    runs = list_runs(cfg.artifact_root)
    ours = same_repository(cfg.root)
    [entry] = resolve_entries(cfg.artifact_root, [run], runs, ours)
    if len(entry.runs) > 1:
        _show_group(cfg, entry, json_out)
        return
    rec = entry.runs[0]
    # A tag shared by several runs means the newest (SPEC §4): say so, or an older one is invisible.
    # A tag of a repeat group means its completed runs: here the only one, which need not be the newest.
    # Another repository's runs with this tag (a shared artifact root) are passed over for ours: said too.
    tagged = [r for r in runs if r.tag == rec.tag and r.id != rec.id] \
        if run not in (rec.id, rec.exp_dir) and entry.group is None else []
    theirs = sum(1 for r in tagged if not ours(r.repo)) if ours(rec.repo) else 0
    sharing = len(tagged) - theirs
    exp = Path(rec.exp_dir)
    files = sorted(
        ({"name": p.name, "bytes": p.stat().st_size if p.is_file() else None, "dir": p.is_dir()}
         for p in exp.iterdir() if not p.name.startswith(".")),
        key=lambda f: f["name"],
    ) if exp.is_dir() else []
    metrics = read_metrics(exp / METRICS_FILENAME)
    # A run still training has no summary yet (the record gets it at the end); its tail so far is
    # what a person, or an agent polling it, checks - as `compare` shows it, marked unfinished.
    so_far = None
    if rec.summary is None and rec.display_status in ("running", "queued") and metrics.steps:
        from moectl.metrics import tail_summary

        so_far = tail_summary(metrics, rec.window or cfg.metrics.window,
                              rec.warmup_steps if rec.warmup_steps is not None else cfg.metrics.warmup_steps)
    if json_out:
        print_json(run_json(rec) | {"files": files, "metrics_steps": len(metrics.steps),
                                    "metrics_skipped": metrics.skipped, "metrics_unreadable": metrics.unreadable,
                                    "summary_so_far": so_far.model_dump(mode="json") if so_far else None})
        return

    out = stdout.print
    gone = "its Slurm job is gone" if rec.backend == "slurm" else "owner gone"
    out(f"[bold]{rec.id}[/bold]  status: {rec.display_status}" + (f" (recorded: {rec.status}, {gone})" if rec.stale else ""))
    if sharing or theirs:
        ours_ = "this project's " if theirs else ""
        newest = (f"the newest of {ours_}{sharing + 1} runs tagged {rec.tag}" if sharing
                  else f"this project's run tagged {rec.tag}")
        also = f"; {theirs} more of another repository sharing this artifact root" if theirs else ""
        out(f"  ({newest}{also}: `moectl runs` lists them, an id shows another)", markup=False)
    if entry.group is not None:
        n = planned_repeats(entry.group)
        what = "the only completed repeat" if rec.status == "completed" else "no repeat completed: the latest"
        out(f"  ({what} of group {entry.group}" + (f", {n} planned" if n else "")
            + (f"; left out: {', '.join(entry.left_out)}" if entry.left_out else "")
            + "; an id shows another)", markup=False)
    for key, value in (
        ("tag", rec.tag), ("exp_dir", rec.exp_dir), ("created", rec.created_at), ("started", rec.started_at),
        ("finished", rec.finished_at), ("exit code", rec.exit_code), ("host", rec.host), ("pid", rec.pid),
        ("gpus", ", ".join(rec.gpus) or None), ("driver", rec.driver), ("torch", rec.torch_version),
        ("sweep", rec.sweep), ("group", _group_cell(rec)), ("source", rec.source), ("notes", rec.notes),
        ("slurm job", f"{rec.job_id} ({rec.nodes} node(s)" + (f", {rec.restarts} restart(s))" if rec.restarts else ")")
         if rec.job_id else None),
        ("report", rec.report), ("commit", rec.commit or (f"none: {rec.commit_error}" if rec.commit_error else None)),
        ("fallback", f"{rec.fallback_run} (the --compile none re-run)" if rec.fallback_run else None),
    ):
        if value not in (None, ""):
            out(f"  {key:10} {value}", markup=False)
    if rec.git.commit:
        out(f"  {'git':10} {rec.git.branch or 'detached'} @ {rec.git.commit[:12]}{' (dirty)' if rec.git.dirty else ''}", markup=False)
    for name, mirror in rec.tracking.items():  # trackers this run was mirrored into ([tracking])
        text = f"{mirror.status}: {mirror.location or mirror.run_id or mirror.target}"
        out(f"  {name:10} {text}" + (f" ({mirror.error}; `moectl sync` retries)" if mirror.error else ""), markup=False)
    if rec.options:
        out("  options    " + " ".join(f"{k}={v}" for k, v in sorted(rec.options.items())), markup=False)
    from moectl.report import recorded_command

    command = recorded_command(rec)
    if command:
        out("  command    " + command, markup=False)
    s = rec.summary or so_far
    if so_far is not None:
        out(f"still training: {len(metrics.steps)} steps so far; the figures below are theirs, not final", markup=False)
    if s is not None:
        from moectl.metrics import MARK, left_out, mark_footnote

        def tail(value, decimals=2):  # a tail mean, marked when it is warm-up only
            return _num(value, decimals) + (MARK if value is not None and not s.clean else "")

        after = ((", all warm-up" if not s.clean else f", after {left_out(s.warmup_steps, s.resumed_at)}")
                 if s.warmup_steps else "")
        out(f"summary (last {s.steps} of window {s.window}{after}): tok/sec {tail(s.tok_per_sec)} · "
            f"dt {tail(s.dt_ms)} ms · MFU {tail(s.mfu, 4) + ('%' if s.mfu is not None else '')} · peak {_num(s.peak_mem_mib)} MiB · "
            f"{_num(s.total_time_min)} min · final loss {_final_loss(s)} · drop {tail(s.drop_frac, 4)}",
            markup=False)
        if s.note:
            out(f"  note: {s.note}", markup=False)
        if not s.clean and s.steps:
            out(f"  {mark_footnote(s.warmup_steps)}", markup=False)
    if metrics.skipped:  # (compare reads the same file: its figures leave these lines out too)
        out(f"  note: {metrics.skipped} line(s) of {METRICS_FILENAME} could not be read and are left out", markup=False)
    if metrics.unreadable:
        out(f"  note: {METRICS_FILENAME} cannot be read ({metrics.unreadable}); the figures are the record's", markup=False)
    if metrics.steps:
        losses = [m.loss for m in metrics.steps]
        tps = [m.tok_per_sec for m in metrics.steps if m.tok_per_sec is not None]
        out(f"loss     {sparkline(losses)}  {losses[0]:.4f} → {losses[-1]:.4f} ({len(losses)} steps)", markup=False)
        if tps:
            out(f"tok/sec  {sparkline(tps)}  {tps[0]:,.0f} → {tps[-1]:,.0f}", markup=False)
    for warning in rec.warnings:
        out(f"warning: {warning}", markup=False)
    if rec.guards:
        from rich.table import Table

        table = Table(title="guards", title_justify="left")
        for col in ("guard", "ok", "message"):
            table.add_column(col)
        for g in rec.guards:
            mark = "overridden" if g.overridden else ("skipped" if g.skipped else ("pass" if g.ok else "FAIL"))
            table.add_row(g.name, mark, g.message)
        _print_table(table)
    if rec.overrides:
        out("overrides: " + ", ".join(rec.overrides), markup=False)
    if files:
        out("files: " + "  ".join(f["name"] + ("/" if f["dir"] else f" ({f['bytes']} B)") for f in files), markup=False)
    if rec.error:
        out("error tail:", markup=False)
        out(printable(rec.error.rstrip()), markup=False)


def _final_loss(s) -> str:
    """A summary's final loss for a line of text: NaN, with the step it went from, when it diverged."""
    if s.final_loss_not_finite:
        return f"NaN (not finite from step {s.loss_not_finite_from})"
    return _num(s.final_loss, 4)


def _show_group(cfg, entry, json_out: bool) -> None:
    """`show` of a repeat group: every repeat's tail figures, then their mean ± between-runs error."""
    from moectl.noise import BETWEEN_RUNS
    from moectl.store import run_json

    runs = entry.runs
    summary, errors = group_summary_of(cfg, [r.exp_dir for r in runs])
    group = runs[-1].group
    if json_out:
        print_json({"group": group, "tag": runs[-1].tag, "n_repeats": len(runs), "noise": BETWEEN_RUNS,
                    "summary": group_summary_json(summary, errors), "runs": [run_json(r) for r in runs],
                    "left_out": entry.left_out})
        return
    out = lambda text: stdout.print(text, markup=False)  # noqa: E731
    out(f"group {group}  tag: {runs[-1].tag}  {len(runs)} completed repeats")
    for r in runs:
        s = r.summary
        seed = r.options.get("seed")
        mfu = s.mfu if s else None
        out(f"  {r.id}  seed {seed if seed is not None else '?'}  {r.status}  "
            f"tok/sec {_num(s.tok_per_sec if s else None)} · dt {_num(s.dt_ms if s else None)} ms · "
            f"MFU {_num(mfu, 4)}{'' if mfu is None else '%'}" + (f"  warnings: {len(r.warnings)}" if r.warnings else ""))
    if entry.left_out:
        out(f"left out (not in the mean): {', '.join(entry.left_out)}")
    out(group_mean_line(summary, errors, len(runs)))
    if summary.note:
        out(f"note: {summary.note}")
    out("one repeat in detail: `moectl show RUN_ID`")


def group_summary_of(cfg, exp_dirs) -> tuple:
    """A repeat group's (summary, between-runs errors) from its runs' metrics files; a run whose
    metrics.jsonl is gone gives its recorded summary instead (as `compare` reads it)."""
    from engine.schema import METRICS_FILENAME
    from moectl.errors import MoectlError
    from moectl.metrics import group_summary, read_metrics
    from moectl.store import load_run

    def recorded(d):
        try:
            return load_run(Path(d)).summary
        except MoectlError:
            return None

    return group_summary([read_metrics(Path(d) / METRICS_FILENAME) for d in exp_dirs],
                         cfg.metrics.window, cfg.metrics.warmup_steps, [recorded(d) for d in exp_dirs])


def group_summary_json(summary, errors) -> dict:
    from moectl.metrics import METRICS

    return {m: {"value": getattr(summary, m), "stderr": errors[m]} for m in METRICS}


def group_mean_line(summary, errors, n: int) -> str:
    """`mean of 3 tail means (± between-runs standard error): tok/sec 28,855.00 ±210.00 · ...`"""
    from moectl.metrics import MEAN_METRICS

    parts = []
    for m, label, decimals in (("tok_per_sec", "tok/sec", 2), ("dt_ms", "dt ms", 2), ("mfu", "MFU %", 4)):
        if getattr(summary, m) is not None:
            err = f" ±{errors[m]:,.{decimals}f}" if m in MEAN_METRICS and errors[m] is not None else ""
            parts.append(f"{label} {getattr(summary, m):,.{decimals}f}{err}")
    return f"mean of {n} tail means (± between-runs standard error): " + (" · ".join(parts) or "no figures")


# --- compare -------------------------------------------------------------------------------------


def load_comparison(root: Path, refs: list[str], baseline: Optional[str], window: int, warmup_steps: int = 0,
                    ours=None):
    """Resolve refs (one scan), read their metrics, compare. A tag whose latest run belongs to a
    repeat group is the group (moectl.repeats); `ours` as moectl.store.resolve_run takes it.
    Returns (comparison, every run record involved)."""
    from moectl.metrics import compare
    from moectl.repeats import entry_metrics, resolve_entries
    from moectl.store import list_runs

    runs = list_runs(root)
    entries = resolve_entries(root, refs, runs, ours)
    base_index = 0
    if baseline is not None:
        [base] = resolve_entries(root, [baseline], runs, ours)
        keys = [e.id for e in entries]
        if base.id in keys:
            base_index = keys.index(base.id)
        else:
            entries.insert(0, base)
    seen: set[str] = set()
    unique = [e for e in entries if not (e.id in seen or seen.add(e.id))]
    if len(unique) < 2:  # `compare r <r's group id>`, `compare r --baseline r`: nothing to compare it with
        raise UsageError(f"compare needs two distinct runs: {', '.join(refs + ([baseline] if baseline else []))} "
                         f"all mean {unique[0].id}")
    if len(unique) < len(entries):
        stderr.print("warning: a run was named twice; comparing it once", markup=False)
        base_index = [e.id for e in unique].index(entries[base_index].id)
    inputs = [entry_metrics(e, window) for e in unique]
    records = [r for e in unique for r in e.runs]
    return compare(inputs, baseline_index=base_index, window=window, warmup_steps=warmup_steps), records


# Terminal precision (the markdown and JSON keep the seed's full precision).
_TERM_DECIMALS = {"tok_per_sec": 0, "dt_ms": 2, "mfu": 3, "peak_mem_mib": 0, "total_time_min": 2,
                  "final_loss": 3, "drop_frac": 3, "expert_load_max": 3}


def noise_label(row) -> str:
    """What a compare row's ± is: within one run, or between a group's repeats."""
    return f"between {row.n_repeats} runs" if row.n_repeats > 1 else "within-run"


NOISE_LEGEND = ("± within-run: one run's window, corrected for autocorrelation (effective sample size) · "
                "± between N runs: a repeat group, the mean of its tail means ± sd/√N")


def _compare_table(comparison) -> "Table":
    """Runs as groups of rows, in the same order for every run and every metric: the value
    († when warm-up only), the `±` row (standard error of the tail mean), the `Δ%` row (vs the
    baseline, green/red and * when beyond noise; the baseline has none). A metric with no error or
    no delta leaves its cell in that row empty, so a figure never lands in another's row."""
    from moectl.metrics import HIGHER_IS_BETTER, MARK, METRICS
    from moectl.report import COLUMNS, NOT_FINITE
    from rich.table import Table

    # SPEC §4's seven columns always (MFU too on a CPU run, where it is —); what moectl adds beyond
    # them (expert_load_max) only when some run has it, so the table fits a terminal.
    shown = [m for m in METRICS if m != "expert_load_max" or any(r.metrics[m].value is not None for r in comparison.runs)]
    warmup = f" after {comparison.warmup_steps} warm-up steps" if comparison.warmup_steps else ""
    table = Table(title=f"tail window {comparison.window}{warmup} · baseline {comparison.baseline}",
                  title_justify="left")
    table.add_column("run", overflow="fold")
    table.add_column("steps", justify="right")
    table.add_column("")  # what the row holds: the value (blank), ± or Δ%
    for m in shown:
        table.add_column(COLUMNS[m][0], justify="right", no_wrap=True)

    def value(m, mv):
        if mv.not_finite:
            return f"[red]{NOT_FINITE}[/]"
        return _num(mv.value, _TERM_DECIMALS[m]) + (MARK if mv.marked else "")

    def error(m, mv):
        return "" if mv.stderr is None else f"[dim]±{mv.stderr:,.{_TERM_DECIMALS[m]}f}[/]"

    def delta(m, mv):
        if mv.delta_pct is None:  # (a baseline of 0 has no %; a verdict against it is still said)
            if not mv.beyond_noise:
                return ""
            return f"[{'green' if (mv.value > 0) == (m in HIGHER_IS_BETTER) else 'red'}]from 0*[/]"
        good = (mv.delta_pct > 0) == (m in HIGHER_IS_BETTER)
        colour = ("green" if good else "red") if mv.beyond_noise else "dim"
        return f"[{colour}]{mv.delta_pct:+.2f}%{'*' if mv.beyond_noise else ''}[/]"

    for r in comparison.runs:
        is_base = r.id == comparison.baseline
        name = (r.tag or r.id) + (" (base)" if is_base else "")
        rows = [(name, str(r.steps), "", value), (noise_label(r), "", "±", error)]
        if not is_base:
            rows.append(("", "", "Δ%", delta))
        for i, (first, steps, label, cell) in enumerate(rows):
            table.add_row(first, steps, label, *(cell(m, r.metrics[m]) for m in shown),
                          end_section=i == len(rows) - 1)
    return table


@app.command("compare")
@handle_errors
def compare_cmd(
    runs: Annotated[List[str], typer.Argument(help="Two or more runs (id, tag, prefix or directory).")],
    baseline: Annotated[Optional[str], typer.Option("--baseline", "-b", help="Baseline run (default: the first).")] = None,
    window: Annotated[Optional[int], typer.Option("--window", "-w", min=1, help="Tail window in steps (default: config metrics.window).")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the markdown report table.")] = False,
    json_out: JsonOpt = False,
    write_report: Annotated[bool, typer.Option("--write-report", help="Write the markdown into report_dir and commit it (only it). Refused (exit 3, nothing written) off the project branch or when report_dir is outside the repository or in a read-only tree; a report git would not commit is removed again, the error says why.")] = False,
    config: ConfigOpt = None,
) -> None:
    r"""Compare runs over their tail window, with % deltas and a noise estimate.

    A tag whose latest run belongs to a repeat group (`run --repeat N`, sweep
    `repeats`) compares the whole group: the mean of its repeats' tail means
    ± the between-runs standard error (n shown); a run id compares that run.
    Repeats of the group that did not complete (or never ran) are left out of
    its figures and named in a note (--json: `left_out`).
    A single run's ± is within-run, corrected for autocorrelation (effective
    sample size). Each run is three rows, in the same order for every metric: the value,
    ± the standard error of the tail mean, then Δ% vs the baseline with *
    where the delta is beyond noise (|a−b| > k·√(se_a²+se_b²): k = Student's t
    at 95%, never below 2, for a group's N−1 or a window's n_eff−1 degrees
    of freedom). A metric
    with no error (peak, total, final loss) leaves its ± cell empty; the
    baseline has no Δ% row. The window leaves out each run's first
    `\[metrics] warmup_steps` steps; a run with no step past them is marked †
    and gets no noise verdict. Runs of different presets or lengths are still
    compared, with a note.

    Examples:
      [bold]moectl compare static_cap1p0 bufreuse --markdown[/bold]
      [bold]moectl compare base bufreuse[/bold]   (after `moectl run --repeat 3` of each: between-runs noise)
    """
    from moectl.gitops import same_repository
    from moectl.report import compare_markdown

    if len(runs) + (1 if baseline else 0) < 2:
        raise UsageError("compare needs at least two runs (or one run and --baseline)")
    cfg = _config(config)
    window = window or cfg.metrics.window
    comparison, records = load_comparison(cfg.artifact_root, runs, baseline, window, cfg.metrics.warmup_steps,
                                          same_repository(cfg.root))
    text = compare_markdown(comparison)
    written = commit = None
    if write_report:
        from moectl.compare_report import write_compare_report

        written, commit = write_compare_report(cfg, comparison, records, text)
    if json_out:
        data = comparison.to_json()
        if written is not None:
            data["report"], data["commit"] = str(written), commit  # (as `run --json` and `summary --json` say theirs)
        print_json(data)
        return
    if markdown:
        stdout.out(text, end="")
    else:
        _print_table(_compare_table(comparison))
        stdout.print("± standard error of the tail mean · Δ% vs baseline · * beyond noise "
                     "(|a−b| > k·√(se_a²+se_b²); k = Student's t at 95%, ≥ 2, for N−1 or n_eff−1 degrees of freedom)", markup=False)
        stdout.print(NOISE_LEGEND, markup=False)
        if any(mv.marked for r in comparison.runs for mv in r.metrics.values()):
            from moectl.metrics import mark_footnote

            stdout.print(mark_footnote(comparison.warmup_steps), markup=False)
        for note in comparison.notes:
            stdout.print(note, markup=False)
    if written is not None:
        stderr.print(f"wrote and committed {written}", markup=False)


# --- import --------------------------------------------------------------------------------------


@app.command("import")
@handle_errors
def import_cmd(
    log: Annotated[Path, typer.Argument(parser=PATH, help="The log file to import.")],
    name: Annotated[str, typer.Option("--name", help="Tag of the imported run (also its directory suffix).")],
    format: Annotated[Optional[str], typer.Option("--format", "-f", help="nanochat | regex | jsonl | csv (default: by the file's suffix: .jsonl, .csv, else nanochat).", show_default=False)] = None,
    run: Annotated[Optional[str], typer.Option("--run", help="csv only: which run of a multi-run step table.")] = None,
    pattern: Annotated[Optional[List[str]], typer.Option("--pattern", help="regex only: FIELD=REGEX (FIELD: step, tokens_per_step or a metrics field such as loss, dt_ms, mfu); repeatable; overrides \\[metrics] of .moectl.toml.", show_default=False)] = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Bring an existing training log into the run store, so old runs compare with new ones.

    The run gets status `imported` and a metrics.jsonl in the engine's format. Malformed step lines are skipped and counted.

    nanochat and regex logs go through the parser a live run of a stdout-parsed trainer uses, so they import exactly as that run would have parsed; a pattern that never matches is a warning (here, in the record and in `moectl show`).

    Examples:
      [bold]moectl import base_train.log --format nanochat --name static_cap1p0[/bold]
      [bold]moectl import train.log --format regex --name gpt2 --pattern 'step=iter (\\d+):' --pattern 'loss=loss ([\\d.]+)'[/bold]
      [bold]moectl import train.log --format regex --name gpt2[/bold]   (patterns from \\[metrics] of .moectl.toml)
      [bold]moectl import exports/steps.csv --run 20261101_120000_moe-base --name base_again[/bold]   (csv: by its suffix)
    """
    from moectl.importers import format_of, load_log, regex_format
    from moectl.store import import_run, run_json

    if format is None:
        format = "regex" if pattern else format_of(log)
    if not _NAME.match(name):
        raise UsageError(f"bad --name {name!r}: use letters, digits, '.', '_' or '-' (not first)")
    if pattern and format != "regex":
        raise UsageError(f"--pattern is for --format regex, not {format}")
    if run is not None and format != "csv":
        raise UsageError(f"--run is for --format csv (a multi-run step table), not {format}")
    cfg = _config(config)
    from moectl.plan import NAME_MAX
    from moectl.runindex import run_dirs

    longest = f"{'0' * 15}_{cfg.project.name}-{name}-99"  # timestamp_project-name, -N when taken
    if len(longest.encode()) > NAME_MAX:
        raise UsageError(f"--name: the run directory name would be up to {len(longest.encode())} bytes, over the "
                         f"filesystem's {NAME_MAX}; use a shorter name")
    from moectl.guards import run_store_problems

    problems = run_store_problems(cfg)
    if problems:  # the paths guard of `moectl run` on the same store: exit 3 as there, nothing written
        raise GuardRefused("; ".join(problems) + " — fix [paths] in the config")
    if any(d.name == name for d in run_dirs(cfg.artifact_root)):
        # `show`/`compare` take a run's id before any tag: this run could never be named by it
        raise UsageError(f"--name {name!r} is the id of a run already in the store; pick another name")
    parsed = load_log(log, format, run=run,
                      stdout_format=regex_format(cfg.metrics, pattern or []) if format == "regex" else None)
    from moectl.store import list_runs

    # The newest run of a tag is what the tag names (SPEC §4): the ones before are said, not hidden.
    earlier = [r.id for r in list_runs(cfg.artifact_root) if r.tag == name]
    extras: dict[str, Any] = {
        "format": format, "peak_mem_mib": parsed.peak_mem_mib, "total_time_s": parsed.total_time_s,
        "world_size": parsed.world_size, "planned_steps": parsed.planned_steps, "skipped": parsed.skipped,
        "warnings": parsed.warnings,
    }
    rec = import_run(cfg.artifact_root, cfg.project.name, name, parsed.steps, extras,
                     source=str(Path(log).expanduser().resolve()), window=cfg.metrics.window,
                     repo=str(cfg.root.resolve()) if cfg.path is not None else None,
                     warmup_steps=cfg.metrics.warmup_steps)
    if earlier:
        stderr.print(f"warning: {len(earlier)} earlier run(s) tagged {name} ({', '.join(earlier[:3])}"
                     f"{', ...' if len(earlier) > 3 else ''}): `show {name}` and `compare {name}` now mean this one; "
                     "an id names an earlier one", markup=False)
    if json_out:
        print_json(run_json(rec) | {"skipped": parsed.skipped})
        return
    for warning in rec.warnings:
        stderr.print(f"warning: {warning}", markup=False)
    s = rec.summary
    stdout.print(rec.id, markup=False)
    stdout.print(
        f"imported {len(parsed.steps)} steps from {log} ({parsed.skipped} malformed line(s) skipped) into {rec.exp_dir}",
        markup=False,
    )
    if s is not None:
        from moectl.metrics import MARK, mark_footnote

        def tail(value, decimals=2):  # a tail mean, marked when it is warm-up only
            return _num(value, decimals) + (MARK if value is not None and not s.clean else "")

        after = (" (warm-up only)" if not s.clean else f" after {s.warmup_steps} warm-up") if s.warmup_steps else ""
        stdout.print(
            f"tail {s.steps}{after}: tok/sec {tail(s.tok_per_sec)} · dt {tail(s.dt_ms)} ms · "
            f"MFU {tail(s.mfu, 4) + ('%' if s.mfu is not None else '')} · peak {_num(s.peak_mem_mib)} MiB · {_num(s.total_time_min)} min · "
            f"final loss {_final_loss(s)}",
            markup=False,
        )
        if not s.clean:
            stdout.print(mark_footnote(s.warmup_steps), markup=False)
