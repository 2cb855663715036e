"""torch.func transforms (grad, vjp, jacrev, functional_call, nested grad) against
torch.nn in float64, and which backward they run (Note [Autograd under torch.func])."""
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vjp

import fusedrnn
from fusedrnn import reference

from helpers import rel_err

TOL = 1e-10  # float64, against torch.nn
CASES = [("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2)),
         ("LSTM", dict(batch_first=True, bias=False)),
         ("GRU", dict(num_layers=2, bidirectional=True)),
         ("LSTMCell", {}), ("GRUCell", dict(bias=False))]
IDS = [f"{k}-{'-'.join(map(str, kw.values())) or 'default'}" for k, kw in CASES]


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def twins(kind, kw):
    ref = getattr(nn, kind)(3, 4, **kw).double()
    return ref, fusedrnn.from_torch(ref)


def inputs(kind):
    return torch.randn(*((2, 3) if kind.endswith("Cell") else (5, 2, 3)), dtype=torch.float64)


def params(module, requires_grad=False):
    return {k: v.detach().clone().requires_grad_(requires_grad)
            for k, v in module.named_parameters()}


def loss_fn(module):
    """A scalar of every output of module(x) with parameters p."""
    def f(p, x):
        out = functional_call(module, p, (x,))
        outs = [out] if isinstance(out, torch.Tensor) else [out[0]] + (
            list(out[1]) if isinstance(out[1], tuple) else [out[1]])
        return sum((o.sin() * (k + 1)).sum() for k, o in enumerate(outs))
    return f


def assert_close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert rel_err(a[k], b[k]) < TOL, k
    elif isinstance(a, (tuple, list)):
        for x, y in zip(a, b, strict=True):
            assert_close(x, y)
    else:
        assert rel_err(a, b) < TOL


@pytest.mark.parametrize("kind,kw", CASES, ids=IDS)
def test_grad_matches_torch_nn(kind, kw):
    ref, ours = twins(kind, kw)
    p, x = params(ref), inputs(kind)
    assert_close(grad(loss_fn(ours), argnums=(0, 1))(p, x), grad(loss_fn(ref), argnums=(0, 1))(p, x))


@pytest.mark.parametrize("kind,kw", CASES, ids=IDS)
def test_vjp_and_jacrev_match_torch_nn(kind, kw):
    ref, ours = twins(kind, kw)
    p, x = params(ref), inputs(kind)
    out = lambda m: (lambda p, x: functional_call(m, p, (x,))[0])  # noqa: E731
    (y_ours, fn_ours), (y_ref, fn_ref) = (vjp(out(m), p, x) for m in (ours, ref))
    assert_close(y_ours, y_ref)
    v = torch.randn_like(y_ref)
    assert_close(fn_ours(v), fn_ref(v))
    assert_close(jacrev(out(ours), argnums=(0, 1))(p, x), jacrev(out(ref), argnums=(0, 1))(p, x))


@pytest.mark.parametrize("kind,kw", CASES, ids=IDS)
def test_nested_grad_matches_torch_nn(kind, kw):
    """grad of grad (a Hessian-vector product through torch.func) takes the
    differentiable backward."""
    ref, ours = twins(kind, kw)
    p, x = params(ref), inputs(kind)
    v = torch.randn_like(x)

    def hvp(m):
        inner = grad(loss_fn(m), argnums=1)
        return grad(lambda p, x: (inner(p, x) * v).sum(), argnums=(0, 1))(p, x)
    assert_close(hvp(ours), hvp(ref))


@pytest.mark.parametrize("kind,kw", CASES[::2], ids=IDS[::2])
def test_grad_of_tracked_parameters_differentiable(kind, kw):
    """Parameters that require grad outside the transform: its gradient is a
    graph plain autograd can differentiate further."""
    ref, ours = twins(kind, kw)
    x = inputs(kind)
    res = []
    for m in (ours, ref):
        p = params(ref, requires_grad=True)
        g = grad(loss_fn(m))(p, x)
        res.append(torch.autograd.grad(sum((t * t).sum() for t in g.values()), list(p.values())))
    assert_close(*res)


def test_plain_grad_runs_the_fused_backward(monkeypatch):
    """torch.func.grad asks for create_graph; with nothing outside it to see that
    graph, the fused backward ops run and the reference is never called. Nested,
    the reference builds the differentiable backward."""
    calls = []
    for name in ("lstm_layer", "gru_layer"):
        fn = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _fn=fn, **k: calls.append(1) or _fn(*a, **k))
    for kind in ("LSTM", "GRU"):
        _, ours = twins(kind, dict(num_layers=2))
        p, x = params(ours), inputs(kind)
        grad(loss_fn(ours), argnums=(0, 1))(p, x)
        assert not calls
        grad(lambda x: grad(loss_fn(ours), argnums=1)(p, x).sum())(x)
        assert calls
        calls.clear()


def test_functional_call_uses_given_parameters():
    ref, ours = twins("GRU", {})
    p, x = params(ref), inputs("GRU")
    p = {k: v * 1.5 for k, v in p.items()}
    assert_close(functional_call(ours, p, (x,)), functional_call(ref, p, (x,)))
