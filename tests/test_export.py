"""`moectl export RUN... --csv DIR`: the two CSVs, their contract, and a round trip through
`moectl import --format csv` (real CLI via CliRunner, isolated artifact root, real .moectl.toml)."""
from __future__ import annotations

import csv
import json
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.schema import METRICS_FILENAME, RunSummary, StepMetrics, to_line
from moectl.cli import app
from moectl.records import RunRecord, Summary
from moectl.store import create_run_dir, run_id, save_run

runner = CliRunner()
# The contract of the two files (issue 4 / the seed's exports), written out, not imported.
STEPS_HEADER = ["run", "step", "loss", "aux_loss", "lr", "dt_ms", "tok_per_sec", "mfu", "peak_mem_mib",
                "drop_frac", "expert_load_max", "elapsed_s"]
SUMMARY_HEADER = ["run", "tag", "status", "steps", "tok_per_sec", "dt_ms", "mfu", "peak_mem_mib",
                  "total_time_min", "final_loss", "drop_frac", "expert_load_max", "window", "warmup_steps", "window_steps", "clean", "error"]
WINDOW = 5
WARMUP = 10  # the config default: steps 0-9 never enter a window


def invoke(*args: str):
    return runner.invoke(app, list(args))


def steps_of(n: int, seed: int) -> list[StepMetrics]:
    """Awkward floats on purpose (thirds, sevenths): a lossy CSV would not round-trip them."""
    return [
        StepMetrics(step=i, loss=10.0 - i / 3.0 - seed / 7.0, aux_loss=0.01 + i / 997.0, lr=3e-4 * (1 - i / n),
                    dt_ms=650.0 + ((i * 37 + seed) % 11) / 3.0, tok_per_sec=800_000.0 + ((i * 53 + seed) % 17) * 101.7,
                    mfu=9.7 + i / 70.0, peak_mem_mib=1000.0 + 7.0 * min(i, 4), drop_frac=0.02 + i / 1300.0,
                    expert_load_max=1.3 + i / 90.0, elapsed_s=0.65 * (i + 1))
        for i in range(n)
    ]


def make_run(root: Path, tag: str, second: int, steps: list[StepMetrics] | None, status: str = "completed",
             error: str | None = None, summary: Summary | None = None) -> RunRecord:
    d = create_run_dir(root / run_id("moe", tag, datetime(2026, 1, 1, 0, 0, second)))
    if steps is not None:
        lines = [to_line(s) for s in steps]
        if status == "completed":  # the engine's summary line agrees with its steps: peak = max, total = last elapsed
            lines.append(to_line(RunSummary(steps=len(steps), world_size=1, peak_mem_mib=max(s.peak_mem_mib for s in steps),
                                            total_time_s=steps[-1].elapsed_s, final_loss=steps[-1].loss)))
        (d / METRICS_FILENAME).write_text("\n".join(lines) + "\n")
    rec = RunRecord(id=d.name, tag=tag, status=status, created_at=f"2026-01-01T00:00:{second:02d}+00:00",
                    exp_dir=str(d), error=error, summary=summary)
    save_run(rec)
    return rec


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def with_window(project: Path, window: int) -> None:
    with open(project / ".moectl.toml", "a") as fh:
        fh.write(f"\n[metrics]\nwindow = {window}\n")


