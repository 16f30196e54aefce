"""Run-to-run noise (issue 10): the within-run error corrected for autocorrelation, repeat groups
with a between-runs error, and the commands that take a group by its tag."""
from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from typer.testing import CliRunner

from moectl.cli import app
from moectl.importers import parse_csv
from moectl.metrics import MetricsFile, RunMetrics, compare, tail_noise, tail_stderr
from moectl.noise import autocorrelation_time, naive_stderr, within_run_stderr
from moectl.stdout_metrics import StdoutFormat, parse_text
from tests.conftest import SEED, needs_seed
from tests.test_foreign_run import nanogpt_project, steps_in
from tests.test_run import QUIET, record, run_dirs

FIXTURE = Path(__file__).parent / "fixtures" / "foreign_trainer.py"
NANOGPT = StdoutFormat.build("regex", step=r"iter (\d+):", tokens_per_step=r"tokens per iteration will be: ([\d,]+)",
                             patterns={"loss": r"loss ([\d.]+)", "dt_ms": r"time ([\d.]+)ms"})
runner = CliRunner()


def fixture_metrics(*args: str) -> MetricsFile:
    out = subprocess.run([sys.executable, str(FIXTURE), "--max_iters=60", "--sleep=0", *args], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    return MetricsFile(steps=parse_text(out, NANOGPT)[1])


def test_autocorrelation_time_by_hand():
    # [1, 2, 3, 4]: d = -1.5 -.5 .5 1.5, c0 = 1.25; rho1 = (.75 - .25 + .75) / 4 / 1.25 = .25,
    # rho2 = (-.75 - .75) / 5 = -.3, rho3 = -2.25 / 5 = -.45. Pairs: 1 + .25 > 0, then -.75 stops it.
    assert autocorrelation_time([1.0, 2.0, 3.0, 4.0]) == pytest.approx(-1 + 2 * 1.25)
    assert within_run_stderr([1.0, 2.0, 3.0, 4.0]) == pytest.approx(naive_stderr([1.0, 2.0, 3.0, 4.0]) * math.sqrt(1.5))


def test_negatively_correlated_or_short_series_keep_the_iid_floor():
    alternating = [1.0, 3.0] * 20
    assert autocorrelation_time(alternating) == 1.0
    assert within_run_stderr(alternating) == naive_stderr(alternating)
    assert autocorrelation_time([5.0, 1.0, 4.0]) == 1.0  # too short to estimate
    assert within_run_stderr([2.0] * 10) == 0.0


def test_strongly_autocorrelated_step_times_get_a_larger_error_than_the_naive_one():
    """The fixture trainer's AR(1) step times (phi = 0.9): the corrected error of the tail mean
    is several times the i.i.d. one, and compare shows the corrected one, saying so."""
    metrics = fixture_metrics("--ar=0.9", "--seed=0")
    naive = tail_stderr(metrics, window=50, warmup_steps=10)["dt_ms"]
    corrected = tail_noise(metrics, window=50, warmup_steps=10)["dt_ms"]
    assert corrected > 2.5 * naive
    row = compare([RunMetrics(id="ar", tag="ar", metrics=metrics)], window=50, warmup_steps=10).runs[0]
    assert row.metrics["dt_ms"].stderr == corrected and (row.noise, row.n_repeats) == ("within-run", 1)


def test_groups_compare_on_the_mean_of_tail_means_with_the_between_runs_error():
    def group(name, seeds, dt):
        members = [fixture_metrics(f"--seed={s}", f"--dt_ms={dt}") for s in seeds]
        return RunMetrics(id=name, tag=name, metrics=members[-1], members=members, member_ids=[f"{name}{s}" for s in seeds])

    a, b = group("a", [0, 1, 2], 10.0), group("b", [3, 4, 5], 10.1)
    c = compare([a, b], window=50, warmup_steps=10)
    for entry, row in zip((a, b), c.runs):
        tails = [statistics.fmean(s.dt_ms for s in m.steps[10:]) for m in entry.members]
        assert row.metrics["dt_ms"].value == pytest.approx(statistics.fmean(tails))
        assert row.metrics["dt_ms"].stderr == pytest.approx(statistics.stdev(tails) / math.sqrt(3))
        assert (row.n_repeats, row.noise, row.run_ids) == (3, "between-runs", entry.member_ids)
    data = c.to_json()["runs"][1]
    assert (data["n_repeats"], data["noise"]) == (3, "between-runs")
    # The verdict uses the between-runs errors, at Student's t for their 2 + 2 degrees of freedom.
    from moectl.noise import t_critical, welch_df

    va, vb = (r.metrics["dt_ms"] for r in c.runs)
    k = t_critical(welch_df(va.stderr, 2, vb.stderr, 2))
    assert k > 2.7  # between 2.78 (4 degrees of freedom) and 4.30 (2)
    assert vb.beyond_noise == (abs(vb.value - va.value) > k * math.hypot(va.stderr, vb.stderr))


def test_a_group_beside_one_of_its_own_runs_gets_no_noise_verdict():
    """The group's mean includes that run: the two are not independent samples, and a `*` between
    them would claim what the test cannot say."""
    members = [fixture_metrics(f"--seed={s}", "--dt_ms=10.0") for s in (0, 1, 2)]
    group = RunMetrics(id="g", tag="g", metrics=members[-1], members=members, member_ids=["g0", "g1", "g2"])
    own = RunMetrics(id="g1", tag="g1", metrics=members[1])
    other = RunMetrics(id="o", tag="o", metrics=fixture_metrics("--seed=9", "--dt_ms=50.0"))
    c = compare([group, own, other], window=50, warmup_steps=10)
    assert c.runs[1].metrics["dt_ms"].beyond_noise is None
    assert c.runs[2].metrics["dt_ms"].beyond_noise is True  # an independent run still gets its verdict
    assert "not independent: g1 and the baseline g share run(s) g1: no noise verdict" in c.notes


def test_student_t_critical_values_are_the_textbooks():
    from moectl.noise import t_critical, welch_df

    # two-sided 95%: the values every t table prints
    for df, t in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228), (30, 2.042), (1e12, 1.960)):
        assert t_critical(df) == pytest.approx(t, abs=5e-4), df
    assert t_critical(2) < t_critical(1.5) < t_critical(1)  # fractional (Welch) degrees of freedom lie between
    assert welch_df(1.0, 2, 1.0, 2) == pytest.approx(4.0) and welch_df(1.0, None, 1.0, None) is None
    assert welch_df(1.0, 1, 1e-9, None) == pytest.approx(1.0)  # the noisy side sets them


