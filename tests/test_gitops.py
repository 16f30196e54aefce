"""commit_paths commits exactly our files; the user's modified/staged/untracked state is untouched."""
from __future__ import annotations

import os
import subprocess

import pytest

from moectl.errors import GuardRefused
from moectl.gitops import (
    PATCH_OPTIONS, SigningFailed, commit_paths, committed_in, files_of_commit, git_diff, recent_commits, symlink_patch,
)
from tests.conftest import git


def user_mess(repo):
    """Every kind of user state: modified, staged, staged-then-modified, untracked, a staged
    file inside report_dir, a staged deletion."""
    (repo / "reports").mkdir()
    (repo / "tracked.txt").write_text("v1\n")
    (repo / "gone.txt").write_text("bye\n")
    git(repo, "add", "tracked.txt", "gone.txt")
    git(repo, "commit", "-q", "-m", "more files")
    (repo / "README.md").write_text("user edit, unstaged\n")
    (repo / "tracked.txt").write_text("v2 staged\n")
    git(repo, "add", "tracked.txt")
    (repo / "tracked.txt").write_text("v3 staged then modified\n")
    (repo / "staged_new.py").write_text("print('new')\n")
    git(repo, "add", "staged_new.py")
    (repo / "reports" / "user_note.md").write_text("the user's own report\n")
    git(repo, "add", "reports/user_note.md")
    git(repo, "rm", "-q", "gone.txt")
    (repo / "scratch.txt").write_text("untracked\n")


def snapshot(repo):
    return (git(repo, "status", "--porcelain=v1", "-z", "--untracked-files=all"),
            git(repo, "diff", "--cached", "--binary"), git(repo, "diff", "--binary"))


def test_commits_only_our_files_and_leaves_user_state_byte_identical(git_repo):
    user_mess(git_repo)
    before = snapshot(git_repo)
    head0 = git(git_repo, "rev-parse", "HEAD").strip()
    ours = [git_repo / "reports" / "20250101_1200_run.md", git_repo / "EXPERIMENTS.md"]
    ours[0].write_text("# report\n")
    ours[1].write_text("# experiments\n")

    sha = commit_paths(git_repo, ours, "report: tiny cap1.0 — 1234 tok/s", branch="main")

    assert git(git_repo, "rev-parse", "HEAD").strip() == sha
    assert git(git_repo, "rev-parse", "HEAD^").strip() == head0
    changed = git(git_repo, "show", "--name-status", "--format=", sha).split("\n")
    assert sorted(x for x in changed if x) == ["A\tEXPERIMENTS.md", "A\treports/20250101_1200_run.md"]
    assert git(git_repo, "log", "-1", "--format=%s").strip() == "report: tiny cap1.0 — 1234 tok/s"
    # The user's files: status, staged diff and unstaged diff exactly as before; ours are clean.
    assert snapshot(git_repo) == before
    assert git(git_repo, "status", "--porcelain", "--", "reports/20250101_1200_run.md", "EXPERIMENTS.md") == ""


def test_second_commit_of_unchanged_files_is_none_and_changes_nothing(git_repo):
    report = git_repo / "r.md"
    report.write_text("x\n")
    assert commit_paths(git_repo, [report], "first")
    head = git(git_repo, "rev-parse", "HEAD")
    assert commit_paths(git_repo, [report], "again") is None
    assert git(git_repo, "rev-parse", "HEAD") == head


def test_modified_and_deleted_own_files(git_repo):
    report = git_repo / "reports" / "a.md"
    report.parent.mkdir()
    report.write_text("1\n")
    commit_paths(git_repo, [report.parent], "add dir")  # a directory = the files under it
    report.write_text("2\n")
    sha = commit_paths(git_repo, [report], "update")
    assert git(git_repo, "show", f"{sha}:reports/a.md") == "2\n"
    report.unlink()
    sha = commit_paths(git_repo, [report], "remove")
    assert git(git_repo, "show", "--name-status", "--format=", sha).strip() == "D\treports/a.md"
    assert git(git_repo, "status", "--porcelain") == ""


def test_refuses_detached_head(git_repo):
    git(git_repo, "checkout", "-q", "--detach")
    (git_repo / "r.md").write_text("x\n")
    with pytest.raises(GuardRefused, match="detached"):
        commit_paths(git_repo, [git_repo / "r.md"], "msg")