def test_export_writes_both_tables(project, artifact_root, tmp_path):
    with_window(project, WINDOW)
    a_steps = steps_of(12, seed=1)
    a = make_run(artifact_root, "static_cap1p0", 1, a_steps)
    # A CPU run that failed: no MFU, no drops, a multi-line log tail as its error.
    b_steps = [StepMetrics(step=i, loss=9.0 - i / 10.0, dt_ms=100.0 + i, tok_per_sec=5000.0 + i, elapsed_s=0.1 * (i + 1))
               for i in range(3)]
    b = make_run(artifact_root, "cpu", 2, b_steps, status="failed",
                 error="[rank0]: Traceback (most recent call last):\n[rank0]:   File \"train.py\", line 3\n"
                       "[rank0]: RuntimeError: CUDA error: out of memory\nexit code 1\n")
    out = tmp_path / "new" / "nested"  # created
    r = invoke("export", "static_cap1p0", "cpu", "--csv", str(out), "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data == {"steps_csv": str((out / "steps.csv").resolve()), "summary_csv": str((out / "summary.csv").resolve()),
                    "runs": 2, "step_rows": 15, "without_steps": []}
    assert sorted(p.name for p in out.iterdir()) == ["steps.csv", "summary.csv"]  # no temp files left

    header, rows = read_csv(out / "steps.csv")
    assert header == STEPS_HEADER and len(rows) == 15
    assert [r["run"] for r in rows] == [a.id] * 12 + [b.id] * 3
    assert [int(r["step"]) for r in rows] == list(range(12)) + list(range(3))
    assert float(rows[4]["loss"]) == a_steps[4].loss and float(rows[4]["lr"]) == a_steps[4].lr  # exact floats
    assert rows[13]["mfu"] == "" and rows[13]["drop_frac"] == "" and float(rows[13]["tok_per_sec"]) == 5001.0

    header, rows = read_csv(out / "summary.csv")
    assert header == SUMMARY_HEADER and [r["run"] for r in rows] == [a.id, b.id]
    ra, rb = rows
    # The SPEC §7 rule by hand: of 12 steps, steps 0-9 are warm-up, so the window of 5 holds the
    # two clean steps 10 and 11.
    tail = a_steps[10:]
    assert ra["tag"] == "static_cap1p0" and ra["status"] == "completed" and ra["steps"] == "12" and ra["window"] == "5"
    assert (ra["warmup_steps"], ra["window_steps"], ra["clean"]) == ("10", "2", "true")
    assert float(ra["tok_per_sec"]) == pytest.approx((tail[0].tok_per_sec + tail[1].tok_per_sec) / 2, rel=1e-12)
    assert float(ra["dt_ms"]) == pytest.approx((tail[0].dt_ms + tail[1].dt_ms) / 2, rel=1e-12)
    assert float(ra["mfu"]) == pytest.approx((tail[0].mfu + tail[1].mfu) / 2, rel=1e-12)
    assert float(ra["drop_frac"]) == pytest.approx((tail[0].drop_frac + tail[1].drop_frac) / 2, rel=1e-12)
    assert float(ra["expert_load_max"]) == pytest.approx((tail[0].expert_load_max + tail[1].expert_load_max) / 2, rel=1e-11)  # 12 digits
    assert float(ra["peak_mem_mib"]) == 1028.0 and float(ra["final_loss"]) == a_steps[-1].loss
    assert float(ra["total_time_min"]) == pytest.approx(a_steps[-1].elapsed_s / 60.0, rel=1e-12) and ra["error"] == ""
    assert rb["status"] == "failed" and rb["steps"] == "3" and rb["mfu"] == "" and rb["peak_mem_mib"] == ""
    # 3 steps, all warm-up: the figures cover what exists, and say they are not clean.
    assert float(rb["tok_per_sec"]) == 5001.0  # (5000 + 5001 + 5002) / 3
    assert (rb["warmup_steps"], rb["window_steps"], rb["clean"]) == ("10", "3", "false")
    assert rb["error"] == "[rank0]: RuntimeError: CUDA error: out of memory"


def test_export_round_trips_through_import(project, artifact_root, tmp_path):
    with_window(project, WINDOW)
    orig_steps = steps_of(WARMUP + 9, seed=3)
    orig = make_run(artifact_root, "bufreuse", 1, orig_steps)
    make_run(artifact_root, "other", 2, steps_of(4, seed=5))
    first = tmp_path / "first"
    assert invoke("export", "bufreuse", "other", "--csv", str(first)).exit_code == 0

    # Import one run of the multi-run steps.csv back into the store, then export both again.
    r = invoke("import", str(first / "steps.csv"), "--format", "csv", "--run", orig.id, "--name", "roundtrip", "--json")
    assert r.exit_code == 0, r.output
    imported = json.loads(r.stdout)
    assert imported["skipped"] == 0
    second = tmp_path / "second"
    assert invoke("export", orig.id, "roundtrip", "--csv", str(second)).exit_code == 0

    _, rows = read_csv(second / "summary.csv")
    metrics = ["steps", "tok_per_sec", "dt_ms", "mfu", "peak_mem_mib", "total_time_min", "final_loss", "drop_frac", "expert_load_max",
               "window",
               "warmup_steps", "window_steps", "clean"]
    assert {k: rows[0][k] for k in metrics} == {k: rows[1][k] for k in metrics}  # the same tail summary
    assert rows[1]["status"] == "imported" and float(rows[1]["tok_per_sec"]) == pytest.approx(
        sum(s.tok_per_sec for s in orig_steps[-WINDOW:]) / WINDOW, rel=1e-12)
    # The record import_run wrote says the same as the recomputed summary.
    rec_summary = imported["summary"]
    assert rec_summary["tok_per_sec"] == pytest.approx(float(rows[0]["tok_per_sec"]), rel=1e-12)
    assert rec_summary["mfu"] == pytest.approx(float(rows[0]["mfu"]), rel=1e-12)
    # And every per-step value came back bit for bit.
    _, step_rows = read_csv(second / "steps.csv")
    by_run: dict[str, list[dict[str, str]]] = {}
    for row in step_rows:
        by_run.setdefault(row.pop("run"), []).append(row)
    assert by_run[orig.id] == by_run[imported["id"]] and len(by_run[orig.id]) == WARMUP + 9


