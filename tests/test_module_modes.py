"""The modules under torch.compile(fullgraph=True), torch.no_grad,
torch.inference_mode and autocast, and backward after an eval-mode forward."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fusedrnn

from helpers import B, H, I, P, T, rel_err
from module_helpers import (fresh_leaves, flat_outputs, outputs_and_grads, rnn_call_args,
                            rnn_inputs, twins)

F64_TOL = 1e-10

MODULES = [
    pytest.param("LSTM", dict(num_layers=2, bidirectional=True, proj_size=P), id="lstm-bi-proj"),
    pytest.param("GRU", dict(num_layers=2, bidirectional=True, batch_first=True), id="gru-bi-bf"),
]


def _cell_call(kind, device, dtype, hx_given=True):
    leaves = {"x": torch.randn(B, I, device=device, dtype=dtype)}
    if hx_given:
        leaves["h0"] = torch.randn(B, H, device=device, dtype=dtype)
        if kind == "LSTMCell":
            leaves["c0"] = torch.randn(B, H, device=device, dtype=dtype)
    return leaves


def _cell_args(leaves):
    if "h0" not in leaves:
        return (leaves["x"],)
    return (leaves["x"], (leaves["h0"], leaves["c0"]) if "c0" in leaves else leaves["h0"])


# ------------------------------------------------------------------ torch.compile
# Each layout with and without hx across the two modules (packed with hx is
# the data-dependent case: batch_sizes[0] against hx's batch).
COMPILE_CASES = [pytest.param(*m.values, layout, hx_given,
                              id=f"{m.id}-{layout}-{'hx' if hx_given else 'nohx'}")
                 for i, m in enumerate(MODULES)
                 for j, layout in enumerate(["padded", "unbatched", "packed", "packed_unsorted"])
                 for hx_given in [(i + j) % 2 == 1]]


@pytest.mark.parametrize("kind,kw,layout,hx_given", COMPILE_CASES)
def test_compile_fullgraph_matches_eager(device, kind, kw, layout, hx_given):
    torch._dynamo.reset()
    ours = getattr(fusedrnn, kind)(I, H, device=device, **kw)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    leaves = rnn_inputs(ours, layout, hx_given, device, torch.float32)
    le, lc = fresh_leaves(leaves), fresh_leaves(leaves)
    _, want, want_g, w = outputs_and_grads(ours, rnn_call_args(ours, layout, le), le)
    _, got, got_g, _ = outputs_and_grads(compiled, rnn_call_args(ours, layout, lc), lc, weights=w)
    for a, e in list(zip(got, want)) + [(got_g[n], want_g[n]) for n in want_g]:
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell"])
def test_compile_fullgraph_cells(device, kind):
    torch._dynamo.reset()
    ours = getattr(fusedrnn, kind)(I, H, device=device)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    leaves = _cell_call(kind, device, torch.float32)
    le, lc = fresh_leaves(leaves), fresh_leaves(leaves)
    _, want, want_g, w = outputs_and_grads(ours, _cell_args(le), le)
    _, got, got_g, _ = outputs_and_grads(compiled, _cell_args(lc), lc, weights=w)
    for a, e in list(zip(got, want)) + [(got_g[n], want_g[n]) for n in want_g]:
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_compile_fullgraph_model_with_dropout_in_training():
    """A model around the modules, in training mode with dropout, in one graph."""
    torch._dynamo.reset()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = fusedrnn.LSTM(I, H, num_layers=2, dropout=0.5)
            self.cell = fusedrnn.GRUCell(H, H)
            self.head = nn.Linear(H, 1)

        def forward(self, x):
            out, (h, _) = self.rnn(x)
            return self.head(self.cell(out[-1], h[-1])).sum()

    model = Model()
    loss = torch.compile(model, fullgraph=True, backend="aot_eager")(torch.randn(T, B, I))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_compile_dynamic_batch_compiles_once(device):
    """With dynamic shapes, a training step at another batch size and length
    reuses the graph (the ops' fake kernels keep sizes symbolic). Sizes of 1
    would compile again: torch specialises sizes 0 and 1."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ours = fusedrnn.LSTM(I, H, num_layers=2, device=device)
    compiled = torch.compile(ours, dynamic=True, fullgraph=True, backend=backend)
    for t, b in [(T, B), (T + 3, B + 2), (2, 2)]:
        x = torch.randn(t, b, I, device=device, requires_grad=True)
        out, (h, c) = compiled(x)
        want = ours(x.detach())
        torch.testing.assert_close(out, want[0], rtol=1e-6, atol=1e-6)
        (out.sum() + h.sum()).backward()
        assert x.grad.shape == x.shape
    assert len(graphs) == 1


# ------------------------------------------------------------------ torch.export
EXPORT_CASES = [
    pytest.param("LSTM", dict(num_layers=2, bidirectional=True, proj_size=P), id="lstm-bi-proj"),
    pytest.param("GRU", dict(bidirectional=True, batch_first=True), id="gru-bi-bf"),
    pytest.param("GRU", dict(layer_norm=True, zoneout=0.1), id="gru-layer-norm-zoneout"),
    pytest.param("LSTMCell", {}, id="lstmcell"),
    pytest.param("GRUCell", dict(bias=False), id="grucell"),
]


@pytest.mark.parametrize("kind,kw", EXPORT_CASES)
@pytest.mark.parametrize("hx_given", [False, True], ids=["nohx", "hx"])
def test_export_with_dynamic_sizes_matches_eager(kind, kw, hx_given):
    """torch.export.export with the batch (and the sequence length) dynamic:
    the program calls the fused ops, and at other sizes returns what the eager
    module returns."""
    from torch.export import Dim
    ours = getattr(fusedrnn, kind)(I, H, **kw).eval()
    cell = kind.endswith("Cell")
    batch_dim = 0 if cell or kw.get("batch_first") else 1
    lead = 1 if cell else ours.num_layers * (2 if ours.bidirectional else 1)
    out_size = kw.get("proj_size", H)

    def call_args(t, b):
        x = torch.randn(*((b,) if cell else (b, t) if batch_dim == 0 else (t, b)), I)
        if not hx_given:
            return (x,)
        hs = [torch.randn(*(() if cell else (lead,)), b, out_size)]
        if kind.startswith("LSTM"):
            hs.append(torch.randn(*(() if cell else (lead,)), b, H))
        return (x, tuple(hs) if len(hs) == 2 else hs[0])

    batch, steps = Dim("batch"), Dim("steps")
    x_dims = {batch_dim: batch} if cell else {batch_dim: batch, 1 - batch_dim: steps}
    h_dims = {0: batch} if cell else {1: batch}
    hx_dims = (h_dims, h_dims) if kind.startswith("LSTM") else h_dims
    dynamic = (x_dims, hx_dims) if hx_given else (x_dims,)
    with warnings.catch_warnings():
        # torch.nn.RNNBase's forward assigns _flat_weights, which export notes
        # in a warning; torch.nn.LSTM's export gives the same one.
        warnings.filterwarnings("ignore", message="The tensor attributes self._flat_weights")
        program = torch.export.export(ours, call_args(T, B), dynamic_shapes=dynamic)
    called = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(name.startswith("fusedrnn.") and "forward" in name for name in called), called
    for t, b in [(T, B), (T + 3, B + 2), (2, 1)]:
        args = call_args(t, b)
        got, want = flat_outputs(program.module()(*args)), flat_outputs(ours(*args))
        assert len(got) == len(want)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=0, atol=0)


