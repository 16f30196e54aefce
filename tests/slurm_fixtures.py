"""The local 2-node Slurm cluster of scripts/local_slurm.sh for the tests that use it: their gating
(`SLURM_TESTS`, for `pytestmark`) and ONE cluster per test session (`slurm_env`, registered for the
whole suite by tests/conftest.py), however many test files ask for it.

The tests run under CI=true (CI is root on a machine that reaches Debian's packages) and with
MOECTL_TEST_SLURM=1; elsewhere they skip, since the script may apt-get install slurm-wlm and runs
its daemons as root. When they run, a cluster that does not come up fails them with the script's
message; it never skips them."""
from __future__ import annotations

import os
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
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
