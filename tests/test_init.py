"""fusedrnn.init: orthogonal gate blocks, Xavier input blocks, keep-gate biases, on every
module with torch.nn's parameter names (torch.nn's and fusedrnn's)."""

import math

import pytest
import torch
from torch import nn

import fusedrnn
from fusedrnn import init as rnn_init

I, H, VALUE = 7, 5, 1.5
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _modules():
    """(kind, module) params covering layers (stacked, bidirectional, projected) and cells."""
    cases = []
    for ns in (nn, fusedrnn):
        cases += [
            ("LSTM", ns.LSTM(I, H, num_layers=2, bidirectional=True)),
            ("GRU", ns.GRU(I, H, num_layers=2, bidirectional=True)),
            ("LSTM", ns.LSTMCell(I, H)),
            ("GRU", ns.GRUCell(I, H)),
            ("LSTM", ns.LSTM(I, H, proj_size=3)),
        ]
    cases += [("RNN", nn.RNN(I, H, num_layers=2)), ("RNN", nn.RNNCell(I, H))]
    return [
        pytest.param(kind, m, id=f"{type(m).__module__.split('.')[0]}.{type(m).__name__}-{i}")
        for i, (kind, m) in enumerate(cases)
    ]


def _groups(module):
    """{suffix: {weight_ih, weight_hh, bias_ih, bias_hh, weight_hr}} from the parameter names."""
    groups = {}
    for name, p in module.named_parameters():
        kind, _, rest = name.partition("_")  # weight / bias
        which, _, suffix = rest.partition("_")  # ih / hh / hr, then l0[_reverse]
        groups.setdefault(suffix, {})[f"{kind}_{which}"] = p
    return groups


