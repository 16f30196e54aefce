"""Multi-node training on the local 2-node Slurm cluster (issue 9): `srun` starts one torchrun agent
per node, the agents meet through torchrun's c10d rendezvous at the first node, and the engine trains
on what torchrun gives it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), nothing more.

The claim: on CPU with gloo, 2 nodes x 1 process train the same losses (within 1e-5) as 1 node x 2
processes for the same seed and global batch. The global batch is the same by construction: both
runs pass the same engine options (preset tiny: 16 sequences x 64 tokens per micro-batch per rank,
no --total-batch-size, so one micro-batch per rank and no accumulation) and both have world size 2,
so each step trains 2 x 16 x 64 tokens, and rank r reads the same data chunks in both (the loaders
split the stream by RANK and WORLD_SIZE). The test checks the world size and tokens per step
from each run's start record rather than trusting this paragraph.

On two nodes both workers have LOCAL_RANK 0: an engine that chose its metrics writer by LOCAL_RANK
would have both write one metrics.jsonl on a shared filesystem. The test sees each step once."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from engine.schema import RunSummary, StartInfo, StepMetrics, parse_line
from tests.slurm_fixtures import SLURM_TESTS, free_ports

REPO = Path(__file__).resolve().parents[1]
pytestmark = [*SLURM_TESTS, pytest.mark.slow]

SEED, STEPS = 1234, 8
ENGINE_ARGS = ["-m", "engine.train", "--preset", "tiny", "--device", "cpu", "--steps", str(STEPS),
               "--seed", str(SEED), "--eval-batches", "2"]
# One intra-op thread per worker in both runs: torchrun sets it only when a node has several
# processes, and on this 2-core machine the two "nodes" share the same cores.
RUN_ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
RUN_TIMEOUT_S = 400
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}  # Slurm's final job states


def read_metrics(out_dir: Path):
    path, records = out_dir / "metrics.jsonl", []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(parse_line(line))
        except ValueError as exc:  # e.g. two ranks writing one file: torn lines
            pytest.fail(f"{path} line {number}: {exc}: {line[:200]!r}")
    return ([r for r in records if isinstance(r, StartInfo)], [r for r in records if isinstance(r, StepMetrics)],
            [r for r in records if isinstance(r, RunSummary)])


def sbatch_script(out_dir: Path, log: Path, port: int) -> str:
    """What `moectl run --slurm --nodes 2` is to submit: one torchrun agent per node (srun), the
    rendezvous endpoint at the first node's address, the job id as rendezvous id. Each task first
    says which node it runs on."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "$SLURM_NNODES", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "$head:" + str(port), "--rdzv-id", "$SLURM_JOB_ID",
                *ENGINE_ARGS, "--out-dir", str(out_dir)]
    return "\n".join([
        "#!/bin/bash",
        "#SBATCH -N 2",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH -o {log}",
        "set -euo pipefail",
        *(f"export {name}={value}" for name, value in RUN_ENV.items()),
        'first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        # NodeAddr, not the node name: the name need not resolve (here n1 and n2 are both 127.0.0.1).
        "head=$(scontrol show node \"$first\" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')",
        'echo "head $first $head"',
        "srun bash -c 'echo \"task $SLURM_PROCID on $SLURMD_NODENAME\"; exec \"$@\"' task " + " ".join(torchrun),
        "",
    ])


def run_job(sbatch_args: list[str], env: dict, cwd: Path) -> tuple[str, str]:
    """Submit a batch job and wait for its end: (JobState, ExitCode) as `scontrol show job` says.
    Not `sbatch --wait`: it looks at the job after 2, 10 and 42 s (its sleep grows x4 up to a
    third of MinJobAge), so a 15 s job took 42 s of the suite."""
    submitted = subprocess.run(["sbatch", "--parsable", *sbatch_args], env=env, cwd=cwd, capture_output=True,
                               text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True,
                               timeout=60).stdout
        fields = dict(f.split("=", 1) for f in shown.split() if "=" in f)
        if fields.get("JobState") in ENDED:
            return fields["JobState"], fields.get("ExitCode", "?")
        time.sleep(0.25)
    pytest.fail(f"Slurm job {job_id} still not ended after {RUN_TIMEOUT_S} s")


def test_two_nodes_one_process_each_train_the_same_losses_as_one_node_two_processes(slurm_env, tmp_path):
    two_nodes, one_node = tmp_path / "two-nodes", tmp_path / "one-node"
    log, script = tmp_path / "job.out", tmp_path / "job.sh"
    script.write_text(sbatch_script(two_nodes, log, free_ports()))
    name = f"moectl-multinode-{uuid.uuid4().hex[:8]}"
    # The one-node run trains meanwhile, beside the job (each at a port of its own).
    local = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              *ENGINE_ARGS, "--out-dir", str(one_node)],
                             cwd=tmp_path, env={**os.environ, **RUN_ENV}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        state = run_job(["-J", name, str(script)], slurm_env, tmp_path)
        _, local_err = local.communicate(timeout=RUN_TIMEOUT_S)
    finally:  # a timed-out wait leaves the job (or the local run) going: neither may outlive the test
        subprocess.run(["scancel", "-n", name], env=slurm_env, capture_output=True, timeout=60)
        if local.poll() is None:
            local.kill()
            local.wait()
    output = log.read_text() if log.exists() else "(no job output)"
    assert state == ("COMPLETED", "0:0"), f"the job ended {state}\n{output[-4000:]}"
    tasks = [line.split() for line in output.splitlines() if line.startswith("task ")]  # task <procid> on <node>
    assert sorted(t[3] for t in tasks) == ["n1", "n2"] and sorted(t[1] for t in tasks) == ["0", "1"], output[-4000:]
    assert local.returncode == 0, local_err[-4000:]

    (start2, steps2, (summary2,)), (start1, steps1, (summary1,)) = read_metrics(two_nodes), read_metrics(one_node)
    for (start,) in (start2, start1):  # one start record: a single writer, the rank 0 of the world
        assert start.world_size == 2 and start.tokens_per_step == 2 * 16 * 64
        assert start.config["seed"] == SEED and start.config["grad_accum"] == 1
    assert [s.step for s in steps2] == [s.step for s in steps1] == list(range(STEPS))
    assert summary2.world_size == 2
    for a, b in zip(steps2, steps1):
        assert abs(a.loss - b.loss) <= 1e-5, f"step {a.step}: 2 nodes {a.loss} vs 1 node {b.loss}"
    assert summary2.val_loss is not None and abs(summary2.val_loss - summary1.val_loss) <= 1e-5
    assert steps1[-1].loss < steps1[0].loss  # it trained: equal losses of a run that learns nothing say little
