"""`moectl sweep` as a library: a spec of legs -> one sweep directory -> every leg through `execute_run`.

    spec = load_spec(Path("capacity.toml"))                # moectl.sweep.spec: validated whole
    outcome = run_sweep(cfg, spec, SweepOptions())         # or resume_sweep(cfg, "2026..._moe-capacity", ...)
    outcome.exit_code   # 0 all legs completed, 3 refused, 4 some leg failed, 130 interrupted

    <artifact_root>/<ts>_<project>-<name>/sweep.json        legs, their order, state and run id
    <artifact_root>/<ts>_<project>-<name>/<ts>_<project>-<tag>/   one run directory per leg

Legs run one at a time through the runner (same guards, lock, records, report, commit as
`moectl run`: there is no second launch path). sweep.json is rewritten atomically at every change,
so whatever stops the sweep - a failed leg, Ctrl-C, SIGTERM, SIGKILL, a reboot - it stays true:
finished legs `completed`, the stopped one `interrupted` (after a SIGKILL, `running` until the next
moectl that reads the store settles the leg and its run as `interrupted`: store.settle_stale;
`moectl.sweep.store.leg_status` shows it `stale` meanwhile), the rest `pending`.

The sweep holds the run lock from before its first leg to its final report, naming the leg of the
moment, and its legs run under it: a `moectl run` started between two legs (while a leg's report
commit waits for git, say) is refused, rather than let in to refuse the sweep's next leg.

A resume never writes into the old directory: it makes `<ts>_<project>-<name>-resume/` whose
sweep.json lists every leg (completed ones carried over with their original run ids) and links
back through `previous` (the sweep it continued) and `resumed_from` (the chain's original sweep);
only the legs that did not complete run again.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import threading
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

from moectl import gitops, store
from moectl.config import Config
from moectl.errors import (
    EXIT_GUARD, EXIT_INTERRUPTED, EXIT_OK, EXIT_TRAINING, GuardRefused, Interrupted, MoectlError, UsageError,
)
from moectl.guards import WAITABLE, check_request, summary_line
from moectl.lock import Lock, acquire
from moectl.entry import hung_up, stop_signals
from moectl.metrics import Comparison
from moectl.plan import RunRequest, command_text, make_request, plan_run
from moectl.probes import read_nvml
from moectl.progress import NullProgress, ProgressSink
from moectl.records import RunRecord, SweepLeg, SweepRecord, write_text_atomic
from moectl.runner import execute_run, fallback_request
from moectl.summary import put_back, resume_command, write_summary
from moectl.sweep.report import claim_sweep_report, completed_comparison, fastest, recommendation, sweep_report, within_noise
from moectl.sweep.spec import SweepSpec, request_kwargs
from moectl.sweep.store import (
    fallback_leg, fallback_of, final_report_owed, leg_status, list_sweeps, original_sweep, owner_alive, previous_sweep,
    resolve_sweep, save_sweep, scan_sweep_dirs, settled, sweep_chain, sweep_runs,
)
from moectl.tracking import warning_lines

FIGURE_METRICS = ("loss", "tok_per_sec", "mfu", "dt_ms")
# The sweep's report, in its directory, when the one in report_dir holds the user's changes.
REPORT_COPY = "sweep_report.md"


@dataclass
class SweepOptions:
    fail_fast: bool = False
    baseline: Optional[str] = None  # a leg tag
    wait_gpus: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    no_commit: bool = False


@dataclass
class SweepOutcome:
    exit_code: int
    sweep: Optional[SweepRecord]  # None when nothing was written (refused up front, nothing to run)
    comparison: Optional[Comparison] = None
    report: Optional[Path] = None
    commits: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)  # commit errors, figure notes, refusals
    refused: list[str] = field(default_factory=list)  # guard refusals (`name: message`)
    nothing_to_run: bool = False
    jobs: list[str] = field(default_factory=list)  # Slurm job ids (sweep --slurm): the legs', then the report's
    # Where the sweep's report went when `report` holds changes of the user's (left alone then).
    report_copy: Optional[Path] = None
    # Why the sweep's report could not be written at its last writing (a full disk, a read-only .git):
    # the sweep then does not finish, and its resume writes the report.
    report_unwritten: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.exit_code == EXIT_OK,
            "exit_code": self.exit_code,
            # (a refusal as every other command's error document says it: the guard line on stderr)
            "error": f"refused: {self.refused[0]}" if self.refused else None,
            "sweep": self.sweep.model_dump(mode="json") if self.sweep else None,
            "comparison": self.comparison.to_json() if self.comparison else None,
            "recommendation": recommendation(self.comparison),
            "report": str(self.report) if self.report else None,
            "report_copy": str(self.report_copy) if self.report_copy else None,
            "commits": self.commits,
            "messages": self.messages,
            "refused": self.refused,
            "nothing_to_run": self.nothing_to_run,
            "jobs": self.jobs,
        }


@dataclass
class SweepUI:
    """What the CLI wants to hear about: lines of text, a progress sink per leg, guard waits."""

    say: Callable[[str], None] = lambda text: None
    progress: Callable[[], ProgressSink] = NullProgress
    on_wait: Optional[Callable[[list, float], None]] = None
    on_commit_wait: Optional[Callable[[Path], None]] = None  # a commit starts waiting for git's index.lock


def leg_request(leg: SweepLeg, opts: SweepOptions, parent_dir: Optional[Path], notes: Optional[str] = None) -> RunRequest:
    return make_request(tag=leg.tag, parent_dir=str(parent_dir) if parent_dir else None, wait_gpus=opts.wait_gpus,
                        overrides=list(opts.overrides), no_commit=opts.no_commit, notes=notes,
                        group=leg.group, repeat=leg.repeat, **request_kwargs(leg.options))


def _leg_notes(leg: SweepLeg, sweep: SweepRecord) -> str:
    text = f"leg `{leg.tag}` of sweep `{sweep.id}`"
    if leg.fallback_of:
        text += f"; compile fallback of leg `{leg.fallback_of}` (engine exit 3: torch.compile failed)"
    notes = sweep.spec.get("notes")
    return f"{notes}\n\n{text}" if notes else text


def refuse_unplannable_legs(cfg: Config, legs: list[SweepLeg], opts: SweepOptions, data_here: bool = True) -> None:
    """Plan every leg still to run, as its run will be planned: a leg whose options cannot run
    (`ep = 3` beside 4 experts) is a UsageError naming the leg before anything is written, not a
    stop after the legs before it have trained."""
    nvml = read_nvml(cfg.gpu.devices)
    now = datetime.now()
    for leg in legs:
        try:
            plan_run(cfg, leg_request(leg, opts, cfg.artifact_root / "_preflight"), now,
                     len(nvml.gpus) if nvml.gpus is not None else None, data_here=data_here)
        except UsageError as exc:
            raise UsageError(f"leg {leg.tag}: {exc.message}", exc.lines) from None


def dry_run(cfg: Config, legs: list[SweepLeg], name: str, opts: SweepOptions) -> list[dict[str, Any]]:
    """Each leg's exact command (as `moectl run --dry-run` would plan it); writes nothing."""
    nvml = read_nvml(cfg.gpu.devices)
    now = datetime.now()
    sweep_dir = cfg.artifact_root / store.run_id(cfg.project.name, name, now)
    out = []
    for leg in legs:
        plan = plan_run(cfg, leg_request(leg, opts, sweep_dir), now, len(nvml.gpus) if nvml.gpus is not None else None)
        out.append({"tag": leg.tag, "options": leg.options, "state": leg.state, "run_id": plan.run_id,
                    "command": command_text(plan)})
    return out


