"""Slurm's own commands, wrapped: sbatch, scontrol, squeue, scancel (moectl never schedules itself).

    job_id = submit(script_path, env)          # sbatch --parsable --hold: the job waits for release()
    release(job_id)                            # after run.json names the job (see below)
    info = job_info(job_id)                    # scontrol show job -o; None once Slurm forgot it
    jobs = queue()                             # moectl's jobs in squeue (status)
    cancel([job_id])                           # scancel: Slurm sends SIGTERM, the job records `interrupted`

Why the job is submitted held: run.json has one writer at a time. The submitter writes `queued` +
job id; the job writes `running` and the end. Were the job released at submission, a job that
starts at once could write `running` before the submitter wrote the job id, and the submitter would
then overwrite it with `queued`. `--hold` + `scontrol release` after the write orders the two; the
record's `released` (false until the release) tells a job whose submitter died in between, which
nobody would ever release, from one a person held on purpose (execution.settle_abandoned_hold).

Why `scontrol show job` and not `sacct`: clusters without accounting (our local one) have no sacct;
`scontrol` knows every job for MinJobAge after it ends, and after that the job's absence plus its
run record (written by the job itself) says everything moectl needs.

The batch script (`batch_script`) runs `python -m moectl.job RUN_DIR` from the run's code snapshot;
moectl/job.py is what happens inside the job. For several nodes it starts torchrun on each with
`srun`, meeting at the first node's NodeAddr (`head_address`): the node *name* need not resolve.
Torch-free, like all of moectl.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Optional, Sequence

from moectl.errors import MoectlError, UsageError

if TYPE_CHECKING:
    from moectl.config_schema import ClusterSection

JOB_NAME_PREFIX = "moectl:"  # every job moectl submits is named moectl:<run id> (status lists them)
# Slurm states in which the job may still run (or is ending: its batch script may still write).
LIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
})
COMMAND_TIMEOUT_S = 60  # a controller that answers nothing for a minute is an error, not a hang
REQUEUE_SIGNAL = "USR1"  # sent to the batch script a little before the time limit (--requeue)
REQUEUE_SIGNAL_BEFORE_S = 120  # ... this long before it, or a quarter of a shorter limit (requeue_margin_s)
REQUEUE_SIGNAL_MIN_S = 10


@dataclass
class JobInfo:
    job_id: str
    state: str  # PENDING, RUNNING, COMPLETED, CANCELLED, FAILED, TIMEOUT, ...
    exit_code: Optional[str] = None  # "0:0" (code:signal)
    reason: Optional[str] = None
    nodes: Optional[str] = None  # NodeList
    num_nodes: Optional[int] = None
    run_time: Optional[str] = None
    restarts: int = 0
    name: Optional[str] = None
    time_limit: Optional[str] = None  # TimeLimit, as Slurm prints it ("00:01:00", "UNLIMITED")

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


@dataclass
class QueuedJob:
    job_id: str
    name: str
    state: str
    nodes: int
    elapsed: str
    where: str  # node list, `pending: <reason>`, or "" (pending, Slurm gave no reason yet)

    @property
    def run_id(self) -> str:
        return self.name.removeprefix(JOB_NAME_PREFIX)

    def to_dict(self) -> dict:
        return {"job_id": self.job_id, "run_id": self.run_id, "state": self.state, "nodes": self.nodes,
                "elapsed": self.elapsed, "where": self.where}


def available() -> Optional[str]:
    """Why Slurm cannot be used from here, or None when it can."""
    missing = [c for c in ("sbatch", "scontrol", "squeue", "scancel") if shutil.which(c) is None]
    if missing:
        return f"no {missing[0]} on PATH (is this a Slurm login node? locally: eval \"$(bash scripts/local_slurm.sh start)\")"
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):
        # Slurm's tools would retry reading it for 60 s before saying so.
        return f"SLURM_CONF={conf} does not exist (a stopped local cluster? `bash scripts/local_slurm.sh start`)"
    return None


def controller_problem() -> Optional[str]:
    """Why Slurm's controller does not answer from here (`scontrol ping`: a machine with Slurm's
    tools and no cluster configured, a slurmctld that is down), or None when it does. Fast either
    way: a missing configuration or a refused connection fails at once."""
    try:
        proc = _run(["scontrol", "ping"])
    except MoectlError as exc:
        return exc.message
    if proc.returncode == 0:
        return None
    lines = [line.strip() for line in f"{proc.stdout}\n{proc.stderr}".splitlines()
             if line.strip() and not line.strip().startswith("*")]  # (its RESTORE SLURMCTLD banner)
    states = [line for line in lines if line.startswith("Slurmctld(")]  # "Slurmctld(primary) at h is DOWN"
    return "; ".join(states) if states else (lines[-1] if lines else f"scontrol ping: exit {proc.returncode}")


def require() -> None:
    """UsageError (exit 2) unless a job can be submitted from here: Slurm's tools on PATH, its
    configuration there, its controller answering. Before anything is written for a run."""
    why = available()
    if why:
        raise UsageError(f"--slurm: {why}")
    down = controller_problem()
    if down:
        raise UsageError(f"--slurm: Slurm's controller does not answer: {down} (is slurmctld up, and SLURM_CONF "
                         "the cluster's configuration?)")


# The moment (time.monotonic()) by which a command must have answered: `wait --timeout 5m` means
# five minutes, also while slurmctld is down and every scontrol retries for MessageTimeout.
_answer_by: contextvars.ContextVar[Optional[float]] = contextvars.ContextVar("answer_by", default=None)


@contextlib.contextmanager
def answering_by(deadline: Optional[float]) -> Iterator[None]:
    """Within it, a Slurm command that has not answered by `deadline` (monotonic; None: no bound
    but COMMAND_TIMEOUT_S) is given up as unanswered (MoectlError), at least a second after it began."""
    token = _answer_by.set(deadline)
    try:
        yield
    finally:
        _answer_by.reset(token)


def _run(argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
    timeout = float(COMMAND_TIMEOUT_S)
    deadline = _answer_by.get()
    if deadline is not None:
        timeout = max(1.0, min(timeout, deadline - time.monotonic()))
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env=dict(env) if env is not None else None)
    except FileNotFoundError:
        raise UsageError(f"--slurm: no {argv[0]} on PATH") from None
    except subprocess.TimeoutExpired:
        raise MoectlError(f"{argv[0]} gave no answer within {timeout:g} s (is slurmctld up?)") from None


def _message(proc: subprocess.CompletedProcess) -> str:
    """Slurm's own error, one line: the last non-empty line of its stderr (sbatch prints `sbatch: error: ...`),
    leaving out the `Try "sbatch --help" ...` that follows the line naming a bad option."""
    lines = [line.strip() for line in (proc.stderr or proc.stdout or "").splitlines() if line.strip()]
    lines = [line for line in lines if not (line.startswith("Try ") and "--help" in line)] or lines
    return lines[-1] if lines else f"exit {proc.returncode}"


# Pending reasons (squeue %R, scontrol Reason=) of a job Slurm accepted but will never start as
# asked: waiting on them is waiting forever. (Resources, Priority, Dependency... only mean "later".)
NEVER_STARTS = {
    "PartitionNodeLimit": "more nodes than the partition allows",
    "PartitionTimeLimit": "a longer time limit than the partition allows",
    "PartitionConfig": "more than the partition's nodes have (CPUs, GPUs, memory)",
    "BadConstraints": "resources or features no node has (memory, GPUs, --constraint)",
    "InvalidAccount": "an account Slurm does not know",
    "InvalidQOS": "a QOS Slurm does not know",
    "AccountNotAllowed": "an account the partition does not allow",
    "QOSMaxNodePerJobLimit": "more nodes than its QOS allows",
    "QOSMaxWallDurationPerJobLimit": "a longer time limit than its QOS allows",
}


def never_starts(info: Optional["JobInfo"]) -> Optional[str]:
    """Why a pending job will never start (`PartitionNodeLimit: more nodes than ...`), else None."""
    if info is None or info.state != "PENDING" or info.reason not in NEVER_STARTS:
        return None
    return f"{info.reason} ({NEVER_STARTS[info.reason]})"


# --- submitting ----------------------------------------------------------------------------------


def batch_script(*, run_id: str, run_dir: Path, code_dir: Path, python: str, cluster: ClusterSection,
                 nodes: int, requeue: bool) -> str:
    """The sbatch script of one run (pure). Every option is an #SBATCH line, so the script in the
    run directory says exactly what was asked of Slurm."""
    opts = [f"--job-name={JOB_NAME_PREFIX}{run_id}", f"--nodes={nodes}", "--ntasks-per-node=1",
            f"--output={run_dir / 'slurm-%j.out'}", f"--chdir={code_dir}"]
    if cluster.partition:
        opts.append(f"--partition={cluster.partition}")
    if cluster.account:
        opts.append(f"--account={cluster.account}")
    if cluster.time:
        opts.append(f"--time={cluster.time}")
    if cluster.gpus_per_node is not None:
        opts.append(f"--gpus-per-node={cluster.gpus_per_node}")
    if cluster.cpus_per_task is not None:
        opts.append(f"--cpus-per-task={cluster.cpus_per_task}")
    if requeue:
        # B: the signal goes to the batch script (moectl.job) only; it requeues the job itself.
        margin = requeue_margin_s(job_time_limit_s(cluster))
        opts += ["--requeue", f"--signal=B:{REQUEUE_SIGNAL}@{margin}"]
    else:
        opts.append("--no-requeue")
    opts += cluster.extra_sbatch
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH {opt}" for opt in opts),
        "# moectl.job trains the run's code snapshot (taken at submit time: the trainer's working directory",
        "# and the first entry of its PYTHONPATH). moectl itself is the venv's: started from / with the",
        "# snapshot on no path of its own, so a module of the user's (an engine/ package, a queue.py)",
        "# never stands in for one moectl imports.",
        "cd /",
        f"exec {shlex.quote(python)} -m moectl.job {shlex.quote(str(run_dir))}",
        "",
    ])


def parse_time_limit_s(text: str) -> Optional[int]:
    """A Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds, rounded up to
    the whole minutes Slurm keeps (pure). None for no limit ("0", UNLIMITED) or what is not a limit."""
    import re

    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if m is None:
        return None
    days, a, b, c = m.groups()
    if days is not None:
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
    elif c is not None:
        hours, minutes, seconds = int(a), int(b), int(c)
    else:
        hours, minutes, seconds = 0, int(a), int(b or 0)
    total = ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    return -(-total // 60) * 60 if total else None


def job_time_limit_s(cluster: ClusterSection) -> Optional[int]:
    """The time limit moectl asks of Slurm for a job, in seconds: [cluster] time, or a --time / -t in
    extra_sbatch (its #SBATCH line comes later, so it wins). None when neither sets one (the
    partition's default then applies, which moectl does not know)."""
    import re

    limit = cluster.time
    for opt in cluster.extra_sbatch:
        m = re.fullmatch(r"(?:--time[= ]|-t ?)\s*(\S+)", opt)
        if m:
            limit = m.group(1)
    return parse_time_limit_s(limit) if limit else None


def requeue_margin_s(limit_s: Optional[int]) -> int:
    """How long before the time limit a `--requeue` job is sent USR1 (pure): REQUEUE_SIGNAL_BEFORE_S,
    or a quarter of a shorter limit. A margin as long as the limit would signal the job as soon as
    it starts, and it would requeue itself for ever without training a step."""
    if limit_s is None:
        return REQUEUE_SIGNAL_BEFORE_S
    return max(REQUEUE_SIGNAL_MIN_S, min(REQUEUE_SIGNAL_BEFORE_S, limit_s // 4))


def submit(script: Path, env: Optional[Mapping[str, str]] = None, dependency: Optional[str] = None,
           hold: bool = True) -> str:
    """sbatch the script; returns the job id. A job Slurm rejects (unknown partition, bad option,
    more nodes than exist) raises UsageError with Slurm's own message."""
    argv = ["sbatch", "--parsable"] + (["--hold"] if hold else [])
    if dependency:
        argv.append(f"--dependency={dependency}")
    proc = _run([*argv, str(script)], env)
    if proc.returncode != 0:
        raise UsageError(f"Slurm rejected the job: {_message(proc)}")
    job_id = proc.stdout.strip().split(";", 1)[0]  # "<id>" or "<id>;<cluster>"
    if not job_id.isdigit():
        raise MoectlError(f"sbatch printed no job id: {proc.stdout.strip()!r}")
    return job_id


def release(job_id: str) -> None:
    proc = _run(["scontrol", "release", job_id])
    if proc.returncode != 0:
        raise MoectlError(f"scontrol release {job_id}: {_message(proc)}")


def cancel(job_ids: Sequence[str], signal: Optional[str] = None) -> None:
    """scancel: Slurm sends the job's processes SIGTERM (then SIGKILL after KillWait)."""
    if not job_ids:
        return
    proc = _run(["scancel", *([f"--signal={signal}"] if signal else []), *job_ids])
    if proc.returncode != 0 and "Invalid job id" not in (proc.stderr or ""):
        raise MoectlError(f"scancel {' '.join(job_ids)}: {_message(proc)}")


def requeue(job_id: str) -> None:
    proc = _run(["scontrol", "requeue", job_id])
    if proc.returncode != 0:
        raise MoectlError(f"scontrol requeue {job_id}: {_message(proc)}")


# --- observing -----------------------------------------------------------------------------------


def parse_show_job(text: str) -> Optional[JobInfo]:
    """One line of `scontrol show job -o` -> JobInfo (pure)."""
    fields: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    if "JobId" not in fields:
        return None
    num = fields.get("NumNodes", "").split("-")[0]
    return JobInfo(
        job_id=fields["JobId"], state=fields.get("JobState", "UNKNOWN"), exit_code=fields.get("ExitCode"),
        reason=fields.get("Reason"), nodes=fields.get("NodeList"), num_nodes=int(num) if num.isdigit() else None,
        run_time=fields.get("RunTime"), restarts=int(fields.get("Restarts", "0") or 0), name=fields.get("JobName"),
        time_limit=fields.get("TimeLimit"),
    )


def job_info(job_id: str) -> Optional[JobInfo]:
    """What Slurm knows of a job, or None when it knows nothing (ended longer than MinJobAge ago,
    or never existed). Raises MoectlError when Slurm cannot be asked (no controller)."""
    proc = _run(["scontrol", "show", "job", "-o", job_id])
    if proc.returncode != 0:
        if "Invalid job id" in (proc.stderr or ""):
            return None
        raise MoectlError(f"scontrol show job {job_id}: {_message(proc)}")
    return parse_show_job(proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else "")


def accounted_end(job_id: str) -> Optional[JobInfo]:
    """How a job ended, from Slurm's accounting (`sacct`), for a job the controller has forgotten
    (finished more than MinJobAge ago); None where there is no accounting or it has no such job."""
    try:
        proc = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State,ExitCode"])
    except MoectlError:  # (no sacct on PATH, or no answer)
        return None
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0] == job_id:
            # "CANCELLED by 1000" -> CANCELLED
            return JobInfo(job_id=job_id, state=parts[1].split()[0] if parts[1].split() else "", exit_code=parts[2])
    return None


def parse_squeue(text: str) -> list[QueuedJob]:
    """`squeue -h -o '%i|%j|%T|%D|%M|%R'` lines -> moectl's jobs (pure; other jobs skipped)."""
    jobs = []
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) != 6 or not parts[1].startswith(JOB_NAME_PREFIX):
            continue
        job_id, name, state, nodes, elapsed, where = parts
        # %R: the node list of a running job, `(Reason)` of a pending one; `(None)` = no reason yet.
        if where.startswith("(") and where.endswith(")"):
            where = "" if where == "(None)" else f"pending: {where[1:-1]}"
        jobs.append(QueuedJob(job_id=job_id, name=name, state=state, nodes=int(nodes) if nodes.isdigit() else 0,
                              elapsed=elapsed, where=where))
    return jobs


def queue() -> list[QueuedJob]:
    proc = _run(["squeue", "-h", "-o", "%i|%j|%T|%D|%M|%R"])
    if proc.returncode != 0:
        raise MoectlError(f"squeue: {_message(proc)}")
    return parse_squeue(proc.stdout)


# --- inside the job ------------------------------------------------------------------------------


def head_address(nodelist: str) -> str:
    """The first node's NodeAddr: where torchrun's c10d rendezvous listens."""
    proc = _run(["scontrol", "show", "hostnames", nodelist])
    if proc.returncode != 0 or not proc.stdout.strip():
        raise MoectlError(f"scontrol show hostnames {nodelist}: {_message(proc)}")
    first = proc.stdout.split()[0]
    proc = _run(["scontrol", "show", "node", "-o", first])
    for token in proc.stdout.split():
        if token.startswith("NodeAddr="):
            return token.split("=", 1)[1]
    return first


# Each job meets at a port of its own: two multi-node jobs whose first node is the same machine
# (a `--repeat` group, sweep legs) must not meet at one TCPStore, where the second would join the
# first's world and fail when it ends. [cluster] rdzv_port is the base of a span of this many ports.
RDZV_PORT_SPAN = 1000


def rendezvous_port(base: int, job_id: str) -> int:
    """The c10d rendezvous port of one job: `base + job id mod RDZV_PORT_SPAN` (pure, deterministic:
    every node of the job computes the same port; jobs whose ids differ by less than the span never
    share one)."""
    digits = job_id.split("_", 1)[0]  # an array task's "<job>_<task>" counts by its job id
    return base + (int(digits) % RDZV_PORT_SPAN if digits.isdigit() else 0)


def multinode_argv(argv: Sequence[str], *, nnodes: int, head: str, port: int, job_id: str) -> list[str]:
    """A `--standalone` torchrun argv made into one agent per node under srun, meeting through
    c10d at the first node (pure). `--standalone` would make each node a world of its own."""
    out = list(argv)
    if "--standalone" not in out:
        raise ValueError("expected a torchrun argv with --standalone")
    at = out.index("--standalone")
    out[at:at + 1] = ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{head}:{port}",
                      "--rdzv-id", job_id]
    # --kill-on-bad-exit: one agent failing ends the others rather than leaving them at a barrier.
    return ["srun", "--ntasks-per-node=1", f"--nodes={nnodes}", "--kill-on-bad-exit=1", *out]


# What `check --slurm` / `run --slurm --dry-run` show where the job fills in values only it knows.
FIRST_NODE, JOB_ID = "FIRST_NODE", "JOB_ID"


def job_argv_preview(argv: Sequence[str], *, nnodes: int, port: int) -> list[str]:
    """The command a job of `nnodes` nodes will run, as `multinode_argv` makes it inside the
    allocation, with its first node's address and its job id as FIRST_NODE and JOB_ID (pure)."""
    if nnodes <= 1:
        return list(argv)
    return multinode_argv(argv, nnodes=nnodes, head=FIRST_NODE, port=port, job_id=JOB_ID)


def allocated_gpus(environ: Mapping[str, str] = os.environ) -> Optional[list[int]]:
    """The GPU indices Slurm gave this job (SLURM_JOB_GPUS / SLURM_STEP_GPUS), None when it says none."""
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        value = environ.get(name, "").strip()
        if value:
            try:
                return [int(x) for x in value.split(",")]
            except ValueError:
                return None
    return None
