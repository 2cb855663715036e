"""The ops against the reference: values, gradients, opcheck, torch.compile, errors."""
import pytest
import torch

import fusedrnn
from fusedrnn import reference as ref
from fusedrnn._ops import ops

from helpers import B, H, P, T, grad_tensors, layer_inputs, rel_err

KINDS = ["lstm", "gru"]
LAYOUTS = [pytest.param(False, id="padded"), pytest.param(True, id="packed")]
DIRECTIONS = [pytest.param(False, id="fwd"), pytest.param(True, id="rev")]


def run_op(kind, d, reverse):
    if kind == "lstm":
        return fusedrnn.lstm_layer(d["x_proj"], d["h0"], d["c0"], d["w_hh"], d["w_hr"],
                                   d["b_hh"], d["batch_sizes"], reverse)
    return fusedrnn.gru_layer(d["x_proj"], d["h0"], d["w_hh"], d["b_hh"], d["batch_sizes"],
                              reverse)


def run_ref(kind, d, reverse):
    if kind == "lstm":
        return ref.lstm_layer(d["x_proj"], d["h0"], d["c0"], d["w_hh"], d["w_hr"], d["b_hh"],
                              d["batch_sizes"], reverse)
    return ref.gru_layer(d["x_proj"], d["h0"], d["w_hh"], d["b_hh"], d["batch_sizes"], reverse)


def variants():
    for kind in KINDS:
        for proj in ([False, True] if kind == "lstm" else [False]):
            for bias in [True, False]:
                if proj and not bias:
                    continue
                yield pytest.param(kind, proj, bias, id=f"{kind}-{'proj' if proj else 'noproj'}-"
                                   f"{'bias' if bias else 'nobias'}")


@pytest.mark.parametrize("kind,proj,bias", list(variants()))
@pytest.mark.parametrize("packed", LAYOUTS)
@pytest.mark.parametrize("reverse", DIRECTIONS)
def test_float64_matches_reference(device, kind, proj, bias, packed, reverse):
    d = layer_inputs(kind, packed, device, torch.float64, proj=proj, bias=bias,
                     requires_grad=True)
    got, want = run_op(kind, d, reverse), run_ref(kind, d, reverse)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_err(g, w) < 1e-10
    # All gradients, from a random weighting of every output.
    weights = [torch.randn_like(w) for w in want]
    leaves = grad_tensors(d)
    gg = torch.autograd.grad(sum((g * c).sum() for g, c in zip(got, weights)), list(leaves.values()))
    gw = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, weights)), list(leaves.values()))
    for name, a, e in zip(leaves, gg, gw):
        assert rel_err(a, e) < 1e-10, name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_error_within_torch_error(device, kind, dtype):
    """Error against a float64 reference at most a small multiple of the error
    torch's own ops make at the same dtype (and fp32 within 1e-5 outright)."""
    T_, B_, H_ = 20, 8, 32
    d64 = layer_inputs(kind, False, device, torch.float64, T=T_, B=B_, H=H_, requires_grad=True)
    d = {k: (v.detach().to(dtype).requires_grad_(True) if isinstance(v, torch.Tensor)
             and v.is_floating_point() else v) for k, v in d64.items()}
    want = run_ref(kind, d64, False)
    torch_low = run_ref(kind, d, False)
    got = run_op(kind, d, False)
    weights = [torch.randn_like(w) for w in want]

    def grads(outs, leaves):
        loss = sum((o.double() * c).sum() for o, c in zip(outs, weights))
        return torch.autograd.grad(loss, list(grad_tensors(leaves).values()))

    for g, t, w in zip(list(got) + list(grads(got, d)), list(torch_low) + list(grads(torch_low, d)),
                       list(want) + list(grads(want, d64))):
        assert g.dtype == dtype
        ours, theirs = rel_err(g, w), rel_err(t, w)
        assert ours <= 4 * theirs + 1e-6, (ours, theirs)
        if dtype == torch.float32:
            assert ours < 1e-5


@pytest.mark.parametrize("kind,proj,bias", list(variants()))
@pytest.mark.parametrize("packed", LAYOUTS)
@pytest.mark.parametrize("reverse", DIRECTIONS)
def test_gradcheck(device, kind, proj, bias, packed, reverse):
    d = layer_inputs(kind, packed, device, torch.float64, proj=proj, bias=bias,
                     requires_grad=True)
    names = list(grad_tensors(d))

    def f(*tensors):
        dd = dict(d, **dict(zip(names, tensors)))
        return run_op(kind, dd, reverse)

    assert torch.autograd.gradcheck(f, [d[n] for n in names])


