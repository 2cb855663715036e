"""The regularised ops (layer norm, zoneout, recurrent dropout) against the
reference: values and every gradient, gradcheck, double backward, low
precision, opcheck and errors. CUDA variants skip where no GPU is visible."""
import pytest
import torch

from fusedrnn import _ops
from fusedrnn import reference as ref
from fusedrnn._ops import ops
from fusedrnn.regularisers import LayerReg

from helpers import B, H, P, T, grad_tensors, layer_inputs, rel_err
from isa_helpers import force_cpu_isa, isa_params

NO_GPU = not torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(NO_GPU, reason="no GPU visible"))]
LAYOUTS = [pytest.param(False, id="padded"), pytest.param(True, id="packed")]
DIRECTIONS = [pytest.param(False, id="fwd"), pytest.param(True, id="rev")]
# "train": fresh 0/1 masks (rec_mask scaled by 1/(1-p)); "eval": constants.
MASKS = ["train", "eval"]
P_DROP = 0.3
LSTM_FIELDS = ("rec_mask", "zone_h", "zone_c", "ln_hh", "ln_c", "ln_ih")
GRU_FIELDS = ("rec_mask", "zone_h", "ln_hh", "ln_ih")
GAINS = ("ln_hh", "ln_c_w", "ln_c_b", "ln_ih", "b_ih")


def make_reg(kind, d, fields, masks):
    """A LayerReg with `fields` for the layer inputs d (helpers.layer_inputs)."""
    x, w_hh = d["x_proj"], d["w_hh"]
    G = 4 if kind == "lstm" else 3
    Hd, Pd = w_hh.shape[0] // G, w_hh.shape[1]
    opts = dict(device=x.device, dtype=x.dtype)
    lead = x.shape[:-1]

    def dropout(shape):  # eval: none
        if masks == "eval":
            return torch.ones(shape, **opts)
        return torch.bernoulli(torch.full(shape, 1 - P_DROP, **opts)) / (1 - P_DROP)

    def zoneout(shape):  # eval: the expectation
        if masks == "eval":
            return torch.full(shape, P_DROP, **opts)
        return torch.bernoulli(torch.full(shape, P_DROP, **opts))

    f = {}
    if "rec_mask" in fields:
        f["rec_mask"] = dropout((d["h0"].shape[0], Pd))
    if "zone_h" in fields:
        f["zone_h"] = zoneout((*lead, Pd))
    if "zone_c" in fields:
        f["zone_c"] = zoneout((*lead, Hd))
    if "ln_hh" in fields:
        f["ln_hh"] = 1 + 0.3 * torch.randn(G * Hd, **opts)
    if "ln_c" in fields:
        f["ln_c_w"] = 1 + 0.3 * torch.randn(Hd, **opts)
        f["ln_c_b"] = 0.3 * torch.randn(Hd, **opts)
    if "ln_ih" in fields:  # x_proj is then x W_ih^T alone: b_ih comes with the norm
        f["ln_ih"] = 1 + 0.3 * torch.randn(G * Hd, **opts)
        if d["b_hh"] is not None:
            f["b_ih"] = 0.3 * torch.randn(G * Hd, **opts)
    return LayerReg(**f)


def with_grad_gains(reg):
    return reg._replace(**{k: getattr(reg, k).requires_grad_(True)
                           for k in GAINS if getattr(reg, k) is not None})


def gru_reg_args(reg):
    """The GRU op's LayerReg arguments (it has no cell-state fields)."""
    return reg.rec_mask, reg.zone_h, reg.ln_hh, reg.ln_ih, reg.b_ih


def run(fn, kind, d, reg, reverse, reset_after=True):
    if kind == "lstm":
        return fn.lstm_layer(d["x_proj"], d["h0"], d["c0"], d["w_hh"], d["w_hr"], d["b_hh"],
                             d["batch_sizes"], reverse, reg=reg)
    return fn.gru_layer(d["x_proj"], d["h0"], d["w_hh"], d["b_hh"], d["batch_sizes"], reverse,
                        reset_after, reg=reg)


def leaves(d, reg):
    out = dict(grad_tensors(d))
    out.update({k: v for k, v in reg._asdict().items() if v is not None and v.requires_grad})
    return out


def values_and_grads(outs, wanted, weights):
    loss = sum((o.double() * c).sum() for o, c in zip(outs, weights))
    return list(outs) + list(torch.autograd.grad(loss, list(wanted.values())))