def check_name_fits(cfg: Config, name: str) -> None:
    """UsageError when the sweep's directory name - and its resume's, `-resume` and a `-NN` longer -
    would not fit in one path component; said by the dry run too, before anything is written."""
    from moectl.plan import NAME_MAX

    longest = len(store.run_id(cfg.project.name, f"{name}-resume").encode()) + len("-99")
    if longest > NAME_MAX:
        raise UsageError(f"sweep name: its directory name (with a resume's `-resume`) would be {longest} bytes, over "
                         f"the filesystem's {NAME_MAX}; use a shorter name")


def _create_sweep_dir(cfg: Config, name: str) -> Path:
    base = store.run_id(cfg.project.name, name)
    path, n = cfg.artifact_root / base, 1
    while path.exists():  # two sweeps in one second: a new name, never a reused directory
        n += 1
        path = cfg.artifact_root / f"{base}-{n}"
    return store.create_run_dir(path)


class _Terminate:
    """SIGTERM (and SIGHUP, unless ignored) outside a leg behaves like Ctrl-C (during a leg the
    launcher owns the signals)."""

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._raise) for sig in stop_signals() if sig != signal.SIGINT}
        return self

    @staticmethod
    def _raise(signum, frame):
        hung_up(signum)
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class _Finishing:
    """Ctrl-C / SIGTERM / SIGHUP while the final report is written (seconds: figures, report, one commit):
    the first is noted and the report finished, so the sweep never ends without its final report
    and commit (its legs are all settled: `--resume` would have nothing to rerun, and nothing would
    write it). A second one aborts (KeyboardInterrupt)."""

    def __init__(self, say: Callable[[str], None], sweep: SweepRecord):
        self.say, self.sweep, self.signalled, self.previous = say, sweep, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in stop_signals():
                self.previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame):
        hung_up(signum)
        if self.signalled is not None:  # the report is owed: a resume writes it (its legs are all settled)
            raise Interrupted(f"interrupted while the sweep's final report was written; `{resume_command(self.sweep)}` "
                              "writes and commits it")
        self.signalled = signal.Signals(signum).name
        self.say(f"{self.signalled}: finishing the sweep's final report and commit first (again to abort)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run_sweep(cfg: Config, spec: SweepSpec, opts: SweepOptions, ui: Optional[SweepUI] = None,
              submit: Optional[Callable[..., SweepOutcome]] = None) -> SweepOutcome:
    """Run every leg of a new sweep (`submit`: as in resume_sweep)."""
    _check_baseline(opts, spec.legs)
    sweep = SweepRecord(id="", name=spec.name, spec=spec.raw, legs=[leg.model_copy() for leg in spec.legs],
                        created_at="", exp_dir="", config=str(cfg.path.resolve()) if cfg.path else None,
                        baseline=opts.baseline, overrides=list(opts.overrides), repo=str(cfg.root.resolve()))
    return (submit or _run)(cfg, sweep, opts, ui or SweepUI(), carried={}, chain=[])