def test_beyond_noise_holds_five_percent_of_false_alarms_for_small_groups():
    """Two groups of N repeats of the SAME configuration should differ "beyond noise" about 5% of
    the time. With the old rule (2 standard errors) it was 19% at N = 2 and 12% at N = 3: a
    reader chasing a `*` from two repeats chased noise one time in five."""
    import random

    from moectl.metrics import beyond_noise
    from moectl.noise import between_runs_stderr

    rng = random.Random(0)
    for n in (2, 3, 5):
        alarms, trials = 0, 4000
        for _ in range(trials):
            a, b = [rng.gauss(100.0, 3.0) for _ in range(n)], [rng.gauss(100.0, 3.0) for _ in range(n)]
            alarms += beyond_noise(statistics.fmean(a), between_runs_stderr(a), statistics.fmean(b),
                                   between_runs_stderr(b), n - 1, n - 1)
        # Welch's test is a little conservative at the fewest repeats (2.3% at N = 2 here), never lenient.
        assert 0.015 < alarms / trials < 0.065, (n, alarms / trials)
    # The auditor's case: two groups of 2, |a - b| = 2.29 combined errors apart, one side far noisier.
    assert beyond_noise(100.0, 1.0, 100.0 + 2.29 * math.hypot(1.0, 0.05), 0.05, 1, 1) is False
    assert beyond_noise(100.0, 1.0, 100.0 + 2.29 * math.hypot(1.0, 0.05), 0.05) is True  # within-run windows: 2


