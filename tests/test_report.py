"""Markdown reports and commit messages (moectl/report.py)."""
from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path

from engine.schema import StepMetrics
from moectl.metrics import MetricsFile, RunMetrics, compare
from moectl.records import GitInfo, GuardResult, RunRecord, Summary
from moectl.report import (
    commit_message, compare_commit_message, compare_markdown, report_path, run_report, write_report,
)


def record(tag="bufreuse", tps=806400.06, status="completed", **kw) -> RunRecord:
    return RunRecord(
        id=f"20260224_182427_moe-{tag}", tag=tag, status=status, created_at="2026-02-24T18:24:27+08:00",
        exp_dir=f"/tmp/exp/20260224_182427_moe-{tag}",
        options=kw.pop("options", {"preset": "d12-moe", "compile": "static", "cap": 1.0}),
        summary=kw.pop("summary", Summary(window=50, steps=50, tok_per_sec=tps, dt_ms=650.67, mfu=9.7588,
                                          peak_mem_mib=18987.83, total_time_min=2.97, final_loss=3.723798)),
        **kw,
    )


def test_report_path_format_and_unique(tmp_path):
    now = datetime(2026, 2, 24, 18, 29, 5)
    p = report_path(tmp_path, "capacity opt/bufreuse", now)
    assert p == tmp_path / "20260224_1829_capacity_opt_bufreuse.md"
    p.write_text("x")
    p2 = report_path(tmp_path, "capacity opt/bufreuse", now)
    assert p2.name == "20260224_1829_capacity_opt_bufreuse-2.md" and not p2.exists()


def test_the_longest_tag_a_run_takes_still_gets_its_report_and_figures(tmp_path):
    # A run directory name may be 255 bytes (tag ~235); the report's name, its temp file and a sweep
    # figure's name add to it, so the report names a shortened tag (its text has the whole one).
    from moectl.atomic import write_text_atomic

    now = datetime(2026, 2, 24, 18, 29, 5)
    for tag in ("c" * 235, "é" * 117):  # 234 bytes of two-byte characters: cut on a character
        first = write_report(tmp_path / tag[:3], tag, f"- run: `{tag}`\n", now)
        second = write_report(tmp_path / tag[:3], tag, "two\n", now)
        assert first.name.startswith("20260224_1829_" + tag[:50]) and second.name == first.stem + "-2.md"
        assert len(second.name.encode()) <= 255 - len(".XXXXXXXX.tmp.")
        figure = first.parent / "figures" / f"{second.stem}_expert_load_max.png"
        figure.parent.mkdir(exist_ok=True)
        write_text_atomic(figure, "png")  # its temp name fits too
        assert figure.read_text() == "png"


def test_the_reports_command_is_the_one_to_paste_env_included(tmp_path):
    rec = record(argv=["python", "-m", "engine.train", "--tag", "a b"])
    rec.exp_dir = str(tmp_path)
    assert "```\npython -m engine.train --tag 'a b'\n```" in run_report(rec)  # no command.txt: argv, quoted
    (tmp_path / "command.txt").write_text("cd /repo && OMP_NUM_THREADS=1 python -m engine.train\n")
    assert "```\ncd /repo && OMP_NUM_THREADS=1 python -m engine.train\n```" in run_report(rec)


def test_a_slurm_runs_report_names_its_job_and_nodes():
    text = run_report(record(backend="slurm", job_id="4242", nodes=2, restarts=1))
    assert "- Slurm job 4242 on 2 node(s) · requeued 1 time(s)" in text
    assert "Slurm job" not in run_report(record())


def test_write_report_claims_a_fresh_name_and_leaves_no_temp_file(tmp_path):
    now = datetime(2026, 2, 24, 18, 29, 5)
    first = write_report(tmp_path / "reports", "grp", "one\n", now)  # the directory is created
    second = write_report(tmp_path / "reports", "grp", "two\n", now)
    assert first.name == "20260224_1829_grp.md" and second.name == "20260224_1829_grp-2.md"
    assert first.read_text() == "one\n" and second.read_text() == "two\n"
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == sorted([first.name, second.name])
    assert first.stat().st_mode & 0o777 == 0o644


