"""from_torch, replace_rnns and their inverses to_torch, restore_rnns; state_dict both
ways, torch.save/torch.load, copy.deepcopy, .to()/.double()/.half() and requires_grad."""
import copy
import io

import pytest
import torch
from torch import nn

import fusedrnn

from helpers import B, H, I, P, T, rel_err
from module_helpers import flat_outputs, fresh_leaves, outputs_and_grads, rnn_call_args, rnn_inputs

F64_TOL = 1e-10

SPECS = [
    ("LSTM", dict(), "lstm"),
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=P, batch_first=True, dropout=0.25),
     "lstm-full"),
    ("LSTM", dict(bias=False), "lstm-nobias"),
    ("GRU", dict(num_layers=3, bidirectional=True, dropout=0.5), "gru-full"),
    ("GRU", dict(bias=False, batch_first=True), "gru-nobias"),
    ("LSTMCell", dict(), "lstmcell"),
    ("GRUCell", dict(bias=False), "grucell-nobias"),
]
TORCH_MODULES = [pytest.param(lambda k=k, kw=kw: getattr(nn, k)(I, H, **kw), id=i)
                 for k, kw, i in SPECS]
CONFIG = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
          "bidirectional", "proj_size", "mode")


def _is_cell(m):
    return isinstance(m, nn.RNNCellBase)


def _call(m, device, dtype, seed=0):
    """m's outputs on fixed random inputs (cells: batched, with states; RNNs:
    packed with enforce_sorted=False, with states)."""
    g = torch.Generator(device=device).manual_seed(seed)
    if _is_cell(m):
        x = torch.randn(B, m.input_size, generator=g, device=device, dtype=dtype)
        h, c = torch.randn(2, B, m.hidden_size, generator=g, device=device, dtype=dtype)
        return flat_outputs(m(x, (h, c) if isinstance(m, nn.LSTMCell) else h))
    leaves = rnn_inputs(m, "packed_unsorted", True, device, dtype, generator=g)
    return flat_outputs(m(*rnn_call_args(m, "packed_unsorted", leaves)))


def _assert_same_outputs(a, b, device, dtype=torch.float64, tol=F64_TOL):
    """Same outputs in eval mode (training-mode dropout draws differ by design)."""
    modes = a.training, b.training
    for x, y in zip(_call(a.eval(), device, dtype), _call(b.eval(), device, dtype)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert rel_err(x, y) < tol
    a.train(modes[0]), b.train(modes[1])


# ------------------------------------------------------------------ from_torch
@pytest.mark.parametrize("make", TORCH_MODULES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_from_torch(device, make, dtype):
    ref = make().to(device, dtype)
    rng = torch.get_rng_state()
    twin = fusedrnn.from_torch(ref)
    assert torch.equal(rng, torch.get_rng_state())  # conversion draws no random numbers
    assert type(twin) is getattr(fusedrnn, type(ref).__name__)
    for attr in CONFIG:
        assert getattr(twin, attr, None) == getattr(ref, attr, None), attr
    assert list(twin.state_dict()) == list(ref.state_dict())
    for (n, a), (_, b) in zip(twin.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b) and a.dtype == b.dtype and a.device == b.device, n
        assert a.data_ptr() != b.data_ptr(), n  # a copy, not shared storage
    assert twin.training == ref.training
    _assert_same_outputs(twin, ref, device, dtype, tol=F64_TOL if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("make", TORCH_MODULES)
def test_from_torch_keeps_requires_grad_and_eval_mode(make):
    ref = make().eval()
    frozen = [n for i, (n, p) in enumerate(ref.named_parameters()) if i % 2 == 0]
    for n in frozen:
        getattr(ref, n).requires_grad_(False)
    twin = fusedrnn.from_torch(ref)
    assert not twin.training
    for n, p in twin.named_parameters():
        assert p.requires_grad == (n not in frozen), n
        assert isinstance(p, nn.Parameter)


def test_from_torch_rejects_other_modules():
    with pytest.raises(TypeError, match="expects torch.nn.LSTM, GRU, LSTMCell or GRUCell, got RNN"):
        fusedrnn.from_torch(nn.RNN(I, H))
    with pytest.raises(TypeError, match="already a fusedrnn module"):
        fusedrnn.from_torch(fusedrnn.GRU(I, H))


# ------------------------------------------------------------------ replace_rnns
class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(2 * H, H), nn.Tanh()),
                                     nn.ModuleDict({"cell": nn.GRUCell(H, H)})])

    def forward(self, x):
        out, _ = self.rnn(x)
        h = self.blocks[0](out)
        state = torch.zeros(x.size(0), H, dtype=x.dtype)
        for t in range(h.size(1)):
            state = self.blocks[1]["cell"](h[:, t], state)
        return state


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = _Encoder()
        self.decoder = nn.GRU(H, P + 2)
        self.cell = nn.LSTMCell(P + 2, H)
        self.shared = nn.LSTM(H, H)
        self.head = nn.Sequential(self.shared)  # the same module under two names

    def forward(self, x):
        z = self.encoder(x)
        out, h = self.decoder(z.unsqueeze(0).expand(3, -1, -1))
        hc = self.cell(out[-1])
        y, _ = self.shared(hc[0].unsqueeze(0))
        y2, _ = self.head[0](y)
        return y2.sum(0) + hc[1]