def plan_resume(cfg: Config, ref: str) -> tuple[SweepRecord, list[SweepLeg], dict[str, RunRecord], dict[tuple, str]]:
    """The sweep to resume (the newest resume of `ref`'s chain), the legs of the new resume
    (completed ones carried, the rest pending), the run records of the carried legs, and what each
    leg was in that sweep ((tag, repeat) -> leg_status: `interrupted`, `failed`, `stale`, `pending`...).
    GuardRefused when that sweep is still running."""
    old = resolve_sweep(cfg.artifact_root, ref, ours=gitops.same_repository(cfg.root))
    recorded = Path(old.config) if old.config else None
    if recorded is not None and cfg.path and recorded != cfg.path.resolve():
        # Another config is another trainer, report_dir, defaults: its legs would not compare.
        if recorded.is_file():
            raise UsageError(f"sweep {old.id} ran with {recorded}, not {cfg.path.resolve()}; resume it with that one: "
                             f"{resume_command(old)}")
        if recorded.parent.is_dir():  # its repository is still there, the file is not: not a moved clone
            raise UsageError(f"sweep {old.id} ran with {recorded}, which is {'not a file' if recorded.exists() else 'gone'}"
                             f"; put that configuration back there and resume: {resume_command(old)}")
    # Already resumed? Continue from the newest resume in its chain: it knows every completed leg.
    sweeps, unreadable = scan_sweep_dirs(cfg.artifact_root)
    later = {previous_sweep(s): s for s in sweeps if previous_sweep(s)}  # oldest first
    seen = {old.id}
    names = {old.name}
    while old.id in later and later[old.id].id not in seen:
        old = later[old.id]
        seen.add(old.id)
        names.add(old.name)
    # A resume of this chain whose sweep.json cannot be read hides the legs it completed: resuming
    # without it would train them again, without a word.
    resume_dir = re.compile(rf"\d{{8}}_\d{{6}}_{re.escape(cfg.project.name)}-"
                            rf"({'|'.join(map(re.escape, names))})-resume(-\d+)?")  # (_create_sweep_dir's names)
    hidden = [(d, why) for d, why in unreadable if resume_dir.fullmatch(d.name)]
    if hidden:
        where, why = hidden[0]
        raise UsageError(f"sweep {old.id} has a resume whose record cannot be read ({why}): the legs it completed "
                         f"are unknown, so they would run again; repair or remove {where} first")
    # (This process itself ran it, when a library caller resumes its own sweep: that one is over.)
    if old.finished_at is None and owner_alive(old):  # between two legs no leg is running, but the sweep is
        raise GuardRefused(f"sweep {old.id} is still running (moectl pid {old.pid}); wait for it or stop it "
                           "(Ctrl-C) before resuming")
    runs = sweep_runs(sweep_chain(old, {s.id: s for s in sweeps}), store.list_runs(cfg.artifact_root))
    view = [leg.model_copy(update={"state": leg_status(leg, runs)}) for leg in old.legs]
    for leg in view:
        if leg.state in ("queued", "running"):
            rec = runs[leg.run_id]
            who = f"Slurm job {rec.job_id}" if rec.job_id else f"pid {rec.pid}"
            raise GuardRefused(f"sweep {old.id} is still running: leg {leg.tag} (run {rec.id}, {who}); "
                               "wait for it or stop it before resuming")
    legs: list[SweepLeg] = []
    carried: dict[str, RunRecord] = {}
    for leg in view:
        if settled(leg, view) and leg.run_id in runs:
            carried[leg.run_id] = runs[leg.run_id]
            legs.append(leg)
        else:  # not completed (failed, interrupted, stale, pending, or its run directory is gone)
            legs.append(leg.model_copy(update={"state": "pending", "run_id": None}))
    # A compile-fallback leg left unfinished beside its own leg, which runs again: the fallback is
    # made anew if that leg fails to compile again, and never needed if it completes (it ran anyway).
    rerun = {(leg.tag, leg.repeat) for leg in legs if leg.state == "pending" and leg.fallback_of is None}
    legs = [leg for leg in legs if not (leg.fallback_of is not None and leg.state == "pending"
                                        and (leg.fallback_of, leg.repeat) in rerun)]
    return old, legs, carried, {(leg.tag, leg.repeat): leg.state for leg in view}


