"""The training loop end to end on CPU: real torch, real subprocesses, real torchrun (gloo)."""
import json
import math
import re
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.schema import EXIT_BAD_OPTIONS, EXIT_COMPILE_FAILED, RunSummary, StartInfo, StepMetrics, parse_line
from engine.train import main, resolve_options
from tests.conftest import stop_process, wait_for

ROOT = Path(__file__).resolve().parents[1]


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    e.update(extra)
    return e


def read_metrics(out_dir: Path):
    records = [parse_line(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in records if isinstance(r, StartInfo)]
    steps = [r for r in records if isinstance(r, StepMetrics)]
    summaries = [r for r in records if isinstance(r, RunSummary)]
    return starts, steps, summaries


def test_tiny_lowers_the_loss_and_writes_schema_lines(tmp_path, capsys):
    assert main(["--preset", "tiny", "--out-dir", str(tmp_path)]) == 0
    starts, steps, summaries = read_metrics(tmp_path)
    assert len(starts) == 1 and len(summaries) == 1 and [s.step for s in steps] == list(range(40))
    first = sum(s.loss for s in steps[:5]) / 5
    last = sum(s.loss for s in steps[-5:]) / 5
    assert first > 4.5 and last < 3.5 and first - last > 1.5, (first, last)
    assert starts[0].world_size == 1 and starts[0].tokens_per_step == 16 * 64
    assert all(s.mfu is None and s.tok_per_sec > 0 and 0 <= s.drop_frac <= 1 for s in steps)
    assert all(s.expert_load_max >= 1.0 and s.peak_mem_mib > 0 for s in steps)
    assert summaries[0].val_loss < first and summaries[0].flops_per_token == starts[0].config["flops_per_token"]
    out = capsys.readouterr().out
    assert "step 00039/00040 (100.00%) | loss: " in out
    assert "Peak memory usage: " in out and "Total training time: " in out


def test_a_diverging_run_keeps_every_step_and_its_non_finite_loss_reads_back_as_nan(tmp_path, capsys):
    """lr 1e30 without clipping: the loss goes NaN within a few steps. Every step is still a
    well-formed line (its loss null on the wire, NaN once parsed), timed like any other."""
    assert main(["--preset", "tiny", "--steps", "6", "--lr", "1e30", "--grad-clip", "0", "--out-dir", str(tmp_path)]) == 0
    raw = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    raw_steps = [r for r in raw if r.get("type") == "step"]
    null_at = [r["step"] for r in raw_steps if r["loss"] is None]
    assert len(raw_steps) == 6 and null_at, raw_steps  # the run did diverge, and wrote every step
    starts, steps, summaries = read_metrics(tmp_path)  # every line parses
    assert [s.step for s in steps] == list(range(6))
    assert [s.step for s in steps if math.isnan(s.loss)] == null_at
    assert all(s.tok_per_sec > 0 and s.dt_ms > 0 for s in steps)
    assert "loss: nan" in capsys.readouterr().out  # what the log says too


def test_peak_flops_gives_mfu(tmp_path):
    assert main(["--preset", "tiny", "--steps", "2", "--peak-flops", "1e9", "--out-dir", str(tmp_path)]) == 0
    starts, steps, summary = read_metrics(tmp_path)
    fpt = starts[0].config["flops_per_token"]
    for s in steps:
        assert s.mfu == pytest.approx(100 * fpt * s.tok_per_sec / 1e9)
    assert summary[0].peak_flops == 1e9


def test_resume_continues_step_count_and_data_position(tmp_path):
    common = ["--preset", "tiny", "--steps", "8", "--device-batch-size", "8", "--total-batch-size", "1024"]
    full, resumed, ckpt = tmp_path / "full", tmp_path / "resumed", tmp_path / "ckpt"
    assert main(common + ["--out-dir", str(full), "--ckpt-dir", str(ckpt), "--save-every", "4"]) == 0
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "meta_000004.json", "meta_000008.json", "model_000004.pt", "model_000008.pt",
    ]
    meta = json.loads((ckpt / "meta_000004.json").read_text())
    # 4 steps x 2 micro-batches (grad accumulation) drawn so far
    assert meta["step"] == 4 and meta["loader"] == {"k": 8} and meta["config"]["dim"] == 64

    assert main(common + ["--out-dir", str(resumed), "--resume", str(ckpt / "model_000004.pt"),
                          "--ckpt-dir", str(tmp_path / "ckpt_resumed")]) == 0
    _, full_steps, _ = read_metrics(full)
    starts, res_steps, _ = read_metrics(resumed)
    assert starts[0].start_step == 4 and [s.step for s in res_steps] == list(range(4, 8))
    for a, b in zip(full_steps[4:], res_steps):
        assert b.loss == pytest.approx(a.loss, rel=1e-5, abs=1e-6), (a.step, a.loss, b.loss)
        assert b.lr == a.lr


