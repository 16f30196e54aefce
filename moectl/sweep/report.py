"""What a sweep measured, as text: the legs table, the comparison of completed legs, the
recommendation, and the sweep report's markdown (also read by EXPERIMENTS.md, `moectl.summary`).

    comparison = completed_comparison(sweep, runs, cfg.metrics.window, "static_cap0p0")
    recommendation(comparison)     # one sentence naming the fastest leg by its clean tail tok/sec

Pure functions of the sweep record, the run records and their metrics.jsonl; nothing is written.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from moectl.metrics import MARK, Comparison, RunMetrics, compare, read_metrics
from moectl.records import RunRecord, SweepLeg, SweepRecord
from moectl.report import COLUMNS, compare_markdown, marked_footnote, report_path, summary_cell, write_report
from moectl.sweep.store import leg_status

LEG_METRICS = ("tok_per_sec", "dt_ms", "mfu", "peak_mem_mib", "total_time_min", "final_loss")


def legs_table(legs: list[SweepLeg], runs: dict[str, RunRecord], window: int) -> list[str]:
    """Markdown rows of every leg: state, run id, and the tail-window metrics of its run record
    (warm-up-only figures marked, with the footnote under the table)."""
    # The options that tell the legs apart (a tag is a name: `b` says nothing of its cap); what every
    # leg shares is the sweep's common options, said once above the table.
    keys = sorted({k for leg in legs for k in leg.options})
    varying = [k for k in keys if len({repr(leg.options.get(k)) for leg in legs}) > 1]
    head = ["leg", "options", "state", "run"] + [f"tail{window} {COLUMNS[m][0]}" if m in ("tok_per_sec", "dt_ms", "mfu")
                                                 else COLUMNS[m][0] for m in LEG_METRICS]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- | --- | --- |" + " ---: |" * len(LEG_METRICS)]
    summaries = []
    for leg in legs:
        rec = runs.get(leg.run_id) if leg.run_id else None
        s = rec.summary if rec is not None else None
        summaries.append(s)
        vals = [summary_cell(s, m, COLUMNS[m][1]) for m in LEG_METRICS]
        name = leg.tag + (f" (fallback of {leg.fallback_of})" if leg.fallback_of else "")
        name += f" (repeat {leg.repeat})" if leg.repeat else ""
        options = " ".join(f"`{k}={leg.options[k]}`" for k in varying if k in leg.options) or "—"
        lines.append("| " + " | ".join([name, options, leg_status(leg, runs), f"`{leg.run_id}`" if leg.run_id else "—",
                                         *vals]) + " |")
    return lines + marked_footnote(summaries)


def claim_sweep_report(cfg, sweep: SweepRecord) -> Path:
    """A report name of this sweep's own (`<YYYYmmdd_HHMM>_sweep_<name>.md`, `-2`... when taken),
    claimed now with a placeholder, so that two sweeps of one name started in the same minute never
    write (and commit) one file; the sweep rewrites it after each leg and at its end."""
    from moectl.summary import remember_written

    name = f"sweep_{sweep.name}" + ("_resume" if sweep.resumed_from else "")
    text = (f"# Sweep `{sweep.name}` — running\n\nSweep {sweep.id} started {sweep.created_at}; this report is "
            "written after each leg and when the sweep ends.\n")
    # Noted as moectl's before it is written (as EXPERIMENTS.md is): the next rewrite must not take
    # the placeholder for the user's own file (summary.users_changes).
    remember_written(cfg.root, report_path(cfg.report_dir, name), text)
    return write_report(cfg.report_dir, name, text)


def _diverged(run) -> bool:
    """A leg whose loss ended NaN/inf: its speed is real, its training is not."""
    final = run.metrics.get("final_loss")
    return bool(final is not None and final.not_finite)


def fastest(comparison: Comparison) -> Optional[tuple[str, float, Optional[float]]]:
    """(tag, tail tok/sec, delta % vs baseline) of the fastest run in a comparison, among the runs
    with a clean figure (a warm-up-only one is never the answer). The delta is None when the
    baseline's own figure is warm-up only."""
    rows = [r for r in comparison.runs
            if r.metrics["tok_per_sec"].value is not None and not r.metrics["tok_per_sec"].marked
            and not _diverged(r)]  # fast and wrong is not the answer either
    if not rows:
        return None
    best = max(rows, key=lambda r: r.metrics["tok_per_sec"].value)
    mv = best.metrics["tok_per_sec"]
    base = next(r for r in comparison.runs if r.id == comparison.baseline)
    return best.tag or best.id, mv.value, (mv.delta_pct if base.clean else None)


