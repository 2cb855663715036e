"""fusedrnn.LSTM/GRU/LSTMCell/GRUCell against torch.nn with the same weights:
construction, outputs, final states and every gradient, over the grid of options;
dropout; one op per layer and direction."""
import itertools
import random
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import fusedrnn

from helpers import B, H, I, P, T, rel_err
from module_helpers import (OpLog, LAYOUTS, fresh_leaves, outputs_and_grads,
                            rnn_call_args, rnn_inputs, twins)

F64_TOL = 1e-10
F32_EPS = torch.finfo(torch.float32).eps
# Measured over this grid: our float32 error against float64 is at most ~4x
# torch.nn's own (median ~1x), and below 5e-7 (T=4..9, H=5..8).
F32_RATIO = 6

# ------------------------------------------------------------------ the grid
OPTIONS = dict(kind=["LSTM", "GRU"], num_layers=[1, 2], bidirectional=[False, True],
               batch_first=[False, True], bias=[True, False], proj=[False, True],
               layout=list(LAYOUTS), hx_given=[False, True])


def _grid():
    for values in itertools.product(*OPTIONS.values()):
        c = dict(zip(OPTIONS, values))
        if c["kind"] == "GRU" and c["proj"]:
            continue
        yield c


def _case_id(c):
    return "-".join([c["kind"], f"L{c['num_layers']}", "bi" if c["bidirectional"] else "uni",
                     "bf" if c["batch_first"] else "tf", "bias" if c["bias"] else "nobias",
                     "proj" if c["proj"] else "noproj", c["layout"],
                     "hx" if c["hx_given"] else "nohx"])


GRID = [pytest.param(c, id=_case_id(c)) for c in _grid()]
# float32: a seeded sample of the grid; every option value appears in it, with
# and without each of the others.
F32_GRID = [pytest.param(c, id=_case_id(c)) for c in random.Random(0).sample(list(_grid()), 48)]


def _module_kwargs(c, **extra):
    kw = dict(num_layers=c["num_layers"], bias=c["bias"], batch_first=c["batch_first"],
              bidirectional=c["bidirectional"], **extra)
    if c["proj"]:
        kw["proj_size"] = P
    return kw


def _run_pair(c, device, dtype, **extra):
    ref, ours = twins(c["kind"], device, dtype, **_module_kwargs(c, **extra))
    leaves = rnn_inputs(ref, c["layout"], c["hx_given"], device, torch.float64)
    ref_leaves, our_leaves = fresh_leaves(leaves, dtype), fresh_leaves(leaves, dtype)
    want = outputs_and_grads(ref, rnn_call_args(ref, c["layout"], ref_leaves), ref_leaves)
    got = outputs_and_grads(ours, rnn_call_args(ours, c["layout"], our_leaves), our_leaves,
                            weights=want[3])
    return ref, ours, leaves, want, got


def _assert_same_structure(got_result, want_result):
    if isinstance(want_result[0], PackedSequence):
        assert isinstance(got_result[0], PackedSequence)
        for a, b in zip(got_result[0][1:], want_result[0][1:]):  # batch_sizes, indices
            assert (a is None and b is None) or torch.equal(a, b)


def test_grid_covers_every_option_with_and_without_the_others():
    """Every pair of option values that can occur together does, in both grids."""
    full = list(_grid())
    values = [(k, v) for k, vs in OPTIONS.items() for v in vs]
    pairs = {(a, b) for a, b in itertools.combinations(values, 2) if a[0] != b[0]
             and any(c[a[0]] == a[1] and c[b[0]] == b[1] for c in full)}
    for grid in ([p.values[0] for p in GRID], [p.values[0] for p in F32_GRID]):
        for (ka, va), (kb, vb) in pairs:
            assert any(c[ka] == va and c[kb] == vb for c in grid), (ka, va, kb, vb)


@pytest.mark.parametrize("c", GRID)
def test_float64_matches_torch_nn(device, c):
    _, _, _, (want_res, want, want_g, _), (got_res, got, got_g, _) = _run_pair(
        c, device, torch.float64)
    _assert_same_structure(got_res, want_res)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_err(g, w) < F64_TOL
    assert got_g.keys() == want_g.keys()
    for name in want_g:
        assert rel_err(got_g[name], want_g[name]) < F64_TOL, name


