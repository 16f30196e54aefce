"""The stdout parser (moectl/stdout_metrics.py): what is a step and what is not, live and imported."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.schema import RunSummary, StartInfo, StepMetrics, parse_line
from moectl.cli import app
from moectl.stdout_metrics import LiveMetricsWriter, StdoutFormat, StdoutParser, parse_text

FIXTURE = Path(__file__).parent / "fixtures" / "foreign_trainer.py"
NANOGPT = StdoutFormat.build(
    "regex", step=r"iter (\d+):", tokens_per_step=r"tokens per iteration will be: ([\d,]+)",
    patterns={"loss": r"loss ([\d.]+)", "dt_ms": r"time ([\d.]+)ms", "mfu": r"mfu (-?[\d.]+)%"},
)
NANOCHAT = StdoutFormat.build("nanochat")


def trainer_output(*args: str) -> str:
    return subprocess.run([sys.executable, str(FIXTURE), *args], capture_output=True, text=True, check=True,
                          timeout=60).stdout


def steps_of(parser: StdoutParser, lines: list[str]) -> list[StepMetrics]:
    return [r for line in lines for r in parser.feed(line) if isinstance(r, StepMetrics)]


def test_nanogpt_lines_become_schema_records_with_tok_per_sec_from_tokens_per_step():
    parser = StdoutParser(NANOGPT, planned_steps=3, world_size=1, device="cpu")
    recs = [r for line in ["tokens per iteration will be: 16,384\n", "iter 0: loss 2.5000, time 8.00ms, mfu -100.00%\n"]
            for r in parser.feed(line)]
    assert isinstance(recs[0], StartInfo) and recs[0].steps == 3 and recs[0].tokens_per_step == 16384
    step = recs[1]
    # nanoGPT prints mfu -100.00% until it has an estimate: no figure, not a -100% to average
    assert (step.step, step.loss, step.dt_ms, step.mfu) == (0, 2.5, 8.0, None)
    later = steps_of(parser, ["iter 1: loss 2.4000, time 8.00ms, mfu 12.50%\n"])
    assert later[0].mfu == 12.5
    assert step.tok_per_sec == pytest.approx(16384 / 0.008)
    assert step.elapsed_s == pytest.approx(0.008)


@pytest.mark.parametrize("line", [
    "[rank1]: iter 5: loss 1.0, time 1.00ms, mfu 1.00%\n",  # another rank
    "[default1]:iter 5: loss 1.0, time 1.00ms, mfu 1.00%\n",  # torchrun --tee prefix, rank 1
    "W1127 12:00:00.123000 4242 torch/distributed/run.py:766] iter 5: loss 1.0, time 1.00ms\n",
    "WARNING:torch.distributed.run:iter 5: loss 1.0, time 1.00ms\n",
    "iter 5: loss 1.0, time 1.00ms, mfu 1.00%",  # no newline: partial
])
def test_lines_that_are_not_steps(line):
    assert steps_of(StdoutParser(NANOGPT), [line]) == []


def test_rank0_prefix_is_stripped_and_tracebacks_are_skipped_to_their_exception_line():
    parser = StdoutParser(NANOGPT)
    lines = ["[default0]:iter 1: loss 1.5, time 2.00ms, mfu 1.00%\n",
             "Traceback (most recent call last):\n", '  File "t.py", line 3\n',
             "    iter 7: loss 0.1, time 1.00ms\n", "ValueError: iter 8: loss 0.1\n",
             "iter 2: loss 1.25, time 2.00ms, mfu 1.00%\n"]
    assert [s.step for s in steps_of(parser, lines)] == [1, 2]


def test_lines_end_at_newlines_and_at_the_carriage_return_of_a_redrawn_bar():
    from moectl.stdout_metrics import split_lines

    assert split_lines(b"a\nb\r\nc\rd\r") == ([b"a\n", b"b\r\n", b"c\r"], b"d\r")  # `d\r` may be `d\r\n`: wait
    assert split_lines(b"d\r" + b"\n") == ([b"d\r\n"], b"")
    assert split_lines("d\r", ended=True) == (["d\r"], "")  # nothing follows: the `\r` ended it
    assert split_lines("half a li") == ([], "half a li")


@pytest.mark.timeout(60)
def test_a_long_unterminated_line_is_split_in_one_pass():
    # A line without its newline yet (a 3 MB debug line arriving, a crash mid-print) was scanned again
    # from every position: 24 s for 64 KiB, hours for a few MB, and the tee holding the GIL meanwhile.
    from moectl.stdout_metrics import split_lines

    lines, rest = split_lines(b"iter 0: loss 1.0\n" + b"x" * 3_000_000)
    assert lines == [b"iter 0: loss 1.0\n"] and len(rest) == 3_000_000
    lines, rest = split_lines("a\r" * 200_000 + "z" * 1_000_000)
    assert len(lines) == 200_000 and len(rest) == 1_000_000


def test_a_tqdm_bar_is_a_step_per_redraw_and_a_refresh_is_no_new_step(tmp_path):
    fmt = StdoutFormat.build("regex", step=r"\| (\d+)/\d+ \[", patterns={"loss": r"loss=([\d.]+)", "dt_ms": r"dt=([\d.]+)ms"})
    text = subprocess.run([sys.executable, str(FIXTURE), "--style=tqdm", "--max_iters=12"], capture_output=True,
                          check=True, timeout=60).stdout.decode()  # bytes: text mode would turn each `\r` into `\n`
    assert text.split("Total batch size 16,384\n", 1)[1].count("\n") == 1
    parser, steps = parse_text(text, fmt, finished=True)
    assert [s.step for s in steps] == list(range(12)) and parser.warnings() == []
    from moectl.importers import load_log  # `moectl import` reads the log's bytes as the tee did

    log = tmp_path / "bar.log"
    log.write_bytes(text.encode())
    assert [s.step for s in load_log(log, "regex", stdout_format=fmt).steps] == list(range(12))
    # As printed lines with a newline each, the same steps repeated are read as before: each one.
    assert [s.step for s in parse_text("| 3/9 [loss=1.0]\n| 3/9 [loss=0.9]\n", fmt)[1]] == [3, 3]


def test_nanochat_format_reads_the_fixture_and_its_run_facts():
    parser, steps = parse_text(trainer_output("--style=nanochat", "--max_iters=12", "--seed=3", "--noise=1"), NANOCHAT)
    assert [s.step for s in steps] == list(range(12))  # not the traceback's, the warning's or the partial 99
    assert parser.planned_steps == 12 and parser.peak_mem_mib == pytest.approx(1237.5)
    assert all(s.tok_per_sec and s.dt_ms and s.mfu is not None for s in steps)
    assert parser.partial == 1 and parser.warnings() == []


def test_a_pattern_that_never_matches_is_a_warning_not_a_crash():
    fmt = StdoutFormat.build("regex", step=r"iter (\d+):", patterns={"loss": r"loss ([\d.]+)", "mfu": r"MFU=([\d.]+)"})
    parser, steps = parse_text(trainer_output("--max_iters=5"), fmt)
    assert len(steps) == 5 and all(s.mfu is None for s in steps)
    [warning] = parser.warnings()
    assert "mfu" in warning and "never matched" in warning


def test_an_optional_group_that_takes_no_part_is_a_missing_field_not_a_crash():
    r"""`(?:lr=([\d.]+)|L=[\d.]+)` matches a line whose group is empty: that line has no lr. It was
    an AttributeError that stopped the live parser for the rest of the run (and `import` exit 1)."""
    fmt = StdoutFormat.build("regex", step=r"iter (\d+):|epoch end", tokens_per_step=r"tokens: (\d+)|no tokens",
                             patterns={"loss": r"loss ([\d.]+)", "lr": r"(?:lr=([\d.]+)|L=[\d.]+)"})
    parser, steps = parse_text("no tokens\niter 1: loss 2.0 lr=0.1\niter 2: loss 1.5 L=1.5\nepoch end\n"
                               "iter 3: loss 1.0 lr=0.2\n", fmt)
    assert [(s.step, s.loss, s.lr) for s in steps] == [(1, 2.0, 0.1), (2, 1.5, None), (3, 1.0, 0.2)]
    assert parser.tokens_per_step is None and parser.skipped == 0


def test_a_rank0_line_printed_in_parts_reads_whole_through_torchruns_tee():
    """torchrun's tee prefixes every piece it reads from a rank's file: `print(..., end="")` then the
    rest came out as `[rank0]:step 0 | loss: [rank0]:2.0 ...`, and the step was lost."""
    parser, steps = parse_text("[rank0]:step 00000/00003 | loss: [rank0]:2.0000 | dt: [rank0]:10.00ms\n"
                               "[rank1]:step 00000/00003 | loss: [rank1]:3.0000 | dt: 10.00ms\n"
                               # rank 1's line landed inside rank 0's: rank 0's part is cut, a partial line
                               # (a trainer killed mid-line, then another rank's output, looks the same)
                               "[rank0]:step 00001/00003 | loss: 1.5000 [rank1]:step 00001/00003 | loss: 3.0 | dt: 1ms\n"
                               "[rank0]:| dt: 10.00ms\n"
                               "[rank0]:step 00099/00099 | loss: 0.1 | dt: 1.00ms[rank1]:bye\n", NANOCHAT)
    assert [(s.step, s.loss, s.dt_ms) for s in steps] == [(0, 2.0, 10.0)]
    assert parser.partial == 2


def test_steps_lost_in_lines_cut_by_another_rank_are_not_said_never_printed():
    """A rank-0 progress bar (one `\\r` redraw a step) with rank 1's lines spliced in: the steps in
    the cut lines were printed, so the warning says they were not read, not that the trainer
    skipped them."""
    parser, steps = parse_text("[rank0]:step 0 | loss: 3.0 | dt: 10ms\r"
                               "[rank0]:step 1 | loss: 2.9 [rank1]:rank1 says hi\n"
                               "[rank0]:| dt: 10ms\r[rank0]:step 2 | loss: 2.8 [rank1]:rank1 again\n"
                               "[rank0]:| dt: 10ms\r[rank0]:step 3 | loss: 2.7 | dt: 10ms\n", NANOCHAT, finished=True)
    assert [s.step for s in steps] == [0, 3] and parser.partial == 2
    [warning] = [w for w in parser.warnings() if "steps were" in w]
    assert warning.startswith("2 steps were not read (2 step lines were; 2 line(s) were cut mid-print") and "never" not in warning


def test_coloured_step_lines_read_as_a_terminal_shows_them():
    """A logger's ANSI colours (CSI) and a terminal-title escape (OSC) around a step line."""
    text = ("\x1b[32mstep 0 | loss: 3.0 | dt: 100ms\x1b[0m\n"
            "\x1b]0;training\x07\x1b[1;34mstep\x1b[0m 1 | loss: \x1b[33m2.5\x1b[0m | dt: 100ms\n")
    parser, steps = parse_text(text, NANOCHAT)
    assert [(s.step, s.loss, s.dt_ms) for s in steps] == [(0, 3.0, 100.0), (1, 2.5, 100.0)]
    assert parser.warnings() == []