def within_noise(comparison: Comparison, tag: str) -> bool:
    """Whether the run `tag`'s tok/sec is, by compare's own test, not beyond noise of the baseline's
    (False also when there is no verdict: no noise estimate, or the baseline itself)."""
    return _verdict(comparison, tag) is False


_BASELINE = "baseline"


def _verdict(comparison: Comparison, tag: str):
    """The run `tag`'s tok/sec verdict against the baseline's (True, False, or None: no noise
    estimate on either side), or _BASELINE for the baseline itself or a tag not in the table."""
    row = next((r for r in comparison.runs if (r.tag or r.id) == tag), None)
    return _BASELINE if row is None or row.id == comparison.baseline else row.metrics["tok_per_sec"].beyond_noise


def recommendation(comparison: Optional[Comparison]) -> Optional[str]:
    """One sentence naming the fastest leg by its clean tail tok/sec; legs whose figures are
    warm-up only are named as left out, and when no leg has a clean figure it says what to do."""
    if comparison is None:
        return None
    warm = [r.tag or r.id for r in comparison.runs if r.metrics["tok_per_sec"].marked]
    diverged = [r.tag or r.id for r in comparison.runs if _diverged(r) and not r.metrics["tok_per_sec"].marked]
    best = fastest(comparison)
    if best is None:
        if diverged:
            return (f"none: every leg with a clean figure diverged ({', '.join(f'`{t}`' for t in diverged)}: final "
                    "loss NaN/inf); lower the learning rate or look at the first non-finite step in their records.")
        if not warm:
            return None
        return (f"none: no leg has a clean figure — every completed leg ran only warm-up steps (its first "
                f"{comparison.warmup_steps}, compile included), so its tail means measure start-up, not "
                f"training. Run more steps a leg (`steps` > {comparison.warmup_steps}, ideally "
                f"{comparison.warmup_steps} + `window`) and sweep again.")
    tag, tps, delta = best
    left_out = (f" Left out (warm-up only, {MARK}): {', '.join(f'`{t}`' for t in warm)}." if warm else "")
    left_out += (f" Left out (diverged: final loss NaN/inf): {', '.join(f'`{t}`' for t in diverged)}."
                 if diverged else "")
    base = next(r for r in comparison.runs if r.id == comparison.baseline)
    n_clean = len(comparison.runs) - len(warm) - len(diverged)
    if len(comparison.runs) == 1:
        return f"only `{tag}` completed ({tps:.2f} tok/s tail mean): nothing to choose between yet."
    if n_clean == 1:
        return f"only `{tag}` has a clean figure ({tps:.2f} tok/s tail mean): nothing to choose between yet.{left_out}"
    clean = " clean" if warm else ""
    if base.tag == tag or base.id == tag:
        return f"the baseline `{tag}` is the fastest{clean} leg ({tps:.2f} tok/s tail mean): keep it.{left_out}"
    versus = (f"({delta:+.2f}% vs `{base.tag or base.id}`)" if delta is not None
              else f"(no delta: the baseline `{base.tag or base.id}` has only a warm-up figure)")
    if within_noise(comparison, tag):
        # The order of two figures inside each other's noise is chance: say so, not "choose this one".
        return (f"`{tag}` has the highest{clean} tail mean — {tps:.2f} tok/s {versus} — but the difference is "
                f"within noise (no * in the table): no leg is shown faster yet; more steps a leg or "
                f"`repeats = 3` would tell.{left_out}")
    if _verdict(comparison, tag) is None and delta is not None:
        # No error to weigh the difference by (a window of one clean step): nothing shown either way.
        return (f"`{tag}` has the highest{clean} tail mean — {tps:.2f} tok/s {versus} — but with no noise "
                f"estimate (too few clean steps for a standard error): no leg is shown faster yet; more steps "
                f"a leg (`steps` ≥ {comparison.warmup_steps} + `window`) or `repeats = 3` would tell.{left_out}")
    return f"`{tag}` is the fastest{clean} leg — {tps:.2f} tok/s tail mean {versus}.{left_out}"


