"""The regularisers beyond torch.nn (layer_norm, zoneout, zoneout_cell,
recurrent_dropout, weight_drop) on the modules.

Results are checked against `loop_model` below: the equations written out
again as a plain loop over time steps of torch ops on padded input (inactive
rows of a packed batch frozen), independent of fusedrnn.reference, in float64
to 1e-10, for the outputs and every parameter's gradient. In eval mode it uses
the constant expectations. In training mode it uses the masks the module drew:
the test wraps fusedrnn.regularised.draw (through which every mask is drawn)
and records what it returned, and wraps F.dropout to record the masks of
dropout between layers; the model then takes them in the order that draw's
callers document (per layer and direction: weight_drop's, zone_h, zone_c,
rec_mask), checking each one's probability.
"""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fusedrnn
from fusedrnn import regularised

TOL = 1e-10
EPS = 1e-5  # LayerNorm's epsilon
T, B, I, H, P = 5, 3, 4, 6, 4
LENGTHS = {"packed": [5, 4, 2], "packed_unsorted": [2, 5, 4]}
F64 = torch.float64
RATES = dict(zoneout=0.3, zoneout_cell=0.2, recurrent_dropout=0.4, weight_drop=0.15)


# ------------------------------------------------------------------ the loop model
def norm(v):
    mu = v.mean(-1, keepdim=True)
    return (v - mu) / torch.sqrt(((v - mu) ** 2).mean(-1, keepdim=True) + EPS)


class Masks:
    """What the module drew, in order: ('draw', p, mask) and ('dropout', p, mask)."""

    def __init__(self):
        self.log = []

    def take(self, kind, p):
        got_kind, got_p, mask = self.log.pop(0)
        assert got_kind == kind and math.isclose(got_p, p), (kind, p, got_kind, got_p)
        return mask


@pytest.fixture
def masks(monkeypatch):
    rec = Masks()
    draw = regularised.draw

    def recording_draw(shape, p, like):
        m = draw(shape, p, like)
        rec.log.append(("draw", p, m.clone()))
        return m

    def recording_dropout(x, p=0.5, training=True, inplace=False):
        m = torch.empty_like(x).bernoulli_(1 - p) / (1 - p)
        rec.log.append(("dropout", p, m))
        return x * m

    monkeypatch.setattr(regularised, "draw", recording_draw)
    monkeypatch.setattr(F, "dropout", recording_dropout)
    return rec


def _padded(mask, batch_sizes, sorted_idx, unsorted_idx, T_):
    """A packed mask [N, n] as [T, B, n] in the caller's batch order."""
    ps = PackedSequence(mask, batch_sizes, sorted_idx, unsorted_idx)
    return pad_packed_sequence(ps, total_length=T_)[0]


def direction(m, k, sfx, x, lengths, h, c, training, rec, pack):
    """One layer k and direction of module m on padded x [T, B, In]."""
    lstm = m.mode == "LSTM" if hasattr(m, "mode") else isinstance(m, nn.LSTMCell)
    reverse = sfx == "_reverse"
    get = lambda n: getattr(m, n + sfx, None)  # noqa: E731
    w_ih, w_hh = get(f"weight_ih_l{k}"), get(f"weight_hh_l{k}")
    b_ih, b_hh = get(f"bias_ih_l{k}"), get(f"bias_hh_l{k}")
    w_hr = get(f"weight_hr_l{k}")
    G = 4 if lstm else 3
    H = w_hh.shape[0] // G  # the module's, not this file's
    zh_p, zc_p = m.zoneout, getattr(m, "zoneout_cell", 0.0)
    rd, wd = getattr(m, "recurrent_dropout", 0.0), getattr(m, "weight_drop", 0.0)
    Tn, Bn = x.shape[:2]
    Pn = h.shape[-1]
    zh = zc = rm = None
    if training:
        if wd > 0:
            w_hh = w_hh * rec.take("draw", 1 - wd) / (1 - wd)
        if zh_p > 0:
            zh = pack(rec.take("draw", zh_p))
        if zc_p > 0 and lstm:
            zc = pack(rec.take("draw", zc_p))
        if rd > 0:
            rm = rec.take("draw", 1 - rd) / (1 - rd)
            if pack.unsorted is not None:
                rm = rm[pack.unsorted]
    else:
        zh = torch.full((Tn, Bn, Pn), zh_p, dtype=F64) if zh_p > 0 else None
        zc = torch.full((Tn, Bn, H), zc_p, dtype=F64) if zc_p > 0 and lstm else None
    xw = x @ w_ih.T
    ax = norm(xw) * get(f"layernorm_ih_weight_l{k}") if m.layer_norm else xw
    if b_ih is not None:
        ax = ax + b_ih
    out = x.new_zeros(Tn, Bn, Pn)
    steps = range(Tn - 1, -1, -1) if reverse else range(Tn)
    for t in steps:
        hm = h if rm is None else h * rm
        if lstm:
            ah = hm @ w_hh.T
            if m.layer_norm:
                ah = norm(ah) * get(f"layernorm_hh_weight_l{k}")
            a = ax[t] + ah + (b_hh if b_hh is not None else 0)
            i, f, g, o = (a[:, j * H:(j + 1) * H] for j in range(G))
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            cn = c_new
            if m.layer_norm:
                cn = norm(c_new) * get(f"layernorm_c_weight_l{k}") + get(f"layernorm_c_bias_l{k}")
            h_new = torch.sigmoid(o) * torch.tanh(cn)
            if w_hr is not None:
                h_new = h_new @ w_hr.T
            if zc is not None:
                c_new = zc[t] * c + (1 - zc[t]) * c_new
        else:
            bh = b_hh if b_hh is not None else torch.zeros(G * H, dtype=F64)
            if getattr(m, "reset_after", True):
                ah = hm @ w_hh.T
                if m.layer_norm:
                    ah = norm(ah) * get(f"layernorm_hh_weight_l{k}")
                ah = ah + bh
                r = torch.sigmoid(ax[t, :, :H] + ah[:, :H])
                z = torch.sigmoid(ax[t, :, H:2 * H] + ah[:, H:2 * H])
                n = torch.tanh(ax[t, :, 2 * H:] + r * ah[:, 2 * H:])
            else:
                r = torch.sigmoid(ax[t, :, :H] + hm @ w_hh[:H].T + bh[:H])
                z = torch.sigmoid(ax[t, :, H:2 * H] + hm @ w_hh[H:2 * H].T + bh[H:2 * H])
                n = torch.tanh(ax[t, :, 2 * H:] + (r * hm) @ w_hh[2 * H:].T + bh[2 * H:])
            h_new = (1 - z) * n + z * h
        if zh is not None:
            h_new = zh[t] * h + (1 - zh[t]) * h_new
        live = (torch.tensor(lengths) > t).unsqueeze(1)
        h = torch.where(live, h_new, h)
        if lstm:
            c = torch.where(live, c_new, c)
        out[t] = torch.where(live, h_new, torch.zeros_like(h_new))
    return out, h, c


