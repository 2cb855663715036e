"""Whole-model checkpoints: torch.save(model) with fusedrnn's modules inside loads
under torch.load's default (weights_only=True), in a script that allows only its
own classes and torch.nn's, as it must for torch.nn.LSTM."""
import io
import pickle

import pytest
import torch
from torch import nn

import fusedrnn
from fusedrnn.pooling import AttentionPool, MaxPool, MeanPool

from helpers import B, H, I, P, T

LENGTHS = [T, 2, 1]


class Model(nn.Module):
    """The script's own class: one of fusedrnn's modules, then a torch.nn head."""

    def __init__(self, body, features):
        super().__init__()
        self.body = body
        self.head = nn.Linear(features, 2)

    def forward(self, x):
        if isinstance(self.body, (MeanPool, MaxPool, AttentionPool)):
            lengths = torch.tensor(LENGTHS, device=x.device)
            return self.head(self.body(x[:, :len(LENGTHS)], lengths))
        if isinstance(self.body, (fusedrnn.LSTMCell, fusedrnn.GRUCell)):
            out = self.body(x[0])
            return self.head(out[0] if isinstance(out, tuple) else out)
        out, _ = self.body(x)
        return self.head(out)


# (make the body, its output features, the torch.nn classes inside it besides Linear)
BODIES = {
    "LSTM": (lambda: fusedrnn.LSTM(I, H, num_layers=2, bidirectional=True), 2 * H, []),
    "LSTM-proj": (lambda: fusedrnn.LSTM(I, H, proj_size=P, dropout=0.25, num_layers=2), P, []),
    "GRU": (lambda: fusedrnn.GRU(I, H, bias=False), H, []),
    "GRU-classic": (lambda: fusedrnn.GRU(I, H, reset_after=False), H, []),
    "LSTM-regularised": (lambda: fusedrnn.LSTM(I, H, num_layers=2, layer_norm=True, zoneout=0.1,
                                                zoneout_cell=0.2, recurrent_dropout=0.1,
                                                weight_drop=0.1), H, []),
    "LSTMCell": (lambda: fusedrnn.LSTMCell(I, H), H, []),
    "GRUCell-regularised": (lambda: fusedrnn.GRUCell(I, H, layer_norm=True, zoneout=0.2), H, []),
    "GRUCell": (lambda: fusedrnn.GRUCell(I, H, reset_after=False), H, []),
    "MeanPool": (lambda: MeanPool(), I, []),
    "MaxPool": (lambda: MaxPool(), I, []),
    "AttentionPool": (lambda: AttentionPool(I), I, []),
    "AttentionPool-mlp": (lambda: AttentionPool(I, hidden_size=4), I, [nn.Sequential, nn.Tanh]),
}


def _saved(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("name", list(BODIES))
def test_whole_model_loads_with_weights_only_default(device, name):
    make, features, torch_classes = BODIES[name]
    model = Model(make(), features).double().to(device).eval()  # eval: dropout off
    x = torch.randn(T, B, I, dtype=torch.float64, device=device)
    want = model(x)
    buf = _saved(model)
    with torch.serialization.safe_globals([Model, nn.Linear, *torch_classes]):
        loaded = torch.load(buf)  # the default: weights_only=True
    assert type(loaded.body) is type(model.body) and not loaded.body.training
    assert repr(loaded) == repr(model)  # every constructor argument, reset_after and
    # the regularisers included
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        t = loaded.state_dict()[key]
        assert torch.equal(t, value) and t.device == value.device, key
    assert torch.equal(loaded(x), want)
    # Training goes on: every parameter gets a gradient.
    loaded(x).sum().backward()
    assert all(p.grad is not None for p in loaded.parameters())


def test_weights_only_load_still_refuses_what_is_not_allowed():
    """The loads above run the restricted unpickler: without the script's own
    class allowed, the same checkpoint is refused."""
    buf = _saved(Model(fusedrnn.GRU(I, H), H))
    with pytest.raises(pickle.UnpicklingError, match="Model"):
        torch.load(buf)


def test_fusedrnn_classes_are_safe_globals():
    allowed = torch.serialization.get_safe_globals()
    for cls in (fusedrnn.LSTM, fusedrnn.GRU, fusedrnn.LSTMCell, fusedrnn.GRUCell,
                MeanPool, MaxPool, AttentionPool):
        assert cls in allowed, cls
