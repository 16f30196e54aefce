"""Shared fixtures: real git repos, the fake NVML reading (the suite's only fake), an isolated
artifact root and cache. Every test runs with MOECTL_ARTIFACT_ROOT and MOECTL_CACHE_DIR in its own
tmp dir and, unless it asks for something else via `fake_nvml`, with an NVML reading of "no
library" - so the suite behaves the same on a laptop, on CI and on a GPU box.

Also the suite's ways to wait: `wait_for` (an event, polled, with a deadline that fails naming the
event), `readline_within` (a child's output line, bounded), `start_process` (a child whose argv a
process scan already sees), and `needs_seed` (the seed study's figures: skipped locally when the
seed is not beside the repository, a failure under CI=true). `slurm_env`, the local Slurm cluster,
comes from tests/slurm_fixtures.py."""
from __future__ import annotations

import functools
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import psutil
import pytest

from engine.schema import StepMetrics, parse_line
# The session's one local Slurm cluster, for every test file that asks for it (tests/slurm_fixtures.py).
from tests.slurm_fixtures import slurm_env  # noqa: F401

T = TypeVar("T")


def _suite_git_config() -> None:
    """Every git the suite starts reads this file as its global configuration, not the machine's.

    The scratch repositories that are not `git_repo`'s (a submodule's, another project's) commit with
    whatever identity the machine's ~/.gitconfig has: on a machine without one (a fresh CI box) they
    failed with git's exit 128, and a developer's global `commit.gpgsign` or hooks path failed them
    too. The environment is inherited by moectl, torchrun's children and Slurm jobs alike; a
    repository's own config still wins, and a test that wants no identity at all points
    GIT_CONFIG_GLOBAL elsewhere (monkeypatch)."""
    import atexit

    fd, path = tempfile.mkstemp(prefix="moectl-tests-", suffix=".gitconfig")
    with os.fdopen(fd, "w") as fh:
        fh.write("[user]\n\tname = moectl tests\n\temail = tests@moectl.invalid\n"
                 "[commit]\n\tgpgsign = false\n[tag]\n\tgpgsign = false\n[init]\n\tdefaultBranch = main\n")
    os.environ["GIT_CONFIG_GLOBAL"] = path
    atexit.register(lambda: os.path.exists(path) and os.unlink(path))


_suite_git_config()
SLOW_TIMEOUT_S = 600  # pytest-timeout's limit for `slow` tests (the default is in pyproject.toml)


# The time-limit job (tests/test_slurm_run.py) waits a minute or more for Slurm: it is submitted
# right after the last other test that uses the cluster, and checked last of all. (Under
# pytest-xdist's --dist=loadfile a worker runs a file's tests in this order: the check comes last of
# tests/test_slurm_run.py, and the other worker goes on meanwhile.)
TIME_LIMIT_SUBMIT = "test_a_time_limited_job_is_submitted_to_run_beside_the_rest_of_the_suite"
TIME_LIMIT_CHECK = "test_a_run_stopped_at_its_slurm_time_limit_is_recorded_as_such_with_what_it_trained"


# The test files that take longest, longest first (`--durations` per file on the 2-core Intel VM,
# 2026-11-29: test_slurm_run.py 246 s with its time-limit minute, test_sweep.py 206, test_train.py
# ~170, test_ep.py 149, test_tracking.py 148, test_run.py 119, down to 34 s). pytest-xdist hands the
# workers whole files in collection order; alphabetically these came last, and one worker went on
# for minutes after the other had run out of files. Only the order changes.
LONGEST_FILES = ["test_slurm_run.py", "test_sweep.py", "test_train.py", "test_ep.py", "test_tracking.py",
                 "test_run.py", "test_run_signals.py", "test_slurm_sweep.py", "test_bench.py", "test_commit_lock.py",
                 "test_repo_unwritable.py", "test_sigkill.py", "test_launch.py"]


