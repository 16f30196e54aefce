"""A researcher's own trainer through a real `moectl run` (issue 10): tests/fixtures/foreign_trainer.py
printing like nanoGPT (a script, under both launchers) and like nanochat (a module, 2 ranks under
torchrun), its stdout parsed live into metrics.jsonl; no step line, a pattern that never matches,
and Ctrl-C mid-run. Real git repositories, real torchrun, real signals.
"""
from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.schema import RunSummary, StartInfo, StepMetrics, parse_line
from moectl.cli import app
from tests.conftest import git, steps_written, stop_process, wait_for
from tests.test_run import QUIET, REPO, commit_config, commit_files, record, run_dirs
from tests.test_run_signals import spawn

FIXTURE = REPO / "tests" / "fixtures" / "foreign_trainer.py"
runner = CliRunner()

NANOGPT_TOML = '''[project]
name = "gpt"
branch = "main"
venv = ""

[launch]
script = "train.py"
launcher = "{launcher}"
args = ["config/train_small.py", "--device=cpu"]
env = {{ OMP_NUM_THREADS = "1" }}

[launch.options]
steps = "--max_iters={{}}"
seed = "--seed={{}}"

[metrics]
source = "stdout"
format = "regex"
step = 'iter (\\d+):'
tokens_per_step = 'tokens per iteration will be: ([\\d,]+)'

[metrics.patterns]
loss = 'loss ([\\d.]+)'
dt_ms = 'time ([\\d.]+)ms'
mfu = '{mfu}'
'''

NANOCHAT_TOML = f'''[project]
name = "chat"
branch = "main"
venv = ""

[launch]
module = "tests.fixtures.foreign_trainer"
launcher = "torchrun"
args = ["--style=nanochat"]
env = {{ PYTHONPATH = "{REPO}", OMP_NUM_THREADS = "1" }}

[launch.options]
steps = "--num_iterations={{}}"
seed = "--seed={{}}"

[metrics]
source = "stdout"
format = "nanochat"
'''


def nanogpt_project(repo: Path, monkeypatch, launcher: str = "python", mfu: str = r"mfu (-?[\d.]+)%") -> Path:
    """The repo holds the trainer itself (train.py), committed, as a researcher's would."""
    shutil.copy(FIXTURE, repo / "train.py")
    (repo / ".moectl.toml").write_text(NANOGPT_TOML.format(launcher=launcher, mfu=mfu))
    git(repo, "add", "train.py")
    return commit_config(repo, monkeypatch)


def spawn_held(repo: Path, tmp_path: Path, hold_at: int, *args: str):
    """`moectl run ARGS` of the fixture trainer, held before step `hold_at` until the returned gate
    file exists: returns (process, its output file, the gate) once the trainer is waiting there."""
    gate, out = tmp_path / "gate", tmp_path / "moectl.out"
    proc = spawn(repo, out, "--device", "cpu", *args, *QUIET, "--", f"--hold_at={hold_at}", f"--hold_file={gate}")
    try:
        wait_for(lambda: Path(str(gate) + ".waiting").exists(), f"the trainer holding before step {hold_at}", 120,
                 proc=proc, output=out.read_text)
    except BaseException:
        stop_process(proc)
        raise
    return proc, out, gate


