"""Tail-window summaries, noise estimates and compare (moectl/metrics.py).

Expected figures are derived by hand from the fixture rows (arithmetic in the comments) or are the
seed study's published numbers; none is computed by the code under test.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from engine.schema import RunSummary, StepMetrics
from moectl.importers import parse_csv
from moectl.metrics import (
    METRICS,
    MetricsFile,
    RunMetrics,
    compare,
    read_metrics,
    tail_stderr,
    tail_summary,
)
from tests.conftest import SEED, needs_seed

FIXTURES = Path(__file__).parent / "fixtures"


def test_read_metrics_skips_and_counts_malformed_lines_and_keeps_last_duplicate():
    m = read_metrics(FIXTURES / "metrics_small.jsonl")
    # 3 bad lines: not JSON, a non-integer step, a step record without `step`.
    assert m.skipped == 3
    assert [s.step for s in m.steps] == [0, 1, 2, 3, 4, 5]
    # step 3 was written twice (a resumed run): the later line wins.
    assert m.steps[3].tok_per_sec == 2100.0 and m.steps[3].loss == 4.2
    assert m.start is not None and m.start.world_size == 2
    assert m.summary is not None and m.summary.total_time_s == 90.0


@pytest.mark.parametrize("line, why", [
    ('{"type":"step","step":0,"loss":1.0,"dt_ms":"12"}', "dt_ms is not a number: '12'"),
    ('{"type":"step","step":0,"loss":1.0,"tok_per_sec":true}', "tok_per_sec is not a number: True"),
    ('{"type":"step","step":0,"loss":"1.0"}', "loss is not a number: '1.0'"),
    ('{"type":"step","step":1.5,"loss":1.0}', "step is not an integer: 1.5"),
    ('{"type":"start","steps":"40","world_size":1,"tokens_per_step":1,"device":"cpu"}', "steps is not an integer: '40'"),
    ('{"type":"summary","steps":4,"world_size":1,"total_time_s":"9"}', "total_time_s is not a number: '9'"),
    ('{"type":"step","step":-1,"loss":1.0}', "step out of range: -1"),  # steps count from 0
    ('{"type":"step","step":9007199254740993,"loss":1.0}', "step out of range: 9007199254740993"),
])
def test_a_field_that_is_not_a_number_makes_its_line_malformed(tmp_path, line, why):
    """A string where a number goes made every reader of the file (import, show, compare, export)
    an internal error (`int + str`): it is one malformed line, skipped and counted."""
    from engine.schema import parse_line

    with pytest.raises(ValueError, match=re.escape(why)):
        parse_line(line)
    path = tmp_path / "metrics.jsonl"
    path.write_text(line + "\n" + '{"type":"step","step":2,"loss":0.5,"dt_ms":10,"tok_per_sec":1000}\n')
    m = read_metrics(path)
    assert m.skipped == 1 and [s.step for s in m.steps] == [2] and m.steps[0].dt_ms == 10  # ints are numbers


def test_read_metrics_missing_file_is_empty_not_an_error(tmp_path):
    m = read_metrics(tmp_path / "nope.jsonl")
    assert m.steps == [] and m.skipped == 0 and m.summary is None


def test_tail_summary_hand_computed_from_fixture():
    s = tail_summary(read_metrics(FIXTURES / "metrics_small.jsonl"), window=3)
    # last 3 steps: 3 (2100 tok/s, 190 ms, drop .05), 4 (2000, 200, .10), 5 (1950, 210, .15)
    assert s.window == 3 and s.steps == 3 and s.run_steps == 6  # steps 0..5, the window the last 3
    assert s.tok_per_sec == pytest.approx(6050 / 3)
    assert s.dt_ms == pytest.approx(200.0)
    assert s.drop_frac == pytest.approx(0.10)
    assert s.mfu is None  # CPU run: the engine writes null
    # peak = max(step peaks 100,120,150,140,140,145 and the summary's 160); the overwritten
    # first step-3 line (400) no longer counts.
    assert s.peak_mem_mib == 160.0
    assert s.total_time_min == pytest.approx(90.0 / 60)
    assert s.final_loss == 3.9


def test_tail_summary_shorter_run_than_window_and_elapsed_fallback():
    steps = [StepMetrics(step=i, loss=1.0, tok_per_sec=float(v), elapsed_s=float(i + 1) * 30)
             for i, v in enumerate([10, 20, 40])]
    s = tail_summary(MetricsFile(steps=steps), window=50)
    assert s.steps == 3 and s.window == 50
    assert s.tok_per_sec == pytest.approx(70 / 3)
    assert s.total_time_min == pytest.approx(90 / 60)  # last elapsed_s, no summary line
    assert s.dt_ms is None and s.peak_mem_mib is None


def test_summary_steps_are_the_windows_and_run_steps_the_runs():
    # 20 steps, window 50, warm-up 10: the means cover steps 10..19; the run made 20. A JSON reader
    # of run.json gets both, as `compare --json` gives `tail_steps` and `steps`.
    steps = [StepMetrics(step=i, loss=1.0, tok_per_sec=float(i)) for i in range(20)]
    s = tail_summary(MetricsFile(steps=steps), window=50, warmup_steps=10)
    assert (s.steps, s.run_steps, s.window) == (10, 20, 50)
    assert s.tok_per_sec == pytest.approx(sum(range(10, 20)) / 10)
    assert tail_summary(MetricsFile(), window=50).run_steps == 0


def test_tail_summary_empty_metrics():
    s = tail_summary(MetricsFile(), window=50)
    assert s.steps == 0 and all(getattr(s, m) is None for m in METRICS)


def test_stderr_of_tail_mean_by_hand():
    steps = [StepMetrics(step=i, loss=1.0, tok_per_sec=v) for i, v in enumerate([9.0, 1.0, 2.0, 3.0, 4.0])]
    se = tail_stderr(MetricsFile(steps=steps), window=4)
    # window = [1,2,3,4]: mean 2.5, squared deviations 2.25+0.25+0.25+2.25 = 5, var = 5/3,
    # se = sqrt(5/3)/sqrt(4)
    assert se["tok_per_sec"] == pytest.approx(math.sqrt(5 / 3) / 2)
    assert se["peak_mem_mib"] is None and se["final_loss"] is None  # not means: no stderr
    assert se["dt_ms"] is None  # no data


def _run(id_, tps, dt=None, preset="tiny", n=None):
    steps = [StepMetrics(step=i, loss=2.0, tok_per_sec=v, dt_ms=(dt[i] if dt else None))
             for i, v in enumerate(tps)]
    return RunMetrics(id=id_, tag=id_.upper(), metrics=MetricsFile(steps=steps), options={"preset": preset})


def test_compare_deltas_and_noise_verdicts():
    base = _run("a", [100.0, 102.0, 98.0, 100.0])  # mean 100, sd sqrt(8/3), se sqrt(8/3)/2 ~ 0.816
    near = _run("b", [101.0, 103.0, 99.0, 101.0])  # mean 101, same spread: |1| < 2*sqrt(2)*0.816 = 2.31
    far = _run("c", [110.0, 112.0, 108.0, 110.0])  # mean 110: 10 > 2.31
    c = compare([base, near, far], baseline_index=0, window=4)
    assert c.baseline == "a" and c.window == 4
    tps = {r.id: r.metrics["tok_per_sec"] for r in c.runs}
    assert tps["a"].delta_pct == 0.0
    assert tps["b"].delta_pct == pytest.approx(1.0)
    assert tps["c"].delta_pct == pytest.approx(10.0)
    assert tps["b"].beyond_noise is False and tps["c"].beyond_noise is True
    assert tps["b"].stderr == pytest.approx(math.sqrt(8 / 3) / 2)
    # a metric nobody has: value, delta and stderr are all None
    assert all(r.metrics["mfu"].value is None and r.metrics["mfu"].delta_pct is None for r in c.runs)
    assert c.notes == []


def test_compare_other_baseline_and_notes_for_different_presets_steps_window():
    a = _run("a", [100.0] * 6, preset="tiny")
    b = _run("b", [50.0, 50.0, 50.0], preset="d12-moe")
    c = compare([a, b], baseline_index=1, window=5)
    assert c.baseline == "b"
    assert {r.id: r.metrics["tok_per_sec"].delta_pct for r in c.runs} == {"a": pytest.approx(100.0), "b": 0.0}
    joined = " | ".join(c.notes)
    assert "presets differ (d12-moe, tiny)" in joined
    assert "step counts differ (3, 6)" in joined
    assert "fewer than 5 steps" in joined and "B" in joined
    assert all(n.startswith("still comparable") for n in c.notes)


def test_compare_uses_recorded_summary_when_metrics_are_gone():
    from moectl.records import Summary

    a = _run("a", [100.0, 100.0])
    gone = RunMetrics(id="g", tag="g", metrics=MetricsFile(), fallback=Summary(window=50, steps=50, tok_per_sec=150.0))
    c = compare([a, gone], window=50)
    g = c.runs[1].metrics["tok_per_sec"]
    assert g.value == 150.0 and g.delta_pct == pytest.approx(50.0) and g.stderr is None and g.beyond_noise is None
    assert not any("no steps" in n for n in c.notes)  # its recorded summary is a measurement


def test_a_run_whose_metrics_are_gone_counts_its_recorded_steps_and_says_its_window():
    # Its step count was the window's (50 of 70), which made "step counts differ (50, 70)" up; and
    # a --window 10 comparison showed its window-50 figures without a word.
    from moectl.records import Summary

    a = _run("a", [100.0] * 70)
    gone = RunMetrics(id="g", tag="g", metrics=MetricsFile(),
                      fallback=Summary(window=50, steps=50, run_steps=70, tok_per_sec=150.0))
    c = compare([a, gone], window=50)
    assert c.runs[1].steps == 70 and not any("step counts differ" in n for n in c.notes)
    assert c.runs[1].note is None
    assert not any("record's" in n for n in c.notes)
    c = compare([a, gone], window=10)
    assert c.runs[1].note == ("its metrics.jsonl has no steps (gone or empty): these are its recorded figures over "
                              "a 50-step window, not 10")
    # ... and the table's notes say it too (the table and --markdown print no per-run note)
    assert ("still comparable, note: g's figures are its record's over a 50-step window (its metrics.jsonl has no "
            "steps: gone or empty), not 10") in c.notes


def test_the_tail_window_is_the_last_step_numbers_not_the_last_lines():
    # A log printed every 10 steps (0, 10, ... 270, then 279): window 50 is steps 230-279, not the
    # last 50 printed lines, which reach back to step 10.
    from moectl.metrics import tail_window

    steps = [StepMetrics(step=i, loss=2.0, dt_ms=700.0 if i < 230 else 600.0) for i in [*range(0, 280, 10), 279]]
    window, clean = tail_window(MetricsFile(steps=steps), 50, warmup_steps=10)
    assert [s.step for s in window] == [230, 240, 250, 260, 270, 279] and clean
    assert tail_summary(MetricsFile(steps=steps), 50, 10).dt_ms == 600.0
    every = [StepMetrics(step=i, loss=2.0) for i in range(100)]  # a log with every step: the last 50 lines
    assert [s.step for s in tail_window(MetricsFile(steps=every), 50)[0]] == list(range(50, 100))


def test_a_run_that_ended_early_is_said_so():
    # A failed run's throughput is measured, but over the steps it ran: compare put no word on it.
    a = _run("a", [100.0] * 6)
    f = _run("f", [106.0] * 3)
    f.stopped = "failed"
    c = compare([a, f], window=5)
    assert "ended early: F failed; its figures are the steps it ran" in c.notes and c.runs[1].stopped == "failed"
    assert not any("ended early" in n for n in compare([a, _run("b", [101.0] * 6)], window=5).notes)


def test_a_run_without_a_single_step_is_not_comparable_and_says_so():
    a = _run("a", [100.0] * 6)
    failed = RunMetrics(id="f", tag="F", metrics=MetricsFile())  # failed before its first step
    c = compare([a, failed], window=5)
    assert "not comparable: F has no steps (nothing was measured)" in c.notes
    assert not any("step counts differ" in n for n in c.notes)
    assert c.runs[1].metrics["tok_per_sec"].value is None


def test_compare_json_contract_keys():
    c = compare([_run("a", [1.0, 2.0]), _run("b", [2.0, 3.0])], window=50).to_json()
    assert {"baseline", "window", "runs"} <= set(c)
    run = c["runs"][1]
    assert {"id", "tag", "steps", "metrics"} <= set(run)
    assert set(run["metrics"]) == {"tok_per_sec", "dt_ms", "mfu", "peak_mem_mib", "total_time_min", "final_loss", "drop_frac",
                                    "expert_load_max"}
    assert {"value", "delta_pct", "stderr"} <= set(run["metrics"]["tok_per_sec"])


def test_duplicate_summary_peak_only_in_summary():
    m = MetricsFile(steps=[StepMetrics(step=0, loss=1.0)], summary=RunSummary(steps=1, world_size=1, peak_mem_mib=42.0))
    assert tail_summary(m, 50).peak_mem_mib == 42.0


# --- the seed study: its published tail-50 figures must come out exactly -------------------------

@needs_seed
def test_seed_tail50_figures_reproduce_exactly():
    def summary(name):
        parsed = parse_csv((SEED / f"{name}.csv").read_text())
        assert parsed.skipped == 0
        return tail_summary(MetricsFile(steps=parsed.steps), window=50)

    # Figures as published in seed/README.md and progress_summary.md.
    cap1 = summary("moe_fp8_experts_static_cap1p0")
    assert round(cap1.tok_per_sec, 2) == 785203.42
    assert round(cap1.dt_ms, 2) == 670.31
    assert round(cap1.mfu, 4) == 9.5014
    buf = summary("moe_fp8_experts_static_cap1p0_bufreuse")
    assert round(buf.tok_per_sec, 2) == 806400.06
    assert round(buf.dt_ms, 2) == 650.67
    assert round(buf.mfu, 4) == 9.7588
    cap0 = summary("moe_fp8_experts_static_cap0p0")
    assert (round(cap0.tok_per_sec, 2), round(cap0.dt_ms, 2), round(cap0.mfu, 4)) == (468782.94, 1120.38, 5.6722)
    bf16 = summary("moe_bf16_experts_static_long")
    assert (round(bf16.tok_per_sec, 2), round(bf16.dt_ms, 2), round(bf16.mfu, 4)) == (1080430.24, 487.11, 13.0732)


@needs_seed
def test_seed_bufreuse_delta_and_it_is_beyond_noise():
    runs = []
    for name in ("moe_fp8_experts_static_cap1p0", "moe_fp8_experts_static_cap1p0_bufreuse"):
        parsed = parse_csv((SEED / f"{name}.csv").read_text())
        runs.append(RunMetrics(id=name, tag=name, metrics=MetricsFile(steps=parsed.steps)))
    c = compare(runs, window=50)
    buf = c.runs[1].metrics
    # progress_summary.md: tok/sec +2.70%, dt -2.93%, mfu +2.71%
    assert round(buf["tok_per_sec"].delta_pct, 2) == 2.70
    assert round(buf["dt_ms"].delta_pct, 2) == -2.93
    assert round(buf["mfu"].delta_pct, 2) == 2.71
    assert buf["tok_per_sec"].beyond_noise is True


def test_read_metrics_fast_and_careful_paths_agree(tmp_path):
    good = (FIXTURES / "metrics_small.jsonl").read_text().splitlines()
    clean = [ln for ln in good if ln.startswith('{"type"') and '"step":"x"' not in ln and ln != '{"type":"step","loss":4.0}']
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(clean) + "\n")
    fast = read_metrics(p)  # one json call for the whole file
    assert fast.skipped == 0 and len(fast.steps) == 6
    # lines that are valid JSON but not one object each: "1,2", a bracket split over two lines
    p.write_text("\n".join(clean[:3] + ["1,2", "[3", "4]"] + clean[3:]) + "\n")
    careful = read_metrics(p)
    assert careful.skipped == 3 and careful.steps == fast.steps and careful.summary == fast.summary


def test_read_metrics_ignores_keys_a_newer_engine_adds(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"type":"step","step":0,"loss":2.0,"tok_per_sec":5.0,"router_entropy":0.7}\n'
                 '{"step":1,"loss":1.5,"tok_per_sec":7.0}\n')  # "type" defaults to step
    m = read_metrics(p)
    assert m.skipped == 0 and [(s.step, s.tok_per_sec) for s in m.steps] == [(0, 5.0), (1, 7.0)]


def _write(path, steps, summary=None):
    from engine.schema import to_line

    lines = [to_line(s) for s in steps] + ([to_line(summary)] if summary else [])
    path.write_text("\n".join(lines) + "\n")


def test_tail_read_equals_full_read(tmp_path):
    # A resumed run: steps 0..9, then a resume from step 5 that runs to 12, then the summary.
    first = [StepMetrics(step=i, loss=9.0, tok_per_sec=100.0 + i, peak_mem_mib=50.0 + i) for i in range(10)]
    second = [StepMetrics(step=i, loss=1.0, tok_per_sec=200.0 + i, peak_mem_mib=40.0) for i in range(5, 13)]
    p = tmp_path / "m.jsonl"
    _write(p, first + second, RunSummary(steps=13, world_size=1, peak_mem_mib=59.0, total_time_s=60.0))
    full = read_metrics(p)
    for window in (1, 4, 8, 10, 50):
        tail = read_metrics(p, tail=window)
        assert tail.total_steps == 13 and tail.n_steps == full.n_steps == 13
        assert len(tail.steps) == min(window, 13)
        assert tail_summary(tail, window) == tail_summary(full, window)
        assert tail_stderr(tail, window) == tail_stderr(full, window)
    # window 4: steps 9..12, all from the resumed segment: (209+210+211+212)/4
    assert tail_summary(read_metrics(p, tail=4), 4).tok_per_sec == pytest.approx(210.5)


def test_tail_read_falls_back_to_full_without_a_summary(tmp_path):
    p = tmp_path / "m.jsonl"
    steps = [StepMetrics(step=i, loss=1.0, peak_mem_mib=float(10 * i)) for i in range(6)]
    _write(p, steps)  # still running: no summary line
    m = read_metrics(p, tail=2)
    assert m.total_steps is None and len(m.steps) == 6 and tail_summary(m, 2).peak_mem_mib == 50.0
    _write(p, steps, RunSummary(steps=6, world_size=1))  # a summary without peak memory
    assert len(read_metrics(p, tail=2).steps) == 6


@needs_seed
def test_seed_figures_are_untouched_by_the_default_warmup_steps():
    # 280 steps, window 50 = steps 230..279: 10 warm-up steps (the config default) change nothing.
    from moectl.metrics import DEFAULT_WARMUP_STEPS

    assert DEFAULT_WARMUP_STEPS == 10
    runs = []
    for name in ("moe_fp8_experts_static_cap1p0", "moe_fp8_experts_static_cap1p0_bufreuse"):
        parsed = parse_csv((SEED / f"{name}.csv").read_text())
        runs.append(RunMetrics(id=name, tag=name, metrics=MetricsFile(steps=parsed.steps)))
    cap1 = tail_summary(runs[0].metrics, window=50, warmup_steps=DEFAULT_WARMUP_STEPS)
    buf = tail_summary(runs[1].metrics, window=50, warmup_steps=DEFAULT_WARMUP_STEPS)
    assert (cap1.steps, cap1.clean, cap1.note) == (50, True, None)
    assert round(cap1.tok_per_sec, 2) == 785203.42 and round(buf.tok_per_sec, 2) == 806400.06
    assert round(buf.dt_ms, 2) == 650.67 and round(buf.mfu, 4) == 9.7588
    c = compare(runs, window=50, warmup_steps=DEFAULT_WARMUP_STEPS).runs[1].metrics["tok_per_sec"]
    assert round(c.delta_pct, 2) == 2.70 and c.beyond_noise is True and not c.marked


# --- a loss that is not finite (NaN / inf: a diverged run) ----------------------------------------

def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity: what a strict consumer of our JSON does."""
    import json

    def refuse(name):
        raise ValueError(f"{name} in JSON output")
    return json.loads(text, parse_constant=refuse)


