"""The run lock: atomic, released only by its owner, stale owners (real dead pids) taken over."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from moectl.errors import EXIT_GUARD, GuardRefused
from moectl.lock import LOCK_NAME, acquire, read_holder
from tests.conftest import stop_process


def dead_pid() -> int:
    """The pid of a real process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def plant(root, **fields) -> None:
    root.mkdir(parents=True, exist_ok=True)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": "other", "started_at": "2025-01-01T00:00:00+00:00",
            "cmd": "moectl run", "started_ts": time.time() - 5, **fields}
    (root / LOCK_NAME).write_text(json.dumps(info))


def test_acquire_writes_holder_and_release_removes_it(artifact_root):
    assert read_holder(artifact_root) is None
    with acquire(artifact_root, "run1", cmd="moectl run --tag x") as lock:
        h = read_holder(artifact_root)
        assert (h.pid, h.run_id, h.cmd, h.stale) == (os.getpid(), "run1", "moectl run --tag x", False)
        assert lock.path == artifact_root / LOCK_NAME
    assert read_holder(artifact_root) is None
    assert os.listdir(artifact_root) == []  # no temp files left behind


def test_second_acquire_is_refused_while_held(artifact_root):
    with acquire(artifact_root, "run1"):
        with pytest.raises(GuardRefused) as e:
            acquire(artifact_root, "run2")
        assert e.value.exit_code == EXIT_GUARD and "run1" in e.value.message
    assert read_holder(artifact_root) is None


def live_owner() -> subprocess.Popen:
    """Another live process, to plant as a lock's owner (stop it with tests.conftest.stop_process)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])


def taken_by(p: subprocess.Popen) -> float:
    """A lock's started_ts as its owner `p` would write it: not before `p` started (in fact at the
    very moment it started, the earliest a lock of its can be), so the pid cannot look reused."""
    return psutil.Process(p.pid).create_time()


def test_live_lock_of_another_process_blocks(artifact_root):
    owner = live_owner()
    try:
        plant(artifact_root, pid=owner.pid, started_ts=taken_by(owner))
        h = read_holder(artifact_root)
        assert (h.pid, h.stale, h.reason) == (owner.pid, False, f"pid {owner.pid} is alive")
        with pytest.raises(GuardRefused) as e:
            acquire(artifact_root, "mine")
        assert "other" in e.value.message  # the holder's run id, so a person knows what to wait for
    finally:
        stop_process(owner)
    assert read_holder(artifact_root).run_id == "other"  # a refused acquire leaves the holder's lock


def test_dead_owner_is_stale_and_taken_over(artifact_root):
    pid = dead_pid()
    plant(artifact_root, pid=pid)
    h = read_holder(artifact_root)
    assert h.stale and h.pid == pid and "not running" in h.reason
    with acquire(artifact_root, "mine") as lock:
        assert read_holder(artifact_root).run_id == "mine"
        assert lock.info["pid"] == os.getpid()
    assert read_holder(artifact_root) is None


def test_reused_pid_is_stale(artifact_root):
    import psutil

    born = psutil.Process().create_time()
    # A lock taken after this process started may well be this process's: live.
    plant(artifact_root, pid=os.getpid(), started_ts=born + 10)
    assert read_holder(artifact_root).stale is False
    # A lock taken before this process existed cannot be its: the pid was reused.
    plant(artifact_root, pid=os.getpid(), started_ts=born - 100)
    h = read_holder(artifact_root)
    assert h.stale is True and "started after the lock" in h.reason


def test_other_host_is_never_judged_stale(artifact_root):
    plant(artifact_root, pid=dead_pid(), host="some-other-host")
    assert read_holder(artifact_root).stale is False


def test_release_leaves_a_lock_that_is_no_longer_ours(artifact_root):
    lock = acquire(artifact_root, "mine")
    plant(artifact_root, run_id="usurper")  # someone took it over (we looked dead to them)
    lock.release()
    assert read_holder(artifact_root).run_id == "usurper"


@pytest.mark.parametrize("garbage", [b"{not json", b"\xff\xfe\x00 not text",
                                     b'{"pid": 1, "host": "%s", "started_ts": "yesterday"}',
                                     b'{"pid": -1, "host": "%s", "run_id": "x"}', b'{"pid": 0, "host": "%s"}'],
                         ids=["not-json", "not-utf8", "bad-started-ts", "negative-pid", "pid-0"])
def test_garbage_lock_file_is_stale(artifact_root, garbage):
    artifact_root.mkdir()
    (artifact_root / LOCK_NAME).write_bytes(garbage.replace(b"%s", socket.gethostname().encode()))
    holder = read_holder(artifact_root)
    if garbage.startswith(b'{"pid": 1'):  # pid 1 is alive: judged by its pid, without the odd timestamp
        assert not holder.stale and holder.pid == 1
        return
    assert holder.stale
    with acquire(artifact_root, "mine"):
        assert read_holder(artifact_root).run_id == "mine"
