"""Engine options that `moectl run` passes through (--balance, --balance-rate, --ep): the plan's command,
the derived tag, bad values, and where runs / reports show them. No torch in these tests."""
from __future__ import annotations

import json
from datetime import datetime

import pytest
from typer.testing import CliRunner

from moectl.cli import app
from moectl.errors import UsageError
from moectl.plan import make_request, plan_run
from moectl.records import RunRecord
from moectl.report import run_label
from moectl.store import create_run_dir, save_run
from tests.test_guards import cfg

NOW = datetime(2025, 1, 2, 3, 4, 5)


def engine_flags(argv: list[str]) -> list[str]:
    return argv[argv.index("engine.train") + 1:]


def test_balance_options_reach_the_engine_command_and_the_tag():
    plan = plan_run(cfg(defaults={"preset": "tiny"}), make_request(balance="bias", balance_rate=0.01), NOW, None)
    flags = engine_flags(plan.argv)
    assert flags[flags.index("--balance") + 1] == "bias" and flags[flags.index("--balance-rate") + 1] == "0.01"
    assert plan.tag == "tiny_balbias" and plan.options["balance"] == "bias"
    # The default (loss) is not worth a word in the tag.
    assert plan_run(cfg(defaults={"preset": "tiny"}), make_request(balance="loss"), NOW, None).tag == "tiny"


def test_ep_reaches_the_engine_command_and_the_tag():
    plan = plan_run(cfg(defaults={"preset": "tiny"}), make_request(ep=2, nproc=4), NOW, None)
    flags = engine_flags(plan.argv)
    assert flags[flags.index("--ep") + 1] == "2" and plan.tag == "tiny_ep2" and plan.nproc == 4
    assert plan_run(cfg(defaults={"preset": "tiny"}), make_request(ep=1), NOW, None).tag == "tiny"


@pytest.mark.parametrize("kwargs, line", [
    ({"balance": "aux"}, "--balance: Input should be 'loss', 'bias' or 'none'"),
    ({"balance_rate": 0}, "--balance-rate: Input should be greater than 0"),
    ({"ep": 0}, "--ep: Input should be greater than or equal to 1"),
    ({"nproc": 100_000}, "--nproc: Input should be less than or equal to 1024"),  # a typo would fork that many
])
def test_bad_engine_options_are_one_line_usage_errors(kwargs, line):
    with pytest.raises(UsageError) as e:
        make_request(**kwargs)
    assert e.value.message.startswith(line) and e.value.exit_code == 2


@pytest.mark.parametrize("extra, defaults, says", [
    (["--top-k", "9"], {"preset": "tiny"}, "--top-k 9 is larger than --n-experts 4"),
    (["--n-experts", "1"], {"preset": "d12-moe"}, "--top-k 2 is larger than --n-experts 1"),  # the preset's top-k
    (["--head-dim", "24"], {"preset": "tiny"}, "dim 64 (depth x aspect ratio) is not a multiple of --head-dim 24"),
    (["--aspect-ratio", "18", "--head-dim", "9"], {"preset": "tiny"}, "--head-dim must be even for rotary embeddings, got 9"),
    # what engine.data refuses before training, said the engine's way
    (["--data", "/nonexistent/train.bin"], {"preset": "tiny"},
     "--data /nonexistent/train.bin: no such file or directory (use 'default', 'synthetic', a directory or a .bin file)"),
    (["--vocab-size", "3"], {"preset": "tiny"}, "--vocab-size 3 is smaller than the data's (256)"),
    (["--data", ""], {"preset": "tiny"}, "--data must not be empty (a path, `default` or `synthetic`)"),
    # no MoE layer at all: a dense model trained under MoE options, without a word (was: only --ep refused it)
    (["--moe-freq", "3"], {"preset": "tiny"}, "--moe-freq 3 over --depth 2 makes no MoE layer"),
    (["--ep", "2", "--moe-freq", "3"], {"preset": "tiny"}, "--moe-freq 3 over --depth 2 makes no MoE layer"),
    ([], {"preset": "tiny", "expert_hidden_mult": 0.001}, "--expert-hidden-mult gives expert hidden 0; must be >= 1"),
    # sizes no machine holds: the engine failed on torch's overflow (a traceback, a failed run)
    (["--expert-hidden-mult", "1e30"], {"preset": "tiny"}, "the model would have about "),
])
def test_a_model_the_engine_would_refuse_is_a_usage_error_before_launch(extra, defaults, says):
    # What engine.train would refuse (exit 2) only after torchrun started in a new run directory.
    with pytest.raises(UsageError) as e:
        plan_run(cfg(defaults=defaults), make_request(extra_args=extra), NOW, None)
    assert e.value.message.startswith(f"engine options: {says}") and e.value.exit_code == 2
    assert "\n" not in e.value.message
    # ... while the same options with a model that works plan as before
    assert plan_run(cfg(defaults={"preset": "tiny"}), make_request(extra_args=["--top-k", "4"]), NOW, None).options["top_k"] == 4
    # a Slurm job reads its --data on its node (a node-local /scratch): not judged from here
    assert plan_run(cfg(defaults={"preset": "tiny"}), make_request(extra_args=["--data", "/scratch/node/t.bin"]), NOW,
                    None, data_here=False).options["data"] == "/scratch/node/t.bin"
    # synthetic data has the vocabulary it is given
    assert plan_run(cfg(defaults={"preset": "tiny"}), make_request(extra_args=["--data", "synthetic", "--vocab-size", "3"]),
                    NOW, None).options["vocab_size"] == 3