def variants():
    """(kind, fields, proj, bias, reset_after): each field alone and all
    together; projection and the classic GRU with zoneout and rec_mask."""
    for kind, fields in (("lstm", LSTM_FIELDS), ("gru", GRU_FIELDS)):
        for f in fields:
            yield pytest.param(kind, (f,), False, True, True, id=f"{kind}-{f}")
        for bias in (True, False):
            yield pytest.param(kind, fields, False, bias, True,
                               id=f"{kind}-all-{'bias' if bias else 'nobias'}")
    yield pytest.param("lstm", ("rec_mask", "zone_h", "zone_c"), True, True, True,
                       id="lstm-proj-zoneout-mask")
    yield pytest.param("lstm", LSTM_FIELDS, True, True, True, id="lstm-proj-all")
    yield pytest.param("gru", ("rec_mask", "zone_h"), False, True, False,
                       id="gru-classic-zoneout-mask")
    yield pytest.param("gru", ("rec_mask", "zone_h"), False, False, False,
                       id="gru-classic-zoneout-mask-nobias")


def inputs(kind, packed, device, dtype, fields, proj, bias, masks, **kw):
    d = layer_inputs(kind, packed, device, dtype, proj=proj, bias=bias, requires_grad=True, **kw)
    return d, with_grad_gains(make_reg(kind, d, fields, masks))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,fields,proj,bias,reset_after", list(variants()))
@pytest.mark.parametrize("packed", LAYOUTS)
@pytest.mark.parametrize("reverse", DIRECTIONS)
@pytest.mark.parametrize("masks", MASKS)
def test_float64_matches_reference(device, kind, fields, proj, bias, reset_after, packed,
                                   reverse, masks):
    d, reg = inputs(kind, packed, device, torch.float64, fields, proj, bias, masks)
    got = run(_ops, kind, d, reg, reverse, reset_after)
    want = run(ref, kind, d, reg, reverse, reset_after)
    weights = [torch.randn_like(w) for w in want]
    wanted = leaves(d, reg)
    names = [f"out{i}" for i in range(len(want))] + list(wanted)
    for name, g, w in zip(names, values_and_grads(got, wanted, weights),
                          values_and_grads(want, wanted, weights)):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert rel_err(g, w) < 1e-10, name


@pytest.mark.parametrize("kind,fields,proj,bias,reset_after",
                         [v for v in variants() if any(f.startswith("ln") for f in v.values[1])])
@pytest.mark.parametrize("packed", LAYOUTS)
def test_gain_grads_after_the_loop_match_reference(monkeypatch, kind, fields, proj, bias,
                                                   reset_after, packed):
    """The branch the CUDA policy always takes, forced on the CPU
    (FUSEDRNN_REG_SUMS_AFTER_LOOP=1): the norms' gain and bias gradients from
    a pass over the gradient rows of all steps after the loop instead of
    sums in it. Float64 values and every gradient equal the reference."""
    monkeypatch.setenv("FUSEDRNN_REG_SUMS_AFTER_LOOP", "1")
    test_float64_matches_reference("cpu", kind, fields, proj, bias, reset_after, packed, False,
                                   "train")


def small_case(kind, fields, proj, reset_after, device="cpu", packed=True, only=None, **sizes):
    """The op as a function of its differentiable inputs (or those in `only`)."""
    sizes = dict(dict(H=3, P=2), **sizes)
    d, reg = inputs(kind, packed, device, torch.float64, fields, proj, True, "train", **sizes)
    names = [n for n in leaves(d, reg) if only is None or n in only]

    def f(*tensors):
        new = dict(zip(names, tensors))
        dd = dict(d, **{k: v for k, v in new.items() if k in d})
        rr = reg._replace(**{k: v for k, v in new.items() if k in reg._fields})
        return run(_ops, kind, dd, rr, True, reset_after)
    return f, [leaves(d, reg)[n] for n in names]


