"""One run at a time per artifact root: `<artifact_root>/.moectl.lock`.

    with acquire(root, run_id, cmd="moectl run ..."):
        ...                                  # released on every exit path
    holder = read_holder(root)               # None, or who holds it (and whether it is stale)

The lock file holds JSON {pid, host, run_id, started_at, cmd} (plus `started_ts` and a `token`);
a sweep's adds `sweep` and `leg`. A local sweep holds one lock from its first leg to its final
report: its legs run under it (`execute_run(run_lock=...)`), and `Lock.relabel` names the leg and
run of the moment in it, so nobody slips in between two legs (a leg's commit waiting for git).
It is created atomically with its full content (written to a temp file, then hard-linked into
place: `link` fails if the name exists, like O_CREAT|O_EXCL, but a reader never sees it empty).
A lock whose owner died (same host, pid gone, or the pid now belongs to a process started after
the lock was taken) is stale and is taken over, so a SIGKILLed moectl never blocks the next run;
a reader that settles the dead owner's run removes it the same way (`release_if_dead`).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import psutil

from moectl.atomic import create_new_file
from moectl.errors import GuardRefused

LOCK_NAME = ".moectl.lock"


@dataclass
class LockHolder:
    pid: Optional[int]
    host: Optional[str]
    run_id: Optional[str]
    started_at: Optional[str]
    cmd: Optional[str]
    stale: bool
    path: str
    reason: str = ""  # why it is (or is not) considered stale
    sweep: Optional[str] = None  # the sweep holding it, across its legs
    leg: Optional[str] = None  # the sweep's leg running (or last run) now
    own: bool = False  # held by this very process (a sweep's leg looking at its sweep's lock)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        who = f"pid {self.pid} on {self.host}"
        what = held_for(self.run_id, self.sweep, self.leg) if self.run_id or self.sweep else "a run"
        return f"{who} holds the run lock for {what} since {self.started_at}" + (
            f" (stale: {self.reason})" if self.stale else ""
        )


def held_for(run_id: Optional[str], sweep: Optional[str] = None, leg: Optional[str] = None) -> str:
    """`run R`, or `sweep S (leg a, run R)`: what a lock is held for, as a refusal says it."""
    if sweep is None:
        return f"run {run_id}" if run_id else "the run it is starting"  # (a repeat group between two repeats)
    now = ", ".join([*([f"leg {leg}"] if leg else []), *([f"run {run_id}"] if run_id else [])])
    return f"sweep {sweep}" + (f" ({now})" if now else "")


def lock_path(root: Path, name: str = LOCK_NAME) -> Path:
    return Path(root) / name


def pid_stale(pid: int, started_ts: Optional[float]) -> tuple[bool, str]:
    """Is `pid` (recorded on this host) gone, or reused by a newer process?"""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True, f"pid {pid} has exited (zombie)"
        created = proc.create_time()
    except psutil.NoSuchProcess:
        return True, f"pid {pid} is not running"
    except psutil.AccessDenied:
        return False, f"pid {pid} is alive (not ours to inspect)"
    # A process created after the lock was taken cannot be its owner: the pid was reused.
    if started_ts is not None and created > started_ts + 1.0:
        return True, f"pid {pid} now belongs to a process started after the lock"
    return False, f"pid {pid} is alive"


def owner_alive(pid: Optional[int], host: Optional[str], started_ts: Optional[float]) -> Optional[bool]:
    """Is the moectl that recorded (`pid`, `host`) at `started_ts` alive? None when that cannot be
    known here (no pid recorded, or another host); False for this very process (it is past the
    work it recorded: a library caller, or its own ending) and for a pid gone or reused since."""
    if pid is None or host != socket.gethostname():
        return None
    if pid == os.getpid():
        return False
    return not pid_stale(pid, started_ts)[0]


def _holder_from_bytes(data: bytes, path: Path) -> LockHolder:
    try:
        d = json.loads(data)  # bytes that are not UTF-8 raise ValueError too: an unreadable lock
        if not isinstance(d, dict):
            raise ValueError("not an object")
    except ValueError:
        # We never write a partial lock (see module docstring), so garbage is an abandoned file.
        return LockHolder(None, None, None, None, None, True, str(path), "unreadable lock file")
    pid, host = d.get("pid"), d.get("host")
    started_ts = d.get("started_ts")
    if not isinstance(started_ts, (int, float)) or isinstance(started_ts, bool):
        started_ts = None  # a hand-edited or foreign file: judge by the pid alone
    if isinstance(pid, int) and not isinstance(pid, bool) and pid <= 0:
        # no process has it (psutil refuses it with a ValueError that ended `status` in an error)
        return LockHolder(None, host, d.get("run_id"), d.get("started_at"), d.get("cmd"), True, str(path),
                          f"lock file names pid {pid}, which no process has")
    if host == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool):
        stale, reason = pid_stale(pid, started_ts)
    else:
        stale, reason = False, f"held from another host ({host}); cannot check its pid"
    return LockHolder(pid, host, d.get("run_id"), d.get("started_at"), d.get("cmd"), stale, str(path), reason,
                      sweep=d.get("sweep"), leg=d.get("leg"), own=_is_held(d.get("token")))


def read_holder(root: Path, name: str = LOCK_NAME) -> Optional[LockHolder]:
    path = lock_path(root, name)
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # no lock; an artifact_root that is a file: no lock either
        return None
    except OSError as exc:  # another user's lock we may not read, a directory in its place: held, unnamed
        return LockHolder(None, None, None, None, None, False, str(path), f"unreadable ({exc.strerror or exc})")
    return _holder_from_bytes(data, path)


# The tokens of the locks this process holds: a lock of ours is not "another moectl" to the guard.
_HELD: set[str] = set()


def _is_held(token) -> bool:
    return isinstance(token, str) and token in _HELD  # (a hand-edited file may hold anything there)


class Lock:
    """A held run lock. `release()` removes the file only if it is still ours (token match)."""

    def __init__(self, path: Path, info: dict):
        self.path = path
        self.info = info
        self.released = False
        _HELD.add(info["token"])

    def relabel(self, **fields) -> None:
        """Say what the holder does now (a sweep: `run_id`, `leg`) in the lock file. Still the same
        lock (owner, start, token), rewritten atomically: a reader sees the old text or the new."""
        from moectl.atomic import write_text_atomic

        if self.released or not self._ours():
            return
        self.info.update(fields)
        write_text_atomic(self.path, json.dumps(self.info, indent=2) + "\n")

    def _ours(self) -> bool:
        try:
            d = json.loads(self.path.read_bytes())
        except (FileNotFoundError, ValueError):  # ValueError covers bytes that are not UTF-8
            return False
        return isinstance(d, dict) and d.get("token") == self.info["token"]

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        _HELD.discard(self.info["token"])
        if self._ours():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _take_over(path: Path, seen: LockHolder) -> None:
    """Remove the stale lock `seen`, so that the next `create_new_file` can create ours.

    Contenders serialise on an flock of the artifact root directory (the kernel drops it when its
    holder dies, so it can never go stale itself) and re-judge the lock under it. Only then is
    removing it safe: its owner is dead, no other contender is removing, and a new lock can only
    appear where there is none. (Moving the lock aside with rename and putting it back when it
    turned out live lets a third contender publish in between: two winners.)"""
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a filesystem without locks: the re-check below still narrows the window
        try:
            now = _holder_from_bytes(path.read_bytes(), path)
        except FileNotFoundError:
            return  # released or taken over meanwhile; just retry the create
        if now.stale and (now.pid, now.started_at, now.run_id) == (seen.pid, seen.started_at, seen.run_id):
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the flock


def release_if_dead(root: Path, pid: int, run_id: str) -> None:
    """Remove the lock of `root` if it still names `run_id` held by `pid` and that holder is dead:
    what a reader does once it has settled the run a killed moectl left behind. Done as a takeover
    (move aside, check, put back if it changed), so a live lock that replaced the dead one meanwhile
    is never removed. OSError when the artifact root is not writable."""
    holder = read_holder(root)
    if holder is not None and holder.stale and holder.pid == pid and holder.run_id == run_id:
        _take_over(lock_path(root), holder)


def acquire(root: Path, run_id: Optional[str], cmd: str = "", name: str = LOCK_NAME,
            sweep: Optional[str] = None) -> Lock:
    """Take the run lock of `root` (created if missing), taking over a stale one.
    A live holder → GuardRefused (exit 3) naming it. `name`: another lock of the same kind
    in `root` (a sweep being resumed holds `.moectl-resume.lock` in its directory). `sweep`: the
    sweep taking it for all its legs (`run_id` None until its first leg's run is made)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = lock_path(root, name)
    now = time.time()
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "run_id": run_id,
        "started_at": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
        "cmd": cmd,
        "started_ts": now,
        "token": uuid.uuid4().hex,
        **({"sweep": sweep, "leg": None} if sweep is not None else {}),
    }
    text = json.dumps(info, indent=2) + "\n"
    for _ in range(5):
        if create_new_file(path, text):
            return Lock(path, info)
        holder = read_holder(root, name)
        if holder is None:
            continue  # released between our attempt and the read
        if not holder.stale:
            raise GuardRefused(f"another moectl run is active: {holder.describe()}")
        _take_over(path, holder)
    raise GuardRefused(f"could not take the run lock {path} (contended); try again")