def test_a_fifo_as_data_is_refused_before_launch(tmp_path):
    """engine.data refuses to read a named pipe (it would block forever): moectl says so first."""
    import os

    os.mkfifo(tmp_path / "feed")
    with pytest.raises(UsageError) as e:
        plan_run(cfg(defaults={"preset": "tiny"}), make_request(extra_args=["--data", str(tmp_path / "feed")]), NOW, None)
    assert e.value.message == f"engine options: --data {tmp_path / 'feed'}: not a regular file or directory"
    assert e.value.exit_code == 2


@pytest.mark.parametrize("argv", [
    [], ["--preset", "d12-moe"], ["--top-k", "9"], ["--preset", "d12-moe", "--n-experts", "1"], ["--head-dim", "24"],
    ["--depth", "3", "--aspect-ratio", "10", "--head-dim", "10"], ["--expert-hidden-mult", "0.001"],
    ["--moe-freq", "0"], ["--cap", "-1"], ["--balance-rate", "0"], ["--seq-len", "0"], ["--top-k", "0"],
    ["--ep", "2", "--moe-freq", "3"], ["--moe-freq", "3"], ["--compile-mode", "reduce-overhead"],
    ["--compile", "static", "--compile-mode", "reduce-overhead"],
])
def test_moectls_model_check_agrees_with_the_engines(argv):
    # engine.config.check_model_options (torch-free, run by moectl) and engine.train's own option
    # resolution (torch) refuse the same models with the same line.
    from engine.config import check_model_options
    from engine.schema import ENGINE_OPTIONS
    from engine.train import BadOptions, resolve_options  # imports torch: fine in a test, never in moectl

    try:
        resolve_options([*argv, "--device", "cpu"])
        engine_says = None
    except BadOptions as exc:
        engine_says = str(exc)
    options = {}
    for flag, value in zip(argv[::2], argv[1::2]):
        key = flag[2:].replace("-", "_")
        options[key] = ENGINE_OPTIONS[key](value)
    try:
        check_model_options(options)
        ours = None
    except ValueError as exc:
        ours = str(exc)
    if ours is not None:  # the engine refuses it too; for the model's own rules, with the same line
        assert engine_says is not None and (ours == engine_says or argv[0] == "--seq-len"), (ours, engine_says)
    else:  # the engine may refuse more (steps, paths), but no model moectl let through
        assert engine_says is None or not any(w in engine_says for w in ("top-k", "dim", "experts", "moe-freq")), engine_says


def test_run_dry_run_passes_balance_and_ep_through(project, artifact_root):
    r = CliRunner().invoke(app, ["run", "--dry-run", "--json", "--device", "cpu", "--balance", "none",
                                 "--balance-rate", "0.002", "--ep", "2", "--nproc", "2", "--override", "no_other_training"])
    data = json.loads(r.stdout)
    flags = engine_flags(data["argv"])
    assert flags[flags.index("--balance") + 1] == "none" and flags[flags.index("--balance-rate") + 1] == "0.002"
    assert flags[flags.index("--ep") + 1] == "2"


def test_runs_table_and_report_label_show_the_balance_and_ep(project, artifact_root):
    exp = create_run_dir(artifact_root / "20260101_000000_moe-biased")
    record = RunRecord(id=exp.name, tag="biased", status="completed", created_at="2026-01-01T00:00:00+00:00",
                       exp_dir=str(exp), options={"preset": "tiny"},
                       engine={"preset": "tiny", "cap": 1.0, "balance": "bias", "balance_rate": 0.001, "ep": 4})
    save_run(record)
    r = CliRunner().invoke(app, ["runs"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    header = next(line for line in r.output.splitlines() if "status" in line)
    row = next(line for line in r.output.splitlines() if "biased" in line)
    assert "balance" in header and "bias" in row.replace("biased", "")
    assert " ep " in f" {header} " and " 4 " in row
    label = run_label(record.model_copy(update={"options": {"balance": "bias", "ep": 4}}))
    assert "balbias" in label and "ep4" in label
