"""Runs mirrored into MLflow and Weights & Biases (`[tracking]` in .moectl.toml).

    results = mirror_run(cfg, record, report=path)   # the runner, once a run has ended (any status)
    todo = sync_plan(cfg, refs)                      # `moectl sync [RUN...]`: which runs, which trackers
    results = mirror_run(cfg, record, only=trackers)

moectl's store stays the source of truth; a tracker gets a copy, in three steps:
1. `payload(record)`: params (run options, the engine's resolved config, preset), tags (moectl run
   id, tag, sweep, git commit/branch/dirty, host, GPUs), every step's metrics from metrics.jsonl
   with its step number, the tail-window summary, and the files (report, command.txt, git.diff).
2. One small adapter per tracker sends it. It first finds the run again by its moectl run id
   (MLflow: the tag `moectl_run_id`; W&B: the run id `wandb_run_id(id)`, derived from it) and sends
   only what the tracker does not hold yet, so syncing twice never duplicates a run or a point.
3. The outcome per tracker goes into run.json `tracking.<name>` (an atomic record write), so
   `moectl sync` with no arguments retries exactly what failed.

A tracker that is down or misconfigured never fails or holds up a run: `mirror_run` returns a
result per tracker and never raises for one (Ctrl-C is raised: the command stops), the first
failed request ends that tracker's attempt, and every request is bounded. The trap: MLflow's client retries a dead server for minutes
by default (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7 with exponential backoff, MLFLOW_HTTP_REQUEST_TIMEOUT
120 s per request), so `_mlflow_env` sets both for the duration of the call. wandb gets
`init_timeout`, `finish_timeout` and short retry settings. mlflow and wandb are imported only inside
their adapter, only when configured: no other command pays for them.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from engine.schema import METRICS_FILENAME
from moectl import store
from moectl.config import Config
from moectl.errors import UsageError
from moectl.records import RunRecord, Summary, TrackerMirror
from moectl.report import find_run_report

TRACKERS = ("mlflow", "wandb")
FINISHED = ("completed", "failed", "interrupted", "imported")
# Per-step metrics mirrored (engine/schema.py StepMetrics), and the tail-window summary's.
STEP_KEYS = ("loss", "aux_loss", "lr", "dt_ms", "tok_per_sec", "mfu", "peak_mem_mib", "drop_frac",
             "expert_load_max", "elapsed_s")
# The tail figures go in as metrics; how the window was taken (its size, the warm-up left out,
# whether any clean step existed, the note saying so) goes in as params.
_WINDOW_FIELDS = ("window", "steps", "warmup_steps", "first_step", "clean", "note")
SUMMARY_KEYS = tuple(k for k in Summary.model_fields if k not in _WINDOW_FIELDS)
REQUEST_TIMEOUT_S = 10  # one request to a tracker
BUDGET_S = 120.0  # one tracker's whole attempt; a healthy tracker takes a long run in far less
_MLFLOW_STATUS = {"completed": "FINISHED", "imported": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
_MLFLOW_PARAM_MAX = 6000  # MLflow's limit on a param value


@dataclass
class Mirrored:
    """One tracker's outcome for one run: the state saved in run.json, plus what this attempt sent."""

    tracker: str
    state: TrackerMirror
    added: dict[str, int] = field(default_factory=dict)  # params, metric_points, files
    note: Optional[str] = None


@dataclass
class Payload:
    """What a tracker receives of one run (built from run.json, metrics.jsonl and the run's files)."""

    params: dict[str, Any]  # {"preset": ..., "options": {...}, "engine": {...}, "tail_window": N}
    tags: dict[str, str]
    series: dict[str, list[tuple[int, float, int]]]  # metric -> [(step, value, timestamp ms)]
    files: dict[str, Path]  # name in the tracker -> file on disk
    start_ms: int
    end_ms: int


class _Deadline:
    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, doing: str) -> None:
        if self.left() <= 0:
            raise TimeoutError(f"gave up after {self.seconds:.0f} s while {doing}")


# ------------------------------------------------------------------------------ what is configured


def configured(cfg: Config) -> list[str]:
    t = cfg.file.tracking
    return [name for name, on in (("mlflow", t.mlflow_uri), ("wandb", t.wandb_project)) if on]


