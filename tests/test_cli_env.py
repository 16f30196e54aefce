"""`moectl init`, `status`, `check` through CliRunner: exit codes and parsed JSON on real repos,
real processes and locks; GPU states from the fake NVML file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import moectl.cli.env  # noqa: F401  registers init/status/check
from moectl.cli.common import app
from moectl.config import CONFIG_NAME, TEMPLATE
from moectl.lock import acquire
from tests.conftest import git, gpu, no_other_training_on_a_quiet_machine, stop_process
from tests.test_lock import dead_pid, live_owner, plant, taken_by

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def check_json(*args: str):
    r = invoke("check", "--json", *args)
    data = json.loads(r.stdout)
    return r.exit_code, data, {g["name"]: g for g in data["guards"]}


# ------------------------------------------------------------------------------------------- init


def test_init_writes_the_template_and_refuses_to_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("init")
    assert r.exit_code == 0 and (tmp_path / CONFIG_NAME).read_text() == TEMPLATE
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME]  # adds nothing else
    r = invoke("init")
    assert r.exit_code == 2 and "already exists" in r.stderr and "Traceback" not in r.output
    # a directory that is not there: the error names the file asked for, not moectl's temp file
    r = invoke("init", "no/such/dir")
    assert r.exit_code == 2 and "no/such/dir/.moectl.toml" in r.stderr and ".tmp" not in r.stderr, r.stderr


def test_init_in_a_repository_takes_its_branch_and_says_what_comes_next(tmp_path, monkeypatch):
    # A repository on `master`: the default `main` would refuse the first run (exit 3).
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "trunk")
    monkeypatch.chdir(repo)
    r = invoke("init")
    assert r.exit_code == 0, r.output
    from moectl.config import load_config

    assert load_config(repo / CONFIG_NAME).project.branch == "trunk"
    text = (repo / CONFIG_NAME).read_text()
    assert text.replace('branch = "trunk"             # the branch this repository was on at `moectl init` '
                        '(default "main");\n                             #', 'branch = "main"              #') == TEMPLATE
    lines = r.stdout.splitlines()
    assert lines[0] == "wrote .moectl.toml" and lines[1] == "next:"
    assert any('project.branch is "trunk"' in line for line in lines)
    assert any("git add .moectl.toml && git commit" in line for line in lines)
    assert any('project.venv ".venv" is not here' in line for line in lines)
    assert sorted(os.listdir(repo)) == [".git", CONFIG_NAME]  # still nothing else
    # a branch name TOML must escape is written escaped (every command read the file as malformed)
    odd = tmp_path / "odd"
    odd.mkdir()
    git(odd, "init", "-q", "-b", 'we"ird')
    monkeypatch.chdir(odd)
    assert invoke("init").exit_code == 0 and load_config(odd / CONFIG_NAME).project.branch == 'we"ird'


OLD_CONFIG = b'# my tuned config\r\n[project]\nname = "old"\n\xff not even utf-8\n'  # bytes must survive as they are


def test_init_without_force_refuses_in_one_line_and_suggests_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / CONFIG_NAME).write_bytes(OLD_CONFIG)
    r = invoke("init")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "--force" in r.stderr
    assert (tmp_path / CONFIG_NAME).read_bytes() == OLD_CONFIG and os.listdir(tmp_path) == [CONFIG_NAME]


def test_init_force_without_a_config_just_writes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("init", "--force")
    assert r.exit_code == 0 and r.stdout.splitlines()[0] == f"wrote {CONFIG_NAME}"
    assert os.listdir(tmp_path) == [CONFIG_NAME] and (tmp_path / CONFIG_NAME).read_text() == TEMPLATE


def test_init_force_over_a_symlink_to_nothing_replaces_the_link(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / CONFIG_NAME).symlink_to(tmp_path / "nowhere" / "shared.toml")
    r = invoke("init")
    assert r.exit_code == 2 and "already exists" in r.stderr  # a link is something: not replaced unasked
    r = invoke("init", "--force")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / CONFIG_NAME).is_symlink() and (tmp_path / CONFIG_NAME).read_text() == TEMPLATE
    assert not (tmp_path / "nowhere").exists()  # nothing written where the link pointed


def test_init_force_keeps_the_old_config_as_bak_and_never_overwrites_a_bak(tmp_path):
    target = tmp_path / CONFIG_NAME
    target.write_bytes(OLD_CONFIG)
    target.chmod(0o600)
    r = invoke("init", str(tmp_path), "--force")
    assert r.exit_code == 0, r.output
    bak = tmp_path / f"{CONFIG_NAME}.bak"
    assert bak.read_bytes() == OLD_CONFIG and target.read_text() == TEMPLATE
    assert r.stdout.splitlines()[0] == f"wrote {target} (the old one is now {bak})"
    assert oct(target.stat().st_mode & 0o777) == oct(0o600)  # the config keeps its permissions
    # A second --force: the first backup stays as it was, the replaced template goes to .bak.1.
    target.write_bytes(b"second\n")
    r = invoke("init", str(tmp_path), "--force")
    assert r.exit_code == 0, r.output
    assert bak.read_bytes() == OLD_CONFIG and (tmp_path / f"{CONFIG_NAME}.bak.1").read_bytes() == b"second\n"
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, f"{CONFIG_NAME}.bak", f"{CONFIG_NAME}.bak.1"]  # no temp file left
    assert target.read_text() == TEMPLATE


def test_init_help_shows_force_with_an_example():
    r = invoke("init", "--help")
    assert r.exit_code == 0 and "moectl init --force" in r.stdout and ".bak.1" in r.stdout


@pytest.mark.parametrize("command", ["init", "status", "check"])
def test_help_has_an_example(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0 and "Example:" in r.stdout and f"moectl {command}" in r.stdout


# ----------------------------------------------------------------------------------------- status


def test_status_json_contract_with_gpus(project, fake_nvml, artifact_root):
    fake_nvml(gpus=[gpu(0), gpu(1, util_pct=97, mem_used_mib=70000, processes=[{"pid": 4242, "name": "python", "used_mib": 69000}])])
    (project / "README.md").write_text("dirty\n")
    (project / "new.txt").write_text("x\n")
    git(project, "add", "new.txt")
    (project / "untracked.txt").write_text("x\n")
    r = invoke("status", "--json")
    assert r.exit_code == 0
    s = json.loads(r.stdout)
    assert {"gpus", "nvml_error", "training_processes", "lock", "git", "venv", "recent_runs"} <= set(s)
    assert [(g["index"], g["util_pct"], g["mem_used_mib"]) for g in s["gpus"]] == [(0, 0, 0), (1, 97, 70000)]
    assert s["gpus"][1]["processes"] == [{"pid": 4242, "name": "python", "used_mib": 69000}]
    assert s["nvml_error"] is None and s["lock"] is None
    # The reading is a file's, not the driver's: said in status, and by the guard that judges it
    # (a MOECTL_FAKE_NVML left in a shell must not pass for idle GPUs unnoticed).
    assert s["nvml_fake"] == os.environ["MOECTL_FAKE_NVML"]
    assert f"a FAKE reading from MOECTL_FAKE_NVML={s['nvml_fake']}" in " ".join(invoke("status").stdout.split())
    code, _, g = check_json("--device", "cuda", "--override", "no_other_training")
    assert f"(a fake reading: MOECTL_FAKE_NVML={s['nvml_fake']})" in g["gpus_idle"]["message"]
    assert {k: s["git"][k] for k in ("branch", "expected_branch", "dirty", "staged", "untracked")} == {
        "branch": "main", "expected_branch": "main", "dirty": 1, "staged": 1, "untracked": 1}
    assert s["venv"]["python"] == sys.executable and s["venv"]["has_torch"] is True
    assert s["artifact_root"] == str(artifact_root.resolve())


def test_status_text_shows_nvml_error_lock_and_training(project, artifact_root, fake_training):
    with acquire(artifact_root, "20250101_000000_moe-held"):
        r = invoke("status")
    assert r.exit_code == 0
    assert "NVML unavailable: NVML Shared Library Not Found" in r.stdout
    assert "held: pid" in r.stdout and "20250101_000000_moe-held" in r.stdout
    assert f"pid {fake_training.pid}" in r.stdout and "/art/20250101_000000_moe-x" in r.stdout
    assert "main (expected)" in r.stdout


def test_status_without_config_is_still_a_status(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("status", "--json")
    s = json.loads(r.stdout)
    assert r.exit_code == 0 and s["config"] is None and "moectl init" in s["config_error"]
    assert s["git"]["error"] and s["gpus"] is None
    r = invoke("status")
    assert r.exit_code == 0 and "moectl init" in r.stdout


def test_status_names_unreadable_run_records_and_why_it_has_no_runs(project, artifact_root):
    """A corrupt run.json was left out without a word (`runs` warns of it), and an artifact_root that
    is a file gave `recent runs: unavailable` with no reason."""
    bad = artifact_root / "20260101_000000_moe-bad"
    bad.mkdir(parents=True)
    (bad / "run.json").write_text("{not json")
    data = json.loads(invoke("status", "--json").stdout)
    assert data["recent_runs"] == [] and len(data["unreadable_runs"]) == 1 and "moe-bad" in data["unreadable_runs"][0]
    r = invoke("status")
    assert r.exit_code == 0 and "  unreadable: " in r.stdout and "moe-bad" in r.stdout
    import shutil

    shutil.rmtree(artifact_root)
    artifact_root.write_text("not a directory\n")
    data = json.loads(invoke("status", "--json").stdout)
    assert data["recent_runs"] is None and data["recent_runs_error"] == f"artifact_root {artifact_root} is a file, not a directory"
    assert f"recent runs: unavailable (artifact_root {artifact_root} is a file, not a directory)" in invoke("status").stdout


def test_status_with_an_invalid_config_reports_it(project):
    (project / CONFIG_NAME).write_text("[gpu]\nmax_util_pct = \"x\"\n")
    r = invoke("status", "--json")
    s = json.loads(r.stdout)
    assert r.exit_code == 0 and "gpu.max_util_pct: Input should be a valid number" in s["config_error"]


def test_status_json_never_imports_torch():
    env = {**os.environ, "MOECTL_FAKE_NVML": "/nonexistent.json"}
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "moectl", "status", "--json"],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    json.loads(r.stdout)
    modules = [ln.rsplit("|", 1)[1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")]
    assert "moectl.probes" in modules  # the import log is real, and covers the status path
    assert not [m for m in modules if m == "torch" or m.startswith("torch.")]


# ------------------------------------------------------------------------------------------ check


def test_check_passes_on_cpu_and_writes_nothing(project, artifact_root, fake_training):
    before = git(project, "status", "--porcelain")
    # Other sessions may run torchrun on this machine, so a training process of our own makes the
    # no_other_training verdict certain: it fails naming that process, and the override passes it.
    code, data, g = check_json("--cap", "1.0", "--tag", "smoke", "--override", "no_other_training", "--", "--seed", "1")
    assert code == 0 and data["ok"] is True and (data["exit_code"], data["error"]) == (0, None)
    assert all(g[n]["ok"] for n in ("config", "git", "venv", "paths", "fresh_dir", "disk"))
    assert (g["no_other_training"]["ok"], g["no_other_training"]["overridden"]) == (False, True)
    assert f"pid {fake_training.pid}" in g["no_other_training"]["message"]
    assert g["gpus_idle"]["ok"] and "cpu run" in g["gpus_idle"]["message"]
    assert g["paths"]["overridable"] is False and g["gpus_idle"]["overridable"] is True
    assert data["run_id"].endswith("_moe-smoke") and " --seed 1 " in data["command"]
    assert not artifact_root.exists() and git(project, "status", "--porcelain") == before


def test_check_takes_every_run_option_so_run_can_become_check_on_the_same_line(project, artifact_root, fake_training):
    before = git(project, "status", "--porcelain")
    code, data, g = check_json("--tag", "same", "--no-commit", "--notes", "why", "--quiet", "--dry-run", "--repeat", "2",
                               "--seed", "5", "--override", "no_other_training", "--", "--lr", "0.02")
    assert code == 0 and data["ok"] is True, data
    assert data["argv"][data["argv"].index("--seed") + 1] == "5"  # the first repeat's command, as run --dry-run shows
    # What the run itself would refuse, check refuses: a baseline that names no run, Slurm flags without Slurm.
    r = invoke("check", "--baseline", "no-such-run", "--override", "no_other_training")
    assert r.exit_code == 2 and "no run matches 'no-such-run'" in r.stderr
    r = invoke("check", "--detach", "--override", "no_other_training")
    assert r.exit_code == 2 and "--detach needs --slurm" in r.stderr
    assert not artifact_root.exists() and git(project, "status", "--porcelain") == before


def test_a_slurm_dry_run_shows_the_command_its_job_will_run(project, artifact_root, slurm_answers):
    # Two nodes: one torchrun per node under srun, meeting at the first node, from the job's code
    # snapshot; not the one-node --standalone command a local run would start. Nothing is submitted.
    code, data, _ = check_json("--slurm", "--nodes", "2", "--nproc", "2", "--device", "cpu", "--tag", "big")
    argv = data["argv"]
    assert argv[:4] == ["srun", "--ntasks-per-node=1", "--nodes=2", "--kill-on-bad-exit=1"], argv
    assert "--standalone" not in argv and argv[argv.index("--nnodes") + 1] == "2"
    assert argv[argv.index("--rdzv-endpoint") + 1] == "FIRST_NODE:29500" and argv[argv.index("--rdzv-id") + 1] == "JOB_ID"
    assert data["command"].endswith(" ".join(argv[-4:])) and "srun --ntasks-per-node=1" in data["command"]
    assert data["command_where"].startswith(f"in the Slurm job, from its code snapshot {data['exp_dir']}/code")
    assert data["command_where"].endswith("it meets at port 29500 + (JOB_ID mod 1000)"), data["command_where"]
    r = invoke("run", "--slurm", "--nodes", "2", "--nproc", "2", "--device", "cpu", "--tag", "big", "--dry-run")
    line = next(l for l in r.stdout.splitlines() if l.startswith("command"))
    assert line.startswith("command (in the Slurm job, from its code snapshot ") and " srun --ntasks-per-node=1 " in line
    # One node: the planned torchrun itself, still run from the snapshot; a local check says neither.
    _, one, _ = check_json("--slurm", "--device", "cpu")
    assert "--standalone" in one["argv"] and one["argv"][0] != "srun" and "code snapshot" in one["command_where"]
    _, local, _ = check_json("--device", "cpu")
    assert "command_where" not in local and "--standalone" in local["argv"]
    assert not artifact_root.exists()


def test_check_table_output_and_guard_exit_code(project, fake_nvml):
    fake_nvml(gpus=[gpu(0, util_pct=80)])
    r = invoke("check", "--device", "cuda", "--override", "no_other_training")
    assert r.exit_code == 3
    for name in ("config", "git", "venv", "paths", "fresh_dir", "gpus_idle", "no_other_training", "disk"):
        assert name in r.stdout
    assert "FAIL" in r.stdout and "GPU 0: util 80% > 5%" in r.stdout


@pytest.mark.parametrize(
    "reading, fragment",
    [
        ({"gpus": [gpu(0, util_pct=60)]}, "util 60%"),
        ({"gpus": [gpu(0, mem_used_mib=5000)]}, "5000 MiB used"),
        ({"gpus": [gpu(0, processes=[{"pid": 31337, "name": "python", "used_mib": 10}])]}, "pid 31337"),
        ({"error": "Driver Not Loaded"}, "NVML unavailable (Driver Not Loaded)"),
        ({"gpus": [{"index": 0}]}, "GPU 0: its memory use is unknown"),  # idle cannot be shown: not assumed
    ],
)
def test_gpu_states_refuse_a_cuda_run_until_overridden(project, fake_nvml, reading, fragment):
    fake_nvml(**reading)
    code, data, g = check_json("--device", "cuda", "--override", "no_other_training")
    assert code == 3 and not g["gpus_idle"]["ok"] and fragment in g["gpus_idle"]["message"]
    code, data, g = check_json("--device", "cuda", "--override", "no_other_training", "--override", "gpus_idle")
    assert code == 0 and g["gpus_idle"]["overridden"] is True


def test_a_reading_without_some_fields_is_shown_with_question_marks_not_a_crash(project, fake_nvml):
    fake_nvml(gpus=[{"index": 0}])
    r = invoke("status")
    assert r.exit_code == 0 and "[0] ?  util ?%  mem ?/? MiB  no processes" in r.stdout, r.output
    # A MIG instance reports no utilization: its memory and processes still judge it.
    fake_nvml(gpus=[gpu(0, util_pct=None)])
    code, data, g = check_json("--device", "cuda", "--override", "no_other_training")
    assert code == 0 and g["gpus_idle"]["ok"], g["gpus_idle"]


def test_idle_gpus_pass_and_auto_device_picks_cuda(project, fake_nvml):
    fake_nvml(gpus=[gpu(0), gpu(1)])
    code, data, g = check_json("--override", "no_other_training")
    assert code == 0 and g["gpus_idle"]["ok"] and not g["gpus_idle"]["skipped"]
    assert "--nproc-per-node 2" in data["command"] and "--device cuda" in data["command"]


def table_verdicts(text: str) -> dict[str, str]:
    """`check`'s guard table read back: guard name -> its result column."""
    names = {"config", "git", "venv", "paths", "fresh_dir", "gpus_idle", "no_other_training", "disk"}
    return {w[0]: w[1] for w in (line.split() for line in text.splitlines()) if len(w) > 1 and w[0] in names}


