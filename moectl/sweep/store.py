"""Sweeps on disk: sweep.json read and written atomically, found by id/name/prefix, resume chains
followed, and each leg's state checked against its run record.

    sweep = resolve_sweep(cfg.artifact_root, "capacity")   # its most recent sweep of that name
    chain = sweep_chain(sweep, {s.id: s for s in list_sweeps(cfg.artifact_root)})
    runs = sweep_runs(chain, store.list_runs(cfg.artifact_root))  # its legs' runs (ids: unique per directory)
    [leg_status(leg, runs) for leg in sweep.legs]          # `running` checked: `stale` if its owner died

Pure reads apart from `save_sweep`; nothing here runs a leg.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from pydantic import ValidationError

from moectl import store
from moectl.errors import GuardRefused, UsageError
from moectl.records import SWEEP_RECORD, RunRecord, SweepLeg, SweepRecord, save_model


def load_sweep(sweep_dir: Path) -> SweepRecord:
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / SWEEP_RECORD
    try:
        rec = SweepRecord.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no {SWEEP_RECORD} in {sweep_dir}") from None
    except ValidationError as exc:  # pydantic's first problem, as a run.json's is said
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "record"
        raise UsageError(f"corrupt {path}: {where}: {first.get('msg', 'invalid')}") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"corrupt {path}: {str(exc).splitlines()[0]}") from None
    rec.exp_dir = str(sweep_dir.resolve())  # the directory is the truth (it may have moved)
    return rec


def save_sweep(sweep: SweepRecord) -> None:
    save_model(Path(sweep.exp_dir) / SWEEP_RECORD, sweep)


SWEEP_LOCK = ".sweep.lock"
LOCK_WAIT_S = 120.0  # another writer holds it for a read and a rewrite: seconds would be a lot
_held = threading.local()  # sweep dir -> the record this thread holds locked (see locked_sweep)


@contextlib.contextmanager
def locked_sweep(sweep_dir: Path, wait_s: float = LOCK_WAIT_S) -> Iterator[SweepRecord]:
    """Read-modify-write of sweep.json by one process at a time: the submitter and every leg's
    job update it, and two legs finishing together must not lose either update. flock on a file
    beside it (held across the read and the atomic rewrite); the record is saved on leaving.

    Re-entrant within a thread: code that holds the lock and settles a leg through a helper that
    takes it too (the final report job settling a leg whose job died) gets the same record back,
    saved when the outer holder leaves - a second flock on a new descriptor would wait for itself
    forever. Another holder is waited for up to `wait_s`, then GuardRefused (never a silent hang)."""
    key = str(Path(sweep_dir).resolve())
    held = _held.__dict__.setdefault("sweeps", {})
    if key in held:
        yield held[key]
        return
    with open(Path(sweep_dir) / SWEEP_LOCK, "a") as fh:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    # busy, like a git index held past its wait (GitBusy): exit 3, try again
                    raise GuardRefused(f"{Path(sweep_dir) / SWEEP_RECORD} stayed locked by another moectl for "
                                       f"{wait_s:g} s ({Path(sweep_dir) / SWEEP_LOCK}); nothing was changed") from None
                time.sleep(0.05)
        try:
            sweep = load_sweep(sweep_dir)
            held[key] = sweep
            try:
                yield sweep
            finally:
                del held[key]
            save_sweep(sweep)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def update_leg(sweep_dir: Path, state: str, *, run_id: str, tag: Optional[str] = None) -> None:
    """Set the state of the leg run `run_id` (or, before it has a run, the leg `tag`), under the lock."""
    with locked_sweep(sweep_dir) as sweep:
        for leg in sweep.legs:
            if leg.run_id == run_id or (tag is not None and leg.tag == tag and leg.run_id is None):
                leg.state, leg.run_id = state, run_id
                break


FALLBACK_SUFFIX = "_fallback_none"


def fallback_leg(leg: SweepLeg) -> SweepLeg:
    """The `--compile none` leg that stands in for `leg` when its engine failed to compile
    (launch.compile_fallback). A repeat's fallback is that repeat's, in a group of its own: the
    fallbacks measure a different configuration than the group they came from."""
    return SweepLeg(tag=f"{leg.tag}{FALLBACK_SUFFIX}", options={**leg.options, "compile": "none"},
                    fallback_of=leg.tag, repeat=leg.repeat,
                    group=f"{leg.group}{FALLBACK_SUFFIX}" if leg.group else None)


def fallback_of(leg: SweepLeg, legs: list[SweepLeg]) -> Optional[SweepLeg]:
    return next((x for x in legs if x.fallback_of == leg.tag and x.repeat == leg.repeat), None)


def add_fallback_leg(sweep_dir: Path, *, of_run: str, run_id: str) -> bool:
    """Record the compile-fallback leg a Slurm job makes of the leg run `of_run` (moectl.job),
    right after it and queued, as a local sweep records its own (under the lock). False when the
    sweep has that leg already (a resumed sweep carries it and runs it itself): make none."""
    with locked_sweep(sweep_dir) as sweep:
        i, leg = next((i, x) for i, x in enumerate(sweep.legs) if x.run_id == of_run)
        if fallback_of(leg, sweep.legs) is not None:
            return False
        sweep.legs.insert(i + 1, fallback_leg(leg).model_copy(update={"state": "queued", "run_id": run_id}))
        return True


def scan_sweeps(root: Path) -> tuple[list[SweepRecord], list[str]]:
    """Every readable sweep under `root`, oldest first, and one message per unreadable sweep.json."""
    out, unreadable = scan_sweep_dirs(root)
    return out, [message for _, message in unreadable]


def scan_sweep_dirs(root: Path) -> tuple[list[SweepRecord], list[tuple[Path, str]]]:
    """`scan_sweeps`, with the directory of each unreadable sweep.json beside its message."""
    out: list[SweepRecord] = []
    corrupt: list[tuple[Path, str]] = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return [], []
    for entry in entries:
        if entry.is_dir() and not entry.name.startswith(".") and (Path(entry.path) / SWEEP_RECORD).is_file():
            try:
                out.append(load_sweep(Path(entry.path)))
            except UsageError as exc:
                corrupt.append((Path(entry.path), exc.message))
    return out, corrupt


def list_sweeps(root: Path) -> list[SweepRecord]:
    """Every readable sweep under `root`, oldest first (unreadable ones are skipped)."""
    return scan_sweeps(root)[0]


def _newest(named: list[SweepRecord], ours: Optional[Callable[[Optional[str]], bool]]) -> SweepRecord:
    """The most recent of sweeps sharing a name (oldest first), this project's when `ours`
    (moectl.gitops.same_repository) says some are: two repositories writing to one artifact root
    both name a sweep `capacity`, and `wait capacity` typed in one of them means its own."""
    mine = [s for s in named if ours(s.repo)] if ours is not None and len({s.repo for s in named}) > 1 else []
    return (mine or named)[-1]


def resolve_sweep(root: Path, ref: str, ours: Optional[Callable[[Optional[str]], bool]] = None) -> SweepRecord:
    """A SWEEP argument: a sweep directory path, an id, a name (its most recent sweep, of this
    project's when `ours` says some are), or a unique prefix of an id or of a name (as a RUN takes
    a prefix of a tag)."""
    if not ref.strip():
        raise UsageError("an empty SWEEP: give a sweep id, name, unique prefix, or its directory")
    as_path = Path(ref).expanduser()
    if (as_path / SWEEP_RECORD).is_file():
        return load_sweep(as_path)
    if os.sep in ref:
        raise UsageError(f"not a sweep directory (no {SWEEP_RECORD}): {ref}")
    sweeps = list_sweeps(root)
    for s in sweeps:
        if s.id == ref:
            return s
    if ref and (root / ref / SWEEP_RECORD).is_file():
        return load_sweep(root / ref)  # the sweep is there but unreadable: say why, not "no sweep matches"
    named = [s for s in sweeps if s.name == ref]
    if named:
        return _newest(named, ours)
    hits = [s for s in sweeps if s.id.startswith(ref)]
    by_name = [s for s in sweeps if s.name.startswith(ref) and s not in hits]
    if not hits and len({s.name for s in by_name}) == 1:
        return _newest(by_name, ours)  # a prefix of one name: that name's most recent sweep
    hits += by_name
    if not hits:
        # By name, a sweep whose sweep.json cannot be read is not listed: say why it is unreadable
        # (its directory is <time>_<project>-<name>), not that nothing matches.
        known = {s.id for s in sweeps}
        unreadable = sorted(d for d in root.glob(f"*-{ref}") if d.name not in known and (d / SWEEP_RECORD).is_file()) \
            if root.is_dir() and "*" not in ref and "?" not in ref and "[" not in ref else []
        if unreadable:
            load_sweep(unreadable[-1])  # raises, saying what is wrong with it
        raise UsageError(f"no sweep matches {ref!r} under {root}")
    if len(hits) > 1:
        raise UsageError(f"ambiguous sweep reference {ref!r}: {len(hits)} sweeps match",
                         lines=[f"{s.id} (name {s.name})" for s in hits])
    return hits[0]


def sweep_runs(chain: list[SweepRecord], runs: Iterable[RunRecord]) -> dict[str, RunRecord]:
    """leg run id -> its run, for the legs of `chain` (a sweep and the sweeps it resumes).

    A run id is unique within its directory only: two sweeps started in the same second with the
    same leg tags give their legs the same ids, each in its own sweep directory. So a leg's run is
    the record of that id that names one of these sweeps (`RunRecord.sweep`); one that names no
    sweep at all is taken when its id is unambiguous."""
    ids = {s.id for s in chain}
    wanted = {leg.run_id for s in chain for leg in s.legs if leg.run_id}
    out: dict[str, RunRecord] = {}
    loose: dict[str, list[RunRecord]] = {}
    for r in runs:
        if r.id not in wanted:
            continue
        if r.sweep in ids:
            out[r.id] = r
        elif r.sweep is None:
            loose.setdefault(r.id, []).append(r)
    for rid, found in loose.items():
        if rid not in out and len(found) == 1:
            out[rid] = found[0]
    return out


def leg_status(leg: SweepLeg, runs: dict[str, RunRecord]) -> str:
    """The state to show for a leg: sweep.json's, except that a `running` leg is checked against its
    run record - `stale` when the record is missing or its owner died (SIGKILL, reboot), or the
    record's final status when moectl died between finishing the run and updating sweep.json - and
    a `completed` one whose run directory is gone is `missing`. `runs`: every run of the store."""
    if leg.state == "completed" and leg.run_id and leg.run_id not in runs:
        return "missing"  # its run directory is gone: a resume runs it again, so say so
    if leg.state not in ("queued", "running"):
        return leg.state
    rec = runs.get(leg.run_id) if leg.run_id else None
    if rec is None or getattr(rec, "stale", False):
        return "stale"
    if rec.status in ("completed", "failed", "interrupted", "refused"):
        return rec.status
    return rec.status if rec.status in ("queued", "running") else leg.state


def settled(leg: SweepLeg, legs: list[SweepLeg]) -> bool:
    """Completed, or failed to compile with a completed `--compile none` fallback leg standing in."""
    if leg.state == "completed":
        return True
    fb = fallback_of(leg, legs)
    return leg.state == "failed" and fb is not None and fb.state == "completed"


def final_report_owed(sweep: SweepRecord, legs: list[SweepLeg], report_job_ended: bool = False) -> bool:
    """Every leg settled but the sweep never finished (its finished_at comes after its final report
    and commit): its moectl died in the final stage, a Ctrl-C came after the last leg, or the final
    commit failed. Sweeps of a moectl that recorded no pid (older versions) are not judged, nor
    Slurm sweeps while their report job may still write it (`report_job_ended`: the caller asked
    Slurm, sweep.cluster.report_job_ended). The caller checks the sweep's own moectl is gone."""
    return (all(settled(leg, legs) for leg in legs) and sweep.finished_at is None and sweep.pid is not None
            and (not sweep.report_job or report_job_ended))