class Packing:
    """Maps the module's packed masks to padded [T, B, n] (identity for padded input)."""

    def __init__(self, packed_input=None, T_=T):
        self.ps, self.T = packed_input, T_
        self.unsorted = None if packed_input is None else packed_input.unsorted_indices

    def __call__(self, mask):
        if self.ps is None:
            return mask
        return _padded(mask, self.ps.batch_sizes, self.ps.sorted_indices,
                       self.ps.unsorted_indices, self.T)


def loop_model(m, x, lengths, h0, c0, training, rec, pack):
    """fusedrnn.LSTM/GRU m on time-major padded x [T, B, I] with per-row lengths;
    returns (output [T, B, D*P], h_n, c_n or None)."""
    lstm = m.mode == "LSTM"
    sfxs = ["", "_reverse"] if m.bidirectional else [""]
    layer_in, hs, cs = x, [], []
    for k in range(m.num_layers):
        if k > 0 and training and m.dropout > 0:
            layer_in = layer_in * pack(rec.take("dropout", m.dropout))
        outs = []
        for d, sfx in enumerate(sfxs):
            j = k * len(sfxs) + d
            out, h, c = direction(m, k, sfx, layer_in, lengths, h0[j], c0[j] if lstm else None,
                                  training, rec, pack)
            outs.append(out)
            hs.append(h)
            cs.append(c)
        layer_in = torch.cat(outs, -1)
    return layer_in, torch.stack(hs), (torch.stack(cs) if lstm else None)


# ------------------------------------------------------------------ module vs loop model
def _run(m, layout, training, rec, batch_first=False, steps=T, batch=B, lengths=None):
    """(module results, loop model results, leaves) on fresh float64 inputs of
    `steps` steps and `batch` rows (packed: one per length, LENGTHS[layout]
    unless given)."""
    lstm = m.mode == "LSTM"
    dirs = 2 if m.bidirectional else 1
    Hm = m.hidden_size
    Pn = m.proj_size if m.proj_size > 0 else Hm
    if layout.startswith("packed"):
        lengths = lengths or LENGTHS[layout]
        batch = len(lengths)
    x = torch.randn(steps, batch, m.input_size, dtype=F64, requires_grad=True)
    h0 = torch.randn(m.num_layers * dirs, batch, Pn, dtype=F64, requires_grad=True)
    c0 = torch.randn(m.num_layers * dirs, batch, Hm, dtype=F64, requires_grad=True)
    leaves = [x, h0] + ([c0] if lstm else [])
    hx = (h0, c0) if lstm else h0
    m.train(training)
    pack = Packing()
    if layout.startswith("packed"):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=layout == "packed")
        out, hn = m(inp, hx)
        got = [pad_packed_sequence(out, total_length=steps)[0]]
        pack = Packing(inp, steps)
    elif layout == "unbatched":
        out, hn = m(x[:, 0], (h0[:, 0], c0[:, 0]) if lstm else h0[:, 0])
        got = [out.unsqueeze(1)]
        hn = tuple(t.unsqueeze(1) for t in hn) if lstm else hn.unsqueeze(1)
        lengths = [steps]
    else:
        out, hn = m(x.transpose(0, 1) if batch_first else x, hx)
        got = [out.transpose(0, 1) if batch_first else out]
        lengths = [steps] * batch
    got += list(hn) if lstm else [hn]
    if layout == "unbatched":
        x1, h1, c1 = x[:, :1], h0[:, :1], c0[:, :1]
    else:
        x1, h1, c1 = x, h0, c0
    want = loop_model(m, x1, lengths[:x1.shape[1]], h1, c1, training, rec, pack)
    assert not rec.log, "masks drawn but not used by the model"
    return got, [w for w in want if w is not None], leaves


