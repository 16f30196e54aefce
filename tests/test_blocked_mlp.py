"""engine.blocked_mlp: the same values and grads as autograd's per-group chain, whatever the blocks."""
import pytest
import torch

import engine.blocked_mlp as blocked
from engine.blocked_mlp import blocked_ok, blocked_relu2_mlp, row_blocks


def reference(x_ND, w_up_GDH, w_down_GHD, rows_per_group):
    """Autograd's own relu(x @ w_up[g])² @ w_down[g], group by group."""
    outs, start = [], 0
    for g, n in enumerate(rows_per_group):
        outs.append(torch.relu(x_ND[start:start + n] @ w_up_GDH[g]).square() @ w_down_GHD[g])
        start += n
    return torch.cat(outs)


def operands(rows_per_group, D=6, H=10, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G, N = len(rows_per_group), sum(rows_per_group)
    x = torch.randn(N, D, generator=gen, dtype=dtype, requires_grad=True)
    w_up = torch.randn(G, D, H, generator=gen, dtype=dtype, requires_grad=True)
    w_down = torch.randn(G, H, D, generator=gen, dtype=dtype, requires_grad=True)
    return x, w_up, w_down


def grads_of(fn, x, w_up, w_down, rows, seed=1):
    for t in (x, w_up, w_down):
        t.grad = None
    out = fn(x, w_up, w_down, rows)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype))
    return out.detach(), x.grad, w_up.grad, w_down.grad


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of 3 rows (H=10 float64: 240 bytes), so groups of 7 and 5 rows span several blocks."""
    monkeypatch.setattr(blocked, "BLOCK_BYTES", 3 * 10 * 8)


def test_row_blocks_cut_groups_and_skip_empty_ones(tiny_blocks):
    assert row_blocks([7, 0, 3, 5], hidden=10, itemsize=8) == [(3, 0), (3, 0), (1, 0), (3, 2), (3, 3), (2, 3)]


@pytest.mark.parametrize("rows", [[7, 0, 3, 5], [4], [0, 0, 9]])
def test_values_and_grads_match_autograd_including_empty_and_multi_block_groups(tiny_blocks, rows):
    x, w_up, w_down = operands(rows)
    want = grads_of(reference, x, w_up, w_down, rows)
    got = grads_of(blocked_relu2_mlp, x, w_up, w_down, rows)
    for name, a, b in zip(("out", "x", "w_up", "w_down"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    for g, n in enumerate(rows):
        if n == 0:  # an expert nobody was routed to: exactly zero grads, not stale memory
            assert torch.count_nonzero(got[2][g]) == 0 and torch.count_nonzero(got[3][g]) == 0


def test_gradcheck(tiny_blocks):
    x, w_up, w_down = operands([4, 0, 5], D=3, H=5)
    assert torch.autograd.gradcheck(lambda *a: blocked_relu2_mlp(*a, [4, 0, 5]), (x, w_up, w_down))


def test_grads_write_every_element_whatever_the_fresh_buffers_hold(tiny_blocks, monkeypatch):
    """Forward and backward fill fresh buffers block by block (backward with beta=0 GEMMs) and zero
    the unused groups' grads: with NaN-filled "empty" buffers, nothing of them may survive."""
    real_empty_like, real_new_empty = torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: real_empty_like(t, **kw).fill_(float("nan")))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **kw: real_new_empty(t, *a, **kw).fill_(float("nan")))
    rows = [7, 0, 3, 5]
    x, w_up, w_down = operands(rows)
    for out_or_grad in grads_of(blocked_relu2_mlp, x, w_up, w_down, rows):
        assert torch.isfinite(out_or_grad).all()


def test_transposed_weights_get_grads_in_their_own_layout():
    """nn.Linear keeps [out, in]; passed as a transposed view the grads come back in that layout."""
    fc, proj = torch.nn.Linear(6, 10, bias=False).double(), torch.nn.Linear(10, 6, bias=False).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    out = blocked_relu2_mlp(x, fc.weight.t().unsqueeze(0), proj.weight.t().unsqueeze(0), [9])
    torch.testing.assert_close(out, proj(torch.relu(fc(x)).square()))
    out.sum().backward()
    want_fc, want_proj = fc.weight.grad.clone(), proj.weight.grad.clone()
    assert fc.weight.grad.is_contiguous() and proj.weight.grad.is_contiguous()
    fc.weight.grad = proj.weight.grad = None
    proj(torch.relu(fc(x)).square()).sum().backward()
    torch.testing.assert_close(want_fc, fc.weight.grad)
    torch.testing.assert_close(want_proj, proj.weight.grad)


def test_frozen_operands_get_no_grad():
    x, w_up, w_down = operands([3, 4])
    w_up.requires_grad_(False)
    out = blocked_relu2_mlp(x.detach(), w_up, w_down, [3, 4])
    out.sum().backward()
    assert w_up.grad is None and w_down.grad is not None


def test_rows_that_do_not_cover_the_input_are_an_error():
    x, w_up, w_down = operands([3, 4])
    with pytest.raises(ValueError, match="does not cover 7 rows"):
        blocked_relu2_mlp(x, w_up, w_down, [3, 3])


def test_blocked_only_on_cpu_in_eager_mode(monkeypatch):
    assert blocked_ok(torch.zeros(2, 2))
    assert not blocked_ok(torch.zeros(2, 2, device="meta"))  # any other device: bmm / _grouped_mm
    monkeypatch.setattr(blocked, "ENABLED", False)
    assert not blocked_ok(torch.zeros(2, 2))


def test_dense_mlp_blocked_matches_linear_layers_and_keeps_autocast_on_linear(tiny_blocks):
    from engine.blocked_mlp import dense_relu2_mlp

    fc, proj = torch.nn.Linear(6, 10, bias=False).double(), torch.nn.Linear(10, 6, bias=False).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    out = dense_relu2_mlp(x, fc.weight, proj.weight)
    torch.testing.assert_close(out, proj(torch.relu(fc(x)).square()))
    assert type(out.grad_fn).__name__ == "ViewBackward0"  # reshaped back from the blocked [N, D] result
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights, bf16 compute: F.linear's casts
        out = dense_relu2_mlp(x.float(), fc.weight.float(), proj.weight.float())
    assert out.dtype == torch.bfloat16


def test_the_environment_turns_it_off_for_a_whole_process():
    """ENGINE_BLOCKED_MLP=0 (tests/test_ep.py runs torchrun so): the CUDA code path on CPU."""
    import os
    import subprocess
    import sys

    probe = "import torch, engine.blocked_mlp as b; print(b.blocked_ok(torch.zeros(1)))"
    said = {v: subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                              env={**os.environ, "ENGINE_BLOCKED_MLP": v}).stdout.strip() for v in ("0", "1")}
    assert said == {"0": "False", "1": "True"}
