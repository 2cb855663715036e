"""What is run and compared: torch.nn and fusedrnn twins with the same weights
and inputs, the step functions that are timed, the pure-Python reference, and
the parity check against a float64 oracle.

Shapes: x [T, B, I] (time-major), h0/c0 [1, B, H], output [T, B, H].
"""
import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from fusedrnn import reference

MODELS = {"LSTM": nn.LSTM, "GRU": nn.GRU}
MODES = ("inference", "training")

# Note [parity tolerance]
# The oracle is torch.nn itself in float64, with the same weights and inputs
# upcast (for bfloat16/float16 rows, the rounded weights upcast, so weight
# rounding is not counted as error). For every compared tensor
#     err(y) = max|y - y64| / max|y64|          (normwise relative, max norm)
# and a row passes when, for every tensor,
#     err(fusedrnn) <= max(PARITY_MULTIPLE * err(torch.nn), PARITY_FLOOR[precision]),
# i.e. fusedrnn may be at most a small multiple of torch.nn's own error at that
# precision (never a guessed wide tolerance), with a floor for rows where
# torch.nn happens to be nearly exact. float32's floor is the project's 1e-5 contract.
PARITY_MULTIPLE = 4.0
PARITY_FLOOR = {"float64": 1e-10, "float32": 1e-5, "tf32": 2e-3, "float16": 5e-3,
                "bfloat16": 2e-2}
_TINY = 1e-30
H_STATE_SCALE = 0.5  # h0/c0 ~ 0.5 N(0, 1): a nonzero initial state is exercised too


