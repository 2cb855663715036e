"""The classic GRU form (reset_after=False) of fusedrnn.GRU and GRUCell
against the reference, and checkpoints moving between the two forms."""
import pytest
import torch

import fusedrnn
from fusedrnn import reference as ref

from helpers import rel_err


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
