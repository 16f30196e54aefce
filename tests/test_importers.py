"""Log importers (moectl/importers.py) on our own fixtures, plus the seed study rewritten as a
nanochat log in a temp dir (never copied into the repository)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from moectl.errors import EXIT_USAGE, UsageError
from moectl.importers import load_log, parse_csv, parse_nanochat
from moectl.metrics import MetricsFile, tail_summary
from tests.conftest import SEED, needs_seed

FIXTURES = Path(__file__).parent / "fixtures"


def test_nanochat_fixture():
    p = load_log(FIXTURES / "nanochat_small.log", "nanochat")
    assert p.format == "nanochat"
    assert [s.step for s in p.steps] == list(range(8))
    assert p.skipped == 1  # "loss: garbage"
    assert p.planned_steps == 8
    assert p.peak_mem_mib == 1234.5  # "1,234.50MiB"
    assert p.total_time_s == pytest.approx(30.0)  # "0.50m"
    s0, s2, s5 = p.steps[0], p.steps[2], p.steps[5]
    assert (s0.loss, s0.aux_loss, s0.dt_ms, s0.tok_per_sec, s0.mfu) == (10.5, 24.0, 9000.0, 1000.0, 0.10)
    # fields reordered, an unknown field, no bal: still read
    assert (s2.loss, s2.tok_per_sec, s2.dt_ms, s2.aux_loss) == (8.0, 11000.0, 650.0, None)
    # step 5 logged twice (resume): the second line wins
    assert (s5.loss, s5.tok_per_sec) == (6.0, 13000.0)
    assert p.steps[7].elapsed_s == pytest.approx(30.0)


def test_nanochat_fixture_tail_means_by_hand():
    p = load_log(FIXTURES / "nanochat_small.log", "nanochat")
    s = tail_summary(MetricsFile(steps=p.steps), window=4)
    # steps 4..7: tok/sec 12000,13000,14000,15000; dt 600,620,640,660; mfu 1.2..1.5
    assert s.tok_per_sec == pytest.approx(13500.0)
    assert s.dt_ms == pytest.approx(630.0)
    assert s.mfu == pytest.approx(1.35)
    assert s.final_loss == 5.5


def test_nanochat_rank_prefix_and_missing_fields():
    text = (
        "[rank0]: step 00010/00020 (50.00%) | loss: 2.5 | tok/sec: 1,234,567\n"
        "step 11 | dt: 1.5s | loss: 2.4\n"
        "step 00012/00020 (60.00%) | dt: 10ms\n"  # no loss: malformed
        "stepping stone\n"
    )
    p = parse_nanochat(text)
    assert [s.step for s in p.steps] == [10, 11]
    assert p.steps[0].tok_per_sec == 1234567.0
    assert p.steps[1].dt_ms == pytest.approx(1500.0)
    assert p.skipped == 1


def test_the_engines_own_cpu_log_imports_as_nanochat():
    # The engine prints nanochat's line format, with `mfu: -` where no peak is known (CPU).
    line = ("step 00011/00020 (60.00%) | loss: 4.123456 | aux: 1.0000 | lr: 1.00e-03 | dt: 31.20ms | "
            "tok/sec: 32,821 | mfu: - | drop: 0.011 | load_max: 0.31 | total time: 0.01m\n")
    [step] = parse_nanochat(line).steps
    assert (step.step, step.loss, step.mfu, step.tok_per_sec) == (11, 4.123456, None, 32821.0)
    assert parse_nanochat(line.replace("loss: 4.123456", "loss: -")).skipped == 1  # a loss is never optional


def test_jsonl_fixture():
    p = load_log(FIXTURES / "metrics_small.jsonl", "jsonl")
    assert len(p.steps) == 6 and p.skipped == 3
    assert p.world_size == 2 and p.planned_steps == 6
    assert p.peak_mem_mib == 160.0 and p.total_time_s == 90.0


def test_csv_seed_style_columns():
    p = load_log(FIXTURES / "steps_seed_style.csv", "csv")
    assert [s.step for s in p.steps] == [0, 1, 2, 3, 4] and p.skipped == 1  # "oops" loss
    assert (p.steps[3].tok_per_sec, p.steps[3].mfu, p.steps[3].aux_loss) == (820000.0, 9.9, 29.2)
    s = tail_summary(MetricsFile(steps=p.steps), window=3)
    # steps 2,3,4: (800000+820000+790000)/3, (650+640+660)/3, (9.0+9.9+9.6)/3
    assert s.tok_per_sec == pytest.approx(2410000 / 3)
    assert s.dt_ms == pytest.approx(650.0)
    assert s.mfu == pytest.approx(9.5)


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    # Excel's "CSV UTF-8" starts the file with a BOM; the header's first name is still `step`.
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (FIXTURES / "steps_seed_style.csv").read_bytes())
    assert [s.step for s in load_log(path, "csv").steps] == [s.step for s in load_log(FIXTURES / "steps_seed_style.csv", "csv").steps]


def test_csv_engine_style_needs_run_choice_when_several():
    with pytest.raises(UsageError, match="alpha, beta"):
        load_log(FIXTURES / "steps_engine_style.csv", "csv")
    a = load_log(FIXTURES / "steps_engine_style.csv", "csv", run="alpha")
    assert [s.step for s in a.steps] == [0, 1, 2]
    assert a.steps[1].peak_mem_mib == 210.0 and a.steps[1].mfu is None and a.steps[2].elapsed_s == 0.52
    with pytest.raises(UsageError, match="no run 'gamma'"):
        load_log(FIXTURES / "steps_engine_style.csv", "csv", run="gamma")


def test_a_csv_row_whose_loss_is_nan_is_a_diverged_step_not_a_bad_row():
    """`moectl export` writes a diverged step's loss as `nan`: importing that table keeps the step."""
    parsed = parse_csv("run,step,loss,dt_ms\nr,0,2.5,10.0\nr,1,nan,11.0\nr,2,-inf,12.0\nr,3,2.5,nan\n")
    assert [s.step for s in parsed.steps] == [0, 1, 2, 3] and parsed.skipped == 0
    assert (parsed.steps[3].loss, parsed.steps[3].dt_ms) == (2.5, None)  # a NaN dt is no figure; the step stays
    assert parsed.steps[1].loss != parsed.steps[1].loss and parsed.steps[1].dt_ms == 11.0
    assert parsed.steps[2].loss == float("-inf")