GRADCHECK_CASES = [("lstm", LSTM_FIELDS, False, True), ("lstm", LSTM_FIELDS, True, True),
                   ("gru", GRU_FIELDS, False, True), ("gru", ("rec_mask", "zone_h"), False, False)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,fields,proj,reset_after", GRADCHECK_CASES)
def test_gradcheck(device, kind, fields, proj, reset_after):
    f, args = small_case(kind, fields, proj, reset_after, device)
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("kind,fields,proj,reset_after", GRADCHECK_CASES)
def test_gradgradcheck_through_reference(kind, fields, proj, reset_after):
    """Note [Double backward]: the second derivative comes from the reference
    (slow: small sizes, and a few inputs, the gains among them)."""
    f, args = small_case(kind, fields, proj, reset_after, packed=False, T=2, B=2, H=2,
                         only=("x_proj", "h0", "w_hh", "w_hr") + GAINS)
    assert torch.autograd.gradgradcheck(f, args, fast_mode=True)


def test_backward_ops_refuse_their_own_backward():
    d, reg = inputs("lstm", False, "cpu", torch.float64, LSTM_FIELDS, False, True, "train")
    out = run(_ops, "lstm", d, reg, False)
    g = torch.autograd.grad(out[0].sum(), [d["w_hh"]], create_graph=True)[0]
    assert g.requires_grad  # from the reference's differentiable graph
    outs = ops.lstm_reg_forward(d["x_proj"], d["h0"], d["c0"], d["w_hh"], None, d["b_hh"], None,
                                False, True, *reg)
    go = torch.randn_like(outs[0], requires_grad=True)
    back = ops.lstm_reg_backward(go, torch.zeros_like(outs[1]), torch.zeros_like(outs[2]),
                                 d["x_proj"].detach(), outs[0].detach(),
                                 *(t.detach() for t in outs[3:]), d["h0"], d["c0"],
                                 d["w_hh"], None, None, False, True, *reg)
    with pytest.raises(RuntimeError, match="not differentiable"):
        back[0].sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,fields,proj,reset_after",
                         [("lstm", LSTM_FIELDS, False, True), ("gru", GRU_FIELDS, False, True),
                          ("lstm", ("rec_mask", "zone_h", "zone_c"), True, True),
                          ("gru", ("rec_mask", "zone_h"), False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_error_within_reference_error(device, kind, fields, proj, reset_after,
                                                    dtype):
    """Error against the float64 reference at most 4x the reference's own at
    that dtype (its torch ops in that dtype), plus a floor of 1e-6. The float64
    run takes the same (rounded) inputs, so the errors are the computations'."""
    d, reg = inputs(kind, False, device, dtype, fields, proj, True, "train",
                    T=12, B=6, H=24, P=16)
    wide = lambda t: t.detach().double().requires_grad_(t.requires_grad)  # noqa: E731
    d64 = {k: wide(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
           for k, v in d.items()}
    reg64 = LayerReg(*(None if t is None else wide(t) for t in reg))
    want = run(ref, kind, d64, reg64, False, reset_after)
    weights = [torch.randn_like(w) for w in want]
    expected = values_and_grads(want, leaves(d64, reg64), weights)
    theirs = values_and_grads(run(ref, kind, d, reg, False, reset_after), leaves(d, reg), weights)
    ours = values_and_grads(run(_ops, kind, d, reg, False, reset_after), leaves(d, reg), weights)
    for o, t, w in zip(ours, theirs, expected):
        assert o.dtype == dtype
        assert rel_err(o, w) <= 4 * rel_err(t, w) + 1e-6, (rel_err(o, w), rel_err(t, w))
        if dtype == torch.float32:
            assert rel_err(o, w) < 1e-5


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_empty_layer_reg_is_the_plain_op(kind):
    d = layer_inputs(kind, True, "cpu", torch.float32, requires_grad=True)
    plain = run(_ops, kind, d, None, True)
    empty = run(_ops, kind, d, LayerReg(), True)
    for a, b in zip(plain, empty):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("packed", LAYOUTS)
def test_reg_op_without_fields_is_bitwise_the_generic_op_forward(kind, packed, monkeypatch):
    """The reg op with no field set computes what the plain op's generic loop
    does, in the same order (float64, where both use ATen's GEMM)."""
    force_cpu_isa(monkeypatch, "generic")  # padded float64 would take the fused path
    d = layer_inputs(kind, packed, "cpu", torch.float64)
    if kind == "lstm":
        plain = ops.lstm_forward(d["x_proj"], d["h0"], d["c0"], d["w_hh"], None, d["b_hh"],
                                 d["batch_sizes"], True, False)[:3]
        reg = ops.lstm_reg_forward(d["x_proj"], d["h0"], d["c0"], d["w_hh"], None, d["b_hh"],
                                   d["batch_sizes"], True, False, *LayerReg())[:3]
    else:
        plain = ops.gru_forward(d["x_proj"], d["h0"], d["w_hh"], d["b_hh"], d["batch_sizes"],
                                True, True, False)[:2]
        reg = ops.gru_reg_forward(d["x_proj"], d["h0"], d["w_hh"], d["b_hh"], d["batch_sizes"],
                                  True, True, False, *gru_reg_args(LayerReg()))[:2]
    for a, b in zip(plain, reg):
        assert torch.equal(a, b)


def forward_calls(device, train):
    for packed in (False, True):
        d, reg = inputs("lstm", packed, device, torch.float32, LSTM_FIELDS, packed, True, "train")
        yield ops.lstm_reg_forward, (d["x_proj"], d["h0"], d["c0"], d["w_hh"], d["w_hr"],
                                     d["b_hh"], d["batch_sizes"], packed, train, *reg)
        d, reg = inputs("gru", packed, device, torch.float32, GRU_FIELDS, False, True, "train")
        yield ops.gru_reg_forward, (d["x_proj"], d["h0"], d["w_hh"], d["b_hh"], d["batch_sizes"],
                                    packed, True, train, *gru_reg_args(reg))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in forward_calls(device, train=True):
        torch.library.opcheck(op, args)
        outs = op(*args)
        detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
        if op is ops.lstm_reg_forward:
            x, h0, c0, w_hh, w_hr, b_hh, bs, rev, _, *reg = detached
            grads = [torch.randn_like(t) for t in outs[:3]]
            bargs = (*grads, x, *(t.detach() for t in outs[:1] + outs[3:]), h0, c0, w_hh, w_hr, bs,
                     rev, True, *reg)
            torch.library.opcheck(ops.lstm_reg_backward, bargs)
        else:
            x, h0, w_hh, b_hh, bs, rev, ra, _, *reg = detached
            grads = [torch.randn_like(t) for t in outs[:2]]
            bargs = (*grads, x, *(t.detach() for t in outs[:1] + outs[2:]), h0, w_hh, bs, rev, ra,
                     True, *reg)
            torch.library.opcheck(ops.gru_reg_backward, bargs)
    for op, args in forward_calls(device, train=False):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_matches_eager():
    d, reg = inputs("lstm", True, "cpu", torch.float32, LSTM_FIELDS, False, True, "train")
    wanted = leaves(d, reg)

    def f(d, reg):
        outs = run(_ops, "lstm", d, reg, True)
        return sum(o.square().sum() for o in outs)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ge = torch.autograd.grad(f(d, reg), list(wanted.values()))
    gc = torch.autograd.grad(compiled(d, reg), list(wanted.values()))
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_vmap_runs_each_copy():
    d, reg = inputs("gru", False, "cpu", torch.float64, GRU_FIELDS, False, True, "train")
    xs = torch.randn(2, *d["x_proj"].shape, dtype=torch.float64)
    f = lambda x: run(_ops, "gru", dict(d, x_proj=x), reg, False)[0]  # noqa: E731
    got = torch.vmap(f)(xs)
    for v in range(2):
        assert rel_err(got[v], f(xs[v])) < 1e-12


# ------------------------------------------------------------------ errors
def lstm_call(over=None, reg_over=None, device="cpu"):
    d, reg = inputs("lstm", False, device, torch.float32, LSTM_FIELDS, False, True, "train")
    d.update(over or {})
    reg = reg._replace(**(reg_over or {}))
    return lambda: ops.lstm_reg_forward(d["x_proj"], d["h0"], d["c0"], d["w_hh"], d["w_hr"],
                                        d["b_hh"], d["batch_sizes"], False, True, *reg)


BAD_LSTM = [
    (dict(rec_mask=torch.ones(B + 1, H)), "rec_mask must have shape"),
    (dict(zone_h=torch.ones(T, B, H + 1)), "zone_h must have shape"),
    (dict(zone_c=torch.ones(T * B, H)), "zone_c must have shape"),
    (dict(ln_hh=torch.ones(3 * H)), "ln_hh must have shape"),
    (dict(ln_c_w=torch.ones(H + 1)), "ln_c_w must have shape"),
    (dict(ln_c_b=None), "ln_c_w and ln_c_b go together"),
    (dict(ln_ih=torch.ones(4 * H + 1)), "ln_ih must have shape"),
    (dict(ln_ih=None), "b_ih goes with ln_ih"),
    (dict(zone_h=torch.ones(T, B, H, dtype=torch.float64)), "zone_h has dtype"),
    (dict(ln_hh=torch.ones(4 * H, dtype=torch.float16)), "ln_hh has dtype"),
]


@pytest.mark.parametrize("reg_over,msg", BAD_LSTM)
def test_bad_reg_input_is_rejected(reg_over, msg):
    with pytest.raises(RuntimeError, match=msg):
        lstm_call(reg_over=reg_over)()


def test_bad_layer_input_names_the_reg_op():
    with pytest.raises(RuntimeError, match=r"fusedrnn::lstm_reg_forward: h0 must have shape"):
        lstm_call(over=dict(h0=torch.randn(B + 1, H)))()


def test_gru_layer_norm_needs_reset_after():
    d, reg = inputs("gru", False, "cpu", torch.float32, GRU_FIELDS, False, True, "train")
    with pytest.raises(ValueError, match="reset_after=True"):
        run(_ops, "gru", d, reg, False, reset_after=False)
    with pytest.raises(RuntimeError, match="needs the GRU form with reset_after=True"):
        ops.gru_reg_forward(d["x_proj"], d["h0"], d["w_hh"], d["b_hh"], None, False, False,
                            True, *gru_reg_args(reg))


def test_gru_has_no_cell_state():
    d, _ = inputs("gru", False, "cpu", torch.float32, GRU_FIELDS, False, True, "train")
    with pytest.raises(ValueError, match="no cell state"):
        run(_ops, "gru", d, LayerReg(zone_c=torch.ones(T, B, H)), False)


def test_masks_requiring_grad_are_refused():
    d, reg = inputs("lstm", False, "cpu", torch.float32, ("zone_h",), False, True, "train")
    reg = reg._replace(zone_h=reg.zone_h.requires_grad_(True))
    with pytest.raises(RuntimeError, match="not differentiable"):
        run(_ops, "lstm", d, reg, False)


def test_backward_without_train_is_refused():
    d, reg = inputs("lstm", False, "cpu", torch.float32, LSTM_FIELDS, False, True, "train")
    out = ops.lstm_reg_forward(d["x_proj"], d["h0"], d["c0"], d["w_hh"], None, d["b_hh"], None,
                               False, False, *reg)
    assert out[3].numel() == 0  # nothing saved
    with pytest.raises(RuntimeError, match="train=False"):
        out[0].sum().backward()


@pytest.mark.skipif(NO_GPU, reason="no GPU visible")
def test_device_mismatch_is_rejected():
    with pytest.raises(RuntimeError, match="rec_mask is on cpu"):
        lstm_call(reg_over=dict(rec_mask=torch.ones(B, H)), device="cuda")()


@pytest.mark.parametrize("isa", isa_params(("avx512", "avx2")))
@pytest.mark.parametrize("kind,fields", [("lstm", LSTM_FIELDS), ("gru", GRU_FIELDS)])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_cpu_row_copies_agree(isa, kind, fields, packed, monkeypatch):
    """Each CPU path runs the rows in its own copy (Note [Vectorised row
    loops]) and, padded, the step's product and rows in one parallel region;
    float32 values and gradients agree with the generic path's to rounding."""
    d, reg = inputs(kind, packed, "cpu", torch.float32, fields, False, True, "train", H=37)
    wanted = leaves(d, reg)
    weights = None
    results = []
    for path in (isa, "generic"):
        force_cpu_isa(monkeypatch, path)
        outs = run(_ops, kind, d, reg, True)
        weights = weights or [torch.randn_like(o) for o in outs]
        results.append(values_and_grads(outs, wanted, weights))
    for a, g in zip(*results):
        assert rel_err(a, g) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    """Batch-first storage seen time-major (as a module with batch_first
    passes it): the same results as contiguous copies."""
    d, reg = inputs("lstm", False, device, torch.float64, LSTM_FIELDS, False, True, "train")
    strided = dict(d, x_proj=d["x_proj"].detach().transpose(0, 1).contiguous().transpose(0, 1))
    strided_reg = reg._replace(zone_h=reg.zone_h.transpose(0, 1).contiguous().transpose(0, 1))
    assert not strided["x_proj"].is_contiguous() and not strided_reg.zone_h.is_contiguous()
    for a, b in zip(run(_ops, "lstm", strided, strided_reg, False), run(_ops, "lstm", d, reg, False)):
        assert torch.equal(a, b)
