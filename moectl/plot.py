"""Per-step curves of several runs in one figure (`moectl plot`, and one figure per metric per sweep).

    plot_runs(runs, "tok_per_sec", Path("reports/figures/capacity_tok_per_sec.png"))

One line per run (label = tag, or id when the tag is missing or shared), step on x, the metric on
y, title, axis labels, legend, grid: the seed study's figures. matplotlib is an optional extra
(`pip install 'moectl[plot]'`), imported only here and only when a figure is drawn, through its
object-oriented API and the Agg canvas: no pyplot, no global backend switch, no display needed.

Step 0 (and often step 1) of a compiled run includes torch.compile and warm-up: its dt is ~10x the
steady state, which would squash every curve of tok/sec, dt and MFU into a flat line. The warm-up
steps are the summaries' (`[metrics] warmup_steps`: step numbers below it, see moectl.metrics):
in the figures of tail-mean metrics they are shaded, since no summary counts them, and for
tok/sec, dt and MFU the y range is fitted to the steps after them and the figure says which points
fell off the scale. Loss keeps its full range: the first steps are the interesting part. Steps
are whole numbers, and so are the ticks of the step axis.
"""
from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from engine.schema import METRICS_FILENAME
from moectl.errors import UsageError
from moectl.metrics import DEFAULT_WARMUP_STEPS, MEAN_METRICS, counted_from, read_metrics
from moectl.atomic import atomic_file, ensure_dir
from moectl.records import RunRecord

# metric -> y-axis label. The first four are the ones a sweep draws.
PLOT_METRICS = {
    "loss": "loss",
    "tok_per_sec": "tok/sec (global)",
    "mfu": "MFU (%)",
    "dt_ms": "step time (ms)",
    "aux_loss": "balance loss",
    "drop_frac": "dropped fraction",
    "expert_load_max": "busiest expert's share of tokens",
    "peak_mem_mib": "peak memory (MiB)",
}
SWEEP_METRICS = ("loss", "tok_per_sec", "mfu", "dt_ms")
# Metrics whose first steps include compile / warm-up and get a y range fitted to the rest.
WARMUP_METRICS = {"tok_per_sec", "dt_ms", "mfu"}

MISSING_MATPLOTLIB = "matplotlib is not installed: pip install 'moectl[plot]'"


@dataclass
class Series:
    label: str
    run_id: str
    steps: list[int]
    values: list[float]
    counted_from: int = 0  # its first step's number, 0 or 1 (metrics.counted_from): where its warm-up starts
    resumed_at: Optional[int] = None  # the step its last process resumed at: a second warm-up starts there

    def warm(self, step: int, warmup_steps: int) -> bool:
        return step < self.counted_from + warmup_steps or (
            self.resumed_at is not None and self.resumed_at <= step < self.resumed_at + warmup_steps)


@dataclass
class PlotResult:
    path: Path
    metric: str
    plotted: list[str] = field(default_factory=list)  # run ids with a line in the figure
    skipped: list[str] = field(default_factory=list)  # one warning per run left out (or with NaN/inf gaps)
    off_scale: int = 0  # warm-up points outside the fitted y range
    figure: Any = field(default=None, repr=False)  # the matplotlib Figure that was saved


def check_metric(metric: str) -> str:
    if metric not in PLOT_METRICS:
        raise UsageError(f"unknown metric {metric!r} (choose from {', '.join(PLOT_METRICS)})")
    return metric


def _labels(runs: Sequence[RunRecord]) -> list[str]:
    """Tag when it names one run of the figure, else the id (two legs tagged alike stay apart)."""
    counts = Counter(r.tag for r in runs if r.tag)
    return [r.tag if r.tag and counts[r.tag] == 1 else r.id for r in runs]


def collect_series(runs: Sequence[RunRecord], metric: str) -> tuple[list[Series], list[str]]:
    """Each run's (step, value) points of `metric` from its metrics.jsonl, and warning lines: one
    per run without any value (left out), one per run whose values were partly NaN/inf (a diverged
    loss: those steps are a gap in its line, said rather than drawn off the axes)."""
    series, warnings = [], []
    for rec, label in zip(runs, _labels(runs)):
        m = read_metrics(Path(rec.exp_dir) / METRICS_FILENAME)
        values = [(s.step, float(getattr(s, metric))) for s in m.steps if getattr(s, metric) is not None]
        points = [(step, v) for step, v in values if math.isfinite(v)]
        if points and len(points) < len(values):  # (none finite at all: the one line below says so)
            first = next(step for step, v in values if not math.isfinite(v))
            warnings.append(f"{rec.id}: {metric} not finite at {len(values) - len(points)} of {len(values)} steps "
                            f"(from step {first}); not drawn")
        if not points:
            first = next((step for step, v in values if not math.isfinite(v)), None)
            why = ("no metrics.jsonl steps" if not m.steps else
                   f"no {'finite ' if values else ''}{metric} values in {len(m.steps)} steps"
                   + (f" (not finite from step {first})" if first is not None else ""))
            warnings.append(f"{rec.id}: {why}; left out of the {metric} plot")
            continue
        resumed_at = m.start.start_step if m.start is not None and m.start.start_step else None
        series.append(Series(label, rec.id, [p[0] for p in points], [p[1] for p in points], counted_from(m), resumed_at))
    return series, warnings