def test_single_runs_with_few_clean_steps_get_students_t_for_their_windows_degrees_of_freedom():
    """A window's within-run error has its effective sample size - 1 degrees of freedom. With k = 2
    for every single run, two runs of one configuration with 2 clean steps each got a `*` 18% of
    the time (3 steps: 12%), and the audit's two identical 12-step tiny runs got -26.71%*."""
    from engine.schema import StepMetrics
    from moectl.metrics import beyond_noise
    from moectl.noise import within_run_df

    def run(name, tail):  # 10 warm-up steps, then the tail
        steps = [StepMetrics(step=s, loss=3.0, dt_ms=900.0 if s < 10 else tail[s - 10]) for s in range(10 + len(tail))]
        return RunMetrics(id=name, tag=name, metrics=MetricsFile(steps=steps))

    # By hand: se 0.5 each, 1 degree each -> Welch 2 degrees, k = 4.30; |502.5 - 500.5| = 2 < 4.30 * 0.707 = 3.04
    c = compare([run("a", [500.0, 501.0]), run("b", [502.0, 503.0])], window=50, warmup_steps=10)
    dt = c.runs[1].metrics["dt_ms"]
    assert (dt.value, dt.stderr, dt.delta_pct) == (502.5, 0.5, pytest.approx(0.3996, abs=1e-4))
    assert dt.beyond_noise is False and c.to_json()["runs"][1]["metrics"]["dt_ms"]["beyond_noise"] is False
    # ... and three times as far apart clears it
    assert compare([run("a", [500.0, 501.0]), run("b", [506.0, 507.0])], window=50,
                   warmup_steps=10).runs[1].metrics["dt_ms"].beyond_noise is True
    assert within_run_df([1.0]) is None and within_run_df([1.0, 2.0]) == 1.0 and within_run_df([5.0] * 8) == 7.0
    rng = random.Random(1)
    for n in (2, 3, 10):
        alarms, trials = 0, 3000
        for _ in range(trials):
            a, b = [rng.gauss(100.0, 3.0) for _ in range(n)], [rng.gauss(100.0, 3.0) for _ in range(n)]
            alarms += bool(beyond_noise(statistics.fmean(a), within_run_stderr(a), statistics.fmean(b),
                                        within_run_stderr(b), within_run_df(a), within_run_df(b)))
        assert 0.01 < alarms / trials < 0.065, (n, alarms / trials)  # k = 2: 17.7% at 2 steps, 11.5% at 3


def test_a_verdict_against_a_baseline_of_zero_is_shown_without_a_percentage():
    # cap 0's drop fraction is exactly 0: no % change from it, and the `*` the JSON held vanished
    # from the table and the markdown (delta_pct null beside beyond_noise true).
    from engine.schema import StepMetrics
    from moectl.cli.runs import _compare_table
    from moectl.report import compare_markdown

    def run(name, drops):
        return RunMetrics(id=name, tag=name, metrics=MetricsFile(steps=[
            StepMetrics(step=s, loss=3.0, dt_ms=100.0, drop_frac=drops[s % len(drops)]) for s in range(40)]))

    c = compare([run("dropless", [0.0]), run("capped", [0.12, 0.14, 0.13])], window=50, warmup_steps=10)
    mv = c.runs[1].metrics["drop_frac"]
    assert mv.delta_pct is None and mv.beyond_noise is True
    assert "| 0.1300 ±0.0015 (from 0*) |" in compare_markdown(c)
    table = _compare_table(c)
    from rich.console import Console

    console = Console(width=250, record=True, color_system=None)
    console.print(table)
    assert "from 0*" in console.export_text()


def test_compare_of_figures_past_the_largest_float_squared_is_a_result_not_an_internal_error():
    # (x - m) ** 2 raised OverflowError past ~1e154: `compare` of an imported log of 1e200 ms steps was exit 1
    from engine.schema import StepMetrics

    steps = [StepMetrics(step=s, loss=3.0, dt_ms=1e200 if s % 2 else 2e200, tok_per_sec=1.0) for s in range(30)]
    other = [StepMetrics(step=s, loss=3.0, dt_ms=100.0 + s % 3, tok_per_sec=1.0) for s in range(30)]
    c = compare([RunMetrics(id="a", tag="a", metrics=MetricsFile(steps=other)),
                 RunMetrics(id="h", tag="h", metrics=MetricsFile(steps=steps))], window=50, warmup_steps=10)
    dt = c.runs[1].metrics["dt_ms"]
    assert dt.value == pytest.approx(1.5e200) and dt.stderr == math.inf and dt.beyond_noise is False


