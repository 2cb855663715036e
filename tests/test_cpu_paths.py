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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("H", [32, 17], ids=["even", "odd"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["fwd", "bidir"])
def test_half_types_within_torch_error(path, kind, dtype, H, bidirectional, monkeypatch):
    """bfloat16: the fused bfloat16 forward (even H, AVX512-BF16) or the fused
    float32 one; float16: the fused float32 path; backward of both on the fused
    float32 path (Note [half types on the fused float32 path]); generic: the
    generic loop."""
    monkeypatch.setenv("FUSEDRNN_CPU_PATH", path)
    ref = getattr(nn, kind)(24, H, num_layers=2, bidirectional=bidirectional).double()
    ours = fusedrnn.from_torch(ref)
    x = torch.randn(20, 8, 24, dtype=torch.float64)
    want = run(ref, x, torch.float64)
    torch_low = run(ref, x, dtype)
    ours_low = run(ours, x, dtype)
    for o, t, w in zip(ours_low, torch_low, want):
        assert rel_err(o, w) <= 4 * rel_err(t, w) + 1e-6, (rel_err(o, w), rel_err(t, w))


def layer_call(kind, x, h0, c0, w, b, batch_sizes=None):
    if kind == "lstm":
        return fusedrnn.lstm_layer(x, h0, c0, w, None, b, batch_sizes)
    return fusedrnn.gru_layer(x, h0, w, b, batch_sizes)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_types_take_a_fused_path_where_one_applies(kind, dtype, monkeypatch):
    """auto differs from generic (float32 vs half-type rounding of the recurrent
    product) on padded input, even and odd H; on packed input, where no fused
    path applies, the two agree bitwise."""
    if not ("avx512f" in cpu_flags() and "avx512bw" in cpu_flags()):
        pytest.skip("no AVX-512: only the generic loop is built for this CPU")
    G = 4 if kind == "lstm" else 3
    for H, packed in [(64, False), (33, False), (64, True)]:
        x = torch.randn(20 * 8 if packed else 20, *(() if packed else (8,)), G * H).to(dtype)
        bs = torch.full((20,), 8, dtype=torch.long) if packed else None
        h0, c0 = torch.randn(8, H).to(dtype), torch.randn(8, H).to(dtype)
        w, b = (torch.randn(G * H, H) / H ** 0.5).to(dtype), torch.randn(G * H).to(dtype)
        res = []
        for path in ("auto", "generic"):
            monkeypatch.setenv("FUSEDRNN_CPU_PATH", path)
            res.append(layer_call(kind, x, h0, c0, w, b, bs))
        assert all(torch.equal(a, g) for a, g in zip(*res)) == packed, (H, packed)