def pytest_collection_modifyitems(items):
    """`slow` tests (torchrun, torch.compile) get the longer limit, unless they name their own.
    The longest files go first, and the time-limit job's two tests where its minute of waiting
    overlaps other tests' work."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
    rank = {name: n for n, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda i: rank.get(i.path.name, len(LONGEST_FILES)))  # (stable: a file's own order stays)
    submit = [i for i in items if i.name == TIME_LIMIT_SUBMIT]
    check = [i for i in items if i.name == TIME_LIMIT_CHECK]
    rest = [i for i in items if i.name not in (TIME_LIMIT_SUBMIT, TIME_LIMIT_CHECK)]
    on_cluster = [n for n, i in enumerate(rest) if "slurm_env" in getattr(i, "fixturenames", ())]
    after = on_cluster[-1] + 1 if on_cluster else 0
    items[:] = rest[:after] + submit + rest[after:] + check


def git(repo: Path, *args: str) -> str:
    """Run git in `repo`; return stdout (raises on failure)."""
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=60)
    return r.stdout


# ------------------------------------------------------------------------------- live metrics


def steps_written(metrics_path: Path) -> list[StepMetrics]:
    """The step records of a metrics.jsonl that may be being written right now: only lines that
    end in a newline count, since a reader can catch the writer mid-line (seen in CI: a requeued
    job's line cut at `"peak`). Every complete line must parse; a missing file has no steps."""
    try:
        text = metrics_path.read_text()
    except FileNotFoundError:
        return []
    complete = text[: text.rfind("\n") + 1]
    return [r for r in map(parse_line, complete.splitlines()) if isinstance(r, StepMetrics)]


# ---------------------------------------------------------------------------------------- waiting


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler installed for `sig` (/proc/PID/status SigCgt): a signal
    sent after this lands in the handler, not in Python's start-up."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(mask >> (int(sig) - 1) & 1)


def wait_for(event: Callable[[], T], what: str, timeout: float = 60.0, *, proc: Optional[subprocess.Popen] = None,
             output: Optional[Callable[[], str]] = None, poll_s: float = 0.05) -> T:
    """Poll `event()` until it returns something truthy; return that. The deadline only bounds a
    hang (generous: a loaded 2-core CI machine), it never orders anything. Fails saying that `what`
    never happened, at the deadline or as soon as `proc` exits without it, with `output()` (the
    child's log) when given."""
    deadline = time.monotonic() + timeout
    while True:
        value = event()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            value = event()  # it may have happened between the first look and the exit
            if value:
                return value
            why = f"pid {proc.pid} exited ({proc.returncode}) first"
        elif time.monotonic() > deadline:
            why = f"not within {timeout:g}s"
        else:
            time.sleep(poll_s)
            continue
        pytest.fail(f"{what} never happened: {why}" + (f"\n{output()[-4000:]}" if output else ""))


def readline_within(stream, timeout: float, what: str) -> str:
    """One line from a child's pipe, or fail naming `what`: a bare readline() blocks forever on a
    child that hangs without writing. The reader thread ends when the child closes the pipe."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"{what} never happened: no line from the child within {timeout:g}s")
    if not line:
        pytest.fail(f"{what} never happened: the child closed its output")
    return line


def _cmdline(pid: int) -> Optional[list[str]]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return None


def start_process(argv: list[str], **popen_kw) -> subprocess.Popen:
    """Popen `argv` and return once the process shows that argv (/proc/<pid>/cmdline): what a
    process scan of the machine reads."""
    p = subprocess.Popen(argv, **popen_kw)
    wait_for(lambda: _cmdline(p.pid) == argv, f"pid {p.pid} showing its argv {argv}", proc=p)
    return p


def stop_process(p: subprocess.Popen) -> None:
    p.kill()
    p.wait(timeout=30)


def signal_when(proc: subprocess.Popen, ready: Callable[[], Any], what: str, sig: int, *,
                output: Optional[Callable[[], str]] = None, timeout: float = 120) -> int:
    """Wait until `ready()` (the moment the test is about), send `sig` to `proc`, and return its exit
    code; a process still there after a failure is killed, so no test leaves one behind."""
    try:
        wait_for(ready, what, timeout, proc=proc, output=output)
        proc.send_signal(sig)
        return proc.wait(timeout=timeout)  # a bound against a hang, not a latency check
    finally:
        if proc.poll() is None:
            stop_process(proc)


def fake_slurm_bin(tmp_path: Path, block_at: int) -> tuple[Path, Path, Path]:
    """A PATH directory standing in for Slurm: sbatch hands out job ids 101, 102, ... and blocks on
    call `block_at` (so a signal lands mid-submission every time); scontrol knows no job; scancel
    logs what it was asked to cancel. Returns (bin dir, the mark sbatch leaves when it blocks, the log)."""
    bin_dir, mark, log = tmp_path / "bin", tmp_path / "sbatch-blocked", tmp_path / "scancel.log"
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))
    count = tmp_path / "sbatch-calls"
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\necho x >> {count}\nn=$(wc -l < {count})\n'
        f'if [ "$n" -ge {block_at} ]; then touch {mark}; exec sleep 600; fi\necho $((100 + n))\n')
    (bin_dir / "scontrol").write_text(
        '#!/bin/sh\nif [ "$1 $2" = "show job" ]; then echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; fi\n'
        'exit 0\n')
    (bin_dir / "scancel").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 0\n')
    (bin_dir / "squeue").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        if not f.is_symlink():
            f.chmod(0o755)
    return bin_dir, mark, log


@pytest.fixture
def slurm_answers(tmp_path, monkeypatch) -> Path:
    """Slurm's commands on PATH with a controller that answers (fake_slurm_bin's: `scontrol ping`
    exits 0), for the commands that only ask it - `check --slurm`, `run --slurm --dry-run` - in the
    suite's part without a cluster. Returns the bin directory."""
    bin_dir, _, _ = fake_slurm_bin(tmp_path, block_at=10**9)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    return bin_dir


def kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL every process of a list taken earlier (gone ones are fine) and reap them: a test's
    cleanup, so no trainer outlives it whatever went wrong."""
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


# --------------------------------------------------------------------------------------- guards


def no_other_training_on_a_quiet_machine():
    """The no_other_training verdict `moectl check` reaches in the cwd's project, from the real
    config and lock file, on a machine where no training process runs. The process scan is the one
    input a test cannot control (other sessions may run torchrun here), so it is set, not read."""
    from dataclasses import replace

    from moectl.config import load_config
    from moectl.guards import check_request, guard_no_other_training
    from moectl.plan import make_request

    cfg = load_config()
    plan, observed, _ = check_request(cfg, make_request())
    return guard_no_other_training(cfg, plan, replace(observed, processes=[]))


# ------------------------------------------------------------------------------------ seed study

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "metrics"


def needs_seed(test):
    """For tests that check the seed study's published figures (../shared/seed/metrics). Without
    the seed they skip locally (-ra lists the reason), but under CI=true they fail: CI has the
    seed beside the clone, so its absence there is a broken setup, not a reason to check less."""

    @functools.wraps(test)
    def checked(*args, **kwargs):
        if not SEED.is_dir():
            reason = f"{test.__name__}: seed study not beside the repository ({SEED} is missing)"
            if os.environ.get("CI") == "true":
                pytest.fail(f"{reason} (CI=true: the seed figures must be checked)")
            pytest.skip(reason)
        return test(*args, **kwargs)

    return checked


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    """A real git repository on branch `main` with one commit (README.md)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "Test User")
    git(repo, "config", "user.email", "test@example.com")
    git(repo, "config", "commit.gpgsign", "false")
    (repo / "README.md").write_text("hello\n")
    git(repo, "add", "README.md")
    git(repo, "commit", "-q", "-m", "initial")
    return repo


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch) -> Path:
    """An isolated moectl cache (MOECTL_CACHE_DIR: the memo of validated configs and records,
    moectl/validated.py): nothing is left in ~/.cache, and no test reads another's memo."""
    path = tmp_path / "moectl-cache"
    monkeypatch.setenv("MOECTL_CACHE_DIR", str(path))
    return path


@pytest.fixture(autouse=True)
def artifact_root(tmp_path: Path, monkeypatch) -> Path:
    """An isolated artifact root (MOECTL_ARTIFACT_ROOT); not created, as on a fresh machine."""
    root = tmp_path / "artifacts"
    monkeypatch.setenv("MOECTL_ARTIFACT_ROOT", str(root))
    return root