NOT_CHECKED = "gpus_idle skipped (cpu run: GPU idleness not checked)"


@pytest.mark.parametrize("nvml, args, lines", [
    # (the line on a quiet machine, the line when other training is running here and overridden)
    ({"error": "NVML Shared Library Not Found"}, ["--device", "cpu"],
     (f"guards: 7 passed, {NOT_CHECKED}", f"guards: 6 passed, {NOT_CHECKED}, no_other_training overridden")),
    ({"gpus": [gpu(0), gpu(1)]}, ["--device", "cuda"],
     ("guards: 8 passed", "guards: 7 passed, no_other_training overridden")),
    ({"gpus": [gpu(0, util_pct=97)]}, ["--device", "cuda", "--override", "gpus_idle"],
     ("guards: 7 passed, gpus_idle overridden", "guards: 6 passed, gpus_idle overridden, no_other_training overridden")),
])
def test_check_prints_the_table_then_the_one_line_verdict(project, fake_nvml, nvml, args, lines):
    fake_nvml(**nvml)
    r = invoke("check", *args, "--override", "no_other_training")
    assert r.exit_code == 0, r.output
    verdicts = table_verdicts(r.stdout)
    assert len(verdicts) == 8 and verdicts["no_other_training"] in ("ok", "overridden")  # the full table
    quiet, busy = lines
    assert r.stdout.splitlines()[-1] == (quiet if verdicts["no_other_training"] == "ok" else busy)