def test_curses_and_tput_escapes_before_a_step_line_are_read_past():
    """`tput sgr0` is `\x1b(B\x1b[m` (a character-set escape, then CSI): a line opening with it lost its
    step. So did the two-byte ones a curses program writes (save/restore cursor, keypad mode)."""
    prefixes = ["\x1b(B\x1b[m", "\x1b)0", "\x1b7", "\x1b8\x1b=", "\x1b#8", ""]
    text = "".join(f"{prefixes[i % len(prefixes)]}step {i} | loss: {3.0 - i / 10} | dt: 100ms\x1b(B\x1b[m\n"
                   for i in range(12))
    parser, steps = parse_text(text, NANOCHAT)
    assert [s.step for s in steps] == list(range(12)) and steps[-1].loss == 3.0 - 11 / 10
    assert parser.warnings() == []


def test_a_parser_failure_stops_the_live_writer_and_says_so(tmp_path, monkeypatch):
    """The live writer survives a parser bug (the run goes on) and the parser's warnings, which
    the run record carries, say from where on the steps are missing."""
    parser = StdoutParser(NANOCHAT)
    writer = LiveMetricsWriter(tmp_path / "metrics.jsonl", parser)
    writer("step 0 | loss: 3.0 | dt: 100ms\n")

    def broken(line):
        raise RuntimeError("boom")

    monkeypatch.setattr(parser, "_step", broken)
    writer("step 1 | loss: 2.0 | dt: 100ms\n")
    writer("step 2 | loss: 1.0 | dt: 100ms\n")
    writer.close()
    [note] = parser.warnings()
    assert note.startswith("the stdout metrics parser stopped after 1 step(s), at the line 'step 1 | loss: 2.0")
    assert "RuntimeError: boom" in note
    steps = [r for r in map(parse_line, (tmp_path / "metrics.jsonl").read_text().splitlines()) if isinstance(r, StepMetrics)]
    assert [s.step for s in steps] == [0]


