"""Warm-up steps never enter a tail window, and nothing rests on a figure that is warm-up only
(issue 7: a sweep's `static` legs carried their 15 s compile step into a 20-step window and the
recommendation named the slowest leg the fastest).

Expected figures are computed here from the fixtures' own numbers (a slice by step number and a
plain mean), never by the code under test.
"""
from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from engine.schema import RunSummary, StartInfo, StepMetrics, to_line
from moectl import store
from moectl.config import load_config
from moectl.metrics import MetricsFile, RunMetrics, compare, read_metrics, tail_stderr, tail_summary
from moectl.records import RunRecord, SweepLeg, SweepRecord, save_model
from moectl.report import run_report
from moectl.summary import render_summary
from moectl.sweep.report import fastest, recommendation
from tests.conftest import git

COMPILE_MS = 15_000.0
TOKENS = 4096


def compiled_run(n: int = 20, steady_ms: float = 100.0, first_ms: float = COMPILE_MS) -> list[StepMetrics]:
    """Step 0 carries a 15 s compile (`first_ms`); then a steady state with a little spread."""
    steps = []
    for i in range(n):
        dt = first_ms if i == 0 else steady_ms + (i % 4)
        steps.append(StepMetrics(step=i, loss=4.0 - i / 100, dt_ms=dt, tok_per_sec=TOKENS / dt * 1000,
                                 elapsed_s=None))
    return steps


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def write_metrics(path: Path, steps: list[StepMetrics], finished: bool = True) -> Path:
    lines = [to_line(s) for s in steps]
    if finished:
        lines.append(to_line(RunSummary(steps=len(steps), world_size=1, peak_mem_mib=100.0, total_time_s=20.0)))
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------ the tail window


def test_a_15s_compile_step_stays_out_of_the_summary(tmp_path):
    steps = compiled_run(20)
    clean = [s for s in steps if s.step >= 10]  # steps 10..19: the ten past the warm-up
    path = write_metrics(tmp_path / "metrics.jsonl", steps)
    full = read_metrics(path)
    s = tail_summary(full, window=50, warmup_steps=10)
    assert s.dt_ms == pytest.approx(mean(x.dt_ms for x in clean))
    assert s.tok_per_sec == pytest.approx(mean(x.tok_per_sec for x in clean))
    assert s.dt_ms < 105.0  # nowhere near the compile step
    assert (s.window, s.warmup_steps, s.steps, s.clean) == (50, 10, 10, True)
    assert s.note == "10 clean steps (< window 50) after 10 warm-up steps"
    # whole-run figures keep the whole run: the peak and the training time include the compile
    assert s.peak_mem_mib == 100.0 and s.total_time_min == pytest.approx(20.0 / 60) and s.final_loss == steps[-1].loss
    # `compare` reads only a finished run's tail: the same window comes out
    assert tail_summary(read_metrics(path, tail=50), 50, 10) == s
    assert tail_stderr(read_metrics(path, tail=50), 50, 10) == tail_stderr(full, 50, 10)
    # What the issue saw (nothing left out): the compile step dominates the mean.
    old = tail_summary(full, window=50, warmup_steps=0)
    assert old.dt_ms == pytest.approx(mean(x.dt_ms for x in steps)) and old.dt_ms > 800.0


def test_the_window_is_chosen_by_step_number_not_by_line(tmp_path):
    # A resumed run: steps 0..14, then a resume from step 8 that re-runs 8..19 (the later lines win).
    first = [StepMetrics(step=i, loss=9.0, tok_per_sec=1.0) for i in range(15)]
    second = [StepMetrics(step=i, loss=1.0, tok_per_sec=100.0 + i) for i in range(8, 20)]
    path = write_metrics(tmp_path / "m.jsonl", first + second)
    s = tail_summary(read_metrics(path), window=5, warmup_steps=10)
    assert s.steps == 5 and s.tok_per_sec == pytest.approx(mean([115.0, 116.0, 117.0, 118.0, 119.0]))
    # window 50: steps 10..19, all from the resumed segment
    assert tail_summary(read_metrics(path), 50, 10).tok_per_sec == pytest.approx(mean(100.0 + i for i in range(10, 20)))