def test_a_directory_outside_any_repository_is_said_so_not_detached(tmp_path):
    from moectl.gitops import check_branch

    with pytest.raises(GuardRefused, match=f"refusing to commit: {tmp_path} is not inside a git repository"):
        check_branch(tmp_path, "main")


def test_refuses_wrong_branch(git_repo):
    git(git_repo, "switch", "-q", "-c", "feature")
    (git_repo / "r.md").write_text("x\n")
    head = git(git_repo, "rev-parse", "HEAD")
    with pytest.raises(GuardRefused, match="expected 'main'"):
        commit_paths(git_repo, [git_repo / "r.md"], "msg", branch="main")
    assert git(git_repo, "rev-parse", "HEAD") == head
    assert commit_paths(git_repo, [git_repo / "r.md"], "msg", branch="*")


def test_a_branch_update_git_refuses_is_a_refusal_with_nothing_moved(git_repo):
    # A reference-transaction hook saying no: the repository refused (exit 3), not a moectl bug (1).
    (git_repo / "r.md").write_text("x\n")
    hook = git_repo / ".git" / "hooks" / "reference-transaction"
    hook.write_text('#!/bin/sh\n[ "$1" = prepared ] && exit 1\nexit 0\n')
    hook.chmod(0o755)
    head, status = git(git_repo, "rev-parse", "HEAD"), git(git_repo, "status", "--porcelain")
    with pytest.raises(GuardRefused, match="update-ref failed.*nothing was committed") as refused:
        commit_paths(git_repo, [git_repo / "r.md"], "msg")
    assert refused.value.exit_code == 3
    assert git(git_repo, "rev-parse", "HEAD") == head and git(git_repo, "status", "--porcelain") == status


def test_refuses_paths_outside_the_repo(git_repo, tmp_path):
    outside = tmp_path / "outside.md"
    outside.write_text("x\n")
    (git_repo / "link").symlink_to(tmp_path)
    for p in (outside, git_repo / ".." / "outside.md", git_repo / "link" / "outside.md", git_repo / ".git" / "config"):
        with pytest.raises(GuardRefused, match="outside the repository"):
            commit_paths(git_repo, [p], "msg")


def test_first_commit_in_an_empty_repository(tmp_path):
    repo = tmp_path / "empty"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "T")
    git(repo, "config", "user.email", "t@example.com")
    (repo / "user.txt").write_text("staged by the user\n")
    git(repo, "add", "user.txt")
    (repo / "r.md").write_text("x\n")
    sha = commit_paths(repo, [repo / "r.md"], "first report")
    assert git(repo, "ls-tree", "--name-only", sha).split() == ["r.md"]
    assert git(repo, "status", "--porcelain") == "A  user.txt\n"