def test_export_run_without_metrics_uses_its_record_and_replaces_files(project, artifact_root, tmp_path):
    recorded = Summary(window=50, steps=40, tok_per_sec=123.5, dt_ms=7.25, final_loss=4.5)
    make_run(artifact_root, "gone", 1, None, status="interrupted", error="interrupted by SIGINT\n[rank0]: KeyboardInterrupt",
             summary=recorded)
    make_run(artifact_root, "kept", 2, steps_of(3, seed=0))
    out = tmp_path / "out"
    assert invoke("export", "gone", "kept", "--csv", str(out)).exit_code == 0
    r = invoke("export", "gone", "--csv", str(out))  # the same DIR again: both files replaced
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [str((out / "steps.csv").resolve()), str((out / "summary.csv").resolve())]
    assert "warning:" in r.stderr and "no metrics steps" in r.stderr
    header, steps = read_csv(out / "steps.csv")
    assert header == STEPS_HEADER and steps == []
    _, rows = read_csv(out / "summary.csv")
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "interrupted" and row["error"] == "interrupted by SIGINT"
    assert row["window"] == "50" and row["steps"] == "40" and float(row["tok_per_sec"]) == 123.5 and row["mfu"] == ""
    # A record from before warm-up existed: nothing was left out, and it reads as clean.
    assert (row["warmup_steps"], row["window_steps"], row["clean"]) == ("0", "40", "true")


def test_export_errors_exit_2_one_line(project, artifact_root, tmp_path):
    make_run(artifact_root, "a", 1, steps_of(3, seed=0))
    out = tmp_path / "out"
    r = invoke("export", "a", "nosuchrun", "--csv", str(out))
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "no run matches 'nosuchrun'" in r.stderr
    assert not out.exists()  # nothing written when any run is unknown
    afile = tmp_path / "file.csv"
    afile.write_text("x\n")
    r = invoke("export", "a", "--csv", str(afile))
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "must be a directory" in r.stderr
    assert invoke("export", "a").exit_code == 2  # --csv is required
    assert "Traceback" not in r.output and afile.read_text() == "x\n"
    # A summary.csv that cannot be replaced (a directory in its place): the old steps.csv stays too,
    # never a steps.csv of these runs beside a summary of others; the error names the file, not a temp.
    pair = tmp_path / "pair"
    assert invoke("export", "a", "--csv", str(pair)).exit_code == 0
    old_steps = (pair / "steps.csv").read_text()
    (pair / "summary.csv").unlink()
    (pair / "summary.csv").mkdir()
    make_run(artifact_root, "b", 2, steps_of(5, seed=1))
    r = invoke("export", "b", "--csv", str(pair))
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and str(pair / "summary.csv") in r.stderr
    assert ".tmp" not in r.stderr and (pair / "steps.csv").read_text() == old_steps
    assert sorted(p.name for p in pair.iterdir()) == ["steps.csv", "summary.csv"]  # no temp file left
    # ... and the other way round: a steps.csv that cannot be replaced left summary.csv replaced
    (pair / "summary.csv").rmdir()
    assert invoke("export", "a", "--csv", str(pair)).exit_code == 0
    old_summary = (pair / "summary.csv").read_text()
    (pair / "steps.csv").unlink()
    (pair / "steps.csv").mkdir()
    r = invoke("export", "b", "--csv", str(pair))
    assert r.exit_code == 2 and str(pair / "steps.csv") in r.stderr and "nothing was written" in r.stderr
    assert (pair / "summary.csv").read_text() == old_summary


def test_the_error_of_a_worker_killed_without_a_word_is_torchruns_report_not_a_progress_line():
    from moectl.export import error_line

    tail = ("step 00139/03000 (4.67%) | loss: 3.100000 | dt: 50.00ms\n"
            "step 00140/03000 (4.70%) | loss: 3.090000 | dt: 50.00ms\n"
            "[E torch/distributed/elastic/multiprocessing/api.py] failed (exitcode: -9) local_rank: 0 (pid: 77) of binary: python")
    assert error_line(tail).endswith("failed (exitcode: -9) local_rank: 0 (pid: 77) of binary: python")
    assert error_line("interrupted by SIGINT") == "interrupted by SIGINT"


def test_an_exported_run_imports_with_its_run_wide_peak_and_total_time(project, artifact_root, tmp_path):
    # The engine's summary line holds the run-wide peak and total time (the final eval and save
    # included), above any step's: steps.csv cannot carry them, summary.csv beside it does.
    steps = steps_of(6, seed=2)
    orig = make_run(artifact_root, "peaky", 1, steps, status="failed")  # steps only; its summary line next
    with open(Path(orig.exp_dir) / METRICS_FILENAME, "a") as fh:
        fh.write(to_line(RunSummary(steps=6, world_size=1, peak_mem_mib=1234.5, total_time_s=42.0,
                                    final_loss=steps[-1].loss)) + "\n")
    out = tmp_path / "exp"
    assert invoke("export", orig.id, "--csv", str(out)).exit_code == 0
    r = invoke("import", str(out / "steps.csv"), "--format", "csv", "--run", orig.id, "--name", "back", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)["summary"]
    assert s["peak_mem_mib"] == 1234.5 and s["total_time_min"] == pytest.approx(42.0 / 60, rel=1e-12)
    # A steps.csv alone (renamed, or no summary.csv beside it): the figures its steps give, as before.
    alone = tmp_path / "alone" / "steps.csv"
    alone.parent.mkdir()
    alone.write_bytes((out / "steps.csv").read_bytes())
    r = invoke("import", str(alone), "--format", "csv", "--run", orig.id, "--name", "alone", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["summary"]["peak_mem_mib"] == max(x.peak_mem_mib for x in steps)
