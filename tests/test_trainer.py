"""Any trainer (issue 10): the `[launch]` command a foreign trainer gets, and refusals before launch.

Pure planning here (plan_run is pure); real runs of the fixture trainers are in test_foreign_run.py.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moectl.cli import app
from moectl.config import parse_config_text, from_file_model
from moectl.errors import UsageError
from moectl.plan import RunRequest, plan_run

NOW = datetime(2026, 11, 27, 1, 2, 3)
NANOGPT = '''
[project]
venv = ""
[launch]
script = "train.py"
launcher = "{launcher}"
args = ["config/train_small.py", "--device=cpu"]
[launch.options]
steps = "--max_iters={{}}"
cap = "--moe_capacity_factor={{}}"
seed = "--seed={{}}"
fp8 = "--fp8"
[metrics]
source = "stdout"
format = "regex"
step = 'iter (\\d+):'
[metrics.patterns]
loss = 'loss ([\\d.]+)'
'''


def cfg_of(text: str, root: Path = Path("/repo")):
    return from_file_model(parse_config_text(text), None, root)


def plan(text: str, **request):
    return plan_run(cfg_of(text), RunRequest(device="cpu", **request), NOW, gpus_available=None)


def test_script_under_torchrun_gets_args_then_mapped_options_then_extra():
    p = plan(NANOGPT.format(launcher="torchrun"), steps=40, cap=1.25, seed=3, fp8=True, extra_args=["--x=1"])
    i = p.argv.index("torch.distributed.run")
    assert p.argv[i + 1:i + 6] == ["--standalone", "--nproc-per-node", "1", "train.py", "config/train_small.py"]
    assert p.argv[i + 6:] == ["--device=cpu", "--moe_capacity_factor=1.25", "--fp8", "--max_iters=40", "--seed=3", "--x=1"]
    assert "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE" not in p.env  # one rank: nothing to tell apart
    # stdout-parsed on several ranks (or nodes): teed, each line prefixed with its global rank (the parser keeps rank 0's)
    for two in (plan(NANOGPT.format(launcher="torchrun"), steps=40, nproc=2),
                plan_run(cfg_of(NANOGPT.format(launcher="torchrun")), RunRequest(device="cpu", steps=40), NOW,
                         gpus_available=None, nodes=2)):
        i = two.argv.index("torch.distributed.run")
        tee = ["--tee", "3", "--log-dir", f"{two.exp_dir}/torchrun_logs"]
        assert two.argv[i + 4:i + 9] == [*tee, "train.py"] and two.env["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] == "[rank${rank}]:"
    # moectl's own engine flags never reach a foreign trainer.
    assert not any(a.startswith(("--out-dir", "--ckpt-dir", "--preset")) for a in p.argv)
    assert p.env["MOECTL_RUN_DIR"] == p.exp_dir


@pytest.mark.parametrize("extra, why", [
    (["--device=cuda"], "-- --device: not a trainer argument moectl can pass on: the device is moectl's"),
    (["--max_iters=5"], "-- --max_iters: not a trainer argument moectl can pass on: moectl passes it already as "
                        "--steps ([launch.options] steps in .moectl.toml)"),
    # argparse reads a unique prefix as the flag: the record would say 40 steps, the trainer run 5
    (["--max_it", "5"], "-- --max_it: not a trainer argument moectl can pass on: moectl passes it already as --steps"),
])
def test_another_trainers_flag_after_dashdash_that_moectl_already_maps_is_refused(extra, why):
    # nanoGPT's configurator takes the last --device=: `-- --device=cuda` would run on a GPU the
    # cpu run's guards never looked at, and `-- --max_iters=5` would make the record's steps wrong.
    text = NANOGPT.format(launcher="torchrun").replace('fp8 = "--fp8"', 'fp8 = "--fp8"\ndevice = "--device={}"')
    with pytest.raises(UsageError) as exc:
        plan(text, steps=40, extra_args=extra)
    assert exc.value.message.startswith(why), exc.value.message
    assert plan(text, extra_args=["--max_iters=5"]).argv[-1] == "--max_iters=5"  # steps not passed: the flag is theirs


def test_python_launcher_is_one_plain_process():
    p = plan(NANOGPT.format(launcher="python"), steps=5, fp8=False)
    assert p.argv[1:] == ["train.py", "config/train_small.py", "--device=cpu", "--max_iters=5"]  # fp8 false: left out
    with pytest.raises(UsageError, match="launcher = \"python\" runs one process"):
        plan(NANOGPT.format(launcher="python"), nproc=2)
    # nproc_per_node = "auto" on an 8-GPU node: one process, not "--nproc 8" refused (never asked for)
    gpu = plan_run(cfg_of(NANOGPT.format(launcher="python")), RunRequest(device="cuda", steps=5), NOW, gpus_available=8)
    assert gpu.nproc == 1 and gpu.argv[1] == "train.py"
    # ... and a config that asks a python launcher for more is the config's error, said as such
    with pytest.raises(UsageError) as exc:
        parse_config_text(NANOGPT.format(launcher="python").replace("[launch]\n", "[launch]\nnproc_per_node = 2\n"))
    assert any('nproc_per_node = 2: launcher = "python" runs one process' in line for line in exc.value.lines), exc.value.lines


def test_a_script_path_with_a_tilde_is_expanded_as_the_guard_reads_it(monkeypatch):
    monkeypatch.setenv("HOME", "/home/researcher")
    p = plan(NANOGPT.format(launcher="python").replace('script = "train.py"', 'script = "~/code/train.py"'), steps=5)
    assert p.argv[1] == "/home/researcher/code/train.py"


def test_unmapped_option_is_refused_naming_option_and_table():
    with pytest.raises(UsageError) as exc:
        plan(NANOGPT.format(launcher="torchrun"), compile="static")
    assert exc.value.message == ("--compile: this trainer has no flag for it; add e.g. `compile = \"--compile={}\"` "
                                 "under [launch.options] in .moectl.toml")
    # an on/off option: a bare flag (`--fp8={}` would pass `--fp8=True`)
    with pytest.raises(UsageError) as exc:
        plan(NANOGPT.format(launcher="torchrun").replace('fp8 = "--fp8"\n', ""), fp8=True)
    assert exc.value.message.startswith("--fp8: this trainer has no flag for it; add e.g. `fp8 = \"--fp8\"` ")


def test_defaults_go_through_the_mapping_too():
    text = NANOGPT.format(launcher="torchrun") + '[defaults]\npreset = "tiny"\n'
    with pytest.raises(UsageError, match="--preset"):
        plan(text)


def test_another_trainers_defaults_take_its_own_values_for_names_the_engine_also_has():
    # nanoGPT's dtype is "bfloat16" and its depth is not ours to judge: the engine's limits bind
    # engine.train only. moectl's own run options (cap, steps, ...) keep their meaning everywhere.
    text = NANOGPT.format(launcher="torchrun").replace('seed = "--seed={}"', 'seed = "--seed={}"\ndtype = "--dtype={}"\ndepth = "--n_layer={}"') + '[defaults]\ndtype = "bfloat16"\ndepth = 0\n'
    p = plan(text, steps=5)
    assert "--dtype=bfloat16" in p.argv and "--n_layer=0" in p.argv
    with pytest.raises(UsageError) as exc:
        cfg_of(text + "cap = -1.0\n")
    assert any("defaults.cap" in line for line in exc.value.lines), exc.value.lines


def test_module_trainer_without_table_keeps_the_engine_contract():
    p = plan('[project]\nvenv = ""\n[launch]\nmodule = "tests.fixtures.fake_engine"\n', steps=7)
    assert p.argv[p.argv.index("-m", 2):][:2] == ["-m", "tests.fixtures.fake_engine"]
    assert ["--steps", "7"] == p.argv[p.argv.index("--steps"):p.argv.index("--steps") + 2]
    assert "--out-dir" in p.argv and "MOECTL_RUN_DIR" not in p.env


def test_module_and_script_together_is_a_config_error():
    with pytest.raises(UsageError) as exc:
        parse_config_text('[launch]\nmodule = "a.b"\nscript = "train.py"\n')
    assert any("exactly one of module and script" in line for line in exc.value.lines)


@pytest.mark.parametrize("metrics, why", [
    ('source = "stdout"', "needs format"),
    ('source = "stdout"\nformat = "regex"\n[metrics.patterns]\nloss = "x (\\\\d+)"', "needs step"),
    ('source = "stdout"\nformat = "regex"\nstep = "iter"\n[metrics.patterns]\nloss = "l (\\\\d+)"', "needs a (group)"),
    ('source = "stdout"\nformat = "regex"\nstep = "iter (\\\\d+"\n[metrics.patterns]\nloss = "l (\\\\d+)"', "not a regular expression"),
    ('source = "stdout"\nformat = "regex"\nstep = "iter (\\\\d+)"\n[metrics.patterns]\nlos = "l (\\\\d+)"', "not a field"),
    ('source = "stdout"\nformat = "regex"\nstep = "iter (\\\\d+)"', "patterns.loss is required"),
    ('format = "nanochat"', 'source is "jsonl"'),
])
def test_bad_metrics_tables_are_config_errors(metrics, why):
    with pytest.raises(UsageError) as exc:
        parse_config_text("[metrics]\n" + metrics + "\n")
    assert any(why in line for line in exc.value.lines), exc.value.lines


def test_cli_refuses_unmapped_option_before_anything_is_written(tmp_path, monkeypatch, artifact_root):
    (tmp_path / ".moectl.toml").write_text(NANOGPT.format(launcher="python"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "--device", "cpu", "--cap", "1.0", "--compile", "static", "--no-commit"])
    assert result.exit_code == 2, result.output
    assert "--compile" in result.output and "[launch.options]" in result.output
    assert not artifact_root.exists() or not any(artifact_root.iterdir())


ENGINE = ('[project]\nvenv = ""\n[launch]\nmodule = "engine.train"\n[defaults]\npreset = "tiny"\nlr = 0.01\nfp8 = false\n'
          'cap = 1.0\ncompile = "none"\nseq_len = 64\ngrad_clip = 1\n')


def test_engine_flags_after_dashdash_that_repeat_a_default_become_that_option_once():
    p = plan(ENGINE, steps=7, extra_args=["--lr", "0.02", "--fp8", "--save-every=5", "--eval-batches=2"])
    assert (p.options["lr"], p.options["fp8"], p.options["steps"]) == (0.02, True, 7)
    engine = p.argv[p.argv.index("engine.train") + 1:]
    assert engine.count("--lr") == 1 and engine[engine.index("--lr") + 1] == "0.02" and engine.count("--fp8") == 1
    # Engine options that [defaults] does not set become options too: recorded, checked, once in the command.
    assert (p.options["save_every"], p.options["eval_batches"]) == (5, 2)
    assert engine.count("--save-every") == 1 and engine[engine.index("--save-every") + 1] == "5"
    assert not any(a.startswith(("--save-every=", "--eval-batches=")) for a in engine)
    p = plan(ENGINE, extra_args=["--lr=3e-4"])
    assert p.options["lr"] == 3e-4 and "--lr=3e-4" not in p.argv
    # grad_clip = 1 is the float option --grad-clip written as an integer: 0.5 replaces it
    assert plan(ENGINE, extra_args=["--grad-clip", "0.5"]).options["grad_clip"] == 0.5


@pytest.mark.parametrize("extra, why", [
    (["--out-dir", "/elsewhere"], "-- --out-dir: not a trainer argument moectl can pass on: the run directory is moectl's"),
    (["--ckpt-dir=/elsewhere/ck"], "-- --ckpt-dir: not a trainer argument moectl can pass on: checkpoints go to"),
    (["--device", "cuda"], "-- --device: not a trainer argument moectl can pass on: the device is moectl's"),
    (["--steps", "9"], "-- --steps: moectl already sets --steps for this run (a `moectl run --steps` option"),
    (["--cap=-1"], "-- --cap: Input should be greater than or equal to 0"),
    (["--compile", "bogus"], "-- --compile: Input should be 'static', 'dynamic' or 'none'"),
    (["--preset", "huge"], "-- --preset: unknown preset 'huge'"),
    (["--seq-len", "0"], "-- --seq-len: must be greater than 0, not 0"),
    (["--lr", "fast"], "-- --lr fast: not a number"),
    (["--lr"], "-- --lr: needs a value"),
    (["--fp8=yes"], "-- --fp8=yes: --fp8 is an on/off flag of the engine; it takes no value"),
    (["--ep", "3"], "--ep 3: does not divide the 4 experts (preset tiny)"),  # not in [defaults]: checked all the same
    (["--ep", "2"], "--ep 2: does not divide the world size 1 (--nproc 1)"),
    (["--ep", "0"], "-- --ep: Input should be greater than or equal to 1"),
    (["--head-dim=0"], "-- --head-dim: must be greater than 0, not 0"),
    (["--bogus", "1"], "-- --bogus: not an option of the engine"),
    # what the engine would refuse only once the run directory exists
    (["--lr", "nan"], "-- --lr: must be a finite number, not nan"),
    (["--data", "--lr", "0.1"], "-- --data: needs a value, not the flag --lr"),
    (["--resume", "latest"], "-- --resume latest: this run's checkpoint directory is new and empty"),
    (["--resume", "/nonexistent/model_000004.pt"], "-- --resume /nonexistent/model_000004.pt: no such checkpoint"),
    (["--lr", "0.01", "--lr", "0.02"], "-- --lr: given twice after --; give it once"),
    (["stray"], "-- stray: not an option of the engine"),
])
def test_engine_flags_after_dashdash_that_would_undo_what_moectl_checked_are_refused(extra, why):
    # argparse takes the last of a repeated flag: `-- --ckpt-dir /elsewhere` would win over the
    # run directory the path guard checked, `-- --device cuda` over the device gpus_idle judged.
    with pytest.raises(UsageError) as exc:
        plan(ENGINE, steps=7, extra_args=extra)
    assert exc.value.message.startswith(why), exc.value.message


def test_launch_args_of_the_engine_are_its_options_between_defaults_and_the_command_line():
    # They were dropped: the engine's command never had them, and the record said nothing.
    with_args = ENGINE.replace('module = "engine.train"\n',
                               'module = "engine.train"\nargs = ["--depth", "2", "--lr=0.05", "--steps", "3"]\n')
    p = plan(with_args)
    assert (p.options["depth"], p.options["lr"], p.options["steps"]) == (2, 0.05, 3)
    engine = p.argv[p.argv.index("engine.train") + 1:]
    assert engine.count("--depth") == 1 and engine[engine.index("--depth") + 1] == "2"
    assert engine.count("--lr") == 1 and engine[engine.index("--lr") + 1] == "0.05"
    # the command line wins over them, as over [defaults]; `--` may set one of them again
    p = plan(with_args, steps=7, extra_args=["--depth", "3"])
    assert (p.options["steps"], p.options["depth"]) == (7, 3)
    for args, why in ((["--bogus"], "[launch] args: --bogus: not an option of the engine"),
                      (["--out-dir", "x"], "[launch] args: --out-dir: not a trainer argument moectl can pass on"),
                      (["--depth"], "[launch] args: --depth: needs a value")):
        bad = ENGINE.replace('module = "engine.train"\n', f'module = "engine.train"\nargs = {args!r}\n'.replace("'", '"'))
        with pytest.raises(UsageError) as exc:
            plan(bad)
        assert exc.value.message.startswith(why), exc.value.message


def test_engine_options_after_dashdash_are_tagged_and_checked_like_run_options():
    p = plan(ENGINE, nproc=2, extra_args=["--ep", "2", "--dense"])
    assert (p.options["ep"], p.options["dense"], p.tag) == (2, True, "tiny_cap1p0_none_dense_ep2")
    assert p.argv[p.argv.index("engine.train") + 1:].count("--ep") == 1
    # Another trainer's module keeps its own flags: they pass through unjudged.
    other = ENGINE.replace('module = "engine.train"', 'module = "mylab.train"')
    p = plan(other, extra_args=["--ep", "3", "--bogus"])
    assert "ep" not in p.options and p.argv[-3:] == ["--ep", "3", "--bogus"]


def test_an_ep_from_the_config_is_refused_naming_the_config_not_a_flag():
    with pytest.raises(UsageError) as exc:
        plan(ENGINE + "ep = 3\n")
    assert exc.value.message.startswith("[defaults] ep = 3: does not divide the 4 experts (preset tiny)")


def test_ep_must_divide_the_world_size_of_every_node():
    cfg = cfg_of(ENGINE)
    request = RunRequest(device="cpu", ep=2, nproc=1)
    with pytest.raises(UsageError, match=r"--ep 2: does not divide the world size 1 \(--nproc 1\)"):
        plan_run(cfg, request, NOW, gpus_available=None)
    assert plan_run(cfg, request, NOW, gpus_available=None, nodes=2).options["ep"] == 2  # 1 process x 2 nodes
    with pytest.raises(UsageError, match=r"--ep 4: does not divide the world size 6 \(--nproc 3 x 2 nodes\)"):
        plan_run(cfg, RunRequest(device="cpu", ep=4, nproc=3), NOW, gpus_available=None, nodes=2)
    assert plan_run(cfg, request, NOW, gpus_available=None, nodes=None).tag.endswith("ep2")  # nodes unknown: not judged


@pytest.mark.parametrize("launch, missing", [
    ('script = "trian.py"', "[launch] script trian.py: no such file"),
    ('module = "scripts.nope"', "[launch] module scripts.nope: "),
])
def test_a_trainer_that_is_not_there_is_refused_by_the_venv_guard(tmp_path, monkeypatch, artifact_root, launch, missing):
    # A typo in [launch] passed every guard, made a run directory, failed, and committed a `failed` report.
    import subprocess

    repo = tmp_path / "repo"  # beside the artifact root (tmp_path/artifacts), not around it
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "train.py").write_text("print('iter 0: loss 1.0')\n")
    (repo / ".moectl.toml").write_text(f'[project]\nvenv = ""\nbranch = "*"\n[launch]\n{launch}\nlauncher = "python"\n'
                                           '[metrics]\nsource = "stdout"\nformat = "regex"\nstep = "iter (\\\\d+):"\n'
                                           '[metrics.patterns]\nloss = "loss ([\\\\d.]+)"\n')
    monkeypatch.chdir(repo)
    result = CliRunner().invoke(app, ["check", "--json", "--device", "cpu", "--override", "no_other_training"])
    venv = next(g for g in __import__("json").loads(result.stdout)["guards"] if g["name"] == "venv")
    assert result.exit_code == 3 and not venv["ok"] and venv["message"].startswith(missing), result.output
    fixed = (repo / ".moectl.toml").read_text().replace("trian.py", "train.py").replace("scripts.nope", "train")
    (repo / ".moectl.toml").write_text(fixed)
    result = CliRunner().invoke(app, ["check", "--json", "--device", "cpu", "--override", "no_other_training"])
    assert result.exit_code == 0, result.output


def test_looking_for_the_trainer_runs_none_of_its_code(tmp_path, monkeypatch, artifact_root):
    # find_spec("pkg.sub") imports pkg (its __init__ ran, writing files); `module = "train.py"` ran train.py.
    import subprocess

    repo, outside = tmp_path / "repo", tmp_path / "outside"
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (outside / "pkg").mkdir(parents=True)  # on the PYTHONPATH of a .pth, not of [launch] env: asked, not globbed
    (outside / "pkg" / "__init__.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\n")
    site = next(Path(p) for p in __import__("sys").path if p.endswith("site-packages"))
    pth = site / "moectl-test-outside.pth"
    pth.write_text(str(outside) + "\n")
    try:
        (repo / ".moectl.toml").write_text('[project]\nvenv = ""\nbranch = "*"\n[launch]\nmodule = "pkg.sub"\n'
                                           '[defaults]\npreset = "tiny"\n')
        monkeypatch.chdir(repo)
        result = CliRunner().invoke(app, ["check", "--json", "--device", "cpu", "--override", "no_other_training"])
        venv = next(g for g in __import__("json").loads(result.stdout)["guards"] if g["name"] == "venv")
        assert result.exit_code == 3 and venv["message"].startswith("[launch] module pkg.sub:"), result.output
        assert not (tmp_path / "ran").exists()  # pkg/__init__.py was not run
        (outside / "pkg" / "sub.py").write_text("")
        result = CliRunner().invoke(app, ["check", "--json", "--device", "cpu", "--override", "no_other_training"])
        assert result.exit_code == 0 and not (tmp_path / "ran").exists(), result.output
    finally:
        pth.unlink()
    (repo / ".moectl.toml").write_text('[project]\nvenv = ""\n[launch]\nmodule = "train.py"\n')
    result = CliRunner().invoke(app, ["check", "--device", "cpu"])
    assert result.exit_code == 2 and "'train.py' is a file name, not a module: use script = 'train.py'" in result.output


def test_cli_refuses_a_checkpoint_dir_outside_the_run_before_anything_is_written(tmp_path, monkeypatch, artifact_root):
    (tmp_path / ".moectl.toml").write_text(ENGINE)
    monkeypatch.chdir(tmp_path)
    outside = tmp_path / "outside"
    result = CliRunner().invoke(app, ["run", "--device", "cpu", "--steps", "3", "--no-commit", "--",
                                      "--ckpt-dir", str(outside), "--save-every", "1"])
    assert result.exit_code == 2, result.output
    assert "-- --ckpt-dir: not a trainer argument" in result.output
    assert not outside.exists() and (not artifact_root.exists() or not any(artifact_root.iterdir()))


def test_the_engine_takes_no_abbreviated_flags():
    # `--ckpt /x` must not quietly mean --ckpt-dir: moectl judges the flags by their full names.
    from engine.train import BadOptions, build_parser

    with pytest.raises(BadOptions, match="unrecognized arguments: --ckpt"):
        build_parser().parse_args(["--ckpt", "/x"])


# --------------------------------------------------------------------------- moectl init --trainer


@pytest.mark.parametrize("trainer, style, target", [("nanogpt", "nanogpt", "train.py"),
                                                    ("nanochat", "nanochat", "scripts.base_train")])
def test_init_trainer_tables_parse_that_trainers_output(tmp_path, trainer, style, target):
    import subprocess
    import sys

    from moectl.config import load_config
    from moectl.stdout_metrics import StdoutFormat, parse_text

    result = CliRunner().invoke(app, ["init", str(tmp_path), "--trainer", trainer])
    assert result.exit_code == 0, result.output
    cfg = load_config(tmp_path / ".moectl.toml")
    assert cfg.launch.target == target and cfg.metrics.source == "stdout" and cfg.launch.options["steps"]
    fixture = Path(__file__).parent / "fixtures" / "foreign_trainer.py"
    out = subprocess.run([sys.executable, str(fixture), f"--style={style}", "--max_iters=6"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    parser, steps = parse_text(out, StdoutFormat.from_config(cfg.metrics))
    assert [s.step for s in steps] == list(range(6)) and parser.warnings() == []
    assert all(s.loss and s.dt_ms and s.tok_per_sec and s.mfu for s in steps)


def test_init_engine_is_the_default_template_and_unknown_trainer_is_exit_2(tmp_path):
    from moectl.config import TEMPLATE

    assert CliRunner().invoke(app, ["init", str(tmp_path), "--trainer", "engine"]).exit_code == 0
    assert (tmp_path / ".moectl.toml").read_text() == TEMPLATE
    bad = CliRunner().invoke(app, ["init", str(tmp_path / "x"), "--trainer", "torchtitan"])
    assert bad.exit_code == 2 and "unknown trainer 'torchtitan'" in bad.output
    assert not (tmp_path / "x" / ".moectl.toml").exists()


def test_a_bad_pattern_is_one_line_naming_its_dotted_key():
    """The section's own check names the key it is about: the line reads as one dotted path, with
    no pydantic wording ("Value error, ") in it."""
    with pytest.raises(UsageError) as exc:
        parse_config_text('[metrics]\nsource = "stdout"\nformat = "regex"\nstep = "iter (\\\\d+)"\n'
                          '[metrics.patterns]\nloss = "loss [0-9.]+"\n')
    assert exc.value.lines == [".moectl.toml: metrics.patterns.loss: 'loss [0-9.]+' needs a (group) around the number it reads"]
    # every bad pattern at once, one line each, shown as the config holds it (no doubled backslashes)
    with pytest.raises(UsageError) as exc:
        parse_config_text("[metrics]\nsource = \"stdout\"\nformat = \"regex\"\nstep = 'iter (\\d+'\n"
                          "[metrics.patterns]\nloss = 'loss [\\d.]+'\ndt_ms = 'time (['\n")
    assert exc.value.lines == [
        ".moectl.toml: metrics.patterns.loss: 'loss [\\d.]+' needs a (group) around the number it reads",
        ".moectl.toml: metrics.patterns.dt_ms: not a regular expression (unterminated character set at position 6): "
        "'time (['",
        ".moectl.toml: metrics.step: not a regular expression (missing ), unterminated subpattern at position 5): "
        "'iter (\\d+'"]
