"""The persistent kernel (csrc/persistent/) through the _persistent_* ops.

On the CPU these run its emulator: the kernel's own phase functions, block by
block and thread by thread, tensor-core tiles emulated with tf32 rounding. On
CUDA they run the cooperative kernel. Both are compared with the public ops
on the step-wise path (FUSEDRNN_ALGO=stepwise, set for every test here), whose
parity with the reference test_ops.py establishes.
"""
import pytest
import torch

import fusedrnn  # noqa: F401  (registers the ops)

from fusedrnn._ops import H100_SMEM, H100_SMS, persistent_layout
from helpers import LENGTHS, layer_inputs, rel_err

ops = torch.ops.fusedrnn
SIMT, TENSOR_CORE = 0, 1
KINDS = ["lstm", "gru"]


@pytest.fixture(autouse=True)
def stepwise_reference(monkeypatch):
    """The reference runs step-wise: on CUDA the dispatcher may send the public
    ops to the persistent kernel itself, and a systematic kernel error would
    then pass by matching itself. The _persistent_* ops ignore FUSEDRNN_ALGO."""
    monkeypatch.setenv("FUSEDRNN_ALGO", "stepwise")


def inputs(kind, device, dtype, T=5, B=6, H=7, lengths=None, bias=True):
    """Random op inputs (no projection); packed when lengths (sorted,
    decreasing) are given."""
    packed = lengths is not None
    return layer_inputs(kind, packed, device, dtype, bias=bias,
                        lengths=lengths if packed else LENGTHS, T=T, B=B, H=H)


def forward(kind, d, reverse, persistent, max_blocks=0, mode=SIMT, max_chunk=0):
    if kind == "lstm":
        args = (d["x_proj"], d["h0"], d["c0"], d["w_hh"])
        if persistent:
            return ops._persistent_lstm_forward(*args, d["b_hh"], d["batch_sizes"], reverse,
                                                True, max_blocks, max_chunk, mode)
        return ops.lstm_forward(*args, None, d["b_hh"], d["batch_sizes"], reverse, True)
    args = (d["x_proj"], d["h0"], d["w_hh"], d["b_hh"], d["batch_sizes"], reverse)
    if persistent:
        return ops._persistent_gru_forward(*args, True, max_blocks, max_chunk, mode)
    return ops.gru_forward(*args, True, True)


def backward(kind, d, fwd, grads, reverse, persistent, max_blocks=0, mode=SIMT, max_chunk=0):
    """grads: (grad_output, grad_h_n[, grad_c_n]) for the forward results fwd."""
    has_bias = d["b_hh"] is not None
    if kind == "lstm":
        out, _, _, gates, cells = fwd
        g_out, g_h, g_c = grads
        args = (g_out, g_h, g_c, out, gates, cells, d["h0"], d["c0"], d["w_hh"])
        if persistent:
            return ops._persistent_lstm_backward(*args, d["batch_sizes"], reverse, has_bias,
                                                 max_blocks, max_chunk, mode)
        return ops.lstm_backward(*args, None, d["batch_sizes"], reverse, has_bias)
    out, _, gates = fwd
    g_out, g_h = grads
    args = (g_out, g_h, out, gates, d["h0"], d["w_hh"], d["batch_sizes"], reverse)
    if persistent:
        return ops._persistent_gru_backward(*args, has_bias, max_blocks, max_chunk, mode)
    return ops.gru_backward(*args, True, has_bias)


def random_grads(kind, fwd):
    out, h_n = fwd[0], fwd[1]
    g = [torch.randn_like(out), torch.randn_like(h_n)]
    if kind == "lstm":
        g.append(torch.randn_like(fwd[2]))
    return g


def nonempty(ts):
    return [t for t in ts if t.numel() > 0]


