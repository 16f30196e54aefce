"""The local 2-node Slurm cluster of scripts/local_slurm.sh: real slurmctld, two real slurmd, real
sbatch/srun. They run under CI=true (CI is root on a machine that reaches Debian's packages) and
with MOECTL_TEST_SLURM=1; elsewhere they skip, since the script may apt-get install slurm-wlm and
runs its daemons as root. When they run, a cluster that does not come up fails them with the
script's message; it never skips them."""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "local_slurm.sh"

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.environ.get("MOECTL_TEST_SLURM") != "1" and os.environ.get("CI") != "true",
                       reason="needs the local Slurm cluster: set MOECTL_TEST_SLURM=1 (root; may apt-get install "
                              "slurm-wlm); always run under CI=true"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# This test session's own cluster: its own state directory and ports, so two suites on one machine
# (two checkouts, a CI clone beside a developer's run) never meet on 6817-6819 or in one .slurm/.
_OWN: dict[str, str] = {}


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **_OWN})


@pytest.fixture(scope="session")
def slurm_env():
    """The environment of a shell that ran `eval "$(local_slurm.sh start)"`, for a cluster of this
    session's own (a short temp dir: munge's socket path must stay under 100 bytes), stopped and
    removed after it."""
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(_free_port())
    state = tempfile.mkdtemp(prefix="moectl-slurm-")
    _OWN.update(MOECTL_SLURM_DIR=state, **{f"MOECTL_SLURM_{name}_PORT": str(port)
                                           for name, port in zip(("CTLD", "N1", "N2"), sorted(ports))})
    try:
        # Generous: the first start on a fresh machine includes apt-get install.
        started = _script("start", timeout=280)
        assert started.returncode == 0, f"local_slurm.sh start failed:\n{started.stderr}"
        env = {**os.environ, **_OWN}
        for line in started.stdout.splitlines():
            assert line.startswith("export ") and "=" in line, f"start printed a line that is not an export: {line!r}"
            name, value = line[len("export "):].split("=", 1)
            env[name] = value
        assert Path(env["SLURM_CONF"]).is_file() and env["MOECTL_SLURM_DIR"] == state
        yield env
    finally:
        stopped = _script("stop", "--purge", timeout=120)
        _OWN.clear()
        assert stopped.returncode == 0, f"local_slurm.sh stop failed:\n{stopped.stderr}"


def _run(env, *argv: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_start_is_idempotent_and_both_nodes_idle(slurm_env):
    again = _script("start", timeout=60)
    assert again.returncode == 0, again.stderr
    assert f"export SLURM_CONF={slurm_env['SLURM_CONF']}" in again.stdout.splitlines()
    nodes = _run(slurm_env, "sinfo", "-N", "-h", "-o", "%N %t")
    assert nodes.returncode == 0, nodes.stderr
    assert sorted(line.split()[0] for line in nodes.stdout.splitlines()) == ["n1", "n2"]


def test_sbatch_wait_runs_the_job_and_writes_its_output(slurm_env, tmp_path):
    result = _run(slurm_env, "sbatch", "--wait", "-o", str(tmp_path / "job-%j.out"),
                  "--wrap", "echo ran-on-$SLURMD_NODENAME; echo ok", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (out,) = tmp_path.glob("job-*.out")
    lines = out.read_text().splitlines()
    assert lines[-1] == "ok"
    assert lines[0] in ("ran-on-n1", "ran-on-n2")


def test_sbatch_wait_returns_the_jobs_exit_code(slurm_env, tmp_path):
    result = _run(slurm_env, "sbatch", "--wait", "-o", "/dev/null", "--wrap", "exit 3", cwd=tmp_path)
    assert result.returncode == 3, (result.returncode, result.stderr)


def test_srun_on_two_nodes_runs_one_task_on_each(slurm_env, tmp_path):
    result = _run(slurm_env, "srun", "-N2", "--ntasks-per-node=1", "bash", "-c",
                  "echo $SLURMD_NODENAME $SLURM_NNODES $SLURM_PROCID", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = sorted(line.split() for line in result.stdout.splitlines())
    assert [row[0] for row in rows] == ["n1", "n2"]
    assert {row[1] for row in rows} == {"2"}
    assert sorted(row[2] for row in rows) == ["0", "1"]


def test_a_job_on_each_node_runs_at_the_same_time(slurm_env, tmp_path):
    """Both jobs must be running before either may finish: each waits for a file the test writes
    only after it saw both start."""
    go = tmp_path / "go"
    job_ids = []
    for node in ("n1", "n2"):
        script = (f"touch {tmp_path}/started-$SLURMD_NODENAME; "
                  f"for i in $(seq 1200); do [ -e {go} ] && exit 0; sleep 0.1; done; exit 1")
        submitted = _run(slurm_env, "sbatch", "--parsable", "-w", node, "-o", "/dev/null", "--wrap", script,
                         cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stderr
        job_ids.append(submitted.stdout.strip().split(";")[0])
    try:
        wait_for(lambda: (tmp_path / "started-n1").exists() and (tmp_path / "started-n2").exists(),
                 "the jobs on n1 and n2 both running", timeout=90)
    finally:
        go.touch()
    wait_for(lambda: _run(slurm_env, "squeue", "-h", "-j", ",".join(job_ids)).stdout.strip() == "",
             "both jobs leaving the queue", timeout=90, poll_s=0.5)