def owner_alive(sweep: SweepRecord) -> Optional[bool]:
    """Is the moectl that runs this sweep alive (moectl.lock.owner_alive)? None: not knowable here."""
    from moectl.lock import owner_alive as alive

    return alive(sweep.pid, sweep.host, store.parse_time(sweep.created_at) if sweep.created_at else None)


def previous_sweep(sweep: SweepRecord) -> Optional[str]:
    """The id of the sweep `sweep` resumed (None for an original): its `previous`, or - in a
    sweep.json written before that key - its `resumed_from`, which then named that very sweep."""
    return sweep.previous or sweep.resumed_from


def sweep_chain(sweep: SweepRecord, by_id: dict[str, SweepRecord]) -> list[SweepRecord]:
    """The sweep and the ones it resumed, oldest first (a missing link ends the chain)."""
    chain, seen = [sweep], {sweep.id}
    while (link := previous_sweep(chain[0])) and link in by_id and link not in seen:
        chain.insert(0, by_id[link])
        seen.add(chain[0].id)
    return chain


def original_sweep(sweep: SweepRecord, by_id: dict[str, SweepRecord]) -> str:
    """The id of the original sweep of `sweep`'s chain: what a resume of it records as `resumed_from`.
    Followed through the chain, as an older resume's `resumed_from` named only its own predecessor;
    where a link is missing, the furthest sweep known."""
    first = sweep_chain(sweep, by_id)[0]
    return first.resumed_from or first.id