def mlflow_uri(cfg: Config) -> str:
    """`mlflow_uri` with local paths made absolute the way every config path is: `~` expanded,
    relative to the config file's directory (for a directory store, `file:` and `sqlite:///FILE`):
    the same store, and the same recorded target, from whatever directory moectl runs in."""
    uri = cfg.file.tracking.mlflow_uri or ""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(_local_path(cfg, uri[len("sqlite:///"):]))
    if uri.startswith("file:"):  # file:DIR, file:~/DIR, file:///DIR, file://localhost/DIR (the config refuses others)
        from urllib.parse import unquote, urlsplit

        return _local_path(cfg, unquote(urlsplit(uri).path)).as_uri()
    if "://" in uri:
        return uri
    return str(_local_path(cfg, uri))


def mlflow_local_store(cfg: Config) -> Optional[Path]:
    """The directory MLflow writes on this machine for `mlflow_uri`: a directory store itself, a
    sqlite database's directory (with its artifacts beside it); None for a server or no MLflow."""
    if not cfg.file.tracking.mlflow_uri:
        return None
    uri = mlflow_uri(cfg)
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path))
    return None if "://" in uri else Path(uri)


def mlflow_local_files(cfg: Config) -> list[Path]:
    """What a local MLflow store creates on this machine: a directory store; a sqlite database and
    the artifact directory beside it (`_artifact_location`). Empty for a server or no MLflow."""
    uri = mlflow_uri(cfg) if cfg.file.tracking.mlflow_uri else ""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return [db, db.parent / "mlflow-artifacts"]
    store = mlflow_local_store(cfg)
    return [store] if store is not None else []


def wandb_local_dir(cfg: Config) -> Optional[Path]:
    """Where W&B writes its run files on this machine when $WANDB_DIR says (made absolute here: a
    relative one named a different directory from each working directory, and the recorded queue
    with it); None when W&B is off or the variable unset (the run's own directory then)."""
    given = os.environ.get("WANDB_DIR")
    if not cfg.file.tracking.wandb_project or not given:
        return None
    return Path(os.path.abspath(os.path.expanduser(given)))


def tracker_local_files(cfg: Config) -> list[tuple[str, Path]]:
    """(what sets it, a path) for every file or directory a tracker writes on this machine outside
    the run's own directory: a local MLflow store's, $WANDB_DIR's."""
    out = [("[tracking] mlflow_uri", p) for p in mlflow_local_files(cfg)]
    wandb_dir = wandb_local_dir(cfg)
    return out + ([("$WANDB_DIR", wandb_dir)] if wandb_dir is not None else [])


def _local_path(cfg: Config, path: str) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else cfg.root / p


def target_of(cfg: Config, tracker: str) -> str:
    """Where a tracker's copy goes, as run.json records it: a run mirrored to another target (the
    config changed since) is due again."""
    t = cfg.file.tracking
    if tracker == "mlflow":
        return f"{mlflow_uri(cfg)} experiment {t.mlflow_experiment or cfg.project.name}"
    return f"{t.wandb_entity + '/' if t.wandb_entity else ''}{t.wandb_project} ({t.wandb_mode})"


def wandb_run_id(moectl_run_id: str) -> str:
    """The W&B run id of a moectl run: derived from its id, so every sync finds the same W&B run
    (W&B ids must be short and free of most punctuation; the moectl id is the run's name)."""
    return "moectl-" + hashlib.sha256(moectl_run_id.encode()).hexdigest()[:16]


def finished(record: RunRecord) -> bool:
    return record.status in FINISHED and not getattr(record, "stale", False)


def due(cfg: Config, record: RunRecord) -> list[str]:
    """The configured trackers that do not hold this run yet: never mirrored, failed, mirrored
    to another target, or mirrored before its report was there (`moectl commit RUN` writes the
    report of a run whose moectl was killed first)."""
    out, report = [], None
    for name in configured(cfg):
        state = record.tracking.get(name)
        if state is None or state.status != "mirrored" or state.target != target_of(cfg, name):
            out.append(name)
            continue
        # (looked up only for a run some tracker holds: `sync` asks this of every run in the store)
        report = report or recorded_report(cfg, record)
        if report is not None and state.report != str(report):
            out.append(name)
    return out


