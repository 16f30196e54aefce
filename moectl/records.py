"""The on-disk records (SPEC §6, §7a) as pydantic models.

`run.json` and `sweep.json` are contracts: keys listed in SPEC §7a are stable; more may be added.
Every write goes through `write_json_atomic` (moectl/atomic.py, re-exported here: temp file in the
same directory, fsync, rename), so a reader never sees half a record even if moectl is killed
mid-write. Reading them back without these models (`status`, `runs --json`): moectl/runindex.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field

from moectl.atomic import atomic_file, write_json_atomic, write_text_atomic  # noqa: F401  (re-exported)
# The store's layout and the unsettled states, defined with the models-free read path.
from moectl.runindex import RUN_RECORD, SWEEP_RECORD, UNSETTLED  # noqa: F401  (re-exported)

RunStatus = Literal["created", "queued", "running", "completed", "failed", "interrupted", "refused", "imported"]
LegState = Literal["pending", "queued", "running", "completed", "failed", "interrupted", "refused"]


class GuardResult(BaseModel):
    name: str
    ok: bool
    message: str
    overridable: bool = False
    overridden: bool = False  # failed, but a person passed --override NAME
    skipped: bool = False  # not applicable (e.g. GPU guard on a cpu run); ok is True then


class GitInfo(BaseModel):
    branch: Optional[str] = None  # None on a detached HEAD
    commit: Optional[str] = None
    dirty: bool = False


class Summary(BaseModel):
    """Tail-window summary of a run (SPEC §7). None where the run lacks the metric."""

    window: int
    steps: int  # the steps the tail means cover: at most `window`, none from the warm-up when the run has more
    tok_per_sec: Optional[float] = None
    dt_ms: Optional[float] = None
    mfu: Optional[float] = None
    peak_mem_mib: Optional[float] = None
    total_time_min: Optional[float] = None
    final_loss: Optional[float] = None
    drop_frac: Optional[float] = None
    expert_load_max: Optional[float] = None  # tail mean of the busiest expert's share of tokens
    # Beyond the §7a minimum (issue 7). Steps numbered below `first_step + warmup_steps` never enter
    # the window (`first_step`: 1 for a trainer that counts its steps from 1, moectl.metrics.counted_from);
    # `clean` is False when the run has no step past them, and its tail means then cover warm-up
    # (marked wherever shown). `note` says that, or that the window holds fewer than `window`
    # steps. A record written before these keys existed reads as clean with no warm-up left out,
    # which is what its numbers were.
    run_steps: Optional[int] = None  # every step the run recorded (null in records written before this key)
    warmup_steps: int = 0
    first_step: int = 0
    # The step its last process resumed at (a requeued Slurm job, `--resume`), null when it ran from
    # the start: `warmup_steps` then counts the steps before it too (moectl.metrics.stretch_warmup).
    resumed_at: Optional[int] = None
    clean: bool = True
    note: Optional[str] = None
    # Steps whose loss was not finite (NaN / inf: a diverged run; moectl.metrics): how many, and the
    # first. They are real steps, counted in `steps` and the tail means like any other; when the last
    # one is among them `final_loss` is null (JSON has no NaN) and `final_loss_not_finite` is true.
    loss_not_finite: int = 0
    loss_not_finite_from: Optional[int] = None

    @property
    def final_loss_not_finite(self) -> bool:
        """The final loss is NaN (null here): the run ended diverged, not without a loss."""
        return self.final_loss is None and self.loss_not_finite > 0


class TrackerMirror(BaseModel):
    """What one tracker holds of a run (run.json `tracking.<mlflow|wandb>`, moectl/tracking.py):
    `moectl sync` retries every run whose mirror failed or went to another destination."""

    status: Literal["mirrored", "failed"]
    target: str  # where: the MLflow URI and experiment, or the W&B entity/project and mode
    run_id: Optional[str] = None  # the tracker's own id of this run
    location: Optional[str] = None  # the run's page, or W&B's offline run directory
    at: str  # when the attempt ended
    took_s: float  # how long it took (bounded: a tracker that is down never holds a run up)
    error: Optional[str] = None  # why it failed; the retry command is `moectl sync RUN`
    report: Optional[str] = None  # the report it was sent (None: none yet); a later one makes it due again


class RunRecord(BaseModel):
    id: str
    tag: Optional[str] = None
    status: RunStatus = "created"
    created_at: str
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    exit_code: Optional[int] = None
    argv: list[str] = Field(default_factory=list)  # the exact torchrun command
    options: dict[str, Any] = Field(default_factory=dict)  # engine options (preset, cap, ...)
    git: GitInfo = Field(default_factory=GitInfo)
    guards: list[GuardResult] = Field(default_factory=list)
    overrides: list[str] = Field(default_factory=list)
    exp_dir: str
    summary: Optional[Summary] = None
    error: Optional[str] = None  # log tail of a failed run, or why it did not complete
    # Beyond the §7a minimum:
    host: Optional[str] = None
    # The repository it ran from (resolved): EXPERIMENTS.md of one project leaves out another's runs
    # when both share an artifact root (the default one in ~/.cache does). None in older records.
    repo: Optional[str] = None
    pid: Optional[int] = None  # the moectl process that owns a running run (stale detection)
    # The tail window its summary is computed over and the warm-up steps kept out of it ([metrics]
    # at launch), so a reader that settles the run after its moectl was killed summarises it as
    # moectl would have.
    window: Optional[int] = None
    warmup_steps: Optional[int] = None
    gpus: list[str] = Field(default_factory=list)
    driver: Optional[str] = None
    torch_version: Optional[str] = None
    sweep: Optional[str] = None  # sweep id when the run is a sweep leg
    # A repeat group (`run --repeat N`, sweep `repeats`): its id, shared by its runs, and this
    # run's place in it (1..N). compare/show/plot/export take the group by its tag (moectl.repeats).
    group: Optional[str] = None
    repeat: Optional[int] = None
    source: Optional[str] = None  # imported runs: the original log path
    notes: Optional[str] = None
    # The engine's configuration as it resolved it (preset + flags), from the metrics start line.
    engine: dict[str, Any] = Field(default_factory=dict)
    # Trackers this run was mirrored into ([tracking]), by tracker name.
    tracking: dict[str, TrackerMirror] = Field(default_factory=dict)
    # What a reader of the numbers should know: e.g. a metrics pattern that never matched (issue 10).
    warnings: list[str] = Field(default_factory=list)
    # Runs that execute as Slurm jobs (moectl/execution.py): the job, its nodes, how many times
    # Slurm requeued it, and the report and commit the job itself wrote (nobody may be waiting).
    backend: Literal["local", "slurm"] = "local"
    job_id: Optional[str] = None
    # Whether the submitter let its held job go (`scontrol release`, moectl/execution.py step 4):
    # False from sbatch until then, True after; None in records older than the field. A job still
    # held with this False and its submitter dead was never let go (runindex.abandoned_hold).
    released: Optional[bool] = None
    nodes: Optional[int] = None
    restarts: int = 0
    report: Optional[str] = None
    # git's blob id of the report as moectl wrote it: `moectl commit RUN` commits only that, never
    # an edit of the user's made to it since (None: written by an older moectl, or git could not say)
    report_blob: Optional[str] = None
    commit: Optional[str] = None
    commit_error: Optional[str] = None  # why the job's report commit was stopped (`moectl commit RUN` retries)
    # `commit` is another process's (the user's own commit, a `moectl commit RUN` that raced this run's):
    # it holds the report, but this run committed nothing, and a Slurm follower's last line says so.
    commit_found: bool = False
    # The `--compile none` re-run a Slurm job made of this run (launch.compile_fallback), by id; it
    # sits beside this run's directory. Set for sweep legs, --detach runs and repeat groups.
    fallback_run: Optional[str] = None


class SweepLeg(BaseModel):
    tag: str
    options: dict[str, Any] = Field(default_factory=dict)
    state: LegState = "pending"
    run_id: Optional[str] = None
    fallback_of: Optional[str] = None  # tag of the leg this compile-fallback leg re-runs
    repeat: Optional[int] = None  # sweep `repeats = N`: this leg is repeat 1..N of its tag ...
    group: Optional[str] = None  # ... in this group (set when the sweep first runs; a resume keeps it)


class SweepRecord(BaseModel):
    id: str
    name: str
    spec: dict[str, Any]
    legs: list[SweepLeg]
    resumed_from: Optional[str] = None  # the chain's original sweep (SPEC §7a), for every resume of it
    # The sweep this resume continued (the newest of its chain then): the chain's links. A
    # sweep.json written before this key has only `resumed_from`, which then named that sweep.
    previous: Optional[str] = None
    created_at: str
    finished_at: Optional[str] = None
    exp_dir: str
    report_job: Optional[str] = None  # sweep --slurm: the Slurm job that writes the final report
    report: Optional[str] = None  # ... and the report it wrote
    config: Optional[str] = None  # the .moectl.toml it ran with (absolute): its resume needs the same
    baseline: Optional[str] = None  # the leg tag of --baseline (None: the first completed leg)
    overrides: list[str] = Field(default_factory=list)  # its --override guards: its resume command repeats them
    repo: Optional[str] = None  # the repository it ran from, as RunRecord.repo
    # The moectl process running it (local sweeps) and where: a resume while it still runs is refused.
    pid: Optional[int] = None
    host: Optional[str] = None


def save_model(path: Path, model: BaseModel) -> None:
    write_json_atomic(path, model.model_dump(mode="json"))
