"""The one place that commits: exactly the paths moectl wrote, nothing else.

    sha = commit_paths(repo, [report_md], "report: static cap1.0 — 806400 tok/s", branch="main")

The user's modified, staged and untracked files must stay exactly as they were, index included.
A plain add-then-commit (or GitPython's `index.commit()`) commits the whole index and so sweeps in
whatever the user had staged. Instead the commit is built with plumbing on a temporary index, and
the real index changes the way `git commit` changes it - through `index.lock`:

    create .git/index.lock     # O_CREAT|O_EXCL as git does; while an editor's git holds it, wait
                               # (MOECTL_GIT_LOCK_WAIT, 10 s), then give up with nothing moved
    old = refs/heads/B         # read under the lock: checkout and `git commit` need it too
    GIT_INDEX_FILE=tmp  git read-tree old ; git update-index --add --remove -- <ours>
                        git write-tree    ; git commit-tree <tree> -p old [-S] -m <msg>
    GIT_INDEX_FILE=copy git update-index --add --remove -- <ours>   # copy of the real index
    rename copy -> index.lock  # the new index waits in the lock, as git's does
    git update-ref refs/heads/B <new> <old>   # compare-and-swap; if the branch moved (a commit
                                              # that needed no index lock) re-read, rebuild, retry
    rename index.lock -> index # only our entries changed, each as `git add` writes it

So either the branch moved and the index matches it, or nothing moved: the lock is removed, the
files stay on disk, and GitBusy, SigningFailed, IdentityUnknown, RepositoryUnwritable or GitError
says why. A moectl killed between two of those steps leaves the lock and a note of how far it got
(OWNER_NAME); the next one finishes or undoes that commit (`_recover`).

`git commit` signs when commit.gpgSign is true; commit-tree ignores that setting, so `-S` is passed
when it is on (`signing`), and a signature git cannot make fails the commit like `git commit`
would - never an unsigned commit in a repository that asked for signed ones. The repository's
commit hooks (pre-commit, commit-msg, post-commit) do not run: they are written for the user's
own commits and check or rewrite what the user staged, which a report commit leaves alone and
leaves out - a hook would judge (or, auto-formatting, change) the user's work in progress.

The old way - move the branch, then run `git update-index` on the real index - failed while
another process held the lock, leaving a commit the index did not know about, which the user's
next `git commit` silently reverted.

GitPython is not used: rewriting the user's index with its IndexFile keeps a stale cache-tree (the
user's next commit reverts ours) or drops every extension; IndexFile.from_tree needs the very lock
we hold; index v4 and clean filters (LFS, eol) are unsupported. scripts/measure_gitpython_commit.py
measures it; README "Commits beside other git processes" has the figures.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from moectl.errors import EXIT_GUARD, EXIT_USAGE, GuardRefused, MoectlError, UsageError

EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
ZERO_OID = "0" * 40

LOCK_WAIT_ENV = "MOECTL_GIT_LOCK_WAIT"  # seconds to wait for another git process's index.lock
DEFAULT_LOCK_WAIT_S = 10.0
LOCK_POLL_S = 0.05
CAS_TRIES = 5  # commits by others landing between our read of the branch and our update


class GitError(MoectlError):
    def __init__(self, message: str):
        super().__init__(message, exit_code=1)


class SigningFailed(MoectlError):
    """`commit.gpgSign` is on and git could not sign (no such key, no agent, gpg missing): nothing was
    committed (exit 2: the git configuration is the user's to fix, as `git commit` would fail too)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=EXIT_USAGE)


class IdentityUnknown(MoectlError):
    """git has no identity to commit with (no user.name / user.email it may use): nothing was
    committed (exit 2: the git configuration is the user's to fix, as `git commit` would fail too)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=EXIT_USAGE)


class RepositoryUnwritable(MoectlError):
    """git's own files could not be written: the commit did not go in. Exit 2 when the disk is full
    (`full`: the user's disk to free, as any other write of moectl's that finds it full; not a
    guard, not a bug); exit 3 when the repository cannot be written at all (a read-only `.git`,
    a directory in a file's way), as RefRejected's ref that is not writable: the repository refused."""

    def __init__(self, message: str, full: bool):
        super().__init__(message, exit_code=EXIT_USAGE if full else EXIT_GUARD)
        self.full = full


# A file system (or quota, or file size limit) with no room left: exit 2 wherever moectl meets it.
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# git's words for it: the system's (die_errno), or its own when a write came up short (csum-file.c).
FULL_SAID = (*(os.strerror(e) for e in FULL_ERRNOS), "Out of diskspace")


@contextlib.contextmanager
def _writing(git_dir: Path):
    """Around a commit's writes to `git_dir`: an OSError taking the index lock or writing beside it
    (a read-only `.git`, a full disk), or git plumbing failing for want of space ("unable to write
    loose object file: No space left on device", "write error. Out of diskspace"), is raised as
    RepositoryUnwritable - one line naming the file - which callers handle as any other commit
    that failed (the run's report kept, EXPERIMENTS.md put back), not as a raw OSError."""
    try:
        yield
    except OSError as exc:
        where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else exc.filename or git_dir  # (a rename's)
        raise RepositoryUnwritable(f"{where}: {exc.strerror or exc}", full=exc.errno in FULL_ERRNOS) from None
    except GitError as exc:
        if not any(said in exc.message for said in FULL_SAID):
            raise
        raise RepositoryUnwritable(exc.message, full=True) from None


class GitBusy(GuardRefused):
    """Another git process held the index past the wait, or kept moving the branch: nothing was
    committed (exit 3, like the guards: the repository is busy, try again)."""


class RefRejected(GuardRefused):
    """git would not move the branch (a reference-transaction hook said no, the ref is not
    writable): nothing was committed (exit 3: the repository refused, as a guard would)."""


def _run(repo: Path, args: Sequence, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """git's raw bytes: file contents and names are whatever the repository holds, UTF-8 or not."""
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, env={**os.environ, **(env or {})})


def _said(r: subprocess.CompletedProcess) -> str:
    return said_text((r.stderr.strip() or r.stdout.strip()).decode("utf-8", "replace")) or f"exit {r.returncode}"


def said_text(output: str) -> str:
    """git's word on a failure, as one readable line (SPEC §8): its conclusion (the last "fatal:" or
    "error:" line; the lines before it repeat the same failure in detail), with the advice git
    prints after it - safe.directory's `git config --global --add safe.directory DIR` - in brackets."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    last = max((i for i, line in enumerate(lines) if line.startswith(("fatal: ", "error: "))), default=len(lines) - 1)
    if last < 0:
        return ""
    advice = " ".join(lines[last + 1:])
    return lines[last] + (f" ({advice})" if advice else "")


def _git_bytes(repo: Path, *args: str, env: Optional[dict] = None, check: bool = True) -> bytes:
    r = _run(repo, args, env)
    if check and r.returncode != 0:
        raise GitError(f"git {args[0]} failed: {_said(r)}")
    return r.stdout if r.returncode == 0 else b""


def _git(repo: Path, *args: str, env: Optional[dict] = None, check: bool = True) -> str:
    """git's output as text without its trailing newline. Decoded with os.fsdecode, which is
    lossless: a file name that is not UTF-8 keeps its bytes as surrogates, and subprocess encodes
    it back to the same bytes when it goes to git again (`text=True` would raise on it instead)."""
    return os.fsdecode(_git_bytes(repo, *args, env=env, check=check)).strip("\n")


def repo_root(path: Path) -> Path:
    out = _git(Path(path), "rev-parse", "--show-toplevel")
    return Path(out).resolve()


def tracked_area(repo: Path, directory: Path) -> bool:
    """Whether files created in `directory` would show up in `git status` of `repo`: it is inside
    the work tree and .gitignore does not hide it (checked for a file in it: it need not exist)."""
    try:
        root = repo_root(repo)
        rel = Path(directory).resolve().relative_to(root)
    except (MoectlError, ValueError):
        return False
    if rel.parts[:1] == (".git",):
        return False
    probe = (rel / "moectl-probe").as_posix()
    return not _git(root, "check-ignore", "--no-index", "--", probe, check=False)


def why_not_in_diff(repo: Path, path: Path) -> Optional[str]:
    """Why `git_diff` of `repo` cannot hold the file at `path` ("outside the repository", "ignored
    by git"), or None when it is committed or in the diff as an untracked file."""
    try:
        root = repo_root(repo)
        rel = Path(path).resolve().relative_to(root)
    except (MoectlError, ValueError):
        return "outside the repository"
    if _git(root, "ls-files", "--", rel.as_posix(), check=False):
        return None  # tracked: HEAD plus the diff hold it
    if _git(root, "check-ignore", "--", rel.as_posix(), check=False):  # (prints the path when ignored)
        return "ignored by git"
    return None


def current_branch(repo: Path) -> Optional[str]:
    """The checked-out branch, or None on a detached HEAD."""
    out = _git(repo, "symbolic-ref", "-q", "--short", "HEAD", check=False)
    return out or None


def _files_under(p: Path) -> list[Path]:
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file() or q.is_symlink())
    return [p]


def _relative(repo: Path, paths: Sequence) -> list[str]:
    rels = []
    for raw in paths:
        p = Path(os.path.expanduser(str(raw)))
        p = p if p.is_absolute() else repo / p
        for f in _files_under(p):
            # Resolve the parent (symlinked dirs, ..) but keep the file name: a symlink we wrote is
            # committed as a symlink, not followed.
            real = f.parent.resolve() / f.name
            if not real.is_relative_to(repo) or real.relative_to(repo).parts[:1] == (".git",):
                raise GuardRefused(f"refusing to commit {raw}: it is outside the repository {repo}")
            rels.append(real.relative_to(repo).as_posix())
    return list(dict.fromkeys(rels))


def check_branch(repo: Path, branch: Optional[str]) -> str:
    """The current branch's name, or GuardRefused on a detached HEAD or the wrong branch."""
    cur = current_branch(repo)
    if cur is None:
        try:
            repo_root(repo)
        except GitError as exc:  # not a repository at all (or one git will not read), which is not "detached"
            if "not a git repository" in exc.message:
                raise GuardRefused(f"refusing to commit: {repo} is not inside a git repository") from None
            raise GuardRefused(f"refusing to commit: {exc.message}") from None
        raise GuardRefused("refusing to commit: HEAD is detached; check out the project branch")
    if branch not in (None, "*") and cur != branch:
        raise GuardRefused(f"refusing to commit: on branch {cur!r}, expected {branch!r}")
    return cur


def off_branch(repo: Path, branch: Optional[str]) -> Optional[str]:
    """Why a commit to `branch` would be refused here now (check_branch's words), or None."""
    try:
        check_branch(repo, branch)
    except MoectlError as exc:
        return exc.message
    return None


def lock_wait_s() -> float:
    """How long to wait for another git process's index.lock: $MOECTL_GIT_LOCK_WAIT or 10 s."""
    raw = os.environ.get(LOCK_WAIT_ENV, "").strip()
    if not raw:
        return DEFAULT_LOCK_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UsageError(f"{LOCK_WAIT_ENV}={raw!r}: expected a number of seconds >= 0")
    return value


# While moectl holds index.lock, this file beside it says whose it is (pid, host, the lock file's
# inode) and how far the commit got: `staged` once the new index waits in the lock, with the
# branch, its old and its new commit. A moectl killed there (SIGKILL, power) leaves both behind;
# the next moectl that wants the lock finishes or undoes that commit (`_recover`) instead of
# waiting on a lock nobody will release - git's own crashed lock waits for a person, and a person
# removing this one by hand after the branch moved would make their next commit revert ours.
OWNER_NAME = "moectl-index.lock.owner"
RECOVERY_FLOCK = "moectl-index.flock"  # serialises taking the lock with recovering a dead one
TMP_PREFIX = "moectl-index-"  # + "<pid>-": the temporary index directory of one commit


@contextlib.contextmanager
def _serialised(git_dir: Path):
    """An flock on `<git dir>/moectl-index.flock` (dropped by the kernel if its holder dies):
    between moectl processes, recovering a dead commit, taking the lock and dropping the note
    never interleave. Opened read-only (flock needs no write access: in a repository shared by
    several users one of them created it); without it the identity checks still hold."""
    try:
        fd = os.open(git_dir / RECOVERY_FLOCK, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass  # a filesystem without locks
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _identity(path: Path) -> dict:
    """Which file `path` is: device, inode and change time. An inode number alone is reused at once
    by the next file created (ext4); a new file has a new ctime, and so does one renamed here."""
    st = os.stat(path)
    return {"dev": st.st_dev, "ino": st.st_ino, "ctime_ns": st.st_ctime_ns}


def _ref_is(git_dir: Path, ref: Optional[str], sha: Optional[str]) -> bool:
    if not ref or not sha:
        return False
    r = _run(git_dir, ["rev-parse", "-q", "--verify", f"{ref}^{{commit}}"], env={"GIT_DIR": str(git_dir)})
    return os.fsdecode(r.stdout).strip() == sha


class IndexLock:
    """`<index>.lock`, taken and released the way git does: created exclusively (waiting up to
    `wait_s` while another process holds it), then either renamed over the index (`commit`) or
    removed. From creation to rename the lock path always exists, so no other git process can
    write the index in between; readers see the old index or the new one, never a missing one.
    Beside it, OWNER_NAME says it is moectl's, so a lock left by a killed moectl is recovered."""

    def __init__(self, index: Path, wait_s: float, on_wait: Optional[Callable[[Path], None]] = None,
                 git_dir: Optional[Path] = None):
        self.index = Path(index)
        self.path = self.index.with_name(self.index.name + ".lock")
        self.git_dir = Path(git_dir) if git_dir is not None else self.index.parent
        self.owner = self.git_dir / OWNER_NAME
        self.wait_s = wait_s
        self.on_wait = on_wait
        self.held = False
        self.started_ts = time.time()
        self.token = os.urandom(8).hex()  # which note is ours, when dropping it
        self.noted: dict = {}

    def __enter__(self) -> "IndexLock":
        deadline = time.monotonic() + self.wait_s
        waiting = False
        while True:
            with _serialised(self.git_dir):
                try:
                    os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                except FileExistsError:
                    if _recover(self.index, self.git_dir):
                        continue  # a killed moectl's lock, finished or undone: try again now
                else:
                    self.held = True
                    try:
                        self._note(phase="locked")
                    except BaseException:  # no note, no lock: a lock nobody can recover would block all
                        self.held = False
                        os.unlink(self.path)
                        raise
                    return self
            if time.monotonic() >= deadline:
                raise GitBusy(
                    f"another git process holds {self.path} (waited {self.wait_s:g} s, "
                    f"{LOCK_WAIT_ENV}); nothing was committed (a lock left by a crashed git "
                    "stays until removed by hand; one a killed moectl left is recovered)") from None
            if not waiting and self.on_wait is not None:
                self.on_wait(self.path)
            waiting = True
            time.sleep(LOCK_POLL_S)

    def _note(self, **how) -> None:
        """Write OWNER_NAME (atomically): who holds the lock, which file it is, how far it got."""
        data = {"pid": os.getpid(), "host": socket.gethostname(), "started_ts": self.started_ts,
                "token": self.token, **_identity(self.path), **how}
        tmp = self.owner.with_name(f"{OWNER_NAME}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.owner)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.noted = data

    def stage(self, new_index: Path) -> None:
        """The new index content waits in the lock file (a rename: the lock path never vanishes)."""
        os.replace(new_index, self.path)
        self._note(phase="staged")

    def before_ref_update(self, ref: str, old: Optional[str], new: str) -> None:
        """Say which branch update comes next: whether it happened decides a recovery."""
        self._note(phase="staged", ref=ref, old=old, new=new)

    def commit(self) -> None:
        os.replace(self.path, self.index)
        self.held = False
        self._drop_note()

    def _drop_note(self) -> None:
        """Remove OWNER_NAME if it is still ours: another moectl may have taken the lock (and written
        its own note) the moment ours was released."""
        with _serialised(self.git_dir):
            try:
                if json.loads(self.owner.read_text()).get("token") == self.token:
                    self.owner.unlink()
            except (OSError, ValueError):
                pass

    def __exit__(self, *exc) -> None:
        if self.held:
            self.held = False
            # Stopped (Ctrl-C, SIGTERM, an error) after the branch moved but before the index went
            # in: put it in, as commit() would have - removing it would leave a commit the index
            # does not know about, which the user's next commit reverts.
            if _ref_is(self.git_dir, self.noted.get("ref"), self.noted.get("new")):
                os.replace(self.path, self.index)
            else:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:  # someone removed it by hand meanwhile
                    pass
            self._drop_note()


def _recover(index: Path, git_dir: Path) -> Optional[str]:
    """Under `_serialised`: when index.lock is the one a now-dead moectl left (OWNER_NAME names a
    dead pid on this host and the lock file itself: device, inode and change time), finish its
    commit if the branch already points at the commit it built (the staged index is exactly what
    that commit's `git commit` would leave), else remove the lock (nothing moved). Also removes
    that moectl's temporary index directories. When the lock was cleared, how (always truthy):
    "finished", "undone", or "gone" (removed by someone meanwhile); None when it is someone
    else's (a live moectl, the user's git, a lock taken since the note was written)."""
    from moectl.lock import pid_stale  # psutil: only when a lock is in the way

    owner, lock = git_dir / OWNER_NAME, index.with_name(index.name + ".lock")
    try:
        data = json.loads(owner.read_text())
        pid, noted = int(data["pid"]), {k: int(data[k]) for k in ("dev", "ino", "ctime_ns")}
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    if data.get("host") != socket.gethostname() or not pid_stale(pid, data.get("started_ts"))[0]:
        return None
    for leftover in git_dir.glob(f"{TMP_PREFIX}{pid}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        if _identity(lock) != noted:
            owner.unlink(missing_ok=True)  # its lock is gone; this one is someone else's
            return None
    except FileNotFoundError:
        owner.unlink(missing_ok=True)
        return "gone"
    if data.get("phase") == "staged" and _ref_is(git_dir, data.get("ref"), data.get("new")):
        os.replace(lock, index)  # the branch moved: the index it staged goes in, as its commit() would
        how = "finished"
    else:
        os.unlink(lock)  # the branch did not move: as if that commit had never started
        how = "undone"
    owner.unlink(missing_ok=True)
    return how


def index_lock_state(repo: Path, recover: bool = True) -> Optional[str]:
    """One line about the repository's index.lock, or None when there is none. With `recover`, a
    lock a killed moectl left (its OWNER_NAME note names a dead moectl on this host and that very
    file) is finished or undone first, as the next commit would do (`_recover`): git commands and
    `git status` need it gone, and a command that finds nothing to commit would leave it forever.
    A lock anyone else holds - a live moectl, the user's git - is only described, never touched."""
    found = _index_lock(repo)
    if found is None:
        return None
    git_dir, index, data, pid = found
    lock = index.with_name(index.name + ".lock")
    if recover and data is not None:
        try:
            with _serialised(git_dir):
                how = _recover(index, git_dir)
        except OSError as exc:  # a .git this user cannot write (a shared repository): said, not raised
            return f"{lock} was left by a killed moectl (pid {pid}), and cannot be recovered here: {exc}"
        if how == "finished":
            return (f"recovered {lock}, left by a killed moectl (pid {pid}): its commit had moved the branch, so "
                    "the index it staged went in (as its commit would have done)")
        if how == "undone":
            return (f"recovered {lock}, left by a killed moectl (pid {pid}): its commit had not moved the branch, "
                    "so the lock was removed (nothing changed)")
    held = _lock_holder(lock, data, pid)
    return held[1] if held else None


def _lock_holder(lock: Path, data: Optional[dict], pid: Optional[int]) -> Optional[tuple[str, str]]:
    """(who, the line about it) for an index.lock that exists, None when there is none. `who`:
    "dead-moectl" (a killed moectl's: the next moectl command that writes to git recovers it),
    "moectl" (a live moectl committing) or "other" (the user's git, or one that crashed)."""
    if not lock.exists():
        return None
    if data is not None:
        try:
            mine = _identity(lock) == {k: int(data[k]) for k in ("dev", "ino", "ctime_ns")}
        except (OSError, ValueError, KeyError, TypeError):
            mine = False
        if mine:
            from moectl.lock import pid_stale

            dead = data.get("host") == socket.gethostname() and pid_stale(pid, data.get("started_ts"))[0]
            if dead:  # (recover=False) the next moectl command that uses git recovers it
                return "dead-moectl", (f"{lock} was left by a killed moectl (pid {pid}); `moectl status` or the next "
                                       "moectl command that writes to git finishes or undoes that commit")
            return "moectl", f"{lock} is held by moectl (pid {pid} on {data.get('host')}), committing"
    return "other", (f"{lock} exists: another git process holds it (a `git commit` waiting for its editor), or a "
                     "crashed git left it (remove it by hand once no git command runs)")


def index_lock_holder(git_dir: Path, index: Path) -> Optional[tuple[str, str]]:
    """`_lock_holder` of `index`'s lock, touching nothing (the git probe's reading; it has run
    `rev-parse` for both paths already)."""
    data, pid = _owner_note(git_dir)
    return _lock_holder(index.with_name(index.name + ".lock"), data, pid)


def _index_lock(repo: Path) -> Optional[tuple[Path, Path, Optional[dict], Optional[int]]]:
    """(git dir, index, moectl's OWNER_NAME note or None, the pid it names), in one git process
    (`moectl status` runs this every time); None outside a repository."""
    try:
        git_dir, index = map(Path, _git(Path(repo), "rev-parse", "--absolute-git-dir", "--path-format=absolute",
                                        "--git-path", "index").splitlines())
    except (MoectlError, OSError, ValueError):
        return None
    return (git_dir, index, *_owner_note(git_dir))


def _owner_note(git_dir: Path) -> tuple[Optional[dict], Optional[int]]:
    """moectl's OWNER_NAME note beside the index lock and the pid it names, or (None, None)."""
    try:
        data = json.loads((git_dir / OWNER_NAME).read_text())
        return data, int(data["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def recover_dead_index_lock(repo: Path) -> Optional[str]:
    """`index_lock_state` for commands that write to git: a killed moectl's lock finished or undone
    before anything else; the line saying so, or None when there was none to recover."""
    line = index_lock_state(repo, recover=True)
    return line if line is not None and line.startswith("recovered ") else None


def _tree_of(repo: Path, old: Optional[str]) -> str:
    return _git(repo, "rev-parse", f"{old}^{{tree}}") if old else EMPTY_TREE


def signing(repo: Path) -> list[str]:
    """`["-S"]` when the repository's `commit.gpgSign` is true, else `[]`. `git commit` signs then;
    `git commit-tree` ignores the setting (on purpose since git 2.2: scripts call it), so moectl
    asks for the signature itself. `-S` without a key id signs exactly as `git commit` does: git
    reads user.signingKey, gpg.format and gpg.program."""
    r = _run(repo, ["config", "--type=bool", "--get", "commit.gpgSign"])
    if r.returncode == 1:  # not set
        return []
    if r.returncode != 0:  # not a boolean: `git commit` refuses it too
        raise SigningFailed(f"git config commit.gpgSign: {_said(r)}; nothing was committed")
    return ["-S"] if r.stdout.strip() == b"true" else []


def _signing_failure(r: subprocess.CompletedProcess) -> str:
    """Why git could not sign, in one line: its lines without the `error:`/`fatal:` prefixes, once
    each ("cannot run gpg2: No such file or directory; gpg failed to sign the data")."""
    lines = r.stderr.decode("utf-8", "replace").splitlines()
    said = [line.split(": ", 1)[1] if line.startswith(("error: ", "fatal: ")) else line for line in lines]
    return "; ".join(dict.fromkeys(line.strip() for line in said if line.strip())) or f"exit {r.returncode}"


def _build_commit(repo: Path, tmp: Path, old: Optional[str], rels: list[str], message: str,
                  sign: Sequence[str] = ()) -> Optional[str]:
    """A commit of `old` plus our paths as they are on disk, built on a temporary index; None when
    that changes nothing. `sign`: `signing(repo)`."""
    env = {"GIT_INDEX_FILE": str(tmp / "commit-index")}
    if old:
        _git(repo, "read-tree", old, env=env)
    else:
        _git(repo, "read-tree", "--empty", env=env)
    _git(repo, "update-index", "--add", "--remove", "--", *rels, env=env)
    tree = _git(repo, "write-tree", env=env)
    if tree == _tree_of(repo, old):
        return None
    parent = ["-p", old] if old else []
    r = _run(repo, ["commit-tree", tree, *parent, *sign, "-m", message])
    if r.returncode != 0:
        _check_identity(repo)  # before signing: without an identity there is nothing to sign
    if r.returncode != 0 and sign:
        raise SigningFailed(f"commit.gpgSign is on and git could not sign the commit: {_signing_failure(r)} "
                            "(`git commit` fails the same way here; fix the key or agent, or turn commit.gpgSign "
                            "off); nothing was committed")
    if r.returncode != 0:
        raise GitError(f"git commit-tree failed: {_said(r)}")
    return os.fsdecode(r.stdout).strip()


def _check_identity(repo: Path) -> None:
    """IdentityUnknown when git has no author or committer identity it may use here: asked of
    `git var`, which applies the same strict rules as `git commit` (user.name, user.email,
    user.useConfigOnly, GIT_AUTHOR_*/GIT_COMMITTER_*, EMAIL), whatever words this git uses."""
    for ident in ("GIT_AUTHOR_IDENT", "GIT_COMMITTER_IDENT"):
        r = _run(repo, ["var", ident])
        if r.returncode != 0:
            raise IdentityUnknown(f"git has no identity to commit with ({_said(r)}): set user.name and user.email "
                                  "(`git config user.name \"Your Name\"`, `git config user.email you@example.com`; "
                                  "`git commit` fails the same way here); nothing was committed")


def _refreshed_index(repo: Path, index: Path, tmp: Path, rels: list[str]) -> Path:
    """A copy of the real index where only our paths' entries are updated - by git itself, so the
    user's entries, the index version and extensions are written exactly as `git add` would. The
    copy keeps the index's mtime: git's racy-entry check compares entry times with it."""
    copy = tmp / "user-index"
    if index.exists():
        shutil.copy2(index, copy)
    env = {"GIT_INDEX_FILE": str(copy)}
    # A skip-worktree entry (`git update-index --skip-worktree EXPERIMENTS.md`, to hide a file that
    # churns) is one update-index does not look at on disk: `--remove` would drop it from the index,
    # staging its deletion for the user's next commit. Clear the bit for the update, then set it again.
    listed = _git_bytes(repo, "ls-files", "-t", "-z", "--", *rels, env=env | {"GIT_LITERAL_PATHSPECS": "1"})
    hidden = [os.fsdecode(e[2:]) for e in listed.split(b"\0") if e.startswith(b"S ")]
    if hidden:
        _git(repo, "update-index", "--no-skip-worktree", "--", *hidden, env=env)
    _git(repo, "update-index", "--add", "--remove", "--", *rels, env=env)
    if hidden:  # (an entry the update removed has no bit to set: not an error)
        _git(repo, "update-index", "--skip-worktree", "--", *hidden, env=env, check=False)
    return copy


def commit_paths(
    repo: Path,
    paths: Sequence,
    message: str,
    branch: Optional[str] = None,
    *,
    wait_s: Optional[float] = None,
    on_wait: Optional[Callable[[Path], None]] = None,
    cas_tries: int = CAS_TRIES,
    unless_committed: Optional[Path] = None,
) -> Optional[str]:
    """Commit exactly `paths` (files, or directories = the files under them; a deleted file is
    committed as a deletion) on the current branch. Returns the new commit sha, or None when
    none of them changed (no empty commits). Refuses on a detached HEAD or when `branch` is given
    (and not "*") and differs from the current branch.

    Waits up to `wait_s` (default `lock_wait_s()`) for another process's index.lock, calling
    `on_wait(lock_path)` once when it starts waiting. Raises GitBusy - with nothing moved - when
    the lock stays held, or when the branch moved under us `cas_tries` times in a row.

    Signed when `commit.gpgSign` says so, as `git commit` would be; SigningFailed (nothing moved)
    when git cannot sign, IdentityUnknown (nothing moved) when git has no user.name/user.email to
    commit with; RepositoryUnwritable when git's files cannot be written (a read-only `.git`, a full
    disk). The repository's commit hooks do not run (module docstring).

    `unless_committed`: one of `paths` (a run's report) that another process may commit meanwhile
    (a `moectl commit`, the user's git): when the branch holds it exactly as on disk - read under
    the lock, so no check before it can be stale - nothing is committed (None), rather than the rest
    of `paths` alone under a message that names it."""
    repo = repo_root(repo)
    check_branch(repo, branch)  # refuse before waiting for any lock
    rels = _relative(repo, paths)
    if not rels:
        return None
    sign = signing(repo)  # a bad commit.gpgSign refuses before any lock
    index = Path(_git(repo, "rev-parse", "--path-format=absolute", "--git-path", "index"))
    git_dir = Path(_git(repo, "rev-parse", "--absolute-git-dir"))
    with _writing(git_dir), IndexLock(index, lock_wait_s() if wait_s is None else wait_s, on_wait, git_dir) as lock, \
            tempfile.TemporaryDirectory(dir=git_dir, prefix=f"{TMP_PREFIX}{os.getpid()}-") as tmp_name:
        tmp = Path(tmp_name)
        # Under the lock HEAD cannot switch branches (checkout needs the lock): check again.
        ref = f"refs/heads/{check_branch(repo, branch)}"
        old = _git(repo, "rev-parse", "-q", "--verify", f"{ref}^{{commit}}", check=False) or None
        if _holds(repo, old, unless_committed):
            return None
        new = _build_commit(repo, tmp, old, rels, message, sign)
        if new is None:
            return None
        lock.stage(_refreshed_index(repo, index, tmp, rels))
        for _ in range(cas_tries):
            lock.before_ref_update(ref, old, new)
            r = _run(repo, ["update-ref", "-m", f"commit (moectl): {message.splitlines()[0]}", ref, new,
                            old or ZERO_OID])
            if r.returncode == 0:
                lock.commit()
                return new
            now = _git(repo, "rev-parse", "-q", "--verify", f"{ref}^{{commit}}", check=False) or None
            if now == old:  # not a race: the ref could not be written at all
                raise RefRejected(f"git update-ref failed: {_said(r)}; nothing was committed")
            # Someone committed to the branch without our lock (their own index, plumbing): build
            # again on top of theirs, so neither commit is lost.
            old = now
            new = None if _holds(repo, old, unless_committed) else _build_commit(repo, tmp, old, rels, message, sign)
            if new is None:  # their commit already holds exactly our files (or the one that mattered)
                return None
        raise GitBusy(f"{ref} kept moving while moectl committed ({cas_tries} tries); nothing was committed")


def _holds(repo: Path, commit: Optional[str], path: Optional[Path]) -> bool:
    """Whether `commit` holds `path` exactly as it is on disk (as git would store it)."""
    if commit is None or path is None:
        return False
    rel = _relative(repo, [path])[0]
    at = _git(repo, "rev-parse", "-q", "--verify", f"{commit}:{rel}", check=False)
    return bool(at) and at == _git(repo, "hash-object", f"--path={rel}", "--", rel)


def committed_in(repo: Path, path: Path, as_on_disk: bool = True) -> Optional[str]:
    """The last commit that changed `path`, when HEAD holds exactly the file on disk (as git would
    store it, clean filters included); None when the file is new or differs. `as_on_disk=False`:
    whenever HEAD holds `path` at all, whatever the file on disk now says."""
    repo = repo_root(repo)
    rel = _relative(repo, [path])[0]
    at_head = _git(repo, "rev-parse", "-q", "--verify", f"HEAD:{rel}", check=False)
    if not at_head or (as_on_disk and at_head != _git(repo, "hash-object", f"--path={rel}", "--", rel)):
        return None
    return _git(repo, "log", "-1", "--format=%H", "--", rel, env={"GIT_LITERAL_PATHSPECS": "1"})


def blob_id(repo: Path, path: Path, text: str) -> Optional[str]:
    """The blob id git would store for `path` holding `text` (its clean filters applied: `--path`),
    or None when git cannot say (not a repository, `path` outside it). What moectl wrote to a file,
    to tell it later from an edit of the user's (`summary.users_changes`)."""
    try:
        repo = repo_root(repo)
        rel = Path(path).resolve().relative_to(repo).as_posix()
    except (MoectlError, ValueError, OSError):
        return None
    r = subprocess.run(["git", "-C", str(repo), "hash-object", f"--path={rel}", "--stdin"],
                       input=text.encode("utf-8"), capture_output=True)
    if r.returncode != 0:
        return None
    return r.stdout.decode().strip() or None


def files_of_commit(repo: Path, commit: str) -> list[str]:
    """The repository-relative paths a commit changed (what `committed ...` lines name); `-z`, so
    a name is not C-quoted, and decoded losslessly (`_git`)."""
    out = _git_bytes(repo_root(repo), "show", "--name-only", "-z", "--format=", "--no-renames", commit, check=False)
    return [os.fsdecode(name) for name in out.strip(b"\n").split(b"\0") if name]


def paths_in_commit(repo: Path, commit: str, paths: Sequence) -> list[Path]:
    """Those of `paths` (files) that `commit` changed: what a `committed ...` line may name, read
    back from the commit rather than taken from the list that was meant to go in."""
    repo = repo_root(repo)
    held = set(files_of_commit(repo, commit))
    return [Path(p) for p in paths if _relative(repo, [p])[0] in held]


UNTRACKED_MAX_BYTES = 256 * 1024  # bigger untracked files (data, logs) are named, not copied

# What keeps a diff a patch `git apply` reads, whatever the user's diff config says: no colour, no
# external diff tool or textconv driver, binary files in full, the a/ b/ prefixes (diff.noprefix).
PATCH_OPTIONS = ("--no-color", "--no-ext-diff", "--no-textconv", "--binary", "--src-prefix=a/", "--dst-prefix=b/")


def git_diff(repo: Path) -> bytes:
    """Everything uncommitted at launch, as one patch that `git apply` replays on HEAD: tracked
    changes (staged and unstaged, against HEAD), then untracked files that .gitignore does not
    hide, as new files. Untracked files over UNTRACKED_MAX_BYTES are listed in a leading comment
    instead (the run's code is small; a dataset is not a diff), as are untracked files git could
    not read (`git apply` skips anything before the first `diff --git`).

    Bytes, exactly as git wrote them: file contents need not be UTF-8 (a latin-1 source file), nor
    names (git writes odd ones C-quoted in the patch, as `git apply` reads them). Nothing is
    stripped: a binary patch ends in a blank line `git apply` needs, and a last line of blanks is
    part of the file."""
    base = ["HEAD"] if _git(repo, "rev-parse", "-q", "--verify", "HEAD", check=False) else ["--cached"]
    parts = [_git_bytes(repo, "diff", *base, *PATCH_OPTIONS)]
    too_big, unreadable = [], []
    for rel in _git_bytes(repo, "ls-files", "--others", "--exclude-standard", "-z").split(b"\0"):
        path = Path(repo) / os.fsdecode(rel)
        if not rel or not (path.is_file() or path.is_symlink()):
            continue
        if path.lstat().st_size > UNTRACKED_MAX_BYTES:
            too_big.append(rel)
            continue
        if path.is_symlink() and path.is_dir():
            # git tracks a link as its target's text, but `diff --no-index` follows one to a directory
            # and fails (`Could not access 'data/null'`): a `data -> /big/dataset` or `.venv` link.
            parts.append(symlink_patch(rel, os.fsencode(os.readlink(path))))
            continue
        # --no-index exits 1 when the files differ (always, against /dev/null): not an error.
        r = _run(repo, ["diff", "--no-index", *PATCH_OPTIONS, "--", "/dev/null", rel])
        if r.returncode not in (0, 1):  # unreadable (permissions): named, like a big file
            unreadable.append(rel)
            continue
        parts.append(r.stdout)
    notes = b""
    if too_big:
        notes += b"# moectl: untracked files over %d KiB not included: %s\n" % (UNTRACKED_MAX_BYTES // 1024, _names(too_big))
    if unreadable:
        notes += b"# moectl: untracked files git could not read, not included: %s\n" % _names(unreadable)
    return notes + b"".join(parts)


def symlink_patch(rel: bytes, target: bytes) -> bytes:
    """The patch of an untracked symlink, as `git diff` writes one (mode 120000, the target as the
    file's one line), for `git apply` to make the link again. Names are written as git writes
    them: C-quoted where git quotes (core.quotePath's default), a tab after a `+++` name with a space."""
    lines = target.split(b"\n")
    body = b"".join(b"+" + line + b"\n" for line in lines)
    a, b = _quoted(b"a/" + rel), _quoted(b"b/" + rel)
    return (b"diff --git %s %s\nnew file mode 120000\n--- /dev/null\n+++ %s%s\n@@ -0,0 +1%s @@\n%s"
            b"\\ No newline at end of file\n") % (
        a, b, b, b"\t" if b" " in b else b"", b"" if len(lines) == 1 else b",%d" % len(lines), body)


_C_ESCAPES = {0x07: b"\\a", 0x08: b"\\b", 0x09: b"\\t", 0x0A: b"\\n", 0x0B: b"\\v", 0x0C: b"\\f", 0x0D: b"\\r",
              0x22: b'\\"', 0x5C: b"\\\\"}


def _quoted(name: bytes) -> bytes:
    """git's quote_c_style: a name with a control byte, `"`, `\\` or a byte >= 0x80 in double
    quotes with C escapes (octal for the rest); any other name as it is."""
    if not any(b < 0x20 or b in (0x22, 0x5C, 0x7F) or b >= 0x80 for b in name):
        return name
    out = b"".join(_C_ESCAPES.get(b) or (b"\\%03o" % b if b < 0x20 or b >= 0x7F else bytes([b])) for b in name)
    return b'"' + out + b'"'


def _names(rels: list[bytes]) -> bytes:
    """File names for a one-line comment: a newline in a name would end the comment early."""
    return b", ".join(r.replace(b"\\", b"\\\\").replace(b"\n", b"\\n") for r in rels)


@dataclass
class CommitInfo:
    hash: str
    subject: str
    date: str


def recent_commits(repo: Path, path_prefixes: Sequence[str], n: int = 10,
                   subject_prefix: Optional[str] = None) -> list[CommitInfo]:
    """The last `n` commits touching any of `path_prefixes` (report files), newest first; with
    `subject_prefix`, only those whose subject starts with it (moectl's `report: `, not a commit
    of the user's that touched a report)."""
    if not _git(repo, "rev-parse", "-q", "--verify", "HEAD", check=False):
        return []
    # Subjects are display text (a commit message need not be UTF-8): undecodable bytes become U+FFFD.
    grep = ["--fixed-strings", f"--grep={subject_prefix}"] if subject_prefix else []
    out = _git_bytes(repo, "log", f"-n{int(n) * (4 if subject_prefix else 1)}", *grep, "--format=%H%x1f%s%x1f%cI", "--",
                     *[str(p) for p in path_prefixes]).decode("utf-8", "replace")
    found = [CommitInfo(*line.split("\x1f", 2)) for line in out.splitlines() if line]
    if subject_prefix:  # (--grep matches any line of the message: the subject is the first)
        found = [c for c in found if c.subject.startswith(subject_prefix)]
    return found[:n]


def snapshot_code(repo: Path, commit: str, diff_path: Path, dest: Path) -> None:
    """The code a queued job will run, frozen now: `git archive <commit>` unpacked into `dest`, then
    the run's own git.diff (staged, unstaged and untracked changes) applied on top. The job starts
    from `dest` hours later, whatever the working tree, branch or HEAD have become by then.

    `git apply` runs with the repository discovery stopped at `dest`'s parent: `dest` is a plain
    directory (perhaps inside some other repository), and the patch is meant for it alone."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", commit], capture_output=True)
    if archive.returncode != 0:
        raise GitError(f"git archive {commit[:10]} failed: {archive.stderr.decode(errors='replace').strip()}")
    untar = subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, capture_output=True)
    if untar.returncode != 0:
        raise MoectlError(f"unpacking the code snapshot into {dest} failed: {untar.stderr.decode(errors='replace').strip()}")
    # Only moectl's `# moectl: ...` note lines (a big untracked file left out, a trainer script
    # outside git) and no patch: nothing to apply (`git apply` calls that "No valid patches").
    if any(line.startswith(b"diff --git ") for line in Path(diff_path).read_bytes().splitlines()):
        env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(dest.parent)}
        applied = subprocess.run(["git", "apply", "--whitespace=nowarn", str(diff_path)], cwd=dest,
                                 capture_output=True, env=env)
        if applied.returncode != 0:
            raise GitError(f"the uncommitted changes do not apply to {commit[:10]} for the code snapshot: "
                           f"{_said(applied)}")


def same_repository(root: Path):
    """A predicate on a record's `repo`: is it this repository? Yes when it is this work tree, or
    none is recorded (older records), or that path is no repository now (moved, renamed, another
    node's mount of it); also another work tree of the same repository (its git common dir).
    Only a path that is another repository today makes a run another project's. The one rule for
    a shared artifact root: EXPERIMENTS.md, `moectl commit`, `moectl sync` and a tag that several
    projects' runs carry (moectl.store.resolve_run) all keep to it."""
    here = str(root.resolve())
    common: dict[str, Optional[str]] = {}

    def common_dir(path: str) -> Optional[str]:
        if path not in common:
            try:
                common[path] = str(Path(_git(Path(path), "rev-parse", "--path-format=absolute",
                                             "--git-common-dir")).resolve())
            except (GitError, OSError):
                common[path] = None
        return common[path]

    def ours(repo: Optional[str]) -> bool:
        if repo is None or repo == here or not Path(repo).is_dir():
            return True
        theirs = common_dir(repo)
        return theirs is None or theirs == common_dir(here)

    return ours