def resume_sweep(cfg: Config, ref: str, opts: SweepOptions, ui: Optional[SweepUI] = None,
                 submit: Optional[Callable[..., SweepOutcome]] = None) -> SweepOutcome:
    """Run the legs of sweep `ref` that did not complete, in a fresh `<name>-resume` directory
    (`submit`: sweep.cluster's submitter instead of running them here, one by one)."""
    ui = ui or SweepUI()
    old, _, _, _ = plan_resume(cfg, ref)
    # One resume of a sweep at a time: two at once would each run every unfinished leg and commit
    # two final reports. The claim lives in the resumed sweep's directory until this resume ends.
    from moectl.lock import read_holder

    try:
        claim = acquire(Path(old.exp_dir), f"resume of {old.id}", name=RESUME_LOCK)
    except GuardRefused:
        holder = read_holder(Path(old.exp_dir), RESUME_LOCK)
        who = f"pid {holder.pid} on {holder.host}" if holder else "another moectl"
        raise GuardRefused(f"sweep {old.id} is being resumed already by {who}; wait for that resume "
                           f"(`moectl wait {old.name}`) or stop it") from None
    with claim:
        from moectl.sweep.cluster import settle_abandoned_legs

        settle_abandoned_legs(old)  # legs its killed `sweep --slurm` never let go: `interrupted`, run again
        again, legs, carried, was = plan_resume(cfg, ref)  # as it is now that the claim is ours
        if again.id != old.id:  # another resume ran from start to end between our look and our claim
            raise GuardRefused(f"sweep {old.id} was resumed meanwhile as {again.id}; run the command again to "
                               "continue from there")
        return _resume_claimed(cfg, again, legs, carried, was, opts, ui, submit)


RESUME_LOCK = ".moectl-resume.lock"


def _resume_claimed(cfg: Config, old: SweepRecord, legs: list[SweepLeg], carried: dict[str, RunRecord],
                    was: dict[tuple, str], opts: SweepOptions, ui: SweepUI, submit) -> SweepOutcome:
    if opts.baseline is None and old.baseline is not None:
        opts = replace(opts, baseline=old.baseline)  # the sweep's own --baseline, unless given anew
    _check_baseline(opts, legs)
    if all(settled(leg, legs) for leg in legs):
        from moectl.sweep.cluster import report_job_ended

        # A Slurm sweep's report job that ended without it (cancelled, failed) leaves it owed here;
        # that job, not the moectl that submitted it (maybe on a login node), was to write it.
        slurm_gone = report_job_ended(old)
        if final_report_owed(old, legs, slurm_gone):
            if not slurm_gone and owner_alive(old) is None:  # plan_resume could not check its moectl: not ours to judge
                raise GuardRefused(f"sweep {old.id} ran on {old.host} and has not finished (its moectl may still "
                                   f"be writing its final report there); resume it on {old.host}")
            return _finish_unfinished(cfg, old, legs, carried, opts, ui)
        ui.say(f"nothing left to run: every leg of {old.id} completed")
        return SweepOutcome(exit_code=EXIT_OK, sweep=old, nothing_to_run=True)
    ui.say(f"resuming {old.id}: " + ", ".join(_resume_state(leg, was) for leg in legs))
    by_id = {s.id: s for s in list_sweeps(cfg.artifact_root)}
    chain = [s.id for s in sweep_chain(old, by_id)]
    sweep = SweepRecord(id="", name=old.name, spec=old.spec, legs=legs, resumed_from=original_sweep(old, by_id),
                        previous=old.id, created_at="", exp_dir="",
                        config=old.config or (str(cfg.path.resolve()) if cfg.path else None), baseline=opts.baseline,
                        overrides=list(opts.overrides), repo=str(cfg.root.resolve()))
    return (submit or _run)(cfg, sweep, opts, ui, carried=carried, chain=chain)


def _resume_state(leg: SweepLeg, was: dict[tuple, str]) -> str:
    """`a completed (kept)`, `b interrupted (runs again)`, `c pending (runs)`: what happened to a leg
    in the sweep resumed, and what the resume does with it (every leg not carried is `pending` now)."""
    if leg.state != "pending":
        return f"{leg.tag} {leg.state} (kept)"
    before = was.get((leg.tag, leg.repeat), "pending")
    return f"{leg.tag} {before} ({'runs' if before == 'pending' else 'runs again'})"


