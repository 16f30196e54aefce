"""The one place that commits: exactly the paths moectl wrote, nothing else.

    sha = commit_paths(repo, [report_md], "report: static cap1.0 — 806400 tok/s", branch="main")

The user's modified, staged and untracked files must stay exactly as they were, index included.
A plain add-then-commit (or GitPython's `index.commit()`) commits the whole index and so sweeps in
whatever the user had staged. Instead the commit is built with plumbing on a temporary index:

    GIT_INDEX_FILE=tmp  git read-tree HEAD ; git update-index --add --remove -- <ours>
                        git write-tree     ; git commit-tree <tree> -p HEAD -m <msg>
    git update-ref HEAD <new> <old>        # compare-and-swap: fails if HEAD moved meanwhile
    git update-index --add --remove -- <ours>   # real index: only our entries now match HEAD

so the real index changes only in the entries for our own paths.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from moectl.errors import GuardRefused, MoectlError

EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"


class GitError(MoectlError):
    def __init__(self, message: str):
        super().__init__(message, exit_code=1)


def _git(repo: Path, *args: str, env: Optional[dict] = None, check: bool = True) -> str:
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        # One line (SPEC §8): git's last word is its conclusion ("fatal: ..."); the lines before
        # it repeat the same failure in detail.
        said = (r.stderr.strip() or r.stdout.strip()).splitlines()
        raise GitError(f"git {args[0]} failed: {said[-1] if said else f'exit {r.returncode}'}")
    return r.stdout.strip() if r.returncode == 0 else ""


def repo_root(path: Path) -> Path:
    out = _git(Path(path), "rev-parse", "--show-toplevel")
    return Path(out).resolve()


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


def commit_paths(repo: Path, paths: Sequence, message: str, branch: Optional[str] = None) -> Optional[str]:
    """Commit exactly `paths` (files, or directories = the files under them; a deleted file is
    committed as a deletion) on the current branch. Returns the new commit sha, or None when
    none of them changed (no empty commits). Refuses on a detached HEAD or when `branch` is given
    (and not "*") and differs from the current branch."""
    repo = repo_root(repo)
    cur = current_branch(repo)
    if cur is None:
        raise GuardRefused("refusing to commit: HEAD is detached; check out the project branch")
    if branch not in (None, "*") and cur != branch:
        raise GuardRefused(f"refusing to commit: on branch {cur!r}, expected {branch!r}")
    rels = _relative(repo, paths)
    if not rels:
        return None
    old = _git(repo, "rev-parse", "-q", "--verify", "HEAD^{commit}", check=False) or None
    git_dir = Path(_git(repo, "rev-parse", "--absolute-git-dir"))
    with tempfile.TemporaryDirectory(dir=git_dir, prefix="moectl-index-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        if old:
            _git(repo, "read-tree", old, env=env)
        else:
            _git(repo, "read-tree", "--empty", env=env)
        _git(repo, "update-index", "--add", "--remove", "--", *rels, env=env)
        tree = _git(repo, "write-tree", env=env)
    old_tree = _git(repo, "rev-parse", f"{old}^{{tree}}") if old else EMPTY_TREE
    if tree == old_tree:
        return None
    parent = ["-p", old] if old else []
    new = _git(repo, "commit-tree", tree, *parent, "-m", message)
    # Compare-and-swap: if someone committed meanwhile, fail rather than drop their commit.
    _git(repo, "update-ref", "-m", f"commit (moectl): {message.splitlines()[0]}", "HEAD", new, old or "0" * 40)
    # The real index: refresh only our own entries so `git status` shows them clean.
    _git(repo, "update-index", "--add", "--remove", "--", *rels)
    return new


UNTRACKED_MAX_BYTES = 256 * 1024  # bigger untracked files (data, logs) are named, not copied


def git_diff(repo: Path) -> str:
    """Everything uncommitted at launch, as one patch that `git apply` replays on HEAD: tracked
    changes (staged and unstaged, against HEAD), then untracked files that .gitignore does not
    hide, as new files. Untracked files over UNTRACKED_MAX_BYTES are listed in a leading comment
    instead (the run's code is small; a dataset is not a diff)."""
    base = ["HEAD"] if _git(repo, "rev-parse", "-q", "--verify", "HEAD", check=False) else ["--cached"]
    parts = [_git(repo, "diff", *base, "--no-color", "--no-ext-diff", "--binary")]
    skipped = []
    for rel in _git(repo, "ls-files", "--others", "--exclude-standard", "-z").split("\0"):
        path = Path(repo) / rel
        if not rel or not (path.is_file() or path.is_symlink()):
            continue
        if path.lstat().st_size > UNTRACKED_MAX_BYTES:
            skipped.append(rel)
            continue
        # --no-index exits 1 when the files differ (always, against /dev/null): not an error.
        r = subprocess.run(["git", "-C", str(repo), "diff", "--no-index", "--no-color", "--no-ext-diff", "--binary",
                            "--", "/dev/null", rel], capture_output=True, text=True)
        parts.append(r.stdout.strip())
    text = "\n".join(p for p in parts if p)
    if skipped:
        head = f"# moectl: untracked files over {UNTRACKED_MAX_BYTES // 1024} KiB not included: " + ", ".join(skipped)
        text = head + ("\n" + text if text else "")
    return text + "\n" if text else ""


@dataclass
class CommitInfo:
    hash: str
    subject: str
    date: str


def recent_commits(repo: Path, path_prefixes: Sequence[str], n: int = 10) -> list[CommitInfo]:
    """The last `n` commits touching any of `path_prefixes` (report files), newest first."""
    if not _git(repo, "rev-parse", "-q", "--verify", "HEAD", check=False):
        return []
    out = _git(repo, "log", f"-n{int(n)}", "--format=%H%x1f%s%x1f%cI", "--", *[str(p) for p in path_prefixes])
    return [CommitInfo(*line.split("\x1f", 2)) for line in out.splitlines() if line]
