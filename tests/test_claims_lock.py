"""Several real processes taking over one stale run lock at the same instant: exactly one wins.

Each round plants a stale lock (a real dead pid) in a fresh artifact root, then releases all
contenders at once through a go-file; every contender calls `moectl.lock.acquire` and reports
`won` or `refused <message>` on stdout, then holds what it got until the round's done-file
appears, so a loser can never see the winner's lock as stale. The race is repeated, since one
lucky interleaving proves nothing. With three or more contenders the old rename-aside takeover
let two of them win (a loser moved the winner's live lock aside, a third published in the gap):
seen in 2 of 4 runs of 100 rounds before moectl/lock.py serialised takeovers with an flock.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moectl.lock import LOCK_NAME, read_holder

REPO = Path(__file__).resolve().parents[1]
ROUNDS = int(os.environ.get("MOECTL_TEST_LOCK_ROUNDS", "40"))  # more to stress by hand
DEADLINE_S = 60.0



def plant_stale_lock(root: Path) -> None:
    """A lock file as a moectl that was SIGKILLed leaves it: its pid is a real process that exited."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=DEADLINE_S)
    root.mkdir(parents=True)
    (root / LOCK_NAME).write_text(json.dumps({
        "pid": dead.pid, "host": socket.gethostname(), "run_id": "dead-run", "started_at": "2025-01-01T00:00:00+00:00",
        "cmd": "moectl run", "started_ts": time.time() - 5, "token": "dead"}))


CONTENDER = r"""
import sys, time
from pathlib import Path
from moectl.errors import GuardRefused
from moectl.lock import acquire

base, name, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def wait_for(path):
    deadline = time.monotonic() + 60
    while not path.exists():
        if time.monotonic() > deadline:
            print(f"timeout waiting for {path}", flush=True)
            sys.exit(1)
        time.sleep(0.0005)

print("ready", flush=True)
for r in range(rounds):
    wait_for(base / f"go.{r}")
    try:
        lock = acquire(base / f"root{r}", f"{name}-r{r}", cmd=f"contender {name}")
        print(f"won {r}", flush=True)
    except GuardRefused as exc:
        lock = None
        print(f"refused {r} {exc.message}", flush=True)
    wait_for(base / f"done.{r}")
    if lock is not None:
        lock.release()
"""


def _readline(proc: subprocess.Popen, what: str) -> str:
    """One stdout line of `proc`, or a failure naming the line that never came."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout=DEADLINE_S):
            raise AssertionError(f"no line from contender pid {proc.pid} within {DEADLINE_S:.0f}s: {what}")
    finally:
        sel.close()
    line = proc.stdout.readline()
    assert line, f"contender pid {proc.pid} exited before {what} (exit {proc.poll()})"
    return line.rstrip("\n")


@pytest.mark.parametrize("contenders", [2, 3, 6])
def test_simultaneous_takeover_of_a_stale_lock_has_one_winner(tmp_path, contenders):
    roots = [tmp_path / f"root{r}" for r in range(ROUNDS)]
    for root in roots:
        plant_stale_lock(root)
        assert read_holder(root).stale and read_holder(root).run_id == "dead-run"
    names = [f"c{i}" for i in range(contenders)]
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(tmp_path), name, str(ROUNDS)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True, bufsize=1) for name in names]
    try:
        for p in procs:
            assert _readline(p, "its 'ready' line") == "ready"
        pids = {name: p.pid for name, p in zip(names, procs)}
        for r, root in enumerate(roots):
            (tmp_path / f"go.{r}").touch()
            results = {name: _readline(p, f"its result of round {r}") for name, p in zip(names, procs)}
            winners = [name for name, line in results.items() if line == f"won {r}"]
            assert len(winners) == 1, f"round {r}: {results}"
            [winner] = winners
            # The lock file names the winner, and is a complete record (never half-written).
            holder = json.loads((root / LOCK_NAME).read_text())
            assert (holder["pid"], holder["run_id"]) == (pids[winner], f"{winner}-r{r}"), (r, holder, results)
            assert read_holder(root).stale is False
            for name, line in results.items():
                if name != winner:  # a loser is told who holds the lock
                    assert line.startswith(f"refused {r} another moectl run is active"), (r, results)
                    assert f"pid {pids[winner]}" in line and f"{winner}-r{r}" in line, (r, results)
            # Nothing but the lock itself is left behind (no temp or moved-aside files).
            assert sorted(p.name for p in root.iterdir()) == [LOCK_NAME], (r, results)
            (tmp_path / f"done.{r}").touch()
        for p in procs:
            assert p.wait(timeout=DEADLINE_S) == 0
        for root in roots:  # each round's winner released its lock before exiting
            assert list(root.iterdir()) == [], root
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=DEADLINE_S)