def op_calls(device, train):
    for kind in KINDS:
        for packed in (False, True):
            for reverse in (False, True):
                d = layer_inputs(kind, packed, device, torch.float32, proj=(kind == "lstm" and packed),
                                 requires_grad=True)
                if kind == "lstm":
                    args = (d["x_proj"], d["h0"], d["c0"], d["w_hh"], d["w_hr"], d["b_hh"],
                            d["batch_sizes"], reverse, train)
                    yield ops.lstm_forward, args
                else:
                    args = (d["x_proj"], d["h0"], d["w_hh"], d["b_hh"], d["batch_sizes"], reverse,
                            True, train)
                    yield ops.gru_forward, args


def test_opcheck_forward(device):
    for op, args in op_calls(device, train=True):
        torch.library.opcheck(op, args)
    for op, args in op_calls(device, train=False):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_opcheck_backward(device):
    for op, args in op_calls(device, train=True):
        outs = op(*args)
        if op is ops.lstm_forward:
            x_proj, h0, c0, w_hh, w_hr, b_hh, bs, rev, _ = args
            out, h_n, c_n, gates, cells = outs
            bargs = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n),
                     out.detach(), gates.detach(), cells.detach(), h0.detach(), c0.detach(),
                     w_hh.detach(), None if w_hr is None else w_hr.detach(), bs, rev, True)
            torch.library.opcheck(ops.lstm_backward, bargs)
        else:
            x_proj, h0, w_hh, b_hh, bs, rev, ra, _ = args
            out, h_n, gates = outs
            bargs = (torch.randn_like(out), torch.randn_like(h_n), out.detach(), gates.detach(),
                     h0.detach(), w_hh.detach(), bs, rev, ra, True)
            torch.library.opcheck(ops.gru_backward, bargs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("packed", LAYOUTS)
def test_compile_fullgraph_matches_eager(device, kind, packed):
    d = layer_inputs(kind, packed, device, torch.float32, requires_grad=True)
    leaves = grad_tensors(d)

    def f(**kw):
        outs = run_op(kind, kw, reverse=True)
        return sum(o.square().sum() for o in outs), outs[0]

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_e, out_e = f(**d)
    loss_c, out_c = compiled(**d)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    ge = torch.autograd.grad(loss_e, list(leaves.values()))
    gc = torch.autograd.grad(loss_c, list(leaves.values()))
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_no_saved_state_without_grad():
    d = layer_inputs("lstm", False, "cpu", torch.float32)
    *_, gates, cells = ops.lstm_forward(d["x_proj"], d["h0"], d["c0"], d["w_hh"], None, d["b_hh"],
                                        None, False, False)
    assert gates.numel() == 0 and cells.numel() == 0
    dg = layer_inputs("gru", False, "cpu", torch.float32)
    _, _, gates = ops.gru_forward(dg["x_proj"], dg["h0"], dg["w_hh"], dg["b_hh"], None, False,
                                  True, False)
    assert gates.numel() == 0


def test_long_sequence_and_wide_batch_reverse_packed():
    """Packed reverse with many distinct lengths, against the reference."""
    lengths = sorted(torch.randint(1, 40, (11,)).tolist(), reverse=True)
    for kind in KINDS:
        d = layer_inputs(kind, True, "cpu", torch.float64, lengths=lengths)
        for g, w in zip(run_op(kind, d, True), run_ref(kind, d, True)):
            assert rel_err(g, w) < 1e-10


# ------------------------------------------------------------------ errors
def lstm_args(**over):
    d = layer_inputs("lstm", False, "cpu", torch.float32)
    d.update(over)
    return (d["x_proj"], d["h0"], d["c0"], d["w_hh"], d["w_hr"], d["b_hh"], d["batch_sizes"],
            False, False)


BAD_LSTM = [
    (dict(x_proj=torch.randn(T, B, 4 * H + 1)), "x_proj.size(-1) must be"),
    (dict(x_proj=torch.randn(T * B, 4 * H)), "x_proj must be 3-D"),
    (dict(h0=torch.randn(B + 1, H)), "h0 must have shape"),
    (dict(c0=torch.randn(B, H, 1)), "c0 must have shape"),
    (dict(h0=torch.randn(B, H, dtype=torch.float64)), "h0 has dtype"),
    (dict(w_hh=torch.randn(4 * H + 1, H)), "w_hh must be 2-D"),
    (dict(w_hh=torch.randn(4 * H, P)), "w_hh must have shape"),
    (dict(b_hh=torch.randn(4 * H - 1)), "b_hh must have shape"),
    (dict(x_proj=torch.randn(T, B, 4 * H).int()), "x_proj must be float32"),
    (dict(x_proj=torch.randn(10, 4 * H), batch_sizes=torch.tensor([4, 3, 2])),
     "batch_sizes sum to 9"),
    (dict(x_proj=torch.randn(9, 4 * H), batch_sizes=torch.tensor([3, 4, 2])),
     "non-increasing"),
    (dict(x_proj=torch.randn(9, 4 * H), batch_sizes=torch.tensor([3., 4, 2])), "int64 CPU"),
    (dict(x_proj=torch.randn(3, 4 * H), h0=torch.randn(3, H), c0=torch.randn(3, H),
          batch_sizes=torch.tensor([3, 0])), "must be positive"),
]


@pytest.mark.parametrize("over,msg", BAD_LSTM)
def test_bad_input_is_rejected_with_argument_name(over, msg):
    with pytest.raises(RuntimeError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        ops.lstm_forward(*lstm_args(**over))


def test_bad_gru_input():
    d = layer_inputs("gru", False, "cpu", torch.float32)
    with pytest.raises(RuntimeError, match="h0 must have shape"):
        ops.gru_forward(d["x_proj"], d["h0"][:-1], d["w_hh"], d["b_hh"], None, False, True, False)
    with pytest.raises(RuntimeError, match="w_hh must be 2-D"):
        ops.gru_forward(d["x_proj"], d["h0"], d["w_hh"][:-1], d["b_hh"], None, False, True, False)
    with pytest.raises(RuntimeError, match="b_hh has dtype"):
        ops.gru_forward(d["x_proj"], d["h0"], d["w_hh"], d["b_hh"].double(), None, False, True,
                        False)


def _backward_args(kind, device, packed):
    """{name: tensor} of a valid backward call (after a training forward), in
    the op's argument order, and the op."""
    d = layer_inputs(kind, packed, device, torch.float32)
    if kind == "lstm":
        out, h_n, c_n, gates, cells = ops.lstm_forward(
            d["x_proj"], d["h0"], d["c0"], d["w_hh"], None, d["b_hh"], d["batch_sizes"], False,
            True)
        args = dict(grad_output=torch.randn_like(out), grad_h_n=torch.randn_like(h_n),
                    grad_c_n=torch.randn_like(c_n), output=out, gates=gates, cells=cells,
                    h0=d["h0"], c0=d["c0"], w_hh=d["w_hh"])
        return args, lambda a: ops.lstm_backward(*a.values(), None, d["batch_sizes"], False, True)
    out, h_n, gates = ops.gru_forward(d["x_proj"], d["h0"], d["w_hh"], d["b_hh"],
                                      d["batch_sizes"], False, True, True)
    args = dict(grad_output=torch.randn_like(out), grad_h_n=torch.randn_like(h_n), output=out,
                gates=gates, h0=d["h0"], w_hh=d["w_hh"])
    return args, lambda a: ops.gru_backward(*a.values(), d["batch_sizes"], False, True, True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("packed", LAYOUTS)
def test_bad_backward_input_is_rejected_before_running(device, kind, packed):
    """Every tensor a backward op reads is checked first (on the CPU's fused
    path too, which reads them by raw pointers): a saved tensor or state of
    the wrong shape or dtype is a clear error naming it, never a read past
    its end."""
    args, run = _backward_args(kind, device, packed)
    run(args)  # valid as it is
    for name, t in args.items():
        if name == "grad_output":
            continue
        for bad, msg in [(t[:-1], f"{name} must (have shape|be 2-D)"),
                         (t.double(), f"{name} (has dtype|must be)")]:
            with pytest.raises(RuntimeError, match=msg):
                run({**args, name: bad})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for a device mismatch")
def test_device_mismatch_is_rejected():
    d = layer_inputs("gru", False, "cuda", torch.float32)
    with pytest.raises(RuntimeError, match="h0 is on cpu"):
        ops.gru_forward(d["x_proj"], d["h0"].cpu(), d["w_hh"], d["b_hh"], None, False, True, False)


def test_backends_reports_cpu():
    b = fusedrnn.backends()
    assert b["cpu"] is True and set(b) == {"cpu", "cuda"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B_,H_", [(1, 16), (7, 17), (13, 70), (6, 129)])
@pytest.mark.parametrize("reverse", DIRECTIONS)
def test_float32_within_1e5_of_float64_reference(kind, B_, H_, reverse):
    """Float32 padded inputs take the CPU's fused AVX-512 path where there is
    one: odd hidden sizes (partial panels), batches that are not a multiple of
    the tile rows, both directions; values and gradients against float64."""
    d64 = layer_inputs(kind, False, "cpu", torch.float64, T=9, B=B_, H=H_, requires_grad=True)
    d32 = {k: (v.detach().float().requires_grad_(True) if isinstance(v, torch.Tensor)
               and v.is_floating_point() else v) for k, v in d64.items()}
    got, want = run_op(kind, d32, reverse), run_ref(kind, d64, reverse)
    weights = [torch.randn_like(w) for w in want]
    g32 = torch.autograd.grad(sum((g.double() * c).sum() for g, c in zip(got, weights)),
                              list(grad_tensors(d32).values()))
    g64 = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, weights)),
                              list(grad_tensors(d64).values()))
    for a, e in zip(list(got) + list(g32), list(want) + list(g64)):
        assert a.dtype == torch.float32
        assert rel_err(a, e) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reverse", DIRECTIONS)
def test_cpu_fused_and_generic_paths_agree(kind, reverse, monkeypatch):
    """FUSEDRNN_CPU_PATH=generic forces the generic loop; both paths must agree
    (float32, to rounding: relative to each tensor's largest entry) on values and
    gradients."""
    d = layer_inputs(kind, False, "cpu", torch.float32, T=11, B=9, H=37, requires_grad=True)
    results = []
    for path in ("auto", "generic"):
        monkeypatch.setenv("FUSEDRNN_CPU_PATH", path)
        outs = run_op(kind, d, reverse)
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
        results.append(list(outs) + list(torch.autograd.grad(loss, list(grad_tensors(d).values()))))
    for a, g in zip(*results):
        assert a.shape == g.shape and rel_err(a, g) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 17), (4, 3, 17), (200, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(device, dtype, shape, bias):
    """fusedrnn::linear (the input projection; our GEMM for float32 on AVX-512
    CPUs) against F.linear, values and gradients."""
    x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(70, 17 if shape[-1] == 17 else 33, device=device, dtype=dtype,
                    requires_grad=True)
    b = torch.randn(70, device=device, dtype=dtype, requires_grad=True) if bias else None
    got, want = fusedrnn._ops.linear(x, w, b), torch.nn.functional.linear(x, w, b)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.shape == want.shape and rel_err(got, want) < tol
    c = torch.randn_like(want)
    leaves = [x, w] + ([b] if bias else [])
    for a, e in zip(torch.autograd.grad((got * c).sum(), leaves),
                    torch.autograd.grad((want * c).sum(), leaves)):
        assert rel_err(a, e) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(0, 8, 4), (5, 0, 4), (5, 8, 0)])