def test_a_csv_header_with_spaces_after_its_commas_is_read():
    parsed = parse_csv("run, step, loss, dt_ms\na, 0, 1.0, 10\na, 1, 0.9, 11\n")
    assert [(s.step, s.loss, s.dt_ms) for s in parsed.steps] == [(0, 1.0, 10.0), (1, 0.9, 11.0)] and parsed.skipped == 0


@pytest.mark.parametrize("fmt", ["nanochat", "regex"])
def test_a_log_without_its_last_newline_says_its_last_step_was_not_read(tmp_path, fmt):
    # As live: a line without its newline may have been cut mid-write (a killed trainer), so it is no
    # step - but the import says so and how to keep it, instead of dropping it without a word.
    from moectl.importers import regex_format

    if fmt == "nanochat":
        lines = [f"step {i:05d}/00005 (0.00%) | loss: {2.0 - i / 10:.6f} | dt: 10.00ms | tok/sec: 1,000" for i in range(5)]
        stdout_format = None
    else:
        lines = [f"iter {i}: loss {2.0 - i / 10:.4f}" for i in range(5)]
        stdout_format = regex_format(None, ["step=iter (\\d+):", "loss=loss ([\\d.]+)"])
    log = tmp_path / "train.log"
    log.write_text("\n".join(lines))  # no newline after the last line
    p = load_log(log, fmt, stdout_format=stdout_format)
    assert [s.step for s in p.steps] == [0, 1, 2, 3]
    assert any(w.startswith("the log's last line has no newline, so its step 4 was not read") for w in p.warnings)
    log.write_text("\n".join(lines) + "\n")  # what the warning says to do
    p = load_log(log, fmt, stdout_format=stdout_format)
    assert [s.step for s in p.steps] == [0, 1, 2, 3, 4] and not any("newline" in w for w in p.warnings)


def test_a_csv_cut_mid_row_drops_that_row_with_a_warning_but_a_whole_last_row_is_read():
    # A copy taken while the trainer wrote it: `...,637.19,822814,9.96` cut to `...,637.19,82281`
    # would import a tok/sec ten times too small without a word.
    text = "run,step,loss,dt_ms,tok_sec,bf16_mfu\na,0,2.0,650.0,800000,9.9\na,1,1.9,637.19,822814,9.96\n"
    cut = parse_csv(text[:-9])
    assert [s.step for s in cut.steps] == [0] and cut.skipped == 0
    assert cut.warnings == ["the csv's last line has no newline and only 5 of 6 columns, so its step 1 was not read "
                            "(cut mid-write); if it is whole, complete the row and import again"]
    whole = parse_csv(text[:-1])  # an exporter that ends without a newline: every cell there, read as is
    assert [(s.step, s.tok_per_sec) for s in whole.steps] == [(0, 800000.0), (1, 822814.0)] and whole.warnings == []