def test_a_run_counting_from_1_leaves_out_its_first_warmup_steps_not_one_fewer(tmp_path):
    # `step 1` .. `step 20`, its compile at step 1: warm-up 10 is steps 1-10, the window steps 11-20.
    steps = [StepMetrics(step=s.step + 1, loss=s.loss, dt_ms=s.dt_ms, tok_per_sec=s.tok_per_sec) for s in compiled_run(20)]
    clean = [s for s in steps if s.step >= 11]
    path = write_metrics(tmp_path / "metrics.jsonl", steps)
    full = read_metrics(path)
    s = tail_summary(full, window=50, warmup_steps=10)
    assert (s.steps, s.run_steps, s.warmup_steps, s.first_step, s.clean) == (10, 20, 10, 1, True)
    assert s.dt_ms == pytest.approx(mean(x.dt_ms for x in clean))
    assert s.note == "10 clean steps (< window 50) after 10 warm-up steps"
    assert tail_summary(read_metrics(path, tail=5), 5, 10) == tail_summary(full, 5, 10)  # a tail read knows it too
    built = tail_summary(MetricsFile(steps=steps), 50, 10)  # (steps built in memory: an import)
    assert (built.steps, built.first_step, built.dt_ms) == (s.steps, s.first_step, s.dt_ms)
    assert "Steps 1–10 are warm-up" in run_report(RunRecord(id="r", created_at="t", exp_dir="/x", summary=s))


def test_a_run_whose_first_step_is_not_1_or_that_resumed_at_1_counts_from_0(tmp_path):
    # A trainer resumed at `iter 500`: its steps 500.. are where the run is, no warm-up left out.
    resumed = [StepMetrics(step=i, loss=1.0, tok_per_sec=100.0 + i) for i in range(500, 520)]
    s = tail_summary(read_metrics(write_metrics(tmp_path / "a.jsonl", resumed)), 50, 10)
    assert (s.steps, s.first_step) == (20, 0)
    # The engine resumed at step 1 into a fresh directory: the store adds the resume to the warm-up
    # (steps 1-10 of this process left out), and nothing more.
    lines = [to_line(StartInfo(steps=20, world_size=1, tokens_per_step=1, device="cpu", start_step=1))]
    lines += [to_line(StepMetrics(step=i, loss=1.0, tok_per_sec=100.0 + i)) for i in range(1, 20)]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    rec = RunRecord(id="r", created_at="t", exp_dir="/x")
    store.apply_metrics(rec, read_metrics(tmp_path / "b.jsonl"), 50, 10)
    assert (rec.summary.steps, rec.summary.first_step, rec.summary.warmup_steps) == (9, 0, 11)


def resumed_lines(n: int, at: int, finished: bool = True) -> str:
    """The metrics.jsonl of an engine run of `n` steps resumed at step `at` into its own out-dir, as
    engine.train leaves it: the first attempt's start and steps 0 .. at-1, then the resumed attempt's
    start (start_step = at) and steps at .. n-1 (a compile step of its own first), then its summary."""
    start = dict(steps=n, world_size=1, tokens_per_step=TOKENS, device="cpu")
    first = [to_line(StartInfo(**start))] + [to_line(s) for s in compiled_run(at)]
    second = [replace(s, step=at + s.step) for s in compiled_run(n - at, steady_ms=200.0)]
    lines = first + [to_line(StartInfo(**start, start_step=at))] + [to_line(s) for s in second]
    if finished:
        lines.append(to_line(RunSummary(steps=n, world_size=1, peak_mem_mib=100.0, total_time_s=20.0)))
    return "\n".join(lines) + "\n"