def test_an_out_dir_holding_a_runs_metrics_is_refused_unless_resumed(tmp_path, capsys):
    """A report's recorded command, pasted again, wrote over the metrics of the run it reports."""
    common = ["--preset", "tiny", "--steps", "4", "--device-batch-size", "8", "--total-batch-size", "512"]
    out, ckpt = tmp_path / "run", tmp_path / "run" / "ckpt"
    assert main(common + ["--out-dir", str(out), "--ckpt-dir", str(ckpt), "--save-every", "2"]) == 0
    before = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(common + ["--out-dir", str(out)]) == EXIT_BAD_OPTIONS
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --out-dir {out} already holds a run's metrics.jsonl: a new run goes into a fresh directory "
        "(--resume continues that one)"]
    assert (out / "metrics.jsonl").read_bytes() == before
    # --resume goes on in it; an empty metrics file (a run that wrote nothing yet) is no run's
    assert main(["--preset", "tiny", "--steps", "6", "--device-batch-size", "8", "--total-batch-size", "512",
                 "--out-dir", str(out), "--ckpt-dir", str(ckpt), "--resume", "latest"]) == 0
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert main(common + ["--out-dir", str(tmp_path / "empty")]) == 0


def test_a_resume_that_leaves_nothing_to_train_is_refused_and_another_plan_is_said(tmp_path, capsys):
    common = ["--preset", "tiny", "--device-batch-size", "8", "--total-batch-size", "1024"]
    ckpt = tmp_path / "ckpt"
    assert main(common + ["--steps", "6", "--ckpt-dir", str(ckpt), "--save-every", "4"]) == 0
    capsys.readouterr()
    # Was exit 0 with no step trained and a summary of nothing.
    assert main(common + ["--steps", "3", "--resume", str(ckpt / "model_000004.pt"),
                          "--ckpt-dir", str(tmp_path / "branch0")]) == EXIT_BAD_OPTIONS
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --resume {ckpt / 'model_000004.pt'}: the checkpoint is at step 4; --steps 3 leaves nothing to train"]
    # (a checkpoint with later ones beside it: each branch saves into a --ckpt-dir of its own)
    assert main(common + ["--steps", "5", "--resume", str(ckpt / "model_000004.pt"),
                          "--ckpt-dir", str(tmp_path / "branch")]) == 0
    err = capsys.readouterr().err
    assert "warning: resuming a run planned for 6 steps with --steps 5" in err and "other data options" not in err
    # The loader resumes at a chunk index: chunks of another shape or seed are other tokens.
    assert main(["--preset", "tiny", "--device-batch-size", "4", "--total-batch-size", "1024", "--seed", "7",
                 "--steps", "6", "--resume", str(ckpt / "model_000004.pt"), "--ckpt-dir", str(tmp_path / "branch2")]) == 0
    err = capsys.readouterr().err
    assert "warning: resuming with other data options (--device-batch-size 8 -> 4, --seed 0 -> 7)" in err
    assert "other training options" not in err
    # Routing, capacity and the optimizer's settings: the weights load, the steps train otherwise (was unsaid).
    assert main(common + ["--steps", "6", "--top-k", "1", "--cap", "0", "--lr", "0.02",
                          "--resume", str(ckpt / "model_000004.pt"), "--ckpt-dir", str(tmp_path / "branch3")]) == 0
    err = capsys.readouterr().err
    assert ("warning: resuming with other training options (--top-k 2 -> 1, --cap 1.0 -> 0.0, --lr 0.01 -> 0.02): "
            "the steps from here on train differently from the original run's") in err, err
    assert "other data options" not in err and "planned for" not in err


