"""Double backward (create_graph=True) through every op and module: gradgradcheck
in float64, Hessian-vector products against torch.nn, and backward ops that
refuse a backward of their own (Note [Double backward] in fusedrnn/_ops.py)."""
import pytest
import torch
from torch import nn

import fusedrnn
from fusedrnn._ops import ops

from helpers import layer_inputs, rel_err

LAYOUTS = [pytest.param(False, id="padded"), pytest.param(True, id="packed")]


def op_fn(kind, d, reverse, reset_after=True):
    """The op as a function of its differentiable inputs, and those inputs."""
    names = [k for k, v in d.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def f(*tensors):
        a = dict(d, **dict(zip(names, tensors)))
        if kind == "lstm":
            return fusedrnn.lstm_layer(a["x_proj"], a["h0"], a["c0"], a["w_hh"], a["w_hr"],
                                       a["b_hh"], a["batch_sizes"], reverse)
        return fusedrnn.gru_layer(a["x_proj"], a["h0"], a["w_hh"], a["b_hh"], a["batch_sizes"],
                                  reverse, reset_after)
    return f, [d[n] for n in names]


@pytest.mark.parametrize("kind,proj,reset_after", [("lstm", False, True), ("lstm", True, True),
                                                   ("gru", False, True), ("gru", False, False)])
@pytest.mark.parametrize("packed", LAYOUTS)
@pytest.mark.parametrize("reverse", [False, True])
def test_gradgradcheck_ops(device, kind, proj, reset_after, packed, reverse):
    d = layer_inputs(kind, packed, device, torch.float64, proj=proj, requires_grad=True, T=3, H=3)
    f, inputs = op_fn(kind, d, reverse, reset_after)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_gradgradcheck_linear(device):
    x = torch.randn(3, 2, 5, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(fusedrnn._ops.linear, [x, w, b])


def hvp(module, x, hx, v):
    """Hessian-vector product of a scalar loss of every output w.r.t. (x, params),
    along v; also the first gradient (create_graph=True)."""
    params = list(module.parameters())
    out = module(x) if hx is None else module(x, hx)
    outs = [out] if isinstance(out, torch.Tensor) else [out[0]] + (
        list(out[1]) if isinstance(out[1], tuple) else [out[1]])
    loss = sum((o.sin() * (k + 1)).sum() for k, o in enumerate(outs))
    grads = torch.autograd.grad(loss, [x] + params, create_graph=True)
    dot = sum((g * vv).sum() for g, vv in zip(grads, v))
    return grads, torch.autograd.grad(dot, [x] + params)


@pytest.mark.parametrize("kind,kw", [
    ("LSTM", dict(num_layers=2)), ("LSTM", dict(bidirectional=True, proj_size=2)),
    ("GRU", dict(num_layers=2, bidirectional=True)), ("GRU", dict(bias=False)),
    ("LSTMCell", {}), ("GRUCell", {})])
def test_hessian_vector_product_matches_torch_nn(kind, kw):
    """float64 on the CPU, to 1e-10: torch.nn supports double backward there."""
    ref = getattr(nn, kind)(5, 4, **kw).double()
    ours = fusedrnn.from_torch(ref)
    cell = kind.endswith("Cell")
    x = torch.randn(*((3, 5) if cell else (4, 3, 5)), dtype=torch.float64, requires_grad=True)
    v = [torch.randn_like(x)] + [torch.randn_like(p) for p in ref.parameters()]
    g_ref, h_ref = hvp(ref, x, None, v)
    g_ours, h_ours = hvp(ours, x, None, v)
    for a, e in zip(list(g_ours) + list(h_ours), list(g_ref) + list(h_ref)):
        assert rel_err(a, e) < 1e-10


def test_gradient_penalty_matches_torch_nn():
    """A gradient penalty on the input (WGAN-GP style) trains the same weights."""
    ref = nn.GRU(5, 4).double()
    ours = fusedrnn.from_torch(ref)
    x = torch.randn(6, 2, 5, dtype=torch.float64, requires_grad=True)
    res = []
    for m in (ref, ours):
        (gx,) = torch.autograd.grad(m(x)[0].sum(), x, create_graph=True)
        res.append(torch.autograd.grad(gx.pow(2).sum(), list(m.parameters())))
    for a, e in zip(*res):
        assert rel_err(a, e) < 1e-10


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_backward_ops_refuse_a_backward(device, kind):
    """Called directly on tensors that require grad, a backward op raises in backward
    rather than return gradients that ignore its dependence on them."""
    d = layer_inputs(kind, False, device, torch.float64, requires_grad=True)
    if kind == "lstm":
        out, h, c, gates, cells = ops.lstm_forward(d["x_proj"], d["h0"], d["c0"], d["w_hh"],
                                                   None, d["b_hh"], None, False, True)
        res = ops.lstm_backward(torch.ones_like(out), torch.ones_like(h), torch.ones_like(c),
                                out, gates, cells, d["h0"],
                                d["c0"], d["w_hh"], None, None, False, True)
    else:
        out, h, gates = ops.gru_forward(d["x_proj"], d["h0"], d["w_hh"], d["b_hh"], None, False,
                                        True, True)
        res = ops.gru_backward(torch.ones_like(out), torch.ones_like(h), out, gates, d["h0"],
                               d["w_hh"], None,
                               False, True, True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        res[0].sum().backward()