def index_debug(repo, env=None):
    """`git ls-files -s --debug`: every index entry with its stat data, for any index version."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-s", "--debug"], capture_output=True, text=True,
                         check=True, env={**os.environ, **(env or {})}).stdout
    entries, path = {}, None
    for line in out.splitlines():
        if not line.startswith(" "):
            path = line.split("\t", 1)[1]
            entries[path] = []
        entries[path].append(line)
    return entries


def test_index_v4_and_its_extensions_are_kept(git_repo):
    """feature.manyFiles users: index v4 with the untracked cache. Our commit changes our entry
    only and leaves the version and the extensions as git writes them."""
    git(git_repo, "config", "core.untrackedCache", "true")
    user_mess(git_repo)
    git(git_repo, "update-index", "--index-version", "4")
    git(git_repo, "status", "--porcelain")  # writes the untracked cache into the index
    before, entries = snapshot(git_repo), index_debug(git_repo)
    raw = (git_repo / ".git" / "index").read_bytes()
    assert raw[4:8] == b"\0\0\0\x04" and b"UNTR" in raw
    (git_repo / "reports" / "r.md").write_text("# r\n")

    commit_paths(git_repo, [git_repo / "reports" / "r.md"], "report")

    raw = (git_repo / ".git" / "index").read_bytes()
    assert raw[4:8] == b"\0\0\0\x04" and b"UNTR" in raw
    assert {k: v for k, v in index_debug(git_repo).items() if k != "reports/r.md"} == entries
    assert snapshot(git_repo) == before


def test_a_skip_worktree_entry_of_ours_is_updated_not_dropped(git_repo):
    """`git update-index --skip-worktree EXPERIMENTS.md` hides a file that churns. Our commit must
    leave its index entry at the new blob, bit kept: not deleted, which would stage the file's
    deletion for the user's next `git commit`."""
    summary = git_repo / "EXPERIMENTS.md"
    summary.write_text("# v1\n")
    commit_paths(git_repo, [summary], "summary v1")
    git(git_repo, "update-index", "--skip-worktree", "EXPERIMENTS.md")
    summary.write_text("# v2\n")

    sha = commit_paths(git_repo, [summary], "summary v2")

    assert git(git_repo, "show", f"{sha}:EXPERIMENTS.md") == "# v2\n"
    assert git(git_repo, "ls-files", "-t", "--", "EXPERIMENTS.md") == "S EXPERIMENTS.md\n"
    assert git(git_repo, "rev-parse", ":EXPERIMENTS.md") == git(git_repo, "rev-parse", f"{sha}:EXPERIMENTS.md")
    assert git(git_repo, "diff", "--cached", "--name-status") == ""  # nothing staged for the user's next commit
    assert git(git_repo, "status", "--porcelain", "--untracked-files=all") == ""