def _assert_orthonormal_rows_or_columns(block, gain=1.0):
    gram = block @ block.T if block.shape[0] <= block.shape[1] else block.T @ block
    torch.testing.assert_close(
        gram, gain**2 * torch.eye(len(gram), dtype=gram.dtype), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("kind,module", _modules())
def test_init_rnn_properties(kind, module):
    gates = GATES[kind]
    torch.manual_seed(0)
    assert rnn_init.init_rnn_(module, forget_bias=VALUE, hh_gain=0.9) is module
    groups = _groups(module)
    assert groups
    for suffix, p in groups.items():
        # Every gate block of W_hh is orthogonal (times the gain), and so is W_hr.
        for block in p["weight_hh"].detach().split(H):
            _assert_orthonormal_rows_or_columns(block, 0.9)
        if "weight_hr" in p:
            _assert_orthonormal_rows_or_columns(p["weight_hr"].detach(), 0.9)
        # Every gate block of W_ih is Xavier-uniform: inside the bound, spread over it.
        for block in p["weight_ih"].detach().split(H):
            bound = math.sqrt(6.0 / (block.shape[0] + block.shape[1]))
            assert block.abs().max() <= bound
            assert block.abs().max() > bound / 2
        # Biases: zero but the keep gate (LSTM f, GRU z) in bias_ih.
        expected_ih = torch.zeros(gates * H)
        if kind != "RNN":
            expected_ih[H : 2 * H] = VALUE
        torch.testing.assert_close(p["bias_ih"].detach(), expected_ih, rtol=0, atol=0)
        torch.testing.assert_close(p["bias_hh"].detach(), torch.zeros(gates * H), rtol=0, atol=0)


def test_stacked_orthogonal_would_fail_per_block_check():
    """The per-block check above is not vacuous: an orthogonal (4H, H) stack fails it."""
    w = torch.empty(4 * H, H)
    nn.init.orthogonal_(w)
    with pytest.raises(AssertionError):
        _assert_orthonormal_rows_or_columns(w.split(H)[1])


@pytest.mark.parametrize("ns", [nn, fusedrnn])
def test_lstm_forget_gate_opens_at_sigmoid_of_value(ns):
    """With x = 0 and h = 0, the cell update is c' = sigmoid(forget_bias) * c (g = tanh(0) = 0)."""
    cell = rnn_init.init_rnn_(ns.LSTMCell(I, H, dtype=torch.float64), forget_bias=VALUE)
    c = torch.randn(3, H, dtype=torch.float64)
    _, c_next = cell(
        torch.zeros(3, I, dtype=torch.float64), (torch.zeros(3, H, dtype=torch.float64), c)
    )
    torch.testing.assert_close(
        c_next, torch.sigmoid(torch.tensor(VALUE, dtype=torch.float64)) * c, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("ns", [nn, fusedrnn])
def test_gru_update_gate_keeps_sigmoid_of_value(ns):
    """With x = 0: z = sigmoid(forget_bias), n = tanh(r * W_hn h); with W_hn = 0, h' = z * h."""
    cell = rnn_init.init_rnn_(ns.GRUCell(I, H, dtype=torch.float64), forget_bias=VALUE)
    with torch.no_grad():
        cell.weight_hh.zero_()
    h = torch.randn(3, H, dtype=torch.float64)
    h_next = cell(torch.zeros(3, I, dtype=torch.float64), h)
    torch.testing.assert_close(
        h_next, torch.sigmoid(torch.tensor(VALUE, dtype=torch.float64)) * h, rtol=1e-12, atol=1e-12
    )


def test_recurses_into_models_and_custom_modules():
    """Any submodule with torch.nn names is initialised, including a hand-written cell."""

    class MyCell(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight_ih = nn.Parameter(torch.randn(3 * H, I))
            self.weight_hh = nn.Parameter(torch.randn(3 * H, H))
            self.bias_ih = nn.Parameter(torch.randn(3 * H))
            self.bias_hh = nn.Parameter(torch.randn(3 * H))

    model = nn.Sequential(nn.Linear(I, I), MyCell(), nn.LSTM(I, H, bias=False))
    linear_before = model[0].weight.detach().clone()
    rnn_init.init_rnn_(model, forget_bias=VALUE)
    torch.testing.assert_close(model[0].weight.detach(), linear_before, rtol=0, atol=0)
    assert (model[1].bias_ih[H : 2 * H] == VALUE).all() and (model[1].bias_ih[:H] == 0).all()
    for block in model[1].weight_hh.detach().split(H):
        _assert_orthonormal_rows_or_columns(block)
    for block in model[2].weight_hh_l0.detach().split(H):
        _assert_orthonormal_rows_or_columns(block)


def test_individual_helpers_touch_only_their_parameters():
    torch.manual_seed(1)
    lstm = nn.LSTM(I, H)
    before = {k: v.detach().clone() for k, v in lstm.named_parameters()}
    rnn_init.forget_bias_(lstm, 2.0)
    assert torch.equal(lstm.weight_ih_l0, before["weight_ih_l0"]) and torch.equal(
        lstm.weight_hh_l0, before["weight_hh_l0"]
    )
    assert (lstm.bias_ih_l0[H : 2 * H] == 2.0).all()
    rnn_init.orthogonal_recurrent_(lstm)
    assert torch.equal(lstm.weight_ih_l0, before["weight_ih_l0"])
    assert not torch.equal(lstm.weight_hh_l0, before["weight_hh_l0"])
    rnn_init.xavier_input_(lstm)
    assert not torch.equal(lstm.weight_ih_l0, before["weight_ih_l0"])
    assert (lstm.bias_ih_l0[H : 2 * H] == 2.0).all()


def test_rejects_modules_without_recurrent_weights():
    with pytest.raises(ValueError, match="weight_hh"):
        rnn_init.init_rnn_(nn.Linear(3, 4))


def test_rejects_unknown_gate_count():
    module = nn.Module()
    module.hidden_size = H
    module.weight_ih = nn.Parameter(torch.randn(2 * H, I))
    module.weight_hh = nn.Parameter(torch.randn(2 * H, H))
    with pytest.raises(ValueError, match="gates"):
        rnn_init.init_rnn_(module)