def test_a_non_finite_loss_round_trips_as_a_step_not_a_malformed_line(tmp_path):
    from engine.schema import loss_is_finite, parse_line, to_line

    nan, inf = StepMetrics(step=1, loss=float("nan"), tok_per_sec=10.0), StepMetrics(step=2, loss=float("-inf"))
    assert '"loss":null' in to_line(nan) and '"loss":null' in to_line(inf)  # JSON has no NaN
    back = parse_line(to_line(nan))
    assert math.isnan(back.loss) and back.tok_per_sec == 10.0 and not loss_is_finite(back)
    assert loss_is_finite(parse_line(to_line(StepMetrics(step=0, loss=2.5))))
    p = tmp_path / "m.jsonl"
    # a file of the engine before this rule: the same null loss; a step with no loss key stays malformed
    p.write_text(to_line(StepMetrics(step=0, loss=2.5)) + "\n" + to_line(nan) + "\n" + to_line(inf) + "\n"
                 '{"type":"step","step":3,"loss":null,"dt_ms":5.0}\n{"type":"step","step":4}\n')
    m = read_metrics(p)
    assert m.skipped == 1 and [s.step for s in m.steps] == [0, 1, 2, 3]
    assert [loss_is_finite(s) for s in m.steps] == [True, False, False, False] and m.steps[3].dt_ms == 5.0


