"""Bad input: the modules raise what torch.nn raises for the same call (same
exception type; the same message where torch's comes from Python, a clear one
where it comes from ATen), before any kernel runs, leaving the module as it was."""
import contextlib
import re
import traceback

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn

from helpers import B, H, I, P, T
from module_helpers import OpLog, flat_outputs

L = 2  # layers of the RNN modules below
F64 = torch.float64


def z(*shape, dtype=F64):
    return torch.zeros(*shape, dtype=dtype)


def x(*shape, dtype=F64):
    return torch.randn(*(shape or (T, B, I)), dtype=dtype)


def packed(sorted_=True, feature=I, dtype=F64):
    lengths = [T, 3, 2] if sorted_ else [2, T, 3]
    return pack_padded_sequence(torch.randn(T, 3, feature, dtype=dtype), lengths,
                                enforce_sorted=sorted_)


# (id, module kind, module kwargs, module dtype, args, autocast,
#  torch's message is Python's (then ours must equal it), else a regex ours must match)
CASES = [
    # ---- LSTM
    ("lstm-input-4d", "LSTM", {}, F64, lambda: (x(T, B, 1, I),), False, True),
    ("lstm-input-1d", "LSTM", {}, F64, lambda: (x(I),), False, True),
    ("lstm-input-size", "LSTM", {}, F64, lambda: (x(T, B, I + 1),), False, True),
    ("lstm-input-size-unbatched", "LSTM", {}, F64, lambda: (x(T, I + 1),), False, True),
    ("lstm-input-float32", "LSTM", {}, F64, lambda: (x(dtype=torch.float32),), False, True),
    ("lstm-input-int", "LSTM", {}, F64, lambda: (x().long(),), False, True),
    ("lstm-h0-layers", "LSTM", {}, F64, lambda: (x(), (z(1, B, H), z(L, B, H))), False, True),
    ("lstm-h0-batch", "LSTM", {}, F64, lambda: (x(), (z(L, B + 1, H), z(L, B, H))), False, True),
    ("lstm-h0-hidden", "LSTM", {}, F64, lambda: (x(), (z(L, B, H + 1), z(L, B, H))), False, True),
    ("lstm-c0-shape", "LSTM", {}, F64, lambda: (x(), (z(L, B, H), z(L, B, H - 1))), False, True),
    ("lstm-h0-2d-batched", "LSTM", {}, F64, lambda: (x(), (z(L, H), z(L, B, H))), False, True),
    ("lstm-h0-3d-unbatched", "LSTM", {}, F64, lambda: (x(T, I), (z(L, 1, H), z(L, 1, H))), False,
     True),
    ("lstm-h0-unbatched-shape", "LSTM", {}, F64, lambda: (x(T, I), (z(L + 1, H), z(L, H))), False,
     True),
    ("lstm-proj-h0-size", "LSTM", dict(proj_size=P), F64,
     lambda: (x(), (z(L, B, H), z(L, B, H))), False, True),
    ("lstm-proj-c0-size", "LSTM", dict(proj_size=P), F64,
     lambda: (x(), (z(L, B, P), z(L, B, P))), False, True),
    ("lstm-one-state", "LSTM", {}, F64, lambda: (x(), (z(L, B, H),)), False, True),
    ("lstm-empty-sequence", "LSTM", {}, F64, lambda: (x(0, B, I),), False, True),
    ("lstm-empty-sequence-batch-first", "LSTM", dict(batch_first=True), F64,
     lambda: (x(B, 0, I),), False, True),
    ("lstm-three-states", "LSTM", {}, F64, lambda: (x(), (z(L, B, H),) * 3), False,
     r"LSTM expects two hidden states \(h_0, c_0\), got 3"),
    ("lstm-h0-float32", "LSTM", {}, F64,
     lambda: (x(), (z(L, B, H, dtype=torch.float32), z(L, B, H))), False,
     r"LSTM: hx\[0\] dtype \(torch.float32\) does not match weight dtype \(torch.float64\)"),
    ("lstm-c0-wider-than-weights", "LSTM", {}, torch.float32,
     lambda: (x(dtype=torch.float32), (z(L, B, H, dtype=torch.float32), z(L, B, H))), False,
     r"LSTM: hx\[1\] dtype \(torch.float64\) is wider than the weight dtype \(torch.float32\)"),
    ("lstm-autocast-float64-input", "LSTM", {}, torch.float32, lambda: (x(),), True,
     r"LSTM: input dtype \(torch.float64\) does not match weight dtype \(torch.float32\) "
     r"under autocast"),
    # torch.nn.LSTM checks nothing in Python for packed input: ATen's errors.
    ("lstm-packed-input-size", "LSTM", {}, F64, lambda: (packed(feature=I + 1),), False,
     r"input.size\(-1\) must be equal to input_size. Expected 17, got 18"),
    ("lstm-packed-float32", "LSTM", {}, F64, lambda: (packed(dtype=torch.float32),), False,
     r"RNN input dtype \(torch.float32\) does not match weight dtype \(torch.float64\)"),
    ("lstm-packed-h0-batch", "LSTM", {}, F64, lambda: (packed(), (z(L, 4, H), z(L, 3, H))), False,
     r"Expected hidden\[0\] size \(2, 3, 5\), got \[2, 4, 5\]"),
    ("lstm-packed-c0-shape", "LSTM", {}, F64,
     lambda: (packed(False), (z(L, 3, H), z(L, 3, H + 1))), False,
     r"Expected hidden\[1\] size \(2, 3, 5\), got \[2, 3, 6\]"),
    ("lstm-packed-h0-rank", "LSTM", {}, F64, lambda: (packed(), (z(L, H), z(L, 3, H))), False,
     r"Expected hidden\[0\] size \(2, 3, 5\), got \[2, 5\]"),
    ("lstm-packed-unsorted-h0-rank", "LSTM", {}, F64,
     lambda: (packed(False), (z(L, 3, H, 1), z(L, 3, H))), False,
     r"Expected hidden\[0\] size \(2, 3, 5\), got \[2, 3, 5, 1\]"),
    ("lstm-packed-unsorted-h0-1d", "LSTM", {}, F64, lambda: (packed(False), (z(H), z(L, 3, H))),
     False, True),
    ("lstm-packed-h0-float32", "LSTM", {}, F64,
     lambda: (packed(False), (z(L, 3, H, dtype=torch.float32), z(L, 3, H))), False,
     r"LSTM: hx\[0\] dtype \(torch.float32\) does not match weight dtype"),
    # ---- GRU
    ("gru-input-4d", "GRU", {}, F64, lambda: (x(T, B, 1, I),), False, True),
    ("gru-input-size", "GRU", {}, F64, lambda: (x(T, B, I - 1),), False, True),
    ("gru-input-float32", "GRU", {}, F64, lambda: (x(dtype=torch.float32),), False, True),
    ("gru-h0-shape", "GRU", dict(bidirectional=True), F64, lambda: (x(), z(L, B, H)), False, True),
    ("gru-h0-2d-batched", "GRU", {}, F64, lambda: (x(), z(B, H)), False, True),
    ("gru-h0-3d-unbatched", "GRU", {}, F64, lambda: (x(T, I), z(L, 1, H)), False, True),
    ("gru-h0-unbatched-shape", "GRU", {}, F64, lambda: (x(T, I), z(L, H + 1)), False, True),
    ("gru-hx-tuple", "GRU", {}, F64, lambda: (x(), (z(L, B, H),)), False, True),
    ("gru-empty-sequence", "GRU", {}, F64, lambda: (x(0, I),), False, True),
    ("gru-packed-input-size", "GRU", {}, F64, lambda: (packed(feature=I + 1),), False, True),
    ("gru-packed-float32", "GRU", {}, F64, lambda: (packed(dtype=torch.float32),), False, True),
    ("gru-packed-h0-batch", "GRU", {}, F64, lambda: (packed(), z(L, 4, H)), False, True),
    ("gru-packed-unsorted-h0-rank", "GRU", {}, F64, lambda: (packed(False), z(L, 3)), False, True),
    ("gru-h0-float32", "GRU", {}, F64, lambda: (x(), z(L, B, H, dtype=torch.float32)), False,
     r"GRU: hx dtype \(torch.float32\) does not match weight dtype \(torch.float64\)"),
    ("gru-autocast-float64-h0", "GRU", {}, torch.float32,
     lambda: (x(dtype=torch.float32), z(L, B, H)), True,
     r"GRU: hx dtype \(torch.float64\) does not match weight dtype \(torch.float32\) "
     r"under autocast"),
    # ---- cells
    ("lstmcell-input-3d", "LSTMCell", {}, F64, lambda: (x(1, B, I),), False, True),
    ("lstmcell-input-0d", "LSTMCell", {}, F64, lambda: (torch.tensor(1.0, dtype=F64),), False,
     True),
    ("lstmcell-h0-3d", "LSTMCell", {}, F64, lambda: (x(B, I), (z(1, B, H), z(B, H))), False, True),
    ("lstmcell-c0-3d", "LSTMCell", {}, F64, lambda: (x(B, I), (z(B, H), z(1, B, H))), False, True),
    ("lstmcell-input-size", "LSTMCell", {}, F64, lambda: (x(B, I + 2),), False, True),
    ("lstmcell-input-size-unbatched", "LSTMCell", {}, F64, lambda: (x(I + 2),), False, True),
    ("lstmcell-h0-batch", "LSTMCell", {}, F64, lambda: (x(B, I), (z(B + 1, H), z(B, H))), False,
     True),
    ("lstmcell-c0-hidden", "LSTMCell", {}, F64, lambda: (x(B, I), (z(B, H), z(B, H + 1))), False,
     True),
    ("lstmcell-h0-2d-unbatched", "LSTMCell", {}, F64, lambda: (x(I), (z(1, H), z(1, H))), False,
     True),
    ("lstmcell-one-state", "LSTMCell", {}, F64, lambda: (x(B, I), (z(B, H),)), False, True),
    ("lstmcell-input-float32", "LSTMCell", {}, F64, lambda: (x(B, I, dtype=torch.float32),), False,
     r"LSTMCell: input dtype \(torch.float32\) does not match weight dtype \(torch.float64\)"),
    ("lstmcell-h0-float32", "LSTMCell", {}, F64,
     lambda: (x(B, I), (z(B, H, dtype=torch.float32), z(B, H))), False,
     r"LSTMCell: hx\[0\] dtype \(torch.float32\) does not match weight dtype \(torch.float64\)"),
    ("grucell-input-3d", "GRUCell", {}, F64, lambda: (x(1, B, I),), False, True),
    ("grucell-h0-3d", "GRUCell", {}, F64, lambda: (x(B, I), z(1, B, H)), False, True),
    ("grucell-input-size", "GRUCell", {}, F64, lambda: (x(B, I - 1),), False, True),
    ("grucell-h0-batch", "GRUCell", {}, F64, lambda: (x(B, I), z(B - 1, H)), False, True),
    ("grucell-h0-hidden", "GRUCell", {}, F64, lambda: (x(I), z(H - 1)), False, True),
    ("grucell-hx-tuple", "GRUCell", {}, F64, lambda: (x(B, I), (z(B, H),)), False, True),
    ("grucell-input-int", "GRUCell", {}, F64, lambda: (x(B, I).long(),), False,
     r"GRUCell: input dtype \(torch.int64\) does not match weight dtype \(torch.float64\)"),
    ("grucell-h0-float32", "GRUCell", {}, F64, lambda: (x(B, I), z(B, H, dtype=torch.float32)),
     False, r"GRUCell: hx dtype \(torch.float32\) does not match weight dtype \(torch.float64\)"),
]