def _assert_matches(m, got, want, leaves):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert (g - w).abs().max() <= TOL * w.abs().max()
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(w.shape, generator=gen, dtype=F64) for w in want]
    named = [("x", leaves[0]), ("h0", leaves[1])] + [("c0", t) for t in leaves[2:]] + \
        list(m.named_parameters())
    tensors = [t for _, t in named]
    gg = torch.autograd.grad(sum((g * c).sum() for g, c in zip(got, weights)), tensors,
                             allow_unused=True)
    gw = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, weights)), tensors,
                             allow_unused=True)
    for (name, _), a, e in zip(named, gg, gw):
        assert a is not None and e is not None, name
        assert (a - e).abs().max() <= TOL * e.abs().max().clamp_min(1e-300), name


ALL_ON = dict(layer_norm=True, **RATES)
# (id, kind, module kwargs, layout); every option in each combination with the others.
MODULE_CASES = [
    ("lstm-all", "LSTM", dict(ALL_ON), "padded"),
    ("lstm-all-2layers-bidir-dropout", "LSTM",
     dict(ALL_ON, num_layers=2, bidirectional=True, dropout=0.3), "padded"),
    ("lstm-all-batch-first", "LSTM", dict(ALL_ON, batch_first=True), "batch_first"),
    ("lstm-all-packed-bidir", "LSTM", dict(ALL_ON, bidirectional=True), "packed"),
    ("lstm-all-packed-unsorted-2layers", "LSTM", dict(ALL_ON, num_layers=2), "packed_unsorted"),
    ("lstm-all-unbatched", "LSTM", dict(ALL_ON), "unbatched"),
    ("lstm-all-no-bias", "LSTM", dict(ALL_ON, bias=False, bidirectional=True), "padded"),
    ("lstm-ln-only", "LSTM", dict(layer_norm=True, num_layers=2), "padded"),
    ("lstm-zoneout-only", "LSTM", dict(zoneout=0.3), "padded"),
    ("lstm-zoneout-cell-only", "LSTM", dict(zoneout_cell=0.2), "padded"),
    ("lstm-recdrop-only", "LSTM", dict(recurrent_dropout=0.4), "padded"),
    ("lstm-weightdrop-only", "LSTM", dict(weight_drop=0.15, bidirectional=True), "padded"),
    ("lstm-proj-zoneout-recdrop", "LSTM",
     dict(RATES, proj_size=P, num_layers=2, bidirectional=True), "padded"),
    ("lstm-proj-packed", "LSTM", dict(RATES, proj_size=P), "packed"),
    ("gru-all", "GRU", dict(layer_norm=True, zoneout=0.3, recurrent_dropout=0.4,
                            weight_drop=0.15), "padded"),
    ("gru-all-2layers-bidir-dropout-packed", "GRU",
     dict(layer_norm=True, zoneout=0.3, recurrent_dropout=0.4, weight_drop=0.15, num_layers=2,
          bidirectional=True, dropout=0.3), "packed"),
    ("gru-ln-no-bias-unbatched", "GRU", dict(layer_norm=True, bias=False), "unbatched"),
    ("gru-classic-zoneout-recdrop-weightdrop", "GRU",
     dict(reset_after=False, zoneout=0.3, recurrent_dropout=0.4, weight_drop=0.15,
          bidirectional=True), "packed_unsorted"),
    ("gru-all-batch-first", "GRU", dict(layer_norm=True, zoneout=0.3, recurrent_dropout=0.4,
                                        batch_first=True), "batch_first"),
]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind,kw,layout", [pytest.param(*c[1:], id=c[0]) for c in MODULE_CASES])
def test_module_matches_loop_model(kind, kw, layout, training, masks):
    m = getattr(fusedrnn, kind)(I, H, dtype=F64, **kw)
    with torch.no_grad():  # LayerNorm gains and biases away from 1 and 0
        for n, p in m.named_parameters():
            if regularised.is_ln_parameter(n):
                p.add_(0.3 * torch.randn_like(p))
    got, want, leaves = _run(m, "padded" if layout == "batch_first" else layout, training,
                             masks, batch_first=layout == "batch_first")
    _assert_matches(m, got, want, leaves)


