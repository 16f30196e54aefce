"""--balance loss|bias|none: DeepSeek-V3's aux-loss-free bias against the Switch loss and nothing."""
import pytest
import torch

from engine.moe import MoEConfig, MoELayer, route
from engine.train import main
from tests.test_train import read_metrics

D, H, E = 32, 64, 4


def skewed_layer(balance: str, top_k: int = 1, rate: float = 3e-3) -> MoELayer:
    """A router that sends most tokens to expert 0: feature 0 is ~3 for every token (see skewed_x)
    and only expert 0 reads it, so its logit beats the others' by ~3 on average."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(dim=D, n_experts=E, top_k=top_k, expert_hidden=H, cap=0.0, balance=balance,
                               balance_rate=rate, z_coeff=0.0))
    with torch.no_grad():
        layer.router.weight.mul_(0.3)
        layer.router.weight[:, 0] = 0.0
        layer.router.weight[0, 0] = 1.0
        torch.nn.init.normal_(layer.w_down_EHD, std=H**-0.5)
    return layer


def skewed_x(gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(8, 64, D, generator=gen)
    x[..., 0] += 3.0
    return x


def max_load_share(aux) -> float:
    """The busiest expert's share of the assignments (1/E when perfectly balanced)."""
    return float(aux.tokens_per_expert_E.max()) / aux.assignments


@pytest.mark.parametrize("top_k", [1, 2])
def test_bias_brings_the_busiest_expert_toward_one_over_e(top_k):
    layer, gen = skewed_layer("bias", top_k), torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-3)
    shares = []
    for _ in range(300):  # tiny training steps: the router learns too, the bias must still win
        out, aux = layer(skewed_x(gen))
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        layer.update_expert_bias(aux.tokens_per_expert_E)
        shares.append(max_load_share(aux))
    start, end = shares[0], sum(shares[-50:]) / 50
    # top-1: nearly every token on expert 0 at first; top-2: expert 0 is in nearly every pair (share -> 1/2).
    assert start > (0.8 if top_k == 1 else 0.45), start
    # 512 tokens a step: sampling noise alone keeps the busiest of 4 experts near 0.27.
    assert end < 1 / E + 0.08, (start, end)
    assert layer.expert_bias_E.grad is None and not layer.expert_bias_E.requires_grad
    assert "expert_bias_E" in layer.state_dict() and all(p is not layer.expert_bias_E for p in layer.parameters())
    assert float(layer.expert_bias_E[0]) < 0 < float(layer.expert_bias_E[1:].min())  # expert 0 pushed down


def test_without_the_bias_the_skew_stays():
    """The control for the test above: `none` on the same router and data does not balance."""
    layer, gen = skewed_layer("none"), torch.Generator().manual_seed(1)
    for _ in range(50):
        _, aux = layer(skewed_x(gen))
        layer.update_expert_bias(aux.tokens_per_expert_E)  # a no-op without the bias buffer
    assert max_load_share(aux) > 0.8 and layer.expert_bias_E is None


def test_bias_changes_the_choice_not_the_gate_weights():
    torch.manual_seed(0)
    x_ND, w_ED = torch.randn(50, D), torch.randn(E, D) * 0.3
    probs_NE = (x_ND @ w_ED.T).softmax(-1)
    bias_E = torch.tensor([-10.0, 0.0, 0.0, 10.0])  # expert 3 always chosen, expert 0 never
    weights_NK, experts_NK, counts_E, loss = route(x_ND, w_ED, 2, 0.0, 0.0, bias_E)
    assert (experts_NK == 3).any(dim=1).all() and not (experts_NK == 0).any()
    gathered = probs_NE.gather(1, experts_NK)
    torch.testing.assert_close(weights_NK, gathered / gathered.sum(1, keepdim=True))
    assert counts_E.tolist() == [int((experts_NK == e).sum()) for e in range(E)] and float(loss) == 0.0


def test_router_grad_flows_and_never_reaches_the_bias():
    layer = skewed_layer("bias")
    layer.expert_bias_E.copy_(torch.tensor([-0.5, 0.2, 0.2, 0.1]))
    out, aux = layer(skewed_x(torch.Generator().manual_seed(2)).requires_grad_())
    (out.square().sum() + aux.loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0  # through the gate weights
    assert layer.expert_bias_E.grad is None


def test_none_and_loss_route_alike_and_differ_only_in_the_loss():
    x = torch.randn(2, 16, D)
    layers = {b: skewed_layer(b) for b in ("loss", "none")}
    for layer in layers.values():
        layer.cfg.balance_coeff = 0.01
    out_loss, aux_loss = layers["loss"](x)
    out_none, aux_none = layers["none"](x)
    torch.testing.assert_close(out_loss, out_none, rtol=0, atol=0)
    assert float(aux_none.loss.detach()) == 0.0 and float(aux_loss.loss.detach()) > 0
    # `loss` keeps the seed's state dict: checkpoints written before --balance existed still load.
    assert "expert_bias_E" not in layers["loss"].state_dict()


def test_train_with_bias_records_the_option_and_carries_the_bias(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert main(["--preset", "tiny", "--steps", "6", "--balance", "bias", "--balance-rate", "0.01",
                 "--out-dir", str(tmp_path), "--ckpt-dir", str(ckpt)]) == 0
    starts, steps, _ = read_metrics(tmp_path)
    assert starts[0].config["balance"] == "bias" and starts[0].config["balance_rate"] == 0.01
    assert all(s.aux_loss == 0.0 for s in steps)  # no Switch loss (z-loss is off in tiny)
    state = torch.load(ckpt / "model_000006.pt", weights_only=False)["model"]
    biases = [v for k, v in state.items() if k.endswith("expert_bias_E")]
    assert len(biases) == 2 and all(b.abs().sum() > 0 for b in biases)  # 6 updates moved them


@pytest.mark.parametrize("argv,needle", [
    (["--balance", "aux"], "invalid choice"),
    (["--balance", "bias", "--balance-rate", "0"], "--balance-rate must be > 0"),
])
def test_bad_balance_options_exit_2(argv, needle, capsys):
    assert main(["--preset", "tiny", "--steps", "1", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
