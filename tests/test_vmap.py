"""torch.vmap through the ops and modules against a Python loop, without the
fallback's warnings; one kernel call when only inputs and states are mapped
(Note [vmap by folding] in fusedrnn/_vmap.py)."""
import warnings

import pytest
import torch
from torch.func import functional_call, grad, vmap

import fusedrnn

from helpers import layer_inputs, rel_err
from module_helpers import OpLog

V = 3
TOL = 1e-10  # float64: the same kernels on a larger batch


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def assert_close(a, b):
    if isinstance(a, dict):
        a, b = [a[k] for k in sorted(a)], [b[k] for k in sorted(b)]
    if isinstance(a, (tuple, list)):
        for x, y in zip(a, b, strict=True):
            assert_close(x, y)
    else:
        assert a.shape == b.shape
        assert rel_err(a, b) < TOL


def stack(results):
    """torch.stack over a list of (nested tuples of) tensors."""
    if isinstance(results[0], torch.Tensor):
        return torch.stack(results)
    if isinstance(results[0], dict):
        return {k: stack([r[k] for r in results]) for k in results[0]}
    return tuple(stack(list(r)) for r in zip(*results))


def loop(fn, in_dims, *args):
    """What vmap(fn, in_dims) computes, one copy at a time."""
    def pick(a, d, v):
        if d is None:
            return a
        if isinstance(a, dict):
            return {k: t.select(d, v) for k, t in a.items()}
        return tuple(pick(t, d, v) for t in a) if isinstance(a, tuple) else a.select(d, v)
    return stack([fn(*(pick(a, d, v) for a, d in zip(args, in_dims))) for v in range(V)])


MODULES = [("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2)),
           ("LSTM", dict(batch_first=True)), ("GRU", dict(num_layers=2)),
           ("GRU", dict(bidirectional=True, bias=False)), ("LSTMCell", {}), ("GRUCell", {})]
IDS = [f"{k}-{'-'.join(map(str, kw.values())) or 'default'}" for k, kw in MODULES]


def make(kind, kw):
    return getattr(fusedrnn, kind)(5, 4, **kw).double()


@pytest.mark.parametrize("kind,kw", MODULES, ids=IDS)
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("hx_mapped", [False, True], ids=["hx-none", "hx-mapped"])
def test_module_matches_loop_with_one_kernel_call(kind, kw, batched, hx_mapped):
    m = make(kind, kw)
    cell = kind.endswith("Cell")
    shape = ((2,) if batched else ()) + (5,) if cell else (((2,) if batched else ()) + (6, 5)
                                                        if kw.get("batch_first")
                                                        else (6,) + ((2,) if batched else ()) + (5,))
    x = torch.randn(V, *shape, dtype=torch.float64)
    if not hx_mapped:
        fn, args, dims = m, (x,), (0,)
    else:
        n = 1 if cell else m.num_layers * (2 if m.bidirectional else 1)
        state = lambda size: torch.randn(V, *(() if cell else (n,)), *((2,) if batched else ()),  # noqa: E731
                                         size, dtype=torch.float64)
        hx = ((state(getattr(m, "proj_size", 0) or m.hidden_size), state(m.hidden_size))
              if "LSTM" in kind
              else state(m.hidden_size))
        fn, args, dims = m, (x, hx), (0, 0)
    with OpLog() as log:
        got = vmap(fn, dims)(*args)
    assert_close(got, loop(fn, dims, *args))
    calls = [op for op in log.ops if op.startswith("fusedrnn.") and op.endswith("_forward")]
    assert len(calls) == (1 if cell else m.num_layers * (2 if m.bidirectional else 1))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_ops_fold_any_mapped_dim(kind, packed, reverse):
    """x_proj mapped on a middle dim, states mapped or shared."""
    d = layer_inputs(kind, packed, "cpu", torch.float64, proj=kind == "lstm")
    x = torch.stack([d["x_proj"] * (v + 1) for v in range(V)], dim=1)
    h0 = torch.stack([d["h0"] + v for v in range(V)], dim=-1)
    if kind == "lstm":
        def fn(x, h0):
            return fusedrnn.lstm_layer(x, h0, d["c0"], d["w_hh"], d["w_hr"], d["b_hh"],
                                       d["batch_sizes"], reverse)
    else:
        def fn(x, h0):
            return fusedrnn.gru_layer(x, h0, d["w_hh"], d["b_hh"], d["batch_sizes"], reverse)
    for dims, h in [((1, -1), h0), ((1, None), d["h0"])]:
        assert_close(vmap(fn, dims)(x, h), loop(fn, dims, x, h))


@pytest.mark.parametrize("kind,kw", MODULES[::2] + MODULES[3:4], ids=IDS[::2] + IDS[3:4])
def test_mapped_weights_loop_correctly(kind, kw):
    """An ensemble of models (weights mapped) runs one call per member."""
    m = make(kind, kw)
    params = {k: torch.stack([p.detach() * (1 + 0.1 * v) for v in range(V)])
              for k, p in m.named_parameters()}
    x = torch.randn(*((2, 5) if kind.endswith("Cell") else (6, 2, 5)), dtype=torch.float64)
    fn = lambda p, x: functional_call(m, p, (x,))  # noqa: E731
    assert_close(vmap(fn, (0, None))(params, x), loop(fn, (0, None), params, x))


@pytest.mark.parametrize("kind,kw", MODULES, ids=IDS)
def test_per_sample_gradients_match_loop(kind, kw):
    """vmap(grad): per-sample gradients of every parameter and input."""
    m = make(kind, kw)
    params = {k: p.detach() for k, p in m.named_parameters()}
    shape = (2, 5) if kind.endswith("Cell") else ((2, 6, 5) if kw.get("batch_first") else (6, 2, 5))
    xs = torch.randn(V, *shape, dtype=torch.float64)

    def loss(p, x):
        out = functional_call(m, p, (x,))
        out = out if isinstance(out, torch.Tensor) else out[0]
        return out.sin().sum()
    g = grad(loss, argnums=(0, 1))
    assert_close(vmap(g, (None, 0))(params, xs), loop(g, (None, 0), params, xs))


def test_linear_vmap():
    w = torch.randn(3, 7, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    f = fusedrnn._ops.linear
    for x, dims in [(torch.randn(V, 4, 7), (0, None, None)), (torch.randn(4, V, 7), (1, None, None)),
                    (torch.randn(4, 7, V), (2, None, None))]:
        x = x.double()
        assert_close(vmap(f, dims)(x, w, b), loop(f, dims, x, w, b))
    x, bs = torch.randn(V, 4, 7, dtype=torch.float64), torch.randn(V, 3, dtype=torch.float64)
    assert_close(vmap(f, (0, None, 0))(x, w, bs), loop(f, (0, None, 0), x, w, bs))
