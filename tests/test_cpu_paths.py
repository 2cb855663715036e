"""Every CPU path the dispatcher can choose, forced on this machine
(FUSEDRNN_CPU_ISA, isa_helpers.py): the fused float32 paths for AVX-512 and
for AVX2 (forward, backward, the input projection), the fused float64 path
(AVX-512), the fused bfloat16 forward and backward (AVX512-BF16, under avx512;
their step products on AMX tiles under amx) and the generic loop (generic, and wherever no fused path applies). Float32 and
float64 results against a float64 reference or torch.nn; low-precision ones
within a small multiple of torch.nn's own error at that dtype against a
float64 torch.nn."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from fusedrnn import reference as ref

from module_helpers import flat_outputs
from helpers import grad_tensors, layer_inputs, rel_err
from isa_helpers import (BF16_ISAS, CPU_ISAS, FUSED_ISAS, RUNNABLE, cpu_isa_in_force,
                         force_cpu_isa, isa_params)

KINDS = ["lstm", "gru"]
# Against float64: the fused paths' error in float32 (fp32 accumulation) is
# ~1e-7; in float64 ~1e-15 (sums in another order, exp/tanh within a few ulp).
TOL = {torch.float32: 1e-5, torch.float64: 1e-11}


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


@pytest.mark.parametrize("isa", isa_params(BF16_ISAS))
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("H", [32, 17], ids=["even", "odd"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["fwd", "bidir"])
def test_half_types_within_torch_error(isa, kind, dtype, H, bidirectional, monkeypatch):
    """bfloat16: the fused bfloat16 forward and backward (even H, AVX512-BF16,
    avx512 and amx, whose step products take AMX tiles) or the
    fused float32 ones; float16: the fused float32 path
    (Note [half types on the fused float32 path]); generic: the generic loop."""
    force_cpu_isa(monkeypatch, isa)
    ref = getattr(nn, kind)(24, H, num_layers=2, bidirectional=bidirectional).double()
    ours = fusedrnn.from_torch(ref)
    x = torch.randn(20, 8, 24, dtype=torch.float64)
    want = run(ref, x, torch.float64)
    torch_low = run(ref, x, dtype)
    ours_low = run(ours, x, dtype)
    for o, t, w in zip(ours_low, torch_low, want):
        assert rel_err(o, w) <= 4 * rel_err(t, w) + 1e-6, (rel_err(o, w), rel_err(t, w))


BF16_STEP_SHAPES = [(9, 13, 130), (1, 3, 66), (12, 1, 2), (7, 37, 96), (1, 5, 64), (6, 2, 32),
                    (4, 16, 64), (5, 33, 48)]


@pytest.mark.parametrize("isa", isa_params(("amx", "avx512")))
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("T, B, H", BF16_STEP_SHAPES,
                         ids=["ragged-panel", "one-step", "one-row", "tiles-ragged",
                              "tiles-one-step", "tiles-two-rows", "tiles-one-block",
                              "tiles-padded-depth"])
def test_bfloat16_backward_within_torch_error(isa, kind, T, B, H, monkeypatch):
    """The bfloat16 forward and backward (Note [the bfloat16 backward] in
    csrc/cpu/rnn_cpu.cpp; the float32 path where the CPU has no AVX512-BF16):
    a last column panel of two units, a single step, a single row; both
    directions. Under amx the step products take AMX tiles (Note [AMX tiles
    for the step product]), their depth padded where H is not a multiple of
    32; with H = 96, two row blocks and a last one of 5 rows, three forward
    panels (one thread has two) and a half-empty backward column panel; one
    step; a block of two rows (one row takes the vdpbf16ps kernels: kAmxMinRows
    in csrc/cpu/rnn_cpu.cpp); one full block; with H = 48, two blocks and a
    last of one row, at a padded depth."""
    force_cpu_isa(monkeypatch, isa)
    ref = getattr(nn, kind)(H, H, bidirectional=True).double()
    ours = fusedrnn.from_torch(ref)
    x = torch.randn(T, B, H, dtype=torch.float64)
    want = run(ref, x, torch.float64)
    torch_low = run(ref, x, torch.bfloat16)
    ours_low = run(ours, x, torch.bfloat16)
    for o, t, w in zip(ours_low, torch_low, want):
        assert rel_err(o, w) <= 4 * rel_err(t, w) + 1e-6, (rel_err(o, w), rel_err(t, w))


def layer_call(kind, x, h0, c0, w, b, batch_sizes=None):
    if kind == "lstm":
        return fusedrnn.lstm_layer(x, h0, c0, w, None, b, batch_sizes)
    return fusedrnn.gru_layer(x, h0, w, b, batch_sizes)


@pytest.mark.parametrize("isa", isa_params(("avx512", "avx2")))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_types_take_a_fused_path_where_one_applies(isa, kind, dtype, monkeypatch):
    """A fused path differs from generic (float32 vs half-type rounding of the
    recurrent product) on padded input, even and odd H; float16 on packed input,
    where no fused path applies, agrees bitwise (bfloat16's packed forward is
    fused where AVX512-BF16 runs: Note [packed input on the fused forward])."""
    G = 4 if kind == "lstm" else 3
    cases = [(64, False), (33, False)] + ([(64, True)] if dtype == torch.float16 else [])
    for H, packed in cases:
        x = torch.randn(20 * 8 if packed else 20, *(() if packed else (8,)), G * H).to(dtype)
        bs = torch.full((20,), 8, dtype=torch.long) if packed else None
        h0, c0 = torch.randn(8, H).to(dtype), torch.randn(8, H).to(dtype)
        w, b = (torch.randn(G * H, H) / H ** 0.5).to(dtype), torch.randn(G * H).to(dtype)
        res = []
        for path in (isa, "generic"):
            force_cpu_isa(monkeypatch, path)
            res.append(layer_call(kind, x, h0, c0, w, b, bs))
        assert all(torch.equal(a, g) for a, g in zip(*res)) == packed, (H, packed)


# ---------------------------------------------------------------- float32 on each path
def run_layer(kind, d, reverse, impl):
    if kind == "lstm":
        return impl.lstm_layer(d["x_proj"], d["h0"], d["c0"], d["w_hh"], None, d["b_hh"], None,
                               reverse)
    return impl.gru_layer(d["x_proj"], d["h0"], d["w_hh"], d["b_hh"], None, reverse)


def check_against_float64(call, d64, dtype):
    """call(impl, d), a layer of fusedrnn's (on the path in force) or the
    reference's on the inputs d: values and every gradient of d's leaves in
    dtype against the float64 reference."""
    dlo = {k: (v.detach().to(dtype).requires_grad_(True) if isinstance(v, torch.Tensor)
               and v.is_floating_point() else v) for k, v in d64.items()}
    got, want = call(fusedrnn, dlo), call(ref, d64)
    weights = [torch.randn_like(w) for w in want]
    glo = torch.autograd.grad(sum((g.double() * c).sum() for g, c in zip(got, weights)),
                              list(grad_tensors(dlo).values()))
    g64 = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, weights)),
                              list(grad_tensors(d64).values()))
    names = ["output", "h_n", "c_n"][:len(want)] + list(grad_tensors(d64))
    for name, a, e in zip(names, list(got) + list(glo), list(want) + list(g64)):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert rel_err(a, e) < TOL[dtype], (name, rel_err(a, e))


def check_layer_against_float64(kind, T, B, H, reverse, bias, dtype=torch.float32):
    """A float32 (float64) padded layer against the float64 reference."""
    d64 = layer_inputs(kind, False, "cpu", torch.float64, bias=bias, T=T, B=B, H=H,
                       requires_grad=True)
    check_against_float64(lambda impl, d: run_layer(kind, d, reverse, impl), d64, dtype)


# (T, B, H): one step, one row, tails of 8- and 16-lane vectors (5, 17, 70, 129),
# whole vectors of 8 lanes only (8, 24), batches that are not a multiple of any
# tile's rows, a backward panel cut in depth on AVX-512 (4H > 512 at H=129); one
# step of a few rows (dot products, x86/dot_gemm.h: one block of rows, two, and
# more rows than they take, on AVX-512; on AVX2 fewer rows); one step of more
# rows, panel by panel (13 rows of 21) and with W_hh in place (20 of 256); a
# step's last 7 or 8 rows over half panels on AVX-512, as two tiles of about 4
# rows in AVX2's backward (B = 7, 8, 13); steps of one or two rows in partial
# sums over k, with a k left over (H = 17).
SHAPES = [(1, 1, 5), (1, 3, 8), (1, 8, 17), (1, 13, 21), (9, 1, 24), (7, 7, 17), (4, 13, 70),
          (3, 6, 129), (1, 20, 256), (5, 8, 40), (6, 1, 17), (6, 2, 17)]


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,B,H", SHAPES, ids=[f"T{t}-B{b}-H{h}" for t, b, h in SHAPES])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_layer_matches_float64_reference(isa, kind, T, B, H, reverse, bias, dtype, monkeypatch):
    force_cpu_isa(monkeypatch, isa)
    check_layer_against_float64(kind, T, B, H, reverse, bias, dtype)


# One step of more rows than the dot products take (Note [a single step with w
# in place], Note [a single step panel by panel] in csrc/x86): W_hh in place
# (20 rows of 256 and 32 of 259: one and two vectors of a^T, a ragged last
# panel; 33 rows of 1024), panel by panel (40 rows of 64, 70 of 300).
SINGLE_STEPS = [(20, 256), (32, 259), (33, 1024), (40, 64), (70, 300)]


@pytest.mark.parametrize("isa", isa_params(FUSED_ISAS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B,H", SINGLE_STEPS, ids=[f"B{b}-H{h}" for b, h in SINGLE_STEPS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_single_step_is_bitwise_the_first_of_two(isa, kind, B, H, dtype, monkeypatch):
    """A single step's ways sum each recurrent term over k in the order of the
    step loop over packed panels, so a layer called on one step gives the first
    step of the same layer on two bit for bit: h (and the gates saved for
    backward, through the gradient of x_proj)."""
    force_cpu_isa(monkeypatch, isa)
    d = layer_inputs(kind, False, "cpu", dtype, T=2, B=B, H=H)
    x2 = d["x_proj"].requires_grad_(True)
    x1 = x2.detach()[:1].requires_grad_(True)
    out2 = run_layer(kind, dict(d, x_proj=x2), False, fusedrnn)[0]
    out1 = run_layer(kind, dict(d, x_proj=x1), False, fusedrnn)[0]
    assert torch.equal(out1[0], out2[0])
    g = torch.randn_like(out1)
    (g1,) = torch.autograd.grad(out1, x1, g)
    (g2,) = torch.autograd.grad(out2, x2, torch.cat([g, torch.zeros_like(g)]))
    assert torch.equal(g1[0], g2[0])


# Packed batches (Note [packed input on the fused forward]): rows ending at
# different steps (in reverse the batch grows), a tail of vector lanes, one step.
PACKED = [([4, 3, 3, 1], 17), ([9, 9, 5, 2, 2, 1, 1], 70), ([1], 8), ([3, 3], 33)]


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lengths,H", PACKED, ids=[f"L{len(l)}-H{h}" for l, h in PACKED])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_packed_layer_matches_float64_reference(isa, kind, lengths, H, reverse, dtype,
                                                monkeypatch):
    """Packed input: the output, h_n (c_n) and every gradient against the
    float64 reference (the forward fused on avx512 and avx2, the backward generic)."""
    force_cpu_isa(monkeypatch, isa)
    d64 = layer_inputs(kind, True, "cpu", torch.float64, lengths=lengths, H=H,
                       requires_grad=True)

    def call(impl, d):
        if kind == "lstm":
            return impl.lstm_layer(d["x_proj"], d["h0"], d["c0"], d["w_hh"], None, d["b_hh"],
                                   d["batch_sizes"], reverse)
        return impl.gru_layer(d["x_proj"], d["h0"], d["w_hh"], d["b_hh"], d["batch_sizes"],
                              reverse)
    check_against_float64(call, d64, dtype)


@pytest.mark.parametrize("isa", isa_params(BF16_ISAS))
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["fwd", "bidir"])
def test_packed_bfloat16_within_torch_error(isa, kind, bidirectional, monkeypatch):
    """Packed bfloat16 (the fused bfloat16 forward where AVX512-BF16 runs, under
    avx512 and amx: AMX tiles, steps of 6 down to 1 rows), outputs
    and gradients within 4x torch.nn's own bfloat16 error."""
    force_cpu_isa(monkeypatch, isa)
    ref64 = getattr(nn, kind)(24, 32, bidirectional=bidirectional).double()
    ours = fusedrnn.from_torch(ref64)
    lengths = torch.tensor([12, 12, 9, 4, 4, 1])
    x = torch.randn(12, 6, 24, dtype=torch.float64)

    def run_packed(module, dtype):
        m = module.to(dtype)
        xx = x.to(dtype).requires_grad_(True)
        out, h_n = m(pack_padded_sequence(xx, lengths, enforce_sorted=False))
        outs = [out.data] + list(h_n if isinstance(h_n, tuple) else (h_n,))
        g = torch.Generator().manual_seed(7)
        loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum()
                   for o in outs)
        grads = torch.autograd.grad(loss, [xx] + list(m.parameters()))
        return [t.double() for t in outs + list(grads)]
    want = run_packed(ref64, torch.float64)
    torch_low = run_packed(ref64, torch.bfloat16)
    ours_low = run_packed(ours, torch.bfloat16)
    for o, t, w in zip(ours_low, torch_low, want):
        assert rel_err(o, w) <= 4 * rel_err(t, w) + 1e-6, (rel_err(o, w), rel_err(t, w))