def test_check_line_names_an_overridden_training_guard(project, fake_training):
    r = invoke("check", "--device", "cpu", "--override", "no_other_training")
    assert r.exit_code == 0, r.output
    assert table_verdicts(r.stdout)["no_other_training"] == "overridden"
    assert r.stdout.splitlines()[-1] == f"guards: 6 passed, {NOT_CHECKED}, no_other_training overridden"


def test_refused_check_names_the_failed_guards_under_the_table(project, fake_nvml):
    fake_nvml(gpus=[gpu(0, util_pct=97)])
    git(project, "switch", "-q", "-c", "feature")
    r = invoke("check", "--device", "cuda", "--override", "no_other_training")
    assert r.exit_code == 3
    verdicts = table_verdicts(r.stdout)
    assert verdicts["git"] == verdicts["gpus_idle"] == "FAIL"
    *_, line, last = r.stdout.splitlines()
    assert line.startswith("guards: ") and line.endswith("git FAILED, gpus_idle FAILED")
    assert last == "refused: fix the FAIL lines above"


def test_dotdot_exp_dir_refused_and_paths_not_overridable(project, artifact_root):
    code, _, g = check_json("--exp-dir", f"{artifact_root}/x/../../escaped", "--override", "no_other_training")
    assert code == 3 and not g["paths"]["ok"] and "outside artifact_root" in g["paths"]["message"]
    r = invoke("check", "--override", "paths")
    assert r.exit_code == 2 and "cannot be overridden" in r.stderr


