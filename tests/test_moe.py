"""engine.moe: every dispatch against the loop reference, capacity drops, compile, grad accumulation."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine.blocked_mlp
from engine.moe import MoEConfig, MoELayer

D, H, E, K = 64, 128, 4, 2
# Where torch has _grouped_mm, a grouped layer's forward + backward calls it 6 times: the two expert
# GEMMs (up, down), then the input grad and the weight grad of each. The padded stand-in calls it 0.
GMM = 6 if hasattr(torch, "_grouped_mm") else 0


class GroupedMMCalls(TorchDispatchMode):
    """Counts aten._grouped_mm calls made under it (forward and backward alike). The stand-in
    computes the same numbers with bmm, so matching the loop reference cannot tell the two apart;
    this count can, without a counter in the engine's hot path."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._grouped_mm:
            self.count += 1
        return func(*args, **(kwargs or {}))


def took_blocked_path(out) -> bool:
    """Whether engine.blocked_mlp computed the experts of this output (its node in the graph)."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "_BlockedReluSquaredMLPBackward":
            return True
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    return False


@pytest.fixture
def blocked_mode(monkeypatch):
    """on: CPU eager experts through engine.blocked_mlp (the default); off: bmm / _grouped_mm, as on CUDA."""
    return lambda mode: monkeypatch.setattr(engine.blocked_mlp, "ENABLED", mode == "on")


def make_layer(dispatch="loop", cap=0.0, dim=D, hidden=H, **kw):
    torch.manual_seed(0)
    kw.setdefault("z_coeff", 1e-3)
    layer = MoELayer(MoEConfig(dim=dim, n_experts=E, top_k=K, expert_hidden=hidden, cap=cap, dispatch=dispatch, **kw))
    torch.nn.init.normal_(layer.w_down_EHD, std=hidden**-0.5)  # default init is zero: no grads to compare
    return layer


def fwd_bwd(layer, x_BTD, seed=1):
    """Output, aux and every gradient (x, router, w_up, w_down) of a loss that uses out and aux."""
    x = x_BTD.clone().requires_grad_()
    out, aux = layer(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    ((out * g).sum() + aux.loss).backward()
    grads = {"x": x.grad, "router": layer.router.weight.grad, "w_up": layer.w_up_EDH.grad, "w_down": layer.w_down_EHD.grad}
    aux.blocked = took_blocked_path(out)
    return out.detach(), aux, grads


@pytest.mark.parametrize(
    "dispatch,cap,dim,hidden,mode,gmm_calls,blocked",
    [
        # mode off: the experts as on CUDA (bmm, torch._grouped_mm); on (CPU's default): engine.blocked_mlp
        ("padded", 4.0, D, H, "off", 0, False),  # C = 2N/... large enough that nothing drops
        ("padded", 4.0, D, H, "on", 0, True),
        ("auto", 4.0, D, H, "off", 0, False),
        ("grouped", 0.0, D, H, "off", GMM, False),  # torch._grouped_mm
        ("auto", 0.0, D, H, "off", GMM, False),
        ("grouped", 0.0, 30, 36, "off", 0, False),  # 30 fp32 = 120-byte rows: _grouped_mm refuses -> padded fallback
        ("grouped", 0.0, D, H, "on", 0, True),
        ("auto", 0.0, D, H, "on", 0, True),
        ("grouped", 0.0, 30, 36, "on", 0, True),  # blocks need no _grouped_mm, nor its row alignment
    ],
)
def test_dispatch_matches_loop_outputs_and_all_grads(dispatch, cap, dim, hidden, mode, gmm_calls, blocked, blocked_mode):
    x = torch.randn(2, 37, dim)  # 74 tokens: not a multiple of 8 or 16 on purpose
    ref_out, ref_aux, ref_g = fwd_bwd(make_layer("loop", 0.0, dim, hidden), x)
    layer = make_layer(dispatch, cap, dim, hidden)
    blocked_mode(mode)
    with GroupedMMCalls() as gmm:
        out, aux, g = fwd_bwd(layer, x)
    assert gmm.count == gmm_calls  # the grouped kernel really ran (or, for the fallback, did not)
    assert aux.blocked == blocked
    assert float(aux.dropped) == 0.0
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux.loss, ref_aux.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(aux.tokens_per_expert_E, ref_aux.tokens_per_expert_E, rtol=0, atol=0)
    for name in ref_g:
        assert ref_g[name].abs().max() > 0, name  # a zero grad would make the comparison empty
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dispatch,cap,mode,gmm_calls", [
    ("grouped", 0.0, "off", GMM), ("padded", 4.0, "off", 0), ("grouped", 0.0, "on", 0), ("padded", 4.0, "on", 0)])
def test_autocast_bf16_experts_compute_in_bf16_and_match_fp32(dispatch, cap, mode, gmm_calls, blocked_mode):
    """bf16 training runs the residual stream in fp32 under autocast: the experts must compute in
    the autocast dtype (on CUDA _grouped_mm takes bf16 only), close to the fp32 reference."""
    x = torch.randn(2, 32, D)
    ref_out, _, _ = fwd_bwd(make_layer("loop", 0.0), x)
    layer = make_layer(dispatch, cap)
    blocked_mode(mode)
    with torch.autocast("cpu", dtype=torch.bfloat16), GroupedMMCalls() as gmm:
        out, aux = layer(x.clone().requires_grad_())
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert gmm.count == gmm_calls  # bf16 through _grouped_mm, not the stand-in
    assert took_blocked_path(out) == (mode != "off")
    assert layer.w_up_EDH.grad is not None and layer.w_up_EDH.grad.dtype == torch.float32  # fp32 masters
    # bf16 has 8 mantissa bits: two chained GEMMs stay within a few percent of the fp32 output.
    torch.testing.assert_close(out.float(), ref_out, rtol=5e-2, atol=5e-2)


def test_aux_outputs_and_losses_computed_independently():
    layer = make_layer("padded", 1.0, balance_coeff=0.01, z_coeff=1e-3)
    x = torch.randn(3, 20, D)
    out, aux = layer(x)
    N = 60
    assert aux.assignments == N * K and isinstance(aux.assignments, int)
    assert aux.dropped.dim() == 0 and aux.dropped.dtype == torch.float32
    # Independent recomputation: plain softmax/topk, counts by Python, the two losses by formula.
    logits = x.reshape(N, D).double() @ layer.router.weight.detach().double().T
    probs = logits.softmax(-1)
    top = probs.topk(K, dim=-1).indices
    counts = [int((top == e).sum()) for e in range(E)]
    assert aux.tokens_per_expert_E.tolist() == counts
    switch = E * sum(counts[e] / (N * K) * probs[:, e].mean() for e in range(E))
    z = torch.logsumexp(logits, -1).square().mean()
    assert float(aux.loss.detach()) == pytest.approx(float(0.01 * switch + 1e-3 * z), rel=1e-5)


@pytest.mark.parametrize("top_k,balance_coeff,z_coeff,biased", [
    (1, 0.01, 0.0, False), (2, 0.01, 1e-3, False), (3, 0.0, 1e-3, False), (2, 0.0, 0.0, True), (1, 0.01, 1e-3, True)])
def test_cpu_router_matches_the_composable_router(top_k, balance_coeff, z_coeff, biased):
    """route() on CPU eager is engine.moe._RouteCPU (hand-written backward); CUDA and compiled graphs
    use _route_composable under autograd. Same experts, counts, gates, loss and grads."""
    from engine.moe import _route_composable, route

    torch.manual_seed(3)
    x = torch.randn(300, D, requires_grad=True)
    w = (torch.randn(E, D) * 0.3).requires_grad_()
    bias = torch.tensor([0.3, -0.2, 0.0, 0.1]) if biased else None
    g_gates = torch.randn(300, top_k)
    results = []
    for fn in (route, _route_composable):
        x.grad = w.grad = None
        gates, experts, counts, loss = fn(x, w, top_k, balance_coeff, z_coeff, bias)
        outs = [gates] + ([loss * 1.7] if loss.requires_grad else [])  # a loss of 0 + 0 has no graph there
        torch.autograd.backward(outs, [g_gates, None][: len(outs)])
        results.append((gates.detach(), experts, counts, loss.detach(), x.grad, w.grad))
    (g1, e1, c1, l1, gx1, gw1), (g2, e2, c2, l2, gx2, gw2) = results
    assert torch.equal(e1, e2) and torch.equal(c1, c2) and int(c1.sum()) == 300 * top_k
    assert (e1.sort(dim=1).values.diff(dim=1) > 0).all()  # a token's experts are distinct
    for a, b in ((g1, g2), (l1, l2), (gx1, gx2), (gw1, gw2)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert gw1.abs().sum() > 1e-3  # the router learns through its gates (top-1: gate = probability)


@pytest.mark.parametrize("dispatch,cap", [("padded", 1.0), ("padded", 0.5), ("grouped", 0.0)])
def test_chunked_gathers_equal_one_chunk_exactly(dispatch, cap, monkeypatch):
    """CPU eager gathers (dispatch backward, combine forward and backward) run in chunks of
    GATHER_CHUNK_ROWS rows; the tests' layers are smaller than the default chunk, so a chunk of 7
    rows (with a ragged last one) is checked against one chunk: the same ops per row, equal bits."""
    import engine.moe

    layer, x = make_layer(dispatch, cap), torch.randn(2, 30, D)
    results = []
    for rows in (7, 10**9):
        monkeypatch.setattr(engine.moe, "GATHER_CHUNK_ROWS", rows)
        layer.zero_grad(set_to_none=True)  # else the second backward adds into the first's tensors
        out, aux, grads = fwd_bwd(layer, x)
        results.append([out, aux.loss.detach(), *grads.values()])
    assert results[0][-1] is not results[1][-1]
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_top1_gate_is_the_probability_and_ties_pick_distinct_experts():
    from engine.moe import route

    x = torch.randn(10, D)
    gates, experts, _, _ = route(x, torch.randn(E, D), 1, 0.0, 0.0)
    assert (gates < 1).all()  # renormalised, a top-1 gate would be exactly 1 and carry no gradient
    # A zero router: every probability ties at 1/E. Each token still gets top_k distinct experts.
    gates, experts, counts, _ = route(x, torch.zeros(E, D), 3, 0.0, 0.0)
    assert experts.tolist() == [[0, 1, 2]] * 10 and counts.tolist() == [10, 10, 10, 0]
    torch.testing.assert_close(gates, torch.full((10, 3), 1 / 3))


@pytest.mark.parametrize("dispatch,mode", [("padded", "off"), ("padded", "on"), ("loop", "on")])
def test_skewed_router_drops_exactly_the_overflow(dispatch, mode, blocked_mode):
    blocked_mode(mode)  # padded: bmm (as on CUDA) and engine.blocked_mlp (CPU's default)
    B, T = 2, 37
    N = B * T
    layer = make_layer(dispatch, 1.0, balance_coeff=0.0, z_coeff=0.0)
    # Force every token onto experts 0 and 1: feature 0 is 1 for every token, and only experts 0
    # and 1 read it (logits 10 and 5 vs 0 for the rest).
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0], layer.router.weight[1, 0] = 10.0, 5.0
    x = torch.randn(B, T, D)
    x[..., 0] = 1.0
    # Capacity from the spec formula, written out here: ceil(cap * N * K / E), up to a multiple of 8.
    C = math.ceil(1.0 * N * K / E)
    C = (C + 7) // 8 * 8
    assert C < N  # the scenario must overflow
    expected_dropped = 2 * (N - C)  # experts 0 and 1 each get N, keep the first C tokens

    xg = x.clone().requires_grad_()
    out, aux = layer(xg)
    assert float(aux.dropped) == expected_dropped
    assert aux.tokens_per_expert_E.tolist() == [N, N, 0, 0]
    out_ND = out.reshape(N, D)
    # First come first served: tokens C.. lost both assignments and contribute exactly nothing ...
    assert torch.equal(out_ND[C:], torch.zeros_like(out_ND[C:]))
    # ... while the first C tokens are served by both experts (reference: the dropless loop).
    full = make_layer("loop", 0.0, balance_coeff=0.0, z_coeff=0.0)
    full.load_state_dict(layer.state_dict())
    torch.testing.assert_close(out_ND[:C], full(x)[0].reshape(N, D)[:C], rtol=1e-5, atol=1e-6)
    # Dropped tokens get no gradient from the expert path (no aux loss here).
    out.square().sum().backward()
    assert torch.equal(xg.grad.reshape(N, D)[C:], torch.zeros(N - C, D))
    assert xg.grad.reshape(N, D)[:C].abs().sum() > 0


@pytest.mark.parametrize("mode", ["off", "on"])
def test_padded_and_loop_agree_when_dropping(mode, blocked_mode):
    x = torch.randn(1, 96, D)
    loop = make_layer("loop", 0.5)
    padded = make_layer("padded", 0.5)
    ref_out, ref_aux, ref_g = fwd_bwd(loop, x)
    blocked_mode(mode)
    out, aux, g = fwd_bwd(padded, x)
    assert aux.blocked == (mode == "on")
    assert float(aux.dropped) == float(ref_aux.dropped) > 0
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["off", "on"])
@pytest.mark.parametrize("dispatch,cap", [("padded", 4.0), ("grouped", 0.0)])
def test_grad_accumulation_equals_concatenated_batch(dispatch, cap, mode, blocked_mode):
    """Two micro-batches, both graphs alive before either backward (what buffer reuse would break),
    accumulate exactly the grads of the concatenated batch (sum losses; aux off: it is not additive)."""
    blocked_mode(mode)
    x1, x2 = torch.randn(2, 16, D), torch.randn(2, 16, D)
    g1, g2 = torch.randn(2, 16, D), torch.randn(2, 16, D)
    acc = make_layer(dispatch, cap, balance_coeff=0.0, z_coeff=0.0)
    o1, _ = acc(x1)
    o2, _ = acc(x2)
    (o2 * g2).sum().backward()
    (o1 * g1).sum().backward()
    whole = make_layer(dispatch, cap, balance_coeff=0.0, z_coeff=0.0)
    o, aux = whole(torch.cat([x1, x2]))
    assert float(aux.dropped) == 0.0
    (o * torch.cat([g1, g2])).sum().backward()
    for p_acc, p_whole in zip(acc.parameters(), whole.parameters()):
        assert p_whole.grad.abs().max() > 0
        torch.testing.assert_close(p_acc.grad, p_whole.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dispatch,cap", [("padded", 1.0), ("grouped", 0.0)])
def test_compile_fullgraph_static_matches_eager(dispatch, cap):
    """fullgraph=True fails on any graph break: a host sync (.item/.tolist), a data-dependent shape
    or a Python loop over data would all break it. So this proves the hot path is sync-free."""
    layer = make_layer(dispatch, cap)
    x = torch.randn(2, 32, D)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    c_out, c_aux, c_g = fwd_bwd(compiled, x)
    c_g = {k: v.clone() for k, v in c_g.items()}
    layer.zero_grad(set_to_none=True)
    e_out, e_aux, e_g = fwd_bwd(layer, x)
    torch.testing.assert_close(c_out, e_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c_aux.dropped, e_aux.dropped)
    torch.testing.assert_close(c_aux.loss, e_aux.loss, rtol=1e-5, atol=1e-6)
    for name in e_g:
        torch.testing.assert_close(c_g[name], e_g[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("dispatch,cap", [("padded", 1.0), ("grouped", 0.0)])
def test_compiled_graphs_have_no_accumulating_scatter(dispatch, cap):
    """No scatter-add in the traced forward or backward: Inductor turns one into an accumulating
    index_put, which for int64 (no Triton atomic) falls back to aten's sort-based kernel. On an
    H200 the per-expert counts done that way were 0.39 ms of a 1.6 ms layer (docs/benchmarks.md).
    The graphs are AOTAutograd's, as Inductor receives them, captured on CPU under bf16 autocast."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)  # run as traced (the calling convention AOTAutograd wants)

    layer = make_layer(dispatch, cap)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False,
                             backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    x = torch.randn(2, 32, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, aux = compiled(x)
    torch.autograd.backward([out.float(), aux.loss], [torch.randn(out.shape), None])
    assert len(graphs) == 2 and x.grad is not None  # forward and backward were both traced
    accumulating = {torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
                    torch.ops.aten._unsafe_index_put.default, torch.ops.aten.index_add.default,
                    torch.ops.aten.scatter_add.default, torch.ops.aten.scatter_reduce.two}
    where = lambda n: [l.strip() for l in n.meta.get("stack_trace", "").splitlines() if "File" in l][-1:]
    found = [f"{n.target} at {where(n)}" for gm in graphs for n in gm.graph.nodes
             if n.op == "call_function" and n.target in accumulating]
    assert not found, found


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
@pytest.mark.parametrize("bf16", [True, False])
def test_compiled_grouped_calls_grouped_mm_itself_in_bf16(bf16):
    """Compiled bf16 (every CUDA run) traces torch._grouped_mm itself, forward and backward, so the
    compiled graph pays no Python dispatch per call; fp32 (CPU) needs engine.moe's custom op, since
    _grouped_mm's fake kernel takes bf16 only. Compiled matches eager either way."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    layer = make_layer("grouped", 0.0)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False,
                             backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    x = torch.randn(2, 32, D)
    results = []
    for fn in (compiled, layer):  # compiled first: eager's blocked CPU path is a different kernel
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, aux = fn(xi)
        torch.autograd.backward([out.float(), aux.loss], [torch.ones(out.shape), None])
        results.append([out.detach().float(), xi.grad, layer.w_up_EDH.grad, layer.w_down_EHD.grad])
    targets = [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    native = targets.count(torch.ops.aten._grouped_mm.default)
    custom = targets.count(torch.ops.engine_moe.grouped_mm.default)
    assert len(graphs) == 2
    assert (native, custom) == ((GMM, 0) if bf16 else (0, GMM)), (native, custom)
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-4, atol=1e-5)
    for got, ref in zip(*results):
        assert ref.abs().max() > 0
        torch.testing.assert_close(got, ref, **tol)


@pytest.mark.slow
def test_compile_dynamic_padded_handles_two_token_counts():
    """`--compile dynamic`: the capacity is computed from a symbolic token count (integer math
    only), so one compiled padded layer serves two batch shapes and matches eager on each."""
    from engine.moe import capacity

    layer = make_layer("padded", 1.25)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for tokens in (48, 80):
        x = torch.randn(1, tokens, D)
        c_out, c_aux, _ = fwd_bwd(compiled, x)
        layer.zero_grad(set_to_none=True)
        e_out, e_aux, _ = fwd_bwd(layer, x)
        torch.testing.assert_close(c_out, e_out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c_aux.dropped, e_aux.dropped)
    # The spec's formula, by hand: ceil(1.25 * 80 * 2 / 4) = 50 -> 56 slots; exact on boundaries.
    assert capacity(1.25, 80, 2, 4) == 56 and capacity(0.1, 80, 2, 8) == 8 and capacity(1.0, 128, 2, 8) == 32


def test_capacity_of_concrete_sizes_is_plain_int_math(monkeypatch):
    """Every static compile sees the token count as a plain int. torch 2.11's dynamo (the GPU
    box's) graph-breaks on torch.sym_min of two ints (torch 2.13's does not), which on an H200
    split each padded layer's graph: 0.58x the tok/s and +7 GiB. So concrete sizes must never
    reach torch.sym_min; the bound at N must still hold."""
    from engine.moe import capacity

    def sym_min_of_ints(a, b):
        raise AssertionError(f"torch.sym_min({a!r}, {b!r}) on concrete sizes")

    monkeypatch.setattr(torch, "sym_min", sym_min_of_ints)
    assert capacity(1.0, 16384, 2, 8) == 4096  # the d12 micro-batch: ceil(16384 * 2 / 8)
    assert capacity(1e6, 80, 2, 4) == 80  # a huge --cap: at most N slots
    assert capacity(1e6, 81, 2, 4) == 88  # ... rounded up to a multiple of 8
    assert isinstance(capacity(1.25, 80, 2, 4), int)
    # SPEC §10's C = ceil(F * N * K / E) with F as written: every digit counts (1.00001 was taken as 1.0:
    # its fraction was cut to a denominator of 10,000), and 1.1 is 11/10, not a binary float a hair over.
    assert capacity(1.00001, 1024, 2, 8) == 264 and capacity(1.0, 1024, 2, 8) == 256  # ceil(256.00256) = 257 -> 264
    assert capacity(1.1, 1000, 2, 8) == 280 and capacity(0.3, 800, 1, 3) == 80  # 275 -> 280; exactly 80


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(dispatch="grouped", cap=1.0), "grouped is dropless"),
        (dict(dispatch="padded", cap=0.0), "padded needs --cap > 0"),
        (dict(top_k=5), "--top-k must be between 1 and --n-experts (4)"),
        (dict(top_k=0), "--top-k must be between"),
        (dict(cap=-1.0), "--cap must be >= 0"),
        (dict(dispatch="magic"), "--dispatch must be one of"),
        (dict(fp8=True, dim=40), "dim=40 must be a multiple of 16"),
    ],
)
def test_bad_config_is_one_line_value_error(kw, msg):
    args = dict(dim=D, n_experts=E, top_k=K, expert_hidden=H, cap=1.0) | kw
    with pytest.raises(ValueError) as exc:
        MoELayer(MoEConfig(**args))
    assert msg in str(exc.value) and "\n" not in str(exc.value)