def test_replace_rnns_nested_model_gives_identical_outputs():
    model = _Model().double()
    ref = copy.deepcopy(model)
    x = torch.randn(B, T, I, dtype=torch.float64)
    others = {n: m for n, m in model.named_modules() if type(m) not in
              (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)}
    assert fusedrnn.replace_rnns(model) is model
    kinds = {n: type(m) for n, m in model.named_modules(remove_duplicate=False)}
    assert kinds["encoder.rnn"] is fusedrnn.LSTM
    assert kinds["encoder.blocks.1.cell"] is fusedrnn.GRUCell
    assert kinds["decoder"] is fusedrnn.GRU and kinds["cell"] is fusedrnn.LSTMCell
    assert not any(t in (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell) for t in kinds.values())
    # Shared weights stay shared: one twin under both names.
    assert model.shared is model.head[0]
    # Everything else is the same object.
    for n, m in model.named_modules():
        if n in others:
            assert m is others[n], n
    assert model.state_dict().keys() == ref.state_dict().keys()
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
    got, want = model(x), ref(x)
    assert rel_err(got, want) < F64_TOL
    params = list(model.parameters())
    ref_params = list(ref.parameters())
    for a, b in zip(torch.autograd.grad(got.square().sum(), params),
                    torch.autograd.grad(want.square().sum(), ref_params)):
        assert rel_err(a, b) < F64_TOL


def test_replace_rnns_on_an_rnn_returns_its_twin():
    lstm = nn.LSTM(I, H)
    twin = fusedrnn.replace_rnns(lstm)
    assert type(twin) is fusedrnn.LSTM
    _assert_same_outputs(twin, lstm, "cpu", torch.float32, tol=1e-5)


def test_replace_rnns_leaves_other_models_alone():
    model = nn.Sequential(nn.Linear(I, H), nn.RNN(H, H), fusedrnn.GRU(H, H))
    before = list(model)
    assert fusedrnn.replace_rnns(model) is model
    assert all(a is b for a, b in zip(model, before))


# ------------------------------------------------------------------ parametrized weights
def _parametrized(kind, **kw):
    """A float64 torch.nn module with weight_norm on its first weight_hh and
    spectral_norm on its first weight_ih (a power iteration per evaluation in
    training mode)."""
    from torch.nn.utils import parametrizations
    m = getattr(nn, kind)(I, H, **kw).double()
    cell = kind.endswith("Cell")
    parametrizations.weight_norm(m, name="weight_hh" if cell else "weight_hh_l0")
    parametrizations.spectral_norm(m, name="weight_ih" if cell else "weight_ih_l0")
    return m


def _train_steps(m, steps=3):
    """Outputs and every gradient over training steps (the parametrizations'
    state moves on with each)."""
    res = []
    for seed in range(steps):
        outs = _call(m.train(), "cpu", torch.float64, seed)
        res.append([*outs, *torch.autograd.grad(sum(o.square().sum() for o in outs),
                                                list(m.parameters()))])
    return res


