"""Empty shapes as torch.nn takes them: zero batch, zero input or hidden size
(cells), zero-row steps at the end of a PackedSequence; outputs and every
gradient against torch.nn in float64."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import fusedrnn

from helpers import rel_err
from module_helpers import flat_outputs


def compare(kind, sizes, kw, make_args):
    """Runs torch.nn and fusedrnn twins on the same leaves; compares shapes,
    values and the gradients of every parameter and leaf."""
    ref = getattr(nn, kind)(*sizes, **kw).double()
    ours = fusedrnn.from_torch(ref)
    results = []
    for m in (ref, ours):
        torch.manual_seed(1)
        args, leaves = make_args()
        outs = flat_outputs(m(*args))
        loss = sum((o * torch.arange(o.numel(), dtype=o.dtype).reshape(o.shape).cos()).sum()
                   for o in outs)
        wrt = list(m.parameters()) + leaves
        grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
        results.append(outs + list(grads))
    for a, e in zip(*results, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        if e.numel():
            assert rel_err(a, e) < 1e-10


def leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("sizes", [(3, 0), (0, 4), (0, 0), (3, 4)], ids=str)
@pytest.mark.parametrize("batch", [2, 0])
@pytest.mark.parametrize("hx", [False, True], ids=["no-hx", "hx"])
def test_cells(kind, sizes, batch, hx):
    def make_args():
        x = leaf(batch, sizes[0])
        if not hx:
            return (x,), [x]
        states = [leaf(batch, sizes[1]) for _ in range(2 if kind == "LSTMCell" else 1)]
        return (x, tuple(states) if kind == "LSTMCell" else states[0]), [x, *states]
    compare(kind, sizes, dict(bias=batch == 2), make_args)


@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("GRU", dict(num_layers=2, bidirectional=True)),
                                     ("LSTM", dict(proj_size=2, batch_first=True))])
@pytest.mark.parametrize("hx", [False, True], ids=["no-hx", "hx"])
def test_zero_batch(kind, kw, hx):
    def make_args():
        x = leaf(*((0, 5, 3) if kw.get("batch_first") else (5, 0, 3)))
        if not hx:
            return (x,), [x]
        n = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
        h = leaf(n, 0, kw.get("proj_size", 4))
        if kind == "GRU":
            return (x, h), [x, h]
        c = leaf(n, 0, 4)
        return (x, (h, c)), [x, h, c]
    compare(kind, (3, 4), kw, make_args)


@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("GRU", dict(num_layers=2, bidirectional=True)),
                                     ("LSTM", dict(proj_size=2, bidirectional=True))])
@pytest.mark.parametrize("batch_sizes", [[3, 2, 2, 0], [2, 1, 0, 0], [0, 0]], ids=str)
def test_packed_steps_of_no_rows(kind, kw, batch_sizes):
    def make_args():
        bs = torch.tensor(batch_sizes)
        data = leaf(int(bs.sum()), 3)
        return (PackedSequence(data, bs),), [data]
    compare(kind, (3, 4), kw, make_args)