def test_linear_backward_of_empty_products(device, dtype, M, N, K):
    """linear_backward where a size is zero: torch's gradients (zeros, empty
    ones, and the bias's row sums), not an error."""
    g = torch.randn(2, M, N, device=device, dtype=dtype)
    x = torch.randn(2, M, K, device=device, dtype=dtype)
    w = torch.randn(N, K, device=device, dtype=dtype)
    dx, dw, db = ops.linear_backward(g, x, w, True, True, True)
    f = torch.float32
    torch.testing.assert_close(dx, (g.to(f) @ w.to(f)).to(dtype))
    torch.testing.assert_close(dw, (g.to(f).flatten(0, 1).T @ x.to(f).flatten(0, 1)).to(dtype))
    torch.testing.assert_close(db, g.to(f).sum((0, 1)).to(dtype))


def test_bad_linear_input_is_rejected_before_running(device):
    """Every operand of linear and linear_backward is checked first (the fused
    GEMMs read them by raw pointers): a clear error naming it."""
    opts = dict(device=device)
    x, w, b = torch.randn(10, 8, **opts), torch.randn(16, 8, **opts), torch.randn(16, **opts)
    g = torch.randn(10, 16, **opts)
    bad_linear = [((x, w[:, :-1], b), "input \\[..., K\\] and weight \\[N, K\\]"),
                  ((x, w, b[:-1]), "bias must have shape"),
                  ((x, w, b.double()), "bias has dtype"),
                  ((x, w.double(), b), "weight has dtype"),
                  ((x.int(), w.int(), None), "input must be float32")]
    for args, msg in bad_linear:
        with pytest.raises(RuntimeError, match=msg):
            ops.linear(*args)
    bad_backward = [((g[:, :-1], x, w), "grad must have shape"),
                    ((g[:-1], x, w), "grad must have shape"),
                    ((g, x[:, :-1], w), "input \\[..., K\\] and weight \\[N, K\\]"),
                    ((g.double(), x, w), "grad has dtype")]
    for args, msg in bad_backward:
        with pytest.raises(RuntimeError, match=msg):
            ops.linear_backward(*args, True, True, True)