# Sizes where the CPU's row loops run whole vectors and then a tail (H = 65:
# 4H = 260 floats, 16 AVX-512 vectors and 4; 8-lane float64 ones likewise),
# the products several panels, and a batch beyond one tile of rows.
WIDE = dict(I=33, H=65, steps=7, lengths=[7, 7, 6, 5, 5, 4, 3, 3, 3, 2, 2, 1, 1])


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind,kw,layout", [
    pytest.param("LSTM", dict(ALL_ON, bidirectional=True), "packed_unsorted", id="lstm-all-bidir"),
    pytest.param("LSTM", dict(RATES, proj_size=P, num_layers=2), "packed", id="lstm-proj"),
    pytest.param("GRU", dict(layer_norm=True, zoneout=0.3, recurrent_dropout=0.4,
                             weight_drop=0.15, num_layers=2, dropout=0.3), "packed",
                 id="gru-all-2layers"),
    pytest.param("GRU", dict(reset_after=False, zoneout=0.3, recurrent_dropout=0.4,
                             bias=False), "padded", id="gru-classic"),
])
def test_module_matches_loop_model_at_vector_sizes(kind, kw, layout, training, masks):
    m = getattr(fusedrnn, kind)(WIDE["I"], WIDE["H"], dtype=F64, **kw)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if regularised.is_ln_parameter(n):
                p.add_(0.3 * torch.randn_like(p))
    got, want, leaves = _run(m, layout, training, masks, steps=WIDE["steps"],
                             batch=len(WIDE["lengths"]), lengths=WIDE["lengths"])
    _assert_matches(m, got, want, leaves)


def _random_case(rng):
    """A seeded random layer: sizes, options (each regulariser on or off, with
    layers, directions, bias, projection or the classic GRU where they
    apply), layout and lengths."""
    kind = rng.choice(["LSTM", "GRU"])
    H_ = rng.choice([7, 16, 17, 33, 65])
    kw = {k: v for k, v in [("layer_norm", True), ("zoneout", rng.choice([0.1, 0.5])),
                             ("recurrent_dropout", 0.3), ("weight_drop", 0.2)]
          if rng.random() < 0.5}
    if kind == "LSTM" and rng.random() < 0.5:
        kw["zoneout_cell"] = 0.3
    if rng.random() < 0.4:
        kw.update(num_layers=2, dropout=rng.choice([0.0, 0.3]))
    kw.update(bidirectional=rng.random() < 0.4, bias=rng.random() < 0.7)
    if "layer_norm" not in kw and rng.random() < 0.3:
        if kind == "LSTM":
            kw["proj_size"] = rng.randrange(1, H_)
        else:
            kw["reset_after"] = False
    steps, batch = rng.choice([1, 3, 7]), rng.choice([1, 2, 5, 17])
    layout = rng.choice(["padded", "packed", "packed_unsorted", "unbatched"])
    lengths = sorted([steps] + [rng.randint(1, steps) for _ in range(batch - 1)], reverse=True)
    if layout == "packed_unsorted":
        rng.shuffle(lengths)
    return kind, rng.choice([3, 33, 70]), H_, kw, layout, steps, batch, lengths


@pytest.mark.parametrize("seed", range(24))
def test_random_layers_match_loop_model(seed, masks):
    """Differential fuzzing of the regularised layers against the loop model,
    float64, outputs, states and every gradient, in training and eval mode."""
    import random
    rng = random.Random(seed)
    kind, I_, H_, kw, layout, steps, batch, lengths = _random_case(rng)
    m = getattr(fusedrnn, kind)(I_, H_, dtype=F64, **kw)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if regularised.is_ln_parameter(n):
                p.add_(0.3 * torch.randn_like(p))
    got, want, leaves = _run(m, layout, rng.random() < 0.7, masks, steps=steps, batch=batch,
                             lengths=lengths)
    _assert_matches(m, got, want, leaves)


CELL_CASES = [("LSTMCell", dict(layer_norm=True, zoneout=0.3, zoneout_cell=0.2), True),
              ("LSTMCell", dict(layer_norm=True, zoneout=0.3, bias=False), False),
              ("LSTMCell", dict(zoneout_cell=0.2), True),
              ("GRUCell", dict(layer_norm=True, zoneout=0.3), True),
              ("GRUCell", dict(layer_norm=True, bias=False), False),
              ("GRUCell", dict(reset_after=False, zoneout=0.3), True)]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind,kw,batched", CELL_CASES)