def _diverged(n=12, from_step=5, back_at=None):
    """Steps 0..n-1, tok/sec 100+i; loss 3.0 before `from_step`, NaN from it (finite again from `back_at`)."""
    def loss(i):
        return float("nan") if from_step <= i and (back_at is None or i < back_at) else 3.0
    return MetricsFile(steps=[StepMetrics(step=i, loss=loss(i), tok_per_sec=100.0 + i) for i in range(n)])


def test_a_diverged_run_has_no_final_loss_but_every_step_counted():
    from moectl.metrics import loss_warning

    m = _diverged(n=12, from_step=5)
    s = tail_summary(m, window=4)
    assert s.steps == 4 and s.tok_per_sec == pytest.approx((108 + 109 + 110 + 111) / 4)  # steps 8..11, all NaN-loss
    assert s.final_loss is None and s.final_loss_not_finite  # NaN, not the last finite 3.0
    assert (s.loss_not_finite, s.loss_not_finite_from) == (7, 5)  # steps 5..11
    assert loss_warning(m).startswith("loss not finite from step 5 (diverged): 7 of 12 steps")
    # a run whose loss came back: the final loss is the last step's, and the warning says so
    back = _diverged(n=12, from_step=5, back_at=7)
    s = tail_summary(back, window=4)
    assert s.final_loss == 3.0 and not s.final_loss_not_finite and (s.loss_not_finite, s.loss_not_finite_from) == (2, 5)
    assert loss_warning(back) == "loss not finite at 2 of 12 steps (first at step 5); the final loss is finite"
    assert loss_warning(_diverged(n=12, from_step=99)) is None


