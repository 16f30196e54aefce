"""`moectl init`, `moectl status`, `moectl check`: parse -> call the library -> render.

The library modules (config, probes, guards, plan) are imported inside the commands so that
`moectl --help` stays fast; none of them imports torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moectl.cli.common import app, handle_errors, print_json, stdout
from moectl.cli.options import (
    PATH,
    BalanceOpt, BalanceRateOpt, BaselineOpt, CapOpt, CompileOpt, ConfigOpt, DetachOpt, DeviceOpt, DispatchOpt,
    DryRunOpt, EpOpt, ExpDirOpt, ExtraArgs, Fp8Opt, JsonOpt, NoCommitOpt, NodesOpt, NotesOpt, NprocOpt, OverrideOpt,
    PresetOpt, QuietOpt, RepeatOpt, RequeueOpt, SeedOpt, SlurmOpt, StepsOpt, TagOpt, WaitGpusOpt, request_kwargs,
)
from moectl.errors import EXIT_GUARD, EXIT_OK


@app.command()
@handle_errors
def init(
    directory: Annotated[Path, typer.Argument(parser=PATH, help="Where to write .moectl.toml.")] = Path("."),
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing .moectl.toml, keeping the old one as .moectl.toml.bak "
                        "(.bak.1, .bak.2, ... when that exists: no backup is ever overwritten).")] = False,
    trainer: Annotated[str, typer.Option(
        "--trainer", help="engine | nanochat | nanogpt: the \\[launch]/\\[metrics] tables of that trainer, "
                          "commented, as a starting point.")] = "engine",
) -> None:
    """Write a commented [bold].moectl.toml[/bold] (every default, explained). Refuses to
    overwrite one (exit 2) unless --force, which keeps the old file as a .bak beside it.

    Example:  [bold]moectl init[/bold]   then edit project.branch and paths.artifact_root.
    Example:  [bold]moectl init --trainer nanogpt[/bold]   guard and measure nanoGPT's train.py (stdout parsed).
    Example:  [bold]moectl init --trainer nanochat[/bold]   nanochat's scripts.base_train under torchrun.
    Example:  [bold]moectl init --force[/bold]   start over; the old config is in .moectl.toml.bak.
    """
    import sys

    from moectl.config import CONFIG_NAME, overwrite_template, template_for, write_template

    template_for(trainer)  # an unknown trainer is a usage error before anything is touched
    repo, branch = _repository_of(directory)
    if force:
        path, backup = overwrite_template(directory, trainer, branch)
    else:
        path, backup = write_template(directory, trainer, branch), None
    out = lambda text: stdout.print(text, markup=False)  # noqa: E731
    out(f"wrote {path}" + (f" (the old one is now {backup})" if backup else ""))
    # What stands between this file and a first run, found now rather than by a refused `run`.
    steps = []
    if repo is None:
        steps.append("this directory is not in a git repository: moectl runs and commits reports in one "
                     "(`git init`, then a first commit)")
    elif branch and branch != "main":
        steps.append(f'project.branch is "{branch}", this repository\'s branch: runs on any other are refused')
    if not (path.parent / ".venv").exists():
        steps.append('project.venv ".venv" is not here: point it at the venv that has torch, or set venv = "" '
                     f"for this python ({sys.executable})")
    if repo is not None:
        steps.append(f"commit it (`git add {CONFIG_NAME} && git commit -m 'moectl config'`): until then every run "
                     "is recorded dirty, with the config in its git.diff")
    steps.append("`moectl check` shows every guard's verdict before a first `moectl run`")
    out("next:")
    for step in steps:
        out(f"  - {step}")


def _repository_of(directory: Path):
    """(the git repository holding `directory`, its current branch) - (None, None) outside one."""
    from moectl import gitops
    from moectl.errors import MoectlError

    try:
        repo = gitops.repo_root(Path(directory).absolute())
        return repo, gitops.current_branch(repo)
    except (MoectlError, OSError):
        return None, None


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _render_status(s: dict) -> None:
    # Plain lines through print(), not rich: nothing here is styled, and a rich Console costs
    # ~30 ms of start-up in the command people run in a loop (docs/benchmarks.md).
    out = print
    if s["config"]:
        out(f"config      {s['config']}")
    else:
        out(f"config      {s['config_error'] or 'none'}")
    out(f"artifacts   {s['artifact_root']}")
    if s["gpus"] is None:
        fake = f" (a FAKE reading from MOECTL_FAKE_NVML={s['nvml_fake']})" if s.get("nvml_fake") else ""
        out(f"GPUs        NVML unavailable: {s['nvml_error']}{fake}")
    elif not s["gpus"]:
        out("GPUs        none visible")
    else:
        fake = f"; a FAKE reading from MOECTL_FAKE_NVML={s['nvml_fake']}" if s.get("nvml_fake") else ""
        out(f"GPUs        {len(s['gpus'])} (driver {s.get('driver') or '?'}{fake})")
        for g in s["gpus"]:
            if g.get("error"):
                out(f"  [{g['index']}] {g['name']}  error: {g['error']}")
                continue
            procs = ", ".join(f"{p['pid']} {p['name']}".strip() for p in g.get("processes") or []) or "no processes"

            def num(v, f):  # a field NVML (or a fake file) did not give: `?`, never a crash
                return "?" if v is None else format(v, f)

            out(f"  [{g['index']}] {g.get('name') or '?'}  util {num(g.get('util_pct'), 'g')}%  "
                f"mem {num(g.get('mem_used_mib'), '.0f')}/{num(g.get('mem_total_mib'), '.0f')} MiB  {procs}")
    procs = s["training_processes"]
    out(f"training    {len(procs) or 'none'}")
    for p in procs:
        out(f"  pid {p['pid']}  {_age(p['age_s'])}  {p['run_dir'] or '-'}  {p['cmdline'][:120]}")
    lock = s["lock"]
    if lock is None:
        out("lock        free")
    else:
        state = f"STALE ({lock['reason']})" if lock["stale"] else "held"
        if lock["pid"] is None and lock["run_id"] is None:  # a file nobody can be named from
            out(f"lock        {state}: {lock['path']}" + (f" ({lock['reason']})" if not lock["stale"] and lock["reason"] else ""))
        else:
            from moectl.lock import held_for  # (imported already: collect_status read the lock)

            what = held_for(lock["run_id"], lock.get("sweep"), lock.get("leg"))
            out(f"lock        {state}: pid {lock['pid']} on {lock['host']}, {what}, since {lock['started_at']}")
    g = s["git"]
    if g["error"]:
        out(f"git         {g['error']}")
    else:
        branch = g["branch"] or f"detached at {(g['head'] or '?')[:10]}"
        want = g["expected_branch"]
        verdict = "" if want is None else (" (expected)" if want in ("*", g["branch"]) else f" (EXPECTED {want})")
        busy = f", {g['in_progress']} in progress" if g["in_progress"] else ""
        out(f"git         {branch}{verdict}{busy}: {g['dirty']} modified, {g['staged']} staged, {g['untracked']} untracked")
    if g.get("index_lock"):
        out(f"git lock    {g['index_lock']}")
    v = s["venv"]
    torch = {True: "torch ok", False: "NO torch", None: "torch unknown"}[v["has_torch"]]
    where = "" if v["in_venv"] or not v["exists"] else " (not in a venv)"
    out(f"venv        {v['python']}{where}: {'exists' if v['exists'] else 'MISSING'}, {torch}")
    if s.get("slurm_error"):
        out(f"slurm       {s['slurm_error']}")
    elif s.get("slurm_jobs") is not None:
        jobs = s["slurm_jobs"]
        out(f"slurm       {len(jobs) or 'no'} moectl job(s) in the queue")
        for j in jobs:
            where = f"  ({j['where']})" if j["where"] else ""
            out(f"  job {j['job_id']}  {j['state']}  {j['nodes']} node(s)  {j['elapsed']}  {j['run_id']}{where}")
    runs = s["recent_runs"]
    if runs is None:
        out("recent runs: unavailable" + (f" ({s['recent_runs_error']})" if s.get("recent_runs_error") else ""))
    else:
        out(f"recent runs {len(runs) or 'none'}")
        for r in runs:
            tps = (r.get("summary") or {}).get("tok_per_sec")
            warm = (r.get("summary") or {}).get("clean") is False  # no step past the warm-up
            out(f"  {r['id']}  {r['status']}" + (f"  {tps:,.0f} tok/s" + ("† (warm-up only)" if warm else "") if tps else ""))
    for line in s.get("unreadable_runs") or []:
        out(f"  unreadable: {line}")


@app.command()
@handle_errors
def status(json_out: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Show GPUs (NVML), training processes, the run lock, git state, the venv and recent runs.

    A .git/index.lock is named (`git lock`); one a killed moectl left is first finished or undone,
    as the next moectl commit would do, so git works again and the counts are true.

    Always exits 0: a missing config or NVML is part of the status, not an error.

    Example:  [bold]moectl status --json[/bold]
    """
    from moectl.probes import collect_status

    s = collect_status(config)
    if json_out:
        print_json(s)
    else:
        _render_status(s)


