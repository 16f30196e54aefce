"""Why moectl commits with git plumbing and not GitPython: the measurement behind that choice.

    .venv/bin/python scripts/measure_gitpython_commit.py            # needs `pip install gitpython`
    .venv/bin/python scripts/measure_gitpython_commit.py --files 5000 --commits 15

Builds a throw-away repository shaped like a user's (`--files` tracked files in 50 directories; a
staged edit, a staged-then-modified file, an unstaged edit, a staged new file, a staged deletion,
an untracked file; the untracked cache on, as `feature.manyFiles` turns it on) and commits one new
report into it `--commits` times, interleaved, three ways:

  plumbing              moectl.gitops.commit_paths (git read-tree/update-index/commit-tree on
                        temporary indexes, update-ref with the old value, index.lock renamed)
  gitpython             the same steps with GitPython: BlockingLockFile on the index, a temporary
                        IndexFile (IndexFile.new: from_tree cannot run under the lock, see below),
                        Commit.create_from_tree, repo.git.update_ref
                        with the old value; the real index read and rewritten with IndexFile
                        (IndexFile.write keeps the extensions it read)
  gitpython-noext       the same, writing the real index with ignore_extension_data=True (what
                        IndexFile.add(write=True) does)

and reports for each: the median time per commit, whether every index entry but ours is byte-
identical, which index extensions survive, whether `git write-tree` of the user's index (what
their next `git commit` records) equals the tree of its entries, and whether `git status` is clean
for our file. Then properties of GitPython's pieces: can IndexFile.from_tree run while index.lock
is held, is the user's index present while it runs, can IndexFile read an index v4
(feature.manyFiles), and which blob lands for a file with a clean filter (git-lfs and
core.autocrlf work through clean filters).
"""
from __future__ import annotations

import argparse
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moectl.gitops import commit_paths  # noqa: E402


def git(repo: Path, *args: str, env: dict | None = None) -> str:
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                       env={**os.environ, **(env or {})})
    return r.stdout


def make_repo(root: Path, files: int) -> Path:
    repo = root / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    for k, v in {"user.name": "M", "user.email": "m@example.com", "commit.gpgsign": "false",
                 "core.untrackedCache": "true"}.items():
        git(repo, "config", k, v)
    for i in range(files):
        d = repo / f"src{i % 50:02d}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:05d}.py").write_text(f"x = {i}\n")
    (repo / "reports").mkdir()
    (repo / "reports" / "old.md").write_text("# old\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "init")
    (repo / "src00" / "f00000.py").write_text("x = 'staged'\n")
    git(repo, "add", "src00/f00000.py")
    (repo / "src01" / "f00001.py").write_text("x = 'staged'\n")
    git(repo, "add", "src01/f00001.py")
    (repo / "src01" / "f00001.py").write_text("x = 'staged, then modified'\n")
    (repo / "src02" / "f00002.py").write_text("x = 'unstaged'\n")
    (repo / "new.py").write_text("new = True\n")
    git(repo, "add", "new.py")
    git(repo, "rm", "-q", "--cached", "src03/f00003.py")
    (repo / "scratch.txt").write_text("untracked\n")
    git(repo, "status", "--porcelain")  # writes the untracked cache, refreshes stat data
    return repo


def index_entries(repo: Path) -> tuple[int, dict, list[str]]:
    """(version, {(path, stage): raw entry bytes}, extension signatures) of .git/index, v2/v3."""
    data = (repo / ".git" / "index").read_bytes()
    _sig, version, count = struct.unpack(">4sLL", data[:12])
    entries, off = {}, 12
    for _ in range(count):
        flags = struct.unpack(">H", data[off + 60:off + 62])[0]
        name_at = off + 62 + (2 if version == 3 and flags & 0x4000 else 0)
        end = data.index(b"\0", name_at)
        size = (end - off + 8) & ~7
        entries[(data[name_at:end].decode(), (flags >> 12) & 3)] = data[off:off + size]
        off += size
    exts = []
    while off < len(data) - 20:
        sig, n = struct.unpack(">4sL", data[off:off + 8])
        exts.append(sig.decode("latin-1"))
        off += 8 + n
    return version, entries, exts


def entries_tree(repo: Path) -> str:
    """The tree of the user's index entries alone (no cache-tree): what a correct commit records."""
    listing = git(repo, "ls-files", "-s")
    with tempfile.TemporaryDirectory(dir=repo / ".git") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "i")}
        subprocess.run(["git", "-C", str(repo), "update-index", "--index-info"], input=listing, text=True,
                       check=True, env={**os.environ, **env})
        return git(repo, "write-tree", env=env).strip()


def gitpython_commit(repo_dir: Path, rels: list[str], message: str, keep_extensions: bool) -> str:
    """commit_paths' protocol written with GitPython's own pieces (new files only)."""
    import git as gp
    from git.index import IndexFile
    from git.objects.commit import Commit
    from git.util import BlockingLockFile

    repo = gp.Repo(repo_dir)
    index_path = os.path.join(repo.git_dir, "index")
    lock = BlockingLockFile(index_path, check_interval_s=0.05, max_block_time_s=10)
    lock._obtain_lock()
    try:
        ref = repo.head.ref
        old = ref.commit
        # IndexFile.new, not from_tree: from_tree runs `git read-tree --index-output`, which takes
        # the real index's lock - the one we hold - and moves the user's index aside meanwhile.
        tmp = IndexFile.new(repo, old.tree)
        tmp.add(rels, write=False)
        new = Commit.create_from_tree(repo, tmp.write_tree(), message, parent_commits=[old], head=False)
        real = IndexFile(repo, index_path)
        real.add(rels, write=False)
        staged = os.path.join(repo.git_dir, "gitpython-index")
        real.write(file_path=staged, ignore_extension_data=not keep_extensions)
        os.replace(staged, index_path + ".lock")
        repo.git.update_ref("-m", message, ref.path, new.hexsha, old.hexsha)
        os.replace(index_path + ".lock", index_path)
        lock._owns_lock = False  # renamed away: releasing would delete a lock someone else took since
        return new.hexsha
    finally:
        lock._release_lock()