def recorded_report(cfg: Config, record: RunRecord) -> Optional[Path]:
    """The run's report: the file its record names, else the one `report_dir` holds for its id
    (a record written before its report was, or a `report_dir` moved since)."""
    if record.report and Path(record.report).is_file():
        return Path(record.report)
    return find_run_report(cfg.report_dir, record.id)


def sync_plan(cfg: Config, refs: Sequence[str]) -> list[tuple[store.StoredRun, list[str]]]:
    """`moectl sync`: with RUN refs, those runs and every configured tracker (each adapter then sends
    only what its tracker lacks); without, every finished run of this project some tracker does not
    hold yet, oldest first. UsageError when no tracker is configured, a named run has not finished
    or is another repository's.

    A shared artifact root (the default ~/.cache one) holds other projects' runs too: this
    project's `[tracking]` is not theirs, and a run.json holds one target per tracker, so mirroring
    another project's run here would also make its own `moectl sync` mirror it again. Which runs
    are this project's is moectl.gitops.same_repository (run.json `repo`; none recorded: this one's)."""
    from moectl.gitops import same_repository

    names = configured(cfg)
    if not names:
        raise UsageError("no tracker configured: set mlflow_uri or wandb_project in [tracking] of "
                         f"{cfg.path or '.moectl.toml'}")
    ours = same_repository(cfg.root)
    if refs:
        records = store.resolve_runs(cfg.artifact_root, refs, ours)
        theirs = [r for r in {r.id: r for r in records}.values() if not ours(r.repo)]
        if len(theirs) == 1:
            r = theirs[0]
            raise UsageError(f"run {r.id} belongs to another repository, {r.repo}: mirror it from there "
                             f"(`moectl sync {r.id}` in {r.repo}), into that project's trackers; nothing mirrored")
        if theirs:
            raise UsageError("runs of other repositories are mirrored from there, into their projects' trackers; "
                             "nothing mirrored", lines=[f"{r.id} belongs to {r.repo}" for r in theirs])
        busy = [r for r in records if not finished(r)]
        if busy:
            raise UsageError("only finished runs can be mirrored",
                             lines=[f"{r.id}: {r.display_status}" for r in busy])
        return [(r, names) for r in {r.id: r for r in records}.values()]  # a run named twice: once
    runs = [r for r in reversed(store.list_runs(cfg.artifact_root)) if finished(r) and ours(r.repo)]
    return [(r, todo) for r in runs if (todo := due(cfg, r))]


# --------------------------------------------------------------------------------------- mirroring


def mirror_run(cfg: Config, record: RunRecord, report: Optional[Path] = None,
               only: Optional[Sequence[str]] = None) -> list[Mirrored]:
    """Mirror one finished run into every configured tracker (or `only` these), save the outcome in
    its run.json, and return it. A tracker's failure is a result, never an exception. Ctrl-C
    (KeyboardInterrupt, SIGTERM where the command maps it so) is not a failure: it stops at once
    and is raised, after the outcomes of the trackers that finished before it are saved; the
    interrupted tracker's state is left as it was (nothing half-recorded), so `moectl sync` retries it."""
    names = [n for n in configured(cfg) if only is None or n in only]
    if not names:
        return []
    with _mirror_lock(record):
        return _mirror_locked(cfg, record, report, names)


@contextlib.contextmanager
def _mirror_lock(record: RunRecord) -> Iterator[None]:
    """One mirror of a run at a time (a `moectl sync` beside the run's own mirror, two syncs): two
    MLflow clients that both find no run would both create one. The second waits - the first is
    bounded - then reads what the first recorded and finds the tracker's run by its tag."""
    import fcntl

    try:
        fh = open(Path(record.exp_dir) / ".tracking.lock", "a")
    except OSError:  # a read-only run directory: nothing can be recorded there anyway
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            on_disk = store.load_run(Path(record.exp_dir)).tracking
            record.tracking = {**record.tracking, **on_disk}
        except UsageError:
            pass
        yield