def steps_in(run_dir: Path) -> list[StepMetrics]:
    return [r for r in map(parse_line, (run_dir / "metrics.jsonl").read_text().splitlines()) if isinstance(r, StepMetrics)]


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_nanogpt_script_runs_under_either_launcher_and_is_measured_like_the_engine(git_repo, monkeypatch, artifact_root, launcher):
    proj = nanogpt_project(git_repo, monkeypatch, launcher)
    result = runner.invoke(app, ["run", "--device", "cpu", "--steps", "20", "--seed", "4", "--tag", "gpt", *QUIET])
    assert result.exit_code == 0, result.output
    [exp] = run_dirs(artifact_root)
    rec = record(exp)
    assert rec["status"] == "completed" and rec["warnings"] == []
    assert not (exp / "trainer_script").exists()  # a committed script: HEAD holds it, no copy
    assert "progress: step 20/20 (100.0%)" in result.output  # live progress from the parsed lines
    argv = rec["argv"]
    assert ("torch.distributed.run" in argv) == (launcher == "torchrun")
    assert argv[argv.index("train.py"):] == ["train.py", "config/train_small.py", "--device=cpu", "--max_iters=20", "--seed=4"]
    lines = [parse_line(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert isinstance(lines[0], StartInfo) and lines[0].steps == 20 and isinstance(lines[-1], RunSummary)
    steps = steps_in(exp)
    assert [s.step for s in steps] == list(range(20))
    # tok/sec from `tokens per iteration` / dt, and the summary over steps 10-19 (10 warm-up steps).
    assert steps[-1].tok_per_sec == pytest.approx(16384 / (steps[-1].dt_ms / 1000))
    tail = steps[10:]
    assert rec["summary"]["steps"] == 10
    assert rec["summary"]["tok_per_sec"] == pytest.approx(sum(s.tok_per_sec for s in tail) / 10)
    assert rec["summary"]["final_loss"] == steps[-1].loss
    report = next((proj / "reports").glob("*.md"))
    assert report.relative_to(proj).as_posix() in commit_files(proj)


def test_a_trainer_counting_steps_from_1_is_shown_and_summarised_as_the_steps_it_ran(git_repo, monkeypatch, artifact_root):
    """`iter 1` .. `iter 20` of `--steps 20`: progress said `step 2/20` after the first step and
    `step 21 (past the planned 20)` after the last, and the warm-up (steps numbered below 10) left
    out 9 steps of it, not 10: step 10, the tenth step, was in every tail mean."""
    nanogpt_project(git_repo, monkeypatch)
    result = runner.invoke(app, ["run", "--device", "cpu", "--steps", "20", "--no-commit", *QUIET, "--", "--first_step=1"])
    assert result.exit_code == 0, result.output
    [exp] = run_dirs(artifact_root)
    steps = steps_in(exp)
    assert [s.step for s in steps] == list(range(1, 21))  # the trainer's own numbers, as it printed them
    progress = [ln for ln in result.output.splitlines() if ln.startswith("progress: step")]
    assert progress[0].startswith("progress: step 1/20 (5.0%)") and progress[-1].startswith("progress: step 20/20 (100.0%)")
    assert "past the planned" not in result.output
    rec = record(exp)
    assert rec["status"] == "completed" and rec["warnings"] == []
    tail = steps[10:]  # steps 11-20: the ten past its first ten
    assert (rec["summary"]["run_steps"], rec["summary"]["steps"], rec["summary"]["clean"]) == (20, 10, True)
    assert rec["summary"]["tok_per_sec"] == pytest.approx(sum(s.tok_per_sec for s in tail) / 10)
    assert rec["summary"]["note"] == "10 clean steps (< window 50) after 10 warm-up steps"


def test_nanochat_module_under_torchrun_two_ranks_parses_rank0_steps_only(git_repo, monkeypatch, artifact_root):
    (git_repo / ".moectl.toml").write_text(NANOCHAT_TOML)
    commit_config(git_repo, monkeypatch)
    result = runner.invoke(app, ["run", "--device", "cpu", "--nproc", "2", "--steps", "16", "--tag", "chat", *QUIET,
                                 "--", "--noise=1"])
    assert result.exit_code == 0, result.output
    [exp] = run_dirs(artifact_root)
    log = (exp / "train.log").read_text()
    # The decoys were printed (rank 1's prefixed line, the warning, the traceback, the partial line) ...
    assert "[rank1]: step 00099" in log and "Traceback" in log and log.rstrip().endswith("dt: 1.00ms")
    # ... and none of them became a step.
    steps = steps_in(exp)
    assert [s.step for s in steps] == list(range(16))
    rec = record(exp)
    assert rec["status"] == "completed" and rec["summary"]["peak_mem_mib"] == pytest.approx(1234.5)
    assert rec["summary"]["mfu"] == pytest.approx(sum(s.mfu for s in steps[10:]) / 6)


def test_a_trainer_printing_on_every_rank_is_measured_on_rank_0_alone(git_repo, monkeypatch, artifact_root):
    """Under torchrun every rank's print reaches moectl. Without rank prefixes, each step was
    recorded once per rank (20 steps for 10) and the final loss was whichever rank printed last."""
    (git_repo / "train.py").write_text(
        "import os, sys, time\nrank = int(os.environ['RANK'])\n"
        "for i in range(10):\n"  # one write per line: print() writes the text and its newline apart
        "    sys.stdout.write(f'step {i:05d}/00010 | loss: {2.0 + rank + i / 100:.4f} | dt: 10.00ms\\n')\n"
        "    sys.stdout.flush()\n"
        "    time.sleep(0.01)\n")
    (git_repo / ".moectl.toml").write_text(
        '[project]\nname = "ddp"\nbranch = "main"\nvenv = ""\n\n'
        '[launch]\nscript = "train.py"\nlauncher = "torchrun"\nenv = { OMP_NUM_THREADS = "1" }\n\n'
        '[metrics]\nsource = "stdout"\nformat = "nanochat"\nwarmup_steps = 0\n')
    git(git_repo, "add", "train.py")
    commit_config(git_repo, monkeypatch)
    result = runner.invoke(app, ["run", "--device", "cpu", "--nproc", "2", "--no-commit", *QUIET])
    assert result.exit_code == 0, result.output
    [exp] = run_dirs(artifact_root)
    assert [(s.step, s.loss) for s in steps_in(exp)] == [(i, 2.0 + i / 100) for i in range(10)]
    rec = record(exp)
    assert rec["summary"]["steps"] == 10 and rec["summary"]["final_loss"] == pytest.approx(2.09)
    log = (exp / "train.log").read_text()
    assert "[rank1]:step 00009/00010 | loss: 3.0900" in log  # rank 1 printed, and was left out


@pytest.mark.parametrize("where", ["ignored", "outside"])
def test_a_trainer_script_git_does_not_hold_is_copied_into_the_run(git_repo, monkeypatch, artifact_root, tmp_path, where):
    """SPEC §1 "record what ran": a git-ignored script (scratch/) or one outside the repository is in
    no commit and no git.diff, so the run keeps a copy and its git.diff's first line says so."""
    if where == "ignored":
        (git_repo / ".gitignore").write_text("scratch/\n")
        git(git_repo, "add", ".gitignore")
        script = git_repo / "scratch" / "train.py"
    else:
        script = tmp_path / "elsewhere" / "train.py"
    script.parent.mkdir()
    script.write_text("print('step 0 | loss: 2.0 | dt: 10ms')\nprint('step 1 | loss: 1.5 | dt: 10ms')\n")
    (git_repo / ".moectl.toml").write_text(
        f'[project]\nname = "own"\nbranch = "main"\nvenv = ""\n\n[launch]\nscript = "{script}"\nlauncher = "python"\n\n'
        '[metrics]\nsource = "stdout"\nformat = "nanochat"\n')
    commit_config(git_repo, monkeypatch)
    result = runner.invoke(app, ["run", "--device", "cpu", "--no-commit", *QUIET])
    assert result.exit_code == 0, result.output
    [exp] = run_dirs(artifact_root)
    assert (exp / "trainer_script" / "train.py").read_text() == script.read_text()
    why = "ignored by git" if where == "ignored" else "outside the repository"
    assert (exp / "git.diff").read_text().splitlines()[0] == (
        f"# moectl: the trainer script {script} is {why}, so no diff holds it: its copy is trainer_script/train.py")


def test_a_trainer_that_prints_no_step_line_fails_with_that_reason(git_repo, monkeypatch, artifact_root):
    nanogpt_project(git_repo, monkeypatch)
    result = runner.invoke(app, ["run", "--device", "cpu", "--steps", "5", "--no-commit", *QUIET, "--", "--print_steps=0"])
    assert result.exit_code == 4, result.output
    rec = record(run_dirs(artifact_root)[0])
    assert rec["status"] == "failed" and rec["exit_code"] == 0
    assert rec["error"].startswith("no step line in the trainer's output matched (step pattern 'iter (\\\\d+):')")
    # the reason on screen, above the log tail (which printed more than 5 lines and is not it)
    assert "  error: no step line in the trainer's output matched (step pattern 'iter (\\\\d+):')\n  log tail:\n" in result.output


def test_a_trainer_that_prints_nothing_says_why_under_error_not_under_log_tail(git_repo, monkeypatch, artifact_root):
    (git_repo / "train.py").write_text("pass\n")
    (git_repo / ".moectl.toml").write_text(
        '[project]\nname = "own"\nbranch = "main"\nvenv = ""\n\n[launch]\nscript = "train.py"\nlauncher = "python"\n\n'
        '[metrics]\nsource = "stdout"\nformat = "nanochat"\n')
    git(git_repo, "add", "train.py")
    commit_config(git_repo, monkeypatch)
    result = runner.invoke(app, ["run", "--device", "cpu", "--no-commit", *QUIET])
    assert result.exit_code == 4, result.output
    assert "  error: no step line in the trainer's output matched (nanochat step lines)" in result.output
    assert "log tail" not in result.output


def run_own_jsonl_trainer(repo: Path, monkeypatch, script: str):
    """`moectl run` of `script`, committed as train.py: a trainer of the user's own under the python
    launcher that writes its own metrics.jsonl (source = "jsonl") into the --out directory it is given."""
    (repo / "train.py").write_text(script)
    (repo / ".moectl.toml").write_text(
        '[project]\nname = "own"\nbranch = "main"\nvenv = ""\n\n[launch]\nscript = "train.py"\nlauncher = "python"\n\n'
        '[launch.options]\nout_dir = "--out {}"\n\n[metrics]\nsource = "jsonl"\n')
    git(repo, "add", "train.py")
    commit_config(repo, monkeypatch)
    return runner.invoke(app, ["run", "--device", "cpu", "--no-commit", *QUIET])


def test_a_trainer_writing_its_own_metrics_jsonl_in_another_schema_fails(git_repo, monkeypatch, artifact_root):
    """source = "jsonl" with a trainer of the user's own: a metrics.jsonl of lines that are not the
    schema's (or none) measured nothing. It was `completed`, exit 0, with a note on skipped lines."""
    result = run_own_jsonl_trainer(git_repo, monkeypatch,
                                   "import json, sys\n"
                                   "with open(sys.argv[sys.argv.index('--out') + 1] + '/metrics.jsonl', 'w') as fh:\n"
                                   "    for i in range(3):\n"
                                   "        fh.write(json.dumps({'iteration': i, 'train_loss': 2.0}) + '\\n')\n"
                                   "print('done')\n")
    assert result.exit_code == 4, result.output
    rec = record(run_dirs(artifact_root)[0])
    assert rec["status"] == "failed" and rec["exit_code"] == 0
    assert rec["error"].startswith("the trainer exited 0 but its metrics.jsonl holds no step "
                                   "(3 lines skipped: not the metrics schema of engine/schema.py)"), rec["error"]


def test_a_failing_trainer_that_printed_only_blank_lines_fails_with_its_exit_code(git_repo, monkeypatch, artifact_root):
    """Its log tail was blank (colour resets stripped), and the outcome's reason line indexed an
    empty list: an IndexError, exit 1, instead of the failure, exit 4."""
    result = run_own_jsonl_trainer(git_repo, monkeypatch, "import sys\nprint('\\x1b[0m')\nprint()\nsys.exit(5)\n")
    assert result.exit_code == 4, result.output
    rec = record(run_dirs(artifact_root)[0])
    assert rec["status"] == "failed" and rec["exit_code"] == 5 and rec["error"] == "the trainer exited with 5"


def test_a_pattern_that_never_matches_is_a_warning_in_record_report_and_show(git_repo, monkeypatch, artifact_root):
    proj = nanogpt_project(git_repo, monkeypatch, mfu=r"MFU=([\d.]+)")
    result = runner.invoke(app, ["run", "--device", "cpu", "--steps", "12", "--tag", "typo", *QUIET])
    assert result.exit_code == 0, result.output
    rec = record(run_dirs(artifact_root)[0])
    [warning] = rec["warnings"]
    assert warning.startswith("metrics pattern mfu = 'MFU=([\\\\d.]+)' never matched any of 12 step lines")
    assert rec["summary"]["mfu"] is None and rec["summary"]["tok_per_sec"] is not None
    assert warning in next((proj / "reports").glob("*.md")).read_text()
    shown = runner.invoke(app, ["show", "typo"])
    assert f"warning: {warning}" in shown.output


def test_a_foreign_trainer_printing_loss_nan_completes_diverged_with_every_step_counted(git_repo, monkeypatch,
                                                                                      artifact_root):
    """nanoGPT prints `loss nan` once it diverges; the project's pattern is `loss ([\\d.]+)`."""
    proj = nanogpt_project(git_repo, monkeypatch)
    result = runner.invoke(app, ["run", "--device", "cpu", "--steps", "15", "--tag", "nan", *QUIET, "--", "--nan_from=12"])
    assert result.exit_code == 0, result.output
    assert "progress: finished 15 steps" in result.output
    rec = record(run_dirs(artifact_root)[0])
    assert rec["status"] == "completed"
    steps = steps_in(run_dirs(artifact_root)[0])
    assert [s.step for s in steps] == list(range(15)) and [s.step for s in steps if s.loss != s.loss] == [12, 13, 14]
    s = rec["summary"]
    assert s["steps"] == 5 and s["final_loss"] is None and s["loss_not_finite_from"] == 12
    assert s["dt_ms"] == pytest.approx(sum(x.dt_ms for x in steps[10:]) / 5)  # the NaN-loss steps are timed too
    [warning] = rec["warnings"]  # the diverged loss, not "step lines could not be read"
    assert warning.startswith("loss not finite from step 12 (diverged): 3 of 15 steps")
    assert warning in next((proj / "reports").glob("*.md")).read_text()


TQDM_TOML = f'''[project]
name = "bar"
branch = "main"
venv = ""

[launch]
module = "tests.fixtures.foreign_trainer"
launcher = "python"
args = ["--style=tqdm"]
env = {{ PYTHONPATH = "{REPO}" }}

[launch.options]
steps = "--max_iters={{}}"

[metrics]
source = "stdout"
format = "regex"
step = '\\| (\\d+)/\\d+ \\['

[metrics.patterns]
loss = 'loss=([\\d.]+)'
dt_ms = 'dt=([\\d.]+)ms'
'''


def test_a_progress_bar_redrawn_with_carriage_returns_is_read_bar_by_bar_as_it_is_drawn(git_repo, monkeypatch,
                                                                                       artifact_root, tmp_path):
    # tqdm / Lightning: one line, redrawn per step with `\r`, its newline only at the very end. Read
    # per newline, the run had one step (the last bar) and no live progress.
    (git_repo / ".moectl.toml").write_text(TQDM_TOML)
    commit_config(git_repo, monkeypatch)
    proc, out, gate = spawn_held(git_repo, tmp_path, 12, "--steps", "20", "--tag", "bar")
    try:
        [exp] = run_dirs(artifact_root)
        # Bars 0-10 are whole (each ended by the next one's `\r`); bar 11 waits for the one after it.
        wait_for(lambda: len(steps_written(exp / "metrics.jsonl")) >= 11, "bars parsed while the bar is still drawn", 60,
                 proc=proc, output=out.read_text)
        assert b"\n" not in (exp / "train.log").read_bytes().split(b"| 0/20", 1)[1]  # no newline was printed yet
        # `status` names the trainer's run directory too (it takes no --out-dir: $MOECTL_RUN_DIR)
        listed = __import__("json").loads(runner.invoke(app, ["status", "--json"]).stdout)["training_processes"]
        assert str(exp) in [p["run_dir"] for p in listed], listed
        gate.touch()
        assert proc.wait(timeout=60) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            stop_process(proc)
    steps = steps_in(exp)
    assert [s.step for s in steps] == list(range(20))  # each once: the refreshes of steps 0, 5, ... are no new steps
    rec = record(exp)
    assert rec["status"] == "completed" and rec["summary"]["steps"] == 10 and rec["warnings"] == []
    assert rec["summary"]["dt_ms"] == pytest.approx(sum(s.dt_ms for s in steps[10:]) / 10)
    assert (exp / "train.log").read_bytes().count(b"\r") == 20 + 4  # the log holds the bytes as printed


SPAWNER = """\
import subprocess, sys, time
from pathlib import Path
# the trainer's own helper process (a data loader, say), one that ignores SIGTERM: killed after the grace
helper = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                           "time.sleep(300)"])
Path(sys.argv[-1]).write_text(str(helper.pid))  # after the template's args and flags
step = 0
while True:
    print(f"iter {step}: loss {1.0 / (step + 1):.4f}, time 10.00ms", flush=True)
    step += 1
    time.sleep(0.05)
"""


@pytest.mark.slow
def test_a_killed_moectl_takes_a_python_launched_trainers_own_children_with_it(git_repo, monkeypatch, artifact_root,
                                                                               tmp_path):
    # moectl's SIGTERM on its death reaches its own child only: with `launcher = "python"` that was
    # the trainer, and its children ran on unrecorded. Under torchrun, torchrun stops its workers' groups.
    import psutil

    nanogpt_project(git_repo, monkeypatch, launcher="python")
    (git_repo / "train.py").write_text(SPAWNER)
    git(git_repo, "commit", "-qam", "a trainer with a helper process")
    helper_pid, out = tmp_path / "helper.pid", tmp_path / "moectl.out"
    proc = spawn(git_repo, out, "--device", "cpu", "--tag", "k9", *QUIET, "--", str(helper_pid))
    helper = None
    try:
        wait_for(helper_pid.exists, "the trainer's helper process", 60, proc=proc, output=out.read_text)
        wait_for(lambda: helper_pid.read_text().strip(), "its pid written", 10, proc=proc, output=out.read_text)
        helper = psutil.Process(int(helper_pid.read_text()))
        [exp] = run_dirs(artifact_root)
        wait_for(lambda: len(steps_written(exp / "metrics.jsonl")) >= 3, "steps parsed", 60, proc=proc,
                 output=out.read_text)
        proc.kill()  # SIGKILL: moectl says nothing more
        proc.wait(timeout=30)
        helper.wait(timeout=60)  # gone with the trainer (psutil.TimeoutExpired if it lives on)
    finally:
        if proc.poll() is None:
            stop_process(proc)
        if helper is not None and helper.is_running():
            helper.kill()
    r = runner.invoke(app, ["runs", "--json"])
    assert [x["status"] for x in __import__("json").loads(r.stdout)] == ["interrupted"]


def test_a_python_launched_trainer_killed_by_sigkill_is_recorded_so_without_a_supervisor_traceback(
        git_repo, monkeypatch, artifact_root):
    # The OOM killer's SIGKILL: the supervisor re-raised it with signal.signal(SIGKILL, ...), which
    # Python refuses (OSError): the run read as exit 1 with the supervisor's traceback in its log.
    nanogpt_project(git_repo, monkeypatch, launcher="python")
    (git_repo / "train.py").write_text("import os, signal\nprint('iter 0: loss 1.0, time 1.00ms', flush=True)\n"
                                       "os.kill(os.getpid(), signal.SIGKILL)\n")
    git(git_repo, "commit", "-qam", "a trainer the OOM killer takes")
    r = runner.invoke(app, ["run", "--device", "cpu", "--tag", "oom", *QUIET])
    assert r.exit_code == 4, r.output
    rec = record(run_dirs(artifact_root)[0])
    assert (rec["status"], rec["exit_code"]) == ("failed", -9) and "Traceback" not in (rec["error"] or "")


@pytest.mark.slow
def test_sigint_mid_run_of_a_foreign_trainer(git_repo, monkeypatch, artifact_root, tmp_path):
    nanogpt_project(git_repo, monkeypatch, launcher="torchrun")
    proc, out, gate = spawn_held(git_repo, tmp_path, 15, "--steps", "200", "--tag", "stopped")
    try:
        [exp] = run_dirs(artifact_root)
        wait_for(lambda: len(steps_written(exp / "metrics.jsonl")) == 15, "steps 0-14 parsed into metrics.jsonl", 60, proc=proc,
                 output=out.read_text)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)  # bounds a hang; orders nothing
    finally:
        if proc.poll() is None:
            stop_process(proc)
    assert rc == 130, out.read_text()
    rec = record(exp)
    assert rec["status"] == "interrupted" and rec["error"].startswith("interrupted by SIGINT")
    steps = steps_in(exp)
    assert [s.step for s in steps] == list(range(15))
    assert rec["summary"]["steps"] == 5  # steps 10-14: the metrics so far, summarised
    assert rec["summary"]["dt_ms"] == pytest.approx(sum(s.dt_ms for s in steps[10:]) / 5)


def test_a_trainer_writing_its_own_metrics_jsonl_into_the_run_directory_keeps_moectls_apart(
        git_repo, monkeypatch, artifact_root):
    # $MOECTL_RUN_DIR is where the trainer may write its files, and metrics.jsonl a common name for
    # one: it truncated moectl's stdout-parsed metrics midway (steps and start line gone, its own
    # lines mixed in, `show` counting them malformed) while the run said `completed`.
    nanogpt_project(git_repo, monkeypatch)
    result = runner.invoke(app, ["run", "--device", "cpu", "--steps", "20", "--tag", "own", *QUIET,
                                 "--", "--own_metrics=1"])
    assert result.exit_code == 0, result.output
    [exp] = run_dirs(artifact_root)
    lines = [parse_line(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert isinstance(lines[0], StartInfo) and isinstance(lines[-1], RunSummary)
    assert [s.step for s in lines if isinstance(s, StepMetrics)] == list(range(20))
    theirs = (exp / "metrics.trainer.jsonl").read_text()
    assert '{"iter": 10, "train_loss"' in theirs and '{"iter": 19, "train_loss"' in theirs
    rec = record(exp)
    assert rec["status"] == "completed" and rec["summary"]["steps"] == 10
    assert rec["warnings"] == ["metrics.jsonl was written by the trainer too (it writes into the run directory, "
                               "$MOECTL_RUN_DIR): the trainer's file is kept as metrics.trainer.jsonl and moectl's is "
                               "put back; have the trainer write its files elsewhere or under other names"]