def test_cell_matches_loop_model(kind, kw, batched, training, masks):
    """A cell call is one step of the layer: the loop model with T = 1."""
    m = getattr(fusedrnn, kind)(I, H, dtype=F64, **kw).train(training)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if regularised.is_ln_parameter(n):
                p.add_(0.3 * torch.randn_like(p))
    lstm = kind == "LSTMCell"
    x = torch.randn(B, I, dtype=F64, requires_grad=True)
    h = torch.randn(B, H, dtype=F64, requires_grad=True)
    c = torch.randn(B, H, dtype=F64, requires_grad=True)
    leaves = [x, h] + ([c] if lstm else [])
    sl = (lambda t: t) if batched else (lambda t: t[0])  # noqa: E731
    res = m(sl(x), (sl(h), sl(c)) if lstm else sl(h))
    got = [r if batched else r.unsqueeze(0) for r in (res if lstm else (res,))]

    class AsLayer:  # the cell's parameters under the layer's names
        mode, num_layers, bidirectional, dropout, proj_size = kind[:-4], 1, False, 0.0, 0
    layer = AsLayer()
    for n, p in m.named_parameters():
        setattr(layer, n + "_l0", p)
    for n in ("layer_norm", "zoneout", "zoneout_cell", "reset_after"):
        setattr(layer, n, getattr(m, n, True if n == "reset_after" else 0.0))
    batch = B if batched else 1
    _, hn, cn = loop_model(layer, x[None, :batch], [1] * batch, h[None, :batch],
                           c[None, :batch], training, masks, Packing())
    assert not masks.log
    want = [hn[0]] + ([cn[0]] if lstm else [])
    _assert_matches(m, got, want, leaves)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell"])