def gpu(index: int = 0, util_pct: float = 0, mem_used_mib: float = 0, processes=(), **kw) -> dict:
    """One GPU of a fake NVML reading (an idle H100 unless told otherwise)."""
    return {"index": index, "name": kw.get("name", "NVIDIA H100 80GB HBM3"), "util_pct": util_pct,
            "mem_used_mib": mem_used_mib, "mem_total_mib": kw.get("mem_total_mib", 81559),
            "processes": list(processes), **({"error": kw["error"]} if "error" in kw else {})}


@pytest.fixture(autouse=True)
def fake_nvml(tmp_path_factory, monkeypatch):
    """Write the fake NVML reading (moectl.probes docstring) and point MOECTL_FAKE_NVML at it.

        fake_nvml(gpus=[gpu(0), gpu(1, util_pct=90)])   # GPUs
        fake_nvml(error="Driver Not Loaded")            # NVML failing
    Default (autouse): NVML library not found, i.e. a machine without GPUs."""
    path = tmp_path_factory.mktemp("nvml") / "fake_nvml.json"  # outside tmp_path: tests own that

    def write(gpus=None, error=None, driver="580.1") -> Path:
        data = {"error": error} if error is not None else {"gpus": gpus or [], "driver": driver}
        path.write_text(json.dumps(data))
        monkeypatch.setenv("MOECTL_FAKE_NVML", str(path))
        return path

    write(error="NVML Shared Library Not Found")
    return write


@pytest.fixture
def project(git_repo: Path, monkeypatch) -> Path:
    """`git_repo` with a committed .moectl.toml (venv "" = this interpreter, which has torch),
    and the cwd inside it. Returns the repo root."""
    (git_repo / ".moectl.toml").write_text(
        '[project]\nname = "moe"\nbranch = "main"\nvenv = ""\n\n[defaults]\npreset = "tiny"\n'
    )
    git(git_repo, "add", ".moectl.toml")
    git(git_repo, "commit", "-q", "-m", "moectl config")
    monkeypatch.chdir(git_repo)
    return git_repo


def start_sleeping_torchrun(directory: Path, *args: str) -> subprocess.Popen:
    """A real background process with torchrun's command line (`python .../torchrun ARGS`, as its
    console script runs) that only sleeps: what the training-process scan must see."""
    torchrun = Path(directory) / "torchrun"
    torchrun.write_text("import time\ntime.sleep(300)\n")
    return start_process([sys.executable, str(torchrun), *args])


@pytest.fixture
def fake_training(tmp_path_factory):
    """A sleeping torchrun with an --out-dir: what the no_other_training guard must see."""
    p = start_sleeping_torchrun(tmp_path_factory.mktemp("bin"), "--out-dir", "/art/20250101_000000_moe-x")
    yield p
    stop_process(p)


@pytest.fixture
def gnupg_home(monkeypatch) -> Path:
    """An empty GNUPGHOME of its own (no key of the machine's user can sign), under /tmp: the path
    of gpg-agent's socket inside it must fit in 108 bytes. Its agent, if one started, is stopped."""
    home = Path(tempfile.mkdtemp(prefix="gpg-", dir="/tmp"))
    home.chmod(0o700)
    monkeypatch.setenv("GNUPGHOME", str(home))
    yield home
    if shutil.which("gpgconf"):
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], capture_output=True, timeout=30,
                       env={**os.environ, "GNUPGHOME": str(home)})
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def gpg_key(gnupg_home) -> str:
    """The fingerprint of a fresh passphrase-less signing key in `gnupg_home` (skipped without gpg)."""
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed")
    subprocess.run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", "", "--quick-gen-key",
                    "Test User <test@example.com>", "ed25519", "sign", "never"], check=True, capture_output=True,
                   timeout=120)
    listing = subprocess.run(["gpg", "--batch", "--with-colons", "--list-secret-keys"], check=True,
                             capture_output=True, text=True, timeout=60).stdout
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