def test_symlink_escape_and_existing_dir(project, artifact_root, tmp_path):
    artifact_root.mkdir()
    (artifact_root / "link").symlink_to(tmp_path)
    code, _, g = check_json("--exp-dir", str(artifact_root / "link" / "run"), "--override", "no_other_training")
    assert code == 3 and "resolves to" in g["paths"]["message"]
    (artifact_root / "used").mkdir()
    code, _, g = check_json("--exp-dir", str(artifact_root / "used"), "--override", "no_other_training")
    assert code == 3 and not g["fresh_dir"]["ok"] and g["paths"]["ok"]
    # A symlink loop on the way (inside the root, so no "outside" verdict covers it): refused by
    # name, not an internal error (exit 1) from Path.resolve()
    (artifact_root / "loopA").symlink_to("loopB")
    (artifact_root / "loopB").symlink_to("loopA")
    code, _, g = check_json("--exp-dir", str(artifact_root / "loopA" / "run"), "--override", "no_other_training")
    assert code == 3 and g["paths"]["message"].startswith("exp_dir: a symbolic link loop on its path")


def test_read_only_tree_refused(project, artifact_root):
    (project / CONFIG_NAME).write_text(f'[project]\nvenv = ""\n[paths]\nread_only = ["{artifact_root}/frozen"]\n')
    code, _, g = check_json("--exp-dir", str(artifact_root / "frozen" / "r"), "--override", "no_other_training")
    assert code == 3 and "inside read-only tree" in g["paths"]["message"]