def test_a_resumed_runs_warmup_starts_at_its_resume_for_every_reader(project, artifact_root, tmp_path):
    # Resumed at step 20 of 40: the resumed process compiles at step 20, so with 10 warm-up steps the
    # window is steps 30-39 - for the record (`runs`, `show`), `compare` and `export` alike. They kept
    # steps 10-29 (the resumed compile among them) everywhere but in the record.
    import csv
    import json
    import os
    import socket

    from typer.testing import CliRunner

    from moectl.cli import app

    def invoke(*args):
        r = CliRunner().invoke(app, list(args))
        assert r.exit_code == 0, r.output
        return r.stdout

    done = store.create_run_dir(artifact_root / "20260101_000000_moe-done")
    (done / "metrics.jsonl").write_text(resumed_lines(40, 20))
    rec = RunRecord(id=done.name, tag="done", status="completed", created_at="2026-01-01T00:00:00+00:00",
                    exp_dir=str(done), window=50, warmup_steps=10)
    store.apply_metrics(rec, read_metrics(done / "metrics.jsonl"), 50, 10)  # as the runner records it
    store.save_run(rec)
    live = store.create_run_dir(artifact_root / "20260101_000001_moe-live")  # still training: steps 0-34 so far
    (live / "metrics.jsonl").write_text("".join(ln + "\n" for ln in resumed_lines(40, 20, finished=False).splitlines()[:-5]))
    now = datetime.now().astimezone().isoformat()  # after this process started: its pid owns the run
    store.save_run(RunRecord(id=live.name, tag="live", status="running", created_at=now, started_at=now,
                             exp_dir=str(live), pid=os.getpid(), host=socket.gethostname(), window=50,
                             warmup_steps=10))
    steady = {tag: mean(TOKENS / (200.0 + (i - 20) % 4) * 1000 for i in range(30, last))
              for tag, last in (("done", 40), ("live", 35))}

    runs = {r["tag"]: r["summary"] for r in json.loads(invoke("runs", "--json"))}
    assert runs["live"] is None  # (no summary until the run ends)
    shown = {"done": json.loads(invoke("show", "done", "--json"))["summary"],
             "live": json.loads(invoke("show", "live", "--json"))["summary_so_far"]}
    assert shown["done"] == runs["done"]
    compared = {r["tag"]: r for r in json.loads(invoke("compare", "done", "live", "--json"))["runs"]}
    invoke("export", "done", "live", "--csv", str(tmp_path / "csv"))
    with open(tmp_path / "csv" / "summary.csv", newline="") as fh:
        exported = {row["tag"]: row for row in csv.DictReader(fh)}
    for tag, n in (("done", 10), ("live", 5)):
        s = shown[tag]
        assert (s["steps"], s["warmup_steps"], s["clean"]) == (n, 30, True), tag
        assert s["tok_per_sec"] == pytest.approx(steady[tag])
        c = compared[tag]
        assert (c["tail_steps"], c["clean"], c["note"]) == (n, True, s["note"]), tag
        assert c["metrics"]["tok_per_sec"]["value"] == pytest.approx(steady[tag])
        e = exported[tag]
        assert (e["window_steps"], e["warmup_steps"], e["clean"]) == (str(n), "30", "true"), tag
        assert float(e["tok_per_sec"]) == pytest.approx(steady[tag])


def test_a_tail_read_knows_where_a_run_resumed_before_its_tail(tmp_path):
    # Resumed 5 steps from its end, read for a window of 3: the start line lies before the steps read,
    # and with 10 warm-up steps every step of the resumed process is warm-up (not clean).
    path = tmp_path / "metrics.jsonl"
    path.write_text(resumed_lines(40, 35))
    full, tail = tail_summary(read_metrics(path), 3, 10), tail_summary(read_metrics(path, tail=3), 3, 10)
    assert tail == full and (full.clean, full.steps, full.warmup_steps) == (False, 3, 45)
    # A window reaching back past the first start line: the last start still says where it resumed.
    assert tail_summary(read_metrics(path, tail=50), 50, 10) == tail_summary(read_metrics(path), 50, 10)
    assert tail_summary(read_metrics(path, tail=50), 50, 10).warmup_steps == 45


def test_a_resumed_run_says_the_steps_before_its_resume_ran_in_an_earlier_process(tmp_path):
    # Resumed at 20 with 10 warm-up steps, the summary leaves out steps 0-29. The report said
    # "Steps 0–29 are warm-up" and `show` "after 30 warm-up steps": 20 of them were the first
    # attempt's steady steps, left out because another process ran them, not for warming up.
    path = tmp_path / "metrics.jsonl"
    path.write_text(resumed_lines(40, 20))
    s = tail_summary(read_metrics(path), 50, 10)
    assert (s.resumed_at, s.warmup_steps, s.steps, s.clean) == (20, 30, 10, True)
    assert s.note == "10 clean steps (< window 50) after the steps before its resume at step 20 and 10 warm-up steps"
    rec = RunRecord(id="r", tag="t", status="completed", created_at="2026-01-01T00:00:00+00:00", exp_dir=str(tmp_path),
                    summary=s)
    report = run_report(rec)
    assert ("The run resumed at step 20: steps 0–19 ran in an earlier process; steps 20–29 are its warm-up "
            "(compile, allocator; `[metrics] warmup_steps`). No tail mean counts them.") in report
    assert "Steps 0–29 are warm-up" not in report
    assert "The run has only 10 steps past its resume and warm-up" in report
    # No warm-up configured: only the resume is left out.
    s0 = tail_summary(read_metrics(path), 50, 0)
    assert (s0.warmup_steps, s0.steps) == (20, 20)
    assert "The run resumed at step 20: steps 0–19 ran in an earlier process. No tail mean counts them." in \
        run_report(rec.model_copy(update={"summary": s0}))
    # Resumed within its warm-up and no step past it: said so, not "all 40 steps are among the first 45".
    path.write_text(resumed_lines(40, 35))
    late = tail_summary(read_metrics(path), 50, 10)
    assert late.note == ("warm-up only: no step past the steps before its resume at step 35 and 10 warm-up steps, "
                         "so the tail means include compile / warm-up")
    # A run that never resumed reads as before.
    plain = tail_summary(MetricsFile(steps=compiled_run(40)), 50, 10)
    assert plain.resumed_at is None
    assert "Steps 0–9 are warm-up" in run_report(rec.model_copy(update={"summary": plain}))