# (T, B, H, lengths, max_blocks, max_chunk): one block; several, H not
# divisible by the units per block; several K chunks (H > 64, chunks of 64)
# and several register tiles of batch rows; packed with rows ending at
# different steps; as many blocks as the device holds.
SHAPES = [
    pytest.param(4, 3, 5, None, 1, 0, id="one-block"),
    pytest.param(5, 6, 7, None, 3, 0, id="ragged-blocks"),
    pytest.param(3, 17, 70, None, 4, 64, id="chunks-and-tiles"),
    pytest.param(3, 17, 70, None, 4, 0, id="one-chunk"),
    pytest.param(None, None, 9, [5, 4, 4, 2, 1], 2, 0, id="packed"),
    pytest.param(3, 2, 20, None, 0, 0, id="device-blocks"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,B,H,lengths,max_blocks,max_chunk", SHAPES)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_simt_float64_matches_stepwise(device, kind, T, B, H, lengths, max_blocks, max_chunk,
                                       reverse):
    """SIMT path, float64: forward results, saved tensors and every backward
    result equal the step-wise op's to 1e-10 relative."""
    d = inputs(kind, device, torch.float64, T=T, B=B, H=H, lengths=lengths)
    want = forward(kind, d, reverse, persistent=False)
    got = forward(kind, d, reverse, persistent=True, max_blocks=max_blocks, max_chunk=max_chunk)
    for g, w in zip(nonempty(got), nonempty(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_err(g, w) < 1e-10
    grads = random_grads(kind, want)
    want_b = backward(kind, d, want, grads, reverse, persistent=False)
    got_b = backward(kind, d, want, grads, reverse, persistent=True, max_blocks=max_blocks,
                     max_chunk=max_chunk)
    for g, w in zip(nonempty(got_b), nonempty(want_b)):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_err(g, w) < 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_without_bias_and_without_saving(device, kind):
    d = inputs(kind, device, torch.float64, bias=False)
    want = forward(kind, d, False, persistent=False)
    got = forward(kind, d, False, persistent=True, max_blocks=2)
    for g, w in zip(nonempty(got), nonempty(want)):
        assert rel_err(g, w) < 1e-10
    grads = random_grads(kind, want)
    for g, w in zip(nonempty(backward(kind, d, want, grads, False, True, 2)),
                    nonempty(backward(kind, d, want, grads, False, False))):
        assert rel_err(g, w) < 1e-10
    # train=False saves nothing.
    if kind == "lstm":
        res = ops._persistent_lstm_forward(d["x_proj"], d["h0"], d["c0"], d["w_hh"], None, None,
                                           False, False, 2, 0, SIMT)
        assert res[3].numel() == 0 and res[4].numel() == 0
    else:
        res = ops._persistent_gru_forward(d["x_proj"], d["h0"], d["w_hh"], None, None, False,
                                          False, 2, 0, SIMT)
        assert res[2].numel() == 0


def errors_vs_float64(kind, d64, grads64, dtype, reverse, persistent, mode=SIMT, max_blocks=3,
                      max_chunk=0):
    """Relative error of every forward and backward result of one path at
    `dtype` (its backward fed its own forward's saved state) against the
    step-wise op in float64."""
    def cast(t):
        return t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t

    d = {k: cast(v) for k, v in d64.items()}
    want = forward(kind, d64, reverse, persistent=False)
    want_b = backward(kind, d64, want, grads64, reverse, persistent=False)
    fwd = forward(kind, d, reverse, persistent, max_blocks, mode, max_chunk)
    bwd = backward(kind, d, fwd, [cast(g) for g in grads64], reverse, persistent, max_blocks,
                   mode, max_chunk)
    n_out = 3 if kind == "lstm" else 2
    res = list(fwd[:n_out]) + nonempty(bwd)
    ref = list(want[:n_out]) + nonempty(want_b)
    return [rel_err(a, b) for a, b in zip(res, ref)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", [SIMT, TENSOR_CORE], ids=["simt", "tensor-core"])
@pytest.mark.parametrize("max_chunk", [0, 64], ids=["one-chunk", "chunks"])
def test_low_precision_within_stepwise_error(device, kind, dtype, mode, max_chunk):
    """At each dtype and mode, every result's error against float64 is at most
    4x the step-wise op's at that dtype plus a floor: 1e-6 for strict fp32;
    for tf32 operands (tensor cores on fp32) 4x tf32's unit roundoff, 2^-11."""
    d64 = inputs(kind, device, torch.float64, T=6, B=18, H=40)
    grads = random_grads(kind, forward(kind, d64, False, persistent=False))
    ours = errors_vs_float64(kind, d64, grads, dtype, False, persistent=True, mode=mode,
                             max_chunk=max_chunk)
    theirs = errors_vs_float64(kind, d64, grads, dtype, False, persistent=False)
    floor = 4 * 2.0 ** -11 if (dtype == torch.float32 and mode == TENSOR_CORE) else 1e-6
    for o, t in zip(ours, theirs):
        assert o <= 4 * t + floor, (ours, theirs)


def test_tensor_core_tiles_float32_packed_reverse(device):
    """Tensor-core path with several m and n tiles, packed and reversed:
    within tf32's error of the float64 result."""
    d64 = inputs("lstm", device, torch.float64, H=33, lengths=[6, 6, 5, 3, 3, 3, 2, 2, 2, 2, 2,
                                                            1, 1, 1, 1, 1, 1, 1])
    grads = random_grads("lstm", forward("lstm", d64, True, persistent=False))
    errs = errors_vs_float64("lstm", d64, grads, torch.float32, True, persistent=True,
                             mode=TENSOR_CORE, max_blocks=5, max_chunk=64)
    assert max(errs) < 2e-2, errs


def test_does_not_fit_is_a_clear_error(device):
    d = inputs("lstm", device, torch.float64, T=2, B=2, H=2048)
    with pytest.raises(RuntimeError, match="does not fit in shared memory"):
        forward("lstm", d, False, persistent=True)


def test_bad_mode_is_rejected(device):
    d = inputs("gru", device, torch.float64)
    with pytest.raises(RuntimeError, match="tensor cores do not take float64"):
        forward("gru", d, False, persistent=True, mode=TENSOR_CORE)
    with pytest.raises(RuntimeError, match="mode must be"):
        forward("gru", d, False, persistent=True, mode=5)


def test_bad_input_is_rejected_before_running(device):
    d = inputs("lstm", device, torch.float64)
    d["h0"] = d["h0"][:, :3]
    with pytest.raises(RuntimeError, match="h0 must have shape"):
        forward("lstm", d, False, persistent=True)


@pytest.mark.parametrize("kind,dtype,mode,H,B", [
    pytest.param("lstm", torch.float32, SIMT, 1024, 64, id="lstm-fp32-simt"),
    pytest.param("gru", torch.bfloat16, TENSOR_CORE, 1024, 64, id="gru-bf16-tensor-core"),
    pytest.param("lstm", torch.float16, TENSOR_CORE, 768, 16, id="lstm-fp16-tensor-core-h768"),
])
def test_full_size_layout(kind, dtype, mode, H, B):
    """Full-size layers with as many blocks as an H100 has SMs (the
    emulator's device). B=64, H=1024: 128 blocks, several K chunks where
    shared memory runs short (fp32: 4 forward, 16 backward), full-size
    tiles. float16 LSTM at H=768, B=16 (a row of the benchmark's
    cudnn-persistent set): 96 blocks of 8 units forward, 48 of 16 backward
    in 201 KB. On the CPU only: the point is the layout an H100 gets, which
    the CUDA tests reach through the dispatcher."""
    d64 = inputs(kind, "cpu", torch.float64, T=2, B=B, H=H)
    grads = random_grads(kind, forward(kind, d64, False, persistent=False))
    ours = errors_vs_float64(kind, d64, grads, dtype, False, persistent=True, mode=mode,
                             max_blocks=0)
    theirs = errors_vs_float64(kind, d64, grads, dtype, False, persistent=False)
    for o, t in zip(ours, theirs):
        assert o <= 4 * t + 1e-6, (ours, theirs)


# The largest layouts that fit an H100/H200 (132 SMs, 227 KB of shared memory
# per block): (kind, dtype, mode, H, B) whose forward and backward layouts both
# take over 200 KB, found with the planner (persistent_layout). They sit where
# an off-by-one in the shared-memory offsets would run past the end.
LARGEST = [
    pytest.param("lstm", torch.float32, SIMT, 1024, 64, id="lstm-fp32-simt"),
    pytest.param("lstm", torch.bfloat16, TENSOR_CORE, 1024, 64, id="lstm-bf16-tensor-core"),
    pytest.param("gru", torch.float32, SIMT, 768, 64, id="gru-fp32-simt"),
    pytest.param("gru", torch.float32, TENSOR_CORE, 1024, 64, id="gru-tf32-tensor-core"),
    pytest.param("gru", torch.bfloat16, SIMT, 1024, 64, id="gru-bf16-simt"),
]


@pytest.mark.parametrize("kind,dtype,mode,H,B", LARGEST)
def test_largest_layouts_are_largest(kind, dtype, mode, H, B):
    """The planner still gives these sizes over 200 KB on an H100, so that the
    CUDA test below keeps testing the fullest shared memory."""
    G = 4 if kind == "lstm" else 3
    elt = torch.tensor([], dtype=dtype).element_size()
    for backward in [False, True]:
        L = persistent_layout(H, B, G, backward, mode, elt, 4, H100_SMS, H100_SMEM)
        assert 200_000 <= L["bytes"] <= H100_SMEM, (backward, L)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
@pytest.mark.parametrize("kind,dtype,mode,H,B", LARGEST)
def test_largest_layouts_cuda(kind, dtype, mode, H, B):
    """On the GPU itself, with as many blocks as it has SMs: every result
    within 4x the step-wise op's error against float64 (floors as in
    test_low_precision_within_stepwise_error)."""
    d64 = inputs(kind, "cuda", torch.float64, T=3, B=B, H=H)
    grads = random_grads(kind, forward(kind, d64, False, persistent=False))
    ours = errors_vs_float64(kind, d64, grads, dtype, False, persistent=True, mode=mode,
                             max_blocks=0)
    theirs = errors_vs_float64(kind, d64, grads, dtype, False, persistent=False)
    floor = 4 * 2.0 ** -11 if (dtype == torch.float32 and mode == TENSOR_CORE) else 1e-6
    for o, t in zip(ours, theirs):
        assert o <= 4 * t + floor, (ours, theirs)


def test_tf32_lstm_backward_at_h1024_does_not_fit():
    """The tf32 LSTM backward slice at H=1024 (16 units x 4096 x 4 bytes) is
    over an H100's 227 KB: the forward runs, the backward says why not."""
    d = inputs("lstm", "cpu", torch.float32, T=2, B=4, H=1024)
    fwd = forward("lstm", d, False, persistent=True, mode=TENSOR_CORE)
    with pytest.raises(RuntimeError, match="does not fit in shared memory"):
        backward("lstm", d, fwd, random_grads("lstm", fwd), False, persistent=True,
                 mode=TENSOR_CORE)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["strided", "offset"])
def test_strided_and_misaligned_h0(device, kind, layout):
    """h0 as a strided view, or contiguous but starting one element into its
    storage (so the 16-byte staging path must not be taken for it)."""
    d = inputs(kind, device, torch.float32, T=4, B=5, H=8)
    B, H = d["h0"].shape
    if layout == "strided":
        d["h0"] = torch.randn(B, H + 3, device=device)[:, 1:H + 1]
    else:
        d["h0"] = torch.randn(B * H + 1, device=device)[1:].view(B, H)
    want = forward(kind, d, False, persistent=False)
    got = forward(kind, d, False, persistent=True, max_blocks=2)
    for g, w in zip(nonempty(got), nonempty(want)):
        assert rel_err(g, w) < 1e-5


# The pointwise phase's inputs staged at every copy width (Note [inputs staged
# with the chunk] in csrc/persistent/phases.h): (dtype, H, max_blocks, offset)
# with `units` = H / max_blocks per block, and x_proj (forward) and
# grad_output (backward) starting `offset` elements into their storage. The
# widths of each piece follow from units x element size and alignment.
STAGING = [
    pytest.param(torch.float64, 8, 4, 0, id="16-byte"),
    pytest.param(torch.float32, 8, 4, 0, id="8-byte"),
    pytest.param(torch.float32, 7, 7, 0, id="4-byte"),
    pytest.param(torch.float32, 8, 2, 1, id="offset-4-byte"),
    pytest.param(torch.bfloat16, 8, 4, 0, id="bf16-4-byte"),
    pytest.param(torch.bfloat16, 7, 7, 0, id="bf16-by-element"),
    pytest.param(torch.bfloat16, 8, 2, 1, id="bf16-offset-by-element"),
]


def offset_copy(t, offset):
    """t's values in a tensor starting `offset` elements into its storage."""
    if not offset:
        return t
    return torch.cat([t.new_zeros(offset), t.flatten()])[offset:].view(t.shape)


def check_matches_stepwise(kind, d, max_blocks, offset=0, forward_too=True):
    """The persistent forward (unless not forward_too) and backward (fed the
    step-wise forward's results) against the step-wise ops in float64: the
    error of every result (forward: output, h_n, c_n; the saved tensors enter
    the backward's) at most 4x the step-wise op's own at this dtype, plus a
    floor (1e-6; float64: 1e-10)."""
    d = dict(d, x_proj=offset_copy(d["x_proj"], offset))
    d64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
           for k, v in d.items()}
    floor = 1e-10 if d["x_proj"].dtype == torch.float64 else 1e-6

    def check(got, want, ref):
        for g, w, r in zip(nonempty(got), nonempty(want), nonempty(ref)):
            assert rel_err(g.double(), r) <= 4 * rel_err(w.double(), r) + floor

    ref = forward(kind, d64, False, persistent=False)
    want = forward(kind, d, False, persistent=False)
    n_out = 3 if kind == "lstm" else 2
    if forward_too:
        got = forward(kind, d, False, persistent=True, max_blocks=max_blocks)
        check(got[:n_out], want[:n_out], ref[:n_out])
    grads = random_grads(kind, want)
    grads[0] = offset_copy(grads[0], offset)
    ref_b = backward(kind, d64, ref, [g.double() for g in grads], False, persistent=False)
    want_b = backward(kind, d, want, grads, False, persistent=False)
    got_b = backward(kind, d, want, grads, False, persistent=True, max_blocks=max_blocks)
    check(got_b, want_b, ref_b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,H,max_blocks,offset", STAGING)
def test_inputs_staged_at_every_copy_width(device, kind, dtype, H, max_blocks, offset):
    check_matches_stepwise(kind, inputs(kind, device, dtype, T=4, B=5, H=H), max_blocks, offset)


@pytest.mark.parametrize("kind,H,unstaged", [("lstm", 96, [False]), ("lstm", 112, [True]),
                                             ("gru", 128, [False, True])])
def test_inputs_read_from_global_where_no_room(device, kind, H, unstaged):
    """One block holding all of W_hh leaves no room for the pointwise phase's
    inputs in these directions (backward: True), which then read them from
    global memory. LSTM at H=112: the forward does not fit at all."""
    G = 4 if kind == "lstm" else 3
    for bwd in unstaged:
        L = persistent_layout(H, 4, G, bwd, SIMT, 4, 4, 1, H100_SMEM)
        assert L["bytes"] <= H100_SMEM and L["in_bytes"] == 0, L
    check_matches_stepwise(kind, inputs(kind, device, torch.float32, T=3, B=4, H=H), 1,
                           forward_too=H != 112)


@pytest.mark.parametrize("mode,elt,acc_elt", [(SIMT, 4, 4), (SIMT, 8, 8), (SIMT, 2, 4),
                                              (TENSOR_CORE, 4, 4), (TENSOR_CORE, 2, 4)],
                         ids=["fp32", "fp64", "half-simt", "tf32", "half-tc"])
def test_layout_invariants(mode, elt, acc_elt):
    """What the kernel assumes of its layout (csrc/persistent/layout.h), over batch
    1..128 and hidden sizes with and without padding, both directions, with
    the chunk forced narrow or not: the regions do not overlap and are
    128-byte aligned; chunks tile K exactly; two buffers only with a
    power-of-two chunk; rows of the staged chunk take 16-byte copies; wmma
    strides are odd multiples of 16 bytes; tiles fit their padding; every hidden unit has exactly one block."""
    tile = 16 if mode == TENSOR_CORE else 4
    for H in (5, 64, 70, 256, 1000, 1024):
        for B in (1, 7, 64, 128):
            for G in (3, 4):
                for backward in (False, True):
                    for max_chunk in (0, 64):
                        L = persistent_layout(H, B, G, backward, mode, elt, acc_elt, H100_SMS,
                                              H100_SMEM, max_chunk)
                        assert L["blocks"] <= H100_SMS
                        assert (L["blocks"] - 1) * L["units"] < H <= L["blocks"] * L["units"]
                        assert L["k"] == (G * H if backward else H)
                        assert L["chunks"] * L["kc"] == L["k_pad"] >= L["k"]
                        assert L["kc"] % 64 == 0 and L["buffers"] in (1, 2)
                        if L["buffers"] == 2:
                            assert L["chunks"] > 1 and L["kc"] & (L["kc"] - 1) == 0
                        assert L["n_pad"] % tile == 0 and L["b_pad"] % tile == 0
                        assert L["b_pad"] >= B and L["n_pad"] >= L["n"]
                        assert L["lda"] * elt % 16 == 0 and L["ldw"] * elt % 16 == 0
                        if mode == TENSOR_CORE:
                            # wmma strides: 16-byte multiples, and not 32-byte
                            # ones (rows of a tile would share banks every 4).
                            for ld, e in (("lda", elt), ("ldw", elt), ("ldacc", acc_elt)):
                                assert L[ld] * e % 32 == 16, (ld, L[ld])
                        offs = [L["w_off"], L["a_off"], L["acc_off"], L["part_off"]]
                        assert all(o % 128 == 0 for o in offs)
                        assert L["a_off"] >= L["n_pad"] * L["ldw"] * elt
                        assert L["a_bytes"] >= L["b_pad"] * L["lda"] * elt
                        assert L["acc_off"] >= L["a_off"] + L["buffers"] * L["a_bytes"]
                        assert L["part_off"] >= L["acc_off"] + L["b_pad"] * L["ldacc"] * acc_elt
                        assert L["bytes"] > L["part_off"]
                        # The pointwise phase's inputs, last, where room was left:
                        # forward x_proj [G][b_pad], the state [b_pad], b_hh [G];
                        # backward the saved gates [4][b_pad], the state entering
                        # the step [b_pad], grad_h [b_pad], LSTM c_t [b_pad]; each
                        # segment of `units` elements, each piece 128-byte aligned.
                        lstm = G == 4
                        state_elt = acc_elt if lstm else elt
                        if backward:
                            pieces = [(4 * L["b_pad"], elt), (L["b_pad"], state_elt),
                                      (L["b_pad"], elt), (L["b_pad"] if lstm else 0, acc_elt)]
                        else:
                            pieces = [(G * L["b_pad"], elt), (L["b_pad"], state_elt), (G, elt)]
                        in_bytes = sum(-(-n * L["units"] * e // 128) * 128 for n, e in pieces)
                        if L["in_bytes"]:
                            assert L["in_bytes"] == in_bytes
                            assert L["in_off"] % 128 == 0 and L["in_off"] > L["part_off"]
                            assert L["bytes"] == L["in_off"] + in_bytes <= H100_SMEM
                        else:
                            assert L["bytes"] + in_bytes > H100_SMEM
                        if max_chunk == 0 and L["bytes"] <= H100_SMEM and L["chunks"] > 1:
                            # A single chunk was tried first: it must not have fit.
                            whole = persistent_layout(H, B, G, backward, mode, elt, acc_elt,
                                                      H100_SMS, 10 ** 9)
                            assert whole["chunks"] == 1 and whole["bytes"] > H100_SMEM
