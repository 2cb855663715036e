"""The classic GRU form (reset_after=False): the op and fusedrnn.GRU and GRUCell
against the reference, and checkpoints moving between the two forms."""
import pytest
import torch

import fusedrnn
from fusedrnn import reference as ref
from fusedrnn._ops import ops

from helpers import B, H, grad_tensors, layer_inputs, rel_err

LAYOUTS = [pytest.param(False, id="padded"), pytest.param(True, id="packed")]
DIRECTIONS = [pytest.param(False, id="fwd"), pytest.param(True, id="rev")]


def test_classic_gru_differs_from_torch_form_only_in_reset():
    """reset_after=False applies r to h before W_hn; with r == 1 both forms agree."""
    xp = torch.randn(B, 3 * H, dtype=torch.float64)
    h = torch.randn(B, H, dtype=torch.float64)
    w_hh = torch.randn(3 * H, H, dtype=torch.float64)
    b_hh = torch.randn(3 * H, dtype=torch.float64)
    a = ref.gru_cell(xp, h, w_hh, b_hh, reset_after=True)
    b = ref.gru_cell(xp, h, w_hh, b_hh, reset_after=False)
    assert (a - b).abs().max() > 1e-3
    xp_sat = xp.clone()
    xp_sat[:, :H] = 50.0  # r = sigmoid(50 + ...) == 1 in float64
    a = ref.gru_cell(xp_sat, h, w_hh, b_hh, reset_after=True)
    b = ref.gru_cell(xp_sat, h, w_hh, b_hh, reset_after=False)
    assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("packed", LAYOUTS)
@pytest.mark.parametrize("reverse", DIRECTIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_classic_gru_matches_reference_and_gradcheck(device, packed, reverse, bias):
    """reset_after=False: n = tanh(x_n + W_hn (r*h) + b_hn), against the
    reference in float64 (values, gradients) and gradcheck."""
    d = layer_inputs("gru", packed, device, torch.float64, bias=bias, requires_grad=True)
    args = lambda dd: (dd["x_proj"], dd["h0"], dd["w_hh"], dd["b_hh"], dd["batch_sizes"], reverse)  # noqa: E731
    got = fusedrnn.gru_layer(*args(d), reset_after=False)
    want = ref.gru_layer(*args(d), reset_after=False)
    torch_form = ref.gru_layer(*args(d), reset_after=True)
    assert rel_err(want[0], torch_form[0]) > 1e-3  # the two forms really differ here
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10
    names = list(grad_tensors(d))
    cs = [torch.randn_like(w) for w in want]
    gg = torch.autograd.grad(sum((g * c).sum() for g, c in zip(got, cs)), [d[n] for n in names])
    gw = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, cs)), [d[n] for n in names])
    for n, a, e in zip(names, gg, gw):
        assert rel_err(a, e) < 1e-10, n

    def f(*tensors):
        return fusedrnn.gru_layer(*args(dict(d, **dict(zip(names, tensors)))), reset_after=False)

    assert torch.autograd.gradcheck(f, [d[n] for n in names])


def test_classic_gru_float32_and_opcheck(device):
    d64 = layer_inputs("gru", False, device, torch.float64, T=9, B=7, H=37, requires_grad=True)
    d32 = {k: (v.detach().float().requires_grad_(True) if isinstance(v, torch.Tensor)
               and v.is_floating_point() else v) for k, v in d64.items()}
    args = lambda dd: (dd["x_proj"], dd["h0"], dd["w_hh"], dd["b_hh"], dd["batch_sizes"], False)  # noqa: E731
    for g, w in zip(fusedrnn.gru_layer(*args(d32), reset_after=False),
                    ref.gru_layer(*args(d64), reset_after=False)):
        assert rel_err(g, w) < 1e-5
    torch.library.opcheck(ops.gru_forward, (*args(d32), False, True))


def reference_stack(m, x, h0, batch_sizes=None):
    """fusedrnn.GRU(reset_after=False) spelled out with reference.gru_layer."""
    dirs = 2 if m.bidirectional else 1
    layer_in, h_n = x, []
    for layer in range(m.num_layers):
        outs = []
        for d, sfx in enumerate(["", "_reverse"][:dirs]):
            p = lambda n: getattr(m, f"{n}_l{layer}{sfx}", None)  # noqa: E731
            xp = layer_in @ p("weight_ih").T + (p("bias_ih") if m.bias else 0)
            o, h = ref.gru_layer(xp, h0[layer * dirs + d], p("weight_hh"), p("bias_hh"),
                                 batch_sizes, reverse=d == 1, reset_after=False)
            outs.append(o)
            h_n.append(h)
        layer_in = torch.cat(outs, -1)
    return layer_in, torch.stack(h_n)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_gru_module_matches_reference(device, bidirectional, bias, packed):
    m = fusedrnn.GRU(6, 5, num_layers=2, bias=bias, bidirectional=bidirectional,
                     reset_after=False, device=device, dtype=torch.float64)
    dirs = 2 if bidirectional else 1
    x = torch.randn(7, 4, 6, device=device, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2 * dirs, 4, 5, device=device, dtype=torch.float64, requires_grad=True)
    if packed:
        inp = torch.nn.utils.rnn.pack_padded_sequence(x, [7, 5, 5, 2])
        out, h_n = m(inp, h0)
        want_out, want_h = reference_stack(m, inp.data, h0, inp.batch_sizes)
        out = out.data
    else:
        out, h_n = m(x, h0)
        want_out, want_h = reference_stack(m, x, h0)
    assert rel_err(out, want_out) < 1e-10 and rel_err(h_n, want_h) < 1e-10
    cs = torch.randn_like(out), torch.randn_like(h_n)
    leaves = [x, h0] + list(m.parameters())
    got = torch.autograd.grad((out * cs[0]).sum() + (h_n * cs[1]).sum(), leaves, retain_graph=True)
    want = torch.autograd.grad((want_out * cs[0]).sum() + (want_h * cs[1]).sum(), leaves)
    for a, e in zip(got, want):
        assert rel_err(a, e) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gru_cell_matches_reference(device, dtype):
    c = fusedrnn.GRUCell(6, 5, reset_after=False, device=device, dtype=dtype)
    x = torch.randn(3, 6, device=device, dtype=dtype)
    h = torch.randn(3, 5, device=device, dtype=dtype)
    want = ref.gru_cell(x @ c.weight_ih.T + c.bias_ih, h, c.weight_hh, c.bias_hh,
                        reset_after=False)
    assert rel_err(c(x, h), want) < (1e-10 if dtype == torch.float64 else 1e-5)
    assert "reset_after=False" in repr(c)


def test_checkpoint_loads_into_either_form():
    torch_gru = torch.nn.GRU(6, 5, num_layers=2).double()
    classic = fusedrnn.GRU(6, 5, num_layers=2, reset_after=False).double()
    classic.load_state_dict(torch_gru.state_dict())
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    torch_form = fusedrnn.from_torch(torch_gru)
    assert rel_err(torch_form(x)[0], torch_gru(x)[0]) < 1e-12
    assert rel_err(classic(x)[0], torch_gru(x)[0]) > 1e-3  # a different function
    torch_gru.load_state_dict(classic.state_dict())
    assert "reset_after=False" in repr(classic) and "reset_after" not in repr(torch_form)
