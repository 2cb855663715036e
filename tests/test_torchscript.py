"""torch.jit.script and torch.jit.trace of the modules and of a model holding them:
the outputs and gradients of eager mode (and of torch.nn), fusedrnn's ops in
the compiled graph, torch.jit.save/load, and a clear error for what does not
script."""
import io
import itertools
import os
import random
import subprocess
import sys
from typing import List, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from fusedrnn import pooling

from helpers import B, H, I, P, T, rel_err
from module_helpers import fresh_leaves, outputs_and_grads, rnn_call_args, rnn_inputs
from test_module_errors import ACCEPTED, CASES

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.* is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]

F64_TOL = 1e-10
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make(kind, device, dtype=torch.float64, **kw):
    """(torch.nn twin or None, fusedrnn module); kind "GRU-classic" is
    reset_after=False, which torch.nn has not."""
    if kind.endswith("-classic"):
        ours = getattr(fusedrnn, kind.split("-")[0])(I, H, reset_after=False, **kw)
        return None, ours.to(device, dtype)
    ref = getattr(nn, kind)(I, H, **kw).to(device, dtype)
    return ref, fusedrnn.from_torch(ref)


def _assert_equal(got, want):
    """Scripted against eager: the same op calls on the same inputs."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert torch.equal(g, w)


def _assert_grads_equal(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def _assert_close_to_torch(ref, layout, leaves, weights, got, got_g):
    lr = fresh_leaves(leaves)
    _, want, want_g, _ = outputs_and_grads(ref, rnn_call_args(ref, layout, lr), lr, weights)
    for g, w in zip(got, want):
        assert rel_err(g, w) < F64_TOL
    for name in want_g:
        assert rel_err(got_g[name], want_g[name]) < F64_TOL, name


# ------------------------------------------------------------------ script: the grid
OPTIONS = dict(kind=["LSTM", "GRU", "GRU-classic"], num_layers=[1, 2],
               bidirectional=[False, True], batch_first=[False, True], bias=[True, False],
               proj=[False, True], layout=["padded", "unbatched"], hx_given=[False, True])
FULL_GRID = [c for c in (dict(zip(OPTIONS, v)) for v in itertools.product(*OPTIONS.values()))
             if c["kind"] == "LSTM" or not c["proj"]]
# Each configuration compiles anew (RNNBase's sizes and flags are TorchScript
# constants), so a seeded sample in which every pair of option values occurs.
GRID = [pytest.param(c, id="-".join(f"{k}={v}" for k, v in c.items()))
        for c in random.Random(0).sample(FULL_GRID, 48)]


def test_grid_covers_every_pair_of_option_values():
    values = [(k, v) for k, vs in OPTIONS.items() for v in vs]
    sample = [p.values[0] for p in GRID]
    for (ka, va), (kb, vb) in itertools.combinations(values, 2):
        if ka != kb and any(c[ka] == va and c[kb] == vb for c in FULL_GRID):
            assert any(c[ka] == va and c[kb] == vb for c in sample), (ka, va, kb, vb)


@pytest.mark.parametrize("c", GRID)
def test_script_matches_eager_and_torch_nn(device, c):
    kw = dict(num_layers=c["num_layers"], bidirectional=c["bidirectional"],
              batch_first=c["batch_first"], bias=c["bias"])
    if c["proj"]:
        kw["proj_size"] = P
    ref, ours = _make(c["kind"], device, **kw)
    scripted = torch.jit.script(ours)
    leaves = rnn_inputs(ours, c["layout"], c["hx_given"], device, torch.float64)
    le, ls = fresh_leaves(leaves), fresh_leaves(leaves)
    _, want, want_g, w = outputs_and_grads(ours, rnn_call_args(ours, c["layout"], le), le)
    _, got, got_g, _ = outputs_and_grads(scripted, rnn_call_args(ours, c["layout"], ls), ls, w)
    _assert_equal(got, want)
    _assert_grads_equal(got_g, want_g)
    if ref is not None:
        _assert_close_to_torch(ref, c["layout"], leaves, w, got, got_g)


CELL_GRID = [pytest.param(kind, bias, batched, hx_given,
                          id=f"{kind}-bias={bias}-batched={batched}-hx={hx_given}")
             for kind in ("LSTMCell", "GRUCell", "GRUCell-classic") for bias in (True, False)
             for batched in (True, False) for hx_given in (True, False)]


@pytest.mark.parametrize("kind,bias,batched,hx_given", CELL_GRID)
def test_script_cells_match_eager_and_torch_nn(device, kind, bias, batched, hx_given):
    ref, ours = _make(kind, device, bias=bias)
    scripted = torch.jit.script(ours)
    lead = (B,) if batched else ()
    opts = dict(device=device, dtype=torch.float64)
    leaves = {"x": torch.randn(*lead, I, **opts)}
    if hx_given:
        leaves["h0"] = torch.randn(*lead, H, **opts)
        if kind == "LSTMCell":
            leaves["c0"] = torch.randn(*lead, H, **opts)

    def args(lv):
        if "h0" not in lv:
            return (lv["x"],)
        return (lv["x"], (lv["h0"], lv["c0"]) if "c0" in lv else lv["h0"])

    le, ls = fresh_leaves(leaves), fresh_leaves(leaves)
    _, want, want_g, w = outputs_and_grads(ours, args(le), le)
    _, got, got_g, _ = outputs_and_grads(scripted, args(ls), ls, w)
    _assert_equal(got, want)
    _assert_grads_equal(got_g, want_g)
    if ref is not None:
        lr = fresh_leaves(leaves)
        _, exact, exact_g, _ = outputs_and_grads(ref, args(lr), lr, w)
        for g, e in list(zip(got, exact)) + [(got_g[n], exact_g[n]) for n in exact_g]:
            assert rel_err(g, e) < F64_TOL


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_script_dropout_in_training_matches_eager(device, kind):
    """The same masks from the same seed (the same F.dropout calls), and
    training/eval switch on the ScriptModule."""
    _, ours = _make(kind, device, num_layers=3, dropout=0.5, bidirectional=True)
    scripted = torch.jit.script(ours)
    x = torch.randn(T, B, I, device=device, dtype=torch.float64)
    outs = []
    for m in (ours, scripted):
        torch.manual_seed(7)
        outs.append(m(x)[0])
    assert torch.equal(outs[0], outs[1])
    scripted.eval()
    ours.eval()
    assert torch.equal(scripted(x)[0], ours(x)[0])
    assert not torch.equal(scripted(x)[0], outs[1])  # dropout acted in training mode


def test_script_float32_matches_eager(device):
    _, ours = _make("LSTM", device, torch.float32, num_layers=2, proj_size=P)
    scripted = torch.jit.script(ours)
    x = torch.randn(T, B, I, device=device)
    (o1, (h1, c1)), (o2, (h2, c2)) = scripted(x), ours(x)
    _assert_equal([o1, h1, c1], [o2, h2, c2])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_script_shares_parameters_and_runs_fusedrnn_ops(kind):
    _, ours = _make(kind, "cpu")
    scripted = torch.jit.script(ours)
    assert scripted.state_dict().keys() == ours.state_dict().keys()
    for name, p in ours.named_parameters():
        assert getattr(scripted, name).data_ptr() == p.data_ptr(), name
    graph = str(scripted.inlined_graph)
    op = "lstm" if kind.startswith("LSTM") else "gru"
    assert "fusedrnn::linear" in graph and f"fusedrnn::{op}_forward" in graph
    assert f"aten::{op}" not in graph
    x = torch.randn(T, B, I, dtype=torch.float64)
    if kind.endswith("Cell"):
        x = x[0]
    before = scripted(x)
    with torch.no_grad():
        next(ours.parameters()).add_(0.5)  # a training step on the eager module ...
    after = scripted(x)  # ... reaches the ScriptModule
    first = lambda r: r[0] if isinstance(r, tuple) else r  # noqa: E731
    assert not torch.equal(first(before), first(after))
    assert torch.equal(first(after), first(ours(x)))


def _jit_roundtrip(module):
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    buf.seek(0)
    return torch.jit.load(buf)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "GRU-classic", "LSTMCell", "GRUCell",
                                  "GRUCell-classic"])
def test_script_save_load(device, kind):
    kw = {} if kind.startswith(("LSTMCell", "GRUCell")) else dict(num_layers=2,
                                                                  bidirectional=True)
    _, ours = _make(kind, device, **kw)
    loaded = _jit_roundtrip(torch.jit.script(ours))
    x = torch.randn(T, B, I, device=device, dtype=torch.float64)
    if kind.startswith(("LSTMCell", "GRUCell")):
        x = x[0]
    le, ll = {"x": x.clone().requires_grad_()}, {"x": x.clone().requires_grad_()}
    _, want, want_g, w = outputs_and_grads(ours, (le["x"],), le)
    _, got, got_g, _ = outputs_and_grads(loaded, (ll["x"],), ll, w)
    _assert_equal(got, want)
    _assert_grads_equal(got_g, want_g)


# ------------------------------------------------------------------ a model holding them
class Seq2Seq(nn.Module):
    """Embedding, an LSTM encoder, a classic GRU over its output, a GRUCell and an
    LSTMCell stepped in a loop with the state carried, a Linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, I)
        self.encoder = fusedrnn.LSTM(I, H, num_layers=2, batch_first=True, proj_size=P)
        self.mixer = fusedrnn.GRU(P, H, batch_first=True, bidirectional=True, reset_after=False)
        self.cell = fusedrnn.GRUCell(2 * H, H)
        self.lstm_cell = fusedrnn.LSTMCell(H, H, bias=False)
        self.head = nn.Linear(H, 3)

    def forward(self, tokens: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        enc, (h, c) = self.encoder(self.embed(tokens), hx)
        mixed, _ = self.mixer(enc)
        state = torch.zeros(tokens.size(0), self.cell.hidden_size, dtype=mixed.dtype,
                            device=mixed.device)
        cell_state = (state, state)
        steps: List[Tensor] = []
        for t in range(mixed.size(1)):
            state = self.cell(mixed[:, t], state)
            cell_state = self.lstm_cell(state, cell_state)
            steps.append(cell_state[0])
        return self.head(torch.stack(steps, 1)) + h[-1].sum() + c[-1].sum()


def _model_inputs(device, batch=B, steps=T):
    tokens = torch.randint(0, 11, (batch, steps), device=device)
    hx = tuple(torch.randn(2, batch, n, device=device, dtype=torch.float64) for n in (P, H))
    return tokens, hx


def _model_grads(model, tokens, hx):
    out = model(tokens, hx)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3),
                          dtype=out.dtype).to(out.device)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad((out * weights).sum(), list(params.values()))
    return out, dict(zip(params, grads))


