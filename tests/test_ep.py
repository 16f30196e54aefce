"""--ep N expert parallelism: real torchrun (gloo, CPU) against DDP, checkpoints across EP shapes.

EP changes where the expert GEMMs run, not what they compute: the losses of an EP run must be those
of the DDP run with the same ranks (fp32, within 1e-5), step by step."""
import subprocess
import sys

import pytest
import torch

from engine.train import main
from tests.test_train import ROOT, env, read_metrics

TINY_EXPERT_PARAMS = 2 * 4 * 2 * 64 * 128  # tiny: 2 MoE layers x 4 experts x (up + down) x dim 64 x hidden 128


def torchrun(nproc: int, *args: str, blocked: str = "1") -> subprocess.CompletedProcess:
    """blocked="0": the experts' bmm / _grouped_mm, as on CUDA, instead of CPU's engine.blocked_mlp."""
    return torchruns((nproc, args), blocked=blocked)[0]


def torchruns(*runs: tuple[int, tuple[str, ...]], blocked: str = "1") -> list[subprocess.CompletedProcess]:
    """Several independent `torchrun --standalone` runs side by side (each on a port of its own),
    each (nproc, args): a run spends much of its time starting and stopping processes, which
    the other's training fills. Returns them in order, once every one has exited 0."""
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(nproc), "-m", "engine.train", "--preset", "tiny", "--log-every", "100", *args],
                              cwd=ROOT, env=env(ENGINE_BLOCKED_MLP=blocked), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for nproc, args in runs]
    done = []
    try:
        for (_, args), proc in zip(runs, procs):
            out, err = proc.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
            assert proc.returncode == 0, (args, err[-3000:])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def losses(out_dir):
    _, steps, _ = read_metrics(out_dir)
    return [s.loss for s in steps], [s.drop_frac for s in steps]


@pytest.mark.slow
@pytest.mark.parametrize("cap,blocked", [("1.0", "1"), ("0", "1"), ("1.0", "0"), ("0", "0")],
                         ids=["padded", "grouped", "padded-bmm", "grouped-gmm"])  # padded drops tokens at cap 1.0
def test_ep2_over_two_ranks_gives_the_losses_of_ddp(tmp_path, cap, blocked):
    ddp, ep = tmp_path / "ddp", tmp_path / "ep"
    _, proc = torchruns((2, ("--steps", "20", "--cap", cap, "--out-dir", str(ddp))),
                        (2, ("--steps", "20", "--cap", cap, "--ep", "2", "--out-dir", str(ep))), blocked=blocked)
    ddp_loss, ddp_drop = losses(ddp)
    ep_loss, ep_drop = losses(ep)
    assert len(ep_loss) == 20 and ddp_loss[-1] < ddp_loss[0] - 1.5
    for step, (a, b) in enumerate(zip(ddp_loss, ep_loss)):
        assert abs(a - b) < 1e-5, (step, a, b)
    assert ep_drop == ddp_drop and (max(ep_drop) > 0) == (cap != "0")  # the capacity path really dropped
    starts, _, _ = read_metrics(ep)
    config = starts[0].config
    assert config["ep"] == 2 and config["expert_params_ddp"] == TINY_EXPERT_PARAMS
    assert config["expert_params_per_rank"] == TINY_EXPERT_PARAMS // 2
    assert f"expert params per rank {TINY_EXPERT_PARAMS // 2:,} = 1/2 of DDP's {TINY_EXPERT_PARAMS:,}" in proc.stdout


@pytest.mark.slow
def test_four_ranks_two_ep_groups_give_the_losses_of_ddp(tmp_path):
    """2 EP groups x 2: expert grads are summed across the groups' matching members."""
    ddp, ep = tmp_path / "ddp", tmp_path / "ep"
    common = ["--steps", "6", "--cap", "0", "--device-batch-size", "4"]
    torchruns((4, (*common, "--out-dir", str(ddp))), (4, (*common, "--ep", "2", "--out-dir", str(ep))))
    ddp_loss, ep_loss = losses(ddp)[0], losses(ep)[0]
    assert len(ep_loss) == 6 and ddp_loss[-1] < ddp_loss[0]
    for step, (a, b) in enumerate(zip(ddp_loss, ep_loss)):
        assert abs(a - b) < 1e-5, (step, a, b)