def test_a_racily_clean_user_edit_stays_visible(git_repo):
    """git tells a same-size edit made in the index's own instant ("racily clean") from an
    unchanged file by comparing the entry's mtime with the index file's. Our index update must
    keep that comparison, or the user's edit vanishes from `git status` for good."""
    git(git_repo, "config", "core.trustctime", "false")  # so mtime + size alone decide, as racy git assumes
    readme, index = git_repo / "README.md", git_repo / ".git" / "index"
    st = readme.stat()
    readme.write_text("HELLO\n")  # same size as the committed "hello\n"
    os.utime(readme, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(index, ns=(st.st_mtime_ns, st.st_mtime_ns))  # the index was written in that instant
    assert git(git_repo, "diff-files", "--name-only") == "README.md\n"  # git sees the edit

    (git_repo / "r.md").write_text("x\n")
    commit_paths(git_repo, [git_repo / "r.md"], "report")

    assert git(git_repo, "diff-files", "--name-only") == "README.md\n"
    assert git(git_repo, "diff", "--stat") != ""


def test_commit_in_a_linked_worktree_uses_its_own_index_and_branch(git_repo, tmp_path):
    wt = tmp_path / "wt"
    git(git_repo, "worktree", "add", "-q", "-b", "side", str(wt))
    main_index = (git_repo / ".git" / "index").read_bytes()
    (wt / "r.md").write_text("x\n")
    sha = commit_paths(wt, [wt / "r.md"], "report on side", branch="side")
    assert git(git_repo, "rev-parse", "side").strip() == sha
    assert git(wt, "status", "--porcelain") == ""
    assert (git_repo / ".git" / "index").read_bytes() == main_index
    assert git(git_repo, "log", "-1", "--format=%s", "main").strip() == "initial"


def test_committed_in_names_the_commit_holding_the_file_as_it_is(git_repo):
    report = git_repo / "r.md"
    report.write_text("x\n")
    assert committed_in(git_repo, report) is None  # untracked
    sha = commit_paths(git_repo, [report], "first")
    (git_repo / "other.md").write_text("o\n")
    commit_paths(git_repo, [git_repo / "other.md"], "later, elsewhere")
    assert committed_in(git_repo, report) == sha
    report.write_text("changed\n")
    assert committed_in(git_repo, report) is None


def test_git_diff_includes_staged_and_unstaged(git_repo):
    assert git_diff(git_repo) == b""
    user_mess(git_repo)
    d = git_diff(git_repo)
    assert b"user edit, unstaged" in d and b"v3 staged then modified" in d and b"print('new')" in d
    assert b"new file mode" in d and b"+untracked" in d  # scratch.txt, untracked, as a new file


def test_git_diff_replays_the_working_tree_on_head(git_repo, tmp_path):
    """git.diff is the run's code: applied to a clean checkout of HEAD it gives back the working
    tree (tracked edits, staged ones, untracked files); big untracked files are only named."""
    user_mess(git_repo)
    (git_repo / "big.bin").write_bytes(b"x" * (256 * 1024 + 1))
    d = git_diff(git_repo)
    assert d.startswith(b"# moectl: untracked files over 256 KiB not included: big.bin\n")
    clean = tmp_path / "clean"
    git(git_repo, "worktree", "add", "-q", "--detach", str(clean), "HEAD")
    patch = tmp_path / "git.diff"
    patch.write_bytes(d)
    git(clean, "apply", "--index", str(patch))
    for rel in ("README.md", "tracked.txt", "staged_new.py", "reports/user_note.md", "scratch.txt"):
        assert (clean / rel).read_bytes() == (git_repo / rel).read_bytes(), rel
    assert not (clean / "gone.txt").exists() and not (clean / "big.bin").exists()


def test_git_diff_holds_an_untracked_symlink_to_a_directory_and_replays_it(git_repo, tmp_path):
    # `git diff --no-index /dev/null data` follows a link to a directory and fails ("Could not access
    # 'data/null'"): git.diff came out empty while the record said dirty (a `.venv` or dataset link).
    (tmp_path / "dataset").mkdir()
    (git_repo / "data").symlink_to(tmp_path / "dataset")
    (git_repo / "sub dir").mkdir()
    (git_repo / "sub dir" / "caf\u00e9 link").symlink_to("..")
    (git_repo / "new.txt").write_text("new\n")
    d = git_diff(git_repo)
    assert b"diff --git a/data b/data\nnew file mode 120000\n" in d and b"+%s\n" % os.fsencode(tmp_path / "dataset") in d
    clean = replayed(git_repo, tmp_path, d)
    assert os.readlink(clean / "data") == str(tmp_path / "dataset")
    assert os.readlink(clean / "sub dir" / "caf\u00e9 link") == ".."
    assert (clean / "new.txt").read_text() == "new\n"


@pytest.mark.parametrize("name", ["plain", "with space", "caf\u00e9", 'q"uote', "back\\slash", "tab\there"])
def test_a_symlink_patch_is_the_patch_git_writes(git_repo, name):
    # For a link git can diff itself (to a file), moectl's patch is git's, less the index line.
    (git_repo / name).symlink_to("README.md")
    r = subprocess.run(["git", "-C", str(git_repo), "diff", "--no-index", *PATCH_OPTIONS, "--", "/dev/null", name],
                       capture_output=True)
    assert r.returncode == 1, r.stderr
    theirs = b"".join(line for line in r.stdout.splitlines(keepends=True) if not line.startswith(b"index "))
    assert symlink_patch(os.fsencode(name), b"README.md") == theirs


def test_recent_commits_filters_by_path(git_repo):
    (git_repo / "reports").mkdir()
    for i in range(3):
        (git_repo / "reports" / f"{i}.md").write_text(f"{i}\n")
        commit_paths(git_repo, [git_repo / "reports" / f"{i}.md"], f"report {i}")
    (git_repo / "code.py").write_text("x\n")
    commit_paths(git_repo, [git_repo / "code.py"], "code")
    got = recent_commits(git_repo, ["reports", "EXPERIMENTS.md"], n=2)
    assert [c.subject for c in got] == ["report 2", "report 1"]
    assert all(len(c.hash) == 40 for c in got)


# ------------------------------------------------------------------ bytes: content and file names

BAD_NAME = b"bad\xffname.txt"  # not UTF-8: a name git stores as these bytes


def gitb(repo, *args) -> bytes:
    """Run git in `repo`; its stdout as bytes (what it says about non-UTF-8 names and content)."""
    return subprocess.run([b"git", b"-C", os.fsencode(repo), *(os.fsencode(a) for a in args)],
                          capture_output=True, check=True, timeout=60).stdout


def replayed(repo, tmp_path, patch: bytes, commit: str = "HEAD"):
    """A fresh checkout of `commit` (a linked worktree) with `patch` applied by plain `git apply`,
    the way README says git.diff replays."""
    clean = tmp_path / "clean"
    git(repo, "worktree", "add", "-q", "--detach", str(clean), commit)
    (tmp_path / "git.diff").write_bytes(patch)
    git(clean, "apply", str(tmp_path / "git.diff"))
    return clean


def latin1_mess(repo):
    """A tracked file modified with latin-1 bytes, an untracked latin-1 file, and an untracked file
    whose name is not UTF-8."""
    (repo / "notes.txt").write_bytes(b"plain\n")
    git(repo, "add", "notes.txt")
    git(repo, "commit", "-q", "-m", "notes")
    (repo / "notes.txt").write_bytes(b"plain\ncaf\xe9 cr\xe8me\n")
    (repo / "latin1.txt").write_bytes(b"caf\xe9\n")
    (repo / os.fsdecode(BAD_NAME)).write_bytes(b"odd name, caf\xe9\n")


def test_git_diff_keeps_latin1_content_and_non_utf8_names_as_bytes(git_repo, tmp_path):
    latin1_mess(git_repo)
    d = git_diff(git_repo)
    assert isinstance(d, bytes)
    assert b"+caf\xe9 cr\xe8me\n" in d and b"+caf\xe9\n" in d and b"+odd name, caf\xe9\n" in d
    # Tracked changes first, exactly as git wrote them.
    assert d.startswith(gitb(git_repo, "diff", "HEAD", "--no-color", "--binary"))
    clean = replayed(git_repo, tmp_path, d)
    for rel in (b"notes.txt", b"latin1.txt", BAD_NAME):
        assert (clean / os.fsdecode(rel)).read_bytes() == (git_repo / os.fsdecode(rel)).read_bytes(), rel


def test_git_diff_replays_byte_for_byte_binary_and_trailing_whitespace(git_repo, tmp_path):
    """git.diff applied by plain `git apply` on the recorded commit gives back every file exactly:
    a modified binary file (its patch ends in a blank line), a text file whose last line is only
    whitespace, untracked text files after them."""
    (git_repo / "zdata.bin").write_bytes(bytes(range(256)) * 4)
    (git_repo / "ws.txt").write_bytes(b"x\n")
    git(git_repo, "add", "zdata.bin", "ws.txt")
    git(git_repo, "commit", "-q", "-m", "data")
    recorded = git(git_repo, "rev-parse", "HEAD").strip()
    (git_repo / "zdata.bin").write_bytes(bytes(range(255, -1, -1)) * 4 + b"\0tail")
    (git_repo / "ws.txt").write_bytes(b"x\ny\n  \t\n")
    (git_repo / "untracked.txt").write_bytes(b"new file\n")
    (git_repo / "zz_ws.txt").write_bytes(b"last line is blanks\n   \n")

    d = git_diff(git_repo)
    assert d.endswith(b"+   \n")  # the untracked file's last line, kept as it is
    clean = replayed(git_repo, tmp_path, d, recorded)
    for rel in ("zdata.bin", "ws.txt", "untracked.txt", "zz_ws.txt"):
        assert (clean / rel).read_bytes() == (git_repo / rel).read_bytes(), rel


def test_files_of_commit_names_a_non_utf8_path_losslessly(git_repo):
    odd = git_repo / os.fsdecode(BAD_NAME)
    odd.write_bytes(b"x\n")
    sha = commit_paths(git_repo, [odd], "odd name")
    assert [os.fsencode(p) for p in files_of_commit(git_repo, sha)] == [BAD_NAME]


# ------------------------------------------------------------------------ commit.gpgSign

def test_commit_is_signed_when_the_repository_asks_for_signed_commits(git_repo, gpg_key):
    """`git commit` signs when commit.gpgSign is true (commit-tree alone would not): so does moectl,
    with the configured user.signingKey."""
    git(git_repo, "config", "commit.gpgsign", "true")
    git(git_repo, "config", "user.signingkey", gpg_key)
    report = git_repo / "r.md"
    report.write_text("x\n")
    sha = commit_paths(git_repo, [report], "report: signed")
    assert git(git_repo, "log", "-1", "--format=%G?%n%GF", sha).split() == ["G", gpg_key]
    git(git_repo, "verify-commit", sha)
    git(git_repo, "config", "commit.gpgsign", "false")  # and unsigned when it is off
    report.write_text("y\n")
    assert git(git_repo, "log", "-1", "--format=%G?", commit_paths(git_repo, [report], "unsigned")).strip() == "N"


def test_a_signature_git_cannot_make_commits_nothing_and_says_why(git_repo, gnupg_home):
    """commit.gpgSign on, and a key no keyring holds (or no gpg at all): `git commit` fails, and
    so does moectl's commit - one line naming the setting, nothing moved, the report on disk and
    untracked, never an unsigned commit."""
    user_mess(git_repo)
    git(git_repo, "config", "commit.gpgsign", "true")
    git(git_repo, "config", "user.signingkey", "0xBADC0FFEE0DDF00D")
    report = git_repo / "reports" / "r.md"
    report.write_text("# report\n")
    before, head0 = snapshot(git_repo), git(git_repo, "rev-parse", "HEAD")
    index0 = (git_repo / ".git" / "index").read_bytes()

    with pytest.raises(SigningFailed) as exc:
        commit_paths(git_repo, [report], "report: unsigned?", branch="main")

    msg = exc.value.message
    assert exc.value.exit_code == 2 and "\n" not in msg
    assert "commit.gpgSign is on and git could not sign the commit: " in msg and "gpg failed to sign" in msg
    assert msg.endswith("nothing was committed")
    assert git(git_repo, "rev-parse", "HEAD") == head0
    assert (git_repo / ".git" / "index").read_bytes() == index0 and not (git_repo / ".git" / "index.lock").exists()
    assert snapshot(git_repo) == before and report.read_text() == "# report\n"
    assert git(git_repo, "status", "--porcelain", "--", "reports/r.md") == "?? reports/r.md\n"
    plain = subprocess.run(["git", "-C", str(git_repo), "commit", "--allow-empty", "-m", "x"], capture_output=True)
    assert plain.returncode != 0  # `git commit` refuses alike


def test_a_commit_gpgsign_that_is_not_a_boolean_refuses_before_committing(git_repo):
    git(git_repo, "config", "commit.gpgsign", "sometimes")
    head0 = git(git_repo, "rev-parse", "HEAD")
    (git_repo / "r.md").write_text("x\n")
    with pytest.raises(SigningFailed, match=r"^git config commit.gpgSign: fatal: bad boolean config value"):
        commit_paths(git_repo, [git_repo / "r.md"], "report")
    assert git(git_repo, "rev-parse", "HEAD") == head0 and not (git_repo / ".git" / "index.lock").exists()


def no_identity(repo, monkeypatch):
    """A git with no user.name/user.email to commit with (no global or system config, no EMAIL or
    GIT_AUTHOR_*/GIT_COMMITTER_* variables; user.useConfigOnly, so no host name is guessed into one)."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var in ("EMAIL", "GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.delenv(var, raising=False)
    git(repo, "config", "--unset", "user.name")
    git(repo, "config", "--unset", "user.email")
    git(repo, "config", "user.useConfigOnly", "true")


@pytest.mark.parametrize("signed", [False, True])
def test_no_git_identity_is_the_users_config_to_fix_with_nothing_moved(git_repo, monkeypatch, signed):
    """No user.name/user.email: exit 2 (the git configuration is the user's, as for signing), one
    line saying what to set, nothing moved - also with commit.gpgSign on, where the missing
    identity, not the signature, is what failed."""
    from moectl.gitops import IdentityUnknown

    user_mess(git_repo)
    no_identity(git_repo, monkeypatch)
    if signed:
        git(git_repo, "config", "commit.gpgsign", "true")
    report = git_repo / "reports" / "r.md"
    report.write_text("# report\n")
    before, head0 = snapshot(git_repo), git(git_repo, "rev-parse", "HEAD")
    with pytest.raises(IdentityUnknown) as exc:
        commit_paths(git_repo, [report], "report: who?", branch="main")
    msg = exc.value.message
    assert exc.value.exit_code == 2 and "\n" not in msg
    assert "set user.name and user.email" in msg and msg.endswith("nothing was committed")
    assert git(git_repo, "rev-parse", "HEAD") == head0 and not (git_repo / ".git" / "index.lock").exists()
    assert snapshot(git_repo) == before
