"""The regularisers beyond torch.nn as options of the modules: their checks, the
LayerNorm parameters of each layer and direction, and what fusedrnn.functional
does with them around each op call (the input side of layer_norm, weight_drop,
and the masks and gains of a LayerReg; the definitions are in regularisers.py).

Options (keyword arguments of LSTM and GRU, off by default; the cells take
layer_norm, zoneout and, LSTMCell, zoneout_cell):

    layer_norm=True        Ba, Kiros and Hinton (2016), as in haste's LayerNormLSTM:
                           LN_GH(x W_ih^T) * gamma_ih + b_ih and LN_GH(h W_hh^T) * gamma_hh
                           + b_hh enter the gates; an LSTM's h = o tanh(LN_H(c) * gamma_c
                           + beta_c). GRU: torch's update from the two normalised sums.
    zoneout=p              Krueger et al. (2017): in training each unit of h_t keeps
                           h_{t-1} with probability p (a fresh draw per element and step);
                           in eval h_t = p h_{t-1} + (1 - p) h~_t.
    zoneout_cell=p         the same for an LSTM's c_t, with its own masks.
    recurrent_dropout=p    Gal and Ghahramani (2016): in training h_{t-1} is multiplied
                           by one mask m ~ Bernoulli(1 - p) / (1 - p) of shape [B, P]
                           where it enters W_hh, the same at every step.
    weight_drop=p          DropConnect on W_hh (AWD-LSTM): in training one mask on W_hh
                           per call, scaled by 1 / (1 - p).

Every mask comes from torch's generator of the input's device (torch.manual_seed
reproduces a run), one set per layer, direction and call; eval mode draws
nothing. With every option off (or p = 0, or eval mode for recurrent_dropout and
weight_drop) the op calls are the plain layer's: reg=None.
"""
import numbers
from typing import NamedTuple

import torch

from . import _ops
from .regularisers import LayerReg

RATES = ("zoneout", "zoneout_cell", "recurrent_dropout", "weight_drop")
OPTIONS = ("layer_norm",) + RATES
SEQUENCE_ONLY = ("recurrent_dropout", "weight_drop")  # not options of the cells
_EVENT = {"zoneout": "a hidden unit keeping its previous value",
          "zoneout_cell": "a cell unit keeping its previous value",
          "recurrent_dropout": "an element of the recurrent input being zeroed",
          "weight_drop": "an element of the recurrent weights being zeroed"}
LN_PREFIX = "layernorm_"


class Options(NamedTuple):
    """A module's regularisers (the defaults are torch.nn's layer)."""
    layer_norm: bool = False
    zoneout: float = 0.0
    zoneout_cell: float = 0.0
    recurrent_dropout: float = 0.0
    weight_drop: float = 0.0


_OPTION_DEFAULTS = tuple(zip(OPTIONS, Options()))


def options(module):
    """module's Options (the defaults for a module pickled before they existed)."""
    return Options(*[getattr(module, name, default) for name, default in _OPTION_DEFAULTS])


def any_on(opts):
    return opts != Options()


def non_default(opts):
    """{name: value} of the options that differ from torch.nn's layer."""
    return {n: v for n, v, d in zip(OPTIONS, opts, Options()) if v != d}


def repr_suffix(module):
    """What extra_repr adds to torch's: the options beyond torch.nn that are not
    their defaults (reset_after=False, then the regularisers)."""
    s = "" if getattr(module, "reset_after", True) else ", reset_after=False"
    return s + "".join(f", {k}={v}" for k, v in non_default(options(module)).items())


def _rate(name, p):
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
        raise ValueError(f"{name} should be a number in range [0, 1) representing the "
                         f"probability of {_EVENT[name]}")
    return float(p)


def configure(module, lstm, cell, layer_norm, zoneout, zoneout_cell=0.0,
              recurrent_dropout=0.0, weight_drop=0.0):
    """Checks the options, stores them on `module` (an LSTM, GRU or cell that
    torch's __init__ has built) and registers and initialises its LayerNorm
    parameters. Raises ValueError for what has no definition here."""
    name = type(module).__name__
    opts = Options(bool(layer_norm), _rate("zoneout", zoneout),
                   _rate("zoneout_cell", zoneout_cell),
                   _rate("recurrent_dropout", recurrent_dropout),
                   _rate("weight_drop", weight_drop))
    if opts.layer_norm and getattr(module, "proj_size", 0) > 0:
        raise ValueError(f"{name}: layer_norm=True with proj_size > 0 is not supported "
                         "(layer normalisation is defined for h without projection)")
    if opts.layer_norm and not getattr(module, "reset_after", True):
        raise ValueError(f"{name}: layer_norm=True needs reset_after=True (the layer-normalised "
                         "GRU is defined on torch's form, r applied to W_hn h + b_hn)")
    for attr, value in zip(OPTIONS, opts):
        setattr(module, attr, value)
    if opts.layer_norm:
        _add_ln_parameters(module, lstm, cell)


def refuse_on_cell(name, lstm, kwargs):
    """A cell's unknown keyword arguments: a clear TypeError for the sequence
    options, Python's own for anything else."""
    for key in kwargs:
        if key in SEQUENCE_ONLY:
            raise TypeError(
                f"fusedrnn.{name} has no {key}: a cell call is one step, and {key} keeps one "
                f"mask for a whole sequence; use fusedrnn.{'LSTM' if lstm else 'GRU'}, or draw "
                "the mask once per sequence and apply it yourself")
        raise TypeError(f"{name}.__init__() got an unexpected keyword argument '{key}'")