@contextlib.contextmanager
def tf32_setting(device, allow):
    """TF32 for cuBLAS matmuls and cuDNN alike (what cuDNN RNNs and ATen's GEMMs
    in fusedrnn's CUDA path follow), restored afterwards. Uses the legacy
    flags only: torch maps them onto the fp32_precision settings, while mixing
    the two APIs raises."""
    if device != "cuda":
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class Case:
    """torch.nn module, its fusedrnn twin and the inputs of one row.

    Weights and inputs are drawn in float32 on the CPU from `seed`, then cast
    and moved, so every precision and device sees the same values."""

    def __init__(self, model, cfg, precision, device, seed):
        self.model, self.cfg, self.precision, self.device = model, cfg, precision, device
        self.lstm = model == "LSTM"
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        mod = MODELS[model](cfg.I, cfg.H)
        self.torch_mod = mod.to(device=device, dtype=precision.dtype)
        self.fused_mod = fusedrnn.from_torch(self.torch_mod)
        like = dict(device=device, dtype=precision.dtype)
        self.x = torch.randn(cfg.T, cfg.B, cfg.I, generator=gen).to(**like)
        self.h0 = (H_STATE_SCALE * torch.randn(1, cfg.B, cfg.H, generator=gen)).to(**like)
        self.c0 = (H_STATE_SCALE * torch.randn(1, cfg.B, cfg.H, generator=gen)).to(**like)
        # A fixed random weighting of the output: loss = (output * grad_out).sum().
        self.grad_out = torch.randn(cfg.T, cfg.B, cfg.H, generator=gen).to(**like)
        # A config tagged "packed" runs PackedSequence input: lengths from T/2 to T,
        # one of them T, unsorted (pack_padded_sequence(enforce_sorted=False)).
        self.lengths = None
        if "packed" in cfg.tags:
            self.lengths = torch.randint(cfg.T // 2, cfg.T + 1, (cfg.B,), generator=gen)
            self.lengths[0] = cfg.T
            self.grad_out = self._pack(self.grad_out).data

    # -- inputs -----------------------------------------------------------------
    def _inputs(self, grad):
        x, h0, c0 = (t.detach().requires_grad_(grad) for t in (self.x, self.h0, self.c0))
        return x, h0, c0

    def _hx(self, h0, c0):
        return (h0, c0) if self.lstm else h0

    def _pack(self, x):
        """x itself, or packed (a config tagged "packed")."""
        if self.lengths is None:
            return x
        return pack_padded_sequence(x, self.lengths, enforce_sorted=False)

    def _call(self, mod, x, hx):
        """(output, h_n) of mod on x, packed where the config says; output as a
        tensor (a PackedSequence's data)."""
        out, hn = mod(self._pack(x), hx)
        return (out if self.lengths is None else out.data), hn

    # -- step functions (what is timed) ------------------------------------------
    def step(self, which, mode):
        """A no-argument function running one inference or training step of
        'torch', 'fused' or 'reference'. Training = forward + backward of the
        weighted output sum, grads of input, initial state and weights, grads
        set to None before each step."""
        if which == "reference":
            return self._reference_step(mode)
        mod = self.torch_mod if which == "torch" else self.fused_mod
        if mode == "inference":
            mod.eval()
            x, h0, c0 = self._inputs(False)
            hx = self._hx(h0, c0)

            def run():
                with torch.inference_mode():
                    self._call(mod, x, hx)
            return run
        mod.train()
        x, h0, c0 = self._inputs(True)
        hx, leaves, g = self._hx(h0, c0), [x, h0, c0, *mod.parameters()], self.grad_out

        def run():
            for t in leaves:
                t.grad = None
            out, _ = self._call(mod, x, hx)
            out.backward(g)
        return run

    def _reference_forward(self, x, h0, c0):
        m = self.torch_mod
        x_proj = F.linear(x, m.weight_ih_l0, m.bias_ih_l0)
        if self.lstm:
            return reference.lstm_layer(x_proj, h0[0], c0[0], m.weight_hh_l0, None,
                                        m.bias_hh_l0)[0]
        return reference.gru_layer(x_proj, h0[0], m.weight_hh_l0, m.bias_hh_l0)[0]

    def _reference_step(self, mode):
        """fusedrnn.reference (one Python step per time step) with torch.nn's
        weights; the input projection is one GEMM, as in the fused path."""
        if mode == "inference":
            x, h0, c0 = self._inputs(False)

            def run():
                with torch.inference_mode():
                    self._reference_forward(x, h0, c0)
            return run
        x, h0, c0 = self._inputs(True)
        leaves = [x, h0, c0, *self.torch_mod.parameters()]

        def run():
            for t in leaves:
                t.grad = None
            self._reference_forward(x, h0, c0).backward(self.grad_out)
        return run

    # -- parity -----------------------------------------------------------------
    def _results(self, mod, mode, dtype=None):
        """{name: tensor} of one step: output, h_n (and c_n); in training also
        the grads of x, h0 (c0) and every weight."""
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        x, h0, c0 = (cast(t) for t in self._inputs(False))
        if mode == "inference":
            mod.eval()
            with torch.inference_mode():
                out, hn = self._call(mod, x, self._hx(h0, c0))
            return self._named(out, hn)
        mod.train()
        x, h0, c0 = (t.requires_grad_() for t in (x, h0, c0))
        mod.zero_grad(set_to_none=True)
        out, hn = self._call(mod, x, self._hx(h0, c0))
        out.backward(cast(self.grad_out))
        res = self._named(out, hn)
        res.update({"grad_x": x.grad, "grad_h0": h0.grad})
        if self.lstm:
            res["grad_c0"] = c0.grad
        res.update({"grad_" + n: p.grad for n, p in mod.named_parameters()})
        mod.zero_grad(set_to_none=True)
        return {k: v.detach() for k, v in res.items()}

    def _named(self, out, hn):
        if self.lstm:
            return {"output": out, "h_n": hn[0], "c_n": hn[1]}
        return {"output": out, "h_n": hn}

    def oracle(self, mode="training"):
        """torch.nn in float64 on the same device; a training step's results
        (forward results and all grads) serve both modes."""
        mod64 = copy.deepcopy(self.torch_mod).double()
        with tf32_setting(self.device, False):
            return self._results(mod64, mode, torch.float64)

    def parity(self, mode, oracle):
        """Compares torch.nn and fusedrnn against the oracle (Note [parity
        tolerance]); returns a JSON-able dict with 'passed'."""
        got_t = self._results(self.torch_mod, mode)
        got_f = self._results(self.fused_mod, mode)
        floor = PARITY_FLOOR[self.precision.name]
        worst, passed = None, True
        for name, want in ((k, oracle[k]) for k in got_t):
            e_t, e_f = rel_err(got_t[name], want), rel_err(got_f[name], want)
            allowed = max(PARITY_MULTIPLE * e_t, floor)
            ok = e_f <= allowed  # False for NaN
            passed &= ok
            score = e_f / allowed
            if not ok and not score > 1:  # NaN
                score = float("inf")
            if worst is None or score > worst[0]:
                worst = (score, {"tensor": name, "fused_err": e_f, "torch_err": e_t,
                                 "allowed": allowed})
        return {"passed": bool(passed), **worst[1]}


def rel_err(got, want):
    got, want = got.double(), want.double()
    if got.shape != want.shape:
        return float("inf")
    diff = (got - want).abs().max().item()
    return diff / max(want.abs().max().item(), _TINY) if diff == diff else float("nan")