def test_a_csv_cell_that_is_nan_outside_the_loss_is_a_missing_figure_not_a_lost_step():
    parsed = parse_csv("step,loss,tok_sec,bf16_mfu\n0,2.0,nan,1.0\n1,1.9,800,-\n")
    assert [(s.step, s.loss, s.tok_per_sec, s.mfu) for s in parsed.steps] == [(0, 2.0, None, 1.0), (1, 1.9, 800.0, None)]
    assert parsed.skipped == 0


def test_csv_without_a_loss_column_names_it():
    with pytest.raises(UsageError, match=r"csv has no 'loss' column \(header: step,dt_ms\)"):
        parse_csv("step,dt_ms\n0,1.0\n1,2.0\n")


def test_csv_without_step_column():
    with pytest.raises(UsageError, match="no 'step' column"):
        parse_csv("a,b\n1,2\n")


@pytest.mark.parametrize(
    "content, fmt, match",
    [
        (None, "nanochat", "not found"),
        ("", "nanochat", "empty"),
        ("   \n\n", "jsonl", "empty"),
        ("hello\nworld\n", "nanochat", "no step lines"),
        ("step 1 | dt: 3ms\n", "nanochat", r"no step lines .*1 malformed"),
        ('{"type":"start","steps":1,"world_size":1,"tokens_per_step":1,"device":"cpu"}\n', "jsonl", "no step lines"),
        ("step,loss\n", "csv", "no step lines"),
        ("x", "yaml", "unknown format"),
    ],
)
def test_bad_files_are_usage_errors(tmp_path, content, fmt, match):
    path = tmp_path / "log.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=match) as info:
        load_log(path, fmt)
    assert info.value.exit_code == EXIT_USAGE


@needs_seed
def test_seed_as_nanochat_log_gives_the_published_tail50(tmp_path):
    """Rewrite the seed's bufreuse CSV as nanochat stdout (with separators) in a temp dir."""
    rows = list(csv.DictReader((SEED / "moe_fp8_experts_static_cap1p0_bufreuse.csv").open()))
    n = len(rows)
    lines = ["noise before the run"]
    for r in rows:
        step = int(r["step"])
        lines.append(
            f"step {step:05d}/{n:05d} ({100 * step / n:.2f}%) | loss: {r['loss']} | bal: {r['bal']} | lrm: 1.00 | "
            f"dt: {r['dt_ms']}ms | tok/sec: {int(r['tok_sec']):,} | bf16_mfu: {r['bf16_mfu']} | epoch: 1 | "
            f"total time: 1.00m | eta: 0.0m"
        )
    lines += ["Peak memory usage: 18987.83MiB", "Total training time: 2.97m"]
    log = tmp_path / "base_train.log"
    log.write_text("\n".join(lines) + "\n")
    p = load_log(log, "nanochat")
    assert len(p.steps) == 280 and p.skipped == 0
    s = tail_summary(MetricsFile(steps=p.steps), window=50)
    # seed/progress_summary.md: 806400.06 tok/s, 650.67 ms, 9.7588 MFU, 18987.83 MiB
    assert (round(s.tok_per_sec, 2), round(s.dt_ms, 2), round(s.mfu, 4)) == (806400.06, 650.67, 9.7588)
    assert p.peak_mem_mib == 18987.83
    assert round(p.total_time_s / 60, 2) == 2.97


def test_a_csv_step_number_below_0_is_a_bad_row():
    # The engine numbers steps from 0; step -3 was imported (and then counted as a warm-up step).
    parsed = parse_csv("step,loss\n-3,4.0\n0,3.0\n1,2.5\n100000000000000000000000,2.0\n")
    assert [s.step for s in parsed.steps] == [0, 1] and parsed.skipped == 2


def test_a_csv_cell_past_the_field_limit_is_a_usage_error_not_an_internal_one():
    text = "step,loss\n1," + "9" * 200_000 + "\n2,3\n"
    with pytest.raises(UsageError, match="csv cannot be read: field larger than field limit"):
        parse_csv(text)


def test_a_line_nested_too_deeply_is_a_malformed_line_skipped(tmp_path):
    from engine.schema import parse_line

    from moectl.metrics import parse_metrics_text

    deep = "[" * 100_000
    good = '{"type":"step","step":0,"loss":2.5}'
    m = parse_metrics_text(good + "\n" + deep + "\n")
    assert m.skipped == 1 and [s.step for s in m.steps] == [0]
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_line(deep)


