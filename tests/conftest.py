"""Shared fixtures: real git repos, the fake NVML reading (the suite's only fake), an isolated
artifact root. Every test runs with MOECTL_ARTIFACT_ROOT in its own tmp dir and, unless it asks
for something else via `fake_nvml`, with an NVML reading of "no library" - so the suite behaves
the same on a laptop, on CI and on a GPU box."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest


def git(repo: Path, *args: str) -> str:
    """Run git in `repo`; return stdout (raises on failure)."""
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True)
    return r.stdout


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


@pytest.fixture
def fake_training():
    """A real background process whose argv names torch.distributed.run and an --out-dir: what the
    training-process scan and the no_other_training guard must see."""
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                          "torch.distributed.run", "--out-dir", "/art/20250101_000000_moe-x"])
    time.sleep(0.3)
    yield p
    p.kill()
    p.wait()