def _mirror_locked(cfg: Config, record: RunRecord, report: Optional[Path], names: list[str]) -> list[Mirrored]:
    results: list[Mirrored] = []
    try:
        try:
            data: Optional[Payload] = payload(record, report if report is not None else recorded_report(cfg, record))
            problem = None
        except Exception as exc:  # an unreadable run directory: every tracker fails alike
            data, problem = None, f"reading the run: {_one_line(exc)}"
        for name in names:
            results.append(_attempt(name, cfg, record, data, problem))
            record.tracking[name] = results[-1].state
    except KeyboardInterrupt:
        if results:  # what finished before the interrupt is whole: keep it
            _save_outcomes(record, results)
        raise
    _save_outcomes(record, results)
    return results


def _save_outcomes(record: RunRecord, results: list[Mirrored]) -> None:
    states = {r.tracker: r.state for r in results}
    try:  # only the trackers' states: the rest of `record` may be older than the run.json by now
        store.update_run(record, lambda rec: rec.tracking.update(states))
    except OSError as exc:  # the trackers hold the copy; `moectl sync` will find it again
        for r in results:
            r.note = f"run.json not updated: {exc}"


def _attempt(name: str, cfg: Config, record: RunRecord, data: Optional[Payload],
             problem: Optional[str]) -> Mirrored:
    t0 = time.monotonic()
    added: dict[str, int] = {}
    run_id = location = note = error = None
    if problem is not None:
        error = problem
    else:
        adapter: Callable = _ADAPTERS[name]
        try:
            # Trackers print links and banners on stdout (`moectl run --json` must stay one object)
            # and notes on stderr (wandb's "Loaded credentials ... from WANDB_API_KEY"); moectl
            # says in one line what was mirrored, and a failure comes back as the exception.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                run_id, location, added, note = adapter(cfg, record, data, _Deadline(BUDGET_S))
        except ImportError as exc:
            missing = (getattr(exc, "name", None) or "").split(".")[0]
            if missing == name:  # the client itself: its extra brings it
                error = f"{name} is not installed (pip install 'moectl[{name}]')"
            else:  # something the client needs for this target (a database driver: psycopg for a
                # postgresql:// store), which the extra does not bring
                error = f"{_one_line(exc)} (a module {name} needs for this target; moectl[{name}] does not bring it)"
        except Exception as exc:  # the tracker's own errors: down, refused, misconfigured
            error = _reason(exc, name)
    sent = data.files.get("report.md") if data is not None and not error else None
    state = TrackerMirror(
        status="failed" if error else "mirrored", target=target_of(cfg, name), run_id=run_id,
        location=location, at=store.now_iso(), took_s=round(time.monotonic() - t0, 3), error=error,
        report=str(sent) if sent is not None else None,
    )
    if error and run_id is None:  # a failed retry keeps what an earlier attempt knew
        prior = record.tracking.get(name)
        if prior is not None and prior.target == state.target:
            state.run_id, state.location = prior.run_id, prior.location
    return Mirrored(name, state, added, note)


def warning_lines(run_id: str, results: Sequence[Mirrored]) -> list[str]:
    """One line per tracker that failed: what was not mirrored, why, and the way to retry."""
    return [f"run {run_id} not mirrored to {r.tracker} ({r.state.target}): {r.state.error}; "
            f"`moectl sync` will retry it" for r in results if r.state.status == "failed"]


# Network failures, as the clients bury them (MLflow wraps urllib3's error in its own message).
_UNREACHABLE = (("Connection refused", "connection refused"), ("timed out", "timed out"),
                ("context deadline exceeded", "timed out"),  # W&B's (Go) service
                ("Name or service not known", "unknown host"), ("name resolution", "unknown host"),
                ("No route to host", "no route to host"), ("Network is unreachable", "network unreachable"))


def _reason(exc: BaseException, tracker: str) -> str:
    """Why a tracker failed, in one line: `mlflow server unreachable: connection refused` rather
    than three lines of urllib3 retry machinery."""
    text = str(exc).lower()
    for needle, says in _UNREACHABLE:
        if needle.lower() in text:
            return f"{tracker} server unreachable: {says}"
    return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


# ----------------------------------------------------------------------------------------- payload


