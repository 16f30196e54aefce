"""Engine `--resume` under torchrun with two ranks (gloo, CPU), back into the run's own out-dir.

A straight 8-step run checkpoints at step 4 (`--save-every 4`); its metrics are the reference.
Resuming from model_000004.pt into the same out-dir runs steps 4-7 again: their losses must match
the straight run's (same data position, optimizer state and schedule on both ranks), and
metrics.jsonl must then hold every step exactly once - the steps before the checkpoint as the
first attempt wrote them, the steps after it from the resumed attempt, one final summary.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Two micro-batches per rank per step (16 x 64 tokens x 2 ranks x 2): gradient accumulation and the
# all-reduce both cross the checkpoint.
COMMON = ["--preset", "tiny", "--device", "cpu", "--steps", "8", "--total-batch-size", "4096"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "engine.train", *COMMON, *args],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def steps_of(recs: list[dict]) -> list[dict]:
    return [r for r in recs if r.get("type", "step") == "step"]


@pytest.mark.slow
def test_two_rank_resume_into_the_same_out_dir_matches_a_straight_run_and_keeps_each_step_once(tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    torchrun("--out-dir", str(out), "--ckpt-dir", str(ckpt), "--save-every", "4")
    straight = records(out)
    assert [r["step"] for r in steps_of(straight)] == list(range(8))
    assert straight[0]["type"] == "start" and straight[0]["world_size"] == 2
    assert straight[-1]["type"] == "summary" and straight[-1]["world_size"] == 2
    assert (ckpt / "model_000004.pt").is_file()

    proc = torchrun("--out-dir", str(out), "--resume", str(ckpt / "model_000004.pt"), "--ckpt-dir", str(tmp_path / "again"))
    assert "resumed at step 4" in proc.stdout
    resumed = records(out)
    step_lines = steps_of(resumed)
    assert [r["step"] for r in step_lines] == list(range(8)), [r["step"] for r in step_lines]

    # Steps before the checkpoint: the first attempt's lines, untouched.
    assert step_lines[:4] == steps_of(straight)[:4]
    # Steps after it: run again on both ranks from the checkpoint, landing where the straight run did.
    for before, again in zip(steps_of(straight)[4:], step_lines[4:]):
        assert again["loss"] == pytest.approx(before["loss"], rel=1e-5, abs=1e-6), (before["step"], before, again)
        assert again["lr"] == before["lr"]
    # One start line per attempt (the second says where it resumed), one summary: the resumed one.
    starts = [r for r in resumed if r["type"] == "start"]
    assert [s.get("start_step", 0) for s in starts] == [0, 4] and all(s["world_size"] == 2 for s in starts)
    summaries = [r for r in resumed if r["type"] == "summary"]
    assert len(summaries) == 1 and resumed[-1] == summaries[0]
    assert summaries[0]["final_loss"] == pytest.approx(step_lines[-1]["loss"])
    assert resumed.index(starts[1]) == 5  # start, steps 0-3, then the resumed attempt


def test_resume_trim_keeps_earlier_steps_and_drops_a_torn_last_line(tmp_path):
    # The torn last line is a step the checkpoint does not hold (a step's line is written before
    # its checkpoint): it runs again. Kept with a newline, it stayed an unreadable line mid-file.
    from engine.train import _keep_steps_before

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"type": "start", "steps": 6, "world_size": 1, "tokens_per_step": 1, "device": "cpu"})]
    lines += [json.dumps({"step": i, "loss": 1.0}) for i in range(6)]
    torn = '{"step": 6, "lo'  # the first attempt died mid-write
    path.write_text("\n".join(lines) + "\n" + torn)
    assert _keep_steps_before(path, 3) == 4  # steps 3-5 and the torn line
    assert path.read_text() == "\n".join(lines[:4]) + "\n"
    assert _keep_steps_before(path, 3) == 0 and path.read_text() == "\n".join(lines[:4]) + "\n"  # idempotent
    # A line that does not parse elsewhere is not ours to judge: kept as it was.
    path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    assert _keep_steps_before(path, 3) == 0 and "not json" in path.read_text()
    assert _keep_steps_before(tmp_path / "absent.jsonl", 3) == 0 and not (tmp_path / "absent.jsonl").exists()