def test_linear_opcheck(device):
    x = torch.randn(5, 3, 17, device=device, requires_grad=True)
    w = torch.randn(20, 17, device=device, requires_grad=True)
    b = torch.randn(20, device=device, requires_grad=True)
    torch.library.opcheck(ops.linear, (x, w, b))
    torch.library.opcheck(ops.linear, (x, w, None))
    g = torch.randn(5, 3, 20, device=device)
    torch.library.opcheck(ops.linear_backward, (g, x.detach(), w.detach(), True, True, True))


# ------------------------------------------------------------------ cell ops, autograd kernel
def cell_op_inputs(kind, device, dtype, bias=True, requires_grad=False):
    """input, states, weights of one plain cell step, small odd sizes."""
    G = 4 if kind == "lstm" else 3
    t = lambda *s: torch.randn(*s, device=device, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    states = (t(B, H), t(B, H)) if kind == "lstm" else (t(B, H),)
    weights = (t(G * H, 17), t(G * H, H), t(G * H) if bias else None, t(G * H) if bias else None)
    return t(B, 17), states, weights


def cell_op(kind, x, states, weights, reset_after=True):
    if kind == "lstm":
        return ops.lstm_cell(x, *states, *weights)
    return (ops.gru_cell(x, *states, *weights, reset_after),)


def cell_by_layer_ops(kind, x, states, weights, reset_after=True):
    w_ih, w_hh, b_ih, b_hh = weights
    x_proj = ops.linear(x, w_ih, b_ih).unsqueeze(0)
    train = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x_proj, *states, w_hh, b_hh))
    if kind == "lstm":
        return ops.lstm_forward(x_proj, *states, w_hh, None, b_hh, None, False, train)[1:3]
    return ops.gru_forward(x_proj, *states, w_hh, b_hh, None, False, reset_after, train)[1:2]