def test_cell_option_set_later_takes_effect(kind):
    """A plain cell's call takes a short way past the regularisers; an option set
    on the cell after construction still counts: zoneout in eval mode gives its
    expectation p h_prev + (1 - p) h~ (and leaves c as it was)."""
    m = getattr(fusedrnn, kind)(I, H, dtype=F64).eval()
    lstm = kind == "LSTMCell"
    x, h, c = (torch.randn(B, n, dtype=F64) for n in (I, H, H))
    plain = m(x, (h, c)) if lstm else (m(x, h),)
    m.zoneout = 0.25
    zoned = m(x, (h, c)) if lstm else (m(x, h),)
    assert torch.allclose(zoned[0], 0.25 * h + 0.75 * plain[0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(zoned[0], plain[0])
    if lstm:  # the regularised kernels: the same c to rounding
        assert torch.allclose(zoned[1], plain[1], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ the masks' statistics
def _five_sigma(p, n):
    return 5 * math.sqrt(p * (1 - p) / n)


def test_zoneout_fraction_matches_p(monkeypatch):
    """In training a zoned unit keeps h_{t-1} exactly: the fraction of outputs equal
    to the previous step's is p (within 5 sigma; an unzoned unit equals it with
    probability 0). The cell's masks: the fraction of ones drawn is p_c."""
    p, pc = 0.3, 0.15
    m = fusedrnn.LSTM(8, 64, zoneout=p, zoneout_cell=pc, bidirectional=True)
    x = torch.randn(60, 16, 8)
    out = m(x)[0][..., :64]  # forward direction
    same = (out[1:] == out[:-1]).double().mean().item()
    assert abs(same - p) < _five_sigma(p, out[1:].numel())
    drawn = []
    draw = regularised.draw
    monkeypatch.setattr(regularised, "draw", lambda shape, q, like:
                        drawn.append((q, draw(shape, q, like))) or drawn[-1][1])
    m(x)
    cell_masks = [mk for q, mk in drawn if q == pc]
    assert len(cell_masks) == 2 and all(mk.shape == (60, 16, 64) for mk in cell_masks)
    for mk in cell_masks:
        assert abs(mk.mean().item() - pc) < _five_sigma(pc, mk.numel())
        assert set(mk.unique().tolist()) <= {0.0, 1.0}


def test_recurrent_dropout_fraction_and_scale(monkeypatch):
    """One [B, P] mask per layer, direction and call, zero with probability p,
    else 1/(1-p); recurrent inputs multiplied by it (checked against the loop model
    above). Here: the fraction of zeros over many calls, and that calls differ."""
    p = 0.35
    m = fusedrnn.GRU(4, 32, recurrent_dropout=p, num_layers=2, bidirectional=True)
    drawn = []
    draw = regularised.draw
    monkeypatch.setattr(regularised, "draw", lambda shape, q, like:
                        drawn.append(draw(shape, q, like)) or drawn[-1])
    for _ in range(10):
        m(torch.randn(3, 64, 4))
    assert len(drawn) == 10 * 4 and all(d.shape == (64, 32) for d in drawn)
    every = torch.stack(drawn)
    assert abs((every == 0).double().mean().item() - p) < _five_sigma(p, every.numel())
    assert not torch.equal(drawn[0], drawn[4])  # a new mask every call


def test_weight_drop_fraction_and_scale(monkeypatch):
    """The W_hh that reaches the layer function: zero with probability p, else
    W_hh / (1 - p); a new mask every call; W_hh itself in eval mode."""
    p = 0.25
    m = fusedrnn.LSTM(4, 32, weight_drop=p)
    seen = []
    real = fusedrnn.lstm_layer

    def spy(x_proj, h0, c0, w_hh, *args, **kw):
        seen.append(w_hh.detach().clone())
        return real(x_proj, h0, c0, w_hh, *args, **kw)

    monkeypatch.setattr(fusedrnn._ops, "lstm_layer", spy)
    m(torch.randn(3, 2, 4))
    m(torch.randn(3, 2, 4))
    m.eval()
    m(torch.randn(3, 2, 4))
    w = m.weight_hh_l0.detach()
    for s in seen[:2]:
        kept = s != 0
        assert torch.allclose(s[kept], w[kept] / (1 - p), rtol=1e-6)
        assert abs((~kept).double().mean().item() - p) < _five_sigma(p, w.numel())
    assert not torch.equal(seen[0], seen[1])
    assert torch.equal(seen[2], w)  # eval: W_hh as it is


@pytest.mark.parametrize("kind,kw", [
    ("LSTM", dict(ALL_ON, num_layers=2, dropout=0.2)),
    ("GRU", dict(layer_norm=True, zoneout=0.3, recurrent_dropout=0.4, weight_drop=0.15,
                 num_layers=2, dropout=0.2)),
    ("LSTMCell", dict(layer_norm=True, zoneout=0.3, zoneout_cell=0.2)),
    ("GRUCell", dict(zoneout=0.3))])
def test_masks_reproducible_under_manual_seed_and_fresh_per_call(kind, kw):
    """A cell call is one step: a fresh mask per call, as a layer's per step."""
    m = getattr(fusedrnn, kind)(I, H, **kw)
    x = torch.randn(B, I) if kind.endswith("Cell") else torch.randn(T, B, I)
    torch.manual_seed(123)
    a = _flat(m(x))
    b = _flat(m(x))
    torch.manual_seed(123)
    a2 = _flat(m(x))
    assert all(torch.equal(u, v) for u, v in zip(a, a2))
    assert not torch.equal(a[0], b[0])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_eval_mode_draws_nothing(kind):
    kw = dict(layer_norm=True, zoneout=0.3)
    if kind.startswith("LSTM"):
        kw["zoneout_cell"] = 0.2
    if not kind.endswith("Cell"):
        kw.update(recurrent_dropout=0.4, weight_drop=0.1, num_layers=2, dropout=0.5)
    m = getattr(fusedrnn, kind)(I, H, **kw).eval()
    x = torch.randn(B, I) if kind.endswith("Cell") else torch.randn(T, B, I)
    rng = torch.get_rng_state()
    a, b = _flat(m(x)), _flat(m(x))
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def _flat(out):
    """The tensors of a module's result: [output, h_n(, c_n)] or a cell's states."""
    if torch.is_tensor(out):
        return [out]
    if isinstance(out[1], tuple):
        return [out[0], *out[1]]
    return list(out)


def _outputs_and_grads(m, x, seed):
    torch.manual_seed(seed)
    outs = _flat(m(x))
    grads = torch.autograd.grad(sum(o.sum() for o in outs), [x, *m.parameters()])
    return outs, grads


@pytest.mark.parametrize("kind,kw", [
    ("LSTM", dict(num_layers=2, bidirectional=True, dropout=0.3)),
    ("LSTM", dict(proj_size=P)),
    ("GRU", dict(num_layers=2, batch_first=True)),
    ("GRU", dict(reset_after=False)),
    ("LSTMCell", {}), ("GRUCell", {})])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_rate_zero_is_bitwise_the_plain_layer(kind, kw, training, monkeypatch):
    """p = 0 (and recurrent_dropout, weight_drop in eval mode): the plain op calls,
    reg=None, the same results bit for bit."""
    zeros = dict(layer_norm=False, zoneout=0.0)
    if kind.startswith("LSTM"):
        zeros["zoneout_cell"] = 0
    if not kind.endswith("Cell"):
        zeros.update(recurrent_dropout=0.0 if training else 0.4,
                     weight_drop=0 if training else 0.2)
    plain = getattr(fusedrnn, kind)(I, H, **kw).train(training)
    ours = getattr(fusedrnn, kind)(I, H, **kw, **zeros).train(training)
    ours.load_state_dict(plain.state_dict())
    regs = []
    for name in ("lstm_layer", "gru_layer"):
        real = getattr(fusedrnn._ops, name)
        monkeypatch.setattr(fusedrnn._ops, name, lambda *a, _real=real, **k:
                            regs.append(k.get("reg")) or _real(*a, **k))
    x = torch.randn(B, I, requires_grad=True) if kind.endswith("Cell") else \
        torch.randn(T, B, I, requires_grad=True)
    want = _outputs_and_grads(plain, x, 5)
    got = _outputs_and_grads(ours, x, 5)
    # No layer calls at all where both took the plain stack's one op.
    assert all(r is None for r in regs)
    for a, b in zip(got[0] + list(got[1]), want[0] + list(want[1])):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ construction and errors
BAD_RATES = [-0.1, 1.0, 1.5, float("nan"), True, "0.1", None]


@pytest.mark.parametrize("option", regularised.RATES)
@pytest.mark.parametrize("bad", BAD_RATES, ids=repr)
def test_bad_rate_raises(option, bad):
    with pytest.raises(ValueError, match=rf"^{option} should be a number in range \[0, 1\) "
                                         "representing the probability of"):
        fusedrnn.LSTM(I, H, **{option: bad})


def test_option_errors():
    with pytest.raises(ValueError, match="layer_norm=True with proj_size > 0 is not supported"):
        fusedrnn.LSTM(I, H, proj_size=P, layer_norm=True)
    for cls in (fusedrnn.GRU, fusedrnn.GRUCell):
        with pytest.raises(ValueError, match="layer_norm=True needs reset_after=True"):
            cls(I, H, reset_after=False, layer_norm=True)
        with pytest.raises(ValueError, match=f"fusedrnn.{cls.__name__} has no zoneout_cell: a "
                                             "GRU has no cell state"):
            cls(I, H, zoneout_cell=0.1)
    for cls in (fusedrnn.LSTMCell, fusedrnn.GRUCell):
        for opt in ("recurrent_dropout", "weight_drop"):
            with pytest.raises(TypeError, match=f"fusedrnn.{cls.__name__} has no {opt}: a cell "
                                                "call is one step"):
                cls(I, H, **{opt: 0.1})
        with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
            cls(I, H, nonsense=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'reset_after'"):
        fusedrnn.LSTM(I, H, reset_after=False)


def test_parameters_names_shapes_init_and_repr():
    torch.manual_seed(3)
    ref = nn.LSTM(I, H, num_layers=2, bidirectional=True, bias=False)
    torch.manual_seed(3)
    m = fusedrnn.LSTM(I, H, num_layers=2, bidirectional=True, bias=False, layer_norm=True,
                      zoneout=0.1)
    # torch's parameters come first, drawn as torch.nn draws them.
    assert list(m.state_dict())[:len(ref.state_dict())] == list(ref.state_dict())
    for n, t in ref.state_dict().items():
        assert torch.equal(m.state_dict()[n], t), n
    ln = {n: tuple(t.shape) for n, t in m.state_dict().items() if n not in ref.state_dict()}
    want = {}
    for k in range(2):
        for s in ("", "_reverse"):
            want.update({f"layernorm_ih_weight_l{k}{s}": (4 * H,),
                         f"layernorm_hh_weight_l{k}{s}": (4 * H,),
                         f"layernorm_c_weight_l{k}{s}": (H,), f"layernorm_c_bias_l{k}{s}": (H,)})
    assert ln == want
    assert repr(m) == f"LSTM({I}, {H}, num_layers=2, bias=False, bidirectional=True, " \
                      "layer_norm=True, zoneout=0.1)"
    g = fusedrnn.GRU(I, H, layer_norm=True, weight_drop=0.2, recurrent_dropout=0.1)
    assert [n for n in g.state_dict() if n.startswith("layernorm")] == \
        ["layernorm_ih_weight_l0", "layernorm_hh_weight_l0"]
    assert "layer_norm=True, recurrent_dropout=0.1, weight_drop=0.2" in repr(g)
    cell = fusedrnn.LSTMCell(I, H, layer_norm=True)
    assert [n for n in cell.state_dict() if n.startswith("layernorm")] == \
        ["layernorm_ih_weight", "layernorm_hh_weight", "layernorm_c_weight", "layernorm_c_bias"]
    assert repr(fusedrnn.LSTM(I, H, zoneout=0.0)) == f"LSTM({I}, {H})"


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_reset_parameters_keeps_layer_norm_initial_values(kind):
    m = getattr(fusedrnn, kind)(I, H, layer_norm=True)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(7.0)
    m.reset_parameters()
    bound = 1 / math.sqrt(H)
    for n, p in m.named_parameters():
        if regularised.is_ln_parameter(n):
            assert torch.equal(p, torch.full_like(p, 0.0 if "_bias" in n else 1.0)), n
        else:
            assert p.abs().max() <= bound and p.std() > 0, n


# ------------------------------------------------------------------ conversion, checkpoints
@pytest.mark.parametrize("torch_cls,kw,options", [
    (nn.LSTM, dict(num_layers=2, bidirectional=True), dict(ALL_ON)),
    (nn.GRU, dict(batch_first=True), dict(layer_norm=True, zoneout=0.2)),
    (nn.LSTMCell, {}, dict(layer_norm=True, zoneout_cell=0.1)),
    (nn.GRUCell, {}, dict(zoneout=0.2))])
def test_from_torch_with_options_and_to_torch_refuses(torch_cls, kw, options):
    t = torch_cls(I, H, **kw).double().eval()
    rng = torch.get_rng_state()
    f = fusedrnn.from_torch(t, **options)
    assert torch.equal(rng, torch.get_rng_state())
    assert not f.training and regularised.options(f) == regularised.Options(**options)
    sd = f.state_dict()
    for n, v in t.state_dict().items():
        assert torch.equal(sd[n], v), n
    for n, v in sd.items():
        if n not in t.state_dict():
            assert regularised.is_ln_parameter(n)
            assert torch.equal(v, torch.full_like(v, 0.0 if "_bias" in n else 1.0)), n
    with pytest.raises(ValueError, match=f"fusedrnn.{type(f).__name__} with .* has no torch.nn "
                                         "equivalent"):
        fusedrnn.to_torch(f)
    model = nn.Sequential(f)
    with pytest.raises(ValueError, match="has no torch.nn equivalent"):
        fusedrnn.restore_rnns(model)
    assert model[0] is f


@pytest.mark.parametrize("option", regularised.OPTIONS)
def test_to_torch_refuses_each_option(option):
    f = fusedrnn.LSTM(I, H, **{option: True if option == "layer_norm" else 0.1})
    with pytest.raises(ValueError, match=f"fusedrnn.LSTM with {option}="):
        fusedrnn.to_torch(f)


def test_replace_rnns_with_options():
    model = nn.Sequential(nn.LSTM(I, H), nn.GRU(H, H), nn.LSTMCell(H, H))
    before = list(model)
    with pytest.raises(TypeError, match="LSTMCell has no recurrent_dropout"):
        fusedrnn.replace_rnns(model, recurrent_dropout=0.1)
    with pytest.raises(ValueError, match="GRU has no zoneout_cell"):
        fusedrnn.replace_rnns(model, zoneout_cell=0.1)
    assert all(a is b for a, b in zip(model, before))  # refused before changing anything
    fusedrnn.replace_rnns(model, layer_norm=True, zoneout=0.1)
    assert [type(m) for m in model] == [fusedrnn.LSTM, fusedrnn.GRU, fusedrnn.LSTMCell]
    for new, old in zip(model, before):
        assert new.layer_norm and new.zoneout == 0.1
        for n, v in old.state_dict().items():
            assert torch.equal(new.state_dict()[n], v)


def test_state_dict_round_trip_and_whole_module_checkpoint():
    m = fusedrnn.LSTM(I, H, num_layers=2, layer_norm=True, zoneout=0.2, zoneout_cell=0.1,
                      recurrent_dropout=0.3, weight_drop=0.1).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(T, B, I, dtype=F64)
    other = fusedrnn.LSTM(I, H, num_layers=2, layer_norm=True).double().eval()
    other.load_state_dict(m.state_dict())
    # zoneout is part of the function in eval mode (the expectation): differs here
    assert not torch.equal(other(x)[0], m(x)[0])
    other.zoneout, other.zoneout_cell = 0.2, 0.1
    assert torch.equal(other(x)[0], m(x)[0])
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf)  # weights_only=True
    assert repr(loaded) == repr(m) and regularised.options(loaded) == regularised.options(m)
    assert torch.equal(loaded(x)[0], m(x)[0])
    plain = fusedrnn.LSTM(I, H, num_layers=2)
    with pytest.raises(RuntimeError, match="Unexpected key.*layernorm_ih_weight_l0"):
        plain.load_state_dict(m.state_dict())


# ------------------------------------------------------------------ TorchScript, torch.compile
@pytest.mark.filterwarnings("ignore:`torch.jit.* is deprecated:FutureWarning")
@pytest.mark.parametrize("make", [lambda: fusedrnn.LSTM(I, H, layer_norm=True),
                                  lambda: fusedrnn.GRU(I, H, weight_drop=0.1),
                                  lambda: fusedrnn.GRUCell(I, H, zoneout=0.1)])
def test_torchscript_refuses_at_script_time(make):
    model = nn.Sequential(nn.Linear(I, I), make())
    with pytest.raises(RuntimeError, match=r"under TorchScript: the regularisers beyond torch.nn "
                                           r"\((layer_norm=True|weight_drop=0.1|zoneout=0.1)\) "
                                           "are not supported"):
        torch.jit.script(model)


@pytest.mark.parametrize("kind,kw", [("LSTM", dict(num_layers=2, bidirectional=True)),
                                     ("GRU", dict(batch_first=True)), ("LSTMCell", {})])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_compile_fullgraph_layer_norm(kind, kw, training):
    """layer_norm (no randomness) compiled in one graph: eager's outputs and gradients;
    in training with zoneout and recurrent dropout too (shapes and gradients flow)."""
    torch._dynamo.reset()
    extra = {} if not training or kind.endswith("Cell") else dict(zoneout=0.2,
                                                                   recurrent_dropout=0.2)
    m = getattr(fusedrnn, kind)(I, H, layer_norm=True, **kw, **extra).train(training)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(B, I) if kind.endswith("Cell") else torch.randn(T, B, I)
    if extra:
        out = compiled(x)[0]
        out.sum().backward()
        assert out.shape == m(x)[0].shape
        assert all(p.grad is not None for p in m.parameters())
        return
    want = _outputs_and_grads(m, x.requires_grad_(), 0)
    got = _outputs_and_grads(compiled, x, 0)
    for a, b in zip(got[0] + list(got[1]), want[0] + list(want[1])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
