"""The local 2-node Slurm cluster of scripts/local_slurm.sh for the tests that use it: their gating
(`SLURM_TESTS`, for `pytestmark`) and ONE cluster per test session (`slurm_env`, registered for the
whole suite by tests/conftest.py), however many test files ask for it.

The tests run under CI=true (CI is root on a machine that reaches Debian's packages) and with
MOECTL_TEST_SLURM=1; elsewhere they skip, since the script may apt-get install slurm-wlm and runs
its daemons as root. When they run, a cluster that does not come up fails them with the script's
message; it never skips them."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "local_slurm.sh"

SLURM_TESTS = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.environ.get("MOECTL_TEST_SLURM") != "1" and os.environ.get("CI") != "true",
                       reason="needs the local Slurm cluster: set MOECTL_TEST_SLURM=1 (root; may apt-get install "
                              "slurm-wlm); always run under CI=true"),
]


def free_port() -> int:
    """A port nobody listens on now (for a controller that must not answer). Not for a port that is
    to be listened on later: it comes from the ephemeral range, which outgoing connections take
    from at any moment - use free_ports()."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(count: int = 1) -> int:
    """The first of `count` consecutive ports that can all be bound now, below the kernel's
    ephemeral range, for listeners started a moment later (a cluster's daemons, a job's c10d
    rendezvous at rdzv_port + job id). A port from free_port() lies in that range: an outgoing
    connection of anything on the machine may take it before the listener binds it (seen with
    two test workers: a job's rendezvous port was taken, and its second node could not join)."""
    low, rng = _ephemeral_low(), random.Random()  # seeded from os.urandom: two workers pick apart
    for _ in range(500):
        base = rng.randrange(10000, max(10001, low - count))
        if all(_bindable(port) for port in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports below {low}")


# This test session's own cluster: its own state directory and ports, so two suites on one machine
# (two checkouts, a CI clone beside a developer's run) never meet on 6817-6819 or in one .slurm/.
_OWN: dict[str, str] = {}


def local_slurm(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """scripts/local_slurm.sh with this session's state directory and ports."""
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **_OWN})


@pytest.fixture(scope="session")
def slurm_env():
    """The environment of a shell that ran `eval "$(local_slurm.sh start)"`, for a cluster of this
    session's own (a short temp dir: munge's socket path must stay under 100 bytes), stopped and
    removed after it."""
    base = free_ports(3)
    ports = range(base, base + 3)
    state = tempfile.mkdtemp(prefix="moectl-slurm-")
    _OWN.update(MOECTL_SLURM_DIR=state, **{f"MOECTL_SLURM_{name}_PORT": str(port)
                                           for name, port in zip(("CTLD", "N1", "N2"), sorted(ports))})
    try:
        # Generous: the first start on a fresh machine includes apt-get install.
        started = local_slurm("start", timeout=280)
        assert started.returncode == 0, f"local_slurm.sh start failed:\n{started.stderr}"
        env = {**os.environ, **_OWN}
        for line in started.stdout.splitlines():
            assert line.startswith("export ") and "=" in line, f"start printed a line that is not an export: {line!r}"
            name, value = line[len("export "):].split("=", 1)
            env[name] = value
        assert Path(env["SLURM_CONF"]).is_file() and env["MOECTL_SLURM_DIR"] == state
        yield env
    finally:
        stopped = local_slurm("stop", "--purge", timeout=120)
        _OWN.clear()
        assert stopped.returncode == 0, f"local_slurm.sh stop failed:\n{stopped.stderr}"