def check_json(plan, results, ok: bool) -> dict:
    """`moectl check --json` (SPEC §7a: `ok`, `guards`), also what `run --dry-run --json` prints."""
    from moectl.plan import command_text

    failing = next((r for r in results if not (r.ok or r.overridden)), None)
    return {
        "ok": ok,
        # As every error document has them (`check` and `run --dry-run` exit 3 when a guard refuses).
        "exit_code": EXIT_OK if ok else EXIT_GUARD,
        "error": None if ok or failing is None else f"refused: {failing.name}: {failing.message}",
        "guards": [
            {"name": r.name, "ok": r.ok, "message": r.message, "overridable": r.overridable,
             "overridden": r.overridden, "skipped": r.skipped}
            for r in results
        ],
        "run_id": plan.run_id,
        "exp_dir": plan.exp_dir,
        "command": command_text(plan),  # one shell line: env additions, then the argv
        "argv": plan.argv,
        "env": plan.env,
    }


def check_error_json(exc) -> dict:
    """`check --json` / `run --dry-run --json` when there is nothing to judge (exit 2): still the
    contract's `ok` and `guards`, so a script reading stdout learns why. A config that cannot be
    found or validated is the first guard failing (SPEC §5); bad options judge no guard."""
    from moectl.cli.common import error_json
    from moectl.errors import ConfigError

    message = "; ".join([exc.message, *exc.lines])
    guards = [{"name": "config", "ok": False, "message": message, "overridable": False, "overridden": False,
               "skipped": False}] if isinstance(exc, ConfigError) else []
    return {"ok": False, "guards": guards, **error_json(message, exc.exit_code)}


