"""The weight gradients of the fused CPU paths (dW = dY^T X and the bias
gradient, Note [weight-gradient GEMM]; float32, and bfloat16 in k-pairs)
against float64, over sizes that cross every blocking edge: rows per block
(128), columns per tile (6) and per block (192), panel width (64), the sums of
a few rows' outer products (up to 8 rows, Note [weight gradients of a few
rows]); and the recurrent dW_hh/db_hh through the ops."""
import pytest
import torch

import fusedrnn
from fusedrnn import reference
from helpers import rel_err
from isa_helpers import force_cpu_isa, isa_params

ops = torch.ops.fusedrnn


@pytest.mark.parametrize("K", [1, 8, 9, 127, 300])
@pytest.mark.parametrize("M,N", [(1, 1), (7, 65), (200, 130), (389, 64)])
def test_linear_weight_grad_matches_float64(K, M, N):
    g = torch.Generator().manual_seed(K * 1000 + M + N)
    dy = torch.randn(K, M, generator=g)
    x = torch.randn(K, N, generator=g)
    w = torch.randn(M, N, generator=g)
    _, dw, db = ops.linear_backward(dy, x, w, False, True, True)
    want_w = dy.double().T @ x.double()
    want_b = dy.double().sum(0)
    # torch's float32 GEMM on the same operands sets the scale of the error.
    torch_err = rel_err(dy.T @ x, want_w)
    assert rel_err(dw, want_w) <= 4 * torch_err + 1e-6
    assert rel_err(db, want_b) <= 1e-6


@pytest.mark.parametrize("isa", isa_params(("avx512", "avx2")))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N", [130, 256, 577])
def test_linear_weight_grad_both_layouts_of_dy(isa, dtype, N, monkeypatch):
    """dY's block copied as rows (X up to 4 panels wide on AVX-512) and cut
    into tiles (wider X, and AVX2), Note [dY's block as rows]: M = 389 ends
    in a partial tile and a partial block of 192 columns, K = 300 in a
    partial block of 128 rows; against float64, as the test above."""
    force_cpu_isa(monkeypatch, isa)
    K, M = 300, 389
    g = torch.Generator().manual_seed(N)
    dy = torch.randn(K, M, generator=g, dtype=dtype)
    x = torch.randn(K, N, generator=g, dtype=dtype)
    w = torch.randn(M, N, generator=g, dtype=dtype)
    _, dw, db = ops.linear_backward(dy, x, w, False, True, True)
    assert dw.dtype == db.dtype == dtype
    # float32: within 4x torch's own float32 product of float64's; float64:
    # against float64's own product, which sums in another order.
    want_w, want_b = dy.double().T @ x.double(), dy.double().sum(0)
    tol = 4 * rel_err(dy.T @ x, want_w) + 1e-6 if dtype == torch.float32 else 1e-13
    assert rel_err(dw, want_w) <= tol
    assert rel_err(db, want_b) <= (1e-6 if dtype == torch.float32 else 1e-13)