def refuse_zoneout_cell(name):
    raise ValueError(f"fusedrnn.{name} has no zoneout_cell: a GRU has no cell state "
                     "(zoneout applies to h)")


# ------------------------------------------------------------------ LayerNorm parameters
def _ln_shapes(lstm, G, H):
    """(name, size, initial value) of one layer and direction's parameters."""
    shapes = [("ih_weight", G * H, 1.0), ("hh_weight", G * H, 1.0)]
    if lstm:
        shapes += [("c_weight", H, 1.0), ("c_bias", H, 0.0)]
    return shapes


def _suffixes(module, cell):
    if cell:
        return [""]
    dirs = ["", "_reverse"] if module.bidirectional else [""]
    return [f"_l{layer}{d}" for layer in range(module.num_layers) for d in dirs]


def _add_ln_parameters(module, lstm, cell):
    """layernorm_{ih,hh}_weight (G*H), for LSTM layernorm_c_{weight,bias} (H), per
    layer and direction with torch's suffixes (_l{k}[_reverse]; none on a cell)."""
    w = module.weight_ih if cell else module.weight_ih_l0
    G, H = w.shape[0] // module.hidden_size, module.hidden_size
    for sfx in _suffixes(module, cell):
        for what, size, _ in _ln_shapes(lstm, G, H):
            module.register_parameter(f"{LN_PREFIX}{what}{sfx}", torch.nn.Parameter(
                torch.empty(size, device=w.device, dtype=w.dtype)))
    reset_layer_norm(module)


def reset_layer_norm(module):
    """Gains to ones, biases to zeros: the LayerNorm parameters' initial values,
    which torch's reset_parameters (uniform over every parameter) overwrites."""
    with torch.no_grad():
        for name, p in module.named_parameters(recurse=False):
            if name.startswith(LN_PREFIX):
                p.fill_(0.0 if "_bias" in name else 1.0)


def ln_weights(module, lstm, cell):
    """Per layer and direction (torch's order), (gamma_ih, gamma_hh, gamma_c,
    beta_c) (None for a GRU's last two); None without layer_norm."""
    if not getattr(module, "layer_norm", False):
        return None
    get = lambda n: getattr(module, LN_PREFIX + n)  # noqa: E731
    return [(get(f"ih_weight{s}"), get(f"hh_weight{s}"),
             get(f"c_weight{s}") if lstm else None, get(f"c_bias{s}") if lstm else None)
            for s in _suffixes(module, cell)]


def is_ln_parameter(name):
    return name.rsplit(".", 1)[-1].startswith(LN_PREFIX)


# ------------------------------------------------------------------ per op call
def draw(shape, p, like):
    """A mask of `shape` that is 1 with probability p, else 0, in like's dtype
    and on its device, from torch's generator. Every mask is drawn here.

    As u < p for u uniform on [0, 1) in float32, which is 1 with probability p
    rounded up to a multiple of 2^-24: on the CPU in half of bernoulli_'s time
    (0.90 against 1.77 ms for [100, 16, 256], 2-core AMD EPYC), which was most
    of zoneout's cost in training."""
    u = torch.rand(shape, device=like.device)
    return u.lt_(p) if like.dtype == u.dtype else (u < p).to(like.dtype)


def drop_weight(w_hh, p, training):
    """weight_drop: W_hh * m / (1 - p), m ~ Bernoulli(1 - p) per element, in training."""
    if not training or p == 0:
        return w_hh
    return w_hh * draw(w_hh.shape, 1 - p, w_hh) / (1 - p)


def project(x, w_ih, b_ih, ln):
    """The input projection of all steps: x W_ih^T + b_ih; with layer_norm
    (ln: this layer and direction's ln_weights) x W_ih^T alone, which the op
    normalises (layer_reg hands it gamma_ih and b_ih)."""
    return _ops.linear(x, w_ih, b_ih if ln is None else None)


def layer_reg(opts, training, x_proj, h0, c0, ln, b_ih=None):
    """The LayerReg of one op call, or None when it would ask for nothing.

    x_proj [T, B, G*H] or packed [N, G*H] (from project); h0 [B, P]; c0 [B, H]
    (None for a GRU); ln and b_ih as for project. In training the masks are
    drawn in this order: zone_h, zone_c, rec_mask (after drop_weight's, which
    functional draws first)."""
    def zone(p, size):
        if p == 0:
            return None
        lead = tuple(x_proj.shape[:-1])
        if training:
            return draw(lead + (size,), p, x_proj)
        return x_proj.new_full(lead + (size,), p)  # the expectation; no randomness

    P = h0.shape[-1]
    zone_h = zone(opts.zoneout, P)
    zone_c = zone(opts.zoneout_cell, c0.shape[-1]) if c0 is not None else None
    rec_mask = None
    p = opts.recurrent_dropout
    if training and p > 0:
        rec_mask = draw((h0.shape[0], P), 1 - p, x_proj) / (1 - p)
    if ln is None and zone_h is None and zone_c is None and rec_mask is None:
        return None  # the plain layer
    ln_ih, ln_hh, ln_c_w, ln_c_b = (None,) * 4 if ln is None else ln
    return LayerReg(rec_mask, zone_h, zone_c, ln_hh, ln_c_w, ln_c_b, ln_ih,
                    None if ln is None else b_ih)