def test_script_model_matches_eager_and_saves(device):
    model = Seq2Seq().double().to(device)
    scripted = torch.jit.script(model)
    # The eager model is left as it was: scripting compiles, it does not swap modules.
    assert type(model.encoder) is fusedrnn.LSTM and type(model.cell) is fusedrnn.GRUCell
    tokens, hx = _model_inputs(device)
    want, want_g = _model_grads(model, tokens, hx)
    got, got_g = _model_grads(scripted, tokens, hx)
    _assert_equal([got], [want])
    _assert_grads_equal(got_g, want_g)
    loaded = _jit_roundtrip(scripted)
    got, got_g = _model_grads(loaded, tokens, hx)
    _assert_equal([got], [want])
    _assert_grads_equal(got_g, want_g)
    # Other sizes than the first call's, and without hx.
    tokens, _ = _model_inputs(device, batch=1, steps=T + 3)
    _assert_equal([loaded(tokens)], [model(tokens)])
    # Moves of the ScriptModule reach the weights the compiled code reads.
    model.float(), loaded.float()
    _assert_equal([loaded(tokens)], [model(tokens)])


def test_saved_script_loads_only_after_import_fusedrnn(tmp_path):
    """torch.jit.load needs fusedrnn's ops registered: `import fusedrnn` first."""
    path = str(tmp_path / "model.pt")
    model = Seq2Seq().double()
    torch.jit.save(torch.jit.script(model), path)
    tokens, hx = _model_inputs("cpu")
    want = model(tokens, hx).detach()
    torch.save((tokens, hx, want), str(tmp_path / "io.pt"))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    load = f"import torch; m = torch.jit.load({path!r})"
    bare = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env,
                          cwd=REPO)
    assert bare.returncode != 0 and "fusedrnn::" in bare.stderr, bare.stderr[-2000:]
    check = (f"import fusedrnn; {load}; t, hx, want = torch.load({str(tmp_path / 'io.pt')!r}); "
             "assert torch.equal(m(t, hx), want)")
    ok = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env,
                        cwd=REPO)
    assert ok.returncode == 0, ok.stderr[-2000:]