@pytest.mark.parametrize("kind,reset_after", [("lstm", True), ("gru", True), ("gru", False)])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_op_is_the_layer_ops_of_one_step(device, kind, reset_after, bias):
    """lstm_cell / gru_cell: bit for bit linear then one step of the layer op,
    float32, values and gradients; float64 against the reference."""
    x, states, weights = cell_op_inputs(kind, device, torch.float32, bias, requires_grad=True)
    leaves = [t for t in (x, *states, *weights) if t is not None]
    got = cell_op(kind, x, states, weights, reset_after)
    want = cell_by_layer_ops(kind, x, states, weights, reset_after)
    g = [torch.randn_like(t) for t in want]
    for a, e, ga, ge in zip(got, want, torch.autograd.grad(got, leaves, g),
                            torch.autograd.grad(want, leaves, g)):
        assert torch.equal(a, e) and torch.equal(ga, ge)
    x, states, weights = cell_op_inputs(kind, device, torch.float64, bias)
    w_ih, w_hh, b_ih, b_hh = weights
    xp = x @ w_ih.t() + (0 if b_ih is None else b_ih)
    if kind == "lstm":
        want = ref.lstm_cell(xp, *states, w_hh, b_hh)
    else:
        want = (ref.gru_cell(xp, states[0], w_hh, b_hh, reset_after),)
    for a, e in zip(cell_op(kind, x, states, weights, reset_after), want):
        assert rel_err(a, e) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_cell_op_opcheck(device, kind):
    for bias in (True, False):
        x, states, weights = cell_op_inputs(kind, device, torch.float64, bias, requires_grad=True)
        extra = () if kind == "lstm" else (True,)
        op = ops.lstm_cell if kind == "lstm" else ops.gru_cell
        torch.library.opcheck(op, (x, *states, *weights, *extra))