# ------------------------------------------------------------------ no_grad, inference_mode
ALL_KINDS = [pytest.param("LSTM", dict(num_layers=2, bidirectional=True), id="lstm"),
             pytest.param("GRU", dict(num_layers=2), id="gru"),
             pytest.param("LSTMCell", {}, id="lstmcell"), pytest.param("GRUCell", {}, id="grucell")]


def _call(module, kind, device, dtype=torch.float64):
    if kind.endswith("Cell"):
        return module(*_cell_args(_cell_call(kind, device, dtype)))
    leaves = rnn_inputs(module, "packed_unsorted", True, device, dtype)
    return module(*rnn_call_args(module, "packed_unsorted", leaves))


@pytest.mark.parametrize("kind,kw", ALL_KINDS)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode(device, kind, kw, mode):
    ref, ours = twins(kind, device, torch.float64, **kw)
    torch.manual_seed(1)
    want = flat_outputs(_call(ref, kind, device))
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        torch.manual_seed(1)
        got = flat_outputs(_call(ours, kind, device))
    for g, w in zip(got, want):
        assert not g.requires_grad and g.grad_fn is None
        assert g.is_inference() == (mode == "inference_mode")
        assert rel_err(g, w.detach()) < F64_TOL


# ------------------------------------------------------------------ the plain stack's short way
@pytest.mark.parametrize("kind,kw", MODULES)
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "no-hx"])
def test_short_way_is_bitwise_the_planned_path(kind, kw, hx_given, monkeypatch):
    """Note [a plain stack's short way]: taken for a plain padded call, and the same
    outputs and gradients, bit for bit, as the planned path, dropout masks included."""
    from fusedrnn import functional
    _, ours = twins(kind, "cpu", torch.float32, dropout=0.3, **kw)
    ours.train()
    leaves = rnn_inputs(ours, "padded", hx_given, "cpu", torch.float32)
    taken = []
    short = functional._plain_layers

    def counted(*args):
        res = short(*args)
        taken.append(res is not None)
        return res

    results = []
    for way in (counted, lambda *args: None):
        monkeypatch.setattr(functional, "_plain_layers", way)
        call = fresh_leaves(leaves)
        torch.manual_seed(7)
        results.append(outputs_and_grads(ours, rnn_call_args(ours, "padded", call), call))
    assert taken == [True]
    (_, outs_a, grads_a, _), (_, outs_b, grads_b, _) = results
    for a, b in zip(outs_a, outs_b):
        assert torch.equal(a, b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


# ------------------------------------------------------------------ eval-mode backward
@pytest.mark.parametrize("kind,kw", ALL_KINDS)
def test_backward_after_eval_mode_forward(device, kind, kw):
    ref, ours = twins(kind, device, torch.float64, dropout=0.3, **kw) if not kind.endswith("Cell") \
        else twins(kind, device, torch.float64)
    ref.eval(), ours.eval()
    if kind.endswith("Cell"):
        leaves = _cell_call(kind, device, torch.float64)
        args = _cell_args
    else:
        leaves = rnn_inputs(ref, "padded", True, device, torch.float64)
        args = lambda lv: rnn_call_args(ref, "padded", lv)  # noqa: E731
    lr, lo = fresh_leaves(leaves), fresh_leaves(leaves)
    _, want, want_g, w = outputs_and_grads(ref, args(lr), lr)
    _, got, got_g, _ = outputs_and_grads(ours, args(lo), lo, weights=w)
    for a, e in list(zip(got, want)) + [(got_g[n], want_g[n]) for n in want_g]:
        assert rel_err(a, e) < F64_TOL


# ------------------------------------------------------------------ autocast
AUTOCAST_CASES = [
    # (kind, module kwargs, layout, input dtype, states given in this dtype or None)
    ("LSTM", dict(num_layers=2), "padded", torch.float32, None),
    ("LSTM", dict(num_layers=2, bidirectional=True), "padded", torch.float32, torch.float32),
    ("LSTM", dict(num_layers=2), "padded", torch.bfloat16, None),
    ("LSTM", dict(num_layers=2), "packed_unsorted", torch.float32, None),
    ("LSTM", dict(num_layers=2), "packed", torch.float32, torch.bfloat16),
    ("LSTM", dict(proj_size=P), "padded", torch.float32, None),
    ("LSTM", dict(proj_size=P), "packed", torch.bfloat16, torch.float32),
    ("GRU", dict(num_layers=2, bidirectional=True), "padded", torch.float32, None),
    ("GRU", dict(num_layers=2), "padded", torch.float32, torch.bfloat16),
    ("GRU", dict(num_layers=2), "packed_unsorted", torch.bfloat16, None),
    ("GRU", dict(), "unbatched", torch.bfloat16, torch.float32),
    ("LSTMCell", dict(), None, torch.float32, None),
    ("LSTMCell", dict(), None, torch.bfloat16, torch.float32),
    ("GRUCell", dict(), None, torch.float32, torch.float32),
    ("GRUCell", dict(), None, torch.bfloat16, None),
]


def _autocast_leaves(kind, module, layout, x_dtype, h_dtype, device):
    if kind.endswith("Cell"):
        leaves = _cell_call(kind, device, torch.float64, hx_given=h_dtype is not None)
    else:
        leaves = rnn_inputs(module, layout, h_dtype is not None, device, torch.float64)
    return {k: v.to(x_dtype if k == "x" else h_dtype) for k, v in leaves.items()}


# torch.nn's CPU LSTM on float32 input under bfloat16 autocast runs oneDNN's
# bfloat16 RNN, which oneDNN cannot build on a CPU without AVX-512 (AVX2
# only): torch.nn raises there, and there is no reference to compare with.
ONEDNN_CANNOT_BUILD = "could not create a primitive descriptor for the LSTM"


def torch_nn_or_skip(run):
    """run() (a torch.nn call under autocast); skip where oneDNN cannot build it."""
    try:
        return run()
    except RuntimeError as e:
        if ONEDNN_CANNOT_BUILD not in str(e):
            raise
        pytest.skip("torch.nn's LSTM raises under bfloat16 autocast on this CPU "
                    f"(oneDNN: {ONEDNN_CANNOT_BUILD}): nothing to compare with")


def _autocast_run(module, kind, layout, leaves, weights=None, autocast=True):
    lv = fresh_leaves(leaves)
    args = _cell_args(lv) if kind.endswith("Cell") else rnn_call_args(module, layout, lv)
    with torch.autocast(lv["x"].device.type, dtype=torch.bfloat16, enabled=autocast):
        return outputs_and_grads(module, args, lv, weights=weights)


def _autocast_id(case):
    kind, kw, layout, x_dtype, h_dtype = case
    dt = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    return "-".join([kind, *kw, layout or "cell", f"x_{dt(x_dtype)}",
                     f"hx_{dt(h_dtype)}" if h_dtype else "nohx"])


@pytest.mark.parametrize("kind,kw,layout,x_dtype,h_dtype", AUTOCAST_CASES,
                         ids=[_autocast_id(c) for c in AUTOCAST_CASES])
def test_autocast_bf16_dtypes_and_values(kind, kw, layout, x_dtype, h_dtype):
    """CPU autocast to bfloat16: every output in torch.nn's dtype, and outputs and
    gradients no further from a float64 run than a small multiple of torch.nn's
    own error under the same autocast."""
    ref, ours = twins(kind, "cpu", torch.float32, **kw)
    leaves = _autocast_leaves(kind, ref, layout, x_dtype, h_dtype, "cpu")
    _, want, want_g, w = torch_nn_or_skip(lambda: _autocast_run(ref, kind, layout, leaves))
    _, got, got_g, _ = _autocast_run(ours, kind, layout, leaves, weights=w)
    assert [o.dtype for o in got] == [o.dtype for o in want]
    ref64 = copy.deepcopy(ref).double()
    _, exact, exact_g, _ = _autocast_run(
        ref64, kind, layout, {k: v.double() for k, v in leaves.items()}, weights=w, autocast=False)
    for g, t, e in list(zip(got, want, exact)) + [(got_g[n], want_g[n], exact_g[n])
                                                   for n in exact_g]:
        assert g.dtype == t.dtype
        ours_err, theirs = rel_err(g, e), rel_err(t, e)
        # bfloat16 keeps 8 bits: torch's own error here is ~1e-3 to 1e-2.
        assert ours_err <= 4 * theirs + 2 ** -8, (ours_err, theirs)


def test_autocast_leaves_float64_alone():
    """Autocast never casts float64: a float64 model runs in float64, as torch.nn's."""
    ref, ours = twins("GRU", "cpu", torch.float64, num_layers=2)
    x = torch.randn(T, B, I, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = ours(x), ref(x)
    for g, w in zip(flat_outputs(got), flat_outputs(want)):
        assert g.dtype == w.dtype == torch.float64
        assert rel_err(g, w) < F64_TOL


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_autocast_follows_torch_when_onednn_is_off(kind):
    """torch.nn's CPU LSTM leaves oneDNN (and so its result dtype) with the flag."""
    ref, ours = twins(kind, "cpu", torch.float32)
    x = torch.randn(T, B, I)
    for enabled in (False, True):
        with torch.backends.mkldnn.flags(enabled=enabled), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            want = flat_outputs(torch_nn_or_skip(lambda: ref(x)))
            got = flat_outputs(ours(x))
        assert [g.dtype for g in got] == [w.dtype for w in want]


# ------------------------------------------------------------------ activation checkpointing
@pytest.mark.parametrize("kw", [dict(num_layers=2, dropout=0.3),
                                dict(layer_norm=True, zoneout=0.2, zoneout_cell=0.1,
                                     recurrent_dropout=0.2)],
                         ids=["dropout", "regularisers"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_recomputes_the_same_step(kw, reentrant):
    """torch.utils.checkpoint (and save_on_cpu) around a training-mode layer:
    the recomputed forward draws the same dropout and zoneout masks, so
    outputs and every gradient equal the plain step's, bitwise."""
    from torch.utils.checkpoint import checkpoint
    m = fusedrnn.LSTM(I, H, **kw).double().train()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)

    def step(fn):
        m.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(1)
        out = fn(x)
        out.square().sum().backward()
        return [out.detach(), x.grad] + [p.grad for p in m.parameters()]

    def offloaded(t):
        with torch.autograd.graph.save_on_cpu():
            return m(t)[0]

    want = step(lambda t: m(t)[0])
    for got in (step(lambda t: checkpoint(lambda u: m(u)[0], t, use_reentrant=reentrant)),
                step(offloaded)):
        for a, e in zip(got, want):
            assert torch.equal(a, e)


# ------------------------------------------------------------------ the meta device
@pytest.mark.parametrize("kind,kw", [("LSTM", dict(num_layers=2, bidirectional=True, proj_size=P)),
                                     ("GRU", dict(batch_first=True)), ("LSTMCell", {}),
                                     ("GRUCell", {}), ("LSTM", dict(layer_norm=True, zoneout=0.1))],
                         ids=["lstm", "gru", "lstmcell", "grucell", "lstm-regularised"])
def test_meta_device_gives_torch_nn_shapes(kind, kw):
    """Modules built on the meta device (deferred initialisation, shape
    inference) run forward and backward there, with torch.nn's output
    shapes and dtypes (torch.nn's own module where it has one)."""
    cell = kind.endswith("Cell")
    x = torch.randn(*((B, I) if cell else (T, B, I)), device="meta", requires_grad=True)
    ours = getattr(fusedrnn, kind)(I, H, device="meta", **kw)
    plain = {k: v for k, v in kw.items() if k not in ("layer_norm", "zoneout")}
    theirs = getattr(nn, kind)(I, H, device="meta", **plain)
    got, want = flat_outputs(ours(x)), flat_outputs(theirs(x))
    assert [(t.shape, t.dtype, t.device.type) for t in got] == \
        [(t.shape, t.dtype, t.device.type) for t in want]
    sum(t.sum() for t in got).backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"