def test_a_group_is_named_by_its_id_or_tag_and_means_its_completed_runs(tmp_path):
    # An interrupted last repeat does not stand for a group that has a measured one; the group id
    # that `run --repeat` prints is a RUN too.
    from moectl.records import RunRecord
    from moectl.repeats import resolve_grouped
    from moectl.store import create_run_dir, save_run

    group = "20260101_000000_moe-g-x3"
    for k, status in ((1, "completed"), (2, "interrupted")):
        d = create_run_dir(tmp_path / f"20260101_00000{k}_moe-g-r{k}")
        save_run(RunRecord(id=d.name, tag="g", status=status, created_at=f"2026-01-01T00:00:0{k}+00:00",
                           exp_dir=str(d), group=group, repeat=k))
    for ref in ("g", group):
        [[only]] = resolve_grouped(tmp_path, [ref])
        assert only.id.endswith("-r1") and only.status == "completed"
    [[one]] = resolve_grouped(tmp_path, ["20260101_000002_moe-g-r2"])  # a run id: that run, as it is
    assert one.status == "interrupted"


@needs_seed
def test_seed_bufreuse_still_plus_2p70_and_beyond_the_corrected_noise():
    runs = []
    for name in ("moe_fp8_experts_static_cap1p0", "moe_fp8_experts_static_cap1p0_bufreuse"):
        parsed = parse_csv((SEED / f"{name}.csv").read_text())
        runs.append(RunMetrics(id=name, tag=name, metrics=MetricsFile(steps=parsed.steps)))
    c = compare(runs, window=50, warmup_steps=10)
    base, buf = (r.metrics["tok_per_sec"] for r in c.runs)
    assert (round(base.value, 2), round(buf.value, 2), round(buf.delta_pct, 2)) == (785203.42, 806400.06, 2.70)
    assert buf.beyond_noise is True and c.runs[1].noise == "within-run"
    naive = tail_stderr(runs[1].metrics, 50, 10)["tok_per_sec"]
    assert buf.stderr > naive  # the seed's step times are autocorrelated: the i.i.d. error was a floor


# ----------------------------------------------------------------------- real repeats, real sweep