def stack_op_inputs(kind, device, dtype, bias, layers, bidirectional, requires_grad=False):
    """input [T, B, 17], states [L*D, B, H] and the flat weights (torch's order)
    of a plain stack."""
    G, D = (4 if kind == "lstm" else 3), (2 if bidirectional else 1)
    t = lambda *s: torch.randn(*s, device=device, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    weights = []
    for layer in range(layers):
        for _ in range(D):
            weights += [t(G * H, 17 if layer == 0 else D * H), t(G * H, H)]
            weights += [t(G * H), t(G * H)] if bias else []
    states = tuple(t(layers * D, B, H) for _ in range(2 if kind == "lstm" else 1))
    return t(T, B, 17), states, weights


def stack_op(kind, x, states, weights, bias, layers, bidirectional, reset_after=True):
    if kind == "lstm":
        return ops.lstm_layers(x, *states, weights, bias, layers, bidirectional)
    return ops.gru_layers(x, *states, weights, bias, layers, bidirectional, reset_after)


def stack_by_layer_ops(kind, x, states, weights, bias, layers, bidirectional, reset_after=True):
    """The stack as functional.rnn_layers runs it: the op calls one by one."""
    D, per = (2 if bidirectional else 1), (4 if bias else 2)
    layer_in, finals = x, [[] for _ in states]
    for layer in range(layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            w_ih, w_hh, b_ih, b_hh = (weights[k * per:(k + 1) * per] + [None, None])[:4]
            x_proj = ops.linear(layer_in, w_ih, b_ih)
            s = [st[k] for st in states]
            train = torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x_proj, *s, w_hh, b_hh))
            if kind == "lstm":
                res = ops.lstm_forward(x_proj, *s, w_hh, None, b_hh, None, d == 1, train)
            else:
                res = ops.gru_forward(x_proj, *s, w_hh, b_hh, None, d == 1, reset_after, train)
            outs.append(res[0])
            for f, r in zip(finals, res[1:1 + len(states)]):
                f.append(r)
        layer_in = torch.cat(outs, -1) if D == 2 else outs[0]
    return (layer_in, *(torch.stack(f) for f in finals))


STACKS = [pytest.param(*a, id=f"{a[0]}-L{a[2]}-{'bi' if a[3] else 'uni'}")
          for a in [("lstm", True, 1, False), ("lstm", True, 2, True), ("gru", True, 2, True),
                    ("gru", False, 1, False)]]


@pytest.mark.parametrize("kind,reset_after,layers,bidirectional", STACKS)
@pytest.mark.parametrize("bias", [True, False])
def test_stack_op_is_the_layer_ops_in_turn(device, kind, reset_after, layers, bidirectional,
                                           bias):
    """lstm_layers / gru_layers: bit for bit the layer ops called layer by layer
    and direction by direction, float32, values and gradients; absent states
    are zeros."""
    x, states, weights = stack_op_inputs(kind, device, torch.float32, bias, layers,
                                         bidirectional, requires_grad=True)
    args = (kind, x, states, weights, bias, layers, bidirectional, reset_after)
    got, want = stack_op(*args), stack_by_layer_ops(*args)
    leaves = [x, *states, *weights]
    g = [torch.randn_like(t) for t in want]
    for a, e, ga, ge in zip(got, want, torch.autograd.grad(got, leaves, g),
                            torch.autograd.grad(want, leaves, g)):
        assert torch.equal(a, e) and torch.equal(ga, ge)
    with torch.no_grad():
        zeros = tuple(torch.zeros_like(s) for s in states)
        none = (None,) * len(states)
        for a, e in zip(stack_op(kind, x, none, weights, bias, layers, bidirectional, reset_after),
                        stack_by_layer_ops(kind, x, zeros, weights, bias, layers, bidirectional,
                                           reset_after)):
            assert torch.equal(a, e)


@pytest.mark.parametrize("kind", KINDS)
def test_stack_op_opcheck(device, kind):
    for bias, layers, bidirectional in ((True, 2, True), (False, 1, False)):
        x, states, weights = stack_op_inputs(kind, device, torch.float64, bias, layers,
                                             bidirectional, requires_grad=True)
        extra = () if kind == "lstm" else (True,)
        op = ops.lstm_layers if kind == "lstm" else ops.gru_layers
        torch.library.opcheck(op, (x, *states, weights, bias, layers, bidirectional, *extra))