# Ops that would mean a kernel ran: ours, or any matmul.
KERNELS = re.compile(r"^(fusedrnn\.|aten\.(mm|addmm|bmm|matmul|linear|_thnn|lstm|gru|mkldnn))")


def _raised_in_python(excinfo):
    """Whether the exception was raised by a Python `raise` (not by ATen)."""
    return traceback.extract_tb(excinfo.tb)[-1].line.lstrip().startswith("raise")


def _twins(kind, kw, dtype):
    extra = dict(num_layers=L) if kind in ("LSTM", "GRU") else {}
    ref = getattr(nn, kind)(I, H, **extra, **kw).to(dtype)
    return ref, fusedrnn.from_torch(ref)


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in CASES])
def test_error_matches_torch_nn(case):
    _, kind, kw, dtype, make_args, autocast, expect = case
    ref, ours = _twins(kind, kw, dtype)
    args = make_args()
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast \
        else contextlib.nullcontext
    with pytest.raises(Exception) as theirs, ctx():
        ref(*args)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    log = OpLog()
    with pytest.raises(Exception) as mine, ctx(), log:
        ours(*args)
    assert type(mine.value) is type(theirs.value), (mine.value, theirs.value)
    if expect is True:
        assert str(mine.value) == str(theirs.value)
    else:
        assert not _raised_in_python(theirs), "torch.nn's message is Python's: compare it"
        assert re.search(expect, str(mine.value)), str(mine.value)
    # Rejected before any kernel ran, and nothing changed.
    assert not [op for op in log.ops if KERNELS.match(op)], log.ops
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in ours.parameters())