def _finish_unfinished(cfg: Config, old: SweepRecord, legs: list[SweepLeg], carried: dict[str, RunRecord],
                       opts: SweepOptions, ui: SweepUI) -> SweepOutcome:
    """Every leg completed, yet the sweep never finished: its moectl was killed after the last leg
    (writing the final report, say) or Ctrl-C came between the last leg and the end. Nothing is
    left to run, but the final report (figures, EXPERIMENTS.md, commit) is still owed: write it
    now, into the report file the sweep claimed, as the sweep itself would have."""
    ui.say(f"every leg of {old.id} completed, but its final report was never written; writing it now")
    by_id = {s.id: s for s in list_sweeps(cfg.artifact_root)}
    chain = [s.id for s in sweep_chain(old, by_id)]
    old.legs = legs  # as settled now (a leg its killed moectl left `running` completed meanwhile)
    # This process owns the sweep's end now: EXPERIMENTS.md, written with the report, must not say
    # the report is still owed, and a resume meanwhile is refused as while the sweep ran.
    old.pid, old.host = os.getpid(), socket.gethostname()
    save_sweep(old)
    out = SweepOutcome(exit_code=EXIT_OK, sweep=old, nothing_to_run=True)
    if old.report and Path(old.report).is_file():
        out.report = Path(old.report)  # the file it claimed (and committed progress into): the same one
    notes = [f"final report written by `moectl sweep --resume` on {store.now_iso()}: the sweep's own "
             "moectl ended before writing it"]
    with _Finishing(ui.say, old):
        finish_sweep(cfg, old, carried, opts, out, EXIT_OK, chain=chain, notes=notes)
    return out


def _check_baseline(opts: SweepOptions, legs: list[SweepLeg]) -> None:
    if opts.baseline is not None and opts.baseline not in {leg.tag for leg in legs}:
        raise UsageError(f"--baseline {opts.baseline!r} is not a leg of this sweep (legs: {', '.join(l.tag for l in legs)})")


def _run(cfg: Config, sweep: SweepRecord, opts: SweepOptions, ui: SweepUI, *, carried: dict[str, RunRecord],
         chain: list[str]) -> SweepOutcome:
    todo = [leg for leg in sweep.legs if not settled(leg, sweep.legs)]
    refuse_unplannable_legs(cfg, todo, opts)
    # Refuse before writing anything when the first leg could not start (SPEC §5); later legs are
    # re-checked by the runner and a refusal there stops the sweep with sweep.json true.
    _, _, results = check_request(cfg, leg_request(todo[0], opts, cfg.artifact_root / "_preflight"))
    failing = [r for r in results if not (r.ok or r.overridden)]
    if failing and (opts.wait_gpus is None or any(r.name not in WAITABLE for r in failing)):
        lines = [f"{r.name}: {r.message}" for r in failing]
        ui.say("a guard refused the sweep; nothing was written")
        return SweepOutcome(exit_code=EXIT_GUARD, sweep=None, refused=lines, messages=lines)
    run_lock = _take_run_lock(cfg, sweep, opts)
    try:
        return _run_legs(cfg, sweep, opts, ui, todo, carried=carried, chain=chain, run_lock=run_lock)
    finally:  # on every path: Ctrl-C, SIGTERM (as Ctrl-C), an error; a SIGKILL leaves it stale
        if run_lock is not None:
            run_lock.release()


def _take_run_lock(cfg: Config, sweep: SweepRecord, opts: SweepOptions) -> Optional[Lock]:
    """The run lock, for the whole sweep: each leg's run releasing it at its end let a `moectl run`
    in before the next leg, which its guard then refused, stopping the sweep. None when another
    moectl holds it and `--override no_other_training` says to run beside it (each leg then locks
    for itself, as a run does). GuardRefused when another holds it (taken since the guards looked)."""
    cmd = f"moectl sweep --resume {sweep.previous}" if sweep.previous else "moectl sweep"
    try:
        return acquire(cfg.artifact_root, None, cmd, sweep=sweep.name)
    except GuardRefused:
        if "no_other_training" not in opts.overrides:
            raise
        return None