def test_linear_weight_grad_of_strided_input():
    """A non-contiguous input (a batch-first view) gives the same gradient."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 9, 33, generator=g).transpose(0, 1)  # [9, 5, 33], strided
    dy = torch.randn(9, 5, 70, generator=g)
    w = torch.randn(70, 33, generator=g)
    _, dw, _ = ops.linear_backward(dy, x, w, False, True, False)
    want = dy.reshape(-1, 70).double().T @ x.reshape(-1, 33).double()
    assert rel_err(dw, want) <= 1e-6


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_weight_grad_matches_reference(kind, reverse):
    """dW_hh and db_hh of a layer with T*B over one block of rows and H over
    one panel, against the reference in float64."""
    T, B, H = 40, 5, 70
    G = (4 if kind == "lstm" else 3) * H
    g = torch.Generator().manual_seed(11)
    x = torch.randn(T, B, G, generator=g)
    h0 = torch.randn(B, H, generator=g)
    c0 = torch.randn(B, H, generator=g)
    w = (torch.randn(G, H, generator=g) / H ** 0.5)
    b = torch.randn(G, generator=g)
    gout = torch.randn(T, B, H, generator=g)

    def grads(dtype, fn):
        leaves = [t.to(dtype).requires_grad_() for t in (w, b)]
        args = [x.to(dtype), h0.to(dtype)] + ([c0.to(dtype)] if kind == "lstm" else [])
        out = fn(*args, leaves[0], None, leaves[1]) if kind == "lstm" else \
            fn(*args, leaves[0], leaves[1])
        return torch.autograd.grad(out[0], leaves, gout.to(dtype))

    layer = fusedrnn.lstm_layer if kind == "lstm" else fusedrnn.gru_layer
    ref = reference.lstm_layer if kind == "lstm" else reference.gru_layer
    rev = lambda f: (lambda *a: f(*a, reverse=reverse))  # noqa: E731
    ours = grads(torch.float32, rev(layer))
    want = grads(torch.float64, rev(ref))
    low = grads(torch.float32, rev(ref))
    for o, t, w64 in zip(ours, low, want):
        assert rel_err(o, w64) <= 4 * rel_err(t, w64) + 1e-6


# ---------------------------------------------------------------- bfloat16
@pytest.mark.parametrize("isa", isa_params(("avx512", "generic")))
@pytest.mark.parametrize("K", [1, 2, 255, 257, 600])
@pytest.mark.parametrize("M,N", [(1, 1), (7, 65), (200, 130)])
def test_linear_weight_grad_bfloat16(isa, K, M, N, monkeypatch):
    """bfloat16 dY and X (the AVX512-BF16 GEMM where the CPU has it, k in
    pairs, an odd K padded; ATen's elsewhere): the products of bfloat16 values
    are exact in float32, so dW and db against float64 of the same values are
    off by float32 accumulation only, and rounded once to bfloat16."""
    force_cpu_isa(monkeypatch, isa)
    g = torch.Generator().manual_seed(K * 1000 + M + N)
    dy = torch.randn(K, M, generator=g).bfloat16()
    x = torch.randn(K, N, generator=g).bfloat16()
    w = torch.randn(M, N, generator=g).bfloat16()
    _, dw, db = ops.linear_backward(dy, x, w, False, True, True)
    assert dw.dtype == db.dtype == torch.bfloat16
    want_w = (dy.double().T @ x.double()).bfloat16().double()
    want_b = dy.double().sum(0).bfloat16().double()
    # One bfloat16 rounding of the float32 result: within one ulp (2^-8).
    assert rel_err(dw, want_w) <= 2 ** -7 and rel_err(db, want_b) <= 2 ** -7
    assert rel_err(dw, dy.double().T @ x.double()) <= 2 ** -8


@pytest.mark.parametrize("isa", isa_params(("avx512", "avx2", "generic")))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_lstm_input_backward_is_the_two_ops(isa, dtype, reverse, bias, monkeypatch):
    """Note [one product for both weight gradients]: lstm_input_backward's
    gradients are lstm_backward's then linear_backward's, bit for bit, for
    each choice of gradients asked for; at T*B = 200 rows dW_ih and dW_hh come
    from one product over [x | h_{t-1}] (I = 100, H = 70: panels of 64 columns
    straddle the two blocks), at 24 rows from ATen's mm. Also against float64
    products that pair each row of dG with x and h_{t-1} directly."""
    force_cpu_isa(monkeypatch, isa)
    I, H = 100, 70
    for T, B in ((40, 5), (3, 8)):
        g = torch.Generator().manual_seed(T)

        def randn(*shape):
            return torch.randn(*shape, generator=g, dtype=dtype)

        x, h0, c0 = randn(T, B, I), randn(B, H), randn(B, H)
        w_ih, w_hh = randn(4 * H, I) / I ** 0.5, randn(4 * H, H) / H ** 0.5
        b_ih, b_hh = (randn(4 * H), randn(4 * H)) if bias else (None, None)
        out, _, _, gates, cells = ops.lstm_forward(ops.linear(x, w_ih, b_ih), h0, c0, w_hh, None,
                                                   b_hh, None, reverse, True)
        g_out, g_h, g_c = randn(T, B, H), randn(B, H), randn(B, H)
        for asked in [(True, True, True), (False, True, False), (True, False, True),
                      (False, False, False)]:
            got = ops.lstm_input_backward(g_out, g_h, g_c, x, out, gates, cells, h0, c0, w_ih,
                                          w_hh, reverse, bias, *asked)
            d_xp, d_h0, d_c0, d_w_hh, _, d_b_hh = ops.lstm_backward(
                g_out, g_h, g_c, out, gates, cells, h0, c0, w_hh, None, None, reverse, bias)
            d_x, d_w_ih, d_b_ih = ops.linear_backward(d_xp, x, w_ih, *asked)
            for a, e in zip(got, (d_x, d_h0, d_c0, d_w_ih, d_w_hh, d_b_ih, d_b_hh)):
                assert a.dtype == e.dtype and torch.equal(a, e)
            if all(asked):
                both = got[3], got[4]
        dg = d_xp.double().reshape(T * B, 4 * H)
        prev = torch.cat([out[1:], h0[None]]) if reverse else torch.cat([h0[None], out[:-1]])
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert rel_err(both[0], dg.T @ x.double().reshape(T * B, I)) <= tol
        assert rel_err(both[1], dg.T @ prev.double().reshape(T * B, H)) <= tol
    torch.library.opcheck(ops.lstm_input_backward,
                          (g_out, g_h, g_c, x, out, gates, cells, h0, c0, w_ih, w_hh, reverse,
                           bias, True, True, True),
                          test_utils=("test_schema", "test_faketensor"))