def test_cases_cover_every_module():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert {c[1] for c in CASES} == {"LSTM", "GRU", "LSTMCell", "GRUCell"}


# ---- inputs torch.nn accepts that look like errors: accepted alike
ACCEPTED = [
    ("lstm-empty-batch", "LSTM", dict(bidirectional=True), lambda: (x(T, 0, I),)),
    ("gru-empty-batch-with-hx", "GRU", {}, lambda: (x(T, 0, I), z(L, 0, H))),
    ("lstmcell-empty-batch", "LSTMCell", {}, lambda: (x(0, I),)),
    ("grucell-empty-batch", "GRUCell", {}, lambda: (x(0, I), z(0, H))),
    ("lstmcell-c0-float32", "LSTMCell", {},
     lambda: (x(B, I), (z(B, H), z(B, H, dtype=torch.float32)))),
    ("lstm-c0-float32", "LSTM", {}, lambda: (x(), (z(L, B, H), z(L, B, H, dtype=torch.float32)))),
    ("lstm-hx-list", "LSTM", {}, lambda: (x(), [z(L, B, H), z(L, B, H)])),
    ("lstm-unbatched-three-states", "LSTM", {}, lambda: (x(T, I), (z(L, H),) * 3)),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in ACCEPTED])
def test_accepted_alike(case):
    _, kind, kw, make_args = case
    ref, ours = _twins(kind, kw, F64)
    args = make_args()
    got, want = ours(*args), ref(*args)
    for g, w in zip(flat_outputs(got), flat_outputs(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # Gradients of an empty batch: zeros, like torch.nn's, not None.
    loss = sum(t.sum() for t in flat_outputs(got))
    grads = torch.autograd.grad(loss, list(ours.parameters()), allow_unused=True)
    ref_loss = sum(t.sum() for t in flat_outputs(want))
    ref_grads = torch.autograd.grad(ref_loss, list(ref.parameters()), allow_unused=True)
    for g, w in zip(grads, ref_grads):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


# ---- constructor arguments
CTOR = [
    ("LSTM", dict(dropout=1.5)), ("LSTM", dict(dropout=-0.1)), ("LSTM", dict(proj_size=H)),
    ("LSTM", dict(proj_size=-1)), ("LSTM", dict(num_layers=0)), ("LSTM", dict(bias="yes")),
    ("LSTM", dict(dropout="0.1")), ("GRU", dict(proj_size=2)), ("GRU", dict(num_layers=1.5)),
    ("GRU", dict(hidden_size=0)),
]


@pytest.mark.parametrize("kind,kw", CTOR, ids=[f"{k}-{'-'.join(kw)}" for k, kw in CTOR])
def test_constructor_errors_match_torch_nn(kind, kw):
    kw = dict(kw)
    hidden = kw.pop("hidden_size", H)
    with pytest.raises(Exception) as theirs:
        getattr(nn, kind)(I, hidden, **kw)
    with pytest.raises(Exception) as mine:
        getattr(fusedrnn, kind)(I, hidden, **kw)
    assert type(mine.value) is type(theirs.value)
    assert str(mine.value) == str(theirs.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for a device mismatch")
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_hx_on_another_device(kind):
    ref, ours = (m.cuda() for m in _twins(kind, {}, F64))
    cell = kind.endswith("Cell")
    inp = x(B, I) if cell else x()
    h = z(B, H) if cell else z(L, B, H)
    hx = (h, h.cuda()) if kind.startswith("LSTM") else h
    with pytest.raises(RuntimeError):
        ref(inp.cuda(), hx)
    with pytest.raises(RuntimeError, match=r"hx(\[0\])? is on cpu but input is on cuda"):
        ours(inp.cuda(), hx)