def payload(record: RunRecord, report: Optional[Path]) -> Payload:
    from moectl.metrics import read_metrics

    run_dir = Path(record.exp_dir)
    start_ms = _ms(record.started_at) or _ms(record.created_at) or int(time.time() * 1000)
    end_ms = _ms(record.finished_at) or start_ms
    series: dict[str, list[tuple[int, float, int]]] = {}
    metrics = read_metrics(run_dir / METRICS_FILENAME)
    for s in metrics.steps:
        ts = start_ms + int(s.elapsed_s * 1000) if s.elapsed_s is not None else start_ms
        for key in STEP_KEYS:
            value = getattr(s, key)
            if value is not None:
                series.setdefault(key, []).append((s.step, float(value), ts))
    params: dict[str, Any] = {}
    preset = record.options.get("preset") or record.engine.get("preset")
    if preset is not None:
        params["preset"] = preset
    params["options"] = dict(record.options)
    params["engine"] = dict(record.engine)
    if record.summary is not None:
        params["tail_window"] = record.summary.window
        params["tail_window_steps"] = record.summary.steps
        params["warmup_steps"] = record.summary.warmup_steps
        if record.summary.first_step:  # a trainer counting from 1: its warm-up is steps 1 .. warmup_steps
            params["first_step"] = record.summary.first_step
        params["tail_clean"] = record.summary.clean
        if record.summary.note:
            params["tail_note"] = record.summary.note
        last = metrics.steps[-1].step if metrics.steps else record.summary.steps
        for key in SUMMARY_KEYS:
            value = getattr(record.summary, key)
            if value is not None:
                series[f"tail/{key}"] = [(last, float(value), end_ms)]
    tags = {
        "moectl_run_id": record.id, "moectl_status": record.status, "moectl_tag": record.tag,
        "moectl_sweep": record.sweep, "moectl_source": record.source, "host": record.host,
        "moectl_group": record.group, "moectl_repeat": record.repeat,
        "git_commit": record.git.commit, "git_branch": record.git.branch,
        "git_dirty": str(record.git.dirty).lower() if record.git.commit else None,
        "gpus": ", ".join(record.gpus) or None,
    }
    files = {"report.md": report, "command.txt": run_dir / "command.txt", "git.diff": run_dir / "git.diff"}
    return Payload(
        params=params, tags={k: str(v) for k, v in tags.items() if v not in (None, "")}, series=series,
        files={name: Path(p) for name, p in files.items() if p is not None and Path(p).is_file()},
        start_ms=start_ms, end_ms=end_ms,
    )


