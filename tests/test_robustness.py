"""Bitwise determinism, thread safety, very long sequences and no memory
growth over many calls."""
import gc
import os
import threading
import tracemalloc

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn

from helpers import rel_err
from module_helpers import flat_outputs


def forward_backward(module, x, hx=None):
    """Every output and every gradient (input and parameters) of one call."""
    x = x.detach().requires_grad_()
    res = module(x) if hx is None else module(x, hx)
    outs = flat_outputs(res)
    loss = sum((o.double() * (k + 1)).sum() for k, o in enumerate(outs))
    grads = torch.autograd.grad(loss, [x] + list(module.parameters()))
    return [o.detach() for o in outs] + list(grads)


CASES = [("LSTM", dict(num_layers=2, bidirectional=True)), ("GRU", dict(num_layers=2)),
         ("LSTM", dict(proj_size=16)), ("LSTMCell", {}), ("GRUCell", {})]
IDS = [f"{k}-{'-'.join(map(str, kw.values())) or 'default'}" for k, kw in CASES]


def sized(kind, kw, dtype=torch.float32):
    """Large enough for the vectorised, multi-threaded CPU paths."""
    m = getattr(fusedrnn, kind)(24, 32, **kw).to(dtype)
    x = torch.randn(*((16, 24) if kind.endswith("Cell") else (6, 16, 24)), dtype=dtype)
    return m, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind,kw", CASES, ids=IDS)
def test_bitwise_deterministic(kind, kw, dtype):
    m, x = sized(kind, kw, dtype)
    first = forward_backward(m, x)
    for _ in range(2):
        for a, b in zip(forward_backward(m, x), first, strict=True):
            assert torch.equal(a, b)


def test_bitwise_deterministic_packed():
    m, x = sized("GRU", dict(bidirectional=True))
    lengths = [6, 3, 5, 6, 1, 5, 2, 2, 6, 4, 6, 1, 3, 4, 1, 2]

    def run():
        xx = x.detach().requires_grad_()
        out = m(pack_padded_sequence(xx, lengths, enforce_sorted=False))
        outs = [out[0].data, out[1]]
        loss = sum((o.double() * (k + 1)).sum() for k, o in enumerate(outs))
        return outs + list(torch.autograd.grad(loss, [xx] + list(m.parameters())))
    first = run()
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(run(), first, strict=True))


@pytest.mark.parametrize("kind,kw", CASES[:2] + CASES[3:], ids=IDS[:2] + IDS[3:])
def test_threads_give_the_serial_results(kind, kw):
    """Threads calling one module at once, each on its own input, get exactly
    what the same calls give one after another."""
    m, _ = sized(kind, kw)
    n_threads, rounds = 4, 2
    inputs = [sized(kind, kw)[1] for _ in range(n_threads)]
    serial = [forward_backward(m, x) for x in inputs]
    results, errors = [None] * n_threads, []
    barrier = threading.Barrier(n_threads)

    def work(k):
        try:
            barrier.wait()
            for _ in range(rounds):
                results[k] = forward_backward(m, inputs[k])
                if not all(torch.equal(a, b) for a, b in zip(results[k], serial[k], strict=True)):
                    errors.append(k)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_hundred_thousand_steps(kind):
    """T = 100,000 (small hidden size): no recursion or stack use per step. The
    outputs match torch.nn; the gradients match our float64 (generic) path:
    torch.nn's training path records an autograd node per op and step."""
    T = 100_000
    ref = getattr(nn, kind)(2, 3)
    ours = fusedrnn.from_torch(ref)
    x = torch.randn(T, 2, 2)
    got = forward_backward(ours, x)
    with torch.no_grad():
        want = flat_outputs(ref(x))
    want += forward_backward(fusedrnn.from_torch(ref.double()), x.double())[len(want):]
    for a, e in zip(got, want, strict=True):
        assert rel_err(a, e) < 1e-4


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_no_memory_growth_over_many_calls():
    """Thousands of training calls (forward and backward) keep the resident set
    and Python's allocations flat after a warm-up."""
    mods = [fusedrnn.LSTM(8, 16, num_layers=2, bidirectional=True), fusedrnn.GRU(8, 16),
            fusedrnn.LSTMCell(8, 16)]
    xs = [torch.randn(5, 3, 8), torch.randn(5, 3, 8), torch.randn(3, 8)]

    def calls(n):
        for _ in range(n):
            for m, x in zip(mods, xs):
                forward_backward(m, x)
                with torch.no_grad():
                    m(x)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny sizes: a thread pool's wake-ups would dominate
    try:
        calls(50)  # warm-up: allocator caches, lazy initialisation
        gc.collect()
        tracemalloc.start()
        rss0 = _rss_bytes()
        calls(600)
        gc.collect()
        py_now, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        growth = _rss_bytes() - rss0
    finally:
        torch.set_num_threads(threads)
    # One leaked 1 KiB buffer per call (3600 calls) would exceed these.
    assert py_now < 1 << 20, py_now
    assert growth < 3 << 20, growth