WAYS = {
    "plumbing": lambda repo, rels, msg: commit_paths(repo, [repo / r for r in rels], msg, branch="main"),
    "gitpython": lambda repo, rels, msg: gitpython_commit(repo, rels, msg, keep_extensions=True),
    "gitpython-noext": lambda repo, rels, msg: gitpython_commit(repo, rels, msg, keep_extensions=False),
}


def measure(files: int, commits: int) -> None:
    import importlib.util

    if importlib.util.find_spec("git") is None:
        sys.exit("this measurement needs GitPython, which moectl itself does not use: pip install gitpython")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import git"], check=True)
    t_import_git = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    t_import_git -= time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        repos = {}
        for way in WAYS:
            (Path(tmp) / way).mkdir()
            repos[way] = make_repo(Path(tmp) / way, files)
        checks: dict[str, dict] = {}
        times: dict[str, list[float]] = {way: [] for way in WAYS}
        for i in range(commits):
            for way, fn in WAYS.items():  # interleaved: load drifts hit every way alike
                repo = repos[way]
                rel = f"reports/r{i:03d}.md"
                (repo / rel).write_text(f"# report {i}\n")
                before = index_entries(repo) if i == 0 else None
                t0 = time.perf_counter()
                fn(repo, [rel], f"report: {i}")
                times[way].append(time.perf_counter() - t0)
                if before is not None:
                    after = index_entries(repo)
                    ours = (rel, 0)
                    checks[way] = {
                        "others byte-identical": {k: v for k, v in after[1].items() if k != ours} == before[1],
                        "extensions": f"{','.join(before[2]) or '-'} -> {','.join(after[2]) or '-'}",
                        "next commit tree right": git(repo, "write-tree").strip() == entries_tree(repo),
                        "status clean for ours": git(repo, "status", "--porcelain", "--", rel) == "",
                    }
    print(f"{files} tracked files, {commits} commits each, median time per commit "
          f"(python -c 'import git' adds {t_import_git * 1000:.0f} ms once per process):")
    for way in WAYS:
        c = checks[way]
        print(f"  {way:16s} {statistics.median(times[way]) * 1000:7.1f} ms | user entries byte-identical: "
              f"{c['others byte-identical']} | extensions {c['extensions']} | next commit's tree right: "
              f"{c['next commit tree right']} | status clean for ours: {c['status clean for ours']}")
    properties()


def properties() -> None:
    import git as gp
    from git.index import IndexFile

    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp), 20)
        r = gp.Repo(repo)
        index = repo / ".git" / "index"
        seen = {}
        execute = gp.cmd.Git.execute

        def spy(self, command, *args, **kw):
            if "read-tree" in command:
                seen["user index present during from_tree"] = index.exists()
            return execute(self, command, *args, **kw)

        gp.cmd.Git.execute = spy
        IndexFile.from_tree(r, r.head.commit)
        gp.cmd.Git.execute = execute
        print(f"  IndexFile.from_tree: the user's .git/index exists while it runs: {seen['user index present during from_tree']}")
        (repo / ".git" / "index.lock").touch()
        try:
            IndexFile.from_tree(r, r.head.commit)
            print("  IndexFile.from_tree while index.lock is held: works")
        except gp.GitCommandError as exc:
            print(f"  IndexFile.from_tree while index.lock is held: fails ({exc.stderr.strip().splitlines()[0][:90]})")
        (repo / ".git" / "index.lock").unlink()

        git(repo, "update-index", "--index-version", "4")
        try:
            IndexFile(r, str(index)).entries  # noqa: B018
            print("  IndexFile reads an index v4: yes")
        except Exception as exc:  # the point of the check
            print(f"  IndexFile reads an index v4: no ({type(exc).__name__}: {str(exc)[:70]})")
        git(repo, "update-index", "--index-version", "2")

        (repo / ".gitattributes").write_text("*.md filter=upper\n")
        git(repo, "config", "filter.upper.clean", "tr a-z A-Z")
        (repo / "reports" / "f.md").write_text("lower\n")
        want = git(repo, "hash-object", "--path=reports/f.md", "reports/f.md").strip()
        tmp_index = IndexFile.new(gp.Repo(repo), gp.Repo(repo).head.commit.tree)
        tmp_index.add(["reports/f.md"], write=False)
        got = tmp_index.entries[("reports/f.md", 0)].hexsha
        print(f"  clean filter (*.md -> upper case): git stores {want[:10]}, IndexFile.add stores {got[:10]}"
              f" ({'same' if got == want else 'the unfiltered bytes'})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--commits", type=int, default=11)
    a = p.parse_args()
    measure(a.files, a.commits)