def test_same_name_reports_written_at_once_by_many_processes_all_survive(tmp_path):
    # A repeat group's Slurm jobs end in the same minute with the same tag: a name picked by
    # "does it exist?" and then written was taken twice and one report was lost (CI simulation).
    code = ("import sys; from datetime import datetime; from pathlib import Path; from moectl.report import write_report\n"
            "sys.stdin.readline()\n"  # all start writing at the same moment
            "write_report(Path(sys.argv[1]), 'grp', sys.argv[2], datetime(2026, 1, 1, 12, 0))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), f"report {i}\n"], stdin=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parents[1]) for i in range(8)]
    for p in procs:
        p.stdin.write(b"go\n")
    for p in procs:
        p.stdin.close()
    assert [p.wait(timeout=60) for p in procs] == [0] * 8
    texts = sorted(f.read_text() for f in tmp_path.iterdir())
    assert texts == sorted(f"report {i}\n" for i in range(8))
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(
        ["20260101_1200_grp.md"] + [f"20260101_1200_grp-{n}.md" for n in range(2, 9)])


def test_commit_message_matches_the_spec_example():
    # SPEC §9: `report: static cap1.0 bufreuse — 806400 tok/s (+2.70% vs static_cap1p0)`;
    # both throughputs are the seed study's published figures.
    base = record(tag="static_cap1p0", tps=785203.42)
    assert commit_message(record(), base) == "report: static cap1.0 bufreuse — 806400 tok/s (+2.70% vs static_cap1p0)"
    assert commit_message(record()) == "report: static cap1.0 bufreuse — 806400 tok/s"


def test_commit_message_failed_run():
    rec = record(status="failed", exit_code=4, options={"compile": "none", "cap": 1.25, "fp8": True})
    assert commit_message(rec) == "report: none cap1.25 fp8 bufreuse — failed (trainer exit 4), 806400 tok/s so far"
    # interrupted: the signal, not torchrun's exit code after it (1: it read as a failure)
    stopped = record(status="interrupted", exit_code=1, error="interrupted by SIGINT\nstep 3 ...",
                     options={"compile": "none"})
    assert commit_message(stopped) == "report: none bufreuse — interrupted (SIGINT), 806400 tok/s so far"


def test_run_report_sections():
    rec = record(
        status="failed", exit_code=4, error="Traceback ...\nRuntimeError: CUDA out of memory",
        overrides=["gpus_idle"], argv=["python", "-m", "torch.distributed.run", "-m", "engine.train"],
        guards=[GuardResult(name="gpus_idle", ok=False, message="GPU 3 at 40% util", overridable=True, overridden=True)],
        git=GitInfo(branch="main", commit="0123456789abcdef", dirty=True),
    )
    md = run_report(rec, notes="Hypothesis: reusing padded buffers cuts allocator churn.")
    assert md.startswith("# static cap1.0 bufreuse — failed\n")
    assert "Hypothesis: reusing padded buffers" in md
    assert "| cap | `1.0` |" in md and "| preset | `d12-moe` |" in md
    assert "806400.06" in md and "650.67" in md and "9.7588" in md and "18987.83" in md
    assert "## Overrides (guards skipped knowingly)" in md and "`gpus_idle`: GPU 3 at 40% util" in md
    assert "## Error" in md and "CUDA out of memory" in md
    assert "file:///tmp/exp/20260224_182427_moe-bufreuse" in md
    assert "`main` @ `0123456789ab` (dirty" in md
    assert "python -m torch.distributed.run -m engine.train" in md


def test_run_report_with_baseline_comparison():
    def run(id_, values):
        return RunMetrics(id=id_, tag=id_, metrics=MetricsFile(
            steps=[StepMetrics(step=i, loss=1.0, tok_per_sec=v) for i, v in enumerate(values)]))

    c = compare([run("static_cap1p0", [100.0, 101.0, 99.0]), run("bufreuse", [110.0, 111.0, 109.0])], window=50)
    md = run_report(record(), comparison_vs_baseline=c)
    assert "## Against the baseline" in md and "(+10.00%*)" in md
    assert "## Error" not in md and "## Overrides" not in md


def test_compare_markdown_table_and_legend():
    def run(id_, values, preset):
        return RunMetrics(id=id_, tag=id_, options={"preset": preset}, metrics=MetricsFile(
            steps=[StepMetrics(step=i, loss=2.0, tok_per_sec=v, dt_ms=10.0) for i, v in enumerate(values)]))

    c = compare([run("a", [100.0, 100.0, 100.0, 100.0], "tiny"), run("b", [100.0, 102.0, 98.0, 101.0], "d12-moe")],
                window=50)
    md = compare_markdown(c)
    lines = md.splitlines()
    assert lines[0] == "| run | steps | tok/sec | dt (ms) | MFU % | peak mem (MiB) | total (min) | final loss | drop frac | max expert load |"
    assert lines[1].startswith("| --- | ---: |")
    assert lines[2].startswith("| a (baseline) | 4 | 100.00 ±0.00 | 10.00 ±0.00 | — |")
    # b: mean 100.25 (+0.25%), not beyond noise -> no star
    assert "| b | 4 | 100.25 ±" in lines[3] and "(+0.25%)" in lines[3]
    assert "standard error" in md and "beyond noise" in md and "presets differ" in md
    assert compare_commit_message(c) == "report: compare b vs a — 100 tok/s (+0.25%)"


# --- warm-up: marked figures and what rests on them ---------------------------------------------


def _steps(values, dt=10.0):
    return MetricsFile(steps=[StepMetrics(step=i, loss=2.0, tok_per_sec=v, dt_ms=dt) for i, v in enumerate(values)])


def test_compare_markdown_marks_warmup_only_figures_and_awards_them_no_star():
    base = RunMetrics(id="a", tag="a", metrics=_steps([100.0, 101.0, 99.0] * 10))  # 30 steps: 20 clean
    short = RunMetrics(id="b", tag="b", metrics=_steps([500.0, 501.0, 499.0]))  # 3 steps: warm-up only
    md = compare_markdown(compare([base, short], window=50, warmup_steps=10))
    row_b = next(ln for ln in md.splitlines() if ln.startswith("| b |"))
    # tok/sec: mean 500, a delta of ~+400% that would be far beyond noise, but no star on a marked figure
    assert "| 500.00† ±" in row_b and "*" not in row_b and "10.00† ±0.00" in row_b
    assert "| a (baseline) | 30 | 100.00 ±" in md and "†" not in md.splitlines()[2]
    assert "the last 50 steps of each run past its first 10 (warm-up" in md
    assert "† warm-up only: the run has no step past its first 10" in md
    assert "not comparable: b ran no step past the warm-up" in md


def test_run_report_says_what_the_window_left_out():
    warm = record(summary=Summary(window=50, steps=4, warmup_steps=10, clean=False, tok_per_sec=1234.5, dt_ms=3.25,
                                  final_loss=2.5, note="warm-up only: all 4 steps are among the first 10 (warmup_steps), "
                                                       "so the tail means include compile / warm-up"))
    md = run_report(warm)
    table_row = next(ln for ln in md.splitlines() if ln.startswith("| 50 | 4 |"))
    assert "| 1234.50† | 3.25† |" in table_row and "| 2.5000 |" in table_row  # final loss is not a tail mean
    assert "**Warm-up only: all 4 steps are among the first 10" in md
    assert "† warm-up only: the run has no step past its first 10" in md
    assert "no tail mean counts them" not in md  # (it said both: that no tail mean counts them, and that they do)

    clean = record(summary=Summary(window=50, steps=40, warmup_steps=10, tok_per_sec=1000.0))
    assert "Steps 0–9 are warm-up (compile, allocator; `[metrics] warmup_steps`): no tail mean counts them." in run_report(clean)
    # a failed run that measured nothing says that, not "only 0 steps past the warm-up: the tail covers all of them"
    md = run_report(record(summary=Summary(window=50, steps=0, warmup_steps=10, run_steps=0)))
    assert "No step was measured." in md and "only 0 steps" not in md and "no tail mean counts" not in md

    short = record(summary=Summary(window=50, steps=10, warmup_steps=10, tok_per_sec=1000.0,
                                   note="10 clean steps (< window 50) after 10 warm-up steps"))
    md = run_report(short)
    assert "†" not in md and "The run has only 10 steps past the warm-up: the tail covers all of them." in md


def test_commit_messages_flag_warmup_only_figures():
    warm_summary = Summary(window=50, steps=4, warmup_steps=10, clean=False, tok_per_sec=1234.0)
    base = record(tag="static_cap1p0", tps=785203.42)
    warm = record(summary=warm_summary)
    assert commit_message(warm) == "report: static cap1.0 bufreuse — 1234 tok/s [warm-up only]"
    assert commit_message(record(), record(tag="base", summary=warm_summary)).endswith(
        "(+65248.47% vs base) [baseline warm-up only]")  # (806400.06 - 1234) / 1234
    assert commit_message(record(), base) == "report: static cap1.0 bufreuse — 806400 tok/s (+2.70% vs static_cap1p0)"

    # compare: the fastest clean run is named, not the faster warm-up-only one
    a = RunMetrics(id="a", tag="a", metrics=_steps([100.0] * 30))
    fast_warm = RunMetrics(id="w", tag="w", metrics=_steps([900.0] * 3))
    b = RunMetrics(id="b", tag="b", metrics=_steps([120.0] * 30))
    c = compare([a, fast_warm, b], window=50, warmup_steps=10)
    assert compare_commit_message(c) == "report: compare w, b vs a — best b 120 tok/s (+20.00%)"
    only_warm = compare([a, fast_warm], window=50, warmup_steps=10)
    assert compare_commit_message(only_warm) == "report: compare w vs a — 900 tok/s (+800.00%) [warm-up only]"
    warm_base = compare([fast_warm, b], window=50, warmup_steps=10)
    assert compare_commit_message(warm_base) == "report: compare b vs w — 120 tok/s (-86.67%) [baseline warm-up only]"


def test_a_log_line_of_backticks_does_not_end_the_error_block():
    """A trainer's markdown-ish output (```) inside the failed run's error closed the report's
    code fence early, and the rest of the log rendered as markdown."""
    failed = record(status="failed", error="Traceback\n```\nprint('x')\n````\nValueError: bad")
    md = run_report(failed)
    block = md.split("## Error\n\n")[1]
    assert block.startswith("`````\nTraceback\n```\n") and block.rstrip().endswith("ValueError: bad\n`````")

