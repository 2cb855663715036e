"""The cache of large CPU step buffers (Note [reused step buffers]): reused
memory never aliases a live tensor, results do not depend on what the cache
held, its tensors behave as at::empty's, and empty_cpu_cache gives it back."""
import pytest
import torch
from torch import nn

import fusedrnn
from isa_helpers import FUSED_ISAS, force_cpu_isa

ops = torch.ops.fusedrnn


def big_lstm(seed):
    """A layer whose step buffers exceed the cache's 512 KiB floor."""
    torch.manual_seed(seed)
    ref = nn.LSTM(128, 256)
    return ref, fusedrnn.from_torch(ref)


def test_live_outputs_are_not_reused():
    ref, ours = big_lstm(0)
    x1, x2 = torch.randn(60, 32, 128), torch.randn(60, 32, 128)
    with torch.no_grad():
        y1 = ours(x1)[0]
        kept = y1.clone()
        for _ in range(3):
            ours(x2)  # freed buffers go back and come out again
        assert torch.equal(y1, kept)
        del y1
        y1_again = ours(x1)[0]
    assert torch.equal(y1_again, kept)


def test_training_results_independent_of_cache_state():
    """The same call after the cache was emptied, and after it was filled
    with other calls' buffers (which hold stale values), gives bitwise equal
    outputs and gradients."""
    _, ours = big_lstm(1)
    x = torch.randn(50, 40, 128, requires_grad=True)
    gy = torch.randn(50, 40, 256)

    def step():
        ours.zero_grad()
        x.grad = None
        ours(x)[0].backward(gy)
        return [x.grad.clone()] + [p.grad.clone() for p in ours.parameters()]

    fusedrnn.empty_cpu_cache()
    first = step()
    assert ops._step_buffer_cache_bytes() > 0
    with torch.no_grad():
        ours(torch.randn(50, 40, 128) * 100)  # leave other values behind
    second = step()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_cpu_cache_gives_memory_back():
    _, ours = big_lstm(2)
    with torch.no_grad():
        ours(torch.randn(60, 32, 128))
    held = ops._step_buffer_cache_bytes()
    assert held >= 4 << 20
    assert fusedrnn.empty_cpu_cache() == held
    assert ops._step_buffer_cache_bytes() == 0


def test_cached_outputs_resize_like_at_empty():
    """Outputs from the cache keep a resizable storage (resize_ works as on
    torch.nn's outputs) and are ordinary tensors otherwise."""
    ref, ours = big_lstm(3)
    x = torch.randn(60, 32, 128)
    with torch.no_grad():
        y = ours(x)[0]
        want = ref(x)[0]
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    y.resize_(70, 40, 256).fill_(1.0)
    assert y.shape == (70, 40, 256) and bool((y == 1).all())


@pytest.mark.parametrize("isa", FUSED_ISAS)
def test_weight_gradients_below_a_huge_page_are_cached(isa, monkeypatch):
    """Buffers from 512 KiB to 2 MiB come from the cache in 64 KiB blocks: a
    768 KiB weight gradient goes back to it, whole, when freed (at::empty's
    came back from the kernel, page by page, on every call)."""
    force_cpu_isa(monkeypatch, isa)
    g, x, w = torch.randn(256, 768), torch.randn(256, 256), torch.randn(768, 256)
    fusedrnn.empty_cpu_cache()
    dw = ops.linear_backward(g, x, w, False, True, False)[1]
    torch.testing.assert_close(dw, g.T @ x, rtol=1e-5, atol=1e-4)
    assert ops._step_buffer_cache_bytes() == 0
    del dw
    assert ops._step_buffer_cache_bytes() == 768 * 1024


MIB = 1 << 20
ROLL = 1000  # requests: more than the cache's two windows of recent need


def buffer(n):
    """A uint8 step buffer of n bytes, untouched (mapping costs no memory)."""
    return ops._step_buffer(n)


def forget_recent_need():
    for _ in range(ROLL):
        del_me = buffer(MIB)
        del del_me
    fusedrnn.empty_cpu_cache()


def test_cache_keeps_what_a_call_had_at_once_beyond_a_gib():
    """Buffers handed out together (1.5 GiB here, as an LSTM's training step at
    T=100 B=128 H=2048 takes) all stay cached for the next call, though that is
    more than the 1 GiB the cache may always keep."""
    forget_recent_need()
    live = [buffer(512 * MIB) for _ in range(3)]
    del live
    assert ops._step_buffer_cache_bytes() == 1536 * MIB
    again = [buffer(512 * MIB) for _ in range(3)]
    assert ops._step_buffer_cache_bytes() == 0
    del again
    fusedrnn.empty_cpu_cache()


def test_over_the_limit_the_oldest_blocks_go_first():
    """Past the limit the block given back longest ago is unmapped, not the
    largest (that one is what the latest call used)."""
    forget_recent_need()
    old = buffer(300 * MIB)
    del old
    new = buffer(800 * MIB)  # too large a request for the cached block
    del new  # 1100 MiB cached, over 1 GiB: the 300 MiB block goes
    assert ops._step_buffer_cache_bytes() == 800 * MIB
    fusedrnn.empty_cpu_cache()


def test_blocks_not_reused_lately_go_before_fresh_memory():
    """A block that many requests passed over is unmapped when the cache next
    maps memory; a block in use meanwhile stays."""
    fusedrnn.empty_cpu_cache()
    stale = buffer(MIB)
    del stale
    for _ in range(ROLL):
        reused = buffer(4 * MIB)
        del reused
    assert ops._step_buffer_cache_bytes() == 5 * MIB
    fresh = buffer(64 * MIB)
    assert ops._step_buffer_cache_bytes() == 4 * MIB
    del fresh
    fusedrnn.empty_cpu_cache()
