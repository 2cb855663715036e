"""Every CPU path the dispatcher can choose, forced on this machine: the fused
float32 path (AVX-512), the fused bfloat16 forward (AVX512-BF16) and the
generic loop (FUSEDRNN_CPU_PATH=generic, and wherever no fused path applies).
Low-precision results must stay within a small multiple of torch.nn's own
error at that dtype against a float64 torch.nn."""
import pytest
import torch
from torch import nn

import fusedrnn

from module_helpers import flat_outputs
from helpers import rel_err


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


HAS_BF16 = "avx512_bf16" in cpu_flags() and "avx512f" in cpu_flags()


def run(module, x, dtype):
    """Outputs and gradients (input, every parameter) in float64."""
    m = module.to(dtype)
    xx = x.detach().to(dtype).requires_grad_(True)
    outs = flat_outputs(m(xx))
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, [xx] + list(m.parameters()))
    return [t.double() for t in outs + list(grads)]


@pytest.mark.parametrize("path", ["auto", "generic"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("H", [32, 17], ids=["even", "odd"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "bidir"])
def test_bfloat16_within_torch_error(path, kind, H, reverse, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_PATH", path)
    ref = getattr(nn, kind)(24, H, num_layers=2, bidirectional=reverse).double()
    ours = fusedrnn.from_torch(ref)
    x = torch.randn(20, 8, 24, dtype=torch.float64)
    want = run(ref, x, torch.float64)
    torch_low = run(ref, x, torch.bfloat16)
    ours_low = run(ours, x, torch.bfloat16)
    for o, t, w in zip(ours_low, torch_low, want):
        assert rel_err(o, w) <= 4 * rel_err(t, w) + 1e-6, (rel_err(o, w), rel_err(t, w))


@pytest.mark.skipif(not HAS_BF16, reason="the CPU has no AVX512-BF16")
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_bfloat16_fused_path_is_taken_where_it_applies(kind, monkeypatch):
    """auto and generic differ (float32 vs bfloat16 rounding of the recurrent
    product) where the fused bfloat16 forward applies (even H), and agree
    bitwise where it does not (odd H: both run the generic loop)."""
    for H, fused in [(64, True), (33, False)]:
        G = 4 if kind == "lstm" else 3
        x = torch.randn(20, 8, G * H).bfloat16()
        h0, c0 = torch.randn(8, H).bfloat16(), torch.randn(8, H).bfloat16()
        w, b = (torch.randn(G * H, H) / H ** 0.5).bfloat16(), torch.randn(G * H).bfloat16()
        res = []
        for path in ("auto", "generic"):
            monkeypatch.setenv("FUSEDRNN_CPU_PATH", path)
            res.append(fusedrnn.lstm_layer(x, h0, c0, w, None, b) if kind == "lstm"
                       else fusedrnn.gru_layer(x, h0, w, b))
        same = all(torch.equal(a, g) for a, g in zip(*res))
        assert same != fused