@pytest.mark.parametrize("c", F32_GRID)
def test_float32_error_within_torch_nn_error(device, c):
    """Against a float64 torch.nn run: our float32 error is at most a small
    multiple of torch.nn's own float32 error, and below 1e-5."""
    ref, _, leaves, (_, want, want_g, weights), (_, got, got_g, _) = _run_pair(
        c, device, torch.float32)
    ref64 = ref.double()
    leaves64 = fresh_leaves(leaves)
    _, exact, exact_g, _ = outputs_and_grads(
        ref64, rnn_call_args(ref64, c["layout"], leaves64), leaves64, weights=weights)
    pairs = list(zip(got, want, exact)) + [(got_g[n], want_g[n], exact_g[n]) for n in exact_g]
    for g, w, e in pairs:
        assert g.dtype == w.dtype == torch.float32
        ours, theirs = rel_err(g, e), rel_err(w, e)
        assert ours <= F32_RATIO * theirs + F32_EPS, (ours, theirs)
        assert ours < 1e-5


# ------------------------------------------------------------------ cells
CELL_GRID = [pytest.param(kind, bias, batched, hx_given,
                          id=f"{kind}-{'bias' if bias else 'nobias'}-"
                             f"{'batched' if batched else 'unbatched'}-"
                             f"{'hx' if hx_given else 'nohx'}")
             for kind in ("LSTMCell", "GRUCell") for bias in (True, False)
             for batched in (True, False) for hx_given in (True, False)]


def _cell_leaves(kind, batched, hx_given, device, dtype):
    lead = (B,) if batched else ()
    leaves = {"x": torch.randn(*lead, I, device=device, dtype=dtype)}
    if hx_given:
        leaves["h0"] = torch.randn(*lead, H, device=device, dtype=dtype)
        if kind == "LSTMCell":
            leaves["c0"] = torch.randn(*lead, H, device=device, dtype=dtype)
    return leaves


def _cell_args(leaves):
    if "h0" not in leaves:
        return (leaves["x"],)
    return (leaves["x"], (leaves["h0"], leaves["c0"]) if "c0" in leaves else leaves["h0"])


@pytest.mark.parametrize("kind,bias,batched,hx_given", CELL_GRID)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cell_matches_torch_nn(device, kind, bias, batched, hx_given, dtype):
    exact_m, ref = twins(kind, device, torch.float64, bias=bias)
    ref, ours = twins(kind, device, dtype, bias=bias)
    ref.load_state_dict(exact_m.state_dict()), ours.load_state_dict(exact_m.state_dict())
    leaves = _cell_leaves(kind, batched, hx_given, device, torch.float64)
    lv = fresh_leaves(leaves)
    _, exact, exact_g, weights = outputs_and_grads(exact_m, _cell_args(lv), lv)
    lv = fresh_leaves(leaves, dtype)
    _, want, want_g, _ = outputs_and_grads(ref, _cell_args(lv), lv, weights=weights)
    lv = fresh_leaves(leaves, dtype)
    _, got, got_g, _ = outputs_and_grads(ours, _cell_args(lv), lv, weights=weights)
    assert [(g.shape, g.dtype) for g in got] == [(w.shape, w.dtype) for w in want]
    pairs = list(zip(got, want, exact)) + [(got_g[n], want_g[n], exact_g[n]) for n in exact_g]
    for g, w, e in pairs:
        if dtype == torch.float64:
            assert rel_err(g, w) < F64_TOL
        else:
            ours_err, theirs = rel_err(g, e), rel_err(w, e)
            assert ours_err <= F32_RATIO * theirs + F32_EPS and ours_err < 1e-5


# ------------------------------------------------------------------ construction
CONFIGS = [
    ("LSTM", dict()), ("LSTM", dict(num_layers=3, bidirectional=True, proj_size=P)),
    ("LSTM", dict(bias=False, batch_first=True, dropout=0.25, num_layers=2)),
    ("GRU", dict()), ("GRU", dict(num_layers=2, bidirectional=True, bias=False)),
    ("LSTMCell", dict()), ("LSTMCell", dict(bias=False)), ("GRUCell", dict()),
    ("GRUCell", dict(bias=False)),
]