def test_a_run_of_only_warmup_steps_is_marked_and_keeps_its_figures():
    steps = compiled_run(6)
    s = tail_summary(MetricsFile(steps=steps), window=50, warmup_steps=10)
    assert s.clean is False and s.steps == 6
    assert s.dt_ms == pytest.approx(mean(x.dt_ms for x in steps))  # what exists, compile included
    assert s.note.startswith("warm-up only: all 6 steps are among the first 10")
    empty = tail_summary(MetricsFile(), window=50, warmup_steps=10)
    assert empty.clean is False and empty.steps == 0 and empty.note == "no steps recorded"


def test_bad_warmup_steps_is_refused():
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        tail_summary(MetricsFile(steps=compiled_run(3)), 50, -1)


# ------------------------------------------------------------------------- compare / recommend


def run_of(tag: str, n: int, tok_per_sec: float, spread: float = 0.0) -> RunMetrics:
    steps = [StepMetrics(step=i, loss=3.0, tok_per_sec=tok_per_sec + spread * (i % 3), dt_ms=TOKENS / tok_per_sec * 1000)
             for i in range(n)]
    return RunMetrics(id=f"id-{tag}", tag=tag, metrics=MetricsFile(steps=steps))


def test_no_beyond_noise_verdict_involves_a_marked_figure():
    base = run_of("base", 30, 1000.0, spread=1.0)
    short_fast = run_of("short_fast", 5, 5000.0, spread=1.0)  # all warm-up; five times the speed
    clean_fast = run_of("clean_fast", 30, 1100.0, spread=1.0)
    c = compare([base, short_fast, clean_fast], window=50, warmup_steps=10)
    by_tag = {r.tag: r for r in c.runs}
    sf = by_tag["short_fast"].metrics["tok_per_sec"]
    # the delta is still shown (marked): 5 warm-up steps 5000 + i%3 against base's clean steps 10..29
    expected = (mean(5000.0 + i % 3 for i in range(5)) / mean(1000.0 + i % 3 for i in range(10, 30)) - 1) * 100
    assert sf.marked is True and sf.beyond_noise is None and sf.delta_pct == pytest.approx(expected)
    assert by_tag["short_fast"].clean is False
    assert by_tag["clean_fast"].metrics["tok_per_sec"].beyond_noise is True  # clean vs clean: judged
    assert not by_tag["clean_fast"].metrics["tok_per_sec"].marked
    assert any(n.startswith("not comparable: short_fast ran no step past the warm-up") for n in c.notes)
    # 30 steps, 10 of them warm-up: 20 in the window, and the note counts them
    assert ("still comparable, note: fewer than 50 steps in the tail window after the 10 warm-up steps "
            "for base (20), clean_fast (20)") in c.notes
    # and when the baseline is the marked one, nobody gets a verdict against it
    c2 = compare([short_fast, clean_fast], window=50, warmup_steps=10)
    assert all(r.metrics["tok_per_sec"].beyond_noise is None for r in c2.runs)


def test_recommendation_passes_over_a_marked_fast_leg():
    c = compare([run_of("base", 30, 1000.0), run_of("short_fast", 5, 5000.0), run_of("clean_fast", 30, 1100.0)],
                window=50, warmup_steps=10)
    assert fastest(c) == ("clean_fast", 1100.0, pytest.approx(10.0))
    rec = recommendation(c)
    assert rec.startswith("`clean_fast` is the fastest clean leg — 1100.00 tok/s tail mean (+10.00% vs `base`).")
    assert rec.endswith("Left out (warm-up only, †): `short_fast`.")