def test_the_engines_own_train_log_imports_as_its_metrics_jsonl(tmp_path):
    """engine.train prints nanochat's step line with fields of its own (`aux`, `load_max`) and its
    evaluations as `step N | validation loss: x`: read back, the log gives the engine's own figures,
    and an evaluation is neither a step nor a step line that could not be read."""
    import subprocess
    import sys

    from moectl.metrics import read_metrics

    out = subprocess.run([sys.executable, "-m", "engine.train", "--preset", "tiny", "--device", "cpu", "--steps", "4",
                          "--eval-every", "2", "--eval-batches", "1", "--out-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert "validation loss:" in out.stdout and "| load_max: " in out.stdout
    log = tmp_path / "train.log"
    log.write_text(out.stdout)
    parsed = load_log(log, "nanochat")
    native = read_metrics(tmp_path / "run" / "metrics.jsonl").steps
    assert parsed.skipped == 0
    assert [s.step for s in parsed.steps] == [s.step for s in native] == [0, 1, 2, 3]
    for got, want in zip(parsed.steps, native):
        assert got.loss == pytest.approx(want.loss, abs=1e-6)
        assert got.aux_loss == pytest.approx(want.aux_loss, abs=1e-4)
        assert got.drop_frac == pytest.approx(want.drop_frac, abs=1e-3)
        assert got.expert_load_max == pytest.approx(want.expert_load_max, abs=1e-2)


def test_a_bracketed_number_in_front_of_a_line_is_the_trainers_text_not_a_rank(tmp_path):
    from moectl.stdout_metrics import StdoutFormat, parse_text

    fmt = StdoutFormat.build("regex", step=r"^\[(\d+)\]", patterns={"loss": r"loss=([\d.]+)"})
    text = "".join(f"[{i}] loss={2 - i / 10} dt=5ms\n" for i in range(4))
    assert [s.step for s in parse_text(text, fmt)[1]] == [0, 1, 2, 3]
    epochs = StdoutFormat.build("regex", step=r"iter (\d+)", patterns={"loss": r"loss=([\d.]+)"})
    text = "".join(f"[{i % 3}] iter {i} loss=1.5\n" for i in range(5))
    parser, steps = parse_text(text, epochs)
    assert [s.step for s in steps] == [0, 1, 2, 3, 4] and not parser.warnings()
    # torchrun's own prefixes still name a rank: rank 1's line is not a step, rank 0's is
    assert [s.step for s in parse_text("[rank1]: iter 7 loss=1.0\n[default0]:iter 8 loss=1.0\n", epochs)[1]] == [8]


def test_a_csv_without_elapsed_times_its_run_by_its_step_times_as_a_log_would():
    # The seed study's tables have dt_ms and no elapsed_s: `compare` showed their total time as "—"
    # while the same run's nanochat log imported with the sum of its step times.
    p = load_log(FIXTURES / "steps_seed_style.csv", "csv")
    assert [s.elapsed_s for s in p.steps] == pytest.approx([9.0, 9.7, 10.35, 10.99, 11.65])
    assert tail_summary(MetricsFile(steps=p.steps), window=3).total_time_min == pytest.approx(11.65 / 60)
    assert p.warnings == []
    sparse = parse_csv("step,loss,dt_ms\n0,5.0,10\n2,4.9,10\n4,4.8,20\n")
    assert [s.elapsed_s for s in sparse.steps] == pytest.approx([0.01, 0.03, 0.07])  # each dt stands for the gap before it
    assert sparse.warnings == ["2 steps are not in the csv: training time counts each row's dt for the steps missing "
                               "before it (dt x steps since the previous row: an estimate)"]
    timed = parse_csv("step,loss,dt_ms,elapsed_s\n0,5.0,10,3.0\n1,4.9,10,3.5\n")
    assert [s.elapsed_s for s in timed.steps] == [3.0, 3.5]  # its own times stay


def test_a_csv_step_repeated_keeps_its_last_row_and_says_so():
    p = parse_csv("step,loss\n0,5.0\n1,4.9\n1,4.7\n2,4.6\n")
    assert [(s.step, s.loss) for s in p.steps] == [(0, 5.0), (1, 4.7), (2, 4.6)]
    assert p.warnings == ["1 row(s) repeated the step number of an earlier row: each step keeps its last row "
                          "(a resumed run's steps run again, or two runs in one table without a run column?)"]


def test_a_jsonl_figure_that_cannot_be_negative_is_missing_not_averaged(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text('{"type": "step", "step": 0, "loss": 2.0, "tok_per_sec": 1000.0, "dt_ms": 5.0}\n'
                   '{"type": "step", "step": 1, "loss": 1.9, "tok_per_sec": -5.0, "dt_ms": -1.0, "aux_loss": -0.5}\n')
    p = load_log(log, "jsonl")
    assert (p.steps[1].tok_per_sec, p.steps[1].dt_ms, p.steps[1].aux_loss) == (None, None, -0.5)
    assert tail_summary(MetricsFile(steps=p.steps), window=2).tok_per_sec == 1000.0


def _step_lines(order, dt_ms=100.0, loss=3.0) -> str:
    return "".join(f"step {i:05d}/00010 | loss: {loss - i / 100:.4f} | dt: {dt_ms:.2f}ms\n" for i in order)


def _import(tmp_path: Path, monkeypatch, name: str, text: str) -> dict:
    import json

    from typer.testing import CliRunner

    from moectl.cli import app

    log = tmp_path / f"{name}.log"
    log.write_text(text)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["import", str(log), "--format", "nanochat", "--name", name, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_log_whose_step_lines_are_out_of_order_is_imported_in_step_order(tmp_path, monkeypatch, artifact_root):
    """Step lines out of order (two processes' lines interleaved, a restarted run's log pasted after
    its first attempt's): each step that came early counted the ones it skipped as never printed,
    and the summed training time counted those again when they came (1.3 s for 10 steps of 100 ms)."""
    from engine.schema import StepMetrics, parse_line

    shuffled = _import(tmp_path, monkeypatch, "shuffled", _step_lines([0, 1, 2, 5, 3, 4, 6, 7, 8, 9]))
    assert not [w for w in shuffled["warnings"] if "never printed" in w]
    assert shuffled["summary"]["total_time_min"] == pytest.approx(1.0 / 60)
    lines = (Path(shuffled["exp_dir"]) / "metrics.jsonl").read_text().splitlines()
    steps = [r for r in map(parse_line, lines) if isinstance(r, StepMetrics)]
    assert [s.step for s in steps] == list(range(10))
    assert [s.elapsed_s for s in steps] == pytest.approx([0.1 * (i + 1) for i in range(10)])
    # A first attempt's steps 0-4 (500 ms each), then the whole run again: each step keeps its
    # latest line, and the training time is of those (the engine's resumed runs count it so too).
    restarted = _import(tmp_path, monkeypatch, "restarted", _step_lines(range(5), 500.0, 9.0) + _step_lines(range(10)))
    assert restarted["summary"]["total_time_min"] == pytest.approx(1.0 / 60)
    assert restarted["summary"]["final_loss"] == pytest.approx(2.91)
    assert not [w for w in restarted["warnings"] if "never printed" in w]
    assert any("went back 1 time(s)" in w for w in restarted["warnings"])  # said, as before
    # A step that is really missing (4) is still said, and timed as the dt after it.
    missing = _import(tmp_path, monkeypatch, "missing", _step_lines([0, 1, 3, 2, 5, 6, 7, 8, 9]))
    assert [w for w in missing["warnings"] if "never printed" in w] == [
        "1 steps were never printed (the trainer printed 9 step lines): the tail means are over the printed steps "
        "only; training time counts each printed dt for the unprinted steps before it (dt x steps since the "
        "previous line: an estimate)"]
    assert missing["summary"]["total_time_min"] == pytest.approx(1.0 / 60)


def test_an_out_of_order_log_that_prints_its_own_training_time_keeps_it():
    text = "".join(f"step {i:05d}/00004 | loss: 3.0 | dt: 100.00ms | total time: {t:.2f}m\n"
                   for i, t in [(0, 0.01), (2, 0.03), (1, 0.02), (3, 0.04)])
    p = parse_nanochat(text)
    assert [(s.step, s.elapsed_s) for s in p.steps] == [(0, pytest.approx(0.6)), (1, pytest.approx(1.2)),
                                                        (2, pytest.approx(1.8)), (3, pytest.approx(2.4))]
    assert not [w for w in p.warnings if "never printed" in w]


def test_a_log_counting_its_steps_from_1_imports_with_its_first_10_steps_as_the_warm_up(tmp_path, monkeypatch, artifact_root):
    # `step 00001` .. `step 00020`: the default warm-up (10) is steps 1-10, so 10 steps are left, not 11.
    rec = _import(tmp_path, monkeypatch, "onebased", _step_lines(range(1, 21)))
    assert (rec["summary"]["run_steps"], rec["summary"]["steps"], rec["summary"]["first_step"]) == (20, 10, 1)
    assert rec["summary"]["final_loss"] == pytest.approx(2.8)
