"""NaN and inf propagate exactly where torch.nn's do: the isnan/isinf masks of
every output, state and gradient, step by step, on every CPU path (each forced
by FUSEDRNN_CPU_ISA: the fused AVX-512 and AVX2 paths, the AMX tiles of
bfloat16, the generic loop) and dtype; in bfloat16 where ATen's matmul spreads
NaN to other rows, between the exact masks and torch.nn's."""
import copy

import pytest
import torch
from torch import nn

import fusedrnn

from isa_helpers import BF16_ISAS, force_cpu_isa, isa_params
from module_helpers import flat_outputs

PATHS = isa_params(BF16_ISAS)
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def masks(ts):
    return [(t.isnan(), t.isinf()) for t in ts]


def poisoned(shape, where, value, dtype):
    x = torch.randn(*shape, dtype=dtype)
    x[where] = value
    return x.requires_grad_(True)


def run(module, x, hx):
    outs = flat_outputs(module(x) if hx is None else module(x, hx))
    leaves = [x] + ([hx] if isinstance(hx, torch.Tensor) else list(hx or ()))
    leaves = [t for t in leaves if t.requires_grad] + list(module.parameters())
    grads = torch.autograd.grad(sum(o.float().sum() for o in outs), leaves, allow_unused=True)
    return outs, [g for g in grads if g is not None]


def bf16_matmul_spreads_nan():
    """Whether ATen's bfloat16 matmul here puts NaN in rows a poisoned row does
    not reach: oneDNN's kernels for AVX512-BF16 and AMX in torch 2.11 spread it
    to a neighbouring row; 2.14's do not, nor does a CPU without them."""
    a = torch.randn(24, 48, dtype=torch.bfloat16)
    a[9, 3] = float("nan")
    return int((a @ torch.randn(48, 8, dtype=torch.bfloat16)).isnan().any(1).sum()) > 1


def assert_masks_between(ref, ours, x):
    """For bfloat16 where torch.nn's masks hold its matmul's extra NaNs: every
    NaN and inf of the exact masks (torch.nn in float32 on the same values) is
    in ours, and ours has none that torch.nn's bfloat16 lacks. So no path
    swallows a NaN or makes one of its own; a path whose products are
    oneDNN's may spread NaN as torch.nn does, one on float32 sums may not."""
    ref32 = copy.deepcopy(ref).float()
    x32 = x.detach().float().requires_grad_(True)
    (o1, g1), (o2, g2), (o3, g3) = run(ref, x, None), run(ours, x, None), run(ref32, x32, None)
    for (n1, i1), (n2, i2), (n3, i3) in zip(masks(o1 + g1), masks(o2 + g2), masks(o3 + g3)):
        assert torch.equal(n2 & n3, n3) and torch.equal(n2 & n1, n2)
        assert torch.equal(i2 & i3, i3) and torch.equal((i2 | n2) & (i1 | n1), i2 | n2)


def assert_same_masks(ref, ours, x, hx):
    (o1, g1), (o2, g2) = run(ref, x, hx), run(ours, x, hx)
    for (n1, i1), (n2, i2) in zip(masks(o1 + g1), masks(o2 + g2)):
        assert torch.equal(n1, n2) and torch.equal(i1, i2)
    assert any(o.isnan().any() for o in o1)  # the case did poison something


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=str)
def test_layer_input(path, dtype, kind, value, monkeypatch):
    force_cpu_isa(monkeypatch, path)
    ref = getattr(nn, kind)(8, 16, num_layers=2).to(dtype)
    ours = fusedrnn.from_torch(ref)
    x = poisoned((6, 4, 8), (2, 1, 3), value, dtype)
    if dtype == torch.bfloat16 and bf16_matmul_spreads_nan():
        assert_masks_between(ref, ours, x)
    elif value != value:
        assert_same_masks(ref, ours, x, None)
    else:  # inf saturates the gates: compare masks without requiring a NaN
        (o1, g1), (o2, g2) = run(ref, x, None), run(ours, x, None)
        for (n1, i1), (n2, i2) in zip(masks(o1 + g1), masks(o2 + g2)):
            assert torch.equal(n1, n2) and torch.equal(i1, i2)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_layer_state(path, kind, monkeypatch):
    force_cpu_isa(monkeypatch, path)
    ref = getattr(nn, kind)(8, 16)
    ours = fusedrnn.from_torch(ref)
    x = torch.randn(5, 3, 8)
    h0 = poisoned((1, 3, 16), (0, 2, 5), float("nan"), torch.float32)
    hx = (h0, torch.randn(1, 3, 16)) if kind == "LSTM" else h0
    assert_same_masks(ref, ours, x, hx)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell"])