@pytest.mark.parametrize("kind", KINDS)
def test_bad_stack_input_is_rejected(kind):
    x, states, weights = stack_op_inputs(kind, "cpu", torch.float32, True, 2, False)
    name = f"fusedrnn::{kind}_layers"
    with pytest.raises(RuntimeError, match=f"{name}: input must be 3-D"):
        stack_op(kind, x[0], states, weights, True, 2, False)
    with pytest.raises(RuntimeError, match=f"{name}: expected 8 weights, got 6"):
        stack_op(kind, x, states, weights[:6], True, 2, False)
    with pytest.raises(RuntimeError, match=f"{name}: expected 4 weights, got 8"):
        stack_op(kind, x, states, weights, False, 2, False)
    with pytest.raises(RuntimeError, match=rf"{name}: states must be \[2, {B}, {H}\]"):
        stack_op(kind, x, tuple(s[:1] for s in states), weights, True, 2, False)
    with pytest.raises(RuntimeError, match=f"{name}: num_layers must be at least 1"):
        stack_op(kind, x, states, [], True, 0, False)


def input_forward(kind, x, states, weights, reverse, reset_after, train=True):
    if kind == "lstm":
        return ops.lstm_input_forward(x, *states, *weights, reverse, train)
    return ops.gru_input_forward(x, *states, *weights, reverse, reset_after, train)


def input_forward_by_layer_ops(kind, x, states, weights, reverse, reset_after):
    w_ih, w_hh, b_ih, b_hh = weights
    x_proj = ops.linear(x, w_ih, b_ih)
    if kind == "lstm":
        return ops.lstm_forward(x_proj, *states, w_hh, None, b_hh, None, reverse, True)
    return ops.gru_forward(x_proj, *states, w_hh, b_hh, None, reverse, reset_after, True)


def input_forward_inputs(kind, device, dtype, bias, grads=True):
    """input [T, B, 17], states [B, H], (w_ih, w_hh, b_ih, b_hh); `grads`: the
    names of those that require grad (True: all)."""
    G = 4 if kind == "lstm" else 3
    names = ["x", "h0"] + (["c0"] if kind == "lstm" else []) + ["w_ih", "w_hh", "b_ih", "b_hh"]
    shapes = [(T, B, 17), (B, H), (B, H), (G * H, 17), (G * H, H), (G * H,), (G * H,)]
    if kind != "lstm":
        shapes.pop(2)
    ts = {n: torch.randn(*sh, device=device, dtype=dtype,
                         requires_grad=grads is True or n in grads)
          for n, sh in zip(names, shapes)}
    if not bias:
        ts["b_ih"] = ts["b_hh"] = None
    states = (ts["h0"], ts["c0"]) if kind == "lstm" else (ts["h0"],)
    return ts["x"], states, [ts["w_ih"], ts["w_hh"], ts["b_ih"], ts["b_hh"]]