@pytest.mark.parametrize("kind,kw", CONFIGS)
def test_construction_matches_torch_nn(kind, kw):
    """Names, shapes, order, state_dict keys, repr, attributes, and the default
    initialisation (same RNG draws, so identical values with the same seed)."""
    torch.manual_seed(7)
    ref = getattr(nn, kind)(I, H, **kw)
    torch.manual_seed(7)
    ours = getattr(fusedrnn, kind)(I, H, **kw)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == \
           [(n, p.shape) for n, p in ref.named_parameters()]
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert repr(ours) == repr(ref)
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n
    bound = 1 / H ** 0.5
    for p in ours.parameters():
        assert p.abs().max() <= bound
    assert isinstance(ours, nn.RNNBase if kind in ("LSTM", "GRU") else getattr(nn, kind))
    for attr in ("input_size", "hidden_size", "bias", "num_layers", "batch_first", "dropout",
                 "bidirectional", "proj_size", "mode"):
        assert getattr(ours, attr, None) == getattr(ref, attr, None), attr


def test_factory_kwargs():
    m = fusedrnn.LSTM(I, H, num_layers=2, device="meta", dtype=torch.float64)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in m.parameters())
    c = fusedrnn.GRUCell(I, H, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in c.parameters())


def test_default_initialisation_is_uniform():
    torch.manual_seed(0)
    w = torch.cat([p.detach().flatten() for p in fusedrnn.LSTM(64, 64, num_layers=4).parameters()])
    bound = 1 / 64 ** 0.5
    assert w.abs().max() <= bound
    # Uniform(-b, b): mean 0, variance b^2 / 3 (n ~ 130k, so ~1% slack is many sigmas).
    assert abs(w.mean().item()) < 0.01 * bound
    assert abs(w.var().item() / (bound ** 2 / 3) - 1) < 0.02


# ------------------------------------------------------------------ dropout
DROPOUT_CASES = [pytest.param(kind, bi, layout, id=f"{kind}-{'bi' if bi else 'uni'}-{layout}")
                 for kind in ("LSTM", "GRU") for bi in (False, True)
                 for layout in ("padded", "packed_unsorted")]


@pytest.mark.parametrize("kind,bidirectional,layout", DROPOUT_CASES)
def test_dropout_eval_mode_matches_torch_exactly(device, kind, bidirectional, layout):
    c = dict(kind=kind, num_layers=3, bidirectional=bidirectional, batch_first=False, bias=True,
             proj=kind == "LSTM", layout=layout, hx_given=True)
    ref, ours = twins(kind, device, torch.float64, dropout=0.5, **_module_kwargs(c))
    ref.eval(), ours.eval()
    leaves = rnn_inputs(ref, layout, True, device, torch.float64)
    lr, lo = fresh_leaves(leaves), fresh_leaves(leaves)
    _, want, want_g, w = outputs_and_grads(ref, rnn_call_args(ref, layout, lr), lr)
    _, got, got_g, _ = outputs_and_grads(ours, rnn_call_args(ours, layout, lo), lo, weights=w)
    for g, e in list(zip(got, want)) + [(got_g[n], want_g[n]) for n in want_g]:
        assert rel_err(g, e) < F64_TOL