def find_sweep(root: Path, ref: str, sweeps: Optional[list[SweepRecord]] = None,
               ours: Optional[Callable[[Optional[str]], bool]] = None) -> "SweepRecord | None":
    """`wait`/`cancel`'s SWEEP argument: the sweep whose path, id or name is exactly `ref` (None when
    no sweep is: the argument is then a RUN). `sweeps`: list_sweeps(root), when the caller has it;
    `ours` as resolve_sweep takes it."""
    as_path = Path(ref).expanduser()
    if (as_path / SWEEP_RECORD).is_file():
        return load_sweep(as_path)
    sweeps = [s for s in (list_sweeps(root) if sweeps is None else sweeps) if ref in (s.id, s.name)]
    if not sweeps:
        return None
    return next((s for s in sweeps if s.id == ref), None) or _newest(sweeps, ours)


def find_sweep_runs(root: Path, ref: str, runs: list[RunRecord],
                    ours: Optional[Callable[[Optional[str]], bool]] = None) -> "list[RunRecord] | None":
    """The run of every leg of the sweep `ref` names (find_sweep), None when it names no sweep."""
    sweeps = list_sweeps(root)
    sweep = find_sweep(root, ref, sweeps, ours)
    if sweep is None:
        return None
    by_id = sweep_runs(sweep_chain(sweep, {s.id: s for s in sweeps}), runs)
    return [by_id[leg.run_id] for leg in sweep.legs if leg.run_id in by_id]