def show_check(cfg, request, *, json_out: bool, slurm: bool = False, nodes: int = 1) -> bool:
    """Every guard for `request`, printed as `check` prints them (the table or --json); whether they
    pass. `slurm`: the node's guards (gpus_idle, the run lock) are the job's to judge, on its node;
    `nodes`: the nodes it spans."""
    from moectl.guards import check_request, passed

    plan, _obs, results = check_request(cfg, request, nodes=nodes, data_here=not slurm)
    where = None
    if slurm:
        from moectl.execution import deferred_to_job

        results = deferred_to_job(results)
        plan, where = job_view(cfg, plan, nodes)
    ok = passed(results)
    if json_out:
        print_json({**check_json(plan, results, ok), **({"command_where": where} if where else {})})
    else:
        _render_check(plan, results, ok, where=where)
    return ok


def job_view(cfg, plan, nodes: int):
    """(the plan as its Slurm job will run it, where it runs): several nodes run one torchrun each
    under srun, meeting at the first node; every job runs from its code snapshot (moectl/job.py)."""
    from pathlib import Path

    from moectl.slurm import FIRST_NODE, JOB_ID, RDZV_PORT_SPAN, job_argv_preview

    argv = job_argv_preview(plan.argv, nnodes=nodes, port=cfg.cluster.rdzv_port)
    where = f"in the Slurm job, from its code snapshot {Path(plan.exp_dir) / 'code'}"
    if nodes > 1:
        where += (f"; {FIRST_NODE} and {JOB_ID} are the job's, known once it starts; it meets at port "
                  f"{cfg.cluster.rdzv_port} + ({JOB_ID} mod {RDZV_PORT_SPAN})")
    return plan.model_copy(update={"argv": argv}), where


def _render_check(plan, results, ok: bool, where: str | None = None) -> None:
    """Every guard with its message, the command, then the one-line verdict: what `check`, `run
    --dry-run` and a refused `run` print (a `run` that starts prints only the verdict line)."""
    from rich.table import Table

    from moectl.guards import summary_line
    from moectl.plan import command_text

    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("guard")
    table.add_column("result")
    table.add_column("message", overflow="fold")
    for r in results:
        if r.overridden:
            verdict = "[yellow]overridden[/yellow]"
        elif r.skipped:
            verdict = "[dim]skipped[/dim]"
        else:
            verdict = "[green]ok[/green]" if r.ok else "[red]FAIL[/red]"
        table.add_row(r.name, verdict, r.message.replace("[", "\\["))
    stdout.print(table)
    stdout.print(f"run {plan.run_id} -> {plan.exp_dir}", markup=False)
    stdout.print(f"command ({where}): {command_text(plan)}" if where else f"command: {command_text(plan)}", markup=False)
    stdout.print(summary_line(results), markup=False)
    if not ok:
        stdout.print("refused: fix the FAIL lines above", markup=False)


