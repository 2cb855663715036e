"""fusedrnn.gradflow.gradient_flow: per-step gradient norms, against explicit unrolls."""

import pytest
import torch
from torch import nn

import fusedrnn
from fusedrnn import gradflow

T, B, I, H = 12, 4, 2, 6
F64 = {"rtol": 1e-12, "atol": 1e-15}


def _classes():
    return [
        pytest.param(c, id=f"{c.__module__.split('.')[0]}.{c.__name__}")
        for c in (nn.RNN, nn.GRU, nn.LSTM, fusedrnn.GRU, fusedrnn.LSTM)
    ]


class Regressor(nn.Module):
    """A recurrent layer, then a linear head on the last step: (T, B, I) -> (B,)."""

    def __init__(self, rnn_cls, input_size, hidden_size, num_layers=1):
        super().__init__()
        self.rnn = rnn_cls(input_size, hidden_size, num_layers)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[-1]).squeeze(-1)


def _batch(seed, steps=T, batch=B, inputs=I):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(steps, batch, inputs, generator=g, dtype=torch.float64),
            torch.rand(batch, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("cls", _classes())
def test_gradient_flow_shapes_and_dx(cls):
    """dx is the gradient of the unhooked model; the loss is unchanged; .grad untouched."""
    torch.manual_seed(0)
    model = Regressor(cls, I, H, num_layers=2).double()
    x, target = _batch(1)
    flow = gradflow.gradient_flow(model, x, target)
    assert flow["dx"].shape == (T,) and flow["dh"].shape == (T,)
    assert (flow["dx"] > 0).all() and (flow["dh"] > 0).all()
    assert all(p.grad is None for p in model.parameters())

    x = x.clone().requires_grad_()
    loss = nn.functional.mse_loss(model(x), target)
    (grad,) = torch.autograd.grad(loss, x)
    assert flow["loss"] == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(flow["dx"], grad.flatten(1).norm(dim=1), **F64)


def _cell_unroll_dh(model, x, target):
    """||dLoss/dh_t|| by an explicit cell loop with the model's weights (one layer)."""
    rnn = model.rnn
    cell_cls = {"LSTM": nn.LSTMCell, "GRU": nn.GRUCell}.get(type(rnn).__name__, nn.RNNCell)
    cell = cell_cls(I, H, dtype=torch.float64)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        setattr(cell, name, getattr(rnn, name + "_l0"))
    h = torch.zeros(x.shape[1], H, dtype=torch.float64)
    state = (h, h) if cell_cls is nn.LSTMCell else h
    hs = []
    for x_t in x:
        state = cell(x_t, state)
        hs.append(state[0] if isinstance(state, tuple) else state)
    loss = nn.functional.mse_loss(model.head(hs[-1]).squeeze(-1), target)
    return torch.stack([g.norm() for g in torch.autograd.grad(loss, hs)])


@pytest.mark.parametrize("cls", _classes())
def test_dh_is_the_total_derivative(cls):
    """dh_t equals the gradient w.r.t. h_t in an explicit cell loop, through all later steps
    (the gradient of the output sequence alone would be 0 for t < T)."""
    torch.manual_seed(2)
    model = Regressor(cls, I, H).double()
    x, target = _batch(3)
    dh = gradflow.gradient_flow(model, x, target)["dh"]
    torch.testing.assert_close(dh, _cell_unroll_dh(model, x, target), **F64)

    out = model.rnn(x)[0]
    out.retain_grad()
    nn.functional.mse_loss(model.head(out[-1]).squeeze(-1), target).backward()
    assert (out.grad[:-1] == 0).all()


@pytest.mark.parametrize("seed", range(3))
def test_plain_rnn_gradient_vanishes_monotonically_at_init(seed):
    """At torch's default init, ||dLoss/dx_t|| and ||dLoss/dh_t|| shrink at every step back.

    dx_t is dh_t's image under W_ih^T, which with 2 inputs swings from step to step; with
    32 inputs it decays as steadily as dh_t. So dx is checked on 32 inputs, dh on both.
    """
    torch.manual_seed(seed)
    wide = Regressor(nn.RNN, 32, 32).double()
    narrow = Regressor(nn.RNN, I, 32).double()
    flows = {
        "32 inputs": gradflow.gradient_flow(wide, *_batch(seed, steps=40, batch=16, inputs=32)),
        "2 inputs": gradflow.gradient_flow(narrow, *_batch(seed, steps=40, batch=16)),
    }
    for task, key in (("32 inputs", "dx"), ("32 inputs", "dh"), ("2 inputs", "dh")):
        norms = flows[task][key]
        assert (norms[:-1] < norms[1:]).all(), f"{task} {key} not decreasing going back: {norms}"
        assert norms[0] < 1e-6 * norms[-1]


def test_batch_first_measures_along_dim_1():
    class BatchFirst(nn.Module):
        def __init__(self, time_major):
            super().__init__()
            self.rnn = nn.GRU(I, H, batch_first=True, dtype=torch.float64)
            self.rnn.load_state_dict(time_major.rnn.state_dict())
            self.head = time_major.head

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1]).squeeze(-1)

    torch.manual_seed(4)
    time_major = Regressor(nn.GRU, I, H).double()
    x, target = _batch(5)
    expected = gradflow.gradient_flow(time_major, x, target)
    got = gradflow.gradient_flow(BatchFirst(time_major), x.transpose(0, 1), target)
    for key in ("dx", "dh"):
        torch.testing.assert_close(got[key], expected[key], **F64)


def test_bidirectional_is_refused():
    model = Regressor(lambda i, h, n: nn.LSTM(i, h, n, bidirectional=True), I, H).double()
    model.head = nn.Linear(2 * H, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="unidirectional"):
        gradflow.gradient_flow(model, *_batch(0))