def test_bad_options_exit_2_with_one_line():
    cases = [["--cap", "-1"], ["--top-k", "0"], ["--top-k", "5", "--n-experts", "4"]]
    procs = [subprocess.Popen([sys.executable, "-m", "engine.train", "--preset", "tiny", *args], cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args in cases]
    for args, proc in zip(cases, procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == EXIT_BAD_OPTIONS, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("argv,needle", [
    (["--preset", "nope"], "invalid choice"),
    (["--total-batch-size", "1000"], "not a multiple"),
    (["--device", "cuda"], "no CUDA device"),
    (["--data", "/nonexistent/corpus"], "no such file"),
    (["--save-every", "5"], "needs --ckpt-dir"),
    (["--resume", "latest"], "needs --ckpt-dir"),
    (["--fp8-dense", "--depth", "1", "--aspect-ratio", "40", "--head-dim", "8"], "multiple of 16"),
    # -1024 is a multiple of 1024: it "trained" zero micro-steps a step, loss -0.0, exit 0
    (["--total-batch-size", "-1024"], "--total-batch-size must be > 0, got -1024"),
    # the MoE layer's own rules, refused before a model is built (were a traceback and exit 1)
    (["--dispatch", "padded", "--cap", "0"], "--dispatch padded needs --cap > 0"),
    (["--dispatch", "grouped", "--cap", "1"], "--dispatch grouped is dropless"),
    (["--balance-coeff", "-1"], "--balance-coeff and z_coeff must be >= 0"),
    # nan / inf pass every `< 0` check: refused by name (were a traceback, or a quietly empty metrics.jsonl)
    (["--cap", "nan"], "--cap must be a finite number, got nan"),
    (["--expert-hidden-mult", "inf"], "--expert-hidden-mult must be a finite number, got inf"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0 (0 = off)"),
    # were tracebacks and exit 1 (issue 11 audit): at step 0, or only after every step had trained
    (["--seed", str(2**70)], f"--seed must fit in 64 bits, got {2**70}"),
    (["--data", ""], "--data must not be empty"),
    (["--ep", "2", "--moe-freq", "3"], "--moe-freq 3 over --depth 2 makes no MoE layer"),
    (["--moe-freq", "3"], "--moe-freq 3 over --depth 2 makes no MoE layer"),  # (trained a dense model, unsaid)
    (["--ckpt-dir", "/proc/no-such-dir/ckpt"], "--ckpt-dir /proc/no-such-dir/ckpt: cannot write in /proc"),
    (["--out-dir", "/proc/no-such-dir"], "--out-dir /proc/no-such-dir: cannot write in /proc"),
    # overflowing sizes: torch's "Overflow when unpacking long long" traceback and exit 1 before
    (["--n-experts", "99999999999999999999"], "the model would have about "),
    (["--vocab-size", "99999999999999999999"], "the model would have about "),
    (["--expert-hidden-mult", "1e30"], "the model would have about "),
    (["--depth", "100000"], "the model would have about "),  # (was a minute of building it on meta)
])
def test_more_bad_options_in_process(argv, needle, capsys):
    assert main(["--preset", "tiny", "--steps", "1", *argv]) == EXIT_BAD_OPTIONS
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_a_checkpoint_dir_that_is_a_file_or_a_corrupt_checkpoint_is_refused_before_training(tmp_path, capsys):
    # A --ckpt-dir that is a file was found by the final save, after every step had trained.
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = tmp_path / "out"
    assert main(["--preset", "tiny", "--steps", "1", "--ckpt-dir", str(afile), "--out-dir", str(out)]) == EXIT_BAD_OPTIONS
    assert f"--ckpt-dir {afile}: {afile} is a file, not a directory" in capsys.readouterr().err and not out.exists()
    ckpt = tmp_path / "ckpt"
    assert main(["--preset", "tiny", "--steps", "1", "--ckpt-dir", str(ckpt), "--out-dir", str(tmp_path / "o1")]) == 0
    capsys.readouterr()
    assert main(["--preset", "tiny", "--steps", "2", "--n-experts", "8", "--resume", "latest", "--ckpt-dir", str(ckpt),
                 "--out-dir", str(tmp_path / "o2")]) == EXIT_BAD_OPTIONS
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "checkpoint does not match this model: Error(s) in loading state_dict for GPT: size mismatch for" in line
    bad = tmp_path / "model_000004.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["--preset", "tiny", "--steps", "1", "--resume", str(bad)]) == EXIT_BAD_OPTIONS
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --resume {bad}: cannot read this checkpoint:"), err


def test_a_checkpoint_with_a_flipped_bit_is_refused_not_resumed(tmp_path, capsys):
    """torch.load checks no checksum: one bit flipped in a weight's storage resumed silently with a
    wrong weight. The zip container's CRC-32s are checked first."""
    import zipfile

    ckpt = tmp_path / "ckpt"
    assert main(["--preset", "tiny", "--steps", "2", "--ckpt-dir", str(ckpt), "--out-dir", str(tmp_path / "o1")]) == 0
    capsys.readouterr()
    path = ckpt / "model_000002.pt"
    with zipfile.ZipFile(path) as archive:  # the largest member: a weight's (or its Adam moment's) bytes
        member = max(archive.infolist(), key=lambda info: info.file_size)
    raw = bytearray(path.read_bytes())
    data_at = member.header_offset + 30 + len(member.filename.encode()) + int.from_bytes(
        raw[member.header_offset + 28:member.header_offset + 30], "little")  # local header + name + extra
    raw[data_at + member.file_size // 2] ^= 0x04
    path.write_bytes(bytes(raw))
    assert main(["--preset", "tiny", "--steps", "3", "--resume", str(path), "--out-dir", str(tmp_path / "o2")]) \
        == EXIT_BAD_OPTIONS
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --resume {path}: cannot read this checkpoint: "), err
    assert f"{member.filename} fails its CRC-32 check" in err[0], err
    assert not (tmp_path / "o2" / "metrics.jsonl").exists()


def test_data_too_small_after_the_holdout_says_where_the_tokens_went(tmp_path, capsys):
    # 1060 bytes hold one 16x64 batch (1025 tokens) but the training split, less the 5% held out,
    # does not: "1007 tokens give 0 batches" alone read as a miscount of the user's file.
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"moe " * 265)
    assert main(["--preset", "tiny", "--steps", "1", "--data", str(corpus), "--out-dir", str(tmp_path / "o")]) \
        == EXIT_BAD_OPTIONS
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: data too small: 1007 tokens give 0 batches of 16x64"), line
    assert line.endswith("(the data's 1060 tokens less the 53 held out for validation)"), line


def test_a_metrics_path_that_is_a_directory_or_a_dangling_link_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "metrics.jsonl").mkdir(parents=True)
    assert main(["--preset", "tiny", "--steps", "1", "--out-dir", str(out)]) == EXIT_BAD_OPTIONS
    assert f"{out / 'metrics.jsonl'} is a directory, not a metrics file" in capsys.readouterr().err
    out2 = tmp_path / "out2"
    out2.mkdir()
    (out2 / "metrics.jsonl").symlink_to(tmp_path / "gone" / "metrics.jsonl")
    assert main(["--preset", "tiny", "--steps", "1", "--out-dir", str(out2)]) == EXIT_BAD_OPTIONS
    assert "is a dangling link, not a metrics file" in capsys.readouterr().err
    assert not (tmp_path / "gone").exists()
    out3 = tmp_path / "out3"  # a FIFO: opening it for writing blocked the run forever
    out3.mkdir()
    os.mkfifo(out3 / "metrics.jsonl")
    assert main(["--preset", "tiny", "--steps", "1", "--out-dir", str(out3)]) == EXIT_BAD_OPTIONS
    assert f"{out3 / 'metrics.jsonl'} is a special file (a FIFO, socket or device), not a metrics file" in capsys.readouterr().err


def test_a_capacity_beyond_the_tokens_allocates_no_more_than_the_tokens(tmp_path):
    """--cap 1e6 asked for a million times the slots (the OOM killer took the machine); no expert
    can be sent a token twice, so N slots are already dropless."""
    from engine.moe import capacity

    assert capacity(1e6, 80, 2, 8) == 80 and capacity(1e308, 100, 2, 8) == 104 and capacity(4.0, 64, 2, 4) == 64
    assert main(["--preset", "tiny", "--steps", "2", "--cap", "1e6", "--out-dir", str(tmp_path)]) == 0
    starts, steps, summaries = read_metrics(tmp_path)
    assert len(steps) == 2 and steps[-1].drop_frac == 0.0


def test_a_second_signal_during_the_stop_is_ignored():
    """The first SIGINT/SIGTERM raises Interrupted; one more, landing in that stop's cleanup, must
    not raise again (it made exit 1 and a traceback instead of 130)."""
    from engine.train import Interrupted, _on_signal, _signalled

    _signalled.clear()
    with pytest.raises(Interrupted):
        _on_signal(signal.SIGINT, None)
    assert _on_signal(signal.SIGINT, None) is None and _on_signal(signal.SIGTERM, None) is None
    _signalled.clear()


def test_explicit_options_override_the_preset():
    args = resolve_options(["--preset", "d12-moe", "--device", "cpu", "--cap", "0", "--steps", "60"])
    assert (args.depth, args.aspect_ratio, args.head_dim, args.seq_len, args.device_batch_size) == (12, 64, 64, 1024, 16)
    assert (args.n_experts, args.top_k, args.total_batch_size, args.vocab_size, args.data) == (8, 2, 524288, 32768, "synthetic")
    assert (args.cap, args.steps, args.compile, args.dtype) == (0.0, 60, "static", "bf16")
    assert resolve_options(["--device", "cpu"]).dtype == "fp32"  # tiny on cpu


def test_dense_says_which_given_moe_options_have_no_effect(tmp_path, capsys):
    """--dense builds no MoE layer: a --cap or --fp8 given beside it changes nothing, and the run says
    so (once, first) instead of letting a dense leg read as a capped or float8 one. Preset values
    and the options that size the dense MLP (--top-k) are not named."""
    assert resolve_options(["--preset", "d12-moe", "--device", "cpu", "--dense"]).no_effect == []  # its preset's cap
    args = resolve_options(["--device", "cpu", "--dense", "--cap", "0.5", "--top-k", "1", "--balance", "none"])
    assert args.no_effect == ["balance", "cap"]
    assert resolve_options(["--device", "cpu", "--cap", "0.5"]).no_effect == []  # not dense: every option counts
    assert main(["--preset", "tiny", "--steps", "1", "--device", "cpu", "--dense", "--cap", "0.5", "--dispatch", "loop",
                 "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "warning: --dense has no MoE layers, so --cap, --dispatch have no effect"
    assert sum("warning" in line for line in out) == 1


def test_sigterm_stops_promptly_and_keeps_valid_metrics(tmp_path):
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err_fh:
        proc = subprocess.Popen([sys.executable, "-m", "engine.train", "--preset", "tiny", "--steps", "100000",
                                 "--out-dir", str(tmp_path)], cwd=ROOT, env=env(),
                                stdout=subprocess.DEVNULL, stderr=err_fh, text=True)
    metrics = tmp_path / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.exists() and metrics.read_text().count('"type":"step"') >= 3,
                 "3 training steps in metrics.jsonl", 120, proc=proc, output=err_path.read_text)
        proc.send_signal(signal.SIGTERM)
        # The engine stops inside the step it is in (the handler raises); the bound only catches a hang.
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            stop_process(proc)
    err = err_path.read_text()
    assert proc.returncode == 128 + signal.SIGTERM and "interrupted by SIGTERM" in err, err
    starts, steps, summaries = read_metrics(tmp_path)  # every line parses: nothing torn
    assert len(starts) == 1 and 3 <= len(steps) < 100000 and summaries == []
    assert [s.step for s in steps] == list(range(len(steps)))


@pytest.mark.slow
def test_compile_static_smoke(tmp_path):
    # reduce-overhead: CUDA graphs on a GPU; on CPU torch.compile skips the graphs and trains as usual,
    # which covers the mode's plumbing (the per-micro-step marker included) wherever the suite runs.
    proc = subprocess.run([sys.executable, "-m", "engine.train", "--preset", "tiny", "--compile", "static",
                           "--compile-mode", "reduce-overhead", "--steps", "3", "--out-dir", str(tmp_path)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    starts, steps, summaries = read_metrics(tmp_path)
    assert starts[0].config["compile"] == "static" and len(steps) == 3 and len(summaries) == 1
    assert starts[0].config["compile_mode"] == "reduce-overhead" and "compile static (reduce-overhead)" in proc.stdout
    assert steps[-1].loss < steps[0].loss
    # The padded MoE model compiles whole: any graph break would be named on stderr.
    assert "graph break" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_compile_dynamic_under_torchrun_trains_the_losses_of_eager(tmp_path):
    # Every multi-rank --compile dynamic run of the padded model failed in dynamo's DDP graph
    # splitter (exit 3, "'float' object has no attribute 'target'"); one process compiled fine.
    runs = {mode: subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                    "2", "-m", "engine.train", "--preset", "tiny", "--compile", mode, "--steps", "3",
                                    "--eval-every", "-1", "--out-dir", str(tmp_path / mode)],
                                   cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for mode in ("dynamic", "none")}
    for mode, proc in runs.items():
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, (mode, err[-3000:])
    compiled, eager = (read_metrics(tmp_path / mode)[1] for mode in ("dynamic", "none"))
    assert [s.step for s in compiled] == [0, 1, 2]
    for a, b in zip(compiled, eager):
        assert a.loss == pytest.approx(b.loss, rel=1e-4), (a.step, a.loss, b.loss)


def test_graph_break_warning_names_count_and_reason():
    """A real dynamo graph break, counted by dynamo itself, turned into the one warning line that
    engine.train prints after its first compiled step."""
    import torch
    from torch._dynamo.utils import counters

    from engine.train import graph_break_warning

    def split_twice(x):
        x = x * 2
        torch._dynamo.graph_break()
        x = x + 1
        torch._dynamo.graph_break()
        return x - 1

    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(split_twice, backend="eager")(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0))
    warning = graph_break_warning(dict(counters["graph_break"]))
    counters.clear()
    assert warning.startswith("warning: torch.compile split the model at 2 graph break(s), 1 reason(s)")
    assert "x2: " in warning and "graph_break" in warning.lower()
    assert graph_break_warning({}) is None

    @torch.compiler.disable
    def exchange(x):  # as engine.moe's EP exchange: a break on purpose
        return x + 1

    counters.clear()
    torch.compile(lambda x: exchange(x * 2) - 1, backend="eager")(torch.ones(3))
    assert counters["graph_break"] and graph_break_warning(dict(counters["graph_break"])) is None
    counters.clear()
    # torch 2.11's wording: a generic first line, the op named on a "Developer debug context" line.
    reason = ("torch.* op returned non-Tensor\n  Explanation: torch.* ops that return a non-Tensor cannot be "
              "traced\n\n  Developer debug context: example_value type: int; op: call_function; target: "
              "<function sym_min at 0x7f20>\n")
    warning = graph_break_warning({reason: 24, "other": 1})
    assert "at 25 graph break(s), 2 reason(s)" in warning and "x24: torch.* op returned non-Tensor" in warning
    assert "sym_min" in warning and "\n" not in warning


@pytest.mark.slow
def test_compile_failure_exits_3(tmp_path):
    # A real inductor failure: its C++ compiler does not exist, so building the first kernel fails.
    proc = subprocess.run([sys.executable, "-m", "engine.train", "--preset", "tiny", "--compile", "static",
                           "--steps", "2", "--dense", "--depth", "1"], cwd=ROOT,
                          env=env(CXX="/nonexistent/c++", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor")),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == EXIT_COMPILE_FAILED, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: torch.compile failed") and "--compile none" in last


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "engine.train", "--preset", "tiny", "--steps", "6", "--out-dir", str(tmp_path)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    starts, steps, summaries = read_metrics(tmp_path)
    assert starts[0].world_size == 2 and summaries[0].world_size == 2
    assert starts[0].tokens_per_step == 2 * 16 * 64  # one micro-batch per rank
    assert [s.step for s in steps] == list(range(6))  # rank 0 alone writes
    assert proc.stdout.count("step 00005/00006") == 1


def test_compile_error_detection_by_type_or_innermost_frame():
    """Dynamo/inductor raise their own types, but tracing also fails with plain AssertionErrors
    from torch.fx.experimental: both must map to exit 3 (compile failed), a user bug must not."""
    from engine.train import _is_compile_error

    def raised_in(module: str) -> BaseException:
        scope = {"__name__": module}
        exec("def boom():\n    raise AssertionError('Source of s0 is None')\n", scope)
        try:
            scope["boom"]()
        except AssertionError as exc:
            return exc
        raise RuntimeError("unreachable")

    assert _is_compile_error(raised_in("torch.fx.experimental.symbolic_shapes"))
    assert _is_compile_error(raised_in("torch._inductor.codegen"))
    assert not _is_compile_error(raised_in("engine.model"))
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = raised_in("torch._dynamo.output_graph")
    assert _is_compile_error(wrapped)


def test_a_save_stopped_midway_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C (or a full disk) inside torch.save left model_*.pt.tmp behind, as big as a checkpoint."""
    from engine import checkpoint

    def stopped_midway(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", stopped_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 3, {"model": {}}, {"loader": {"k": 1}})
    assert list(tmp_path.iterdir()) == [] and checkpoint.latest(tmp_path) is None


def test_eager_forward_error_is_the_first_line_of_what_validation_would_raise():
    """--fp8 on CUDA runs one eager no-grad forward before training (validation's pass, which on an
    H200 failed in cuBLASLt only after the compiled steps had all run). The check itself, on CPU:
    a model that raises gives its first line, a working one None, and the mode is left as found."""
    import contextlib

    import torch

    from engine.model import GPT
    from engine.train import eager_forward_error, model_config, resolve_options

    class Refusing(torch.nn.Module):
        def forward(self, x_BT, y_BT):
            assert not self.training and not torch.is_grad_enabled()  # validation's conditions
            raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul\nmore detail")

    x_BT = torch.zeros(2, 8, dtype=torch.long)
    refusing = Refusing().train()
    why = eager_forward_error(refusing, x_BT, x_BT, contextlib.nullcontext())
    assert why == "CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul"
    assert refusing.training

    args = resolve_options(["--preset", "tiny", "--device", "cpu"])
    model = GPT(model_config(args, 256)).eval()
    assert eager_forward_error(model, x_BT, x_BT, torch.autocast("cpu", enabled=False)) is None
    assert not model.training


def test_a_ckpt_dir_holding_another_runs_checkpoints_is_refused_without_resume(tmp_path):
    """Run B into run A's --ckpt-dir overwrote A's model_000002.pt and a later `--resume latest`
    continued from A's step 6 with B's metrics: refused now, exit 2, nothing written."""
    ck = tmp_path / "ck"
    base = ["--preset", "tiny", "--device", "cpu", "--ckpt-dir", str(ck), "--save-every", "2"]
    assert main([*base, "--steps", "4", "--out-dir", str(tmp_path / "a")]) == 0
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    assert main([*base, "--steps", "4", "--seed", "2", "--out-dir", str(tmp_path / "b")]) == EXIT_BAD_OPTIONS
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before and not (tmp_path / "b" / "metrics.jsonl").exists()
    assert main([*base, "--steps", "6", "--out-dir", str(tmp_path / "a"), "--resume", "latest"]) == 0  # continuing is fine


@pytest.mark.parametrize("content, says", [
    ("{'foo': 1}", "not a checkpoint of this engine (no 'model' in it)"),
    ("torch.zeros(3)", "not a checkpoint of this engine (it holds a Tensor, not a checkpoint's dict)"),
    ("{'model': {}, 'optimizer': {}, 'loader': {}, 'rng': {}, 'step': '4'}",
     "not a checkpoint of this engine (its 'step' is a str, not a int)"),
])
def test_a_torch_file_that_is_not_an_engine_checkpoint_is_one_line_exit_2(tmp_path, capsys, content, says):
    import torch

    bad = tmp_path / "model_000004.pt"
    torch.save(eval(content, {"torch": torch}), bad)
    assert main(["--preset", "tiny", "--device", "cpu", "--steps", "6", "--resume", str(bad)]) == EXIT_BAD_OPTIONS
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --resume {bad}: {says}"], err


def test_a_checkpoint_whose_loader_state_does_not_fit_is_one_line_exit_2(tmp_path, capsys):
    import torch

    ck = tmp_path / "ck"
    assert main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--ckpt-dir", str(ck)]) == 0
    [saved] = sorted(ck.glob("model_*.pt"))
    state = torch.load(saved, weights_only=False)
    state["rng"] = {}  # no "cpu" state in it
    torch.save(state, saved)
    capsys.readouterr()
    assert main(["--preset", "tiny", "--device", "cpu", "--steps", "4", "--resume", str(saved)]) == EXIT_BAD_OPTIONS
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --resume {saved}: checkpoint does not match this run: KeyError")


@pytest.mark.parametrize("argv,needle", [
    (["--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead needs --compile static or dynamic"),
    (["--compile", "static", "--compile-mode", "fast"], "invalid choice: 'fast'"),
    (["--eval-every", "-5"], "--eval-every must be -1 (never), 0 (at the end) or a step count, got -5"),
    (["--vocab-size", "0"], "--vocab-size must be >= 2, got 0"),
    # 10^8 experts of 64 x 128: 6.6 TB of expert weights, past this machine's allocator (it said so in a traceback)
    (["--n-experts", "100000000", "--top-k", "1"], "error: the model does not fit in this cpu memory: "),
    # 10^9 of them: past the size no machine holds, refused before anything is allocated
    (["--n-experts", "1000000000", "--top-k", "1"], "error: the model would have about "),
])
def test_bad_compile_modes_values_that_meant_something_else_or_cannot_be_built_exit_2(argv, needle, capsys):
    assert main(["--preset", "tiny", "--steps", "1", "--device", "cpu", *argv]) == EXIT_BAD_OPTIONS
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_a_resume_without_ckpt_dir_saves_on_where_its_checkpoint_is_and_never_over_a_later_one(tmp_path, capsys):
    # It used to train on and save nothing at all: the steps after the resume were lost.
    common = ["--preset", "tiny", "--device-batch-size", "8", "--total-batch-size", "512"]
    ckpt = tmp_path / "ckpt"
    assert main(common + ["--steps", "4", "--ckpt-dir", str(ckpt), "--save-every", "2"]) == 0
    assert main(common + ["--steps", "6", "--resume", str(ckpt / "model_000004.pt")]) == 0
    assert main(common + ["--steps", "8", "--resume", str(ckpt)]) == 0  # its directory: the latest in it
    assert sorted(p.name for p in ckpt.glob("model_*.pt")) == [f"model_{s:06d}.pt" for s in (2, 4, 6, 8)]
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in ckpt.glob("model_*.pt")}
    assert main(common + ["--steps", "8", "--resume", str(ckpt / "model_000004.pt")]) == EXIT_BAD_OPTIONS
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --resume {ckpt / 'model_000004.pt'}: {ckpt} holds a later checkpoint (model_000008.pt) that this "
        "run's saves would overwrite; give it a --ckpt-dir of its own"]
    assert {p.name: p.read_bytes() for p in ckpt.glob("model_*.pt")} == before
    # ... nor with that directory given as --ckpt-dir, nor into another run's (both overwrote them)
    other = tmp_path / "other"
    assert main(common + ["--steps", "2", "--ckpt-dir", str(other)]) == 0
    capsys.readouterr()
    for into, says in ((ckpt, f"--ckpt-dir {ckpt} holds a later checkpoint (model_000008.pt)"),
                       (other, f"--ckpt-dir {other} already holds a run's checkpoints (model_000002.pt)")):
        assert main(common + ["--steps", "8", "--resume", str(ckpt / "model_000004.pt"), "--ckpt-dir", str(into)]) \
            == EXIT_BAD_OPTIONS
        [line] = capsys.readouterr().err.strip().splitlines()
        assert says in line, line
    assert {p.name: p.read_bytes() for p in ckpt.glob("model_*.pt")} == before
    # a fresh directory of its own is the way
    assert main(common + ["--steps", "6", "--resume", str(ckpt / "model_000004.pt"), "--ckpt-dir",
                          str(tmp_path / "branch")]) == 0
    assert [p.name for p in (tmp_path / "branch").glob("model_*.pt")] == ["model_000006.pt"]


def test_out_and_ckpt_dirs_given_with_an_equals_sign_expand_their_tilde(tmp_path, monkeypatch):
    # `--out-dir=~/x`: no shell expands that `~`, and the run wrote into ./~/x
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--out-dir=~/o", "--ckpt-dir=~/c"]) == 0
    assert (tmp_path / "home" / "o" / "metrics.jsonl").is_file() and (tmp_path / "home" / "c" / "model_000002.pt").is_file()
    assert not (tmp_path / "~").exists()


def test_a_checkpoint_that_cannot_be_written_is_one_line_naming_why(tmp_path, monkeypatch, capsys):
    # A full disk: two tracebacks ending in torch's "[enforce fail at inline_container.cc] unexpected pos".
    import errno

    from engine import checkpoint

    def disk_full(obj, path):
        Path(path).write_bytes(b"part of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "model_000001.pt.tmp").write_bytes(b"a killed save's part")  # (SIGKILL: no cleanup ran)
    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    assert main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--ckpt-dir", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: checkpoint model_000002.pt not saved in {tmp_path / 'c'}: no space left on the device; "
                       "the checkpoints before it are intact"), err
    assert "Traceback" not in "\n".join(err) and list((tmp_path / "c").iterdir()) == []


def test_a_part_file_that_cannot_be_removed_does_not_hide_why_the_checkpoint_failed(tmp_path):
    # A read-only ckpt dir: unlinking the temp file torch.save never made raised EROFS from the
    # clean-up, so the run ended in a double traceback instead of the one line below. (A directory
    # by the temp file's name fails both the save and the unlink, without a read-only mount.)
    from engine import checkpoint

    (tmp_path / "model_000003.pt.tmp").mkdir()
    (tmp_path / "model_000003.pt.tmp" / "x").write_text("")
    with pytest.raises(checkpoint.CheckpointFailed, match=r"^checkpoint model_000003.pt not saved in .*; "
                                                          r"the checkpoints before it are intact$"):
        checkpoint.save(tmp_path, 3, {"model": {}}, {"loader": {"k": 1}})


def test_a_metrics_file_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    # A full disk under --out-dir: a traceback ending in "OSError: [Errno 28] No space left on device",
    # naming no file. A file size limit (RLIMIT_FSIZE, its signal ignored) fails the write the same
    # way, with EFBIG: metrics.jsonl's start line (~1 KB) fits, its steps do not for long.
    import resource

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1800, 1800))

    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "engine.train", "--preset", "tiny", "--device", "cpu", "--steps", "20",
                        "--out-dir", str(out)], capture_output=True, text=True, preexec_fn=limited, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip().splitlines()
    assert re.fullmatch(rf"error: {re.escape(str(out / 'metrics.jsonl'))} not written at step \d+: File too large",
                        err[-1]), err
    assert "Traceback" not in r.stderr
    # The line that did not fit is taken back whole: no half line for readers to skip as malformed.
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and all(parse_line(ln) for ln in text.splitlines()), text[-300:]


@pytest.mark.parametrize("flag", ["--resume", "--out-dir", "--ckpt-dir"])
def test_an_empty_path_option_is_refused_not_taken_as_absent(flag, capsys, tmp_path):
    # `--resume "$CKPT"` with CKPT unset trained from scratch; `--out-dir ""` wrote no metrics at all.
    assert main(["--preset", "tiny", "--steps", "1", flag, ""]) == EXIT_BAD_OPTIONS
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {flag} is empty: give a path (a shell variable that expanded to nothing?)"]


@pytest.mark.parametrize("meta", ["[1]", '{"options": "steps"}', "null"])
def test_a_meta_file_that_is_not_ours_is_ignored_on_resume(meta, tmp_path, capsys):
    common = ["--preset", "tiny", "--device-batch-size", "8", "--total-batch-size", "512"]
    ckpt = tmp_path / "ckpt"
    assert main(common + ["--steps", "2", "--ckpt-dir", str(ckpt)]) == 0
    (ckpt / "meta_000002.json").write_text(meta)  # an AttributeError traceback, exit 1, before
    assert main(common + ["--steps", "3", "--resume", "latest", "--ckpt-dir", str(ckpt)]) == 0


def test_a_dropless_fp8_run_says_its_experts_run_eagerly_with_a_host_read(tmp_path, capsys, monkeypatch):
    # Trains correctly, only not as SPEC §10 wants the hot path (no host sync): said, not refused.
    # No validation pass: on a CPU whose _scaled_mm is a reference kernel it took minutes.
    import engine.fp8

    speeds = iter([(0.05, 50.0), (40.0, 50.0)])  # a reference-kernel CPU, then one near fp32
    monkeypatch.setattr(engine.fp8, "cpu_gemm_speeds", lambda: next(speeds))
    one_step = ["--preset", "tiny", "--steps", "1", "--eval-every", "-1", "--fp8"]
    assert main([*one_step, "--cap", "0", "--out-dir", str(tmp_path / "a")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("note: --cap 0 --fp8: dropless float8 runs one float8 GEMM")
    assert lines[1] == ("note: --fp8 on CPU: torch._scaled_mm runs at 0.05 GFLOP/s here against 50 for fp32, "
                        "1000x slower: float8 pays on Ada/Hopper GPUs, and on this CPU a run only exercises the float8 path")
    assert main([*one_step, "--cap", "1", "--out-dir", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "note: --cap 0 --fp8" not in out and "on CPU: torch._scaled_mm" not in out


def test_cpu_gemm_speeds_measures_both_kinds():
    from engine.fp8 import cpu_gemm_speeds

    fp8_gflops, fp32_gflops = cpu_gemm_speeds(n=32, repeats=1)
    assert 0 < fp8_gflops < 1e5 and 0 < fp32_gflops < 1e5


def test_the_peak_of_a_pcie_or_nvl_card_is_its_own_not_its_sxm_siblings():
    # An H100 PCIe's MFU was taken against the SXM part's 989e12: 24% too low.
    from engine.schema import peak_flops_for

    assert [peak_flops_for(f"NVIDIA {n}") for n in ("H100 80GB HBM3", "H100 PCIe", "H100 NVL", "H200", "H200 NVL",
                                                    "H800 PCIe", "H20", "L40S", "L40", "L4")] == \
        [989e12, 756e12, 835e12, 989e12, 835e12, 756e12, 148e12, 362e12, 181e12, 121e12]
    assert peak_flops_for("cpu") is None