def test_cell(path, kind, monkeypatch):
    force_cpu_isa(monkeypatch, path)
    ref = getattr(nn, kind)(8, 16)
    ours = fusedrnn.from_torch(ref)
    x = poisoned((4, 8), (1, 3), float("nan"), torch.float32)
    assert_same_masks(ref, ours, x, None)


def test_nan_in_gradient_propagates():
    """A NaN arriving from the loss reaches every gradient torch.nn's reaches."""
    ref = nn.LSTM(8, 16)
    ours = fusedrnn.from_torch(ref)
    x = torch.randn(5, 3, 8, requires_grad=True)
    w = torch.randn(5, 3, 16)
    w[3, 0, 2] = float("nan")
    grads = []
    for m in (ref, ours):
        grads.append(torch.autograd.grad((m(x)[0] * w).sum(), [x] + list(m.parameters())))
    for a, b in zip(*grads):
        assert torch.equal(a.isnan(), b.isnan())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("algo", ["stepwise", "persistent"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda(algo, kind, dtype, monkeypatch):
    """The same masks on the GPU, under each FUSEDRNN_ALGO (torch.nn on cuDNN)."""
    monkeypatch.setenv("FUSEDRNN_ALGO", algo)
    ref = getattr(nn, kind)(8, 16).to("cuda", dtype)
    ours = fusedrnn.from_torch(ref)
    shape, where = ((4, 8), (1, 3)) if kind.endswith("Cell") else ((6, 4, 8), (2, 1, 3))
    x = poisoned(shape, where, float("nan"), dtype).detach().cuda().requires_grad_(True)
    assert_same_masks(ref, ours, x, None)


@pytest.mark.parametrize("path", isa_params(("amx",)))
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_bfloat16_rows_keep_their_nan(path, kind, monkeypatch):
    """A NaN in one batch row stays in that row when the AMX tiles pad the depth
    of the rows they read (H = 48, two blocks of 16 rows and a last of 4): the
    outputs are NaN exactly in that row from that step on, and every output and
    gradient has the masks it has under avx512. (Not torch.nn's masks: oneDNN's
    bfloat16 matmul, which torch.nn and both paths' input gradient take, spreads
    a NaN to a few other rows, differently from version to version.)"""
    ref = getattr(nn, kind)(8, 48).to(torch.bfloat16)
    ours = fusedrnn.from_torch(ref)
    x = poisoned((4, 36, 8), (1, 3, 2), float("nan"), torch.bfloat16)
    got = {}
    for isa in (path, "avx512"):
        force_cpu_isa(monkeypatch, isa)
        outs, grads = run(ours, x, None)
        got[isa] = masks(outs + grads)
        nan_out = torch.zeros(4, 36, 48, dtype=torch.bool)
        nan_out[1:, 3] = True
        assert torch.equal(outs[0].isnan(), nan_out)
        assert torch.equal(outs[1].isnan(), nan_out[-1:])  # h_n
    for (n1, i1), (n2, i2) in zip(got[path], got["avx512"]):
        assert torch.equal(n1, n2) and torch.equal(i1, i2)
