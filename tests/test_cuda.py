"""CUDA-only checks: parity with cuDNN (torch.nn on CUDA) at each dtype,
determinism, very long sequences. The device-generic tests in the other files
also run on CUDA through the `device` fixture."""
import pytest
import torch

import fusedrnn

from helpers import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")

MODELS = [torch.nn.LSTM, torch.nn.GRU]


def run(m, x, h0):
    out, h = m(x, h0)
    hs = list(h) if isinstance(h, tuple) else [h]
    loss = out.float().square().sum() + sum(t.float().sum() for t in hs)
    grads = torch.autograd.grad(loss, [x] + list(m.parameters()))
    return [out] + hs + list(grads)


def hidden(cls, L, B, H, dtype):
    h = torch.randn(L, B, H, device="cuda", dtype=dtype)
    return (h, torch.randn_like(h)) if cls is torch.nn.LSTM else h


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("dtype,tf32", [(torch.float32, False), (torch.float32, True),
                                        (torch.bfloat16, False), (torch.float16, False)])
def test_error_within_cudnn_error(cls, dtype, tf32, monkeypatch):
    """Our error against a float64 run at most 4x cuDNN's own at the same
    dtype and TF32 setting (plus a floor of 1e-6)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    T, B, I, H, L = 30, 8, 48, 64, 2
    ref = cls(I, H, num_layers=L, bidirectional=True).cuda().double()
    x64 = torch.randn(T, B, I, device="cuda", dtype=torch.float64, requires_grad=True)
    h64 = hidden(cls, 2 * L, B, H, torch.float64)
    want = run(ref, x64, h64)
    theirs_m = cls(I, H, num_layers=L, bidirectional=True).cuda().to(dtype)
    theirs_m.load_state_dict(ref.state_dict())
    ours_m = fusedrnn.from_torch(theirs_m)
    x = x64.detach().to(dtype).requires_grad_(True)
    h = tuple(t.to(dtype) for t in h64) if isinstance(h64, tuple) else h64.to(dtype)
    theirs, ours = run(theirs_m, x, h), run(ours_m, x, h)
    for o, t, w in zip(ours, theirs, want):
        assert o.dtype == t.dtype
        assert rel_err(o, w) <= 4 * rel_err(t, w) + 1e-6


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(cls, dtype):
    """Same inputs, bitwise the same outputs and gradients (no float atomics)."""
    m = fusedrnn.from_torch(cls(40, 96, num_layers=2).cuda().to(dtype))
    x = torch.randn(50, 16, 40, device="cuda", dtype=dtype, requires_grad=True)
    a, b = run(m, x, None), run(m, x, None)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", MODELS)
def test_more_than_65535_steps(cls):
    """The time loop is on the host: no grid dimension limits T."""
    T = 70_000
    m = cls(4, 8).cuda().double()
    f = fusedrnn.from_torch(m)
    x = torch.randn(T, 2, 4, device="cuda", dtype=torch.float64)
    with torch.no_grad():
        want, got = m(x), f(x)
    assert rel_err(got[0], want[0]) < 1e-10


def test_packed_sequences_match_cudnn():
    m = torch.nn.LSTM(12, 20, bidirectional=True).cuda().double()
    f = fusedrnn.from_torch(m)
    x = torch.randn(9, 5, 12, device="cuda", dtype=torch.float64)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [9, 3, 7, 1, 4], enforce_sorted=False)
    (pw, (hw, cw)), (pg, (hg, cg)) = m(packed), f(packed)
    for a, b in [(pg.data, pw.data), (hg, hw), (cg, cw)]:
        assert rel_err(a, b) < 1e-10
