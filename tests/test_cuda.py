"""CUDA-only checks: parity with cuDNN (torch.nn on CUDA) at each dtype,
determinism, very long sequences, each under every FUSEDRNN_ALGO (the
persistent kernel and the step-wise path), and the dispatcher itself. The
device-generic tests in the other files also run on CUDA through the `device`
fixture (gpu_check.sh runs them under each FUSEDRNN_ALGO)."""
import pytest
import torch

import fusedrnn

from helpers import layer_inputs, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")

MODELS = [torch.nn.LSTM, torch.nn.GRU]
ALGOS = ["auto", "persistent", "stepwise"]


@pytest.fixture(params=ALGOS)
def algo(request, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_ALGO", request.param)
    return request.param


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
def test_error_within_cudnn_error(cls, dtype, tf32, monkeypatch, algo):
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
def test_deterministic(cls, dtype, algo):
    """Same inputs, bitwise the same outputs and gradients (no float atomics)."""
    m = fusedrnn.from_torch(cls(40, 96, num_layers=2).cuda().to(dtype))
    x = torch.randn(50, 16, 40, device="cuda", dtype=dtype, requires_grad=True)
    a, b = run(m, x, None), run(m, x, None)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", MODELS)
def test_more_than_65535_steps(cls, algo):
    """No grid dimension limits T (step-wise: the loop is on the host;
    persistent: the loop is inside the kernel)."""
    T = 70_000
    m = cls(4, 8).cuda().double()
    f = fusedrnn.from_torch(m)
    x = torch.randn(T, 2, 4, device="cuda", dtype=torch.float64)
    with torch.no_grad():
        want, got = m(x), f(x)
    assert rel_err(got[0], want[0]) < 1e-10


def test_packed_sequences_match_cudnn(algo):
    m = torch.nn.LSTM(12, 20, bidirectional=True).cuda().double()
    f = fusedrnn.from_torch(m)
    x = torch.randn(9, 5, 12, device="cuda", dtype=torch.float64)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [9, 3, 7, 1, 4], enforce_sorted=False)
    (pw, (hw, cw)), (pg, (hg, cg)) = m(packed), f(packed)
    for a, b in [(pg.data, pw.data), (hg, hw), (cg, cw)]:
        assert rel_err(a, b) < 1e-10


def test_algo_env_is_validated(monkeypatch):
    monkeypatch.setenv("FUSEDRNN_ALGO", "fastest")
    m = fusedrnn.GRU(4, 8).cuda()
    with pytest.raises(RuntimeError, match="FUSEDRNN_ALGO must be auto, persistent or stepwise"):
        m(torch.randn(3, 2, 4, device="cuda"))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("algo_name,persistent", [("persistent", True), ("auto", False),
                                                  ("stepwise", False)])
def test_dispatcher_picks_the_persistent_kernel(kind, algo_name, persistent, monkeypatch):
    """The public op's results are bitwise the persistent kernel's exactly when
    the dispatcher takes it (B=8, H=96 fits on any supported GPU; auto is
    step-wise until the kernel has GPU results: Note [auto is step-wise until
    measured] in csrc/persistent/persistent.cu). Float32 with TF32 off: SIMT sums in another order than
    cuBLAS, so the step-wise results differ in the last bits."""
    monkeypatch.setenv("FUSEDRNN_ALGO", algo_name)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ops = torch.ops.fusedrnn
    G, H, B, T = (4 if kind == "lstm" else 3), 96, 8, 20
    x = torch.randn(T, B, G * H, device="cuda")
    h0 = torch.randn(B, H, device="cuda")
    w = torch.randn(G * H, H, device="cuda") / H ** 0.5
    b = torch.randn(G * H, device="cuda")
    if kind == "lstm":
        c0 = torch.randn(B, H, device="cuda")
        public = ops.lstm_forward(x, h0, c0, w, None, b, None, False, True)
        own = ops._persistent_lstm_forward(x, h0, c0, w, b, None, False, True, 0, 0, -1)
    else:
        public = ops.gru_forward(x, h0, w, b, None, False, True, True)
        own = ops._persistent_gru_forward(x, h0, w, b, None, False, True, 0, 0, -1)
    assert torch.equal(public[0], own[0]) == persistent
    assert rel_err(public[0], own[0]) < 1e-5