def _run_legs(cfg: Config, sweep: SweepRecord, opts: SweepOptions, ui: SweepUI, todo: list[SweepLeg], *,
              carried: dict[str, RunRecord], chain: list[str], run_lock: Optional[Lock]) -> SweepOutcome:
    sweep_dir = _create_sweep_dir(cfg, sweep.name + ("-resume" if sweep.resumed_from else ""))
    sweep.id, sweep.exp_dir, sweep.created_at = sweep_dir.name, str(sweep_dir), store.now_iso()
    sweep.pid, sweep.host = os.getpid(), socket.gethostname()  # a resume while this process runs it is refused
    for leg in sweep.legs:  # repeats of one tag: one group (a resume keeps the original's)
        if leg.repeat is not None and leg.group is None:
            n = sum(1 for x in sweep.legs if x.tag == leg.tag and x.repeat is not None)
            leg.group = f"{sweep.id}-{leg.tag}-x{n}"
    save_sweep(sweep)
    if run_lock is not None:
        run_lock.relabel(sweep=sweep.id)  # (taken under its name: its id is its directory's, made since)
    chain = [*chain, sweep.id]
    runs: dict[str, RunRecord] = dict(carried)
    out = SweepOutcome(exit_code=EXIT_OK, sweep=sweep)  # its report is claimed when first written
    ui.say(f"sweep {sweep.id} -> {sweep_dir} ({len(todo)} of {len(sweep.legs)} legs to run)")
    notes: list[str] = []
    commit = not opts.no_commit

    def baseline_record(current: SweepLeg) -> Optional[list[RunRecord]]:
        # The baseline leg's run, or all the completed repeats of its group (as the sweep's table has it),
        # among the other legs': a leg's repeat 2 against its repeat 1 would compare two seeds of one
        # configuration as if they were two legs (the baseline leg's own repeats get no baseline).
        done = [leg for leg in sweep.legs
                if leg.state == "completed" and leg.run_id in runs and leg.tag != current.tag]
        pick = next((leg for leg in done if leg.tag == opts.baseline), done[0] if done else None)
        if pick is None:
            return None
        return [runs[leg.run_id] for leg in done if leg.group == pick.group] if pick.group else [runs[pick.run_id]]

    def write_report(heading: str, figures: list[Path] = ()) -> list[Path]:
        return write_sweep_report(cfg, sweep, runs, opts, out, heading, chain=chain, notes=notes, figures=figures)

    def progress_heading() -> str:
        n = sum(1 for leg in sweep.legs if leg.state == "completed")
        return f"{n}/{len(sweep.legs)} legs completed"

    exit_code = EXIT_OK
    i = 0
    with _Terminate():
        try:
            while i < len(sweep.legs):
                leg = sweep.legs[i]
                i += 1
                if settled(leg, sweep.legs):
                    continue
                request = leg_request(leg, opts, sweep_dir, _leg_notes(leg, sweep))
                ui.say(f"leg {i}/{len(sweep.legs)} {leg.tag}: starting")
                if run_lock is not None:
                    run_lock.relabel(leg=leg.tag, run_id=None)

                def on_start(record: RunRecord, leg=leg) -> None:
                    if run_lock is not None:  # a reader settling this run after a SIGKILL removes the lock too
                        run_lock.relabel(run_id=record.id)
                    leg.state, leg.run_id = "running", record.id
                    save_sweep(sweep)
                    ui.say(f"leg {leg.tag}: run {record.id} ({summary_line(record.guards)})")

                def leg_recorded(record: RunRecord, leg=leg) -> None:  # on any branch, before its report
                    leg.state = record.status if record.status in ("completed", "failed", "interrupted") else "failed"
                    leg.run_id = record.id
                    runs[record.id] = record
                    save_sweep(sweep)

                def after_leg(record: RunRecord) -> list[Path]:  # on the project branch only
                    return write_report(progress_heading())

                progress = ui.progress()
                try:
                    outcome = execute_run(cfg, request, progress=progress, baseline=baseline_record(leg),
                                          sweep_id=sweep.id, commit=commit, extra_commit_paths=after_leg,
                                          on_wait=ui.on_wait, on_start=on_start, on_recorded=leg_recorded,
                                          on_commit_wait=ui.on_commit_wait, run_lock=run_lock)
                except GuardRefused as exc:  # e.g. the lock was taken between the guards and the launch
                    out.refused = [exc.message]
                    exit_code = EXIT_GUARD
                    break
                except MoectlError as exc:  # its record could not be written (a full disk): no leg after it can be
                    exc.lines.append(f"the sweep stopped at leg {leg.tag}; resume it in a fresh directory: "
                                     f"{resume_command(sweep)}")
                    raise
                finally:
                    progress.close()
                if outcome.record is None:
                    out.refused = [f"{r.name}: {r.message}" for r in outcome.guards if not (r.ok or r.overridden)]
                    ui.say(f"leg {leg.tag}: a guard refused it; stopping the sweep here")
                    exit_code = EXIT_GUARD
                    break
                if outcome.commit:
                    out.commits.append(outcome.commit)
                if outcome.commit_error:
                    out.messages.append(f"leg {leg.tag}: report not committed: {outcome.commit_error}")
                out.messages.extend(f"leg {leg.tag}: {line}" for line in warning_lines(outcome.record.id, outcome.tracking))
                code = outcome.record.exit_code  # (the trainer's: an interrupted leg's is moectl's 130)
                ui.say(f"leg {leg.tag}: {leg.state}" + (f" (trainer exit {code})" if leg.state == "failed" and code else ""))
                if outcome.exit_code == EXIT_INTERRUPTED:
                    exit_code = EXIT_INTERRUPTED
                    break
                if leg.state == "failed":
                    if fallback_request(cfg, request, outcome) is not None:
                        fb = fallback_of(leg, sweep.legs)
                        if fb is None:
                            fb = fallback_leg(leg)
                            sweep.legs.insert(i, fb)
                            save_sweep(sweep)
                        ui.say(f"leg {leg.tag}: torch.compile failed; re-running as leg {fb.tag} with --compile none")
                    elif opts.fail_fast:
                        exit_code = EXIT_TRAINING
                        notes.append(f"--fail-fast: stopped after leg `{leg.tag}` failed")
                        break
        except KeyboardInterrupt as exc:
            exit_code = EXIT_INTERRUPTED
            if isinstance(exc, Interrupted):  # what was left undone: a leg's report not committed, say
                out.messages.append(exc.message)
            _settle_interrupted(sweep, runs)

    with _Finishing(ui.say, sweep) as finishing:
        finish_sweep(cfg, sweep, runs, opts, out, exit_code, chain=chain, notes=notes, on_commit_wait=ui.on_commit_wait)
    if finishing.signalled and out.exit_code == EXIT_OK:
        out.messages.append(f"{finishing.signalled} arrived while the final report was written; it was finished first")
    return out