def test_live_writer_writes_the_engine_schema_then_a_summary(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = LiveMetricsWriter(path, StdoutParser(NANOGPT, planned_steps=4, world_size=1, device="cpu"))
    for line in trainer_output("--max_iters=4").splitlines(keepends=True):
        writer(line)
    writer.close()
    recs = [parse_line(line) for line in path.read_text().splitlines()]
    assert isinstance(recs[0], StartInfo) and isinstance(recs[-1], RunSummary)
    assert [r.step for r in recs if isinstance(r, StepMetrics)] == [0, 1, 2, 3]
    assert recs[-1].steps == 4 and recs[-1].final_loss == recs[-2].loss


@pytest.mark.parametrize("how", ["appended", "replaced"])
def test_a_trainers_own_metrics_jsonl_is_kept_aside_without_moectls_summary_in_it(tmp_path, how):
    # The summary was appended before the check: it ended the trainer's file kept aside (the engine's
    # own summary and then moectl's), and was missing from moectl's file put back.
    path = tmp_path / "metrics.jsonl"
    writer = LiveMetricsWriter(path, StdoutParser(NANOGPT, planned_steps=4, world_size=1, device="cpu"))
    lines = trainer_output("--max_iters=4").splitlines(keepends=True)
    for line in lines[:len(lines) // 2]:
        writer(line)
    theirs = '{"type": "summary", "steps": 4, "by": "the trainer"}'
    if how == "appended":
        with open(path, "a") as fh:  # the same file, one more line (moectl's later lines land after it)
            fh.write(theirs + "\n")
    else:
        path.unlink()
        path.write_text(theirs + "\n")
    for line in lines[len(lines) // 2:]:
        writer(line)
    writer.close()
    aside = (tmp_path / "metrics.trainer.jsonl").read_text().splitlines()
    assert [line for line in aside if "summary" in line] == [theirs]
    assert aside == [theirs] if how == "replaced" else len(aside) > 1
    recs = [parse_line(line) for line in path.read_text().splitlines()]
    assert isinstance(recs[0], StartInfo) and isinstance(recs[-1], RunSummary) and recs[-1].steps == 4
    assert [r.step for r in recs if isinstance(r, StepMetrics)] == [0, 1, 2, 3]
    assert sum(isinstance(r, RunSummary) for r in recs) == 1


def test_import_regex_parses_exactly_as_the_live_parser(tmp_path, monkeypatch, artifact_root):
    """The same log, once through the live writer, once through `moectl import --format regex`."""
    log = tmp_path / "train.log"
    log.write_text(trainer_output("--max_iters=15", "--seed=2", "--noise=1"))
    live = tmp_path / "live.jsonl"
    writer = LiveMetricsWriter(live, StdoutParser(NANOGPT))
    with open(log, newline="") as fh:  # line by line, as the tee reads the pipe
        for line in iter(fh.readline, ""):
            writer(line)
    writer.close()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [
        "import", str(log), "--format", "regex", "--name", "old", "--pattern", r"step=iter (\d+):",
        "--pattern", r"loss=loss ([\d.]+)", "--pattern", r"dt_ms=time ([\d.]+)ms", "--pattern", r"mfu=mfu (-?[\d.]+)%",
        "--pattern", r"tokens_per_step=tokens per iteration will be: ([\d,]+)",
    ])
    assert result.exit_code == 0, result.output
    [imported] = list(artifact_root.glob("*/metrics.jsonl"))
    steps = lambda p: [r for r in map(parse_line, p.read_text().splitlines()) if isinstance(r, StepMetrics)]  # noqa: E731
    assert steps(imported) == steps(live) and len(steps(live)) == 15


def test_import_regex_without_a_step_pattern_or_with_a_bad_one_is_exit_2(tmp_path, monkeypatch):
    log = tmp_path / "train.log"
    log.write_text(trainer_output("--max_iters=3"))
    monkeypatch.chdir(tmp_path)
    no_step = CliRunner().invoke(app, ["import", str(log), "--format", "regex", "--name", "x"])
    assert no_step.exit_code == 2 and "step pattern" in no_step.output
    bad = CliRunner().invoke(app, ["import", str(log), "--format", "regex", "--name", "x",
                                   "--pattern", "step=iter (", "--pattern", "loss=loss ([\\d.]+)"])
    assert bad.exit_code == 2 and "not a regular expression" in bad.output
    # a field given twice (the last silently won: the loss read by the other pattern), and an unknown
    # field said first, not after the missing step pattern
    twice = CliRunner().invoke(app, ["import", str(log), "--format", "regex", "--name", "x", "--pattern",
                                     "step=iter (\\d+)", "--pattern", "loss=loss ([\\d.]+)", "--pattern", "loss=(\\d)"])
    assert twice.exit_code == 2 and "--pattern loss=...: given twice; give each field once" in twice.stderr
    unknown = CliRunner().invoke(app, ["import", str(log), "--format", "regex", "--name", "x", "--pattern", "foo=x(\\d)"])
    assert unknown.exit_code == 2 and "foo is not a field of the metrics schema" in unknown.stderr, unknown.output


def test_import_regex_takes_its_patterns_from_the_config(tmp_path, monkeypatch, artifact_root):
    """An engine project ([metrics] source stays jsonl) keeps patterns for importing old nanoGPT logs."""
    (tmp_path / ".moectl.toml").write_text(
        "[metrics]\nstep = 'iter (\\d+):'\n[metrics.patterns]\nloss = 'loss ([\\d.]+)'\ndt_ms = 'time ([\\d.]+)ms'\n")
    log = tmp_path / "train.log"
    log.write_text(trainer_output("--max_iters=12"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["import", str(log), "--format", "regex", "--name", "cfg", "--json"])
    assert result.exit_code == 0, result.output
    [imported] = list(artifact_root.glob("*/metrics.jsonl"))
    steps = [r for r in map(parse_line, imported.read_text().splitlines()) if isinstance(r, StepMetrics)]
    assert [s.step for s in steps] == list(range(12)) and all(s.dt_ms for s in steps)


# --- a loss printed as nan / inf (a diverged run) ---------------------------------------------------

def test_nanochat_loss_nan_is_a_step_with_a_nan_loss_not_a_skipped_line():
    parser, steps = parse_text(trainer_output("--style=nanochat", "--max_iters=8", "--nan_from=5"), NANOCHAT)
    assert [s.step for s in steps] == list(range(8))
    assert [s.step for s in steps if math.isnan(s.loss)] == [5, 6, 7]
    assert all(s.dt_ms and s.tok_per_sec for s in steps)  # the diverged steps were still timed
    assert parser.skipped == 0 and parser.warnings() == []
    assert math.isnan(parser.finish().final_loss)


def test_step_numbers_that_go_back_keep_each_steps_latest_line_and_say_what_is_left_of_before():
    def line(step, loss):
        return f"step {step:05d}/00006 (0.00%) | loss: {loss:.6f} | dt: 100.00ms\n"

    # restarted from scratch after step 5, stopped at step 2: steps 3-5 are the first attempt's
    parser = StdoutParser(NANOCHAT)
    steps = steps_of(parser, [line(i, 5 - i / 10) for i in range(6)] + [line(i, 4 - i / 10) for i in range(3)])
    by_step = {s.step: s.loss for s in steps}  # (the readers keep each number's latest line)
    assert by_step == {0: 4.0, 1: 3.9, 2: 3.8, 3: 4.7, 4: 4.6, 5: 4.5}
    assert parser.warnings() == [
        "the step numbers went back 1 time(s), first from step 5 to 0 (a restarted trainer, or several processes "
        "printing steps): each step number keeps its latest line; steps 3-5 were not reached again and are from "
        "before it"]
    # resumed from a checkpoint at step 3 and trained past where the first attempt stopped: all the latest
    parser = StdoutParser(NANOCHAT)
    steps_of(parser, [line(i, 5.0) for i in range(5)] + [line(i, 4.0) for i in range(3, 6)])
    assert parser.warnings() == [
        "the step numbers went back 1 time(s), first from step 4 to 3 (a restarted trainer, or several processes "
        "printing steps): each step number keeps its latest line"]
    # the same step printed twice is no going back, but is said: a pattern taking one digit of
    # `step 00012` read every line as step 0
    parser = StdoutParser(NANOCHAT)
    steps_of(parser, [line(0, 5.0), line(1, 4.9), line(1, 4.9), line(2, 4.8)])
    assert parser.warnings() == ["1 of 4 step lines repeated the step number of the line before them: each number "
                                 "keeps its latest line (does the step pattern take the whole number?)"]
    fmt = StdoutFormat.build("regex", step=r"step (\d)", patterns={"loss": r"loss: ([\d.]+)"})
    parser = StdoutParser(fmt)
    assert {s.step for s in steps_of(parser, [line(i, 5.0) for i in range(6)])} == {0}
    assert parser.warnings()[0].startswith("5 of 6 step lines repeated the step number")
    # a progress bar redrawn in place (`\r`) shows its step again: nothing to say
    parser = StdoutParser(NANOCHAT)
    steps_of(parser, [line(0, 5.0).replace("\n", "\r"), line(0, 5.0).replace("\n", "\r"), line(1, 4.9)])
    assert parser.warnings() == []


def test_a_figure_printed_as_inf_or_nan_is_missing_from_its_step_not_the_step_lost():
    """A step timed at 0 prints `tok/sec: inf`; a broken timer `dt: infms`. The loss is still real:
    the step is kept without that figure (as the CSV importer and the engine's `mfu: -` do)."""
    lines = ["step 00000/00003 (0.00%) | loss: 4.500000 | dt: 600.00ms | tok/sec: 13,000 | mfu: 10.00\n",
             "step 00001/00003 (33.33%) | loss: 4.400000 | dt: infms | tok/sec: 0 | mfu: nan\n",
             "step 00002/00003 (66.67%) | loss: 4.300000 | dt: 0.00ms | tok/sec: inf | mfu: -inf%\n"]
    parser = StdoutParser(NANOCHAT)
    steps = steps_of(parser, lines)
    assert [(s.step, s.loss, s.dt_ms, s.tok_per_sec, s.mfu) for s in steps] == [
        (0, 4.5, 600.0, 13000.0, 10.0), (1, 4.4, None, 0.0, None), (2, 4.3, 0.0, None, None)]
    assert parser.skipped == 0
    fmt = StdoutFormat.build("regex", step=r"iter (\d+):", patterns={"loss": r"loss (\S+),", "dt_ms": r"time (\S+)ms"})
    parser = StdoutParser(fmt)
    steps = steps_of(parser, ["iter 0: loss 4.5, time infms\n", "iter 1: loss 4.4, time 12.5ms\n"])
    assert [(s.step, s.loss, s.dt_ms) for s in steps] == [(0, 4.5, None), (1, 4.4, 12.5)] and parser.skipped == 0
    # a negative figure is a placeholder ("-1: unknown"), missing from the step like nanoGPT's mfu -100%
    steps = steps_of(StdoutParser(fmt), ["iter 0: loss 4.5, time -1ms\n"])
    assert [(s.step, s.loss, s.dt_ms) for s in steps] == [(0, 4.5, None)]


def test_a_field_that_is_no_number_is_left_out_of_its_step_which_keeps_its_loss():
    """`tok/sec: 1.2M`, a stray byte after the total time, `mfu ?%`: the whole step was dropped
    (every one of them: the run failed, exit 4, "no step could be read"). Now that field is missing
    from the step, and one warning per field says so; `dt: 1.2e2ms` reads as 120 ms."""
    lines = [f"step {i:05d}/00004 | loss: {3.0 - i / 10:.4f} | dt: 1.2e2ms | tok/sec: {'1.2M' if i % 2 else '1,200,000'}"
             f" | total time: 0.0{i}m \xe9\n" for i in range(4)]
    parser = StdoutParser(NANOCHAT)
    steps = steps_of(parser, lines)
    assert [(s.step, s.loss, s.dt_ms, s.tok_per_sec, s.elapsed_s) for s in steps] == [
        (0, 3.0, 120.0, 1200000.0, 0.12), (1, 2.9, 120.0, None, 0.24), (2, 2.8, 120.0, 1200000.0, 0.36),
        (3, 2.7, 120.0, None, 0.48)]
    assert parser.skipped == 0 and parser.unprinted == 0
    assert parser.warnings() == [
        "elapsed_s: 4 step line(s) printed no number there (first: '0.00m \xe9'); elapsed_s is left out of those "
        "steps, which keep their loss",
        "tok_per_sec: 2 step line(s) printed no number there (first: '1.2M'); tok_per_sec is left out of those "
        "steps, which keep their loss"]
    fmt = StdoutFormat.build("regex", step=r"iter (\d+)", patterns={"loss": r"loss ([\d.]+)", "mfu": r"mfu (\S+)%"})
    parser = StdoutParser(fmt)
    steps = steps_of(parser, ["iter 1 loss 2.5 mfu ?%\n", "iter 2 loss 2.4 mfu 3%\n"])
    assert [(s.step, s.loss, s.mfu) for s in steps] == [(1, 2.5, None), (2, 2.4, 3.0)]
    assert parser.warnings() == ["mfu: 1 step line(s) printed no number there (first: '?'); mfu is left out of "
                                 "those steps, which keep their loss"]
    # a step time in ms stays as printed (it went by way of seconds: 642.32 -> 642.3200000000002)
    [step] = steps_of(StdoutParser(NANOCHAT), ["step 00000/00001 | loss: 3.0 | dt: 642.32ms\n"])
    assert repr(step.dt_ms) == "642.32"
    # a loss that is no number is still no step: said as before
    parser = StdoutParser(NANOCHAT)
    assert steps_of(parser, ["step 00000/00002 | loss: ?? | dt: 5ms\n"]) == [] and parser.skipped == 1
    assert parser.no_steps_reason().startswith("no step could be read from the trainer's output: 1 line(s) matched "
                                               "the step line, but none had a 'loss:' field holding a number")


def test_a_live_runs_last_step_line_without_a_newline_is_said_not_lost_silently():
    # `print(line, end="")` before the trainer exits: the tee feeds that line as partial (a kill
    # mid-write looks the same), so it is not read - `moectl import` said so, a live run did not.
    parser = StdoutParser(NANOCHAT)
    lines = ["step 00000/00002 | loss: 3.0 | dt: 5ms\n", "step 00001/00002 | loss: 2.9 | dt: 5ms"]
    assert [s.step for s in steps_of(parser, lines)] == [0]
    assert parser.warnings() == ["the trainer's last line has no newline, so its step 1 was not read (a line cut "
                                 "mid-write looks the same): end it with a newline (print's default)"]
    # a partial line in the middle (another rank's output cut into it) is not the last one: not said
    parser = StdoutParser(NANOCHAT)
    steps_of(parser, ["step 00000/00002 | loss: 3.0", "step 00001/00002 | loss: 2.9 | dt: 5ms\n"])
    assert not any("last line" in w for w in parser.warnings())
    # the import says it once, in its own words
    parser, steps = parse_text("".join(lines), NANOCHAT, finished=True)
    assert [w for w in parser.warnings() if "last line" in w] == [
        "the log's last line has no newline, so its step 1 was not read (a line cut mid-write looks the same); if it "
        "is whole, end the file with a newline and import again"]


@pytest.mark.parametrize("loss_pattern", [r"loss ([\d.]+)", r"loss (-?[\d.]+)", r"loss (\S+),"])
def test_a_digits_only_loss_pattern_still_reads_nan_as_the_loss(loss_pattern):
    """nanoGPT prints `loss nan`; most patterns only take digits. The step is not lost either way."""
    fmt = StdoutFormat.build("regex", step=r"iter (\d+):", patterns={"loss": loss_pattern, "dt_ms": r"time ([\d.]+)ms"})
    parser, steps = parse_text(trainer_output("--max_iters=12", "--nan_from=4"), fmt)
    assert [s.step for s in steps] == list(range(12)) and parser.skipped == 0
    assert [s.step for s in steps if math.isnan(s.loss)] == list(range(4, 12))
    assert parser.matched["loss"] == 12 and parser.warnings() == []
    # a word that only starts like one is no loss: nothing is invented
    assert steps_of(StdoutParser(fmt), ["iter 3: loss inference, time 1.00ms\n"]) == []


def test_live_writer_keeps_a_diverged_step_through_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = LiveMetricsWriter(path, StdoutParser(NANOGPT, planned_steps=6))
    for line in trainer_output("--max_iters=6", "--nan_from=3").splitlines(keepends=True):
        writer(line)
    writer.close()
    from moectl.metrics import read_metrics

    m = read_metrics(path)
    assert m.skipped == 0 and [s.step for s in m.steps] == list(range(6))
    assert [s.step for s in m.steps if math.isnan(s.loss)] == [3, 4, 5] and m.summary.final_loss is None


# --- a trainer printing every Nth step ----------------------------------------------------------

def test_sparse_step_lines_count_the_unprinted_steps_in_the_training_time():
    """nanoGPT's log_interval: steps 0, 10, 20, 30 printed of 31. The training time is each printed
    dt times the steps since the previous line (the first line: its own step), which the test
    works out from the printed lines; the fixture's own total of every step time bounds it."""
    out = trainer_output("--max_iters=31", "--log_interval=10", "--seed=5")
    fmt = StdoutFormat.build("regex", step=r"iter (\d+):", patterns={"loss": r"loss ([\d.]+)", "dt_ms": r"time ([\d.]+)ms"})
    parser, steps = parse_text(out, fmt)
    assert [s.step for s in steps] == [0, 10, 20, 30]
    printed = [(int(m.group(1)), float(m.group(2))) for m in re.finditer(r"iter (\d+): .*time ([\d.]+)ms", out)]
    spans = [1] + [b[0] - a[0] for a, b in zip(printed, printed[1:])]
    expected_s = sum(dt * n for (_, dt), n in zip(printed, spans)) / 1000
    assert steps[-1].elapsed_s == pytest.approx(expected_s) and parser.finish().total_time_s == pytest.approx(expected_s)
    truth_s = float(re.search(r"all step times: ([\d.]+) ms", out).group(1)) / 1000
    assert truth_s * 0.8 < expected_s < truth_s * 1.2  # not the sum of 4 printed dts: ~4/31 of it
    [warning] = parser.warnings()
    assert warning.startswith("27 steps were never printed (the trainer printed 4 step lines)") and "estimate" in warning


# --- the world size of a run on several nodes -------------------------------------------------

def test_a_stdout_parsed_run_on_several_nodes_records_every_process_in_its_world_size(tmp_path):
    """A Slurm job's plan is per node (nproc processes on each of --nodes): the metrics it writes
    for a foreign trainer must say nproc x nodes, as the engine's own start line does."""
    from moectl.config import MoectlFile, from_file_model
    from moectl.plan import RunRequest, plan_run
    from moectl.runner import stdout_parser

    cfg = from_file_model(MoectlFile.model_validate({
        "project": {"venv": ""}, "launch": {"module": "tests.fixtures.foreign_trainer", "args": ["--style=nanochat"]},
        "metrics": {"source": "stdout", "format": "nanochat"}}), tmp_path / ".moectl.toml", tmp_path)
    cfg.artifact_root = tmp_path / "art"
    plan = plan_run(cfg, RunRequest(device="cpu", nproc=2), datetime(2025, 1, 2), None)
    path = tmp_path / "metrics.jsonl"
    writer = LiveMetricsWriter(path, stdout_parser(cfg, plan, nodes=3))
    for line in trainer_output("--style=nanochat", "--max_iters=3").splitlines(keepends=True):
        writer(line)
    writer.close()
    recs = [parse_line(line) for line in path.read_text().splitlines()]
    assert plan.nproc == 2 and recs[0].world_size == 6 and recs[-1].world_size == 6
    assert stdout_parser(cfg, plan).world_size == 2  # a local run: one node


def test_training_time_goes_on_from_the_last_printed_total_when_the_trainer_stops_printing_it():
    # A log with `total time:` on its first steps only: the sum of step times after them started
    # again from 0, so the run's total time came out as the last few steps' (0.20 min, not 0.85).
    lines = [f"step {i:05d}/00004 ({25 * (i + 1):.2f}%) | loss: 2.000000 | dt: 500.00ms | tok/sec: 1,000 | "
             f"total time: {0.5 * (i + 1) / 60:.4f}m" for i in range(2)]
    lines += [f"step {i:05d}/00004 ({25 * (i + 1):.2f}%) | loss: 2.000000 | dt: 500.00ms | tok/sec: 1,000"
              for i in range(2, 4)]
    parser, steps = parse_text("\n".join(lines) + "\n", NANOCHAT)
    assert [s.elapsed_s for s in steps] == pytest.approx([0.5, 1.0, 1.5, 2.0], abs=0.01)


def test_no_step_read_names_the_loss_pattern_when_the_step_pattern_matched():
    """Every line matched the step pattern and none had a loss the loss pattern could read: the
    reason names the loss pattern, not "no step line matched"."""
    fmt = StdoutFormat.build("regex", r"iter (\d+):", None, {"loss": r"loss=([\d.]+)"})
    parser, steps = parse_text("".join(f"iter {i}: loss {3.0 - i / 10}\n" for i in range(5)), fmt)
    assert steps == [] and parser.skipped == 5
    assert parser.no_steps_reason() == (
        "no step could be read from the trainer's output: 5 line(s) matched the step pattern, but none had a "
        "loss matched by the loss pattern 'loss=([\\\\d.]+)' that is a number (step pattern 'iter (\\\\d+):')")
    parser, _ = parse_text("nothing here\n", fmt)
    assert parser.no_steps_reason() == "no step line in the trainer's output matched (step pattern 'iter (\\\\d+):')"


def test_nanochat_step_numbers_with_thousands_separators_are_the_whole_number():
    # `step 1,000/2,000 | ...` was step 1 (and no planned total): the run's later steps all read as 1-2.
    fmt = StdoutFormat.build("nanochat")
    parser, steps = parse_text("step 1,000/2,000 (50.00%) | loss: 2.5 | dt: 10ms\nstep 1,001/2,000 | loss: 2.4\n", fmt)
    assert [s.step for s in steps] == [1000, 1001] and parser.planned_steps == 2000
