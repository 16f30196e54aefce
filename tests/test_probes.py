"""Probes against the real world: git repos, processes, interpreters, symlinks (NVML: the fake file)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from moectl.config import load_config
from moectl.guards import evaluate
from moectl.plan import make_request, plan_run
from moectl.probes import find_training_processes, observe, probe_disk, probe_git, probe_venv, read_nvml
from tests.conftest import git, gpu, start_process, stop_process


def test_git_counts_on_a_real_repo(git_repo):
    s = probe_git(git_repo)
    assert (s.is_repo, s.branch, s.detached, s.in_progress) == (True, "main", False, None)
    assert s.head == git(git_repo, "rev-parse", "HEAD").strip()
    assert (s.modified, s.staged, s.untracked, s.dirty) == (0, 0, 0, False)
    (git_repo / "README.md").write_text("changed\n")  # modified
    (git_repo / "a.txt").write_text("a\n")
    git(git_repo, "add", "a.txt")  # staged
    (git_repo / "a.txt").write_text("a2\n")  # ...and modified again
    (git_repo / "sub").mkdir()
    (git_repo / "sub" / "u1").write_text("u\n")
    (git_repo / "sub" / "u2").write_text("u\n")  # untracked (each file counts)
    git(git_repo, "mv", "README.md", "README2.md")  # a rename record (two paths with -z)
    s = probe_git(git_repo)
    assert (s.modified, s.staged, s.untracked) == (2, 2, 2)


def test_reading_git_state_never_writes_the_index(git_repo):
    """`git status` refreshes stale index entries under .git/index.lock: a `watch moectl status`
    then failed the user's own `git add` now and again. moectl only reads."""
    import os
    import time

    readme = git_repo / "README.md"
    later = time.time() + 5
    os.utime(readme, (later, later))  # same content, newer mtime: an entry git status would refresh
    index = (git_repo / ".git" / "index").read_bytes()
    probe_git(git_repo)
    assert (git_repo / ".git" / "index").read_bytes() == index


def test_git_detached_mid_merge_and_not_a_repo(git_repo, tmp_path):
    git(git_repo, "checkout", "-q", "--detach")
    s = probe_git(git_repo)
    assert s.detached and s.branch is None
    git(git_repo, "switch", "-q", "main")
    # A real conflicting merge leaves MERGE_HEAD.
    git(git_repo, "switch", "-q", "-c", "other")
    (git_repo / "README.md").write_text("other\n")
    git(git_repo, "commit", "-q", "-am", "other")
    git(git_repo, "switch", "-q", "main")
    (git_repo / "README.md").write_text("main\n")
    git(git_repo, "commit", "-q", "-am", "main")
    subprocess.run(["git", "-C", str(git_repo), "merge", "other"], capture_output=True, timeout=60)
    s = probe_git(git_repo)
    assert s.in_progress == "merge" and s.modified == 1
    outside = tmp_path / "plain"
    outside.mkdir()
    s = probe_git(outside)
    assert not s.is_repo and "not inside a git repository" in s.error


def test_a_repository_git_will_not_read_is_named_with_gits_words(git_repo):
    with open(git_repo / ".git" / "config", "a") as f:
        f.write("[core\n bad")  # a broken config: every git command refuses the repository
    s = probe_git(git_repo)
    assert not s.is_repo and s.error.startswith(f"git cannot read the repository at {git_repo}: fatal: bad config line")


def test_index_lock_is_read_with_its_holder_and_age(git_repo):
    assert probe_git(git_repo).index_lock is None
    lock = git_repo / ".git" / "index.lock"
    lock.write_bytes(b"")
    os.utime(lock, (time.time() - 300, time.time() - 300))  # a crashed git's, five minutes ago
    s = probe_git(git_repo)
    assert s.index_lock[0] == "other" and s.index_lock[1].startswith(f"{lock} exists: another git process")
    assert 299 <= s.index_lock_age_s < 360
    assert lock.exists()  # only read: someone else's lock is never touched