def completed_comparison(sweep: SweepRecord, runs: dict[str, RunRecord], window: int,
                         baseline_tag: Optional[str] = None, warmup_steps: int = 0) -> Optional[Comparison]:
    """The compare table of every completed leg (baseline: `baseline_tag` when it completed, else the
    first completed leg). The completed repeats of a leg (`repeats = N`) are one group entry."""
    done = [(leg, runs[leg.run_id]) for leg in sweep.legs
            if leg_status(leg, runs) == "completed" and leg.run_id in runs]
    if not done:
        return None
    entries: dict[str, list[tuple[SweepLeg, RunRecord]]] = {}
    for leg, rec in done:
        entries.setdefault(leg.group or rec.id, []).append((leg, rec))
    items = []
    for key, members in entries.items():
        files = [read_metrics(Path(rec.exp_dir) / "metrics.jsonl") for _, rec in members]
        leg, rec = members[-1]
        group = len(members) > 1
        # a repeat that did not complete is not behind the figures: said, not silently survived
        missed = [f"repeat {x.repeat} {leg_status(x, runs)}" for x in sweep.legs
                  if leg.group and x.group == leg.group and x.repeat is not None
                  and not any(m.repeat == x.repeat for m, _ in members)]
        items.append(RunMetrics(id=key, tag=leg.tag, metrics=files[-1], options=rec.options, fallback=rec.summary,
                                members=files if group else [], member_ids=[r.id for _, r in members] if group else [],
                                member_fallbacks=[r.summary for _, r in members] if group else [], left_out=missed))
    base = next((i for i, item in enumerate(items) if item.tag == baseline_tag), 0)
    return compare(items, baseline_index=base, window=window, warmup_steps=warmup_steps)


def sweep_report(sweep: SweepRecord, runs: dict[str, RunRecord], window: int, *, heading: str,
                 comparison: Optional[Comparison], chain: list[str], figures: list[Path], notes: list[str],
                 report_file: Path) -> str:
    exp = Path(sweep.exp_dir)
    n_done = sum(1 for leg in sweep.legs if leg_status(leg, runs) == "completed")
    lines = [f"# Sweep {sweep.name} — {heading}", ""]
    lines.append(f"- sweep: `{sweep.id}` ({n_done}/{len(sweep.legs)} legs completed)")
    lines.append(f"- directory: [`{exp}`]({exp.as_uri()})")
    if sweep.resumed_from:
        lines.append(f"- resumed from: `{sweep.resumed_from}` (chain: {' → '.join(f'`{c}`' for c in chain)})")
    common = sweep.spec.get("common") or {}
    if common:
        lines.append("- common options: " + ", ".join(f"`{k}={v}`" for k, v in common.items()))
    if sweep.spec.get("notes"):
        lines += ["", "## Notes", "", str(sweep.spec["notes"])]
    lines += ["", "## Legs", ""] + legs_table(sweep.legs, runs, window)
    for leg in sweep.legs:
        if leg.fallback_of:
            lines.append(f"\n- `{leg.tag}` re-runs `{leg.fallback_of}` with `--compile none`: torch.compile "
                         "failed in the engine (exit 3) and `launch.compile_fallback` is on.")
    lines += [f"\n- {n}" for n in notes]
    if comparison is not None:
        lines += ["", "## Comparison of completed legs", "", compare_markdown(comparison).rstrip()]
        rec = recommendation(comparison)
        if rec:
            lines += ["", f"**Recommendation:** {rec}"]
    if figures:
        lines += ["", "## Figures", ""]
        for f in figures:
            rel = os.path.relpath(f, report_file.parent)
            lines.append(f"![{f.stem}]({rel})")
    return "\n".join(lines) + "\n"
