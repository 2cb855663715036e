"""The oracle against torch.nn in float64: outputs, final states, all gradients."""
import pytest
import torch

from fusedrnn import reference as ref

from helpers import B, H, I, P, T, rel_err

TOL = 1e-12


def torch_layer(kind, proj, bias, reverse):
    cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
    kw = dict(proj_size=P) if proj else {}
    return cls(I, H, bias=bias, bidirectional=reverse, **kw).double()


def params(m, suffix):
    p = lambda n: getattr(m, n + suffix, None)  # noqa: E731
    return p("weight_ih_l0"), p("weight_hh_l0"), p("bias_ih_l0"), p("bias_hh_l0"), p("weight_hr_l0")


@pytest.mark.parametrize("kind,proj", [("lstm", False), ("lstm", True), ("gru", False)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_reference_matches_torch_nn(kind, proj, bias, packed):
    # bidirectional torch module: direction 0 forward, direction 1 reverse.
    m = torch_layer(kind, proj, bias, reverse=True)
    Hout = P if proj else H
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, B, Hout, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, B, H, dtype=torch.float64, requires_grad=True)
    lengths = [T, T - 1, 1]
    if packed:
        inp = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
        bs, data = inp.batch_sizes, inp.data
    else:
        inp, bs, data = x, None, x
    out, hn = m(inp, (h0, c0) if kind == "lstm" else h0)
    want = [out.data if packed else out] + (list(hn) if kind == "lstm" else [hn])

    outs, h_n, c_n = [], [], []
    for d, suffix in enumerate(["", "_reverse"]):
        w_ih, w_hh, b_ih, b_hh, w_hr = params(m, suffix)
        xp = data @ w_ih.T + (b_ih if b_ih is not None else 0)
        if kind == "lstm":
            o, h, c = ref.lstm_layer(xp, h0[d], c0[d], w_hh, w_hr, b_hh, bs, reverse=d == 1)
            c_n.append(c)
        else:
            o, h = ref.gru_layer(xp, h0[d], w_hh, b_hh, bs, reverse=d == 1)
        outs.append(o)
        h_n.append(h)
    got = [torch.cat(outs, -1), torch.stack(h_n)] + ([torch.stack(c_n)] if kind == "lstm" else [])
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_err(g, w) < TOL
    cs = [torch.randn_like(w) for w in want]
    leaves = [x, h0] + ([c0] if kind == "lstm" else []) + list(m.parameters())
    gw = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, cs)), leaves, retain_graph=True)
    gg = torch.autograd.grad(sum((g * c).sum() for g, c in zip(got, cs)), leaves)
    for a, e in zip(gg, gw):
        assert rel_err(a, e) < TOL
