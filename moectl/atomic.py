"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every record (run.json, sweep.json), report and figure moectl writes goes through here: a temp
file in the same directory, fsynced, renamed over the target. Standard library only, so the
read path (`status`, `runs`) can write its cache without importing the record models.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Optional


def ensure_dir(directory: Path) -> None:
    """mkdir -p, with a one-line reason when a file stands where a directory must be (not
    `[Errno 20] Not a directory`); other errors (permissions, a full disk) pass as they are."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        from moectl.errors import UsageError

        blocker = next((p for p in [directory, *directory.parents]
                        if p.is_symlink() and not p.exists() or p.exists() and not p.is_dir()), directory)
        what = (f"a link to {os.readlink(blocker)}, which does not exist" if blocker.is_symlink() and not blocker.exists()
                else "a file, not a directory")
        raise UsageError(f"cannot make directory {directory}: {blocker} is {what}") from None


def json_ready(value: Any) -> Any:
    """`value` with every NaN or infinite float as None. JSON has neither: Python's json writes them
    as bare NaN/Infinity tokens, which strict parsers (jq, JavaScript, Go) refuse - and with them the
    whole document (a `runs --json` of every run, for one mean that overflowed)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def read_regular_bytes(path: Path) -> bytes:
    """The bytes of the regular file at `path`. A FIFO (which a plain open would wait on forever), a
    directory or a device raises OSError "not a regular file": a record or metrics file is never one."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # non-blocking: a FIFO opens at once
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` atomically: a reader sees the old file or the new one, never half."""
    path = Path(path)
    text = json.dumps(json_ready(data), indent=2, sort_keys=False, allow_nan=False) + "\n"
    write_text_atomic(path, text)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path, "w") as fh:
        fh.write(text)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path, "wb") as fh:
        fh.write(data)


@functools.lru_cache(maxsize=None)
def new_file_mode() -> int:
    """The permissions `open(path, "w")` would give a new file: 0o666 less the umask. mkstemp's own
    0600 would hide records, reports and EXPERIMENTS.md from the rest of a group on a shared node.
    Read once per process (moectl never changes its umask), not at every record write."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:  # Linux: read without changing it
            mask = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)  # elsewhere: the only way to read it is to set it (and put it back)
        os.umask(mask)
    return 0o666 & ~mask


def _temp_prefix(path: Path) -> str:
    """`.<name>.moectl-<pid>.` (mkstemp adds 8 characters and `.tmp`): the pid lets
    `remove_dead_temp_files` tell a temp file a killed moectl left from one being written."""
    return f".{path.name}.moectl-{os.getpid()}."


_TEMP = re.compile(r"^\..+\.moectl-(\d+)\.[A-Za-z0-9_]{8}\.tmp$")


DEAD_TEMP_AGE_S = 600.0  # a write takes seconds; one untouched this long was abandoned


def remove_dead_temp_files(directory: Path) -> list[Path]:
    """Remove the temp files in `directory` that a moectl killed mid-write left behind: a SIGKILL
    skips the cleanup below, and in the repository (reports/, the EXPERIMENTS.md beside it) they
    would show in `git status` and go in with a `git add -A`. Only files older than
    DEAD_TEMP_AGE_S whose pid is gone here: a shared reports/ is written by Slurm jobs on other
    nodes too, whose pids mean nothing on this one. Returns what went."""
    import time

    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < DEAD_TEMP_AGE_S:
                continue  # being written, here or on another node
        except OSError:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its writer is alive (or another user's): not ours to judge
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


@contextlib.contextmanager
def _naming(path: Path):
    """An OSError raised inside names `path`, the file asked for: a write, flush or fsync on a full
    disk names no file at all (`No space left on device` - of which file?), mkstemp and rename name
    the temp file nobody chose."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from None


class _NamedFileIO(io.FileIO):
    """The raw file under a temp file's buffers: each write that fails names the file asked for.
    (At this level, not around the caller's block: an error of the caller's own - a second file it
    writes at once, as export does - must keep its own name.)"""

    def __init__(self, fd: int, target: Path):
        super().__init__(fd, "w")
        self.target = target

    def write(self, data) -> int:
        with _naming(self.target):
            return super().write(data)


def _open_named(fd: int, mode: str, target: Path):
    """os.fdopen(fd, mode) ("w" text, UTF-8, or "wb"), its write errors naming `target`."""
    buffered = io.BufferedWriter(_NamedFileIO(fd, target))
    return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding="utf-8")


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w"):
    """Open a temp file beside `path` ("w" text or "wb" bytes); on success it is fsynced and
    renamed over `path`, on any error removed: readers never see a half-written file. The file
    keeps the permissions of the one it replaces, or gets those of a plain new file. Every OSError
    of its own names `path`."""
    path = Path(path)
    with _naming(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        with _naming(path):
            try:
                os.fchmod(fd, os.stat(path).st_mode & 0o7777)
            except FileNotFoundError:
                os.fchmod(fd, new_file_mode())
        try:
            fh = _open_named(fd, mode, path)
        except BaseException:
            os.close(fd)
            raise
        with fh:
            yield fh
            with _naming(path):
                fh.flush()
                os.fsync(fh.fileno())
        with _naming(path):  # (a directory in its place, say)
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def create_new_file(path: Path, text: str, mode: Optional[int] = None) -> bool:
    """Create `path` holding `text`, atomically and only if it does not exist: False when it does.
    The text goes to a temp file beside it (fsynced), which is then hard-linked to the name; a link
    never replaces a file, so of two processes creating one name exactly one wins, and a reader
    never sees half of it. (The run lock and new reports are created this way.) Every OSError
    names `path`."""
    path = Path(path)
    mode = new_file_mode() if mode is None else mode
    with _naming(path):  # (`moectl init some/missing/dir`)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        with _naming(path), _open_named(fd, "w", path) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), mode)  # mkstemp's 0600 would hide a committed report from the group
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:
            # A filesystem without hard links: claim the name with O_EXCL, then fill it (a reader
            # may briefly see it empty).
            try:
                claimed = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            except FileExistsError:
                return False
            try:
                with _naming(path), _open_named(claimed, "w", path) as fh:
                    fh.write(text)
            except BaseException:
                path.unlink(missing_ok=True)  # ours, half-filled: not a lock or report of nobody's
                raise
            return True
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:  # removed by someone else's cleanup: the link above holds the text
            pass