@app.command()
@handle_errors
def check(
    cap: CapOpt = None,
    tag: TagOpt = None,
    compile: CompileOpt = None,
    fp8: Fp8Opt = None,
    dispatch: DispatchOpt = None,
    balance: BalanceOpt = None,
    balance_rate: BalanceRateOpt = None,
    ep: EpOpt = None,
    steps: StepsOpt = None,
    seed: SeedOpt = None,
    preset: PresetOpt = None,
    device: DeviceOpt = None,
    nproc: NprocOpt = None,
    exp_dir: ExpDirOpt = None,
    wait_gpus: WaitGpusOpt = None,
    override: OverrideOpt = None,
    no_commit: NoCommitOpt = False,
    dry_run: DryRunOpt = False,
    baseline: BaselineOpt = None,
    notes: NotesOpt = None,
    quiet: QuietOpt = False,
    slurm: SlurmOpt = False,
    nodes: NodesOpt = None,
    detach: DetachOpt = False,
    requeue: RequeueOpt = False,
    repeat: RepeatOpt = 1,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
    extra: ExtraArgs = None,
) -> None:
    """Evaluate every guard for a run with these options; launch nothing, write nothing.

    Prints every guard with its message, the exact command, and a one-line verdict
    (`guards: 7 passed, gpus_idle skipped (cpu run: ...)`). Exit 0 when every guard passes (an overridden one counts as passing), 3 otherwise;
    2 for bad options or config (nothing to judge yet), as `moectl run` would say; --json then prints
    `ok` false with the failing `config` guard (none for a bad option) and the `error`.
    Takes every `moectl run` option, so `run` can become `check` on the same line: it judges what
    `moectl run --dry-run` judges (the first repeat of --repeat N; a --baseline that names no run is
    an error). --wait-gpus is not waited on: check looks once, now.
    With --slurm or `\\[cluster] backend = "slurm"`, gpus_idle and no_other_training read `skipped`: each job checks them on its node.

    Example:  [bold]moectl check --cap 1.0 --compile static --device cpu -- --seed 1[/bold]
    """
    from moectl import store
    from moectl.config import load_config
    from moectl.errors import MoectlError
    from moectl.plan import make_request

    try:
        request = make_request(**request_kwargs(
            cap=cap, tag=tag, compile=compile, fp8=fp8, dispatch=dispatch, steps=steps, preset=preset,
            device=device, nproc=nproc, exp_dir=exp_dir, wait_gpus=wait_gpus, override=override, extra=extra, seed=seed,
            balance=balance, balance_rate=balance_rate, ep=ep, no_commit=no_commit, notes=notes,
        ))
        cfg = load_config(config)
        if baseline:
            from moectl.gitops import same_repository
            from moectl.repeats import resolve_baseline

            resolve_baseline(cfg.artifact_root, baseline, ours=same_repository(cfg.root))  # the run would refuse a baseline it cannot find
        ok = check_as_run(cfg, request, slurm=slurm, nodes=nodes, detach=detach, requeue=requeue, repeat=repeat,
                          json_out=json_out)
    except MoectlError as exc:  # a usage error, or a guard's probe that could not look (still a check document)
        if json_out:
            print_json(check_error_json(exc))
        raise
    if not ok:
        raise typer.Exit(EXIT_GUARD)


def check_as_run(cfg, request, *, slurm: bool, nodes, detach: bool, requeue: bool, repeat: int, json_out: bool) -> bool:
    """What `moectl check` and `moectl run --dry-run` judge, printed as `check` prints it; whether
    every guard passes. The run's backend decides which guards are the job's (Slurm); its Slurm-only
    flags without Slurm, or --nodes below 1, are usage errors; --repeat N shows its first repeat
    (whose seed goes through the trainer's mapping)."""
    from moectl.cli.cluster import slurm_flags_need_slurm
    from moectl.errors import UsageError
    from moectl.execution import choose_backend
    from moectl.repeats import repeat_requests

    on_slurm = choose_backend(cfg, slurm) == "slurm"
    if not on_slurm:
        slurm_flags_need_slurm(nodes=nodes, detach=detach, requeue=requeue)
    elif nodes is not None and nodes < 1:
        raise UsageError(f"--nodes: must be at least 1 (got {nodes})")
    else:
        from moectl import slurm as slurm_tools

        slurm_tools.require()  # as the run would: no job can be submitted from here
    if repeat > 1:
        request = repeat_requests(cfg, request, repeat)[1][0]
    spans = (nodes if nodes is not None else cfg.cluster.nodes) if on_slurm else 1
    return show_check(cfg, request, json_out=json_out, slurm=on_slurm, nodes=spans)