@pytest.mark.slow
def test_ep_checkpoint_holds_every_expert_and_resumes_under_ep_2_and_ep_1(tmp_path):
    ckpt = tmp_path / "ckpt"
    common = ["--steps", "8", "--cap", "1.0"]
    torchrun(2, *common, "--ep", "2", "--out-dir", str(tmp_path / "full"), "--ckpt-dir", str(ckpt), "--save-every", "4")
    state = torch.load(ckpt / "model_000004.pt", weights_only=False)
    assert state["model"]["blocks.0.mlp.w_up_EDH"].shape == (4, 64, 128)  # re-gathered: all 4 experts
    moments = state["optimizer"]["state"]
    assert {tuple(m["exp_avg"].shape) for m in moments.values()} >= {(4, 64, 128), (4, 128, 64)}
    full = losses(tmp_path / "full")[0]
    torchruns(*[(2, (*common, "--ep", ep, "--out-dir", str(tmp_path / f"resumed_ep{ep}"),
                     "--resume", str(ckpt / "model_000004.pt"), "--ckpt-dir", str(tmp_path / f"ckpt_ep{ep}")))
                for ep in ("2", "1")])
    # Only rank 0 held the gathered experts while saving (ExpertParallel.full_state), the resumed runs' own
    # saves included: each checkpoint still holds all of them, as an EP-1 run's does.
    for ep in ("2", "1"):
        again = torch.load(tmp_path / f"ckpt_ep{ep}" / "model_000008.pt", weights_only=False)
        assert again["model"]["blocks.0.mlp.w_up_EDH"].shape == (4, 64, 128)
    for ep in ("2", "1"):
        resumed = losses(tmp_path / f"resumed_ep{ep}")[0]
        assert len(resumed) == 4
        for step, (a, b) in enumerate(zip(full[4:], resumed), start=4):
            assert abs(a - b) < 1e-5, (ep, step, a, b)


@pytest.mark.parametrize("argv,needle", [
    (["--ep", "3"], "--ep 3 does not divide --n-experts 4"),
    (["--ep", "2"], "--ep 2 does not divide the world size 1"),
    (["--ep", "0"], "--ep must be >= 1"),
    (["--ep", "2", "--dense"], "--ep > 1 needs MoE layers"),
])
def test_bad_ep_is_one_line_exit_2(argv, needle, capsys):
    assert main(["--preset", "tiny", "--steps", "1", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


@pytest.mark.slow
def test_ep_under_compile_static_matches_eager(tmp_path):
    """The exchange is eager inside the compiled model (graph breaks at the collectives); grouped
    EP runs eager as a whole. Compiled and eager EP must agree step by step."""
    common = ["--steps", "4", "--cap", "0", "--ep", "2"]
    torchruns((2, (*common, "--out-dir", str(tmp_path / "eager"))),
              (2, (*common, "--compile", "static", "--out-dir", str(tmp_path / "compiled"))))
    eager, compiled = losses(tmp_path / "eager")[0], losses(tmp_path / "compiled")[0]
    assert len(compiled) == 4
    for step, (a, b) in enumerate(zip(eager, compiled)):
        assert abs(a - b) < 1e-4, (step, a, b)


def test_ep_full_state_gathers_to_rank_0_alone(tmp_path):
    """A save under EP gathered every expert and both AdamW moments onto every rank (all_gather):
    more expert memory per rank at a save than DDP holds. Now rank 0 alone receives them, one
    tensor at a time into host memory, and EP groups other than the first take no part."""
    script = tmp_path / "gather.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from engine.ep import ExpertParallel\n"
        "dist.init_process_group('gloo')\n"
        "ep = ExpertParallel.setup(2)\n"
        "rank = dist.get_rank()\n"
        "w = torch.full((2, 3), float(ep.index))  # this rank's 2 experts of 4\n"
        "m, o = ep.full_state({'w': w, 'b': torch.ones(1)}, ['w'], {'state': {0: {'exp_avg': w + 10, 'step': torch.tensor(1.)}}}, [0])\n"
        # Each rank's answer in a file of its own: four processes printing to one pipe can interleave
        # mid-line (seen once: `...11.0]rank 1: None` on one line).
        "said = 'None' if m is None else f'w {m[\"w\"][:, 0].tolist()} avg {o[\"state\"][0][\"exp_avg\"][:, 0].tolist()}'\n"
        f"open(f'{tmp_path}/rank{{rank}}.txt', 'w').write(said)\n"
        "dist.destroy_process_group()\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                           str(script)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(4)]
    assert said == ["w [0.0, 0.0, 1.0, 1.0] avg [10.0, 10.0, 11.0, 11.0]", "None", "None", "None"]