def test_wrong_branch_and_detached_head(project):
    git(project, "switch", "-q", "-c", "feature")
    code, _, g = check_json("--override", "no_other_training")
    assert code == 3 and "expected 'main'" in g["git"]["message"]
    git(project, "checkout", "-q", "--detach")
    code, _, g = check_json("--override", "no_other_training")
    assert code == 3 and "detached" in g["git"]["message"]


def test_running_training_process_refuses(project, fake_training):
    code, _, g = check_json()
    assert code == 3 and f"pid {fake_training.pid}" in g["no_other_training"]["message"]


def test_a_run_lock_that_cannot_be_read_is_held_said_by_status_and_refused_by_check(project, artifact_root):
    """Another user's lock this user may not read, or a directory in its place: status crashed
    (exit 2, no status at all) and check --json lost its guards. Held by someone unnamed, it is."""
    (artifact_root / ".moectl.lock").mkdir(parents=True)
    r = invoke("status")
    assert r.exit_code == 0, r.output
    assert f"lock        held: {artifact_root / '.moectl.lock'} (unreadable (Is a directory))" in r.stdout
    lock = json.loads(invoke("status", "--json").stdout)["lock"]
    assert (lock["pid"], lock["stale"], lock["reason"]) == (None, False, "unreadable (Is a directory)")
    code, _, g = check_json()
    assert code == 3 and not g["no_other_training"]["ok"]
    assert f"the run lock {artifact_root / '.moectl.lock'} is unreadable (Is a directory); another moectl may hold it" \
        in g["no_other_training"]["message"]