def repeat_group(tag: str, seed: int, dt: float) -> dict:
    r = runner.invoke(app, ["run", "--device", "cpu", "--steps", "14", "--tag", tag, "--seed", str(seed), "--repeat", "3",
                            "--json", *QUIET, "--", f"--dt_ms={dt}", "--sleep=0"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_run_repeat_makes_one_group_and_compare_show_plot_export_take_it_by_tag(git_repo, monkeypatch, artifact_root):
    nanogpt_project(git_repo, monkeypatch)
    base, other = repeat_group("base", 7, 10.0), repeat_group("fast", 0, 9.0)
    assert base["repeats"] == 3 and len(base["runs"]) == 3
    records = [record(Path(r["exp_dir"])) for r in base["runs"]]
    assert [r["options"]["seed"] for r in records] == [7, 8, 9]  # through [launch.options] seed
    assert all(f"--seed={s}" in r["argv"] for r, s in zip(records, (7, 8, 9)))
    assert {r["group"] for r in records} == {base["group"]} and [r["repeat"] for r in records] == [1, 2, 3]

    data = json.loads(runner.invoke(app, ["compare", "base", "fast", "--json"]).stdout)
    assert [(x["id"], x["n_repeats"], x["noise"]) for x in data["runs"]] == [
        (base["group"], 3, "between-runs"), (other["group"], 3, "between-runs")]
    tails = [r["summary"]["tok_per_sec"] for r in records]
    tps = data["runs"][0]["metrics"]["tok_per_sec"]
    assert tps["value"] == pytest.approx(statistics.fmean(tails))
    assert tps["stderr"] == pytest.approx(statistics.stdev(tails) / math.sqrt(3))
    assert data["runs"][0]["run_ids"] == [r["id"] for r in records]
    # `run --repeat` itself ends with the group's mean and between-runs error (the same figures).
    assert base["summary"]["tok_per_sec"]["value"] == pytest.approx(tps["value"])
    assert base["summary"]["tok_per_sec"]["stderr"] == pytest.approx(tps["stderr"])
    # A run id still means that one run.
    single = json.loads(runner.invoke(app, ["compare", records[0]["id"], "fast", "--json"]).stdout)["runs"][0]
    assert (single["id"], single["n_repeats"], single["noise"], single["run_ids"]) == (
        records[0]["id"], 1, "within-run", [records[0]["id"]])
    table = runner.invoke(app, ["compare", "base", "fast"]).stdout
    assert "between 3 runs" in table

    shown = runner.invoke(app, ["show", "base", "--json"])
    group = json.loads(shown.stdout)
    assert group["n_repeats"] == 3 and [r["id"] for r in group["runs"]] == [r["id"] for r in records]
    assert group["summary"]["tok_per_sec"]["stderr"] == pytest.approx(tps["stderr"])
    exported = json.loads(runner.invoke(app, ["export", "base", "--csv", str(git_repo.parent / "csv"), "--json"]).stdout)
    assert exported["runs"] == 3
    plotted = runner.invoke(app, ["plot", "base", "--metric", "dt_ms", "-o", str(git_repo.parent / "dt.png"), "--json"])
    assert plotted.exit_code == 0, plotted.output
    assert json.loads(plotted.stdout)["runs"] == [r["id"] for r in records]


def test_run_repeat_prints_the_groups_mean_and_between_runs_error(git_repo, monkeypatch, artifact_root, fake_nvml):
    nanogpt_project(git_repo, monkeypatch)
    r = runner.invoke(app, ["run", "--device", "cpu", "--steps", "14", "--tag", "txt", "--repeat", "2", *QUIET,
                            "--", "--dt_ms=10.0", "--sleep=0"])
    assert r.exit_code == 0, r.output
    [line] = [ln for ln in r.stdout.splitlines() if "mean of 2 tail means" in ln]
    assert line.startswith("group ") and "(± between-runs standard error): tok/sec " in line and " ±" in line
    # A group that did not complete has no mean (of some of its runs it would mislead), and says so
    # in --json with summary: null rather than leaving the key out.
    r = runner.invoke(app, ["run", "--device", "cpu", "--steps", "14", "--tag", "bad", "--repeat", "2", "--json", *QUIET,
                            "--", "--exit_code=4", "--sleep=0"])
    assert r.exit_code == 4, r.output
    data = json.loads(r.stdout)
    assert data["summary"] is None and [x["status"] for x in data["runs"]] == ["failed"]
    assert data["exit_code"] == 4  # the command's, in its document as in every other --json one
    r = runner.invoke(app, ["run", "--device", "cpu", "--steps", "14", "--tag", "bad2", "--repeat", "3", *QUIET,
                            "--", "--exit_code=4", "--sleep=0"])
    assert r.exit_code == 4 and "stopped at repeat 1 of 3 (failed); repeats 2-3 were not run" in r.stderr, r.output
    # Refused before its first repeat wrote anything (a busy GPU): the guards said no, not `None`.
    from tests.conftest import gpu

    fake_nvml(gpus=[gpu(0, util_pct=90)])
    r = runner.invoke(app, ["run", "--device", "cuda", "--steps", "14", "--tag", "busy", "--repeat", "3", *QUIET,
                            "--", "--exit_code=4", "--sleep=0"])
    assert r.exit_code == 3 and "stopped at repeat 1 of 3 (refused by its guards, nothing written)" in r.stderr, r.output
    assert "None" not in r.stderr
    # Trackers can group the repeats: each carries its group and place in it.
    from moectl.store import list_runs
    from moectl.tracking import payload

    one = next(x for x in list_runs(artifact_root) if x.tag == "txt")
    tags = payload(one, None).tags
    assert (tags["moectl_group"], tags["moectl_repeat"]) == (one.group, str(one.repeat))


def test_a_repeat_group_stopped_between_repeats_still_reports_the_repeats_that_ran(git_repo, monkeypatch, artifact_root):
    # Ctrl-C before repeat 2 had started training: the command printed only {"ok": false, "error":
    # "interrupted"}, losing repeat 1's completed record and the group's line.
    import moectl.runner as runner_mod

    nanogpt_project(git_repo, monkeypatch)
    real, calls = runner_mod.write_run_files, []

    def stop_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_mod, "write_run_files", stop_the_second)
    r = runner.invoke(app, ["run", "--device", "cpu", "--steps", "14", "--tag", "cut", "--repeat", "3", "--json",
                            *QUIET, "--", "--dt_ms=10.0", "--sleep=0"])
    assert r.exit_code == 130, r.output
    data = json.loads(r.stdout)
    assert data["summary"] is None and [x["status"] for x in data["runs"]] == ["completed"]
    assert "group " in r.stderr and "interrupted at repeat 2 of 3; repeat 3 was not run" in r.stderr, r.stderr


def test_repeat_of_a_trainer_without_a_seed_mapping_is_refused_before_anything_runs(git_repo, monkeypatch, artifact_root):
    nanogpt_project(git_repo, monkeypatch)
    cfg = git_repo / ".moectl.toml"
    cfg.write_text(cfg.read_text().replace('seed = "--seed={}"\n', ""))
    r = runner.invoke(app, ["run", "--device", "cpu", "--steps", "5", "--repeat", "2", "--no-commit", *QUIET])
    assert r.exit_code == 2 and "--seed" in r.output and "[launch.options]" in r.output
    assert run_dirs(artifact_root) == []


def test_sweep_with_repeats_per_leg_and_in_common(git_repo, monkeypatch, artifact_root):
    nanogpt_project(git_repo, monkeypatch)
    spec = git_repo.parent / "noise.toml"
    spec.write_text('name = "noise"\n[common]\nsteps = 12\ndevice = "cpu"\nrepeats = 2\nargs = ["--sleep=0"]\n'
                    '[[legs]]\ntag = "a"\n[[legs]]\ntag = "b"\nrepeats = 3\nseed = 10\nargs = ["--sleep=0", "--dt_ms=8"]\n')
    r = runner.invoke(app, ["sweep", str(spec), "--json", "--no-commit", *QUIET])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    legs = out["sweep"]["legs"]
    assert [(leg["tag"], leg["repeat"], leg["options"]["seed"]) for leg in legs] == [
        ("a", 1, 0), ("a", 2, 1), ("b", 1, 10), ("b", 2, 11), ("b", 3, 12)]
    assert len({leg["group"] for leg in legs if leg["tag"] == "a"}) == 1 and legs[0]["group"] != legs[2]["group"]
    assert all(leg["state"] == "completed" for leg in legs)
    for leg in legs:  # the seed reached the trainer, and each repeat has its own fresh directory
        rec = record(Path(out["sweep"]["exp_dir"]) / leg["run_id"])
        assert f"--seed={leg['options']['seed']}" in rec["argv"] and rec["group"] == leg["group"]
        assert len(steps_in(Path(rec["exp_dir"]))) == 12
    rows = out["comparison"]["runs"]
    assert [(x["tag"], x["n_repeats"], x["noise"]) for x in rows] == [("a", 2, "between-runs"), ("b", 3, "between-runs")]


def test_repeat_with_one_explicit_directory_is_a_usage_error(git_repo, monkeypatch, artifact_root):
    nanogpt_project(git_repo, monkeypatch)
    r = runner.invoke(app, ["run", "--device", "cpu", "--repeat", "2", "--exp-dir", str(artifact_root / "x"), *QUIET])
    assert r.exit_code == 2 and "--exp-dir names one directory" in r.output
    assert run_dirs(artifact_root) == []


def test_sweep_repeats_start_at_the_configs_default_seed_as_run_repeat_does(git_repo, monkeypatch, artifact_root):
    from moectl.config import load_config
    from moectl.plan import RunRequest
    from moectl.repeats import repeat_requests
    from tests.conftest import git

    nanogpt_project(git_repo, monkeypatch)
    cfg_path = git_repo / ".moectl.toml"
    cfg_path.write_text(cfg_path.read_text() + "\n[defaults]\nseed = 42\n")
    git(git_repo, "commit", "-qam", "default seed")
    spec = git_repo.parent / "seeded.toml"
    spec.write_text('name = "seeded"\n[common]\nsteps = 5\ndevice = "cpu"\nrepeats = 2\n'
                    '[[legs]]\ntag = "a"\n[[legs]]\ntag = "b"\nseed = 7\n')
    r = runner.invoke(app, ["sweep", str(spec), "--dry-run", "--json", "--no-commit", *QUIET])
    assert r.exit_code == 0, r.output
    legs = json.loads(r.stdout)["legs"]
    assert [(leg["tag"], leg["options"]["seed"]) for leg in legs] == [("a", 42), ("a", 43), ("b", 7), ("b", 8)]
    assert [f"--seed={s}" in leg["command"] for leg, s in zip(legs, (42, 43, 7, 8))] == [True] * 4
    _, requests = repeat_requests(load_config(), RunRequest(tag="a"), 2)  # `moectl run --repeat 2`
    assert [q.seed for q in requests] == [42, 43]


# ---------------------------------------------------------- crafted groups: gone metrics, missing repeats


def crafted(root_tmp: Path, tag: str, tps: float, *, group: str, repeat: int, status: str = "completed",
            second: int = 0, mfu: Optional[float] = 1.0) -> Path:
    """A run imported through `moectl import` (40 engine-format steps at ~`tps` tok/s), then made
    repeat `repeat` of `group` with `status`; created at second `second` (the newest is the highest)."""
    from moectl.store import load_run, save_run

    log = root_tmp / f"{tag}-{repeat}-{second}.jsonl"
    log.write_text("".join(json.dumps({"type": "step", "step": i, "loss": 5.0 - i / 100, "dt_ms": 100.0 + i % 3,
                                       "tok_per_sec": tps + i % 3, "mfu": mfu, "peak_mem_mib": 100.0,
                                       "elapsed_s": i / 10}) + "\n" for i in range(40)))
    r = runner.invoke(app, ["import", str(log), "--format", "jsonl", "--name", tag, "--json"])
    assert r.exit_code == 0, r.output
    exp = Path(json.loads(r.stdout)["exp_dir"])
    rec = load_run(exp)
    rec.group, rec.repeat, rec.status = group, repeat, status
    rec.created_at = f"2026-01-01T00:00:{second:02d}+00:00"
    save_run(rec)
    return exp


def test_a_repeat_whose_metrics_file_is_gone_counts_by_its_recorded_summary(project, tmp_path):
    group = "20260101_000000_moe-r-x2"
    gone = crafted(tmp_path, "r", 1300.0, group=group, repeat=1, second=1)
    crafted(tmp_path, "r", 1500.0, group=group, repeat=2, second=2)
    crafted(tmp_path, "other", 1000.0, group="20260101_000000_moe-other-x2", repeat=1, second=3)
    crafted(tmp_path, "other", 1010.0, group="20260101_000000_moe-other-x2", repeat=2, second=4)
    before = json.loads(runner.invoke(app, ["compare", "other", "r", "--json"]).stdout)["runs"][1]
    (gone / "metrics.jsonl").unlink()
    r = runner.invoke(app, ["compare", "other", "r", "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)["runs"][1]
    tps = row["metrics"]["tok_per_sec"]
    # The same figures as with the file: the recorded summary is that file's tail mean.
    assert (row["n_repeats"], row["clean"]) == (2, True)
    assert tps["value"] == pytest.approx(before["metrics"]["tok_per_sec"]["value"])
    assert tps["stderr"] == pytest.approx(before["metrics"]["tok_per_sec"]["stderr"]) and tps["stderr"] > 50
    assert "no steps" not in (row["note"] or "") and "gone" in row["note"]
    shown = json.loads(runner.invoke(app, ["show", "r", "--json"]).stdout)
    assert shown["summary"]["tok_per_sec"]["value"] == pytest.approx(tps["value"])
    text = runner.invoke(app, ["show", "r"]).stdout
    assert f"tok/sec {tps['value']:,.2f} ±{tps['stderr']:,.2f}" in text and "—%" not in text


def test_compare_and_show_say_which_repeats_of_a_group_are_left_out(project, tmp_path):
    # kil3: repeat 1 completed, repeat 2 failed, repeat 3 never ran. kil2x3: repeats 1 and 3
    # completed, repeat 2 interrupted.
    g1, g2 = "20260101_000000_moe-kil3-x3", "20260101_000000_moe-kil2x3-x3"
    crafted(tmp_path, "kil3", 1300.0, group=g1, repeat=1, second=1)
    crafted(tmp_path, "kil3", 1310.0, group=g1, repeat=2, status="failed", second=2)
    crafted(tmp_path, "kil2x3", 1400.0, group=g2, repeat=1, second=3, mfu=None)
    crafted(tmp_path, "kil2x3", 1410.0, group=g2, repeat=2, status="interrupted", second=4, mfu=None)
    crafted(tmp_path, "kil2x3", 1420.0, group=g2, repeat=3, second=5, mfu=None)
    r = runner.invoke(app, ["compare", "kil3", "kil2x3", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    one, two = data["runs"]
    assert (one["n_repeats"], one["left_out"]) == (1, ["repeat 2 failed", "repeat 3 never ran"])
    assert (two["n_repeats"], two["left_out"]) == (2, ["repeat 2 interrupted"])
    notes = [n for n in data["notes"] if n.startswith("incomplete group")]
    assert len(notes) == 2 and "left out: repeat 2 failed, repeat 3 never ran" in notes[0], notes
    assert "left out: repeat 2 interrupted" in notes[1]
    table = runner.invoke(app, ["compare", "kil3", "kil2x3"]).stdout
    assert "left out: repeat 2 failed, repeat 3 never ran" in " ".join(table.split())
    # A complete group has no such note; a run id means that run, with no group note either.
    complete = json.loads(runner.invoke(app, ["compare", one["id"], "kil2x3", "--json"]).stdout)
    assert complete["runs"][0]["left_out"] == [] and len([n for n in complete["notes"] if "incomplete" in n]) == 1
    # show: the one completed repeat stands for the group; not "the newest" (the failed one is newer).
    text = " ".join(runner.invoke(app, ["show", "kil3"]).stdout.split())
    assert "the newest of" not in text
    assert f"the only completed repeat of group {g1}, 3 planned; left out: repeat 2 failed, repeat 3 never ran" in text
    shown = json.loads(runner.invoke(app, ["show", "kil2x3", "--json"]).stdout)
    assert shown["left_out"] == ["repeat 2 interrupted"]
    text = runner.invoke(app, ["show", "kil2x3"]).stdout
    assert "left out (not in the mean): repeat 2 interrupted" in text
    assert "MFU —%" not in text and "MFU —" in text  # no MFU recorded: no unit on a dash


def test_group_mean_line_writes_the_error_as_its_figure_is_written():
    from moectl.cli.runs import group_mean_line
    from moectl.records import Summary

    line = group_mean_line(Summary(window=50, steps=50, tok_per_sec=28221.6), {"tok_per_sec": 6315.98}, 3)
    assert "tok/sec 28,221.60 ±6,315.98" in line


def test_run_baseline_takes_a_group_by_its_tag_or_id_as_compare_does(git_repo, monkeypatch, artifact_root):
    from tests.conftest import git

    nanogpt_project(git_repo, monkeypatch)
    base = repeat_group("r", 0, 10.0)
    group = base["group"]
    # --dry-run and check accept the group id as a baseline (compare does).
    for cmd in (["run", "--dry-run"], ["check"]):
        r = runner.invoke(app, [*cmd, "--device", "cpu", "--steps", "14", "--baseline", group, *QUIET])
        assert r.exit_code == 0 and "no run matches" not in r.output, r.output
    r = runner.invoke(app, ["run", "--device", "cpu", "--steps", "14", "--tag", "nb", "--baseline", "r", "--json",
                            *QUIET, "--", "--dt_ms=9.0", "--sleep=0"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    cmp = json.loads(runner.invoke(app, ["compare", "nb", "--baseline", "r", "--json"]).stdout)
    base_row, nb_row = cmp["runs"]
    assert (base_row["id"], base_row["n_repeats"]) == (group, 3)
    delta = nb_row["metrics"]["tok_per_sec"]["delta_pct"]
    # The commit subject and the report's table: the group's mean, as compare has it.
    subject = git(git_repo, "log", "-1", "--format=%s").strip()
    assert subject.endswith(f"({delta:+.2f}% vs r)"), (subject, delta)
    report = Path(data["report"]).read_text()
    assert "(×3 runs)" in report and f"{delta:+.2f}%" in report
    latest = json.loads(runner.invoke(app, ["compare", "nb", "--baseline", base["runs"][-1]["id"], "--json"]).stdout)
    assert latest["runs"][1]["metrics"]["tok_per_sec"]["delta_pct"] != pytest.approx(delta)  # not the last repeat alone


def test_compare_of_one_group_named_twice_is_a_usage_error(project, tmp_path):
    group = "20260101_000000_moe-r-x2"
    crafted(tmp_path, "r", 1300.0, group=group, repeat=1, second=1)
    crafted(tmp_path, "r", 1500.0, group=group, repeat=2, second=2)
    for args in (["r", group], ["r", "--baseline", "r"]):
        r = runner.invoke(app, ["compare", *args])
        assert r.exit_code == 2 and "two distinct runs" in r.stderr and f"mean {group}" in r.stderr, r.output
        assert r.stdout == "" and "Traceback" not in r.output
