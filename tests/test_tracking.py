"""Runs mirrored to MLflow and Weights & Biases (issue 8 §3): real trackers, real runs.

MLflow: a real `mlflow server` (sqlite backend) on 127.0.0.1, started once for this module and read
back through `MlflowClient`. W&B: offline mode, read back with wandb's own reader of its `.wandb`
run files (`wandb.sdk.internal.datastore`). Runs are real `python -m moectl run` subprocesses
driving the fake engine through torchrun, or `moectl import`ed logs.

No traffic leaves 127.0.0.1: the trackers' telemetry and error reporting are off (TRACKER_ENV),
W&B runs offline with its base URL on a closed local port as a safety net, proxies are bypassed,
and every MLflow URI is the local server, a closed local port, or a local store.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from engine.schema import StepMetrics, parse_line
from moectl.config import parse_config_text
from moectl.errors import UsageError
from moectl.tracking import STEP_KEYS, wandb_run_id
from tests.conftest import git, steps_written, wait_for
from tests.slurm_fixtures import free_port, free_ports
from tests.test_run import FAKE, QUIET, REPO

TRACKER_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "WANDB_ERROR_REPORTING": "false",
    "WANDB_MODE": "offline", "WANDB_SILENT": "true", "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost", "WANDB_BASE_URL": "http://127.0.0.1:9",
}
SERVER_START_S = 180.0  # `mlflow server` imports a lot; a loaded 2-core machine needs a while
MIRROR_GAVE_UP_S = 15.0  # a dead MLflow server: import + one refused request (unbounded: minutes)


@pytest.fixture(autouse=True)
def tracker_env(tmp_path, monkeypatch):
    for key, value in TRACKER_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("WANDB_API_KEY", "WANDB_DIR", "MLFLOW_TRACKING_URI", "HTTP_PROXY", "HTTPS_PROXY",
                "http_proxy", "https_proxy"):
        monkeypatch.delenv(key, raising=False)
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # never the real home
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / key.lower()))


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, proxied artifacts) on a free local port."""
    home = tmp_path_factory.mktemp("mlflow-server")
    port = free_ports()  # (below the ephemeral range: the server binds it seconds from now)
    env = {**os.environ, **TRACKER_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = home / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{home}/mlflow.db", "--artifacts-destination", str(home / "artifacts")],
            cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    local = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def healthy() -> bool:
        try:
            return local.open(url + "/health", timeout=2).read().strip() == b"OK"
        except OSError:
            return False

    try:
        wait_for(healthy, "the mlflow server answering /health", timeout=SERVER_START_S, proc=proc,
                 output=lambda: log_path.read_text(), poll_s=0.25)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


class SilentServer:
    """A local port that accepts connections and never answers: a hung tracker (the one network
    failure that is simulated). `connections` counts what reached it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.held.append(conn)

    @property
    def connections(self) -> int:
        return len(self.held)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture(scope="module")
def silent_server():
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def tracked_project(repo: Path, monkeypatch, tracking: str) -> Path:
    """A committed .moectl.toml running the fake engine from this checkout, plus `[tracking]`."""
    (repo / ".moectl.toml").write_text(
        '[project]\nname = "moe"\nbranch = "main"\nvenv = ""\n\n'
        f'[launch]\nmodule = "{FAKE}"\nenv = {{ PYTHONPATH = "{REPO}", OMP_NUM_THREADS = "1" }}\n\n'
        '[defaults]\npreset = "tiny"\n\n'
        f'[tracking]\n{tracking}\n'
    )
    git(repo, "add", ".moectl.toml")
    git(repo, "commit", "-q", "-m", "moectl config")
    monkeypatch.chdir(repo)
    return repo


def set_tracking(repo: Path, tracking: str) -> None:
    """Point the (committed) config at other trackers; left uncommitted, as a person would."""
    cfg = repo / ".moectl.toml"
    text = cfg.read_text()
    cfg.write_text(text[: text.index("[tracking]")] + f"[tracking]\n{tracking}\n")


def moectl(repo: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m moectl ARGS` in `repo`, as a person would type it (env from the fixtures)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "moectl", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def record_of(artifact_root: Path, run_id: str) -> dict:
    return json.loads((artifact_root / run_id / "run.json").read_text())


def steps_of(run_dir: Path) -> list[StepMetrics]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = parse_line(line)
        if isinstance(rec, StepMetrics):
            out.append(rec)
    return out


def the_mlflow_run(uri: str, run_id: str, experiment: str = "moe"):
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    found = c.search_runs([exp.experiment_id], filter_string=f"tags.moectl_run_id = '{run_id}'")
    assert len(found) == 1, f"{len(found)} MLflow runs carry moectl_run_id {run_id}"
    return c, found[0]


def histories(c, mlflow_run) -> dict[str, list[tuple[int, float]]]:
    return {key: sorted((m.step, m.value) for m in c.get_metric_history(mlflow_run.info.run_id, key))
            for key in mlflow_run.data.metrics}


def assert_steps_mirrored(hist: dict, steps: list[StepMetrics]) -> None:
    for key in STEP_KEYS:
        expected = [(s.step, float(getattr(s, key))) for s in steps if getattr(s, key) is not None]
        if expected:
            assert hist.get(key) == expected, key  # float64 all the way: exact
    assert len(hist["loss"]) == len(steps) > 0


def wandb_records(offline_dir: Path) -> list:
    """Every record of an offline W&B run, read with wandb's own datastore reader."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    [path] = offline_dir.glob("run-*.wandb")
    store = DataStore()
    store.open_for_scan(str(path))
    out = []
    while (data := store.scan_data()) is not None:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        out.append(rec)
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_view(offline_dir: Path) -> dict:
    """The run, its config, its history rows by step, its final summary and its artifacts."""
    view = {"run": None, "config": {}, "history": {}, "summary": {}, "artifacts": []}
    for rec in wandb_records(offline_dir):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            view["run"] = rec.run
            view["config"].update({_key(i): json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in rec.history.item}
            view["history"][row["_step"]] = row
        elif kind == "summary":
            view["summary"].update({_key(i): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "artifact":
            view["artifacts"].append(rec.artifact)
    return view


def offline_dirs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


# ------------------------------------------------------------------------------------- the config


@pytest.mark.parametrize("toml, line", [
    ('wandb_mode = "sometimes"', "tracking.wandb_mode: Input should be 'online' or 'offline'"),
    ("mlflow_url = 'http://127.0.0.1:5000'", "tracking.mlflow_url: unknown key"),
    ("mlflow_uri = 'http://'", "tracking.mlflow_uri: 'http://' names no host"),
    ("mlflow_uri = 5000", "tracking.mlflow_uri: Input should be a valid string"),
    ("wandb_project = 'a/b'", "tracking.wandb_project: must not contain /"),
    ("mlflow_experiment = 'moe'", "tracking: mlflow_experiment is set but mlflow_uri is not"),
    ("wandb_entity = 'team'", "tracking: wandb_entity is set but wandb_project is not"),
    ("mlflow_uri = '   '", "tracking.mlflow_uri: '   ': blank"),
    ("wandb_project = ' moe'", "tracking.wandb_project: ' moe': blank, or with spaces around it"),
    ("mlflow_uri = 'ftp://host/x'", "tracking.mlflow_uri: 'ftp://host/x': MLflow cannot track to ftp://"),
    ("mlflow_uri = 'file://mlr'", "tracking.mlflow_uri: 'file://mlr' names the host 'mlr'"),
    ("mlflow_uri = 'file:'", "tracking.mlflow_uri: 'file:' names no directory"),
    # Values MLflow refuses at every mirror (a warning per run, forever): refused once, here.
    ("mlflow_uri = 'http://127.0.0.1:99999'", "tracking.mlflow_uri: 'http://127.0.0.1:99999': the port is not a number"),
    ("mlflow_uri = 'http://127.0.0.1:abc'", "tracking.mlflow_uri: 'http://127.0.0.1:abc': the port is not a number"),
    ("mlflow_uri = 'sqlite://relative.db'", "tracking.mlflow_uri: 'sqlite://relative.db': a sqlite store is sqlite:///FILE"),
    ("mlflow_uri = 'sqlite:///'", "tracking.mlflow_uri: 'sqlite:///' names no database file"),
    # ... and values that would silently be a directory store of that name in the repository
    ("mlflow_uri = 'localhost:5000'", "tracking.mlflow_uri: 'localhost:5000' reads as a server without its scheme: "
                                      "write http://localhost:5000"),
    ("mlflow_uri = 'sqlite:mlflow.db'", "tracking.mlflow_uri: 'sqlite:mlflow.db': sqlite: without //"),
    ("mlflow_uri = 'databricks'", "tracking.mlflow_uri: 'databricks' is Databricks to MLflow but would be a directory"),
])
def test_a_bad_tracking_key_is_one_line_naming_it(toml, line):
    with pytest.raises(UsageError) as err:
        parse_config_text(f"[tracking]\n{toml}\n")
    assert len(err.value.lines) == 1 and err.value.lines[0].startswith(f".moectl.toml: {line}"), err.value.lines


@pytest.mark.parametrize("uri", ["databricks://my-scope:my-prefix", "databricks://profile", "databricks-uc://profile",
                                 "http://127.0.0.1:5000", "postgresql://u:p@db:5432/mlflow", "sqlite:///mlflow.db"])
def test_tracking_uris_mlflow_takes_are_accepted(uri):
    # (Databricks' secret-scope form has a `:` where a URL's port goes: not a port to check)
    assert parse_config_text(f"[tracking]\nmlflow_uri = '{uri}'\n").tracking.mlflow_uri == uri


def test_sync_with_a_bad_tracking_table_exits_2_with_that_line(git_repo, monkeypatch):
    tracked_project(git_repo, monkeypatch, 'wandb_mode = "sometimes"\nwandb_project = "moe"')
    r = moectl(git_repo, "sync")
    assert r.returncode == 2, r.stderr
    assert "tracking.wandb_mode: Input should be 'online' or 'offline'" in r.stderr
    assert "Traceback" not in r.stderr
    set_tracking(git_repo, 'mlflow_uri = "http://127.0.0.1:99999"')
    r = moectl(git_repo, "sync", "--dry-run")  # not a plan that every mirror then fails
    assert r.returncode == 2 and "tracking.mlflow_uri: 'http://127.0.0.1:99999': the port" in r.stderr, r.stderr


def test_sync_without_a_tracker_says_how_to_configure_one(project):
    r = moectl(project, "sync")
    assert r.returncode == 2 and "no tracker configured: set mlflow_uri or wandb_project" in r.stderr


def test_init_template_shows_every_tracking_key(tmp_path):
    r = moectl(tmp_path, "init")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / ".moectl.toml").read_text()
    for key in ("mlflow_uri", "mlflow_experiment", "wandb_project", "wandb_entity", "wandb_mode"):
        assert f"# {key} = " in text, key


def test_wandb_run_id_is_derived_from_the_moectl_run_id():
    a = wandb_run_id("20260101_000000_moe-a")
    assert a == wandb_run_id("20260101_000000_moe-a") != wandb_run_id("20260101_000000_moe-b")
    assert a.startswith("moectl-") and len(a) <= 64 and a.replace("-", "").isalnum()


@pytest.mark.parametrize("args", [("status", "--json"), ("runs", "--json"), ("sync", "--help")])
def test_commands_never_import_the_trackers(git_repo, monkeypatch, args):
    tracked_project(git_repo, monkeypatch, 'mlflow_uri = "http://127.0.0.1:9"\nwandb_project = "moe"')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "moectl", *args], cwd=git_repo, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    modules = [ln.rsplit("|", 1)[1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")]
    assert "moectl.cli" in modules  # the import log is real
    heavy = [m for m in modules if m.split(".")[0] in ("mlflow", "wandb", "torch")]
    assert not heavy, heavy[:5]


# --------------------------------------------------------------------------- runs, as they end


def test_a_run_is_mirrored_to_mlflow_and_wandb_when_it_ends(git_repo, monkeypatch, artifact_root, mlflow_server):
    tracked_project(git_repo, monkeypatch,
            f'mlflow_uri = "{mlflow_server}"\nmlflow_experiment = "ends"\n'
            'wandb_project = "moe"\nwandb_mode = "offline"')
    head = git(git_repo, "rev-parse", "HEAD").strip()
    r = moectl(git_repo, "run", "--steps", "12", "--tag", "mirrored", *QUIET, "--json", "--", "--sleep-per-step", "0.01")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # tracker chatter never reaches stdout: still one JSON object
    run_id, run_dir = out["id"], Path(out["exp_dir"])
    steps = steps_of(run_dir)
    assert out["status"] == "completed" and len(steps) == 12
    assert out["tracking"]["mlflow"]["status"] == "mirrored", out["tracking"]
    assert out["tracking"]["wandb"]["status"] == "mirrored", out["tracking"]
    assert record_of(artifact_root, run_id)["tracking"] == out["tracking"]

    # MLflow, read back from the server
    c, mr = the_mlflow_run(mlflow_server, run_id, "ends")
    assert mr.info.run_id == out["tracking"]["mlflow"]["run_id"] and mr.info.status == "FINISHED"
    hist = histories(c, mr)
    assert_steps_mirrored(hist, steps)
    assert hist["tail/tok_per_sec"] == [(11, pytest.approx(out["summary"]["tok_per_sec"]))]
    params, tags = mr.data.params, mr.data.tags
    assert params["preset"] == "tiny" and params["options.preset"] == "tiny" and params["options.steps"] == "12"
    assert params["engine.fake"] == "true"  # the engine's resolved config (the fake engine reports {"fake": true})
    assert params["tail_window"] == str(out["summary"]["window"])
    assert tags["moectl_run_id"] == run_id and tags["moectl_tag"] == "mirrored" and tags["moectl_status"] == "completed"
    assert tags["git_commit"] == head and tags["git_branch"] == "main" and tags["git_dirty"] == "false"
    assert tags["host"] == socket.gethostname()
    files = {a.path for a in c.list_artifacts(mr.info.run_id, "moectl")}
    assert files == {"moectl/report.md", "moectl/command.txt", "moectl/git.diff"}
    report = Path(c.download_artifacts(mr.info.run_id, "moectl/report.md", str(git_repo.parent)))
    assert report.read_text() == Path(out["report"]).read_text()

    # W&B, read back from its offline run file
    [offline] = offline_dirs(run_dir)
    assert out["tracking"]["wandb"]["location"] == str(offline)
    view = wandb_view(offline)
    assert view["run"].run_id == wandb_run_id(run_id) and view["run"].display_name == run_id
    assert view["run"].project == "moe" and "mirrored" in view["run"].tags
    assert view["config"]["preset"] == "tiny" and view["config"]["options"]["steps"] == 12
    assert view["config"]["moectl"]["run_id"] == run_id and view["config"]["moectl"]["git_commit"] == head
    assert sorted(view["history"]) == [s.step for s in steps]
    assert [view["history"][s.step]["loss"] for s in steps] == pytest.approx([s.loss for s in steps])
    assert view["summary"]["tail/tok_per_sec"] == pytest.approx(out["summary"]["tok_per_sec"])
    [art] = view["artifacts"]
    assert {e.path for e in art.manifest.contents} == {"report.md", "command.txt", "git.diff"}

    # Syncing it again finds both copies and adds nothing
    r = moectl(git_repo, "sync", run_id, "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["tracker"]: row for row in json.loads(r.stdout)}
    assert rows["mlflow"]["added"] == {"params": 0, "metric_points": 0, "files": 0}
    assert rows["mlflow"]["run_id"] == mr.info.run_id
    assert rows["wandb"]["added"] == {} and "already written" in rows["wandb"]["note"]
    c, again = the_mlflow_run(mlflow_server, run_id, "ends")
    assert histories(c, again) == hist and again.data.params == params
    assert offline_dirs(run_dir) == [offline]


def test_failed_and_interrupted_runs_are_mirrored_with_their_status(git_repo, monkeypatch, artifact_root,
                                                                    mlflow_server, tmp_path):
    tracked_project(git_repo, monkeypatch, f'mlflow_uri = "{mlflow_server}"\nmlflow_experiment = "ends"')
    r = moectl(git_repo, "run", "--steps", "20", "--tag", "broken", *QUIET, "--json", "--",
               "--sleep-per-step", "0.01", "--fail-at-step", "4")
    assert r.returncode == 4, r.stderr
    failed = json.loads(r.stdout)
    assert failed["status"] == "failed" and failed["tracking"]["mlflow"]["status"] == "mirrored"
    c, mr = the_mlflow_run(mlflow_server, failed["id"], "ends")
    assert mr.info.status == "FAILED" and mr.data.tags["moectl_status"] == "failed"
    assert_steps_mirrored(histories(c, mr), steps_of(Path(failed["exp_dir"])))

    out = tmp_path / "interrupted.out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(out, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "moectl", "run", "--steps", "500", "--tag", "stopped", *QUIET,
                                 "--json", "--", "--sleep-per-step", "0.05"], cwd=git_repo, env=env,
                                stdout=fh, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        wait_for(lambda: any(len(steps_written(p)) >= 3 for p in artifact_root.glob("*stopped/metrics.jsonl")),
                 "the run reaching 3 steps", timeout=120, proc=proc, output=lambda: proc.stderr.read())
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 130, err
    stopped = json.loads(out.read_text())
    assert stopped["status"] == "interrupted" and stopped["tracking"]["mlflow"]["status"] == "mirrored", err
    c, mr = the_mlflow_run(mlflow_server, stopped["id"], "ends")
    assert mr.info.status == "KILLED"
    assert_steps_mirrored(histories(c, mr), steps_of(Path(stopped["exp_dir"])))


def test_every_leg_of_a_sweep_is_mirrored_with_its_sweep(git_repo, monkeypatch, artifact_root, mlflow_server):
    tracked_project(git_repo, monkeypatch, f'mlflow_uri = "{mlflow_server}"\nmlflow_experiment = "swept"')
    spec = git_repo / "spec.toml"
    spec.write_text('name = "pair"\n[common]\nsteps = 5\nargs = ["--sleep-per-step", "0.01"]\n'
                    '[[legs]]\ntag = "left"\n[[legs]]\ntag = "right"\n')
    r = moectl(git_repo, "sweep", str(spec), "--json", *QUIET)
    assert r.returncode == 0, r.stderr
    sweep = json.loads(r.stdout)["sweep"]
    assert [leg["state"] for leg in sweep["legs"]] == ["completed", "completed"]
    for leg in sweep["legs"]:
        c, mr = the_mlflow_run(mlflow_server, leg["run_id"], "swept")
        assert mr.data.tags["moectl_sweep"] == sweep["id"] and mr.data.tags["moectl_tag"] == leg["tag"]
        assert_steps_mirrored(histories(c, mr), steps_of(Path(sweep["exp_dir"]) / leg["run_id"]))
        assert record_of(Path(sweep["exp_dir"]), leg["run_id"])["tracking"]["mlflow"]["status"] == "mirrored"


def test_a_tracker_that_is_down_never_fails_the_run_and_sync_retries_it(git_repo, monkeypatch, artifact_root,
                                                                         mlflow_server):
    dead = f"http://127.0.0.1:{free_port()}"
    tracked_project(git_repo, monkeypatch, f'mlflow_uri = "{dead}"\nmlflow_experiment = "retried"')
    r = moectl(git_repo, "run", "--steps", "8", "--tag", "offline_tracker", *QUIET, "--", "--sleep-per-step", "0.01")
    assert r.returncode == 0, r.stderr
    [run_dir] = [p.parent for p in artifact_root.glob("*/run.json")]
    rec = record_of(artifact_root, run_dir.name)
    assert rec["status"] == "completed"
    state = rec["tracking"]["mlflow"]
    assert state["status"] == "failed" and state["target"] == f"{dead} experiment retried"
    assert state["took_s"] < MIRROR_GAVE_UP_S, state  # MLflow's own retries would take minutes
    warning = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and f"run {rec['id']} not mirrored to mlflow ({dead}" in warning[0]
    assert "`moectl sync` will retry it" in warning[0]
    assert "completed:" in r.stdout

    r = moectl(git_repo, "sync")  # still down: fails again, says so, exit 2
    assert r.returncode == 2 and f"run {rec['id']} not mirrored to mlflow" in r.stderr
    assert record_of(artifact_root, rec["id"])["tracking"]["mlflow"]["status"] == "failed"

    set_tracking(git_repo, f'mlflow_uri = "{mlflow_server}"\nmlflow_experiment = "retried"')
    r = moectl(git_repo, "sync", "--dry-run", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == [{"run": rec["id"], "trackers": ["mlflow"]}]
    r = moectl(git_repo, "sync")
    assert r.returncode == 0, r.stderr
    assert f"{rec['id']}: mirrored to mlflow" in r.stdout
    state = record_of(artifact_root, rec["id"])["tracking"]["mlflow"]
    assert state["status"] == "mirrored" and state["target"] == f"{mlflow_server} experiment retried"
    c, mr = the_mlflow_run(mlflow_server, rec["id"], "retried")
    hist = histories(c, mr)
    assert_steps_mirrored(hist, steps_of(run_dir))

    r = moectl(git_repo, "sync")
    assert r.returncode == 0 and "nothing to sync" in r.stdout
    r = moectl(git_repo, "sync", "offline_tracker", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["added"] == {"params": 0, "metric_points": 0, "files": 0}
    c, again = the_mlflow_run(mlflow_server, rec["id"], "retried")
    assert histories(c, again) == hist


def test_a_tracker_that_is_not_installed_names_its_extra_and_the_run_completes(git_repo, monkeypatch, artifact_root):
    tracked_project(git_repo, monkeypatch, 'wandb_project = "moe"\nwandb_mode = "offline"')
    # This interpreter without wandb: an import that fails exactly as on a machine without it.
    code = ("import runpy, sys; sys.modules['wandb'] = None; "
            "sys.argv = ['moectl', *sys.argv[1:]]; runpy.run_module('moectl', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code, "run", "--steps", "5", "--tag", "nowandb", *QUIET, "--",
                        "--sleep-per-step", "0.01"], cwd=git_repo, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    [warning] = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert "wandb is not installed (pip install 'moectl[wandb]')" in warning and "moectl sync" in warning
    [rec] = [json.loads(p.read_text()) for p in artifact_root.glob("*/run.json")]
    assert rec["status"] == "completed" and rec["tracking"]["wandb"]["status"] == "failed"


# ---------------------------------------------------------------------------- imported runs, sync


def test_an_imported_run_syncs_to_a_local_mlflow_store_and_wandb_offline(git_repo, monkeypatch, artifact_root,
                                                                           tmp_path):
    store_dir = git_repo.parent / "mlstore"  # a directory store, given relative to the config file
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))  # W&B's own setting wins over the run dir
    tracked_project(git_repo, monkeypatch, 'mlflow_uri = "../mlstore"\nwandb_project = "moe"\nwandb_mode = "offline"')
    log = REPO / "tests" / "fixtures" / "metrics_small.jsonl"
    r = moectl(git_repo, "import", str(log), "--format", "jsonl", "--name", "old", "--json")
    assert r.returncode == 0, r.stderr
    run_id, run_dir = json.loads(r.stdout)["id"], Path(json.loads(r.stdout)["exp_dir"])
    steps = steps_of(run_dir)

    r = moectl(git_repo, "sync", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["tracker"]: row for row in json.loads(r.stdout)}
    assert rows.keys() == {"mlflow", "wandb"} and all(row["run"] == run_id for row in rows.values())
    assert rows["mlflow"]["added"]["metric_points"] > 0 and rows["mlflow"]["added"]["files"] == 0

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's directory store is opt-in
    c, mr = the_mlflow_run(str(store_dir), run_id)
    assert mr.info.status == "FINISHED" and mr.data.tags["moectl_status"] == "imported"
    assert mr.data.tags["moectl_source"] == str(log)
    hist = histories(c, mr)
    assert_steps_mirrored(hist, steps)

    [offline] = sorted((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))
    assert rows["wandb"]["location"] == str(offline) and not offline_dirs(run_dir)
    view = wandb_view(offline)
    assert view["run"].run_id == wandb_run_id(run_id)
    assert sorted(view["history"]) == [s.step for s in steps]
    assert [view["history"][s.step]["tok_per_sec"] for s in steps] == pytest.approx([s.tok_per_sec for s in steps])

    r = moectl(git_repo, "sync")
    assert r.returncode == 0 and "nothing to sync" in r.stdout
    r = moectl(git_repo, "sync", "old")
    assert r.returncode == 0, r.stderr
    c, again = the_mlflow_run(str(store_dir), run_id)
    assert histories(c, again) == hist
    assert sorted((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*")) == [offline]


def test_a_file_uri_store_is_relative_to_the_config_file_with_home_expanded(git_repo, monkeypatch, artifact_root,
                                                                          tmp_path):
    # Whatever the working directory: the store, and the target run.json records, are one.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracked_project(git_repo, monkeypatch, 'mlflow_uri = "file:../mlr"')
    run_id, run_dir = imported(git_repo, "old")
    below = git_repo / "reports"
    below.mkdir()
    for uri, store_dir in (("file:../mlr", git_repo / ".." / "mlr"), ("file:~/mlr2", tmp_path / "home" / "mlr2")):
        set_tracking(git_repo, f'mlflow_uri = "{uri}"')
        r = moectl(below, "sync", "--json")
        assert r.returncode == 0, r.stderr
        [row] = json.loads(r.stdout)
        assert row["status"] == "mirrored" and row["target"] == f"{store_dir.as_uri()} experiment moe", row
        c, mr = the_mlflow_run(store_dir.as_uri(), run_id)
        assert_steps_mirrored(histories(c, mr), steps_of(run_dir))
    assert (git_repo.parent / "mlr").is_dir() and (tmp_path / "home" / "mlr2").is_dir()
    assert not (below / "mlr").exists() and not (below / "~").exists() and not (git_repo / "mlr").exists()


def test_a_sqlite_store_keeps_its_files_beside_the_database_not_in_the_repository(git_repo, monkeypatch, artifact_root):
    # MLflow's default for a sqlite store is ./mlruns of the working directory: the repository,
    # which it would dirty, and every later run's git.diff would carry the files.
    tracked_project(git_repo, monkeypatch, 'mlflow_uri = "sqlite:///../mlfl/mlflow.db"')
    r = moectl(git_repo, "run", "--steps", "3", "--tag", "lite", *QUIET, "--json", "--", "--sleep-per-step", "0.01")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tracking"]["mlflow"]["status"] == "mirrored", out["tracking"]
    assert git(git_repo, "status", "--porcelain", "--untracked-files=all") == "" and not (git_repo / "mlruns").exists()
    files = sorted(p.name for p in (git_repo.parent / "mlfl" / "mlflow-artifacts").rglob("*") if p.is_file())
    assert files == ["command.txt", "git.diff", "report.md"]
    assert "INFO" not in r.stderr  # MLflow's and alembic's own set-up chatter stays out of the run's output


def test_a_local_store_inside_a_read_only_tree_is_refused_by_run_and_sync(git_repo, monkeypatch, artifact_root):
    ro = git_repo.parent / "shared"
    tracked_project(git_repo, monkeypatch, f'mlflow_uri = "{ro}/mlruns"')
    with (git_repo / ".moectl.toml").open("a") as fh:
        fh.write(f'\n[paths]\nread_only = ["{ro}"]\n')
    r = moectl(git_repo, "check", "--json", *QUIET)
    paths = next(g for g in json.loads(r.stdout)["guards"] if g["name"] == "paths")
    assert r.returncode == 3 and "[tracking] mlflow_uri writes" in paths["message"], r.stdout
    log = REPO / "tests" / "fixtures" / "metrics_small.jsonl"
    assert moectl(git_repo, "import", str(log), "--format", "jsonl", "--name", "old").returncode == 0
    r = moectl(git_repo, "sync")
    assert r.returncode == 3 and f"[tracking] mlflow_uri writes {ro}/mlruns, inside read-only tree {ro}" in r.stderr, r.stderr
    assert not ro.exists()


def test_a_local_store_inside_the_artifact_root_of_a_read_only_tree_is_allowed_by_run_and_sync(
        git_repo, monkeypatch, tmp_path):
    # read_only may hold the artifact root (SPEC §3); a store inside the root is written like the runs.
    ro, artifact_root = tmp_path / "ro", tmp_path / "ro" / "store"
    monkeypatch.setenv("MOECTL_ARTIFACT_ROOT", str(artifact_root))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracked_project(git_repo, monkeypatch, f'mlflow_uri = "{artifact_root}/mlruns"')
    with (git_repo / ".moectl.toml").open("a") as fh:
        fh.write(f'\n[paths]\nread_only = ["{ro}"]\n')
    r = moectl(git_repo, "check", "--json", *QUIET)
    paths = next(g for g in json.loads(r.stdout)["guards"] if g["name"] == "paths")
    assert paths["ok"], paths
    run_id, run_dir = imported(git_repo, "old")
    r = moectl(git_repo, "sync", "--json")
    assert r.returncode == 0, r.stderr
    assert [row["status"] for row in json.loads(r.stdout)] == ["mirrored"]
    c, mr = the_mlflow_run(str(artifact_root / "mlruns"), run_id)
    assert_steps_mirrored(histories(c, mr), steps_of(run_dir))


def test_a_database_driver_mlflow_lacks_is_named_without_the_extras_wrong_advice(git_repo, monkeypatch, artifact_root):
    # `pip install 'moectl[mlflow]'` was the advice for any ImportError: it brings no psycopg2.
    tracked_project(git_repo, monkeypatch, 'mlflow_uri = "postgresql://u@127.0.0.1:1/db"')
    imported(git_repo, "old")
    r = moectl(git_repo, "sync", "--json")
    assert r.returncode == 2, r.stderr
    [row] = json.loads(r.stdout)
    assert row["status"] == "failed" and "No module named 'psycopg" in row["error"], row
    assert row["error"].endswith("(a module mlflow needs for this target; moectl[mlflow] does not bring it)"), row
    assert "pip install 'moectl[mlflow]'" not in row["error"]


def test_wandb_dir_is_held_to_the_paths_rules_and_made_absolute(git_repo, monkeypatch, artifact_root, tmp_path):
    # $WANDB_DIR was not looked at: W&B wrote into a read-only tree or the user's repository, and a
    # relative one recorded a relative queue, which a sync from another directory wrote a second time.
    tracked_project(git_repo, monkeypatch, 'wandb_project = "moe"\nwandb_mode = "offline"')
    monkeypatch.setenv("WANDB_DIR", "wdir")  # relative: inside the repository, not git-ignored
    r = moectl(git_repo, "check", "--json", *QUIET)
    paths = next(g for g in json.loads(r.stdout)["guards"] if g["name"] == "paths")
    assert r.returncode == 3 and f"$WANDB_DIR writes {(git_repo / 'wdir').resolve()}, inside the repository and " \
        "not git-ignored" in paths["message"], paths
    run_id, _ = imported(git_repo, "old")
    r = moectl(git_repo, "sync")
    assert r.returncode == 3 and "$WANDB_DIR writes" in r.stderr and not (git_repo / "wdir").exists(), r.stderr
    frozen = tmp_path / "frozen"
    set_tracking(git_repo, 'wandb_project = "moe"\nwandb_mode = "offline"')
    with open(git_repo / ".moectl.toml", "a") as fh:
        fh.write(f'\n[paths]\nread_only = ["{frozen}"]\n')
    monkeypatch.setenv("WANDB_DIR", str(frozen / "w"))
    r = moectl(git_repo, "sync")
    assert r.returncode == 3 and f"$WANDB_DIR writes {frozen / 'w'}, inside read-only tree {frozen}" in r.stderr
    # allowed where it is neither: the queue's recorded location is absolute, whatever the cwd was
    (git_repo / "sub").mkdir()
    monkeypatch.setenv("WANDB_DIR", "../../wd")  # relative to the working directory, as W&B reads it
    r = moectl(git_repo / "sub", "sync", "--json")
    assert r.returncode == 0, r.stderr
    [row] = json.loads(r.stdout)
    where = (git_repo / "sub" / "../../wd").resolve()
    assert Path(row["location"]).is_absolute() and Path(row["location"]).parent == where / "wandb"
    elsewhere = (git_repo / "../../wd").resolve()  # the same variable read from the repository's root
    r = moectl(git_repo, "sync", "old")  # the recorded queue is found from there too: no second one
    assert r.returncode == 0, r.stderr
    assert len(list((where / "wandb").glob("offline-run-*"))) == 1 and not elsewhere.exists()


@pytest.mark.parametrize("uri, written", [("mlstore", "mlstore"), ("sqlite:///mlflow.db", "mlflow.db")])
def test_a_local_store_in_the_work_tree_is_refused_unless_git_ignored(git_repo, monkeypatch, artifact_root, uri,
                                                                      written):
    # Its files would be untracked changes: every later run's git.diff carrying the whole store.
    tracked_project(git_repo, monkeypatch, f'mlflow_uri = "{uri}"')
    real = (git_repo / written).resolve()
    r = moectl(git_repo, "check", "--json", *QUIET)
    paths = next(g for g in json.loads(r.stdout)["guards"] if g["name"] == "paths")
    assert r.returncode == 3 and not paths["ok"], paths
    assert f"[tracking] mlflow_uri writes {real}, inside the repository and not git-ignored: add it to .gitignore" \
        in paths["message"], paths
    run_id, _ = imported(git_repo, "old")
    r = moectl(git_repo, "sync")
    assert r.returncode == 3 and f"[tracking] mlflow_uri writes {real}, inside the repository" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not real.exists()
    if written == "mlstore":  # ignored, it is the user's choice: allowed, and the work tree stays clean
        (git_repo / ".gitignore").write_text("/mlstore/\n")
        git(git_repo, "add", ".gitignore")
        git(git_repo, "commit", "-q", "-m", "ignore the store")
        r = moectl(git_repo, "sync")
        assert r.returncode == 0, r.stderr
        assert real.is_dir() and git(git_repo, "status", "--porcelain", "--untracked-files=all") == ""


def test_two_syncs_at_once_make_one_mlflow_run(git_repo, monkeypatch, artifact_root, mlflow_server):
    tracked_project(git_repo, monkeypatch, f'mlflow_uri = "{mlflow_server}"\nmlflow_experiment = "raced"')
    log = REPO / "tests" / "fixtures" / "metrics_small.jsonl"
    r = moectl(git_repo, "import", str(log), "--format", "jsonl", "--name", "raced", "--json")
    assert r.returncode == 0, r.stderr
    run_id, run_dir = json.loads(r.stdout)["id"], Path(json.loads(r.stdout)["exp_dir"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "moectl", "sync", *args], cwd=git_repo, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
             for args in ((), (run_id,))]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    c, mr = the_mlflow_run(mlflow_server, run_id, "raced")  # exactly one, with every point once
    assert_steps_mirrored(histories(c, mr), steps_of(run_dir))


# ------------------------------------------------------------------------------- Ctrl-C, SIGTERM


def imported(repo: Path, name: str) -> tuple[str, Path]:
    log = REPO / "tests" / "fixtures" / "metrics_small.jsonl"
    r = moectl(repo, "import", str(log), "--format", "jsonl", "--name", name, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    return out["id"], Path(out["exp_dir"])


def started(repo: Path, *args: str) -> subprocess.Popen:
    """`python -m moectl ARGS` in its own session (a terminal's Ctrl-C reaches the whole group)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "moectl", *args], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)


def stopped_by(proc: subprocess.Popen, sig: int) -> tuple[str, str, float]:
    """Signal `proc`'s process group; its output and how long it took to exit after the signal."""
    t0 = time.monotonic()
    os.killpg(proc.pid, sig)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return out, err, time.monotonic() - t0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sync_stops_at_once_on_ctrl_c_or_sigterm_and_records_nothing_half_done(git_repo, monkeypatch, artifact_root,
                                                                              silent_server, sig):
    tracked_project(git_repo, monkeypatch, f'mlflow_uri = "{silent_server.url}"\nmlflow_experiment = "hung"')
    runs = [imported(git_repo, f"old{i}") for i in range(3)]
    before = silent_server.connections
    proc = started(git_repo, "sync", "--json")
    wait_for(lambda: silent_server.connections > before, "sync reaching the hung tracker", timeout=120, proc=proc)
    out, err, took = stopped_by(proc, sig)
    assert proc.returncode == 130, err
    assert took < 8, took  # at once: not one 10 s request timeout, let alone one per run
    assert json.loads(out) == {"ok": False, "error": json.loads(out)["error"], "exit_code": 130}
    assert "interrupted while mirroring run" in err and "2 more run(s) not attempted" in err, err
    assert "Traceback" not in err
    for run_id, _ in runs:  # nothing recorded: the cut-short mirror is not a failure, every run stays due
        assert record_of(artifact_root, run_id)["tracking"] == {}
    r = moectl(git_repo, "sync", "--dry-run", "--json")
    assert r.returncode == 0 and [row["run"] for row in json.loads(r.stdout)] == [run_id for run_id, _ in runs]


def test_ctrl_c_while_a_run_is_mirrored_keeps_the_run_record_and_exits_130(git_repo, monkeypatch, artifact_root,
                                                                          silent_server):
    tracked_project(git_repo, monkeypatch, f'mlflow_uri = "{silent_server.url}"\nmlflow_experiment = "hung"')
    before = silent_server.connections
    proc = started(git_repo, "run", "--steps", "3", "--tag", "cut", *QUIET, "--json", "--", "--sleep-per-step", "0.01")
    wait_for(lambda: silent_server.connections > before, "the run's mirror reaching the hung tracker", timeout=300,
             proc=proc)
    out, err, took = stopped_by(proc, signal.SIGINT)
    assert proc.returncode == 130 and took < 8, (took, err)
    [run_dir] = [p.parent for p in artifact_root.glob("*cut/run.json")]
    rec = record_of(artifact_root, run_dir.name)
    assert rec["status"] == "completed" and rec["tracking"] == {}, rec["tracking"]
    assert rec["report"] and Path(rec["report"]).is_file() and rec["commit"]
    said = f"interrupted while mirroring run {rec['id']} to its trackers; the run is recorded (completed"
    assert said in err and "Traceback" not in err, err
    # Still the run's result: its document (one), the mirroring said before it began
    data = json.loads(out)
    assert (data["id"], data["status"], data["commit"]) == (rec["id"], "completed", rec["commit"])
    assert data["interrupted"].startswith(said)
    assert "mirroring to mlflow (never fails the run; Ctrl-C skips it, `moectl sync` retries)" in err
    assert f"completed: {rec['id']}" in err


def test_an_interrupted_wandb_offline_write_leaves_no_partial_queue_and_the_retry_writes_one(
        git_repo, monkeypatch, artifact_root, tmp_path):
    tracked_project(git_repo, monkeypatch, 'wandb_project = "moe"\nwandb_mode = "offline"')
    log = tmp_path / "long.jsonl"  # long enough that a write takes seconds: the signal lands inside it
    lines = [json.dumps({"type": "start", "steps": 6000, "world_size": 1, "tokens_per_step": 4096, "device": "cpu",
                         "config": {"preset": "tiny"}, "start_step": 0})]
    lines += [json.dumps({"type": "step", "step": i, "loss": 5.0 - i * 1e-4, "aux_loss": 0.1, "lr": 1e-3,
                          "dt_ms": 200.0, "tok_per_sec": 2000.0 + i, "peak_mem_mib": 100.0, "drop_frac": 0.1,
                          "expert_load_max": 1.5, "elapsed_s": 0.2 * (i + 1)}) for i in range(6000)]
    log.write_text("\n".join(lines) + "\n")
    r = moectl(git_repo, "import", str(log), "--format", "jsonl", "--name", "long", "--json")
    assert r.returncode == 0, r.stderr
    run_id, run_dir = json.loads(r.stdout)["id"], Path(json.loads(r.stdout)["exp_dir"])
    wid = wandb_run_id(run_id)

    # The signal must land inside the write. Rather than trust a race (the write takes ~3 s here),
    # the whole process group is stopped once the staging directory appears; if the write had
    # already ended by then (a descheduled test on a loaded machine), its queue is deleted - as after
    # an upload - and the sync is tried again: a deleted queue is written again (test below).
    for attempt in range(5):
        before = record_of(artifact_root, run_id)["tracking"]
        proc = started(git_repo, "sync", run_id)
        wait_for(lambda: list(run_dir.rglob(f"offline-run-*-{wid}")), "the W&B offline write starting",
                 timeout=120, proc=proc)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGSTOP)
            if not offline_dirs(run_dir):
                break  # stopped mid-write
            os.killpg(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=120) == 0
        shutil.rmtree(run_dir / "wandb")
    else:
        pytest.fail("the offline write ended before it could be stopped, five times")
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, pending until the group runs again
    os.killpg(proc.pid, signal.SIGCONT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert offline_dirs(run_dir) == [], "a partial upload queue was left"
    assert record_of(artifact_root, run_id)["tracking"] == before

    r = moectl(git_repo, "sync", run_id)
    assert r.returncode == 0, r.stderr
    [offline] = offline_dirs(run_dir)
    assert [p.name for p in (run_dir / "wandb").iterdir() if wid in p.name] == [offline.name]  # no staging left
    view = wandb_view(offline)
    assert sorted(view["history"]) == list(range(6000))
    assert record_of(artifact_root, run_id)["tracking"]["wandb"]["location"] == str(offline)


def test_a_wandb_offline_queue_deleted_since_is_written_again(git_repo, monkeypatch, artifact_root):
    tracked_project(git_repo, monkeypatch, 'wandb_project = "moe"\nwandb_mode = "offline"')
    run_id, run_dir = imported(git_repo, "old")
    assert moectl(git_repo, "sync").returncode == 0
    [first] = offline_dirs(run_dir)
    shutil.rmtree(run_dir / "wandb")  # uploaded and cleaned up, say
    r = moectl(git_repo, "sync", run_id, "--json")
    assert r.returncode == 0, r.stderr
    [row] = json.loads(r.stdout)
    assert row["note"] is None and row["added"]["metric_points"] > 0, row
    [again] = offline_dirs(run_dir)
    assert row["location"] == str(again) and sorted(wandb_view(again)["history"]) == [s.step for s in steps_of(run_dir)]


def test_a_run_named_twice_is_mirrored_once(git_repo, monkeypatch, artifact_root):
    tracked_project(git_repo, monkeypatch, 'wandb_project = "moe"\nwandb_mode = "offline"')
    run_id, _ = imported(git_repo, "base")
    r = moectl(git_repo, "sync", "base", "base", run_id, "--dry-run", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == [{"run": run_id, "trackers": ["wandb"]}], r.stdout


def test_sync_leaves_another_repositorys_runs_in_a_shared_artifact_root_to_that_project(git_repo, monkeypatch,
                                                                                        artifact_root, tmp_path):
    # Two projects share one artifact root (the default ~/.cache one). `moectl sync` with no RUN
    # mirrored the other's runs into this project's trackers too, and wrote this project's target
    # into their run.json (which then made their own `moectl sync` mirror them again).
    from moectl import store

    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q", "-b", "main")
    tracked_project(other, monkeypatch, 'wandb_project = "theirs"\nwandb_mode = "offline"')
    tracked_project(git_repo, monkeypatch, 'wandb_project = "moe"\nwandb_mode = "offline"')
    theirs, theirs_dir = imported(other, "theirs")  # `moectl import` records the repository too
    mine, _ = imported(git_repo, "mine")
    old = store.import_run(artifact_root, "moe", "old", [StepMetrics(step=i, loss=1.0) for i in range(3)])  # no `repo`
    r = moectl(git_repo, "sync", "--dry-run", "--json")
    assert r.returncode == 0 and {row["run"] for row in json.loads(r.stdout)} == {mine, old.id}, r.stdout
    r = moectl(git_repo, "sync", "--json")
    assert r.returncode == 0 and {row["run"] for row in json.loads(r.stdout)} == {mine, old.id}, r.stdout + r.stderr
    assert record_of(artifact_root, theirs)["tracking"] == {} and not (theirs_dir / "wandb").exists()
    assert record_of(artifact_root, mine)["tracking"]["wandb"]["status"] == "mirrored"

    # Named, another project's run is refused (exit 2, nothing mirrored): this project's [tracking]
    # is not its, and its run.json keeps one target per tracker, its own project's.
    where = str(other.resolve())
    r = moectl(git_repo, "sync", "theirs")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"error: run {theirs} belongs to another repository, {where}: mirror it from there (`moectl sync {theirs}` "
        f"in {where}), into that project's trackers; nothing mirrored"], r.stderr
    second, _ = imported(other, "second")
    r = moectl(git_repo, "sync", mine, theirs, second, "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["exit_code"] == 2, r.stdout
    assert r.stderr.splitlines()[1:] == [f"  {theirs} belongs to {where}", f"  {second} belongs to {where}"], r.stderr
    assert record_of(artifact_root, theirs)["tracking"] == {}
    # There, it is that project's own (and so is the record from before run.json `repo`).
    r = moectl(other, "sync", "--dry-run", "--json")
    assert r.returncode == 0 and {row["run"] for row in json.loads(r.stdout)} == {theirs, second, old.id}, r.stdout


def test_wandbs_deadline_exceeded_reads_as_timed_out():
    from moectl.tracking import _reason

    # as wandb's Go service reports an unanswered request
    exc = Exception('Post "http://127.0.0.1:9/graphql": context deadline exceeded (Client.Timeout exceeded '
                    'while awaiting headers)')
    assert _reason(exc, "wandb") == "wandb server unreachable: timed out"


# ------------------------------------------------------------------------- the record and its report


def ended_run(repo: Path, tag: str) -> tuple[Path, str]:
    """A completed run in the store whose moectl was killed before its report: what `moectl commit
    RUN` writes the report of. -> (its directory, its id)."""
    from moectl.config import load_config
    from moectl.records import GitInfo, RunRecord, Summary
    from moectl.store import create_run_dir, run_id, save_run

    cfg = load_config(None)
    rid = run_id("moe", tag)
    exp = create_run_dir(cfg.artifact_root / rid)
    shutil.copyfile(REPO / "tests" / "fixtures" / "metrics_small.jsonl", exp / "metrics.jsonl")
    save_run(RunRecord(id=rid, tag=tag, status="completed", created_at="2025-01-01T12:00:00+00:00",
                       finished_at="2025-01-01T12:05:00+00:00", exit_code=0, options={"cap": 1.0},
                       git=GitInfo(branch="main", commit=git(repo, "rev-parse", "HEAD").strip(), dirty=False),
                       exp_dir=str(exp), summary=Summary(window=50, steps=10, tok_per_sec=806400.06)))
    return exp, rid


def cli(*args: str):
    from typer.testing import CliRunner

    from moectl.cli import app

    return CliRunner().invoke(app, list(args))


LOCAL_TRACKERS = 'mlflow_uri = "../mlstore"\nwandb_project = "moe"\nwandb_mode = "offline"'


def test_a_sync_holding_an_old_copy_of_the_record_keeps_what_moectl_commit_recorded_meanwhile(
        git_repo, monkeypatch, artifact_root):
    # `moectl sync` reads its runs first, then spends up to its budget per tracker on each: a
    # `moectl commit` of one of them meanwhile must not be erased by the sync's save.
    from moectl.config import load_config
    from moectl.store import load_run
    from moectl.tracking import mirror_run

    tracked_project(git_repo, monkeypatch, LOCAL_TRACKERS)
    exp, rid = ended_run(git_repo, "held")
    old_copy = load_run(exp)  # what a sync read before the commit
    r = cli("commit", rid, "--json")
    assert r.exit_code == 0, r.output
    sha, report = json.loads(r.stdout)["commit"], json.loads(r.stdout)["report"]
    results = mirror_run(load_config(None), old_copy)
    assert [m.state.status for m in results] == ["mirrored", "mirrored"], [m.state.error for m in results]
    rec = record_of(artifact_root, rid)
    assert (rec["commit"], rec["report"], rec["commit_error"]) == (sha, report, None)
    assert {name: (t["status"], t["report"]) for name, t in rec["tracking"].items()} == {
        "mlflow": ("mirrored", report), "wandb": ("mirrored", report)}


def test_a_report_written_after_the_mirror_makes_the_run_due_and_reaches_both_trackers(
        git_repo, monkeypatch, artifact_root):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracked_project(git_repo, monkeypatch, LOCAL_TRACKERS)
    exp, rid = ended_run(git_repo, "late")
    r = cli("sync", "--json")
    assert r.exit_code == 0, r.output
    first = {row["tracker"]: row for row in json.loads(r.stdout)}
    assert first["mlflow"]["added"]["files"] == 0 and record_of(artifact_root, rid)["tracking"]["mlflow"]["report"] is None
    [queue] = offline_dirs(exp)
    assert not wandb_view(queue)["artifacts"]

    assert cli("commit", rid).exit_code == 0  # writes the report from the record, and commits it
    r = cli("sync", "--json")  # no RUN named: the run is due again, for its report
    assert r.exit_code == 0, r.output
    again = {row["tracker"]: row for row in json.loads(r.stdout)}
    assert again.keys() == {"mlflow", "wandb"} and again["mlflow"]["added"] == {"params": 0, "metric_points": 0, "files": 1}
    c, mr = the_mlflow_run(str(git_repo.parent / "mlstore"), rid)
    assert [a.path for a in c.list_artifacts(mr.info.run_id, "moectl")] == ["moectl/report.md"]
    [queue] = offline_dirs(exp)  # one upload queue still: the new one replaced the first
    assert [a.name for a in wandb_view(queue)["artifacts"]] and again["wandb"]["location"] == str(queue)
    assert "nothing to sync" in cli("sync").stdout


def test_the_report_mirrored_is_the_one_the_record_names_after_report_dir_moved(git_repo, monkeypatch, artifact_root):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracked_project(git_repo, monkeypatch, 'mlflow_uri = "../mlstore"')
    exp, rid = ended_run(git_repo, "moved")
    assert cli("commit", rid).exit_code == 0
    report = record_of(artifact_root, rid)["report"]
    cfg = git_repo / ".moectl.toml"
    cfg.write_text(cfg.read_text().replace("[tracking]", "[paths]\nreport_dir = \"elsewhere\"\n\n[tracking]"))
    r = cli("sync", rid, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[0]["added"]["files"] == 1
    c, mr = the_mlflow_run(str(git_repo.parent / "mlstore"), rid)
    [art] = c.list_artifacts(mr.info.run_id, "moectl")
    assert art.path == "moectl/report.md" and record_of(artifact_root, rid)["tracking"]["mlflow"]["report"] == report


def test_a_mirror_turns_mlflows_usage_telemetry_off_unless_the_user_chose(monkeypatch, tmp_path):
    # MLflow 3 reports usage to the internet by default (read when it is imported, in the mirror):
    # moectl's mirror of a run to a local store sends nothing anywhere else.
    from moectl.tracking import _mlflow_env

    uri = f"sqlite:///{tmp_path}/m.db"
    for key in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        monkeypatch.delenv(key, raising=False)
    with _mlflow_env(uri):
        assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert "MLFLOW_DISABLE_TELEMETRY" not in os.environ  # the process's environment as it was
    monkeypatch.setenv("DO_NOT_TRACK", "false")  # a choice of the user's own: left to MLflow
    with _mlflow_env(uri):
        assert "MLFLOW_DISABLE_TELEMETRY" not in os.environ