def write_sweep_report(cfg: Config, sweep: SweepRecord, runs: dict[str, RunRecord], opts: SweepOptions,
                       out: SweepOutcome, heading: str, *, chain: list[str], notes: list[str],
                       figures: list[Path] = ()) -> list[Path]:
    """The sweep report (+ EXPERIMENTS.md): the paths to commit with it.

    The report file is moectl's, rewritten at every call - unless it holds changes that are not
    moectl's (an edit of the user's, staged or not: `summary.users_changes`). Then it is left exactly
    as it is, neither rewritten nor committed (SPEC §9), and the fresh report goes to REPORT_COPY in
    the sweep's directory instead, which one message line says (`out.report_copy`)."""
    from moectl.summary import remember_written, users_changes

    out.comparison = completed_comparison(sweep, runs, cfg.metrics.window, opts.baseline, cfg.metrics.warmup_steps)

    def text(report_file: Path) -> str:
        return sweep_report(sweep, runs, cfg.metrics.window, heading=heading, comparison=out.comparison, chain=chain,
                            figures=list(figures), notes=notes, report_file=report_file)

    try:
        _claim_report(cfg, sweep, out)
        theirs = users_changes(cfg.root, out.report)
        if theirs is not None:
            copy = Path(sweep.exp_dir) / REPORT_COPY
            write_text_atomic(copy, text(copy))
            if out.report_copy is None:  # one line a sweep, however many legs find it so
                out.messages.append(f"sweep report {out.report} {theirs}: left exactly as you have it, not rewritten "
                                    f"or committed; the sweep's own report is in {copy}")
            out.report_copy = copy
            paths = []
        else:
            body = text(out.report)
            remember_written(cfg.root, out.report, body)  # before writing: see summary.refresh_summary
            out.report.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out.report, body)
            paths = [out.report]
        out.report_unwritten = None
    except OSError as exc:
        # A full disk, a read-only .git (the note that moectl wrote it): not the legs' business - they
        # go on, each with its own report - and the sweep stays unfinished until a resume writes it.
        out.report_unwritten = f"{exc.filename or out.report or cfg.report_dir}: {exc.strerror or exc}"
        line = f"sweep report not written: {out.report_unwritten}"
        if line not in out.messages:
            out.messages.append(line)
        paths = []
    if cfg.report.summary:
        try:
            paths.append(write_summary(cfg))
        except MoectlError as exc:  # the summary is a convenience: never cost the sweep
            out.messages.append(f"EXPERIMENTS.md not refreshed: {exc.message}")
    return paths


def _claim_report(cfg: Config, sweep: SweepRecord, out: SweepOutcome) -> Path:
    """The sweep's report file, claimed when first needed, not when the sweep starts: a sweep
    killed during its first leg leaves no `running` placeholder behind, untracked in report_dir
    with nobody to commit it."""
    if out.report is None:
        out.report = claim_sweep_report(cfg, sweep)
        if sweep.exp_dir:  # remembered, so a resume that must finish this sweep rewrites this very file
            sweep.report = str(out.report)
            save_sweep(sweep)
    return out.report