def test_compare_and_groups_never_average_a_nan_away():
    from moectl.metrics import group_summary

    fine = _run("a", [100.0, 100.0, 100.0])  # loss 2.0 throughout
    bad = RunMetrics(id="d", tag="D", metrics=_diverged(n=3, from_step=1))
    c = compare([fine, bad], window=50)
    loss = c.runs[1].metrics["final_loss"]
    assert loss.value is None and loss.not_finite and loss.delta_pct is None
    assert not c.runs[0].metrics["final_loss"].not_finite
    assert any(n.startswith("diverged: D ended with a NaN/inf loss") for n in c.notes)
    as_json = _strict_json(__import__("json").dumps(c.to_json()))
    assert as_json["runs"][1]["metrics"]["final_loss"]["not_finite"] is True
    # a repeat group with one diverged repeat: NaN, not the mean of the others' final losses
    summary, _ = group_summary([fine.metrics, bad.metrics], window=50)
    assert summary.final_loss is None and summary.final_loss_not_finite and summary.loss_not_finite_from == 1
    assert summary.tok_per_sec == pytest.approx((100.0 + (100 + 101 + 102) / 3) / 2)


def test_nan_and_infinity_from_a_foreign_writer_read_as_the_engine_would_have_written_them(tmp_path):
    """Python's default json.dumps writes NaN and Infinity: a trainer of the user's own with a step
    timed at 0 ms gives tok/s Infinity. Read, each is what the engine writes for it (a non-finite
    loss NaN, any other non-finite number None = not measured), so `compare --json` stays strict
    JSON and its noise test sees no inf (it failed: 'degrees of freedom must be > 0, got nan')."""
    import json

    lines = [json.dumps({"type": "step", "step": i, "loss": 3.0 - i * 0.01, "dt_ms": 10.0,
                         "tok_per_sec": float("inf") if i % 2 else 1000.0 + i, "mfu": float("nan")})
             for i in range(10)]
    lines.append('{"type":"step","step":10,"loss":Infinity,"dt_ms":10.0,"tok_per_sec":-Infinity}')
    assert "Infinity" in lines[1] and "NaN" in lines[0]
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(lines) + "\n")
    m = read_metrics(p)
    assert m.skipped == 0 and [s.step for s in m.steps] == list(range(11))
    assert [s.tok_per_sec for s in m.steps[:4]] == [1000.0, None, 1002.0, None] and m.steps[10].tok_per_sec is None
    assert all(s.mfu is None for s in m.steps) and math.isnan(m.steps[10].loss)
    assert tail_summary(m, 50).tok_per_sec == sum(1000.0 + i for i in range(0, 10, 2)) / 5
    other = tmp_path / "o.jsonl"
    other.write_text("\n".join(json.dumps({"type": "step", "step": i, "loss": 3.0, "dt_ms": 10.0, "tok_per_sec": 990.0 + i})
                               for i in range(11)) + "\n")
    c = compare([RunMetrics(id="a", tag="a", metrics=m), RunMetrics(id="b", tag="b", metrics=read_metrics(other))], window=50)
    _strict_json(json.dumps(c.to_json()))