class Classifier(nn.Module):
    """README's example grown: an LSTM, its outputs pooled over the valid steps
    (mean, max of a packed batch, attention), a Linear head."""

    def __init__(self):
        super().__init__()
        self.lstm = fusedrnn.LSTM(I, H, batch_first=True)
        self.max = pooling.MaxPool(batch_first=True)
        self.attend = pooling.AttentionPool(H, hidden_size=4, batch_first=True)
        self.head = nn.Linear(3 * H, 3)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        mean = pooling.mean_pool(out, lengths, batch_first=True)
        packed = pack_padded_sequence(out, lengths, batch_first=True, enforce_sorted=False)
        pooled = [mean, self.max(packed), self.attend(out, lengths)]
        return self.head(torch.cat(pooled, 1))


def test_script_model_with_pooling_matches_eager(device):
    model = Classifier().double().to(device)
    scripted = torch.jit.script(model)
    x = torch.randn(3, T, I, device=device, dtype=torch.float64)
    lengths = torch.tensor([2, T, 1])  # the CPU, as pack_padded_sequence wants them
    le, ls = {"x": x.clone().requires_grad_()}, {"x": x.clone().requires_grad_()}
    _, want, want_g, w = outputs_and_grads(model, (le["x"], lengths), le)
    _, got, got_g, _ = outputs_and_grads(scripted, (ls["x"], lengths), ls, w)
    _assert_equal(got, want)
    _assert_grads_equal(got_g, want_g)
    bad = torch.tensor([2, T + 1, 1])
    with pytest.raises(ValueError) as eager:
        model(x, bad)
    with pytest.raises(torch.jit.Error) as compiled:
        scripted(x, bad)
    assert str(eager.value) in str(compiled.value)
    attend = torch.jit.script(model.attend)
    with pytest.raises(torch.jit.Error, match="return_weights=True is not supported"):
        attend(x[..., :H], lengths, True)