def test_recommendation_within_noise_names_no_winner():
    # +1% between two legs whose steps swing ±10%: the order is chance, and the sentence says so
    # (as the table does, with no *), instead of "the fastest leg".
    def noisy(tag, level):
        run = run_of(tag, 60, level)
        for i, s in enumerate(run.metrics.steps):
            s.tok_per_sec = level * (0.9, 1.1, 1.0, 0.95, 1.05)[i % 5]
        return run

    c = compare([noisy("base", 1000.0), noisy("a", 1010.0)], window=50, warmup_steps=10)
    assert fastest(c)[0] == "a" and c.runs[1].metrics["tok_per_sec"].beyond_noise is False
    rec = recommendation(c)
    assert rec.startswith("`a` has the highest tail mean — 1010.00 tok/s (+1.00% vs `base`) — but the difference "
                          "is within noise (no * in the table)"), rec
    clear = compare([run_of("base", 30, 1000.0, spread=1.0), run_of("a", 30, 1100.0, spread=1.0)], window=50,
                    warmup_steps=10)
    assert recommendation(clear).startswith("`a` is the fastest leg")  # beyond noise: named


def test_recommendation_without_a_noise_estimate_names_no_winner():
    # One clean step a leg (11 steps, 10 of warm-up): no standard error, so no verdict either way;
    # "`a` is the fastest leg" (+23.59%) rested on nothing (audit K's 11-step sweep).
    c = compare([run_of("base", 11, 1000.0), run_of("a", 11, 1200.0)], window=50, warmup_steps=10)
    assert c.runs[1].metrics["tok_per_sec"].beyond_noise is None and not c.runs[1].metrics["tok_per_sec"].marked
    rec = recommendation(c)
    assert rec.startswith("`a` has the highest tail mean — 1200.00 tok/s (+20.00% vs `base`) — but with no noise "
                          "estimate (too few clean steps for a standard error): no leg is shown faster yet"), rec


def test_recommendation_passes_over_a_fast_leg_that_diverged():
    diverged = run_of("lr_high", 30, 2000.0)
    for s in diverged.metrics.steps[12:]:
        s.loss = float("nan")  # NaN from step 12 on: fast, and wrong
    c = compare([run_of("base", 30, 1000.0), diverged, run_of("ok", 30, 1100.0)], window=50, warmup_steps=10)
    assert fastest(c) == ("ok", 1100.0, pytest.approx(10.0))
    rec = recommendation(c)
    assert rec.startswith("`ok` is the fastest leg — 1100.00 tok/s tail mean (+10.00% vs `base`).")
    assert rec.endswith("Left out (diverged: final loss NaN/inf): `lr_high`.")
    alone = compare([run_of("base", 30, 1000.0), diverged], window=50, warmup_steps=10, baseline_index=1)
    assert recommendation(alone).startswith("only `base` has a clean figure")
    only_diverged = compare([diverged], window=50, warmup_steps=10)
    assert recommendation(only_diverged).startswith("none: every leg with a clean figure diverged (`lr_high`")


def test_recommendation_when_the_baseline_is_marked_gives_no_delta():
    c = compare([run_of("base", 4, 9000.0), run_of("a", 30, 1000.0), run_of("b", 30, 1200.0)],
                window=50, warmup_steps=10)
    assert fastest(c) == ("b", 1200.0, None)
    rec = recommendation(c)
    assert rec.startswith("`b` is the fastest clean leg — 1200.00 tok/s tail mean "
                          "(no delta: the baseline `base` has only a warm-up figure).")


def test_recommendation_with_one_clean_leg_chooses_nothing():
    c = compare([run_of("a", 4, 9000.0), run_of("b", 30, 1200.0)], window=50, warmup_steps=10)
    assert recommendation(c).startswith("only `b` has a clean figure (1200.00 tok/s tail mean): nothing to choose")


def test_recommendation_when_no_leg_is_clean_says_what_to_do():
    c = compare([run_of("a", 4, 1000.0), run_of("b", 6, 3000.0)], window=50, warmup_steps=10)
    assert fastest(c) is None
    rec = recommendation(c)
    assert rec.startswith("none: no leg has a clean figure") and "`b`" not in rec and "`a`" not in rec
    assert "Run more steps a leg (`steps` > 10" in rec