@pytest.mark.parametrize("isa", isa_params(("avx512", "avx2")))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_layer_panels_cut_in_depth(isa, kind, dtype, monkeypatch):
    """H = 1100: forward and backward panels deeper than one pass
    (panel_gemm.h, depth_block) on every vector width, tiles summed in a buffer."""
    force_cpu_isa(monkeypatch, isa)
    check_layer_against_float64(kind, 2, 7, 1100, False, True, dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_float64_takes_the_fused_path_where_one_applies(kind, monkeypatch):
    """On avx512, float64 input, padded or packed, runs the fused float64
    forward, whose sums and exp/tanh differ from the generic loop's in the last
    bits (Note [packed input on the fused forward] in csrc/x86/fused_loop.h)."""
    if "avx512" not in RUNNABLE:
        pytest.skip("this CPU or build has no avx512 path")
    G = 4 if kind == "lstm" else 3
    H = 37
    for packed in (False, True):
        x = torch.randn(20 * 8 if packed else 20, *(() if packed else (8,)), G * H,
                        dtype=torch.float64)
        bs = torch.full((20,), 8, dtype=torch.long) if packed else None
        h0, c0 = torch.randn(8, H, dtype=torch.float64), torch.randn(8, H, dtype=torch.float64)
        w = torch.randn(G * H, H, dtype=torch.float64) / H ** 0.5
        b = torch.randn(G * H, dtype=torch.float64)
        res = []
        for path in ("avx512", "generic"):
            force_cpu_isa(monkeypatch, path)
            res.append(layer_call(kind, x, h0, c0, w, b, bs))
        assert not all(torch.equal(a, g) for a, g in zip(*res)), packed
        assert all(rel_err(a, g) < TOL[torch.float64] for a, g in zip(*res))


# (M, K, N): one row, tails of both vector widths, several row blocks (M > 192),
# K deeper than one pass over a panel; the dot products of a few rows (one and
# several blocks of rows, N not a multiple of the rows of w read together), w
# in place for up to 64 rows with K >= 256 (panels of a^T one to four vectors
# wide, one or several of them; K deeper than a pass or not) and the panels
# packed one at a time (M <= 192; x86/dot_gemm.h, fused_ops.h).
LINEAR_SHAPES = [(1, 17, 5), (3, 40, 9), (7, 33, 70), (12, 100, 130), (200, 17, 33),
                 (400, 9, 16), (13, 2100, 20), (20, 1030, 37), (40, 1024, 9), (50, 1024, 20),
                 (30, 300, 50), (64, 256, 70), (100, 600, 70), (20, 200, 40)]


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("M,K,N", LINEAR_SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in LINEAR_SHAPES])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_linear_matches_float64(isa, M, K, N, bias, dtype, monkeypatch):
    """fusedrnn::linear and its gradients (the fused GEMMs on avx512 and avx2
    in float32, on avx512 in float64; ATen's elsewhere), values and gradients."""
    force_cpu_isa(monkeypatch, isa)
    x = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    w = torch.randn(N, K, dtype=torch.float64, requires_grad=True)
    b = torch.randn(N, dtype=torch.float64, requires_grad=True) if bias else None
    leaves = [x, w] + ([b] if bias else [])
    ours = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    got = fusedrnn._ops.linear(*ours, *([] if bias else [None]))
    want = torch.nn.functional.linear(x, w, b)
    assert got.dtype == dtype and rel_err(got, want) < TOL[dtype]
    c = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad((got.double() * c).sum(), ours),
                    torch.autograd.grad((want * c).sum(), leaves)):
        assert a.dtype == dtype and rel_err(a, e) < TOL[dtype]