@pytest.mark.parametrize("kind,kw", [("LSTM", dict(num_layers=2, bidirectional=True)),
                                     ("GRU", {}), ("LSTMCell", {}), ("GRUCell", {})],
                         ids=["lstm", "gru", "lstmcell", "grucell"])
def test_parametrized_modules_convert_both_ways(kind, kw):
    """from_torch of a module with parametrized weights gives the fusedrnn
    twin with the same parametrizations and their state (same state_dict);
    over training steps, outputs and gradients equal torch.nn's. to_torch
    takes it back; replace_rnns and restore_rnns convert it inside a model."""
    from torch.nn.utils import parametrize
    ref = _parametrized(kind, **kw)
    twin = fusedrnn.from_torch(copy.deepcopy(ref))
    assert isinstance(twin, getattr(fusedrnn, kind)) and parametrize.is_parametrized(twin)
    assert list(twin.state_dict()) == list(ref.state_dict())
    back = fusedrnn.to_torch(copy.deepcopy(twin))
    assert type(back).__bases__[0] is getattr(nn, kind)
    results = [_train_steps(m) for m in (ref, twin, back)]
    for steps in results[1:]:
        for got, want in zip(steps, results[0]):
            for a, e in zip(got, want):
                assert rel_err(a, e) <= F64_TOL
    model = nn.Sequential(_parametrized(kind, **kw), nn.Identity())
    fusedrnn.replace_rnns(model)
    assert isinstance(model[0], getattr(fusedrnn, kind))
    fusedrnn.restore_rnns(model)
    assert not isinstance(model[0], getattr(fusedrnn, kind))
    assert isinstance(model[0], getattr(nn, kind)) and parametrize.is_parametrized(model[0])


# ------------------------------------------------------------------ to_torch, restore_rnns
def _outputs_and_grads(m, device, dtype):
    """Every output and every gradient (inputs, states, parameters) of m on fixed random
    inputs (RNNs: packed with enforce_sorted=False)."""
    g = torch.Generator(device=device).manual_seed(3)
    if _is_cell(m):
        leaves = {"x": torch.randn(B, m.input_size, generator=g, device=device, dtype=dtype),
                  "h": torch.randn(B, m.hidden_size, generator=g, device=device, dtype=dtype)}
        if isinstance(m, nn.LSTMCell):
            leaves["c"] = torch.randn(B, m.hidden_size, generator=g, device=device, dtype=dtype)
        leaves = fresh_leaves(leaves)
        args = (leaves["x"], (leaves["h"], leaves["c"]) if "c" in leaves else leaves["h"])
    else:
        leaves = fresh_leaves(rnn_inputs(m, "packed_unsorted", True, device, dtype, generator=g))
        args = rnn_call_args(m, "packed_unsorted", leaves)
    _, outs, grads, _ = outputs_and_grads(m, args, leaves)
    return outs, grads


def _assert_torch_twin(back, fused, device, dtype, tol):
    """back (torch.nn) is fused's twin: same configuration, state_dict, flags, outputs
    and gradients."""
    assert type(back) is getattr(nn, type(fused).__name__)
    for attr in CONFIG:
        assert getattr(back, attr, None) == getattr(fused, attr, None), attr
    assert back.training == fused.training
    assert list(back.state_dict()) == list(fused.state_dict())
    for (n, a), (_, b) in zip(back.named_parameters(), fused.named_parameters()):
        assert torch.equal(a, b) and a.dtype == b.dtype and a.device == b.device, n
        assert a.data_ptr() != b.data_ptr(), n  # a copy, not shared storage
        assert isinstance(a, nn.Parameter), n
    training = back.training
    # Eval mode: inter-layer dropout would draw different masks (backward works in eval).
    got = _outputs_and_grads(back.eval(), device, dtype)
    want = _outputs_and_grads(fused.eval(), device, dtype)
    back.train(training), fused.train(training)
    for x, y in zip(got[0], want[0]):
        assert x.dtype == y.dtype and x.shape == y.shape and rel_err(x, y) < tol
    assert got[1].keys() == want[1].keys()
    for n in got[1]:
        assert rel_err(got[1][n], want[1][n]) < tol, n