# ------------------------------------------------------------------ what does not script
RESTORE = "fusedrnn.restore_rnns(model)"


class PackingModel(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        return self.rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))[0]


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_script_packed_input_names_it_and_restore_rnns(kind):
    _, ours = _make(kind, "cpu")
    scripted = torch.jit.script(PackingModel(ours))
    x = torch.randn(T, 3, I, dtype=torch.float64)
    with pytest.raises(torch.jit.Error, match=r"(?s)PackedSequence input is not supported.*"
                                              + RESTORE.replace("(", r"\(").replace(")", r"\)")):
        scripted(x, torch.tensor([2, T, 3]))
    # Called from Python, a PackedSequence is refused by TorchScript's own
    # argument check (it converts no PackedSequence to the compiled type), naming it.
    packed = pack_padded_sequence(x, [2, T, 3], enforce_sorted=False)
    with pytest.raises(RuntimeError, match="PackedSequence"):
        torch.jit.script(ours)(packed)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_script_autocast_names_it_and_restore_rnns(kind):
    _, ours = _make(kind, "cpu", torch.float32)
    scripted = torch.jit.script(ours)
    x = torch.randn(T, B, I)
    if kind.endswith("Cell"):
        x = x[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(torch.jit.Error, match=r"(?s)autocast is not supported.*restore_rnns"):
            scripted(x)
        # float64 is never cast by autocast: that runs, as in eager mode.
        ours.double()
        out, want = scripted(x.double()), ours(x.double())
    first = lambda r: r[0] if isinstance(r, tuple) else r  # noqa: E731
    assert torch.equal(first(out), first(want))


def test_script_state_of_another_dtype_names_it_and_restore_rnns():
    _, ours = _make("LSTM", "cpu", torch.float32)
    scripted = torch.jit.script(ours)
    x = torch.randn(T, B, I)
    hx = (torch.zeros(1, B, H), torch.zeros(1, B, H, dtype=torch.float16))
    ours(x, hx)  # eager: accepted, as by torch.nn
    with pytest.raises(torch.jit.Error, match=r"(?s)hx\[1\] of dtype torch.float16.*restore_rnns"):
        scripted(x, hx)


def _scriptable_case(case):
    """Error cases of test_module_errors whose arguments a ScriptModule takes,
    but for a state of another dtype than the weights (refused when scripted:
    test_script_state_of_another_dtype_names_it_and_restore_rnns)."""
    name, kind, _, _, make_args, autocast, _ = case
    args = make_args()
    hx = args[1] if len(args) > 1 else None
    wrong_tuple = isinstance(hx, tuple) and (len(hx) != 2 or kind.startswith("GRU"))
    return (not autocast and torch.is_tensor(args[0]) and not wrong_tuple
            and name != "lstm-c0-wider-than-weights")


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in CASES
                                  if _scriptable_case(c)])
