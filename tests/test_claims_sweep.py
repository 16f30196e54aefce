"""A sweep without `--wait-gpus` whose guard starts refusing between legs: it stops there, exit 3,
the refused leg and the ones after it still `pending` in a sweep.json that stays true, the
refusal shown, nothing of the refused leg written.

The legs are cuda runs of a stand-in trainer, so `gpus_idle` judges them through the fake NVML
reading (the suite's one fake). Leg 1's trainer waits for a go-file: while it waits, its guards
have passed and its record says running; the test then makes GPU 0 busy and lets it train. Leg 2's
guards see the busy GPU. No race against the trainer's speed, no sleeps. `--override
no_other_training`: other sessions may be training on this machine; that guard is not the subject.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moectl.lock import LOCK_NAME
from tests.conftest import git, gpu, wait_for

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 180.0

@pytest.mark.slow
def test_guard_refusing_between_legs_stops_the_sweep_with_exit_3_and_a_true_sweep_json(
        git_repo, artifact_root, fake_nvml, tmp_path):
    gate = tmp_path / "go"  # the trainer holds before its first step until this file exists
    (git_repo / ".moectl.toml").write_text(
        '[project]\nname = "moe"\nbranch = "main"\nvenv = ""\n\n'
        '[launch]\nmodule = "tests.fixtures.fake_engine"\n'
        f'env = {{ PYTHONPATH = "{REPO}", OMP_NUM_THREADS = "1" }}\n\n'
        '[metrics]\nwindow = 5\n\n[defaults]\npreset = "tiny"\ndevice = "cuda"\n'
    )
    git(git_repo, "add", ".moectl.toml")
    git(git_repo, "commit", "-q", "-m", "moectl config")
    spec = git_repo / "three.toml"
    spec.write_text('name = "three"\n[common]\nsteps = 3\n'
                    f'args = ["--sleep-per-step", "0.01", "--hold-at-step", "0", "--hold-until", "{gate}"]\n'
                    '[[legs]]\ntag = "leg_a"\n[[legs]]\ntag = "leg_b"\n[[legs]]\ntag = "leg_c"\n')
    fake_nvml(gpus=[gpu(0)])  # idle: the sweep and leg 1 may start
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "moectl", "sweep", str(spec), "--override", "no_other_training"],
                            cwd=git_repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(gate.with_name("go.waiting").exists, "leg 1's trainer starting", DEADLINE_S, proc=proc)
        fake_nvml(gpus=[gpu(0, util_pct=97, mem_used_mib=41000,
                            processes=[{"pid": 31337, "name": "someone_elses_job", "used_mib": 40000}])])
        gate.touch()
        out, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=DEADLINE_S)

    assert proc.returncode == 3, (out, err)
    # The refusal is shown, naming the guard and what it saw.
    refused = [ln for ln in err.splitlines() if ln.startswith("error: refused: gpus_idle:")]
    assert len(refused) == 1 and "util 97%" in refused[0], err
    assert "leg leg_b: a guard refused it; stopping the sweep here" in out
    assert "Traceback" not in out + err

    [sweep_dir] = [p.parent for p in artifact_root.glob("*/sweep.json")]
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(leg["tag"], leg["state"]) for leg in sweep["legs"]] == [
        ("leg_a", "completed"), ("leg_b", "pending"), ("leg_c", "pending")]
    [leg_a] = [p.parent for p in sweep_dir.glob("*/run.json")]  # nothing written for leg_b or leg_c
    assert sweep["legs"][0]["run_id"] == leg_a.name and json.loads((leg_a / "run.json").read_text())["status"] == "completed"
    assert sweep["legs"][1]["run_id"] is None and sweep["legs"][2]["run_id"] is None
    assert not (artifact_root / LOCK_NAME).exists()

    # The sweep report says why it stopped; `--resume` would pick up exactly the pending legs.
    [report] = list((git_repo / "reports").glob("*_sweep_three.md"))
    text = report.read_text()
    assert "stopped: a guard refused a leg" in text and "refused: gpus_idle:" in text
    subjects = git(git_repo, "log", "-2", "--format=%s").splitlines()
    assert subjects[0] == "report: sweep three — stopped: a guard refused a leg, 1/3 legs", subjects
    assert subjects[1].startswith("report: leg_a — "), subjects  # leg 1's own report, before it
    assert report.relative_to(git_repo).as_posix() in git(git_repo, "show", "--name-only", "--format=", "HEAD").split()
