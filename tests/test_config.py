"""`.moectl.toml`: defaults, discovery, path resolution, one-line-per-field errors, the template."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from moectl.config import (
    CONFIG_NAME, TEMPLATE, MoectlFile, find_config, load_config, overwrite_template, parse_config_text, write_template,
)
from moectl.errors import EXIT_USAGE, UsageError

REPO = Path(__file__).resolve().parents[1]


def write(d: Path, text: str) -> Path:
    p = d / CONFIG_NAME
    p.write_text(text)
    return p


def test_template_loads_back_to_the_defaults():
    assert parse_config_text(TEMPLATE) == MoectlFile()


def test_a_byte_order_mark_before_the_toml_is_ignored(tmp_path):
    from moectl.config import read_config

    path = tmp_path / CONFIG_NAME
    path.write_bytes(b"\xef\xbb\xbf[project]\nname = \"bom\"\n")  # as some Windows editors save it
    assert load_config(path).project.name == "bom"
    assert read_config(path).project.name == "bom" and read_config(path).project.name == "bom"


def test_repository_config_is_valid_and_uses_the_venv(monkeypatch):
    monkeypatch.delenv("MOECTL_ARTIFACT_ROOT")
    cfg = load_config(REPO / CONFIG_NAME)
    assert cfg.root == REPO
    assert cfg.python == REPO / ".venv" / "bin" / "python"
    assert cfg.artifact_root == Path("~/.cache/moectl/tmp_exp").expanduser().resolve()
    assert cfg.defaults.options() == {"preset": "tiny"}


def test_discovery_walks_up_and_resolves_relative_to_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv("MOECTL_ARTIFACT_ROOT")
    write(tmp_path, '[paths]\nartifact_root = "runs/../exp"\nread_only = ["~/data"]\n[project]\nvenv = "env"\n')
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert find_config() == tmp_path / CONFIG_NAME
    cfg = load_config()
    assert cfg.root == tmp_path
    assert cfg.artifact_root == (tmp_path / "exp").resolve()
    assert cfg.report_dir == (tmp_path / "reports").resolve()
    assert cfg.read_only == [Path.home().joinpath("data").resolve()]
    assert cfg.python == tmp_path / "env" / "bin" / "python"


def test_env_var_overrides_artifact_root(tmp_path, artifact_root):
    cfg = load_config(write(tmp_path, '[paths]\nartifact_root = "/somewhere/else"\n'))
    assert cfg.artifact_root == artifact_root.resolve()


@pytest.mark.parametrize("key", ["artifact_root", "report_dir", "read_only", "env"])
def test_a_symlink_loop_on_a_configured_path_is_a_config_error_naming_it(tmp_path, monkeypatch, key):
    # Path.resolve() raised RuntimeError on it: "internal error", exit 1, even from `status`.
    from typer.testing import CliRunner

    from moectl.cli import app

    (tmp_path / "loopA").symlink_to("loopB")
    (tmp_path / "loopB").symlink_to("loopA")
    loop = str(tmp_path / "loopA" / "x")
    if key == "env":
        monkeypatch.setenv("MOECTL_ARTIFACT_ROOT", loop)
        text, name = "", "MOECTL_ARTIFACT_ROOT"
    else:
        monkeypatch.delenv("MOECTL_ARTIFACT_ROOT", raising=False)
        text = f'[paths]\n{key} = ' + (f'["{loop}"]' if key == "read_only" else f'"{loop}"') + "\n"
        name = f"[paths] {key}"
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as e:
        load_config(path)
    assert e.value.message == f"{name} {loop!r} cannot be resolved: a symbolic link loop on it"
    assert e.value.exit_code == EXIT_USAGE
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["runs"])
    assert r.exit_code == EXIT_USAGE and "Traceback" not in r.output and "cannot be resolved" in r.stderr
    status = CliRunner().invoke(app, ["status", "--json"])  # status says it, and answers the rest: exit 0
    assert status.exit_code == 0, status.output
    assert "cannot be resolved: a symbolic link loop on it" in json.loads(status.stdout)["config_error"]


def test_empty_venv_means_the_current_interpreter(tmp_path):
    cfg = load_config(write(tmp_path, '[project]\nvenv = ""\n'))
    assert cfg.python == Path(sys.executable)


def test_no_config_found_suggests_init(tmp_path):
    with pytest.raises(UsageError) as e:
        load_config(cwd=tmp_path)
    assert "moectl init" in e.value.message and e.value.exit_code == EXIT_USAGE


def test_a_directory_named_like_the_config_is_said_not_walked_past(tmp_path):
    # A parent's config must not be used silently because the project's own is not a file.
    (tmp_path / CONFIG_NAME).write_text('[project]\nname = "parent"\n')
    (tmp_path / "sub" / CONFIG_NAME).mkdir(parents=True)
    with pytest.raises(UsageError) as e:
        load_config(cwd=tmp_path / "sub")
    assert e.value.message == f"config {tmp_path / 'sub' / CONFIG_NAME} is a directory, not a file"
    with pytest.raises(UsageError, match=r"is a directory, not a file"):
        load_config(tmp_path / "sub")  # --config DIR
    (tmp_path / "sub" / CONFIG_NAME).rmdir()
    (tmp_path / "sub" / CONFIG_NAME).symlink_to(tmp_path / "gone.toml")
    with pytest.raises(UsageError, match=r"is a link to nothing"):
        load_config(cwd=tmp_path / "sub")
    (tmp_path / "sub" / CONFIG_NAME).unlink()
    (tmp_path / "sub" / CONFIG_NAME).symlink_to("/dev/null")  # there, and no file: not "nothing"
    with pytest.raises(UsageError, match=r"is a link to /dev/null, which is not a file"):
        load_config(cwd=tmp_path / "sub")
    (tmp_path / "sub" / CONFIG_NAME).unlink()
    (tmp_path / "sub" / CONFIG_NAME).symlink_to(CONFIG_NAME)  # itself
    with pytest.raises(UsageError, match=r"is a link that cannot be followed \(Too many levels of symbolic links\)"):
        load_config(cwd=tmp_path / "sub")


@pytest.mark.parametrize(
    "text, line",
    [
        ("[gpu]\nmax_util_pct = \"high\"\n", ".moectl.toml: gpu.max_util_pct: Input should be a valid number"),
        ("[paths]\nartifact_rot = \"x\"\n", ".moectl.toml: paths.artifact_rot: unknown key"),
        ("[gpuz]\n", ".moectl.toml: gpuz: unknown key"),
        ("[gpu]\ndevices = []\n", ".moectl.toml: gpu.devices"),
        ("[launch]\nnproc_per_node = 0\n", ".moectl.toml: launch.nproc_per_node"),
        ("[metrics]\nwindow = 0\n", ".moectl.toml: metrics.window: Input should be greater than or equal to 1"),
        ("[metrics]\nwarmup_steps = -1\n", ".moectl.toml: metrics.warmup_steps: Input should be greater than or equal to 0"),
        ("[metrics]\nwarmup_steps = 2.5\n", ".moectl.toml: metrics.warmup_steps: Input should be a valid integer"),
        ("[metrics]\nwarmup_step = 5\n", ".moectl.toml: metrics.warmup_step: unknown key"),
        ("[launch]\nnproc_per_node = 5000\n", ".moectl.toml: launch.nproc_per_node: must be \"auto\" or an integer from 1 to 1024, not 5000"),
        ("[paths]\nmin_free_gib = nan\n", ".moectl.toml: paths.min_free_gib: Input should be a finite number"),
        ("[paths]\nmin_free_gib = inf\n", ".moectl.toml: paths.min_free_gib: Input should be a finite number"),
        ("[gpu]\nmax_mem_mib = -inf\n", ".moectl.toml: gpu.max_mem_mib: Input should be a finite number"),
        ("[paths]\nread_only = [\"/data\", \"\"]\n", ".moectl.toml: paths.read_only.1: String should have at least 1 character"),
        ("[defaults]\ncap = -1\n", ".moectl.toml: defaults.cap: Input should be greater than or equal to 0"),
        ("[defaults]\ncompile = \"fast\"\n", ".moectl.toml: defaults.compile: Input should be 'static', 'dynamic' or 'none'"),
        ("[defaults]\nn-experts = \"many\"\n", ".moectl.toml: defaults.n_experts: must be an integer (engine option --n-experts)"),
        ("[defaults]\nn-experts = 0\n", ".moectl.toml: defaults.n_experts: must be greater than 0 (engine option --n-experts)"),
        ("[defaults]\ndtype = \"bfloat16\"\n", ".moectl.toml: defaults.dtype: must be one of bf16, fp32 (engine option --dtype)"),
        ("[defaults]\nn_experts = 8\nn-experts = 4\n", ".moectl.toml: defaults: n_experts is given twice (n_experts and n-experts); keep one"),
        # what the kernel refuses at launch, after the run directory exists: refused here instead
        ("[launch]\nenv = { \"A=B\" = \"1\" }\n",
         ".moectl.toml: launch.env: 'A=B' is not an environment variable name (no '=', no NUL, not empty)"),
        ("[launch]\nenv = { A = \"x\\u0000y\" }\n",
         ".moectl.toml: launch.env.A: the value holds a NUL byte, which no environment variable can"),
    ],
)
def test_bad_fields_are_one_line_each(tmp_path, text, line):
    with pytest.raises(UsageError) as e:
        load_config(write(tmp_path, text))
    assert len(e.value.lines) == 1
    assert e.value.lines[0].startswith(line)


def test_warmup_steps_default_is_in_the_template_and_zero_is_allowed(tmp_path):
    assert MoectlFile().metrics.warmup_steps == 10
    assert "\nwarmup_steps = 10 " in TEMPLATE  # `moectl init` shows the knob, with its default
    assert load_config(write(tmp_path, "[metrics]\nwarmup_steps = 0\n")).metrics.warmup_steps == 0


def test_negative_warmup_steps_exits_2_with_one_line_naming_the_field(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from moectl.cli import app

    write(tmp_path, "[metrics]\nwarmup_steps = -3\n")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["runs"])
    assert r.exit_code == EXIT_USAGE and "Traceback" not in r.output
    field_lines = [ln for ln in r.stderr.splitlines() if "metrics.warmup_steps" in ln]
    assert field_lines == ["  .moectl.toml: metrics.warmup_steps: Input should be greater than or equal to 0"]


def test_several_bad_fields_give_several_lines(tmp_path):
    with pytest.raises(UsageError) as e:
        load_config(write(tmp_path, "[gpu]\nmax_util_pct = \"x\"\nmax_mem_mib = \"y\"\nbogus = 1\n"))
    assert [ln.split(": ")[1] for ln in e.value.lines] == ["gpu.max_util_pct", "gpu.max_mem_mib", "gpu.bogus"]


def test_unknown_engine_defaults_pass_through(tmp_path):
    cfg = load_config(write(tmp_path, "[defaults]\npreset = \"tiny\"\nsave-every = 10\nfp8 = true\n"))
    assert cfg.defaults.options() == {"preset": "tiny", "fp8": True, "save_every": 10}


def test_malformed_toml_names_the_line(tmp_path):
    with pytest.raises(UsageError) as e:
        load_config(write(tmp_path, "[project]\nname = \"moe\"\nbranch = = x\n"))
    assert "malformed TOML" in e.value.message and "line 3" in e.value.message
    assert e.value.lines == []


def test_write_template_refuses_to_overwrite(tmp_path):
    path = write_template(tmp_path)
    assert path.read_text() == TEMPLATE
    before = os.stat(path).st_mtime_ns
    with pytest.raises(UsageError):
        write_template(tmp_path)
    assert os.stat(path).st_mtime_ns == before


def test_overwrite_template_backs_up_first_and_refuses_a_directory(tmp_path):
    assert overwrite_template(tmp_path) == (tmp_path / CONFIG_NAME, None)  # nothing to back up
    (tmp_path / CONFIG_NAME).write_text("edited\n")
    path, backup = overwrite_template(tmp_path)
    assert backup == tmp_path / f"{CONFIG_NAME}.bak" and backup.read_text() == "edited\n"
    assert path.read_text() == TEMPLATE
    odd = tmp_path / "odd"
    (odd / CONFIG_NAME).mkdir(parents=True)
    with pytest.raises(UsageError, match="is a directory"):
        overwrite_template(odd)
    assert os.listdir(odd) == [CONFIG_NAME]  # no backup of a directory


def test_cluster_table_defaults_to_local_and_validates_each_key():
    assert MoectlFile().cluster.backend == "local" and MoectlFile().cluster.nodes == 1
    ok = parse_config_text('[cluster]\nbackend = "slurm"\npartition = "gpu"\naccount = "team"\ntime = "1-02:00:00"\n'
                           'nodes = 2\ngpus_per_node = 8\ncpus_per_task = 16\nmax_parallel = 3\nrdzv_port = 29400\n'
                           'extra_sbatch = ["#SBATCH --qos=high", "--exclusive"]\n').cluster
    assert (ok.backend, ok.partition, ok.time, ok.nodes, ok.max_parallel, ok.rdzv_port) == \
        ("slurm", "gpu", "1-02:00:00", 2, 3, 29400)
    assert ok.extra_sbatch == ["--qos=high", "--exclusive"]
    # what sbatch takes too: no time limit, and a list of partitions (the first that can run it)
    more = parse_config_text('[cluster]\npartition = "gpu,debug"\ntime = "UNLIMITED"\n').cluster
    assert (more.partition, more.time) == ("gpu,debug", "UNLIMITED")
    bad = {
        'backend = "pbs"': "cluster.backend",
        "nodes = 0": "cluster.nodes",
        'time = "2h"': "cluster.time",
        'time = "forever"': "cluster.time",
        'partition = "gpu,"': "cluster.partition",
        'partition = "gpu debug"': "cluster.partition",
        "max_parallel = 0": "cluster.max_parallel",
        "rdzv_port = 80": "cluster.rdzv_port",
        "rdzv_port = 64537": "cluster.rdzv_port",  # a job meets at rdzv_port + (job id mod 1000) <= 65535
        'extra_sbatch = ["qos=high"]': "cluster.extra_sbatch",
        "queue = 1": "cluster.queue: unknown key",
    }
    for line, named in bad.items():
        with pytest.raises(UsageError) as err:
            parse_config_text(f"[cluster]\n{line}\n")
        assert len(err.value.lines) == 1 and named in err.value.lines[0], (line, err.value.lines)


def test_a_relative_artifact_root_from_the_environment_is_the_same_store_from_every_subdirectory(tmp_path, monkeypatch):
    config = write(tmp_path, '[paths]\nartifact_root = "/somewhere/else"\n')
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    monkeypatch.setenv("MOECTL_ARTIFACT_ROOT", "relart")
    roots = set()
    for cwd in (tmp_path, tmp_path / "sub", tmp_path / "sub" / "deeper"):
        monkeypatch.chdir(cwd)
        roots.add(load_config(config).artifact_root)
    assert roots == {(tmp_path / "relart").resolve()}  # one run store, one run lock


# ------------------------------------------------------------------ strict types (audit finding 1)

@pytest.mark.parametrize("text, field", [
    ("[launch]\nnproc_per_node = true\n", "launch.nproc_per_node"),
    ("[launch]\nnproc_per_node = \"4\"\n", "launch.nproc_per_node"),
    ("[launch]\nnproc_per_node = \"four\"\n", "launch.nproc_per_node"),  # was one line per Union member
    ("[launch]\ncompile_fallback = \"yes\"\n", "launch.compile_fallback"),
    ("[gpu]\nmax_util_pct = true\n", "gpu.max_util_pct"),
    ("[gpu]\nrequire_no_processes = \"off\"\n", "gpu.require_no_processes"),
    ("[gpu]\nmax_mem_mib = \"1024\"\n", "gpu.max_mem_mib"),
    ("[gpu]\ndevices = [1.0]\n", "gpu.devices"),
    ("[gpu]\ndevices = [\"0\"]\n", "gpu.devices"),
    ("[gpu]\ndevices = [true]\n", "gpu.devices"),
    ("[gpu]\ndevices = \"some\"\n", "gpu.devices"),
    ("[metrics]\nwindow = \"50\"\n", "metrics.window"),
    ("[metrics]\nwindow = 50.0\n", "metrics.window"),
    ("[defaults]\nsteps = \"20\"\n", "defaults.steps"),
    ("[defaults]\nsteps = true\n", "defaults.steps"),
    ("[defaults]\nfp8 = \"yes\"\n", "defaults.fp8"),
    ("[defaults]\ncap = true\n", "defaults.cap"),
    ("[report]\nsummary = \"false\"\n", "report.summary"),
    ("[cluster]\nnodes = \"2\"\n", "cluster.nodes"),
    ("[project]\nname = 7\n", "project.name"),
    ("[paths]\nmin_free_gib = \"1\"\n", "paths.min_free_gib"),
])
def test_a_wrong_type_is_an_error_never_coerced(tmp_path, text, field):
    with pytest.raises(UsageError) as e:
        load_config(write(tmp_path, text))
    assert e.value.exit_code == EXIT_USAGE
    assert len(e.value.lines) == 1 and e.value.lines[0].startswith(f".moectl.toml: {field}: "), e.value.lines


def test_a_number_field_takes_an_integer_and_the_right_types_still_load(tmp_path):
    cfg = load_config(write(tmp_path, "[gpu]\nmax_util_pct = 7\nmax_mem_mib = 512\nrequire_no_processes = false\n"
                                      "devices = [1, 0]\n[launch]\nnproc_per_node = 2\n[defaults]\ncap = 1\n"
                                      "steps = 20\nfp8 = true\n[paths]\nmin_free_gib = 2\n"))
    assert (cfg.gpu.max_util_pct, cfg.gpu.max_mem_mib, cfg.gpu.require_no_processes, cfg.gpu.devices) == \
        (7.0, 512.0, False, [1, 0])
    assert cfg.launch.nproc_per_node == 2 and cfg.paths.min_free_gib == 2.0
    assert cfg.defaults.options() == {"cap": 1.0, "steps": 20, "fp8": True}


def test_a_wrong_type_through_the_cli_exits_2_and_writes_nothing(project, artifact_root):
    from typer.testing import CliRunner

    from moectl.cli import app

    (project / CONFIG_NAME).write_text('[project]\nname = "moe"\nbranch = "main"\nvenv = ""\n'
                                       '[gpu]\nrequire_no_processes = "off"\n')
    r = CliRunner().invoke(app, ["run", "--steps", "2", "--device", "cpu"])
    assert r.exit_code == EXIT_USAGE and "Traceback" not in r.output
    assert "  .moectl.toml: gpu.require_no_processes: Input should be a valid boolean" in r.stderr.splitlines()
    assert not artifact_root.exists()


# --------------------------------------------------------- [defaults] keys and values (finding 2)

@pytest.mark.parametrize("text, field, says", [
    ("bogus_key = 3\n", "defaults.bogus_key", "unknown engine option (known: preset, depth,"),
    ("[defaults.foo]\nx = 1\n", "defaults.foo", "unknown engine option"),
    ("lr = [1, 2]\n", "defaults.lr", "must be one string, number or true/false"),
    ("lr = 1979-05-27\n", "defaults.lr", "must be one string, number or true/false"),
    ("lr = \"0.1\"\n", "defaults.lr", "must be a number (engine option --lr)"),
    ("save-every = 2.5\n", "defaults.save_every", "must be an integer (engine option --save-every)"),
    ("fp8-dense = \"yes\"\n", "defaults.fp8_dense", "must be true or false"),
    ("out-dir = \"/tmp/x\"\n", "defaults.out_dir", "set by moectl for every run"),
    ("lr = nan\n", "defaults.lr", "must be a finite number (engine option --lr)"),  # TOML has nan and inf
    ("cap = inf\n", "defaults.cap", "Input should be a finite number"),  # moectl's own options too
    ("balance_rate = inf\n", "defaults.balance_rate", "Input should be a finite number"),
])
def test_engine_defaults_are_engine_options_with_one_value_each(tmp_path, text, field, says):
    with pytest.raises(UsageError) as e:
        load_config(write(tmp_path, "[defaults]\n" + text))
    assert len(e.value.lines) == 1 and e.value.lines[0].startswith(f".moectl.toml: {field}: {says}"), e.value.lines


def test_engine_defaults_accept_every_engine_option_in_either_spelling(tmp_path):
    cfg = load_config(write(tmp_path, "[defaults]\nlr = 1\nwarmdown-frac = 0.1\ndata = \"synthetic\"\n"
                                      "fp8_dense = true\nz-coeff = 0.001\n"))
    assert cfg.defaults.options() == {"lr": 1, "warmdown_frac": 0.1, "data": "synthetic", "fp8_dense": True,
                                      "z_coeff": 0.001}


def test_every_bad_defaults_key_is_its_own_line_beside_the_other_sections(tmp_path):
    with pytest.raises(UsageError) as e:
        load_config(write(tmp_path, "[gpu]\nmax_util_pct = \"x\"\n[defaults]\nbogus = 1\nlr = [1]\nsteps = \"2\"\n"))
    assert [ln.split(": ")[1] for ln in e.value.lines] == ["gpu.max_util_pct", "defaults.steps", "defaults.bogus",
                                                           "defaults.lr"]


def test_another_trainers_defaults_are_its_own_keys_but_still_one_value_each(tmp_path):
    mapped = '[launch]\nmodule = "scripts.base_train"\n[launch.options]\nsteps = "--num_iterations={}"\n' \
             'depth = "--depth={}"\n'
    cfg = load_config(write(tmp_path, mapped + "[defaults]\ndepth = 12\n"))
    assert cfg.defaults.options() == {"depth": 12}
    for trainer in ('[launch]\nscript = "train.py"\n', '[launch]\nmodule = "my.trainer"\n'):
        cfg = load_config(write(tmp_path, trainer + "[defaults]\nmy_flag = \"on\"\n"))
        assert cfg.defaults.options() == {"my_flag": "on"}
        with pytest.raises(UsageError) as e:
            load_config(write(tmp_path, trainer + "[defaults]\nmy_flag = [1, 2]\n"))
        assert len(e.value.lines) == 1 and "defaults.my_flag: must be one string, number or true/false" in e.value.lines[0]


def test_a_bad_engine_default_exits_2_before_the_run_directory_exists(project, artifact_root):
    from typer.testing import CliRunner

    from moectl.cli import app

    (project / CONFIG_NAME).write_text('[project]\nname = "moe"\nbranch = "main"\nvenv = ""\n'
                                       '[defaults]\npreset = "tiny"\nbogus_key = 3\n')
    for command in (["check"], ["run", "--steps", "2", "--device", "cpu", "--no-commit"]):
        r = CliRunner().invoke(app, command)
        assert r.exit_code == EXIT_USAGE and "Traceback" not in r.output, (command, r.output)
        assert any(ln.startswith("  .moectl.toml: defaults.bogus_key: unknown engine option")
                   for ln in r.stderr.splitlines()), r.stderr
    assert not artifact_root.exists()


def test_engine_options_match_the_engines_parser():
    import argparse

    from engine.schema import ENGINE_OPTIONS
    from engine.train import build_parser  # imports torch: fine in a test, never in moectl
    from moectl.config_schema import DefaultsSection

    parsed = {}
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.nargs in (None, 0)  # at most one value: [defaults] lists are refused for it
            parsed[action.dest] = bool if isinstance(action, argparse._StoreTrueAction) else (action.type or str)
    assert parsed == ENGINE_OPTIONS
    assert set(DefaultsSection.model_fields) <= set(ENGINE_OPTIONS)  # the typed ones are engine options too


# ------------------------------------------------------------ project.name is a path part (finding 3)

@pytest.mark.parametrize("name", ["team/moe", "x/../../../../tmp/evil", "..", "a b", ".hidden", "moe_"])
def test_project_name_must_be_usable_in_a_directory_name(tmp_path, name):
    with pytest.raises(UsageError) as e:
        load_config(write(tmp_path, f'[project]\nname = "{name}"\n'))
    assert e.value.lines == [f".moectl.toml: project.name: {name!r} is not usable in a directory name "
                             "(use letters, digits, . _ -)"]


def test_project_names_that_are_one_path_part_still_load(tmp_path):
    for name in ("moe", "moe-v2.1", "MoE_2"):
        assert load_config(write(tmp_path, f'[project]\nname = "{name}"\n')).project.name == name


@pytest.mark.parametrize("name", ["team/moe", "x/../../../../tmp/evil"])
def test_a_project_name_with_a_slash_exits_2_and_writes_nothing(project, artifact_root, name):
    from typer.testing import CliRunner

    from moectl.cli import app

    (project / CONFIG_NAME).write_text(f'[project]\nname = "{name}"\nbranch = "main"\nvenv = ""\n')
    r = CliRunner().invoke(app, ["run", "--steps", "2", "--device", "cpu", "--no-commit"])
    assert r.exit_code == EXIT_USAGE and "project.name" in r.stderr, r.output
    assert not artifact_root.exists()


# -------------------------------------------------------------------- [launch.options] (finding 4)

def test_launch_options_keys_are_options_moectl_can_hand_a_trainer(tmp_path):
    from moectl.trainer import MAPPABLE

    head = '[launch]\nmodule = "scripts.base_train"\n[launch.options]\nsteps = "--num_iterations={}"\n'
    with pytest.raises(UsageError) as e:
        load_config(write(tmp_path, head + 'stesp = "--max_iters={}"\n'))
    assert e.value.lines == [f".moectl.toml: launch.options.stesp: unknown option (known: {', '.join(MAPPABLE)}, "
                             "or a key of [defaults])"]
    # Every option moectl hands a trainer may be mapped, and so may a [defaults] key (either spelling).
    every = "".join(f'{k} = "--{k}={{}}"\n' for k in MAPPABLE)
    cfg = load_config(write(tmp_path, '[launch]\nscript = "t.py"\n[launch.options]\n' + every +
                            'n-layers = "--n_layer={}"\n[defaults]\nn_layers = 4\n'))
    assert set(cfg.launch.options) == {*MAPPABLE, "n_layers"}
    assert all(f" {k}" in TEMPLATE.split("[launch.options]")[1].split("[metrics]")[0] for k in MAPPABLE)
    # A template that cannot be split into arguments (a stray quote) is its key's problem, found
    # when the config is read (it passed `check` and failed a run with "No closing quotation").
    with pytest.raises(UsageError) as e:
        load_config(write(tmp_path, head + "cap = \"--x='{}\"\n"))
    assert e.value.lines == [".moectl.toml: launch.options.cap: \"--x='{}\" cannot be split into arguments: "
                             "No closing quotation"]


def test_an_unmapped_option_names_the_config_file_given(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from moectl.cli import app

    (tmp_path / "o.toml").write_text('[project]\nvenv = ""\n[launch]\nscript = "t.py"\n'
                                     '[launch.options]\nsteps = "--max_iters={}"\n')
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["check", "--config", "o.toml", "--cap", "1.0"])
    assert r.exit_code == EXIT_USAGE, r.output
    assert "under [launch.options] in o.toml" in r.stderr and ".moectl.toml" not in r.stderr, r.stderr


# ------------------------------------------------------------------------- the memo (validated.py)

def test_the_memo_fingerprint_covers_every_module_that_validates_a_config():
    """A memo entry is trusted while the code fingerprint is unchanged; the fingerprint reads only
    moectl/*.py, engine/schema.py and engine/config.py, so validating must import nothing else of ours."""
    import subprocess

    code = ("import sys; import moectl.config_schema, moectl.config as c; c.parse_config_text('');"
            "print('\\n'.join(m.__file__ for n, m in list(sys.modules.items()) "
            "if n.split('.')[0] in ('moectl', 'engine') and getattr(m, '__file__', None)))")
    files = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    from moectl.validated import _ENGINE_CONFIG, _ENGINE_SCHEMA, _MOECTL_DIR

    for f in files:
        p = Path(f).resolve()
        assert p.parent == _MOECTL_DIR or p in (_ENGINE_SCHEMA.resolve(), _ENGINE_CONFIG.resolve(),
                                                (REPO / "engine" / "__init__.py").resolve()), p