@pytest.mark.parametrize("make", TORCH_MODULES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_to_torch_round_trip(device, make, dtype, training):
    """torch.nn -> fusedrnn -> torch.nn gives back the module: state_dict, flags, outputs
    and gradients; the torch.nn twin of a fusedrnn module computes what it computes."""
    ref = make().to(device, dtype).train(training)
    fused = fusedrnn.from_torch(ref)
    with torch.no_grad():  # fresh weights, so the round trip cannot pass by reusing ref's
        for p in fused.parameters():
            p.normal_(std=0.3)
    rng = torch.get_rng_state()
    back = fusedrnn.to_torch(fused)
    assert torch.equal(rng, torch.get_rng_state())  # conversion draws no random numbers
    tol = F64_TOL if dtype == torch.float64 else 1e-5
    _assert_torch_twin(back, fused, device, dtype, tol)
    again = fusedrnn.from_torch(back)
    assert again.state_dict().keys() == fused.state_dict().keys()
    for n, a in again.state_dict().items():
        assert torch.equal(a, fused.state_dict()[n]), n


@pytest.mark.parametrize("make", TORCH_MODULES)
def test_to_torch_keeps_requires_grad_and_eval_mode(make):
    fused = fusedrnn.from_torch(make()).eval()
    frozen = [n for i, (n, p) in enumerate(fused.named_parameters()) if i % 2 == 1]
    for n in frozen:
        getattr(fused, n).requires_grad_(False)
    back = fusedrnn.to_torch(fused)
    assert not back.training
    for n, p in back.named_parameters():
        assert p.requires_grad == (n not in frozen), n
        assert isinstance(p, nn.Parameter)


@pytest.mark.parametrize("kind", ["GRU", "GRUCell"])
def test_to_torch_refuses_the_classic_gru(kind):
    classic = getattr(fusedrnn, kind)(I, H, reset_after=False)
    with pytest.raises(ValueError, match=f"fusedrnn.{kind} with reset_after=False has no "
                                         "torch.nn equivalent"):
        fusedrnn.to_torch(classic)
    model = nn.Sequential(fusedrnn.LSTM(I, H), classic)
    before = list(model)
    with pytest.raises(ValueError, match="reset_after=False"):
        fusedrnn.restore_rnns(model)
    assert all(a is b for a, b in zip(model, before))  # refused before changing anything


def test_to_torch_rejects_other_modules():
    with pytest.raises(TypeError, match="expects fusedrnn.LSTM, GRU, LSTMCell or GRUCell, got RNN"):
        fusedrnn.to_torch(nn.RNN(I, H))
    with pytest.raises(TypeError, match="already a torch.nn module"):
        fusedrnn.to_torch(nn.GRU(I, H))


def test_restore_rnns_undoes_replace_rnns():
    """_Model -> replace_rnns -> (train the twins' weights away) -> restore_rnns: torch.nn
    modules again, at the same places, shared ones shared, with the fused model's weights,
    outputs and gradients."""
    model = _Model().double()
    torch_types = {n: type(m) for n, m in model.named_modules(remove_duplicate=False)}
    fusedrnn.replace_rnns(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fused = copy.deepcopy(model)
    others = {n: m for n, m in model.named_modules() if type(m) not in
              (fusedrnn.LSTM, fusedrnn.GRU, fusedrnn.LSTMCell, fusedrnn.GRUCell)}
    assert fusedrnn.restore_rnns(model) is model
    assert {n: type(m) for n, m in model.named_modules(remove_duplicate=False)} == torch_types
    assert model.shared is model.head[0]
    for n, m in model.named_modules():
        if n in others:
            assert m is others[n], n
    assert model.state_dict().keys() == fused.state_dict().keys()
    for (n, a), (_, b) in zip(model.state_dict().items(), fused.state_dict().items()):
        assert torch.equal(a, b), n
    x = torch.randn(B, T, I, dtype=torch.float64)
    got, want = model(x), fused(x)
    assert rel_err(got, want) < F64_TOL
    for a, b in zip(torch.autograd.grad(got.square().sum(), list(model.parameters())),
                    torch.autograd.grad(want.square().sum(), list(fused.parameters()))):
        assert rel_err(a, b) < F64_TOL


def test_restore_rnns_on_a_fused_rnn_returns_its_torch_twin():
    gru = fusedrnn.GRU(I, H, num_layers=2)
    back = fusedrnn.restore_rnns(gru)
    assert type(back) is nn.GRU
    _assert_same_outputs(back, gru, "cpu", torch.float32, tol=1e-5)


# ------------------------------------------------------------------ state_dict both ways
@pytest.mark.parametrize("kind,kw,_id", SPECS, ids=[i for *_, i in SPECS])
def test_state_dict_loads_both_ways(device, kind, kw, _id):
    ref = getattr(nn, kind)(I, H, **kw).to(device, torch.float64)
    ours = getattr(fusedrnn, kind)(I, H, **kw, device=device, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict(), strict=True)
    _assert_same_outputs(ours, ref, device)
    # And back: fresh weights in ours, loaded into torch.nn.
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ref.load_state_dict(ours.state_dict(), strict=True)
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n
    _assert_same_outputs(ours, ref, device)


# ------------------------------------------------------------------ save/load, deepcopy
@pytest.mark.parametrize("make", TORCH_MODULES)
def test_save_load_and_deepcopy(make):
    ours = fusedrnn.from_torch(make().double())
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is type(ours)
    _assert_same_outputs(loaded, ours, "cpu")

    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    fresh = copy.deepcopy(ours)
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    _assert_same_outputs(fresh, ours, "cpu")

    clone = copy.deepcopy(ours)
    assert type(clone) is type(ours)
    for a, b in zip(clone.parameters(), ours.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    _assert_same_outputs(clone, ours, "cpu")
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)  # independent copies
    assert not torch.equal(next(clone.parameters()), next(ours.parameters()))


# ------------------------------------------------------------------ dtype and device moves
@pytest.mark.parametrize("make", TORCH_MODULES)
@pytest.mark.parametrize("move", ["double", "half", "bfloat16", "to_float64"])
def test_dtype_moves(device, make, move):
    """After .double()/.half()/.bfloat16()/.to(dtype): parameters in the new
    dtype, outputs in torch.nn's dtype, values as close to a float64 run as a
    small multiple of torch.nn's own error in that dtype."""
    ref = make().to(device)
    ours = fusedrnn.from_torch(ref)
    moved = {"double": lambda m: m.double(), "half": lambda m: m.half(),
             "bfloat16": lambda m: m.bfloat16(), "to_float64": lambda m: m.to(torch.float64)}[move]
    exact = copy.deepcopy(ref).double()
    ref, ours = moved(ref), moved(ours)
    dtype = next(ref.parameters()).dtype
    assert all(p.dtype == dtype for p in ours.parameters())
    got, want = _call(ours.eval(), device, dtype), _call(ref.eval(), device, dtype)
    expected = _call(exact.eval(), device, torch.float64)
    for g, w, e in zip(got, want, expected):
        assert g.dtype == w.dtype == dtype
        if dtype == torch.float64:
            assert rel_err(g, w) < F64_TOL
        else:
            ours_err, theirs = rel_err(g, e), rel_err(w, e)
            assert ours_err <= 4 * theirs + torch.finfo(dtype).eps, (ours_err, theirs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to move to")
@pytest.mark.parametrize("make", TORCH_MODULES)
def test_device_moves(make):
    ours = fusedrnn.from_torch(make().double())
    ref = copy.deepcopy(ours)
    ours = ours.to("cuda")
    assert all(p.device.type == "cuda" for p in ours.parameters())
    twin = fusedrnn.from_torch(make().double().cuda())
    assert all(p.device.type == "cuda" for p in twin.parameters())
    for g, w in zip(_call(ours, "cuda", torch.float64), _call(ref, "cpu", torch.float64)):
        assert g.device.type == "cuda" and rel_err(g.cpu(), w) < F64_TOL
    ours.cpu()
    _assert_same_outputs(ours, ref, "cpu")