@pytest.mark.parametrize("kind,reset_after", [("lstm", True), ("gru", True), ("gru", False)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("grads", [True, ("w_hh", "h0"), ("x", "b_ih")], ids=["all", "w_hh-h0",
                                                                            "x-b_ih"])
def test_input_forward_is_linear_then_the_layer_op(device, kind, reset_after, bias, reverse,
                                                    grads):
    """lstm_input_forward / gru_input_forward (Note [a layer and its projection
    in one node]): bit for bit linear then the layer op, float32, values and
    the gradients of whichever inputs require grad, through the one node
    (C++ where no transform is active)."""
    x, states, weights = input_forward_inputs(kind, device, torch.float32, bias, grads)
    got = input_forward(kind, x, states, weights, reverse, reset_after)
    want = input_forward_by_layer_ops(kind, x, states, weights, reverse, reset_after)
    assert type(got[0].grad_fn).__name__ == "CppFunction"
    n = 3 if kind == "lstm" else 2  # outputs with gradients
    leaves = [t for t in (x, *states, *weights) if t is not None and t.requires_grad]
    g = [torch.randn_like(t) for t in want[:n]]
    for a, e in zip(got, want):
        assert torch.equal(a, e)
    for ga, ge in zip(torch.autograd.grad(got[:n], leaves, g, retain_graph=True),
                      torch.autograd.grad(want[:n], leaves, g, retain_graph=True)):
        assert torch.equal(ga, ge)
    # One output's gradient alone: the others are zeros.
    ga = torch.autograd.grad(got[1], leaves, g[1])
    ge = torch.autograd.grad(want[1], leaves, g[1])
    assert all(torch.equal(a, e) for a, e in zip(ga, ge))


@pytest.mark.parametrize("kind,reset_after", [("lstm", True), ("gru", False)])
def test_input_forward_under_transforms_and_double_backward(kind, reset_after):
    """The Python kernel under torch.func gives the C++ node's gradients; a
    backward that builds a graph (create_graph) takes the reference's, whose
    second derivatives pass gradgradcheck; float64."""
    x, states, weights = input_forward_inputs(kind, "cpu", torch.float64, True)
    args = (x, *states, *weights)
    n = 3 if kind == "lstm" else 2

    def loss(*a):
        out = input_forward(kind, a[0], a[1:len(states) + 1], list(a[len(states) + 1:]), False,
                            reset_after)
        return sum((o * (i + 1)).sum() for i, o in enumerate(out[:n]))

    eager = torch.autograd.grad(loss(*args), args)
    detached = [a.detach() for a in args]
    func = torch.func.grad(loss, argnums=tuple(range(len(args))))(*detached)
    for a, e in zip(func, eager):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    small = [a.detach()[..., :3].contiguous() if a.dim() == 3 else a.detach() for a in args]
    small[0] = small[0][:3, :2].contiguous().requires_grad_()  # x [3, 2, 3]
    small[1:len(states) + 1] = [s[:2].contiguous().requires_grad_()
                                for s in small[1:len(states) + 1]]
    w_ih = small[len(states) + 1][:, :3].contiguous().requires_grad_()
    small[len(states) + 1] = w_ih
    small = [t.requires_grad_() if not t.requires_grad else t for t in small]
    torch.autograd.gradgradcheck(loss, tuple(small))


@pytest.mark.parametrize("kind", KINDS)
def test_input_forward_without_train_refuses_backward(kind):
    x, states, weights = input_forward_inputs(kind, "cpu", torch.float64, True)
    out = input_forward(kind, x, states, weights, False, True, train=False)
    with pytest.raises(RuntimeError, match=f"fusedrnn::{kind}_input_forward was called with "
                                           "train=False"):
        out[0].sum().backward()


@pytest.mark.parametrize("kind", KINDS)
def test_input_forward_opcheck(device, kind):
    for bias in (True, False):
        x, states, weights = input_forward_inputs(kind, device, torch.float64, bias)
        extra = (False,) if kind == "lstm" else (False, True)
        op = ops.lstm_input_forward if kind == "lstm" else ops.gru_input_forward
        torch.library.opcheck(op, (x, *states, *weights, *extra, True))


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_autograd_kernel_where_grad_is_and_is_not_needed(grad_mode):
    """The C++ Autograd kernel: with grad mode off, or no input requiring
    grad, results carry no graph; otherwise they do and backward runs; a bad
    input raises the op's own error either way."""
    d = layer_inputs("lstm", False, "cpu", torch.float64, requires_grad=True)
    args = (d["x_proj"], d["h0"], d["c0"], d["w_hh"], None, d["b_hh"], None, False)
    with torch.set_grad_enabled(grad_mode):
        out = ops.lstm_forward(*args, grad_mode)[0]
        plain = ops.lstm_forward(*(a.detach() if torch.is_tensor(a) else a for a in args),
                                 False)[0]
        with pytest.raises(RuntimeError, match="h0 must have shape"):
            ops.lstm_forward(d["x_proj"], d["h0"][:-1], *args[2:], grad_mode)
        with pytest.raises(RuntimeError, match=r"input \[..., K\] and weight \[N, K\]"):
            ops.linear(d["x_proj"], d["w_hh"], None)
    assert out.requires_grad == grad_mode and (out.grad_fn is not None) == grad_mode
    assert not plain.requires_grad and torch.equal(out.detach(), plain)
    if grad_mode:
        (g,) = torch.autograd.grad(out.sum(), d["x_proj"])
        want = ref.lstm_layer(d["x_proj"], d["h0"], d["c0"], d["w_hh"], b_hh=d["b_hh"])[0]
        (e,) = torch.autograd.grad(want.sum(), d["x_proj"])
        assert rel_err(g, e) < 1e-12