# (M, K, N) with K even (the bfloat16 GEMM's k pairs; one deeper than a pass
# over a panel) and odd (ATen's GEMM).
HALF_LINEAR_SHAPES = [(1, 2, 5), (7, 34, 70), (200, 16, 33), (13, 2100, 20), (9, 33, 16)]


@pytest.mark.parametrize("isa", isa_params(BF16_ISAS))
@pytest.mark.parametrize("M,K,N", HALF_LINEAR_SHAPES,
                         ids=[f"{m}x{k}x{n}" for m, k, n in HALF_LINEAR_SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_half_types_within_torch_error(isa, M, K, N, dtype, monkeypatch):
    """fusedrnn::linear in bfloat16 (the AVX512-BF16 GEMM on avx512 for even K,
    ATen's elsewhere, oneDNN's on AMX under amx) and float16 (ATen's), both on
    the float32 GEMM under avx2: values and gradients within a small multiple of
    torch's own error at that dtype against float64."""
    force_cpu_isa(monkeypatch, isa)
    leaves = [torch.randn(M, K, dtype=torch.float64), torch.randn(N, K, dtype=torch.float64),
              torch.randn(N, dtype=torch.float64)]
    leaves = [t.to(dtype).double().requires_grad_(True) for t in leaves]  # exact in dtype
    low = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    want = torch.nn.functional.linear(*leaves)
    c = torch.randn_like(want)
    res = []
    for f in (fusedrnn._ops.linear, torch.nn.functional.linear):
        y = f(*low)
        assert y.dtype == dtype
        res.append([y] + list(torch.autograd.grad((y.double() * c).sum(), low)))
    for o, t, w in zip(*res, [want] + list(torch.autograd.grad((want * c).sum(), leaves))):
        assert rel_err(o, w) <= 4 * rel_err(t, w) + 1e-6, (rel_err(o, w), rel_err(t, w))


@pytest.mark.parametrize("isa", isa_params(BF16_ISAS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_backward_one_gradient_as_both(isa, dtype, monkeypatch):
    """fusedrnn::linear_backward asked for the input's gradient alone, or the
    weight's and bias's alone, gives what it gives asked for all three, bit
    for bit, and empty tensors of the dtype for the rest."""
    force_cpu_isa(monkeypatch, isa)
    g, x, w = (torch.randn(*s).to(dtype) for s in ((37, 24), (37, 18), (24, 18)))
    both = torch.ops.fusedrnn.linear_backward(g, x, w, True, True, True)
    dx_only = torch.ops.fusedrnn.linear_backward(g, x, w, True, False, False)
    dw_only = torch.ops.fusedrnn.linear_backward(g, x, w, False, True, True)
    assert torch.equal(dx_only[0], both[0])
    assert torch.equal(dw_only[1], both[1]) and torch.equal(dw_only[2], both[2])
    for t in (dx_only[1], dx_only[2], dw_only[0]):
        assert t.numel() == 0 and t.dtype == dtype


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["fwd", "bidir"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_modules_match_torch_nn(isa, kind, bidirectional, bias, dtype, monkeypatch):
    """Two-layer modules (input projection, both directions) against a float64
    torch.nn: outputs, states and every gradient."""
    force_cpu_isa(monkeypatch, isa)
    net = getattr(nn, kind)(17, 13, num_layers=2, bidirectional=bidirectional, bias=bias)
    ours = fusedrnn.from_torch(net)
    x = torch.randn(6, 5, 17, dtype=torch.float64)
    for o, w in zip(run(ours, x, dtype), run(net.double(), x, torch.float64)):
        assert rel_err(o, w) < TOL[dtype]


@pytest.mark.parametrize("kind", KINDS)
def test_fused_paths_agree(kind, monkeypatch):
    """AVX-512 and AVX2 compute the same float32 products and gate math: the
    same results up to the order of float32 sums."""
    if len(FUSED_ISAS) < 2:
        pytest.skip("needs both fused paths")
    d = layer_inputs(kind, False, "cpu", torch.float32, T=5, B=7, H=37, requires_grad=True)
    res = []
    for isa in FUSED_ISAS:
        force_cpu_isa(monkeypatch, isa)
        outs = run_layer(kind, d, False, fusedrnn)
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
        res.append(list(outs) + list(torch.autograd.grad(loss, list(grad_tensors(d).values()))))
    for a, b in zip(*res):
        assert rel_err(a, b) < 1e-6


# ---------------------------------------------------------------- the knob
def test_cpu_isa_knob(monkeypatch):
    """Each runnable value forces its path; auto (or unset) is the widest the
    CPU has; FUSEDRNN_CPU_PATH=generic wins; a path this machine lacks and a bad
    value of either knob raise, through the ops too."""
    monkeypatch.delenv("FUSEDRNN_CPU_PATH", raising=False)
    for isa in RUNNABLE:
        monkeypatch.setenv("FUSEDRNN_CPU_ISA", isa)
        assert cpu_isa_in_force() == isa
    for isa in set(BF16_ISAS) - set(RUNNABLE):
        monkeypatch.setenv("FUSEDRNN_CPU_ISA", isa)
        with pytest.raises(RuntimeError, match=f"FUSEDRNN_CPU_ISA={isa}, but this"):
            cpu_isa_in_force()
    widest = next(isa for isa in BF16_ISAS if isa in RUNNABLE)
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", "auto")
    assert cpu_isa_in_force() == widest
    monkeypatch.delenv("FUSEDRNN_CPU_ISA")
    assert cpu_isa_in_force() == widest
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", FUSED_ISAS[-1] if FUSED_ISAS else "auto")
    monkeypatch.setenv("FUSEDRNN_CPU_PATH", "generic")
    assert cpu_isa_in_force() == "generic"
    d = layer_inputs("lstm", False, "cpu", torch.float32)
    for name, value in [("FUSEDRNN_CPU_ISA", "avx3"), ("FUSEDRNN_CPU_PATH", "fused")]:
        monkeypatch.setenv("FUSEDRNN_CPU_ISA", "auto")
        monkeypatch.setenv("FUSEDRNN_CPU_PATH", "auto")
        monkeypatch.setenv(name, value)
        for call in (cpu_isa_in_force, lambda: run_layer("lstm", d, False, fusedrnn),
                     lambda: fusedrnn._ops.linear(d["h0"], d["w_hh"], None)):
            with pytest.raises(RuntimeError, match=f"{name} must be auto"):
                call()
