"""`moectl plot` and `moectl.plot.plot_runs`: real PNGs read back with matplotlib and checked pixel by
pixel, runs written to an isolated artifact root (MOECTL_ARTIFACT_ROOT), a real .moectl.toml (cwd)."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from engine.schema import METRICS_FILENAME, StepMetrics, to_line
from moectl.cli import app
from moectl.errors import UsageError
from moectl.plot import MISSING_MATPLOTLIB, PLOT_METRICS, make_plot, plot_runs
from moectl.records import RunRecord
from moectl.store import create_run_dir, load_run, run_id, save_run

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
# matplotlib's default colour cycle: the first two lines of a figure.
C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)


def invoke(*args: str):
    return runner.invoke(app, list(args))


def make_run(root: Path, tag: str, second: int, n: int = 30, speed: float = 1.0, mfu: bool = True,
             first: int = 0) -> RunRecord:
    """A completed run whose first step (0, or 1 for a trainer counting from 1) is a slow compile
    step, then a steady state around `speed`."""
    d = create_run_dir(root / run_id("moe", tag, datetime(2026, 1, 1, 0, 0, second)))
    steps = [
        StepMetrics(step=i, loss=10.0 - 6.0 * i / n, dt_ms=9000.0 if i == first else 650.0 / speed + (i % 3),
                    tok_per_sec=(60_000.0 if i == first else 800_000.0 * speed - 500.0 * (i % 4)),
                    mfu=(0.7 if i == first else 9.7 * speed) if mfu else None, elapsed_s=float(i))
        for i in range(first, first + n)
    ]
    (d / METRICS_FILENAME).write_text("".join(to_line(s) + "\n" for s in steps))
    rec = RunRecord(id=d.name, tag=tag, status="completed", created_at=f"2026-01-01T00:00:{second:02d}+00:00",
                    exp_dir=str(d))
    save_run(rec)
    return load_run(d)


def pixels(path: Path) -> np.ndarray:
    img = imread(path)  # float RGBA in [0, 1]
    return np.round(img[..., :3] * 255).astype(int)


def count_colour(rgb: np.ndarray, colour: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(rgb - np.array(colour)).max(axis=-1) <= tol).sum())


@pytest.mark.parametrize("command", ["plot", "export"])
def test_help_has_an_example(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0 and "Example" in r.stdout and f"moectl {command}" in r.stdout


def test_plot_writes_a_real_png_with_one_line_per_run(project, artifact_root, tmp_path):
    make_run(artifact_root, "static_cap1p0", 1)
    make_run(artifact_root, "bufreuse", 2, speed=1.03)
    out = tmp_path / "figs" / "tok.png"  # directory does not exist yet
    r = invoke("plot", "static_cap1p0", "bufreuse", "--metric", "tok_per_sec", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert Path(data["path"]) == out.resolve() and data["metric"] == "tok_per_sec"
    assert [rid.rsplit("-", 1)[1] for rid in data["runs"]] == ["static_cap1p0", "bufreuse"]
    assert data["skipped"] == [] and data["off_scale"] == 2  # step 0 of each run is the compile step

    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    rgb = pixels(out)
    assert rgb.shape[0] >= 400 and rgb.shape[1] >= 800  # a readable figure, not a thumbnail
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50  # text, grid, antialiased lines: not one colour
    # Both lines are drawn: each run's colour covers a long stretch of the plot area (legend swatches
    # alone are ~60 pixels). The steady-state values fill the fitted range, so neither is flattened.
    assert count_colour(rgb, C0) > 400 and count_colour(rgb, C1) > 400
    assert not list(out.parent.glob(".*tmp"))  # the atomic write left no temp file


def test_plot_default_output_is_metric_png_in_cwd_and_text_output(project, artifact_root):
    make_run(artifact_root, "a", 1)
    r = invoke("plot", "a")  # --metric defaults to loss
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str((project / "loss.png").resolve())
    assert count_colour(pixels(project / "loss.png"), C0) > 400
    # Again, with a loss.png there (someone's own, say): a new name, never that file replaced.
    mine = (project / "loss.png").read_bytes()
    r = invoke("plot", "a")
    assert r.exit_code == 0 and r.stdout.strip() == str((project / "loss-2.png").resolve())
    assert (project / "loss.png").read_bytes() == mine
    # -o names the file: that one is replaced, as asked
    assert invoke("plot", "a", "-o", str(project / "loss.png"), "--metric", "tok_per_sec").exit_code == 0
    assert (project / "loss.png").read_bytes() != mine


def test_plot_into_an_existing_directory_puts_the_default_name_inside_it(project, artifact_root, tmp_path):
    make_run(artifact_root, "a", 1)
    figs = tmp_path / "figs.png"  # a directory, whatever its name says
    figs.mkdir()
    r = invoke("plot", "a", "--metric", "tok_per_sec", "-o", str(figs))
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str((figs / "tok_per_sec.png").resolve())
    assert (figs / "tok_per_sec.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = invoke("plot", "a", "--metric", "tok_per_sec", "-o", f"{figs}/")  # never replaced: a file nobody named
    assert r.exit_code == 0 and r.stdout.strip() == str((figs / "tok_per_sec-2.png").resolve())


def test_a_title_matplotlib_cannot_lay_out_is_one_line_and_a_dollar_sign_can_be_escaped(project, artifact_root,
                                                                                          tmp_path):
    make_run(artifact_root, "a", 1)
    out = tmp_path / "t.png"
    r = invoke("plot", "a", "-o", str(out), "--title", "speed $\\frac$ x")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: --title 'speed $\\\\frac$ x': matplotlib cannot draw it (") and "write `\\$`" in r.stderr
    assert not out.exists()
    r = invoke("plot", "a", "-o", str(out), "--title", "cost \\$5, $\\alpha$ = 0.1")
    assert r.exit_code == 0 and out.is_file(), r.output


def test_plot_and_export_never_write_into_a_read_only_tree(project, artifact_root, tmp_path):
    make_run(artifact_root, "a", 1)
    ro = tmp_path / "frozen"
    ro.mkdir()
    with open(project / ".moectl.toml", "a") as fh:
        fh.write(f'\n[paths]\nread_only = ["{ro}"]\n')
    for args, what in ((["plot", "a", "-o", str(ro / "x.png")], "the figure"), (["export", "a", "--csv", str(ro / "csv")], "--csv")):
        r = invoke(*args)
        assert r.exit_code == 3, r.output
        assert f"{what} {ro}" in r.stderr and "inside read-only tree" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(ro.iterdir()) == []


def test_run_without_the_metric_is_skipped_with_a_warning(project, artifact_root, tmp_path):
    make_run(artifact_root, "gpu", 1)
    cpu = make_run(artifact_root, "cpu", 2, mfu=False)  # a CPU run: no peak FLOPs, no MFU
    r = invoke("plot", "gpu", "cpu", "-m", "mfu", "-o", str(tmp_path / "mfu.png"))
    assert r.exit_code == 0, r.output
    assert r.stderr.startswith("warning: ") and cpu.id in r.stderr and "no mfu values" in r.stderr
    rgb = pixels(tmp_path / "mfu.png")
    assert count_colour(rgb, C0) > 400 and count_colour(rgb, C1) == 0  # one line only

    r = invoke("plot", "cpu", "-m", "mfu", "-o", str(tmp_path / "none.png"))
    assert r.exit_code == 2 and r.stderr.startswith("error: no run has mfu values")
    assert "Traceback" not in r.output and not (tmp_path / "none.png").exists()


def test_a_run_whose_loss_is_never_finite_is_warned_about_once(artifact_root):
    """All NaN: one line (left out, and from which step), not two (also "not finite at 5 of 5")."""
    from moectl.plot import collect_series

    rec = make_run(artifact_root, "nan", 3, n=5)
    path = Path(rec.exp_dir) / METRICS_FILENAME
    path.write_text("".join(to_line(StepMetrics(step=i, loss=float("nan"), dt_ms=1.0)) + "\n" for i in range(5)))
    series, warnings = collect_series([rec], "loss")
    assert series == [] and warnings == [f"{rec.id}: no finite loss values in 5 steps (not finite from step 0); "
                                         "left out of the loss plot"]


def test_bad_metric_and_unknown_run_exit_2_one_line(project, artifact_root, tmp_path):
    make_run(artifact_root, "a", 1)
    r = invoke("plot", "a", "--metric", "speed", "-o", str(tmp_path / "x.png"))
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "unknown metric 'speed'" in r.stderr and all(m in r.stderr for m in PLOT_METRICS)
    r = invoke("plot", "nosuchrun", "-o", str(tmp_path / "x.png"))
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "no run matches 'nosuchrun'" in r.stderr
    r = invoke("plot", "a", "-o", str(tmp_path / "x.nope"))
    assert r.exit_code == 2 and "cannot write 'x.nope'" in r.stderr
    assert "Traceback" not in r.output and not list(tmp_path.glob("x.*"))


def test_plot_runs_library_api_for_sweeps(artifact_root, tmp_path):
    runs = [make_run(artifact_root, "leg1", 1), make_run(artifact_root, "leg1", 2, speed=1.05), make_run(artifact_root, "leg2", 3, mfu=False)]
    warnings: list[str] = []
    out = plot_runs(runs, "mfu", tmp_path / "reports" / "figures" / "capacity_mfu.png", title="capacity: MFU",
                    warn=warnings.append)
    assert out == tmp_path / "reports" / "figures" / "capacity_mfu.png" and out.is_file()
    assert len(warnings) == 1 and runs[2].id in warnings[0]
    # two runs sharing a tag are labelled by id, so both lines are there
    rgb = pixels(out)
    assert count_colour(rgb, C0) > 400 and count_colour(rgb, C1) > 400
    svg = plot_runs(runs[:2], "loss", tmp_path / "loss.svg")  # the suffix picks the format
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and runs[0].id in text and runs[1].id in text
    with pytest.raises(UsageError, match="unknown metric"):
        plot_runs(runs, "tokens", tmp_path / "x.png")


def test_missing_matplotlib_is_a_clear_message(project, artifact_root, tmp_path):
    make_run(artifact_root, "a", 1)
    # A real interpreter where importing matplotlib fails, as on an install without the extra.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'matplotlib' or name.startswith('matplotlib.'):\n"
        "            raise ImportError('No module named ' + repr(name))\n"
        "sys.meta_path.insert(0, Block())\n"
        "from moectl.cli import main\n"
        f"sys.argv = ['moectl', 'plot', 'a', '-o', {str(tmp_path / 'a.png')!r}]\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=project,
                       env={**__import__("os").environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: {MISSING_MATPLOTLIB}" and not (tmp_path / "a.png").exists()


def test_cli_modules_import_neither_torch_nor_matplotlib():
    code = ("import sys, moectl.cli, moectl.plot, moectl.export\n"
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_step_axis_ticks_are_whole_numbers(artifact_root, tmp_path):
    # Steps 0-3: matplotlib's default locator would put ticks at 0.5, 1.5, ... (no such steps).
    runs = [make_run(artifact_root, "short", 1, n=3), make_run(artifact_root, "long", 2, n=4)]
    for metric in ("loss", "tok_per_sec"):
        result = make_plot(runs, metric, tmp_path / f"{metric}.png", warmup_steps=0)
        ax = result.figure.axes[0]
        lo, hi = ax.get_xlim()
        shown = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert len(shown) >= 3, shown
        assert all(float(t).is_integer() for t in ax.get_xticks()), ax.get_xticks()


def test_warmup_region_follows_the_configured_warmup_steps(project, artifact_root, tmp_path):
    make_run(artifact_root, "a", 1)  # 30 steps; step 0 is the compile step
    make_run(artifact_root, "b", 2, speed=1.03)
    with open(project / ".moectl.toml", "a") as fh:
        fh.write("\n[metrics]\nwarmup_steps = 4\n")
    out = tmp_path / "tok.png"
    r = invoke("plot", "a", "b", "--metric", "tok_per_sec", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["off_scale"] == 2  # only the compile steps leave the fitted range

    # The same figure through the library, to read the figure object: the shaded span covers
    # steps 0-3 (half a step either side), the legend and the off-scale note name them.
    runs = [load_run(p) for p in sorted(artifact_root.iterdir())]
    result = make_plot(runs, "tok_per_sec", out, warmup_steps=4)
    ax = result.figure.axes[0]
    [span] = [p for p in ax.patches if p.get_label().startswith("warm-up")]
    xs = [x for x, _ in span.get_path().transformed(span.get_patch_transform()).vertices]
    assert (min(xs), max(xs)) == (-0.5, 3.5)
    assert "warm-up: steps 0-3, not in summaries" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("steps 0-3 off scale" in t.get_text() for t in ax.texts)
    # The steady state sets the y range (its lowest point 800,000 - 3*500, its highest 1.03 * 800,000);
    # step 0 (60,000 tok/s) lies below it.
    lo, hi = ax.get_ylim()
    assert 60_000 < lo < 798_500 and hi > 824_000

    # Loss is not a tail mean: no shading there.
    loss_ax = make_plot(runs, "loss", tmp_path / "loss.png", warmup_steps=4).figure.axes[0]
    assert not [p for p in loss_ax.patches if p.get_label().startswith("warm-up")]


def test_plot_into_a_new_directory_named_with_a_trailing_slash_makes_it(project, artifact_root, tmp_path):
    # `-o figs/` names a directory as cp and mkdir read it; pathlib drops the slash, and the figure
    # was refused as "cannot write 'figs': use one of .eps, ..." (no suffix).
    make_run(artifact_root, "a", 1)
    figs = tmp_path / "new" / "figs"
    r = invoke("plot", "a", "--metric", "tok_per_sec", "-o", f"{figs}/")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str((figs / "tok_per_sec.png").resolve())
    assert (figs / "tok_per_sec.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # without the slash a name with no suffix is still a file name whose format is unknown
    r = invoke("plot", "a", "-o", str(tmp_path / "noext"))
    assert r.exit_code == 2 and "cannot write 'noext'" in r.output and not (tmp_path / "noext").exists()


def test_the_warmup_region_of_a_run_counting_from_1_covers_its_first_warmup_steps(artifact_root, tmp_path):
    # Its summaries leave out steps 1-4 of warm-up 4 (metrics.counted_from); the shading said 1-3.
    run = make_run(artifact_root, "one", 1, first=1)
    result = make_plot([run], "tok_per_sec", tmp_path / "tok.png", warmup_steps=4)
    ax = result.figure.axes[0]
    [span] = [p for p in ax.patches if p.get_label().startswith("warm-up")]
    xs = [x for x, _ in span.get_path().transformed(span.get_patch_transform()).vertices]
    assert (min(xs), max(xs)) == (0.5, 4.5)
    assert "warm-up: steps 1-4, not in summaries" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("steps 1-4 off scale" in t.get_text() for t in ax.texts) and result.off_scale == 1


def test_a_resumed_run_is_shaded_and_fitted_for_the_warm_up_after_its_resume(artifact_root, tmp_path):
    # Resumed at step 20 (a requeued Slurm job): the new process compiles at step 20 too, and its
    # summary leaves out steps 20-23 of warm-up 4. Only steps 0-3 were shaded, and the y range was
    # fitted around step 20's compile point as if it were steady.
    from dataclasses import replace

    from engine.schema import StartInfo

    run = make_run(artifact_root, "resumed", 2, n=40)
    path = Path(run.exp_dir) / METRICS_FILENAME
    lines = path.read_text().splitlines()
    start = StartInfo(steps=40, world_size=1, tokens_per_step=4096, device="cpu")
    recompiled = StepMetrics(step=20, loss=7.0, dt_ms=9000.0, tok_per_sec=60_000.0, mfu=0.7, elapsed_s=20.0)
    path.write_text("\n".join([to_line(start)] + lines[:20] + [to_line(replace(start, start_step=20)),
                                                               to_line(recompiled)] + lines[21:]) + "\n")
    result = make_plot([run], "tok_per_sec", tmp_path / "tok.png", warmup_steps=4)
    ax = result.figure.axes[0]
    spans = {p.get_label(): p for p in ax.patches if "warm-up" in p.get_label()}
    assert set(spans) == {"warm-up: steps 0-3, not in summaries",
                          "resumed: warm-up after its resume at step 20, steps 20-23"}  # (named: not every run's)
    span = spans["resumed: warm-up after its resume at step 20, steps 20-23"]
    xs = [x for x, _ in span.get_path().transformed(span.get_patch_transform()).vertices]
    assert (min(xs), max(xs)) == (19.5, 23.5)
    assert result.off_scale == 2 and ax.get_ylim()[0] > 60_000.0  # both compile steps, off the fitted range
    assert any("steps 0-3, 20-23 off scale" in t.get_text() for t in ax.texts)