def finish_sweep(cfg: Config, sweep: SweepRecord, runs: dict[str, RunRecord], opts: SweepOptions, out: SweepOutcome,
                 exit_code: int, *, chain: list[str], notes: list[str],
                 on_commit_wait: Optional[Callable[[Path], None]] = None) -> SweepOutcome:
    """Once no leg will run any more: the final heading, figures, report and its commit."""
    if exit_code == EXIT_INTERRUPTED:
        heading = "interrupted"
    elif exit_code == EXIT_GUARD:
        heading = "stopped: a guard refused a leg"
        notes.extend(f"refused: {line}" for line in out.refused)
    elif exit_code == EXIT_TRAINING:
        heading = "stopped (--fail-fast)"
    else:
        if all(settled(leg, sweep.legs) for leg in sweep.legs):
            # a leg that failed to compile and whose --compile none fallback completed stands settled
            stood_in = sum(1 for leg in sweep.legs if leg.state != "completed")
            heading = "completed" + (f" ({stood_in} through its --compile none fallback)" if stood_in else "")
        else:
            heading = "finished with failures"
            exit_code = EXIT_TRAINING
    off_branch = gitops.off_branch(cfg.root, cfg.project.branch)
    if off_branch is not None:
        # A `git switch` while a leg trained: the report and EXPERIMENTS.md are tracked files of the
        # project branch, and written here they would be changes in someone else's branch. The
        # report goes to the sweep's own directory; a resume on the project branch finishes it.
        copy = Path(sweep.exp_dir) / REPORT_COPY
        out.comparison = completed_comparison(sweep, runs, cfg.metrics.window, opts.baseline, cfg.metrics.warmup_steps)
        write_text_atomic(copy, sweep_report(sweep, runs, cfg.metrics.window, heading=heading,
                                             comparison=out.comparison, chain=chain, figures=[], notes=notes,
                                             report_file=copy))
        out.report_copy = copy
        out.messages.append(f"sweep report not written to {cfg.report_dir} ({off_branch}); it is in {copy}, and "
                            f"`moectl sweep --resume {sweep.id}` on branch {cfg.project.branch!r} writes and commits it")
        out.exit_code = exit_code
        return out
    figures = _figures(cfg, sweep, runs, out) if exit_code in (EXIT_OK, EXIT_TRAINING) and heading != "stopped (--fail-fast)" else []
    paths = write_sweep_report(cfg, sweep, runs, opts, out, heading, chain=chain, notes=notes, figures=figures)
    committing_failed = out.report_unwritten is not None  # (then a resume writes and commits it)
    if committing_failed and not opts.no_commit:
        put_back(cfg, paths)  # EXPERIMENTS.md as it was, as after a commit that failed
    elif not opts.no_commit:
        try:
            sha = gitops.commit_paths(cfg.root, [*paths, *figures], _final_message(sweep, out.comparison, heading),
                                      branch=cfg.project.branch, on_wait=on_commit_wait)
            if sha:
                out.commits.append(sha)
        except MoectlError as exc:
            committing_failed = True
            put_back(cfg, paths)  # EXPERIMENTS.md as it was (the report stays: a resume commits it)
            out.messages.append(f"sweep report not committed: {exc.message}")
    if exit_code in (EXIT_OK, EXIT_TRAINING) and not committing_failed:
        # Only now, with its report written and committed: a sweep killed before this point, or
        # whose final commit failed, is finished by a resume.
        sweep.finished_at = store.now_iso()
        save_sweep(sweep)
    out.exit_code = exit_code
    return out


def _settle_interrupted(sweep: SweepRecord, runs: dict[str, RunRecord]) -> None:
    """After Ctrl-C outside the launcher: the running leg's state from its run record."""
    for leg in sweep.legs:
        if leg.state != "running" or not leg.run_id:
            continue
        try:
            rec = store.load_run(Path(sweep.exp_dir) / leg.run_id)
            runs[rec.id] = rec
            leg.state = rec.status if rec.status in ("completed", "failed") else "interrupted"
        except MoectlError:
            leg.state = "interrupted"
    save_sweep(sweep)


def _figures(cfg: Config, sweep: SweepRecord, runs: dict[str, RunRecord], out: SweepOutcome) -> list[Path]:
    """One figure per metric of every completed leg, next to the report (figures/<report>_<metric>.png)."""
    done = [runs[leg.run_id] for leg in sweep.legs if leg.state == "completed" and leg.run_id in runs]
    if not done:
        return []
    try:
        from moectl.plot import plot_runs
    except ImportError as exc:
        out.messages.append(f"figures skipped: {exc}")
        return []
    try:
        report = _claim_report(cfg, sweep, out)
    except OSError:  # (a full disk, a read-only .git: the report's own writing, next, says so)
        return []
    paths = []
    for metric in FIGURE_METRICS:
        target = report.parent / "figures" / f"{report.stem}_{metric}.png"
        try:
            paths.append(plot_runs(done, metric, target, title=f"sweep {sweep.name}: {metric}",
                                   warn=lambda line: out.messages.append(line),
                                   warmup_steps=cfg.metrics.warmup_steps))
        except UsageError as exc:  # matplotlib missing, or no values of this metric
            out.messages.append(f"figure {metric} skipped: {exc.message}")
        except OSError as exc:  # a full disk: the report says so by its missing figure, this line why
            out.messages.append(f"figure {metric} skipped: {exc.filename or target}: {exc.strerror or exc}")
    return paths


def _final_message(sweep: SweepRecord, comparison: Optional[Comparison], heading: str) -> str:
    n = sum(1 for leg in sweep.legs if leg.state == "completed")
    msg = f"report: sweep {sweep.name} — {heading}, {n}/{len(sweep.legs)} legs"
    best = fastest(comparison) if comparison is not None and len(comparison.runs) > 1 else None
    if best is not None:
        tag, tps, delta = best
        base = next(r for r in comparison.runs if r.id == comparison.baseline)
        msg += f"; fastest {tag} {tps:.0f} tok/s" + (f" ({delta:+.2f}% vs {base.tag})" if base.tag != tag and delta is not None else "")
        if within_noise(comparison, tag):
            msg += ", within noise"
    return msg
