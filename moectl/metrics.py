"""Tail-window summaries, deltas and noise estimates (SPEC §7).

Reads the engine's metrics lines through `engine.schema` (torch-free) and nothing else of the
engine. The rule every number here follows, so the seed study's figures reproduce exactly:

    warm-up    = the first `warmup_steps` steps by number: steps 0-9 of warmup_steps=10 (the engine
                 numbers steps from 0), steps 1-10 of a trainer that counts from 1 (`counted_from`):
                 torch.compile and allocator warm-up live there
    tail mean  = arithmetic mean of the last `window` steps past the warm-up (fewer if the run is
                 shorter: the summary's `steps` says how many, its `note` says so)
    peak mem   = max over the whole run;  total time = training time;  final loss = last step's loss
    loss       = a step whose loss was not finite (NaN / inf: the run diverged) is a real step, timed
                 and counted like any other (engine.schema reads its null loss as NaN). No figure
                 quietly skips it: when the last step's loss is not finite the final loss is null
                 and `Summary.loss_not_finite` / `loss_not_finite_from` say why (a repeat group's
                 too, if any repeat diverged); `loss_warning` is the line the run record carries
    noise      = standard error of each tail mean (moectl/noise.py): for one run, within-run,
                 sample std / sqrt(n_eff) over the window, n_eff corrected for autocorrelation;
                 for a repeat group, between-runs, the std of the repeats' tail means / sqrt(n)
    group      = the repeats of one configuration (`run --repeat N`, sweep `repeats`): each value
                 is the mean over repeats of their tail means (peak mem: the max)

A run with no step past its warm-up has no clean window: its tail means are taken over the last
`window` steps it has, compile included, and the summary says `clean: false`. Every table marks
those figures (MARK), no "beyond noise" verdict involves them and no recommendation rests on them.
Steps are chosen by number, not by line position, so a resumed run's repeated steps and an
imported log's numbering follow the same rule (the seed study: 280 steps, window 50 = steps
230-279, untouched by 10 warm-up steps).

Two tail means differ "beyond noise" when |a - b| > k * sqrt(se_a^2 + se_b^2), i.e. roughly a
95% interval on the difference of two independent means: k is Student's t at 95% with
Welch-Satterthwaite's degrees of freedom, never below 2 - repeats - 1 for a repeat group (two
groups of 2 repeats with equal errors: 2 degrees, k = 4.30; of 3: 4 degrees, k = 2.78), and the
window's effective sample size - 1 for a single run's within-run error (tens of independent-ish
steps: k about 2; a window of 2 clean steps: 1 degree, k = 12.7). A within-run error says how well one
run's window pinned that run down, not whether another run would land in the same place: only
repeats (a group, between-runs error) answer that, and every compare entry says which it shows.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from engine.schema import RunSummary, StartInfo, StepMetrics, decode, loss_is_finite, parse_record
from moectl.atomic import read_regular_bytes
from moectl.noise import (
    BETWEEN_RUNS, WITHIN_RUN, between_runs_stderr, t_critical, welch_df, within_run,
)
from moectl.records import Summary

# The metrics of a compare table, in display order. MEAN_METRICS are tail means (they get a
# stderr); the others are single values (peak, total, last) with no noise estimate.
METRICS = ("tok_per_sec", "dt_ms", "mfu", "peak_mem_mib", "total_time_min", "final_loss", "drop_frac",
           "expert_load_max")
# expert_load_max: the busiest expert's share of the routed tokens (1/E is perfect balance), the
# figure `--balance` acts on.
MEAN_METRICS = ("tok_per_sec", "dt_ms", "mfu", "drop_frac", "expert_load_max")
# Higher is better for these; lower for the rest (used only to colour/mark deltas).
HIGHER_IS_BETTER = {"tok_per_sec", "mfu"}
# `[metrics] warmup_steps` unless a config says otherwise: nanochat leaves its first 10 steps out
# of the timing too. The library functions default to 0 (leave nothing out); moectl passes the
# configured value everywhere a summary is computed.
DEFAULT_WARMUP_STEPS = 10
# The mark of a tail mean taken over warm-up steps only, and the footnote that explains it.
MARK = "†"


def mark_footnote(warmup_steps: int) -> str:
    return (f"{MARK} warm-up only: the run has no step past its first {warmup_steps} (compile / warm-up), so "
            "this tail mean includes them; no noise verdict, never recommended. Run more steps.")


@dataclass
class MetricsFile:
    """What one metrics.jsonl holds. `steps` is sorted by step number, one entry per step."""

    start: Optional[StartInfo] = None
    steps: list[StepMetrics] = field(default_factory=list)
    summary: Optional[RunSummary] = None
    skipped: int = 0  # lines that could not be parsed (never fatal)
    unreadable: Optional[str] = None  # why the file could not be read at all (then it reads as empty)
    # Set by a tail read (`read_metrics(path, tail=N)`): `steps` then holds only the last N steps
    # and the run's step count comes from its summary line.
    total_steps: Optional[int] = None
    # What the run numbers its first step, 0 or 1 (see `counted_from`), as read from the top of the
    # file; None for metrics built from steps (then their first step says).
    first_number: Optional[int] = None

    @property
    def n_steps(self) -> int:
        return self.total_steps if self.total_steps is not None else len(self.steps)


def read_metrics(path: Path, tail: Optional[int] = None) -> MetricsFile:
    """Read a metrics.jsonl. Malformed lines are skipped and counted; a missing file is empty.

    A resumed run may write a step number twice (the steps after the last checkpoint run again):
    the last occurrence wins, because it is the one the final model actually went through.

    `tail=N` (what `compare` needs): for a finished run, i.e. one whose last line is a summary
    with the peak memory, read only the last N steps, walking back from the end; other files are
    read whole. The tail summary comes out the same; `skipped` then counts only the lines read.
    """
    try:
        text = read_regular_bytes(Path(path)).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return MetricsFile()
    except OSError as exc:  # a directory or a FIFO in its place, no permission: empty, and said why
        return MetricsFile(unreadable=f"{path}: {exc.strerror or exc}")
    if tail is not None:
        fast = _read_tail(text, tail)
        if fast is not None:
            return fast
    return parse_metrics_text(text)


def parse_metrics_text(text: str) -> MetricsFile:
    """The records of a whole metrics.jsonl text (see `read_metrics`)."""
    out = MetricsFile()
    # Fast path: one json call for the whole file (per-line json.loads dominates `compare` over
    # many runs). Every line must decode to exactly one object: a blank line, a malformed line,
    # a line holding "1,2" or a bracket split over two lines breaks or shifts the array, and then
    # the careful path decodes line by line to skip and count.
    body = text.strip()
    try:
        objects = decode("[" + body.replace("\n", ",") + "]") if body else []
        if len(objects) != (body.count("\n") + 1 if body else 0) or not all(type(o) is dict for o in objects):
            raise ValueError
    except (ValueError, RecursionError):  # (a line of 100k `[`: the decoder recurses per bracket)
        objects = []
        for ln in text.splitlines():
            if not ln.strip():
                continue
            try:
                objects.append(decode(ln))
            except (ValueError, RecursionError):
                objects.append(_MALFORMED)
    by_step: dict[int, StepMetrics] = {}
    for obj in objects:
        try:
            rec = parse_record(obj)
        except ValueError:
            out.skipped += 1
            continue
        if isinstance(rec, StepMetrics):
            by_step[rec.step] = rec
            if out.first_number is None:
                out.first_number = _first_number(out.start, rec)
        elif isinstance(rec, StartInfo):
            out.start = rec
        else:
            out.summary = rec
    out.steps = [by_step[k] for k in sorted(by_step)]
    return out


def _first_number(start: Optional[StartInfo], first: StepMetrics) -> int:
    """1 when the first step record is step 1 of a run that did not resume there, else 0."""
    return 1 if first.step == 1 and not (start is not None and start.start_step) else 0


def counted_from(metrics: MetricsFile) -> int:
    """The number of a run's first step, where its warm-up starts: 0 for the engine and most
    trainers, 1 for a trainer that counts its steps from 1 (`step 1/1000` .. `step 1000/1000`, its
    first recorded step being step 1), so that warm-up 10 leaves out steps 1-10, ten of them.

    A run whose first step has any other number is taken as counted from 0, since its numbers say
    where it is in the run: a trainer resumed at `iter 500` has run 500 steps before, and a stretch
    begins at its own number only where the engine says it resumed there (`StartInfo.start_step`,
    which `stretch_warmup` adds to the warm-up; such a start before step 1 is a resume, not a count
    from 1). A 1-based trainer printing only every 10th step is not recognised (its first line is
    step 10), and its warm-up stays steps 0-9 by number."""
    if metrics.first_number is not None:
        return metrics.first_number
    return _first_number(metrics.start, metrics.steps[0]) if metrics.steps else 0


def stretch_warmup(metrics: MetricsFile, warmup_steps: int) -> int:
    """The steps by number that no tail mean counts, past `counted_from`: `warmup_steps`, plus the
    step the engine resumed at (the last start line's `start_step`). A resumed run (a requeued Slurm
    job, `--resume`) is summarised over its final stretch only, past that process's own warm-up:
    the steps before ran in another process, on another node perhaps, and their timings say nothing
    of this one. Every summary reader (the record, `show`, `compare`, `export`) goes through here."""
    return warmup_steps + (metrics.start.start_step if metrics.start is not None else 0)


_MALFORMED = object()  # parse_record rejects it: "not a JSON object"


def _read_tail(text: str, window: int) -> Optional[MetricsFile]:
    """The last `window` steps of a finished run, or None when the file does not allow it.

    Walking backwards, the first time a step number is seen is its last occurrence in the file,
    which is the one a full read keeps. A finished run's last segment ends at its final step, so
    the `window` steps collected this way are exactly the `window` highest step numbers. Peak
    memory and the step count come from the summary line (the engine's run-wide figures); the
    start line is the last one, as a full read keeps (where a resumed run's warm-up starts).
    """
    lines = text.splitlines()
    i = len(lines) - 1
    while i >= 0 and not lines[i].strip():
        i -= 1
    try:
        summary = parse_record(decode(lines[i])) if i >= 0 else None
    except ValueError:
        return None
    if not isinstance(summary, RunSummary) or summary.peak_mem_mib is None:
        return None
    out = MetricsFile(summary=summary, total_steps=summary.steps)
    out.first_number = _first_number_at_top(lines, i)
    out.start = _last_start(lines, i)
    by_step: dict[int, StepMetrics] = {}
    for ln in reversed(lines[:i]):
        if len(by_step) >= window:
            break
        if not ln.strip():
            continue
        try:
            rec = parse_record(decode(ln))
        except ValueError:
            out.skipped += 1
            continue
        if isinstance(rec, StepMetrics):
            by_step.setdefault(rec.step, rec)
    out.steps = [by_step[k] for k in sorted(by_step)]
    return out


def _last_start(lines: list[str], end: int) -> Optional[StartInfo]:
    """The last start line of `lines[:end]`, as a full read keeps it. Its start_step may lie before
    the tail (a run resumed 10 steps from its end, read for a window of 5), so the walk goes on past
    it, decoding only the lines that can be one (a step line never holds the word "start")."""
    for ln in reversed(lines[:end]):
        if '"start"' not in ln:
            continue
        try:
            rec = parse_record(decode(ln))
        except ValueError:
            continue
        if isinstance(rec, StartInfo):
            return rec
    return None


def _first_number_at_top(lines: list[str], end: int) -> Optional[int]:
    """`counted_from` as a full read has it, from the first records of a file read from its end
    (`lines[:end]`: the summary line, at `end`, is no step)."""
    start = None
    for ln in itertools.islice(lines, end):
        try:
            rec = parse_record(decode(ln)) if ln.strip() else None
        except ValueError:
            continue
        if isinstance(rec, StepMetrics):
            return _first_number(start, rec)
        if isinstance(rec, StartInfo):
            start = rec
    return None


def _values(steps: Sequence[StepMetrics], name: str) -> list[float]:
    return [v for v in (getattr(s, name) for s in steps) if v is not None]


def _mean(xs: Sequence[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def _stderr(xs: Sequence[float]) -> Optional[float]:
    n = len(xs)
    if n < 2:
        return None
    m = sum(xs) / n
    var = sum((x - m) * (x - m) for x in xs) / (n - 1)  # (a product overflows to inf; ** 2 raised)
    return math.sqrt(var / n)


def tail_window(metrics: MetricsFile, window: int, warmup_steps: int = 0) -> tuple[list[StepMetrics], bool]:
    """(the steps a tail mean is taken over, whether they are clean, i.e. past the warm-up).

    The last `window` steps numbered `warmup_steps` or more (`counted_from` + `warmup_steps` or
    more: a trainer counting from 1 leaves out steps 1 .. warmup_steps; a resumed engine run its
    steps before the resume too, see `stretch_warmup`); when there is none, the last `window` steps
    of the run as they are (not clean). A tail read (`read_metrics(tail=N)`)
    holds the N highest step numbers, so it yields the same window as a full read.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    past = counted_from(metrics) + stretch_warmup(metrics, warmup_steps)
    clean = [s for s in metrics.steps if s.step >= past]
    if clean:
        return _last_steps(clean, window), True
    return _last_steps(metrics.steps, window), False


def _last_steps(steps: list[StepMetrics], window: int) -> list[StepMetrics]:
    """The records of the last `window` step numbers: all of them in a log with every step, fewer
    in one printed every k steps (a window of 50 is steps 230-279 of 280 whatever was printed, not
    the last 50 lines, which went back to step 10)."""
    if not steps:
        return []
    first = steps[-1].step - window  # steps numbered above this are in the window (sorted, one per step)
    return [s for s in steps[-window:] if s.step > first]


def left_out(warmup_steps: int, resumed_at: Optional[int]) -> str:
    """What no tail mean counts, in words: `30 warm-up steps`, or for a run resumed at step 20
    (whose summary's warm-up counts the 20 before it), `the steps before its resume at step 20 and
    10 warm-up steps`: those 20 ran in an earlier process, they are no warm-up."""
    if not resumed_at:
        return f"{warmup_steps} warm-up steps"
    own = warmup_steps - resumed_at
    return f"the steps before its resume at step {resumed_at}" + (f" and {own} warm-up steps" if own else "")


def _window_note(n_run: int, n_window: int, clean: bool, window: int, warmup_steps: int,
                 resumed_at: Optional[int] = None) -> Optional[str]:
    if not n_run:
        return "no steps recorded"
    if not clean:
        if resumed_at:
            return (f"warm-up only: no step past {left_out(warmup_steps, resumed_at)}, "
                    "so the tail means include compile / warm-up")
        return (f"warm-up only: all {n_run} steps are among the first {warmup_steps} (warmup_steps), "
                "so the tail means include compile / warm-up")
    if n_window < window:
        after = f" after {left_out(warmup_steps, resumed_at)}" if warmup_steps else ""
        return f"{n_window} clean steps (< window {window}){after}"
    return None


def tail_summary(metrics: MetricsFile, window: int, warmup_steps: int = 0) -> Summary:
    """The SPEC §7 summary of one run. `steps` = how many steps the tail window really covered,
    `run_steps` = how many the run recorded;
    `clean` = whether they are past the warm-up (see `tail_window`). The non-finite loss counts are
    over the steps `metrics` holds: the whole run for a full read, the tail for a tail read."""
    tail, clean = tail_window(metrics, window, warmup_steps)
    warmup_steps = stretch_warmup(metrics, warmup_steps)  # (what the summary says it left out)
    resumed_at = metrics.start.start_step if metrics.start is not None and metrics.start.start_step else None
    not_finite = [s.step for s in metrics.steps if not loss_is_finite(s)]
    last = metrics.steps[-1] if metrics.steps else None
    peaks = _values(metrics.steps, "peak_mem_mib")
    if metrics.summary is not None and metrics.summary.peak_mem_mib is not None:
        peaks.append(metrics.summary.peak_mem_mib)
    total_s = metrics.summary.total_time_s if metrics.summary is not None else None
    if total_s is None and metrics.steps:
        total_s = metrics.steps[-1].elapsed_s
    return Summary(
        window=window,
        steps=len(tail),
        run_steps=metrics.n_steps if metrics.steps else 0,
        warmup_steps=warmup_steps,
        first_step=counted_from(metrics),
        resumed_at=resumed_at,
        clean=clean,
        note=_window_note(metrics.n_steps if metrics.steps else 0, len(tail), clean, window, warmup_steps,
                          resumed_at),
        tok_per_sec=_mean(_values(tail, "tok_per_sec")),
        dt_ms=_mean(_values(tail, "dt_ms")),
        mfu=_mean(_values(tail, "mfu")),
        peak_mem_mib=max(peaks) if peaks else None,
        total_time_min=total_s / 60.0 if total_s is not None else None,
        final_loss=last.loss if last is not None and loss_is_finite(last) else None,
        drop_frac=_mean(_values(tail, "drop_frac")),
        expert_load_max=_mean(_values(tail, "expert_load_max")),
        loss_not_finite=len(not_finite),
        loss_not_finite_from=not_finite[0] if not_finite else None,
    )


def loss_warning(metrics: MetricsFile) -> Optional[str]:
    """The run record's warning about steps whose loss was not finite, or None when every loss was.

    `loss not finite from step 2 (diverged): 23 of 25 steps ...` when every step from the first such
    one to the end has no finite loss; otherwise how many, the first, and whether the last is one."""
    bad = [s.step for s in metrics.steps if not loss_is_finite(s)]
    if not bad:
        return None
    n = len(metrics.steps)
    last_bad = not loss_is_finite(metrics.steps[-1])
    trailing = sum(1 for s in metrics.steps if s.step >= bad[0])
    if last_bad and trailing == len(bad):
        return (f"{LOSS_WARNING} from step {bad[0]} (diverged): {len(bad)} of {n} steps have a NaN/inf loss, "
                "so the final loss is NaN; their step time, tok/sec and memory are still measured")
    end = "the last step's too, so the final loss is NaN (diverged)" if last_bad else "the final loss is finite"
    return f"{LOSS_WARNING} at {len(bad)} of {n} steps (first at step {bad[0]}); {end}"


LOSS_WARNING = "loss not finite"  # how loss_warning's line starts (a record holds at most one)


def tail_stderr(metrics: MetricsFile, window: int, warmup_steps: int = 0) -> dict[str, Optional[float]]:
    """The i.i.d. standard error of each tail mean (sd / sqrt(n): the floor); None for
    single-valued metrics or fewer than 2 values. `compare` shows `tail_noise`."""
    tail, _ = tail_window(metrics, window, warmup_steps)
    return {m: (_stderr(_values(tail, m)) if m in MEAN_METRICS else None) for m in METRICS}


def tail_noise(metrics: MetricsFile, window: int, warmup_steps: int = 0) -> dict[str, Optional[float]]:
    """The within-run standard error of each tail mean, corrected for autocorrelation
    (moectl.noise.within_run, never below `tail_stderr`)."""
    return {m: se for m, (se, _) in _tail_noise_and_df(metrics, window, warmup_steps).items()}


def _tail_noise_and_df(metrics: MetricsFile, window: int, warmup_steps: int) -> dict[str, tuple]:
    """metric -> (its `tail_noise` error, that error's degrees of freedom: the window's n_eff - 1)."""
    tail, _ = tail_window(metrics, window, warmup_steps)
    return {m: (within_run(_values(tail, m)) if m in MEAN_METRICS else (None, None)) for m in METRICS}


def group_summary(members: Sequence[MetricsFile], window: int, warmup_steps: int = 0,
                  fallbacks: Sequence[Optional[Summary]] = ()) -> tuple[Summary, dict[str, Optional[float]]]:
    """(the summary of a repeat group, the between-runs error of each tail mean). Each value is the
    mean over repeats of their own summaries' value (peak memory: the max); the window is clean only
    when every repeat's is; `steps` is the shortest repeat's tail, `run_steps` the shortest repeat.
    `fallbacks[i]`: repeat i's recorded summary, which stands in for it when its metrics file has no
    steps (metrics.jsonl gone), as a single run's does in `compare` (the note says so)."""
    parts, stand_ins = [], []
    for i, m in enumerate(members):
        fallback = fallbacks[i] if i < len(fallbacks) else None
        if m.steps or fallback is None:
            parts.append(tail_summary(m, window, warmup_steps))
        else:
            parts.append(fallback.model_copy(update={"note": None}))
            stand_ins.append(fallback.window)
    values: dict[str, Optional[float]] = {}
    errors: dict[str, Optional[float]] = {}
    for m in METRICS:
        xs = [v for v in (getattr(p, m) for p in parts) if v is not None]
        values[m] = (max(xs) if m == "peak_mem_mib" else _mean(xs)) if xs else None
        errors[m] = between_runs_stderr(xs) if m in MEAN_METRICS and len(xs) == len(parts) else None
    if any(p.final_loss_not_finite for p in parts):
        values["final_loss"] = None  # NaN, not the mean of the repeats that did not diverge
    clean = all(p.clean for p in parts)
    note = next((p.note for p in parts if p.note), None)
    if stand_ins:
        other = sorted({w for w in stand_ins if w != window})
        said = (f"metrics.jsonl of {len(stand_ins)} repeat(s) is gone: their recorded summaries stand in"
                + (f" (over a {'/'.join(map(str, other))}-step window)" if other else ""))
        note = "; ".join(x for x in (note, said) if x)
    firsts = [p.loss_not_finite_from for p in parts if p.loss_not_finite_from is not None]
    summary = Summary(window=window, steps=min(p.steps for p in parts),
                      run_steps=min((p.run_steps if p.run_steps is not None else p.steps) for p in parts),
                      warmup_steps=warmup_steps, clean=clean,
                      note=note, loss_not_finite=sum(p.loss_not_finite for p in parts),
                      loss_not_finite_from=min(firsts) if firsts else None, **values)
    return summary, errors


# ---------------------------------------------------------------------------------------------
# compare


@dataclass
class RunMetrics:
    """The input of `compare`: one run's identity, options and metrics.

    `fallback` is used when `metrics` has no steps (e.g. a record whose metrics.jsonl is gone):
    its values are shown, with no noise estimate.
    """

    id: str
    tag: Optional[str]
    metrics: MetricsFile
    options: dict[str, Any] = field(default_factory=dict)
    fallback: Optional[Summary] = None
    # A repeat group (2+ runs of one configuration): every repeat's metrics, and their run ids.
    # `id` is then the group's id and `metrics` its latest repeat's.
    members: list[MetricsFile] = field(default_factory=list)
    member_ids: list[str] = field(default_factory=list)
    member_fallbacks: list[Optional[Summary]] = field(default_factory=list)  # each repeat's recorded summary
    # A group's repeats that are not behind its figures, and why ("repeat 2 failed", "repeat 3 never ran").
    left_out: list[str] = field(default_factory=list)
    unfinished: bool = False  # still training (or queued): its figures are its steps so far
    stopped: Optional[str] = None  # `failed` / `interrupted` / `stale`: it ended before its planned steps

    @property
    def is_group(self) -> bool:
        return len(self.members) >= 2


@dataclass
class MetricValue:
    value: Optional[float]
    delta_pct: Optional[float] = None  # vs the baseline; 0.0 for the baseline itself
    stderr: Optional[float] = None  # of the tail mean; None for non-mean metrics
    beyond_noise: Optional[bool] = None  # None when either side has no noise estimate or is marked
    marked: bool = False  # a tail mean over warm-up steps only (the run is not clean): show MARK
    not_finite: bool = False  # value is None because the figure was NaN (a diverged run's final loss)


@dataclass
class RunComparison:
    id: str
    tag: Optional[str]
    steps: int  # steps in the run (not the window)
    tail_steps: int  # steps the tail window covered
    options: dict[str, Any]
    metrics: dict[str, MetricValue]
    clean: bool = True  # the tail window is past the warm-up (see `tail_window`)
    note: Optional[str] = None  # the summary's note: warm-up only, or a short clean window
    n_repeats: int = 1  # runs behind the figures: 1, or a repeat group's size
    noise: str = WITHIN_RUN  # what `stderr` is: WITHIN_RUN (one run) or BETWEEN_RUNS (a group)
    run_ids: list[str] = field(default_factory=list)  # the runs behind the entry: a group's repeats, or the one run
    unfinished: bool = False  # still training (or queued): the figures are its steps so far
    stopped: Optional[str] = None  # how a run that ended early ended (its figures are the steps it ran)
    left_out: list[str] = field(default_factory=list)  # a group's repeats not behind the figures, and why


@dataclass
class Comparison:
    baseline: str  # run id
    window: int
    runs: list[RunComparison]
    notes: list[str] = field(default_factory=list)
    warmup_steps: int = 0

    def to_json(self) -> dict[str, Any]:
        """The `moectl compare --json` contract (SPEC §7a), plus `notes`, `unfinished`, `left_out`, `beyond_noise`, the
        warm-up keys (`warmup_steps`; per run `clean`, `note`; per metric `marked`) and per metric
        `not_finite` (its null value was NaN: a diverged run's final loss)."""
        return {
            "baseline": self.baseline,
            "window": self.window,
            "warmup_steps": self.warmup_steps,
            "runs": [
                {
                    "id": r.id,
                    "tag": r.tag,
                    "steps": r.steps,
                    "tail_steps": r.tail_steps,
                    "clean": r.clean,
                    "note": r.note,
                    "n_repeats": r.n_repeats,
                    "noise": r.noise,
                    "run_ids": r.run_ids,
                    "unfinished": r.unfinished,
                    "left_out": r.left_out,
                    "metrics": {
                        name: {
                            "value": mv.value,
                            "delta_pct": mv.delta_pct,
                            "stderr": mv.stderr,
                            "beyond_noise": mv.beyond_noise,
                            "marked": mv.marked,
                            "not_finite": mv.not_finite,
                        }
                        for name, mv in r.metrics.items()
                    },
                }
                for r in self.runs
            ],
            "notes": self.notes,
        }


def delta_pct(value: Optional[float], base: Optional[float]) -> Optional[float]:
    if value is None or base is None or base == 0:
        return None
    return (value - base) / abs(base) * 100.0


def beyond_noise(a: Optional[float], se_a: Optional[float], b: Optional[float], se_b: Optional[float],
                 df_a: Optional[float] = None, df_b: Optional[float] = None) -> Optional[bool]:
    """|a - b| > k * sqrt(se_a^2 + se_b^2): k = Student's t at 95% for Welch's degrees of freedom of
    the two errors (df: a group's repeats - 1, a window's effective sample size - 1; None: as good as
    infinite), never below 2."""
    if a is None or b is None or se_a is None or se_b is None:
        return None
    return abs(a - b) > noise_multiplier(se_a, df_a, se_b, df_b) * math.sqrt(se_a * se_a + se_b * se_b)


def noise_multiplier(se_a: float, df_a: Optional[float], se_b: float, df_b: Optional[float]) -> float:
    df = welch_df(se_a, df_a, se_b, df_b)
    return 2.0 if df is None else max(2.0, t_critical(df))


def compare(runs: Sequence[RunMetrics], baseline_index: int = 0, window: int = 50,
            warmup_steps: int = 0) -> Comparison:
    """Tail-window values of every run, % deltas and noise verdicts against one baseline run.
    A run without a clean window keeps its values and deltas, marked, and no noise verdict."""
    if not runs:
        raise ValueError("nothing to compare")
    if not 0 <= baseline_index < len(runs):
        raise ValueError(f"baseline index {baseline_index} out of range")
    # Each error's degrees of freedom: a group's between-runs error has repeats - 1, a window's
    # within-run error its effective sample size - 1 (both in Welch's t below).
    summaries, errors, dfs, other_windows = [], [], [], []
    for r in runs:
        if r.is_group:
            summary, errs = group_summary(r.members, window, warmup_steps, r.member_fallbacks)
            summaries.append(summary)
            errors.append(errs)
            dfs.append({m: len(r.members) - 1 for m in METRICS})
        elif r.metrics.steps or r.fallback is None:
            summaries.append(tail_summary(r.metrics, window, warmup_steps))
            noise = _tail_noise_and_df(r.metrics, window, warmup_steps)
            errors.append({m: se for m, (se, _) in noise.items()})
            dfs.append({m: df for m, (_, df) in noise.items()})
        else:  # no steps to read (metrics.jsonl gone or empty): the summary its record kept, said so
            fallback = r.fallback  # when its window is another (in the run's note and the table's notes)
            if fallback.window not in (None, window):
                said = (f"its metrics.jsonl has no steps (gone or empty): these are its recorded figures over a "
                        f"{fallback.window}-step window, not {window}")
                fallback = fallback.model_copy(update={"note": "; ".join(x for x in (fallback.note, said) if x)})
                other_windows.append(f"{r.tag or r.id}'s figures are its record's over a {fallback.window}-step "
                                     f"window (its metrics.jsonl has no steps: gone or empty), not {window}")
            summaries.append(fallback)
            errors.append({m: None for m in METRICS})
            dfs.append({m: None for m in METRICS})

    base, base_errs, base_df = summaries[baseline_index], errors[baseline_index], dfs[baseline_index]
    base_ids = set(runs[baseline_index].member_ids if runs[baseline_index].is_group else [runs[baseline_index].id])
    out: list[RunComparison] = []
    for i, (r, summ, errs, df) in enumerate(zip(runs, summaries, errors, dfs)):
        # A run beside a group that holds it (or two groups sharing runs): not independent samples,
        # so no "beyond noise" either way (the test assumes two independent means).
        shared = i != baseline_index and bool(base_ids & set(r.member_ids if r.is_group else [r.id]))
        both_clean = summ.clean and base.clean and not shared
        mvs = {}
        for m in METRICS:
            value = getattr(summ, m)
            verdict = beyond_noise(value, errs[m], getattr(base, m), base_errs[m], df[m], base_df[m])
            mvs[m] = MetricValue(
                value=value,
                delta_pct=delta_pct(value, getattr(base, m)),
                stderr=errs[m],
                beyond_noise=verdict if both_clean else None,
                marked=not summ.clean and m in MEAN_METRICS and value is not None,
                not_finite=m == "final_loss" and summ.final_loss_not_finite,
            )
        n_steps = r.metrics.n_steps if r.metrics.steps else (summ.run_steps or summ.steps)
        out.append(RunComparison(r.id, r.tag, n_steps, summ.steps, dict(r.options), mvs,
                                 clean=summ.clean, note=summ.note, n_repeats=len(r.members) if r.is_group else 1,
                                 noise=BETWEEN_RUNS if r.is_group else WITHIN_RUN,
                                 run_ids=list(r.member_ids) if r.is_group else [r.id], unfinished=r.unfinished,
                                 stopped=r.stopped, left_out=list(r.left_out)))
    notes = _notes(out, window, warmup_steps)
    notes += [f"still comparable, note: {said}" for said in other_windows]
    notes += _damage_notes(runs)
    base_row = out[baseline_index]
    for row in out:
        if row is not base_row and set(row.run_ids) & set(base_row.run_ids):
            notes.append(f"not independent: {row.tag or row.id} and the baseline {base_row.tag or base_row.id} share "
                         f"run(s) {', '.join(sorted(set(row.run_ids) & set(base_row.run_ids)))}: no noise verdict")
    return Comparison(baseline=runs[baseline_index].id, window=window, runs=out, notes=notes, warmup_steps=warmup_steps)


def _damage_notes(runs: Sequence[RunMetrics]) -> list[str]:
    """A metrics.jsonl damaged since its run recorded it (lines that no longer parse, a file cut short,
    one that cannot be read): its figures are recomputed from what is left, and may differ from the
    record's (`runs`, `show`), so say so."""
    notes = []
    for r in runs:
        name = r.tag or r.id
        for m in (r.members if r.is_group else [r.metrics]):
            if m.unreadable:
                notes.append(f"damaged: {name}'s metrics.jsonl cannot be read ({m.unreadable})")
            if m.skipped:
                notes.append(f"damaged: {m.skipped} line(s) of {name}'s metrics.jsonl cannot be read and are left out")
        recorded = r.fallback.run_steps if r.fallback is not None and not r.is_group else None
        if recorded and r.metrics.steps and r.metrics.n_steps < recorded and not r.unfinished:
            notes.append(f"damaged: {name}'s metrics.jsonl holds {r.metrics.n_steps} steps, its record {recorded} "
                         "(cut since it was recorded?): its figures here are of the steps the file holds")
    return notes


def _notes(rows: list[RunComparison], window: int, warmup_steps: int = 0) -> list[str]:
    """Differences that do not make runs incomparable but that a reader should know about, and
    the runs whose figures are warm-up only (which are not comparable at all)."""
    notes = []
    presets = sorted({str(r.options.get("preset")) for r in rows if r.options.get("preset") is not None})
    if len(presets) > 1:
        notes.append(f"still comparable, note: presets differ ({', '.join(presets)})")
    empty = [r.tag or r.id for r in rows if not r.steps]
    if empty:  # a run that failed (or was stopped) before its first step has no figures at all
        notes.append(f"not comparable: {', '.join(empty)} has no steps (nothing was measured)")
    steps = sorted({r.steps for r in rows if r.steps})
    if len(steps) > 1:
        notes.append(f"still comparable, note: step counts differ ({', '.join(map(str, steps))})")
    short = [f"{r.tag or r.id} ({r.tail_steps})" for r in rows if r.clean and r.tail_steps < window]
    if short:
        after = f" after the {warmup_steps} warm-up steps" if warmup_steps else ""
        notes.append(
            f"still comparable, note: fewer than {window} steps in the tail window{after} for {', '.join(short)}"
        )
    unfinished = [r.tag or r.id for r in rows if r.unfinished]
    if unfinished:
        notes.append(f"not final: {', '.join(unfinished)} still training; its figures are its steps so far")
    stopped = [f"{r.tag or r.id} {r.stopped}" for r in rows if r.stopped and r.steps]
    if stopped:
        notes.append(f"ended early: {', '.join(stopped)}; its figures are the steps it ran")
    for r in rows:  # survivorship: a group's figures are of the repeats that completed, not of all it planned
        if r.left_out:
            shown = f"{r.n_repeats} run" if r.n_repeats == 1 else f"{r.n_repeats} runs"
            notes.append(f"incomplete group: {r.tag or r.id}'s figures are of {shown} ({', '.join(r.run_ids)}); "
                         f"left out: {', '.join(r.left_out)}")
    diverged = [r.tag or r.id for r in rows if r.metrics["final_loss"].not_finite]
    if diverged:
        notes.append(f"diverged: {', '.join(diverged)} ended with a NaN/inf loss (final loss NaN); the "
                     "throughput figures are still measured, but nothing was learned past the divergence")
    marked = [r.tag or r.id for r in rows if not r.clean and r.tail_steps]
    if marked:
        notes.append(f"not comparable: {', '.join(marked)} ran no step past the warm-up, so the tail means marked "
                     f"{MARK} include compile / warm-up; they get no noise verdict and are never recommended")
    return notes
