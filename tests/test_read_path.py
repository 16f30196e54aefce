"""The read path of `status` and `runs --json` (issue 8 §1): configs and run records that were
validated before are read back from the memo (moectl/validated.py) without pydantic, and what
comes back is exactly what validating them again gives. Invalid files are never remembered."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from moectl.config import (
    CONFIG_NAME, FileView, load_config, read_config, read_default_config, template_for, TRAINERS,
)
from moectl.config_schema import MoectlFile
from moectl.errors import UsageError
from moectl.records import RUN_RECORD, RunRecord, SweepLeg, SweepRecord, save_model
from moectl.runindex import scan_run_json
from moectl.store import create_run_dir, import_run, run_json, save_run, scan_runs
from engine.schema import StepMetrics

REPO = Path(__file__).resolve().parents[1]

EVERY_SECTION = """
[project]
name = "moe2"
branch = "*"
venv = "envs/py"

[paths]
artifact_root = "~/art"
report_dir = "docs/reports"
read_only = ["data", "/srv/ckpt"]
min_free_gib = 2.5

[gpu]
max_util_pct = 7
max_mem_mib = 2048
require_no_processes = false
devices = [1, 0]

[launch]
script = "train.py"
launcher = "python"
args = ["--compile=False"]
nproc_per_node = 1          # (a python launcher runs one process; more is a config error)
env = { OMP_NUM_THREADS = "4" }
compile_fallback = false

[launch.options]
steps = "--max_iters={}"
n-experts = "--n_experts={}"

[metrics]
window = 20
warmup_steps = 3
source = "stdout"
format = "regex"
step = '^iter (\\d+)'
tokens_per_step = 'tokens per iteration will be: ([\\d,]+)'

[metrics.patterns]
loss = 'loss ([\\d.]+)'

[report]
summary = false

[defaults]
preset = "tiny"
cap = 1.25
n-experts = 8
balance = "bias"
my_engine_flag = "on"

[tracking]
mlflow_uri = "sqlite:///mlflow.db"
mlflow_experiment = "moe"
wandb_project = "moe"
wandb_mode = "offline"

