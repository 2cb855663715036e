"""The float32 activations of every CPU path (Note [host float activations]
and Note [rational tanh] in csrc/gates.h), read out of the LSTM op: with
W_hh = 0 and pre-activations that pin the other gates (i = 0, f = o = 1,
g = 0), h_n = tanh(c0); with i = sigmoid(v), f = 0, g = 1, c0 = 0,
c_n = sigmoid(v). Errors in float32 ulps against float64 torch."""
import pytest
import torch

import fusedrnn

from isa_helpers import force_cpu_isa, isa_params

BIG = 1e30  # saturates a gate exactly: sigmoid(-BIG) = 0, sigmoid(BIG) = tanh(BIG) = 1
# Maximum errors in float32 ulps, measured over all floats of the ranges
# below on every path with room for the generic path's compiler contracting
# differently; the exp-based forms they replaced were within 2 and 3.
TANH_ULPS = 6
SIGMOID_ULPS = 4


def lstm_point(pre, c0):
    """One step of the LSTM op, B x H units, pre-activations (i, f, g, o)
    [4, B, H]: (h_n, c_n)."""
    B, H = c0.shape
    x_proj = pre.permute(1, 0, 2).reshape(1, B, 4 * H).contiguous()
    w_hh = torch.zeros(4 * H, H)
    _, h_n, c_n = fusedrnn.lstm_layer(x_proj, torch.zeros(B, H), c0, w_hh)
    return h_n, c_n


def tanh_of(v):
    pre = torch.stack([torch.full_like(v, -BIG), torch.full_like(v, BIG), torch.zeros_like(v),
                       torch.full_like(v, BIG)])
    return lstm_point(pre, v)[0]


def sigmoid_of(v):
    pre = torch.stack([v, torch.full_like(v, -BIG), torch.full_like(v, BIG),
                       torch.full_like(v, BIG)])
    return lstm_point(pre, torch.zeros_like(v))[1]


def ulps(got, want64):
    """|got - want| in units of the float32 spacing below |want| (at least
    the smallest subnormal)."""
    w32 = want64.float().abs()
    spacing = (w32 - torch.nextafter(w32, torch.zeros_like(w32))).double()
    spacing = spacing.clamp_min(torch.finfo(torch.float32).smallest_normal * 2.0 ** -23)
    return ((got.double() - want64).abs() / spacing)


def all_floats(lo, hi, stride=1):
    """Every stride-th float32 in [lo, hi] (lo, hi >= 0), as a [B, H] grid."""
    a = torch.tensor([lo, hi], dtype=torch.float32).view(torch.int32)
    v = torch.arange(int(a[0]), int(a[1]) + 1, stride, dtype=torch.int32).view(torch.float32)
    pad = (-v.numel()) % 1024
    return torch.cat([v, v[:pad]]).view(-1, 1024)


@pytest.mark.parametrize("isa", isa_params())
def test_tanh_within_its_ulps(isa, monkeypatch):
    force_cpu_isa(monkeypatch, isa)
    # Dense where tanh bends and approaches 1; every 61st float elsewhere.
    for v in (all_floats(0.25, 9.5, 61), all_floats(2.0 ** -30, 0.25, 997)):
        got = tanh_of(v)
        err = ulps(got, torch.tanh(v.double()))
        assert err.max() <= TANH_ULPS, (err.max().item(), v.flatten()[err.argmax()].item())
        assert torch.equal(tanh_of(-v), -got)  # odd, bit for bit
        assert got.abs().max() <= 1


@pytest.mark.parametrize("isa", isa_params())
def test_tanh_special_values(isa, monkeypatch):
    force_cpu_isa(monkeypatch, isa)
    inf, nan = float("inf"), float("nan")
    # (-0 cannot be read out: c = f * c0 + i * g is -0 + 0 = +0.)
    v = torch.tensor([[0.0, 1e-40, -1e-40, 9.0, -9.0, 20.0, -1e30, inf, -inf, nan, 9.5]])
    got = tanh_of(v)
    want = torch.tensor([[0.0, 1e-40, -1e-40, 1, -1, 1, -1, 1, -1, nan, 1]])
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(got[ok], want[ok])
    assert torch.equal(got[ok].signbit(), want[ok].signbit())


@pytest.mark.parametrize("isa", isa_params())
def test_sigmoid_within_its_ulps(isa, monkeypatch):
    force_cpu_isa(monkeypatch, isa)
    pos = all_floats(2.0 ** -30, 87.0, 127)
    for v in (pos, -pos):
        err = ulps(sigmoid_of(v), torch.sigmoid(v.double()))
        assert err.max() <= SIGMOID_ULPS, (err.max().item(), v.flatten()[err.argmax()].item())


@pytest.mark.parametrize("isa", isa_params())
def test_sigmoid_saturates_as_torch(isa, monkeypatch):
    """Exactly 0 where exp(-v) overflows and 1 where it underflows (Note
    [Saturated exp]), as torch's float32 sigmoid; just before the overflow,
    the subnormal tail of 1 / (1 + exp(-v))."""
    force_cpu_isa(monkeypatch, isa)
    inf, nan = float("inf"), float("nan")
    v = torch.tensor([[-inf, -200.0, -104.0, -95.0, inf, 200.0, 100.0, 0.0, nan, -88.5, -88.0]])
    got = sigmoid_of(v)
    assert torch.equal(got[0, :8], torch.sigmoid(v[0, :8]))
    assert torch.equal(got[0, :8], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5]))
    assert got[0, 8].isnan()
    tail = got[0, 9:]
    assert (tail > 0).all() and (tail < torch.finfo(torch.float32).smallest_normal).all()
    assert (ulps(tail, torch.sigmoid(v[0, 9:].double())) <= SIGMOID_ULPS).all()