def test_script_bad_input_raises_the_eager_message(case):
    _, kind, kw, dtype, make_args, _, _ = case
    extra = dict(num_layers=2) if kind in ("LSTM", "GRU") else {}
    ours = getattr(fusedrnn, kind)(I, H, **extra, **kw).to(dtype)
    args = make_args()
    with pytest.raises(Exception) as eager:
        ours(*args)
    with pytest.raises(torch.jit.Error) as scripted:
        torch.jit.script(ours)(*args)
    assert str(eager.value) in str(scripted.value)


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in ACCEPTED
                                  if "empty-batch" in c[0]])
def test_script_empty_batch_matches_eager(case):
    """torch.nn takes an empty batch; so does the scripted module, with zero
    gradients (functional._layer's path for it)."""
    _, kind, kw, make_args = case
    extra = dict(num_layers=2) if kind in ("LSTM", "GRU") else {}
    ours = getattr(fusedrnn, kind)(I, H, **extra, **kw).double()
    scripted = torch.jit.script(ours)
    args = make_args()
    leaves = {"x": args[0].clone().requires_grad_()}
    lt = {"x": args[0].clone().requires_grad_()}
    _, want, want_g, w = outputs_and_grads(ours, (leaves["x"], *args[1:]), leaves)
    _, got, got_g, _ = outputs_and_grads(scripted, (lt["x"], *args[1:]), lt, w)
    _assert_equal(got, want)
    _assert_grads_equal(got_g, want_g)


# ------------------------------------------------------------------ trace
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "GRU-classic", "LSTMCell", "GRUCell"])
def test_trace_matches_eager(device, kind):
    """Traced (in grad mode or under no_grad, with trace's own check), saved and
    loaded: outputs and gradients of eager mode, at the traced sizes."""
    cell = kind.endswith("Cell")
    _, ours = _make(kind, device, **({} if cell else dict(num_layers=2, bidirectional=True)))
    ours.eval()
    shape = (B, I) if cell else (T, B, I)
    example = torch.randn(*shape, device=device, dtype=torch.float64)
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode):
            traced = _jit_roundtrip(torch.jit.trace(ours, (example,)))
        x = torch.randn(*shape, device=device, dtype=torch.float64)
        le, lt = {"x": x.clone().requires_grad_()}, {"x": x.clone().requires_grad_()}
        _, want, want_g, w = outputs_and_grads(ours, (le["x"],), le)
        _, got, got_g, _ = outputs_and_grads(traced, (lt["x"],), lt, w)
        _assert_equal(got, want)
        _assert_grads_equal(got_g, want_g)


def test_trace_model_matches_eager(device):
    model = Seq2Seq().double().to(device)
    tokens, hx = _model_inputs(device)
    traced = torch.jit.trace(model, (tokens, hx))
    tokens, hx = _model_inputs(device)
    want, want_g = _model_grads(model, tokens, hx)
    got, got_g = _model_grads(traced, tokens, hx)
    _assert_equal([got], [want])
    _assert_grads_equal(got_g, want_g)