[cluster]
backend = "slurm"
partition = "gpu"
time = "01:30:00"
nodes = 2
gpus_per_node = 8
max_parallel = 3
extra_sbatch = ["#SBATCH --qos=high"]
"""


def _assert_same_config(view_cfg, model_cfg) -> None:
    """Every field of every section, the derived values, and the resolved paths."""
    assert isinstance(view_cfg.file, FileView)
    for section, info in MoectlFile.model_fields.items():
        model_section = getattr(model_cfg.file, section)
        view_section = getattr(view_cfg.file, section)
        for name in type(model_section).model_fields:
            assert getattr(view_section, name) == getattr(model_section, name), f"{section}.{name}"
        assert view_section.model_dump() == model_section.model_dump(mode="json"), section
    assert view_cfg.launch.target == model_cfg.launch.target
    assert view_cfg.defaults.options() == model_cfg.defaults.options()
    for attr in ("path", "root", "artifact_root", "report_dir", "read_only", "python"):
        assert getattr(view_cfg, attr) == getattr(model_cfg, attr), attr


@pytest.mark.parametrize("text", [*(template_for(t) for t in TRAINERS), EVERY_SECTION, "", "[project]\nname = 'x'\n"],
                         ids=[*TRAINERS, "every-section", "empty", "one-key"])
def test_a_config_read_back_equals_the_validated_one(tmp_path, monkeypatch, text):
    monkeypatch.delenv("MOECTL_ARTIFACT_ROOT")  # so paths.artifact_root itself is resolved and compared
    path = tmp_path / CONFIG_NAME
    path.write_text(text)
    validated = load_config(path)
    first = read_config(path)  # not seen before: validated by pydantic (and remembered)
    assert isinstance(first.file, MoectlFile)
    _assert_same_config(read_config(path), validated)  # seen before: read back


def test_the_defaults_read_back_equal_the_built_in_ones(tmp_path):
    from moectl.config import default_config

    read_default_config(tmp_path)
    _assert_same_config(read_default_config(tmp_path), default_config(tmp_path))


def test_a_view_is_read_only(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("")
    read_config(tmp_path / CONFIG_NAME)
    cfg = read_config(tmp_path / CONFIG_NAME)
    with pytest.raises(AttributeError, match="read-only"):
        cfg.project.name = "other"
    with pytest.raises(AttributeError, match="no attribute 'nmae'"):
        cfg.project.nmae  # noqa: B018


def test_an_invalid_config_gets_the_same_error_every_time_and_is_never_remembered(tmp_path, cache_dir):
    path = tmp_path / CONFIG_NAME
    path.write_text('[gpu]\nmax_util_pct = "x"\n[projcet]\nname = "a"\n')
    with pytest.raises(UsageError) as slow:
        load_config(path)
    for _ in range(2):
        with pytest.raises(UsageError) as quick:
            read_config(path)
        assert (quick.value.message, quick.value.lines) == (slow.value.message, slow.value.lines)
    assert slow.value.lines == [f"{CONFIG_NAME}: gpu.max_util_pct: Input should be a valid number",
                                f"{CONFIG_NAME}: projcet: unknown key"]
    assert not list(cache_dir.rglob("config-*.json"))


def test_an_edited_config_is_validated_again(tmp_path):
    path = tmp_path / CONFIG_NAME
    path.write_text('[project]\nname = "one"\n')
    read_config(path)
    assert read_config(path).project.name == "one"
    path.write_text('[project]\nname = "two"\n')
    assert read_config(path).project.name == "two"
    path.write_text('[project]\nname = ""\n')  # now invalid: pydantic says so, not the old memo
    with pytest.raises(UsageError, match="invalid config"):
        read_config(path)


def test_a_memo_from_other_code_or_corrupt_is_ignored(tmp_path, cache_dir):
    path = tmp_path / CONFIG_NAME
    path.write_text('[project]\nname = "real"\n')
    read_config(path)
    [memo] = cache_dir.rglob("config-*.json")
    data = json.loads(memo.read_text())
    [key] = data["entries"]
    data["entries"][key]["project"]["name"] = "forged"
    memo.write_text(json.dumps({**data, "code": "another moectl"}))
    assert read_config(path).project.name == "real"  # another code's memo: validated afresh
    memo.write_text("{not json")
    assert read_config(path).project.name == "real"
    assert isinstance(read_config(path).file, FileView)  # and remembered again


def test_an_unwritable_cache_only_costs_speed(tmp_path, monkeypatch):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    monkeypatch.setenv("MOECTL_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    path = tmp_path / CONFIG_NAME
    path.write_text('[project]\nname = "x"\n')
    for _ in range(2):
        cfg = read_config(path)
        assert isinstance(cfg.file, MoectlFile) and cfg.project.name == "x"


# ------------------------------------------------------------------------------------------ records


def _record(root: Path, id_: str, created: str, **kw) -> RunRecord:
    d = create_run_dir(root / id_)
    rec = RunRecord(id=id_, created_at=created, exp_dir=str(d), **kw)
    save_run(rec)
    return rec


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _store(root: Path) -> None:
    """A store with every kind of run a reader meets."""
    now = datetime.now().astimezone().isoformat()
    host = socket.gethostname()
    steps = [StepMetrics(step=i, loss=3.0 - i / 100, dt_ms=100.0, tok_per_sec=1000.0 + i) for i in range(30)]
    import_run(root, "moe", "imp", steps, source="/logs/a.jsonl", window=10)
    _record(root, "20260101_000000_moe-done", "2026-01-01T00:00:00+00:00", tag="done", status="completed",
            options={"cap": 1.0}, summary={"window": 50, "steps": 60, "tok_per_sec": 1234.5})
    _record(root, "20260102_000000_moe-fail", "2026-01-02T00:00:00+00:00", status="failed", error="boom")
    _record(root, "20260103_000000_moe-live", now, status="running", pid=os.getpid(), host=host, started_at=now)
    _record(root, "20260104_000000_moe-dead", now, status="running", pid=_dead_pid(), host=host, started_at=now)
    _record(root, "20260105_000000_moe-away", now, status="running", pid=1, host="another-host", started_at=now)
    sweep = create_run_dir(root / "20260106_000000_sweep")
    save_model(sweep / "sweep.json", SweepRecord(id="sw", name="cap", spec={}, legs=[SweepLeg(tag="l1")],
                                                   created_at="2026-01-06T00:00:00+00:00", exp_dir=str(sweep)))
    _record(sweep, "leg1", "2026-01-06T00:00:01+00:00", tag="l1", sweep="sw", status="completed")
    # A record written by an older moectl: only the keys it had.
    old = root / "20250101_000000_moe-old"
    old.mkdir()
    (old / RUN_RECORD).write_text(json.dumps({"id": "20250101_000000_moe-old", "status": "completed",
                                              "created_at": "2025-01-01T00:00:00", "exp_dir": "/was/elsewhere"}))
    for name, text in (("half", b'{"id": "half", "status": "runn'), ("bogus", b'{"id": "b", "status": "bogus"}'),
                       ("binary", b'{"id": "r\xff\xfe", "status": "completed"}')):
        (root / name).mkdir()
        (root / name / RUN_RECORD).write_bytes(text)


def test_records_read_back_equal_the_store(tmp_path):
    _store(tmp_path)
    cold, cold_corrupt = scan_run_json(tmp_path)  # validates (and settles the dead owner's run)
    store = scan_runs(tmp_path)
    expected = [run_json(r) for r in store.runs]
    warm, warm_corrupt = scan_run_json(tmp_path)  # from the memo
    assert cold == expected and warm == expected
    assert cold_corrupt == warm_corrupt == store.corrupt and len(store.corrupt) == 3
    by_id = {r["id"]: r for r in warm}
    assert by_id["20260104_000000_moe-dead"]["status"] == "interrupted"  # settled by the first reader
    assert by_id["20260103_000000_moe-live"]["status"] == "running"
    assert by_id["20250101_000000_moe-old"]["exp_dir"] == str((tmp_path / "20250101_000000_moe-old").resolve())
    assert by_id["20250101_000000_moe-old"]["backend"] == "local"  # an old record's missing keys: their defaults


def test_a_run_whose_owner_dies_after_it_was_remembered_is_settled(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        now = datetime.now().astimezone().isoformat()
        _record(tmp_path, "r", now, status="running", pid=proc.pid, host=socket.gethostname(), started_at=now)
        [first], _ = scan_run_json(tmp_path)
        assert first["status"] == "running"
    finally:
        proc.kill()
        proc.wait()
    [after], _ = scan_run_json(tmp_path)  # the memo holds "running": the owner check still runs
    assert after["status"] == "interrupted" and after["error"] == "interrupted (moectl was killed)"
    assert json.loads((tmp_path / "r" / RUN_RECORD).read_text())["status"] == "interrupted"


# ------------------------------------------------------------------------- whole commands, imports


def _imports(args: list[str], cwd: Path, env: dict) -> tuple[str, set[str]]:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "moectl", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, {ln.rsplit("|", 1)[1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}


def test_status_runs_and_help_read_back_without_pydantic_or_rich(project, artifact_root):
    steps = [StepMetrics(step=i, loss=3.0, dt_ms=100.0, tok_per_sec=1000.0) for i in range(20)]
    import_run(artifact_root, "moe", "one", steps)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out, modules = _imports(["status", "--json"], project, env)  # the first time: validated
    assert "pydantic" in modules
    first = {"status": json.loads(out)}
    out, modules = _imports(["runs", "--json"], project, env)  # the same config and records: remembered
    assert "pydantic" not in modules
    first["runs"] = json.loads(out)
    for args in (["status", "--json"], ["runs", "--json"], ["status"]):
        out, modules = _imports(args, project, env)
        assert "moectl.runindex" in modules  # the log is real and covers the read path
        assert not {m for m in modules if m.split(".")[0] in ("pydantic", "pydantic_core", "torch")}, args
        assert not {m for m in modules if m.split(".")[0] == "rich"}, args  # plain lines, no rich Console
        if args == ["runs", "--json"]:
            assert json.loads(out) == first["runs"]
        elif args == ["status", "--json"]:
            again = json.loads(out)
            assert again["recent_runs"] == first["status"]["recent_runs"] and again["config"] == first["status"]["config"]
    out, modules = _imports(["--help"], project, env)
    assert "Commands:" in out and "status" in out and "[bold]" not in out
    assert not {m for m in modules if m.split(".")[0] in ("pydantic", "rich", "torch")}