def test_fake_nvml_readings_and_device_selection(fake_nvml):
    fake_nvml(gpus=[gpu(0), gpu(1, util_pct=90, processes=[{"pid": 5, "name": "python", "used_mib": 100}])])
    r = read_nvml("all")
    assert [g.index for g in r.gpus] == [0, 1] and r.gpus[1].processes[0].pid == 5 and r.driver == "580.1"
    assert [g.index for g in read_nvml([1]).gpus] == [1]
    fake_nvml(error="Driver Not Loaded")
    r = read_nvml()
    assert r.gpus is None and r.error == "Driver Not Loaded"


def test_unreadable_fake_is_a_reading_not_a_crash(tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    monkeypatch.setenv("MOECTL_FAKE_NVML", str(bad))
    r = read_nvml()
    assert r.gpus is None and "unreadable" in r.error
    # Valid JSON with a GPU that lacks its index, or a mistyped number: unreadable too, not a crash.
    # A NaN, negative, boolean or overflowing load would read as idle (or crash status): unreadable.
    for broken in ('{"gpus": [{"index": 0, "name": "H100"}, {"name": "H100"}]}', '{"gpus": [{"index": 0, "util_pct": "busy"}]}',
                   '{"gpus": [{"index": 0, "processes": [{"name": "python"}]}]}',
                   '{"gpus": [{"index": 0, "util_pct": NaN, "mem_used_mib": NaN}]}',
                   '{"gpus": [{"index": 0, "util_pct": -50, "mem_used_mib": 0}]}',
                   '{"gpus": [{"index": 0, "util_pct": true, "mem_used_mib": false}]}',
                   '{"gpus": [{"index": 0, "util_pct": 0, "mem_used_mib": 1%s}]}' % ("0" * 400)):
        bad.write_text(broken)
        r = read_nvml()
        assert r.gpus is None and "unreadable" in r.error, broken


def test_real_nvml_never_raises(monkeypatch):
    # No fake: the real pynvml. On a GPU-less machine that is an error string; on a GPU box a list.
    monkeypatch.delenv("MOECTL_FAKE_NVML")
    r = read_nvml()
    assert (r.gpus is None) != (r.error is None)


def test_training_process_is_found_with_run_dir(fake_training):
    found = {t.pid: t for t in find_training_processes("engine.train")}
    assert fake_training.pid in found
    t = found[fake_training.pid]
    assert t.run_dir == "/art/20250101_000000_moe-x" and "/torchrun --out-dir" in t.cmdline and 0 <= t.age_s < 30


def test_module_invocation_is_training_and_ancestors_are_excluded(tmp_path):
    (tmp_path / "my").mkdir()
    (tmp_path / "my" / "train.py").write_text("import time\ntime.sleep(300)\n")
    p = start_process([sys.executable, "-u", "-m", "my.train", "--steps", "3"], cwd=tmp_path)
    try:
        assert p.pid in {t.pid for t in find_training_processes("my.train")}
        assert p.pid not in {t.pid for t in find_training_processes("engine.train")}
    finally:
        stop_process(p)
    import os

    assert os.getpid() not in {t.pid for t in find_training_processes("engine.train")}


def test_a_script_trainer_is_training_under_python_options_as_torchruns_workers_run_it(tmp_path):
    """torchrun starts a script's workers as `python -u train.py`: a left-over worker must still
    count as training (guard 7), as `python train.py` does; `python -c` naming it does not."""
    from moectl.probes import _is_training

    script = tmp_path / "train.py"
    script.write_text("import time\ntime.sleep(300)\n")
    p = start_process([sys.executable, "-u", "-X", "dev", str(script), "--max_iters=5"])
    try:
        assert p.pid in {t.pid for t in find_training_processes("train.py")}
    finally:
        stop_process(p)
    assert _is_training(["python3", "train.py"], "train.py") and _is_training(["/v/bin/python", "-u", "t/train.py"], "train.py")
    assert not _is_training(["python3", "-c", "print(1)", "train.py"], "train.py")
    assert not _is_training(["python3", "-m", "pytest", "train.py"], "train.py")
    assert not _is_training(["vim", "train.py"], "train.py")


def test_only_the_program_that_runs_makes_a_process_training():
    """`pgrep -f torchrun` or `less /usr/bin/torchrun` named torchrun in their argv and blocked the
    user's own run (guard 7); the program position decides."""
    from moectl.probes import _is_training

    for argv in (["torchrun", "--nproc-per-node", "2", "train.py"], ["/v/bin/torchrun", "-m", "engine.train"],
                 ["/v/bin/python3", "/v/bin/torchrun", "--standalone", "train.py"],
                 ["python", "-m", "torch.distributed.run", "-m", "engine.train"],
                 ["python3", "-X", "dev", "-m", "engine.train"],
                 # flags combined in one word, a value in the option's own word: CPython's own parsing
                 ["python3", "-um", "engine.train"], ["python3", "-mengine.train"], ["python3", "-Xdev", "-Bum", "engine.train"],
                 ["python", "-Wignore", "-u", "/v/bin/torchrun", "train.py"], ["python", "--", "/v/bin/torchrun"]):
        assert _is_training(argv, "engine.train"), argv
    for argv in (["pgrep", "-f", "torchrun"], ["less", "/usr/bin/torchrun"], ["watch", "pgrep", "-af", "torchrun"],
                 ["bash", "-c", "torchrun --nproc-per-node 2 train.py"], ["python3", "-c", "import time", "-m", "engine.train"],
                 ["python3", "tool.py", "-m", "engine.train"], ["grep", "torch.distributed.run", "log.txt"],
                 ["python3", "-uc", "import x", "-m", "engine.train"], ["python3", "-W", "-m", "tool", "engine.train"],
                 ["python3", "-m"], ["python3", "-", "-m", "engine.train"]):
        assert not _is_training(argv, "engine.train"), argv


def test_venv_probe_on_real_interpreters(tmp_path):
    cfg_file = tmp_path / ".moectl.toml"
    cfg_file.write_text('[project]\nvenv = ""\n')
    v = probe_venv(load_config(cfg_file))
    assert v.exists and v.in_venv and v.has_torch  # this interpreter (the project venv) has torch
    # A real venv without torch (no pip: fast).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True, timeout=120)
    cfg_file.write_text('[project]\nvenv = "bare"\n')
    v = probe_venv(load_config(cfg_file))
    assert v.exists and v.in_venv and v.has_torch is False
    cfg_file.write_text('[project]\nvenv = "missing"\n')
    v = probe_venv(load_config(cfg_file))
    assert not v.exists and "does not exist" in v.error


def test_disk_measures_nearest_existing_ancestor(tmp_path):
    d = probe_disk(tmp_path / "not" / "yet")
    assert d.path == str(tmp_path) and d.free_gib > 0


def paths_verdict(project, **req):
    cfg = load_config()
    plan = plan_run(cfg, make_request(device="cpu", **req), datetime.now(), None)
    obs = observe(cfg, plan)
    return next(r for r in evaluate(cfg, plan, obs) if r.name == "paths"), obs


def test_symlink_escaping_the_root_is_refused(project, artifact_root, tmp_path):
    artifact_root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (artifact_root / "escape").symlink_to(elsewhere)
    r, obs = paths_verdict(project, exp_dir=str(artifact_root / "escape" / "run1"))
    assert not r.ok and f"resolves to {elsewhere.resolve()}/run1" in r.message
    r, _ = paths_verdict(project, exp_dir=str(artifact_root / "fine"))
    assert r.ok


def test_dotdot_and_tilde_are_resolved(project, artifact_root, monkeypatch, tmp_path):
    r, _ = paths_verdict(project, exp_dir=str(artifact_root) + "/a/../../outside")
    assert not r.ok and "is outside artifact_root" in r.message
    monkeypatch.setenv("HOME", str(tmp_path))
    r, _ = paths_verdict(project, exp_dir="~/artifacts/run2")  # ~ = tmp_path -> inside the root
    assert r.ok, r.message


def test_an_existing_run_dir_named_through_a_missing_directory_and_dotdot_is_not_new(project, artifact_root):
    """`art/missing/../y` with `y` there: no path the kernel finds (`missing` is not there), but the
    run's mkdir makes `missing` and then finds `y` taken. `check` said `is new` and `run` refused."""
    (artifact_root / "y").mkdir(parents=True)
    r, obs = paths_verdict(project, exp_dir=f"{artifact_root}/missing/../y")
    assert obs.paths.exp_dir_exists and r.ok  # inside the root: only fresh_dir refuses it
    dangling = artifact_root / "dangling"
    dangling.symlink_to(artifact_root / "nowhere")
    assert paths_verdict(project, exp_dir=str(dangling))[1].paths.exp_dir_exists  # a link there, pointing nowhere


def test_read_only_tree_inside_the_root_is_refused(project, artifact_root):
    (project / ".moectl.toml").write_text(f'[project]\nvenv = ""\n[paths]\nread_only = ["{artifact_root}/keep"]\n')
    r, _ = paths_verdict(project, exp_dir=str(artifact_root / "keep" / "run"))
    assert not r.ok and "inside read-only tree" in r.message


def test_wait_until_clear_returns_when_the_gpu_goes_idle(project, fake_nvml):
    from moectl.guards import passed, wait_until_clear

    fake_nvml(gpus=[gpu(0, util_pct=99)])
    # Another engineer's torchrun may run on this machine meanwhile: that guard is overridden here.
    req = make_request(device="cuda", overrides=["no_other_training"])
    cfg = load_config()
    waits = []

    def gpu_frees_while_we_wait(results, waited_s):  # the event: moectl said it is waiting
        waits.append([r.name for r in results if not (r.ok or r.overridden)])
        fake_nvml(gpus=[gpu(0)])

    plan, obs, results = wait_until_clear(cfg, req, timeout_s=600, poll_s=0.2, on_wait=gpu_frees_while_we_wait)
    assert passed(results) and waits == [["gpus_idle"]]  # busy once, then re-checked and clear
    # Still busy at the deadline: returns the refusal.
    fake_nvml(gpus=[gpu(0, util_pct=99)])
    plan, obs, results = wait_until_clear(cfg, req, timeout_s=0.5, poll_s=0.2)
    assert [r.name for r in results if not (r.ok or r.overridden)] == ["gpus_idle"]
    # A guard that cannot clear by itself returns at once: no waiting, although the GPU is busy too.
    git(project, "switch", "-q", "-c", "elsewhere")
    waits.clear()
    plan, obs, results = wait_until_clear(cfg, req, timeout_s=600, poll_s=0.2, on_wait=lambda r, w: waits.append(w))
    assert sorted(r.name for r in results if not (r.ok or r.overridden)) == ["git", "gpus_idle"] and waits == []


def test_git_counts_beside_non_utf8_names_and_content(git_repo):
    (git_repo / "README.md").write_bytes(b"caf\xe9\n")  # modified with latin-1 bytes
    (git_repo / "latin1.txt").write_bytes(b"caf\xe9\n")
    (git_repo / os.fsdecode(b"bad\xffname")).write_bytes(b"x\n")
    (git_repo / os.fsdecode(b"staged\xe9")).write_bytes(b"x\n")
    subprocess.run([b"git", b"-C", os.fsencode(git_repo), b"add", b"staged\xe9"], check=True, timeout=60)
    s = probe_git(git_repo)
    assert s.error is None and (s.branch, s.modified, s.staged, s.untracked) == ("main", 1, 1, 2)
