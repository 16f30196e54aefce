"""The local 2-node Slurm cluster of scripts/local_slurm.sh: real slurmctld, two real slurmd, real
sbatch/srun. Gating and the session's one cluster (`slurm_env`): tests/slurm_fixtures.py."""
from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import wait_for
from tests.slurm_fixtures import SLURM_TESTS, local_slurm

pytestmark = SLURM_TESTS


def _run(env, *argv: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_start_is_idempotent_and_both_nodes_idle(slurm_env):
    again = local_slurm("start", timeout=60)
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