def test_live_lock_refuses_and_stale_lock_does_not(project, artifact_root):
    owner = live_owner()
    try:
        plant(artifact_root, pid=owner.pid, started_ts=taken_by(owner), run_id="live-run")
        _, _, g = check_json()
        assert not g["no_other_training"]["ok"] and "holds the run lock for live-run" in g["no_other_training"]["message"]
        assert no_other_training_on_a_quiet_machine().ok is False  # the lock alone refuses
    finally:
        stop_process(owner)
    dead = dead_pid()
    plant(artifact_root, pid=dead, run_id="dead-run")
    lock = json.loads(invoke("status", "--json").stdout)["lock"]
    assert (lock["pid"], lock["run_id"], lock["stale"], lock["reason"]) == (dead, "dead-run", True, f"pid {dead} is not running")
    _, _, g = check_json()
    assert "holds the run lock" not in g["no_other_training"]["message"]  # whatever else runs here
    verdict = no_other_training_on_a_quiet_machine()
    assert verdict.ok and verdict.message.endswith(f"stale lock of pid {dead} will be taken over")


def test_check_without_config_and_bad_options_exit_2(tmp_path, monkeypatch, project):
    r = invoke("check", "--cap", "-1")
    assert r.exit_code == 2 and "--cap: Input should be greater than or equal to 0" in r.stderr
    r = invoke("check", "--wait-gpus", "later")
    assert r.exit_code == 2 and "--wait-gpus" in r.stderr
    monkeypatch.chdir(tmp_path)
    r = invoke("check")
    assert r.exit_code == 2 and "moectl init" in r.stderr and "Traceback" not in r.output
    r = invoke("check", "--config", str(project / CONFIG_NAME), "--json", "--override", "no_other_training")
    assert r.exit_code == 0