def _fitted_ylim(series: list[Series], warmup_steps: int) -> Optional[tuple[float, float, int]]:
    """(low, high, points off scale) fitted to the post-warm-up steps of every series, or None
    when that would hide nothing or there is too little after warm-up to fit on."""
    steady = [v for s in series for step, v in zip(s.steps, s.values) if not s.warm(step, warmup_steps)]
    if len(steady) < 2:
        return None
    lo, hi = min(steady), max(steady)
    pad = (hi - lo) * 0.08 or abs(hi) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad
    off = sum(1 for s in series for step, v in zip(s.steps, s.values) if s.warm(step, warmup_steps) and not lo <= v <= hi)
    return (lo, hi, off) if off else None


def _import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator, StrMethodFormatter
    except ImportError:
        raise UsageError(MISSING_MATPLOTLIB) from None
    return Figure, FigureCanvasAgg, MaxNLocator, StrMethodFormatter


def make_plot(runs: Sequence[RunRecord], metric: str, out: Path, title: Optional[str] = None,
              warmup_steps: int = DEFAULT_WARMUP_STEPS) -> PlotResult:
    """Draw `metric` of every run into `out` (format from its suffix; the file is replaced
    atomically, its directory created). Raises UsageError for an unknown metric, a missing
    matplotlib, an unsupported suffix, or when no run has a single value to draw."""
    check_metric(metric)
    if not runs:
        raise UsageError("nothing to plot: no runs")
    # Before any reading: say what to install first.
    Figure, FigureCanvasAgg, MaxNLocator, StrMethodFormatter = _import_matplotlib()
    out = Path(out).expanduser()
    series, skipped = collect_series(runs, metric)
    if not series:
        raise UsageError(f"no run has {metric} values to plot", lines=skipped)

    fig = Figure(figsize=(10, 5.5), dpi=100)
    FigureCanvasAgg(fig)  # attaches the Agg canvas: savefig renders without any GUI backend
    supported = fig.canvas.get_supported_filetypes()
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in supported:
        raise UsageError(f"cannot write {out.name!r}: use one of .{', .'.join(sorted(supported))}")

    ax = fig.add_subplot(1, 1, 1)
    for s in series:
        # Markers only where a line would be hard to see (a handful of steps).
        ax.plot(s.steps, s.values, label=s.label, linewidth=1.4, marker="o" if len(s.steps) <= 20 else None,
                markersize=3)
    result = PlotResult(path=out, metric=metric, plotted=[s.run_id for s in series], skipped=skipped, figure=fig)
    first = min(s.steps[0] for s in series)
    past = max(s.counted_from for s in series) + warmup_steps  # (a trainer counting from 1: steps 1 .. W)
    if metric in MEAN_METRICS and past > first:
        # Behind the lines (zorder 0): steps first .. past-1, half a step either side.
        last = min(past - 1, max(s.steps[-1] for s in series))
        ax.axvspan(first - 0.5, last + 0.5, color="0.5", alpha=0.12, linewidth=0, zorder=0,
                   label=f"warm-up: steps {first}-{last}, not in summaries")
    # A run resumed from a checkpoint compiled and warmed up again there (its summary leaves out
    # every step before that process's warm-up ended; the steps before the resume are drawn as run).
    resumes = sorted({s.resumed_at for s in series if s.resumed_at is not None})
    if metric in MEAN_METRICS and warmup_steps:
        for at in resumes:  # (named: the other runs' steps there are in their summaries)
            who = ", ".join(s.label for s in series if s.resumed_at == at)
            ax.axvspan(at - 0.5, at + warmup_steps - 0.5, color="tab:orange", alpha=0.10, linewidth=0, zorder=0,
                       label=f"{who}: warm-up after its resume at step {at}, steps {at}-{at + warmup_steps - 1}")
    if metric in WARMUP_METRICS and (fit := _fitted_ylim(series, warmup_steps)) is not None:
        lo, hi, result.off_scale = fit
        ax.set_ylim(lo, hi)
        where = f"steps {first}-{past - 1}" + "".join(f", {at}-{at + warmup_steps - 1}" for at in resumes)
        ax.text(0.01, 0.01, f"{result.off_scale} point(s) of {where} off scale "
                "(compile / warm-up)", transform=ax.transAxes, fontsize=8, color="0.4", va="bottom")
    ax.set_title(title or f"{PLOT_METRICS[metric]} per step")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # step 2.5 does not exist
    ax.set_ylabel(PLOT_METRICS[metric])
    if max(abs(v) for s in series for v in s.values) >= 10_000:
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))  # 800,000 rather than 800000
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    try:
        fig.tight_layout()  # lays the text out: a title's `$...$` is parsed as math text here
    except ValueError as exc:
        raise UsageError(f"--title {title!r}: matplotlib cannot draw it ({' '.join(str(exc).split())}); "
                         "a `$` starts math text, write `\\$` for a dollar sign") from None

    # Temp file in the target directory, then rename: a reader (or a report linking the figure)
    # never sees half a PNG, and a failed draw leaves the previous figure in place.
    ensure_dir(out.parent)
    with atomic_file(out, "wb") as fh:
        fig.savefig(fh, format=fmt)
    return result


def _stderr_warning(line: str) -> None:
    sys.stderr.write(f"warning: {line}\n")


def plot_runs(
    runs: list[RunRecord],
    metric: str,
    out: Path,
    title: str | None = None,
    warn: Optional[Callable[[str], None]] = None,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
) -> Path:
    """One figure, one line per run; returns the path written. Runs without values of `metric`
    are left out with one warning each (`warn`, default: a `warning:` line on stderr)."""
    result = make_plot(runs, metric, out, title, warmup_steps=warmup_steps)
    for line in result.skipped:
        (warn or _stderr_warning)(line)
    return result.path