FALLBACK_SCRIPT = r"""
import os, warnings
import torch
import fusedrnn
from helpers import rel_err

torch.backends.cuda.matmul.allow_tf32 = False
torch.manual_seed(0)
for cls in (torch.nn.LSTM, torch.nn.GRU):
    m = fusedrnn.from_torch(cls(24, 96, num_layers=2).cuda())
    x = torch.randn(20, 8, 24, device="cuda", requires_grad=True)
    results = {}
    for algo in ("persistent", "stepwise"):
        os.environ["FUSEDRNN_ALGO"] = algo
        out = m(x)[0]
        grads = torch.autograd.grad(out.square().sum(), [x] + list(m.parameters()))
        results[algo] = [out] + list(grads)
    for a, b in zip(results["persistent"], results["stepwise"]):
        assert rel_err(a, b) < 1e-6, (cls, rel_err(a, b))
"""


def test_failed_cooperative_launch_falls_back_to_stepwise():
    """FUSEDRNN_FORCE_COOP_FAIL=1 makes every cooperative launch fail (as
    under MPS or on a partitioned GPU): the public ops run step-wise with the
    same results as FUSEDRNN_ALGO=stepwise and warn once per process, never
    raise (Note [cooperative launch fallback] in csrc/cuda/rnn_cuda.cu). A
    fresh process, so that no earlier test has used up the one warning."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, FUSEDRNN_FORCE_COOP_FAIL="1",
               PYTHONPATH=os.pathsep.join([here, os.path.dirname(here)]))
    r = subprocess.run([sys.executable, "-W", "always", "-c", FALLBACK_SCRIPT], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("runs the step-wise path instead") == 1, r.stderr


def test_forced_launch_failure_is_an_error_for_the_persistent_op(monkeypatch):
    """The _persistent_* ops ask for the kernel itself: no fallback there."""
    monkeypatch.setenv("FUSEDRNN_FORCE_COOP_FAIL", "1")
    H, B = 32, 4
    x = torch.randn(5, B, 3 * H, device="cuda")
    h0 = torch.randn(B, H, device="cuda")
    w = torch.randn(3 * H, H, device="cuda")
    with pytest.raises(RuntimeError, match="cudaLaunchCooperativeKernel"):
        torch.ops.fusedrnn._persistent_gru_forward(x, h0, w, None, None, False, True, 0, 0, -1)


def packed_lstm_forward(d):
    return torch.ops.fusedrnn.lstm_forward(d["x_proj"], d["h0"], d["c0"], d["w_hh"], None,
                                           d["b_hh"], d["batch_sizes"], False, True)


@pytest.mark.parametrize("algo_name", ALGOS)
def test_packed_input_replays_in_a_cuda_graph(algo_name, monkeypatch):
    """Packed input captured in a CUDA graph runs step-wise (Note [packed input
    under graph capture] in csrc/persistent/persistent.cu); each replay with
    fresh inputs matches an eager call on them (float64: 1e-10 whichever path
    the eager call takes)."""
    monkeypatch.setenv("FUSEDRNN_ALGO", algo_name)
    d = layer_inputs("lstm", True, "cuda", torch.float64, lengths=[6, 4, 4, 1], H=32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (cuBLAS handles) of both paths, off the capture
        for warm in ["stepwise", algo_name]:
            monkeypatch.setenv("FUSEDRNN_ALGO", warm)
            packed_lstm_forward(d)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = packed_lstm_forward(d)
    for _ in range(2):
        for k in ["x_proj", "h0", "c0"]:
            d[k].copy_(torch.randn_like(d[k]))
        graph.replay()
        want = packed_lstm_forward(d)
        for got, w in zip(captured, want):
            assert rel_err(got, w) < 1e-10


def test_persistent_op_refuses_packed_input_while_capturing():
    d = layer_inputs("gru", True, "cuda", torch.float32, lengths=[3, 2], H=16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with pytest.raises(RuntimeError, match="while a CUDA graph is being captured"):
            torch.ops.fusedrnn._persistent_gru_forward(d["x_proj"], d["h0"], d["w_hh"], d["b_hh"],
                                                       d["batch_sizes"], False, True, 0, 0, -1)