# ------------------------------------------------------------------ a sweep in EXPERIMENTS.md


def leg_run(parent: Path, run_id: str, tag: str, steps: list[StepMetrics], sweep: str) -> RunRecord:
    """A completed leg as the runner leaves it, its record summary made under the same rule."""
    exp = parent / run_id
    exp.mkdir(parents=True)
    write_metrics(exp / "metrics.jsonl", steps)
    rec = RunRecord(id=run_id, tag=tag, status="completed", created_at=store.now_iso(), exp_dir=str(exp), sweep=sweep,
                    summary=tail_summary(read_metrics(exp / "metrics.jsonl"), 50, warmup_steps=10))
    store.save_run(rec)
    return rec


def test_experiments_md_marks_the_warmup_leg_and_concludes_on_clean_figures(git_repo, artifact_root, monkeypatch):
    (git_repo / ".moectl.toml").write_text('[project]\nname = "moe"\nbranch = "main"\nvenv = ""\n')
    git(git_repo, "add", ".moectl.toml")
    git(git_repo, "commit", "-q", "-m", "config")
    monkeypatch.chdir(git_repo)
    sweep_id = "20260301_100000_moe-grid"
    d = artifact_root / sweep_id
    # The sweep: `static` carries a 15 s compile on step 0; `none` has no compile. Over a
    # clean window `static` is the faster (95 ms vs 100 ms a step); `short` never left warm-up
    # and looks fastest of all on its 5 warm-up steps.
    none = leg_run(d, "20260301_100001_moe-none", "none", compiled_run(20, steady_ms=100.0, first_ms=100.0), sweep_id)
    static = leg_run(d, "20260301_100101_moe-static", "static", compiled_run(20, steady_ms=95.0), sweep_id)
    short = leg_run(d, "20260301_100201_moe-short", "short",
                    [StepMetrics(step=i, loss=3.0, dt_ms=10.0, tok_per_sec=409_600.0) for i in range(5)], sweep_id)
    save_model(d / "sweep.json", SweepRecord(
        id=sweep_id, name="grid", spec={"name": "grid"}, created_at=store.now_iso(), exp_dir=str(d),
        legs=[SweepLeg(tag=r.tag, state="completed", run_id=r.id) for r in (none, static, short)]))

    text = render_summary(load_config())
    section = text.split("### grid")[1].split("## Unfinished Sweeps")[0]
    static_dt = mean(s.dt_ms for s in compiled_run(20, steady_ms=95.0) if s.step >= 10)
    assert f"| static | — | completed | `{static.id}` | " in section
    static_row = next(ln for ln in section.splitlines() if ln.startswith("| static |"))
    assert f"| {static_dt:.2f} |" in static_row and "†" not in static_row  # dt without the compile
    short_row = next(ln for ln in section.splitlines() if ln.startswith("| short |"))
    assert "| 409600.00† | 10.00† |" in short_row
    assert "† warm-up only: the run has no step past its first 10" in section
    static_tps = mean(s.tok_per_sec for s in compiled_run(20, steady_ms=95.0) if s.step >= 10)
    assert f"Conclusion: `static` is the fastest clean leg — {static_tps:.2f} tok/s tail mean" in section
    assert "Left out (warm-up only, †): `short`." in section


def test_status_marks_a_recent_warmup_only_run(project, artifact_root):
    from typer.testing import CliRunner

    from moectl.cli import app

    fixtures = Path(__file__).parent / "fixtures"
    cli = CliRunner()
    r = cli.invoke(app, ["import", str(fixtures / "nanochat_small.log"), "--name", "nano"])  # 8 steps: all warm-up
    assert r.exit_code == 0, r.output
    with open(project / ".moectl.toml", "a") as fh:  # the same log with 2 warm-up steps: clean
        fh.write("\n[metrics]\nwarmup_steps = 2\n")
    r = cli.invoke(app, ["import", str(fixtures / "nanochat_small.log"), "--name", "clean"])
    assert r.exit_code == 0, r.output
    status = cli.invoke(app, ["status"])
    assert status.exit_code == 0, status.output
    lines = {m.group(1): ln for ln in status.stdout.splitlines() if (m := re.search(r"_moe-(\w+)\s", ln))}
    assert lines["nano"].endswith("10,938 tok/s† (warm-up only)")  # 87500 / 8
    assert lines["clean"].endswith("12,750 tok/s")  # steps 2..7: 76500 / 6