def _ms(iso: Optional[str]) -> Optional[int]:
    seconds = store.parse_time(iso)
    return None if seconds is None else int(seconds * 1000)


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"options": {"cap": 1.0}}` -> `{"options.cap": "1.0"}` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{name}."))
        elif value is not None and value != {}:
            text = json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)
            out[name] = text[:_MLFLOW_PARAM_MAX]
    return out


# ------------------------------------------------------------------------------------------ MLflow


@contextlib.contextmanager
def _mlflow_env(uri: str) -> Iterator[None]:
    """Bound every MLflow request (see the module docstring) for the duration of the mirror; a
    directory store is what the config asked for, so opt in to MLflow's file store too; and no
    usage telemetry, unless the user's environment says otherwise."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_S),
              "MLFLOW_LOGGING_LEVEL": "WARNING"}  # read when mlflow is first imported
    if "://" not in uri or uri.startswith("file:"):
        wanted["MLFLOW_ALLOW_FILE_STORE"] = "true"
    if "MLFLOW_DISABLE_TELEMETRY" not in os.environ and "DO_NOT_TRACK" not in os.environ:
        # MLflow 3 reports its own usage to the internet by default: a mirror to a store on this
        # machine (or a cluster's air-gapped server) is moectl's, and sends nothing else anywhere.
        # Whoever sets either variable decides for themselves.
        wanted["MLFLOW_DISABLE_TELEMETRY"] = "true"
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    # MLflow and alembic log at INFO on a new sqlite store ("Creating initial MLflow database
    # tables..."), into the middle of the run's output: moectl says what happened in one line.
    levels: dict[str, int] = {}
    try:
        importlib.import_module("mlflow")  # configures its loggers on import: set theirs after that

        for name in ("mlflow", "alembic"):
            levels[name] = logging.getLogger(name).level
            logging.getLogger(name).setLevel(logging.WARNING)
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _mlflow(cfg: Config, record: RunRecord, data: Payload, deadline: _Deadline):
    uri = mlflow_uri(cfg)
    experiment = cfg.file.tracking.mlflow_experiment or cfg.project.name
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    with _mlflow_env(uri):
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else _create_experiment(client, experiment, _artifact_location(uri))
        quote = '"' if "'" in record.id else "'"
        found = client.search_runs([exp_id], filter_string=f"tags.moectl_run_id = {quote}{record.id}{quote}",
                                   max_results=1, order_by=["attributes.start_time ASC"])
        if found:
            run = found[0]
        else:  # the id tag goes on at creation: a run found later is always this one, however far it got
            run = client.create_run(exp_id, start_time=data.start_ms, tags={"moectl_run_id": record.id},
                                    run_name=record.id)
        rid = run.info.run_id
        deadline.check("looking up the run")

        params = [Param(k, v) for k, v in _flat(data.params).items() if k not in run.data.params]
        # MLflow's own tags too, so its UI shows the commit and the notes where it shows them.
        ui_tags = {"mlflow.source.git.commit": record.git.commit, "mlflow.source.git.branch": record.git.branch,
                   "mlflow.note.content": record.notes}
        wanted = {**data.tags, **{k: v for k, v in ui_tags.items() if v}}
        tags = [RunTag(k, v) for k, v in wanted.items() if run.data.tags.get(k) != v]
        points = []
        for key, series in data.series.items():
            held = set()
            if key in run.data.metrics:  # only then can the tracker hold points of it
                held = {m.step for m in client.get_metric_history(rid, key)}
                deadline.check(f"reading metric {key}")
            points += [Metric(key, value, ts, step) for step, value, ts in series if step not in held]
        # log_batch takes at most 100 params, 100 tags and 1000 metrics per request.
        for i in range(0, max(len(params), len(tags)), 100):
            client.log_batch(rid, params=params[i:i + 100], tags=tags[i:i + 100])
            deadline.check("logging params")
        for i in range(0, len(points), 1000):
            client.log_batch(rid, metrics=points[i:i + 1000])
            deadline.check("logging metrics")

        held_files = {Path(a.path).name for a in client.list_artifacts(rid, "moectl")}
        files = {n: p for n, p in data.files.items() if n not in held_files}
        if files:
            with tempfile.TemporaryDirectory(prefix="moectl-mirror-") as tmp:
                for name, path in files.items():  # the tracker's names: report.md, not the dated file
                    shutil.copyfile(path, Path(tmp) / name)
                client.log_artifacts(rid, tmp, "moectl")
        client.set_terminated(rid, status=_MLFLOW_STATUS.get(record.status, "FINISHED"), end_time=data.end_ms)
    page = f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{rid}" if uri.startswith(("http://", "https://")) else None
    return rid, page, {"params": len(params), "metric_points": len(points), "files": len(files)}, None


def _artifact_location(uri: str) -> Optional[str]:
    """Where a new experiment keeps its files. A `sqlite:///` store's default is `./mlruns` of the
    process's working directory - the user's repository, which it would dirty (and every later
    run's git.diff would carry the files): beside the database instead. A directory store keeps
    them inside itself and a server decides for itself (None: MLflow's default)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlflow-artifacts").as_uri()
    return None


def _create_experiment(client, name: str, artifact_location: Optional[str] = None) -> str:
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created by another process since we looked
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ---------------------------------------------------------------------------------------- W&B


def _wandb(cfg: Config, record: RunRecord, data: Payload, deadline: _Deadline):
    t = cfg.file.tracking
    wid = wandb_run_id(record.id)
    prior = record.tracking.get("wandb")
    offline = t.wandb_mode == "offline"
    mirrored = prior is not None and prior.status == "mirrored" and prior.location
    report = data.files.get("report.md")
    if (offline and mirrored and prior.target == target_of(cfg, "wandb") and Path(prior.location).is_dir()
            and (report is None or prior.report == str(report))):
        # An offline run directory is an upload queue: a second one for the same run would queue
        # every point twice. The run's record is final, so the first one already holds it all -
        # unless its report came later (`moectl commit RUN`): then a whole new queue replaces it.
        # (Deleted since, it is written again.)
        return prior.run_id, prior.location, {}, f"already written to {prior.location}; `wandb sync` uploads it"
    if offline:
        # Written into a hidden staging directory and moved into wandb/ only once whole: an attempt
        # cut short (Ctrl-C, a failure, a kill) leaves no partial queue that `wandb sync` would
        # upload beside the retry's into the same W&B run.
        queue = (wandb_local_dir(cfg) or Path(record.exp_dir)) / "wandb"
        queue.mkdir(parents=True, exist_ok=True)
        for left in queue.glob(f".moectl-{wid}-*"):  # a killed attempt's staging directory
            shutil.rmtree(left, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(prefix=f".moectl-{wid}-", dir=queue))
        try:
            wid, location, added, note = _wandb_run(cfg, record, data, deadline, wid, str(stage))
            written = Path(location)
            # Earlier queues of this run (this id: only moectl writes it) are superseded by this
            # one - all but a whole one recorded for another target (another project).
            keep = prior.location if mirrored and prior.target != target_of(cfg, "wandb") else None
            for old in queue.glob(f"offline-run-*-{wid}"):
                if str(old) != keep:
                    shutil.rmtree(old)
            final = queue / written.name
            os.rename(written, final)
            return wid, str(final), added, note
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return _wandb_run(cfg, record, data, deadline, wid, str(wandb_local_dir(cfg) or record.exp_dir))


def _wandb_run(cfg: Config, record: RunRecord, data: Payload, deadline: _Deadline, wid: str, root: Optional[str]):
    t = cfg.file.tracking
    import wandb

    wanted = dict(  # quiet, no system sampling, no git/code capture (moectl sends its own), bounded
        console="off", silent=True, x_disable_stats=True, x_disable_meta=True, x_disable_machine_info=True,
        disable_git=True, disable_code=True, save_code=False, x_save_requirements=False,
        init_timeout=float(min(30.0, max(deadline.left(), 1.0))), finish_timeout=30.0,
        x_graphql_retry_max=1, x_graphql_timeout_seconds=float(REQUEST_TIMEOUT_S),
        x_file_stream_retry_max=1, x_file_stream_timeout_seconds=float(REQUEST_TIMEOUT_S),
        x_file_transfer_retry_max=1, x_file_transfer_timeout_seconds=60.0,
    )
    known = getattr(wandb.Settings, "model_fields", {})
    settings = wandb.Settings(**{k: v for k, v in wanted.items() if k in known})
    moectl_info = {k.removeprefix("moectl_"): v for k, v in data.tags.items()}
    run = wandb.init(
        project=t.wandb_project, entity=t.wandb_entity, id=wid, name=record.id, group=record.sweep or record.group,
        job_type="moectl-run", notes=record.notes, mode=t.wandb_mode,
        tags=[s[:64] for s in ("moectl", record.status, record.tag) if s],
        config={**data.params, "moectl": moectl_info},
        # Online, the run may exist already: resume it and send only the steps it lacks.
        # (Offline there is nothing to resume from; wandb warns and ignores it.)
        resume="allow" if t.wandb_mode == "online" else None,
        dir=root,
        settings=settings,
    )
    try:
        first_new = run.step if t.wandb_mode == "online" else 0
        rows: dict[int, dict[str, float]] = {}
        for key, series in data.series.items():
            if key.startswith("tail/"):
                continue
            for step, value, _ts in series:
                if step >= first_new:
                    rows.setdefault(step, {})[key] = value
        for step in sorted(rows):
            run.log(rows[step], step=step)
        deadline.check("logging metrics")
        run.summary.update({k: v[0][1] for k, v in data.series.items() if k.startswith("tail/")})
        run.summary.update({"moectl/status": record.status})
        if data.files:
            art = wandb.Artifact(f"moectl-files-{wid}", type="moectl-run")
            for name, path in data.files.items():
                art.add_file(str(path), name=name)
            run.log_artifact(art)
        location = str(Path(run.dir).parent) if t.wandb_mode == "offline" else run.url
        exit_code = 0 if record.status in ("completed", "imported") else (record.exit_code or 1)
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish(exit_code=exit_code)
    added = {"params": len(_flat(data.params)), "metric_points": sum(len(r) for r in rows.values()),
             "files": len(data.files)}
    return wid, location, added, None


_ADAPTERS: dict[str, Callable] = {"mlflow": _mlflow, "wandb": _wandb}