def test_check_json_still_answers_when_there_is_nothing_to_judge(tmp_path, monkeypatch, project):
    # A script reading `check --json` learns why from stdout too: the config guard failing, or the bad option.
    (project / CONFIG_NAME).write_text((project / CONFIG_NAME).read_text() + "bogus = 1\n")
    for args in (["check", "--json"], ["run", "--dry-run", "--json"]):
        r = invoke(*args)
        data = json.loads(r.stdout)
        assert r.exit_code == 2 and data["ok"] is False and data["exit_code"] == 2, r.output
        [guard] = data["guards"]
        assert (guard["name"], guard["ok"], guard["overridable"]) == ("config", False, False)
        assert "defaults.bogus: unknown engine option" in guard["message"] and "defaults.bogus" in r.stderr
    monkeypatch.chdir(tmp_path)  # no config at all
    data = json.loads(invoke("check", "--json").stdout)
    assert data["guards"][0]["name"] == "config" and "moectl init" in data["error"]
    r = invoke("check", "--json", "--cap", "-1", "--config", str(project / CONFIG_NAME))
    data = json.loads(r.stdout)
    assert r.exit_code == 2 and (data["ok"], data["guards"]) == (False, [])  # a bad option: no guard judged
    assert data["error"] == "--cap: Input should be greater than or equal to 0"


def test_status_recent_runs_settle_a_dead_owners_run(project, artifact_root):
    from moectl.records import RunRecord, save_model

    run_dir = artifact_root / "20250101_000000_moe-orphan"
    run_dir.mkdir(parents=True)
    import socket

    rec = RunRecord(id=run_dir.name, tag="orphan", status="running", created_at="2025-01-01T00:00:00+00:00",
                    started_at="2025-01-01T00:00:00+00:00", exp_dir=str(run_dir), host=socket.gethostname(), pid=dead_pid())
    save_model(run_dir / "run.json", rec)
    plant(artifact_root, pid=rec.pid, run_id=rec.id)  # the lock its killed moectl left
    s = json.loads(invoke("status", "--json").stdout)
    assert [(r["id"], r["status"], r["error"]) for r in s["recent_runs"]] == \
        [(run_dir.name, "interrupted", "interrupted (moectl was killed)")]
    assert s["lock"] is None  # removed by the same reading, before the lock was reported
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"  # settled by reading
    assert f"{run_dir.name}  interrupted" in invoke("status").stdout