def _states(hidden):
    return hidden if isinstance(hidden, tuple) else (hidden,)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_dropout_single_layer_is_a_no_op_in_training(device, kind):
    """Dropout acts between layers only: with one layer, training mode matches torch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that it does nothing
        ref, ours = twins(kind, device, torch.float64, dropout=0.9, bidirectional=True)
    assert ours.training and ref.training
    x = torch.randn(T, B, I, device=device, dtype=torch.float64)
    (got, got_h), (want, want_h) = ours(x), ref(x)
    for g, w in zip((got, *_states(got_h)), (want, *_states(want_h))):
        assert rel_err(g, w) < F64_TOL


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_dropout_p1_feeds_zeros_to_the_second_layer(device, kind, bidirectional):
    """p = 1 zeroes the first layer's output on its way into the second layer,
    and nothing else: not the input, not the states, not the last output."""
    dirs = 2 if bidirectional else 1
    ours = getattr(fusedrnn, kind)(I, H, num_layers=2, dropout=1.0, bidirectional=bidirectional,
                                   device=device, dtype=torch.float64)
    x = torch.randn(T, B, I, device=device, dtype=torch.float64)
    hx = torch.randn(2 * dirs, B, H, device=device, dtype=torch.float64)
    hx = (hx, torch.randn_like(hx)) if kind == "LSTM" else hx
    out, hidden = ours(x, hx)
    # The second layer alone, on zeros, with its own weights and initial states.
    second = getattr(nn, kind)(dirs * H, H, bidirectional=bidirectional, device=device,
                               dtype=torch.float64)
    second.load_state_dict({k.replace("_l1", "_l0"): v for k, v in ours.state_dict().items()
                            if "_l1" in k})
    hx1 = tuple(h[dirs:] for h in _states(hx))
    want_out, want_hidden = second(torch.zeros(T, B, dirs * H, device=device, dtype=torch.float64),
                                   hx1 if kind == "LSTM" else hx1[0])
    assert rel_err(out, want_out) < F64_TOL
    for got, want in zip(_states(hidden), _states(want_hidden)):
        assert rel_err(got[dirs:], want) < F64_TOL
    # The first layer is untouched: its final states are eval mode's.
    _, eval_hidden = ours.eval()(x, hx)
    for got, want in zip(_states(hidden), _states(eval_hidden)):
        assert torch.equal(got[:dirs], want[:dirs])


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_dropout_in_training_changes_only_later_layers(device, kind):
    ours = getattr(fusedrnn, kind)(I, H, num_layers=3, dropout=0.5, device=device,
                                   dtype=torch.float64)
    x = torch.randn(T, B, I, device=device, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    out_a, hid_a = ours(x)
    torch.manual_seed(3)
    out_b, _ = ours(x)
    assert torch.equal(out_a, out_b)  # the masks come from torch's RNG
    out_c, _ = ours(x)
    assert not torch.equal(out_a, out_c)
    out_e, hid_e = ours.eval()(x)
    assert not torch.equal(out_a, out_e)
    for a, e in zip(_states(hid_a), _states(hid_e)):
        assert torch.equal(a[0], e[0]) and not torch.equal(a[1:], e[1:])
    out_a.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in ours.parameters())


# ------------------------------------------------------------------ one op per layer and direction
def _count(fn):
    with OpLog() as counter:
        fn()
    return counter.ops


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_one_op_per_layer_and_direction_and_no_time_loop(kind, layout):
    ours = getattr(fusedrnn, kind)(I, H, num_layers=3, bidirectional=True)
    # A padded batch's layers are the layer ops with their projection (Note [a
    # layer and its projection in one node]), and an LSTM's backward one op
    # (Note [one product for both weight gradients]); packed input calls the
    # layer ops.
    forward = "input_forward" if layout == "padded" else "forward"
    backward = "input_backward" if layout == "padded" and kind == "LSTM" else "backward"
    fwd_op, bwd_op = f"fusedrnn.{kind.lower()}_{forward}", f"fusedrnn.{kind.lower()}_{backward}"

    def ops_for(steps):
        inp = torch.randn(steps, B, I, requires_grad=True)
        if layout == "packed":  # a leaf as data: packing's own backward is torch's
            data = nn.utils.rnn.pack_padded_sequence(inp, [steps] * (B - 1) + [1])
            inp = PackedSequence(data.data.detach().requires_grad_(), data.batch_sizes)
        fwd = _count(lambda: ours(inp)[0])
        out = ours(inp)[0]
        data = out.data if layout == "packed" else out
        ours.zero_grad(set_to_none=True)
        bwd = _count(lambda: data.sum().backward())
        return fwd, bwd

    short, long = ops_for(3), ops_for(11)
    for ops, op in ((short[0], fwd_op), (short[1], bwd_op)):
        assert ops.count(op) == 3 * 2
    # The same ops, however many time steps: nothing loops over time in Python.
    assert short == long


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_plain_stack_takes_one_op_and_the_rest_the_full_path(kind, monkeypatch):
    """Note [a plain stack in one call]: a plain call, batched or one unbatched
    sequence, is one op (lstm_layers / gru_layers) and equals torch.nn's; every
    case it does not cover takes rnn_layers (the full path), which raises
    torch.nn's errors."""
    import fusedrnn.modules as modules
    calls = []
    real = modules.rnn_layers
    monkeypatch.setattr(modules, "rnn_layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    lstm = kind == "LSTM"

    def pair(**kw):
        theirs = getattr(nn, kind)(I, H, **kw).double()
        return theirs, fusedrnn.from_torch(theirs)

    def states(n, dtype=torch.float64):
        hx = [torch.randn(n, B, H, dtype=dtype) for _ in range(2 if lstm else 1)]
        return tuple(hx) if lstm else hx[0]

    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    one = tuple(s[:, 0] for s in states(2)) if lstm else states(2)[:, 0]  # unbatched
    plain = [(dict(), (x,)), (dict(num_layers=2, bidirectional=True), (x, states(4))),
             (dict(batch_first=True, bias=False), (x,)),
             (dict(num_layers=2, dropout=0.5), (x, states(2))),  # eval: no dropout
             (dict(num_layers=2), (x[:, 0], one)), (dict(batch_first=True), (x[:, 0],))]
    for kw, args in plain:
        theirs, ours = pair(**kw)
        theirs.eval(), ours.eval()
        got, want = ours(*args), theirs(*args)
        assert not calls, kw
        flat = lambda r: [r[0], *(r[1] if lstm else (r[1],))]  # noqa: E731
        for a, e in zip(flat(got), flat(want)):
            assert rel_err(a, e) < F64_TOL
        g = [torch.randn_like(e) for e in flat(want)]
        (a,), (e,) = torch.autograd.grad(flat(got), x, g), torch.autograd.grad(flat(want), x, g)
        assert rel_err(a, e) < F64_TOL
    packed = nn.utils.rnn.pack_padded_sequence(x, [T] * B)
    full = [(dict(), (packed,)), (dict(num_layers=2, dropout=0.5), (x,)),
            (dict(zoneout=0.1) if lstm else dict(reset_after=False, zoneout=0.1), (x,))]
    if lstm:
        full.append((dict(proj_size=P), (x,)))
    for kw, args in full:
        ours = getattr(fusedrnn, kind)(I, H, **kw).double()
        calls.clear()
        ours(*args)
        assert calls, kw
    ours = getattr(fusedrnn, kind)(I, H).double()
    for bad, msg in ((states(1, torch.float32), "dtype|expected"), (states(2), "Expected hidden")):
        with pytest.raises(RuntimeError, match=msg):
            ours(x, bad)


# ------------------------------------------------------------------ parametrized weights
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_parametrized_weights_evaluated_as_in_torch_nn(kind):
    """Weights under torch.nn.utils.parametrizations (weight_norm; spectral_norm,
    whose power iteration runs each time the weight is evaluated in training
    mode) and torch.nn.utils.prune: over several training steps, outputs and
    every gradient equal torch.nn's, float64, which holds only if the forward
    evaluates each parametrized weight as often as torch.nn.LSTM's."""
    from torch.nn.utils import parametrizations, prune
    theirs = getattr(nn, kind)(I, H, num_layers=2, bidirectional=True).double()
    ours = fusedrnn.from_torch(theirs)
    for m in (theirs, ours):
        parametrizations.weight_norm(m, name="weight_hh_l0")
        parametrizations.spectral_norm(m, name="weight_ih_l1_reverse")
        prune.l1_unstructured(m, name="weight_hh_l1", amount=0.3)
    ours.load_state_dict(theirs.state_dict())  # the same power-iteration vectors
    for _ in range(3):
        x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
        res = []
        for m in (theirs, ours):
            out, _ = m(x)
            res.append([out, *torch.autograd.grad(out.square().sum(), [x, *m.parameters()])])
        for a, e in zip(res[1], res[0]):
            assert rel_err(a, e) <= F64_TOL


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell"])
def test_parametrized_cell_weights_evaluated_as_in_torch_nn(kind):
    """The cells' short way reads parameters from the module's dict of them;
    weights moved out of it by a parametrization or pruning are evaluated as
    torch.nn's cells evaluate them: outputs and every gradient, float64, over
    several training steps."""
    from torch.nn.utils import parametrizations, prune
    theirs = getattr(nn, kind)(I, H).double()
    ours = fusedrnn.from_torch(theirs)
    for m in (theirs, ours):
        parametrizations.weight_norm(m, name="weight_hh")
        parametrizations.spectral_norm(m, name="weight_ih")
        prune.l1_unstructured(m, name="bias_ih", amount=0.3)
    ours.load_state_dict(theirs.state_dict())
    for _ in range(3):
        x = torch.randn(B, I, dtype=torch.float64, requires_grad=True)
        hx = [torch.randn(B, H, dtype=torch.float64) for _ in range(2 if kind == "LSTMCell" else 1)]
        res = []
        for m in (theirs, ours):
            out = m(x, tuple(hx) if kind == "LSTMCell" else hx[0])
            out = out if isinstance(out, tuple) else (out,)
            loss = sum(o.square().sum() for o in out)
            res.append([*out, *torch.autograd.grad(loss, [x, *m.parameters()])])
        for a, e in zip(res[1], res[0]):
            assert rel_err(a, e) <= F64_TOL
