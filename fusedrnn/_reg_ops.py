"""Fake kernels and autograd of the regularised ops (layer norm, zoneout,
recurrent dropout: fusedrnn/regularisers.py), and the layer functions that
call them; _ops.lstm_layer / gru_layer hand over a call whose LayerReg is active.

    lstm_reg_forward(x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse, train,
                     rec_mask, zone_h, zone_c, ln_hh, ln_c_w, ln_c_b, ln_ih, b_ih)
        -> output, h_n, c_n, gates, cells, cell_new, norm_hh, stats
    gru_reg_forward(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after, train,
                    rec_mask, zone_h, ln_hh, ln_ih, b_ih)
        -> output, h_n, gates, norm_hh, stats

The last fields of LayerReg's order follow `train`. What backward needs
(csrc/reg_lstm.h, csrc/reg_gru.h) is in the accumulation dtype (float32 for
half types); each has N rows (all steps) when train and its feature is on,
else none:
    gates     [N, 4H] i, f, g, o;  GRU: [N, 4H] r, z, n, hn
    cells     [N, H]  c_t, after zoneout
    cell_new  [N, H]  c~_t, before zoneout                     (zone_c)
    norm_hh   [N, G*H] LN(rec_mask * h_{t-1} W_hh^T)           (ln_hh)
    stats     [N, 5] rstd of LN(h W_hh^T), mean and rstd of the cell norm,
              mean and rstd of LN(x_proj); GRU: [N, 3] the first and the last
              two (any norm)
Backward also takes x_proj (with ln_ih it recomputes LN(x_proj) from it).
"""
import math

import torch

from ._autograd import graph_needed, register_autograd
from ._ops import (GRU_GATES, GRU_SAVED, LSTM_GATES, _acc_dtype, _or_zeros,
                   _reference_grads, _refuse_backward, _refuse_setup_context, needs_grad, ops)
from ._vmap import _loop
from .regularisers import LayerReg

LSTM_STATS = 5  # reg::kLstmStats in csrc/reg_rows.h
GRU_STATS = 3   # reg::kGruStats


def _saved(x_proj, rows, cols):
    return x_proj.new_empty((rows, cols), dtype=_acc_dtype(x_proj.dtype))


# ------------------------------------------------------------------ fake kernels
@torch.library.register_fake("fusedrnn::lstm_reg_forward")
def _lstm_reg_forward_fake(x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse, train,
                           rec_mask, zone_h, zone_c, ln_hh, ln_c_w, ln_c_b, ln_ih, b_ih):
    H, P = w_hh.shape[0] // LSTM_GATES, w_hh.shape[1]
    N = math.prod(x_proj.shape[:-1])  # symbolic under export and compile
    rows = lambda on: N if train and on else 0  # noqa: E731
    return (x_proj.new_empty((*x_proj.shape[:-1], P)), h0.new_empty(h0.shape),
            c0.new_empty(c0.shape),
            _saved(x_proj, rows(True), LSTM_GATES * H), _saved(x_proj, rows(True), H),
            _saved(x_proj, rows(zone_c is not None), H),
            _saved(x_proj, rows(ln_hh is not None), LSTM_GATES * H),
            _saved(x_proj, rows(any(g is not None for g in (ln_hh, ln_c_w, ln_ih))), LSTM_STATS))


def _grad_or_empty(like, on, shape=None):
    return like.new_empty(like.shape if shape is None else shape) if on else like.new_empty((0,))


@torch.library.register_fake("fusedrnn::lstm_reg_backward")
def _lstm_reg_backward_fake(grad_output, grad_h_n, grad_c_n, x_proj, output, gates, cells,
                            cell_new, norm_hh, stats, h0, c0, w_hh, w_hr, batch_sizes, reverse,
                            has_bias, rec_mask, zone_h, zone_c, ln_hh, ln_c_w, ln_c_b, ln_ih,
                            b_ih):
    G = w_hh.shape[0]
    H = G // LSTM_GATES
    return (grad_output.new_empty((*grad_output.shape[:-1], G)), h0.new_empty(h0.shape),
            c0.new_empty(c0.shape), w_hh.new_empty(w_hh.shape),
            _grad_or_empty(w_hh, w_hr is not None, w_hr.shape if w_hr is not None else None),
            _grad_or_empty(w_hh, has_bias, (G,)), _grad_or_empty(w_hh, ln_hh is not None, (G,)),
            _grad_or_empty(w_hh, ln_c_w is not None, (H,)),
            _grad_or_empty(w_hh, ln_c_b is not None, (H,)),
            _grad_or_empty(w_hh, ln_ih is not None, (G,)),
            _grad_or_empty(w_hh, b_ih is not None, (G,)))


@torch.library.register_fake("fusedrnn::gru_reg_forward")
def _gru_reg_forward_fake(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after, train,
                          rec_mask, zone_h, ln_hh, ln_ih, b_ih):
    H = w_hh.shape[1]
    N = math.prod(x_proj.shape[:-1])  # symbolic under export and compile
    rows = lambda on: N if train and on else 0  # noqa: E731
    return (x_proj.new_empty((*x_proj.shape[:-1], H)), h0.new_empty(h0.shape),
            _saved(x_proj, rows(True), GRU_SAVED * H),
            _saved(x_proj, rows(ln_hh is not None), GRU_GATES * H),
            _saved(x_proj, rows(ln_hh is not None or ln_ih is not None), GRU_STATS))


@torch.library.register_fake("fusedrnn::gru_reg_backward")
def _gru_reg_backward_fake(grad_output, grad_h_n, x_proj, output, gates, norm_hh, stats, h0,
                           w_hh, batch_sizes, reverse, reset_after, has_bias, rec_mask, zone_h,
                           ln_hh, ln_ih, b_ih):
    G = w_hh.shape[0]
    return (grad_output.new_empty((*grad_output.shape[:-1], G)), h0.new_empty(h0.shape),
            w_hh.new_empty(w_hh.shape), _grad_or_empty(w_hh, has_bias, (G,)),
            _grad_or_empty(w_hh, ln_hh is not None, (G,)),
            _grad_or_empty(w_hh, ln_ih is not None, (G,)),
            _grad_or_empty(w_hh, b_ih is not None, (G,)))


# ------------------------------------------------------------------ autograd
# Note [Double backward] (in _ops.py) holds here: under graph_needed the
# gradients come from the reference, with the same masks.
def _not_trained(name):
    return RuntimeError(
        f"fusedrnn::{name} was called with train=False, so nothing was saved for backward; "
        "call it with train=True when a gradient is needed")


def _reg_in(masks, gains, dtype):
    """A LayerReg for the reference in `dtype` (the masks are not differentiated)."""
    return LayerReg(*(None if m is None else m.to(dtype) for m in masks), *gains)


def _lstm_reg_setup_context(ctx, inputs, output):
    x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse, train, *reg = inputs
    out, _, _, *saved = output
    ctx.save_for_backward(out, *saved, x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, *reg)
    ctx.reverse, ctx.train = reverse, train
    ctx.set_materialize_grads(False)  # the saved tensors get no gradient


def _lstm_reg_backward(ctx, grad_out, grad_h_n, grad_c_n, *_grad_saved):
    (out, gates, cells, cell_new, norm_hh, stats, x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes,
     *reg) = ctx.saved_tensors
    if not ctx.train:
        raise _not_trained("lstm_reg_forward")
    grad_out, grad_h_n, grad_c_n = (_or_zeros(g, t) for g, t in
                                    ((grad_out, out), (grad_h_n, h0), (grad_c_n, c0)))
    masks, gains = reg[:3], reg[3:]
    inputs = (x_proj, h0, c0, w_hh, w_hr, b_hh, *gains)
    needs = ctx.needs_input_grad[:6] + ctx.needs_input_grad[12:]
    if graph_needed(grad_out, grad_h_n, grad_c_n, *inputs):
        from . import reference  # Note [Double backward]

        def layer(x, h, c, w, wr, b, *g):
            return reference.lstm_layer(x, h, c, w, wr, b, batch_sizes, ctx.reverse,
                                        _reg_in(masks, g, x.dtype))
        grads = _reference_grads(layer, inputs, needs, (grad_out, grad_h_n, grad_c_n))
        return (*grads[:6], None, None, None, None, None, None, *grads[6:])
    d = ops.lstm_reg_backward(grad_out, grad_h_n, grad_c_n, x_proj, out, gates, cells, cell_new,
                              norm_hh, stats, h0, c0, w_hh, w_hr, batch_sizes, ctx.reverse,
                              b_hh is not None, *reg)
    d_x, d_h0, d_c0, d_w_hh, *rest = d
    rest = [g if t is not None else None for g, t in zip(rest, (w_hr, b_hh, *gains))]
    return (d_x, d_h0, d_c0, d_w_hh, *rest[:2], None, None, None, None, None, None, *rest[2:])


def _gru_reg_setup_context(ctx, inputs, output):
    x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after, train, *reg = inputs
    out, _, *saved = output
    ctx.save_for_backward(out, *saved, x_proj, h0, w_hh, b_hh, batch_sizes, *reg)
    ctx.reverse, ctx.reset_after, ctx.train = reverse, reset_after, train
    ctx.set_materialize_grads(False)


def _gru_reg_backward(ctx, grad_out, grad_h_n, *_grad_saved):
    (out, gates, norm_hh, stats, x_proj, h0, w_hh, b_hh, batch_sizes, rec_mask, zone_h, ln_hh,
     ln_ih, b_ih) = ctx.saved_tensors
    if not ctx.train:
        raise _not_trained("gru_reg_forward")
    grad_out, grad_h_n = _or_zeros(grad_out, out), _or_zeros(grad_h_n, h0)
    inputs = (x_proj, h0, w_hh, b_hh, ln_hh, ln_ih, b_ih)
    needs = ctx.needs_input_grad[:4] + ctx.needs_input_grad[10:]
    if graph_needed(grad_out, grad_h_n, *inputs):
        from . import reference  # Note [Double backward]

        def layer(x, h, w, b, g, gi, bi):
            return reference.gru_layer(x, h, w, b, batch_sizes, ctx.reverse, ctx.reset_after,
                                       _reg_in((rec_mask, zone_h, None), (g, None, None, gi, bi),
                                               x.dtype))
        grads = _reference_grads(layer, inputs, needs, (grad_out, grad_h_n))
        return (*grads[:4], None, None, None, None, None, None, *grads[4:])
    d_x, d_h0, d_w_hh, *rest = ops.gru_reg_backward(
        grad_out, grad_h_n, x_proj, out, gates, norm_hh, stats, h0, w_hh, batch_sizes,
        ctx.reverse, ctx.reset_after, b_hh is not None, rec_mask, zone_h, ln_hh, ln_ih, b_ih)
    d_b_hh, d_ln_hh, d_ln_ih, d_b_ih = (
        g if t is not None else None for g, t in zip(rest, (b_hh, ln_hh, ln_ih, b_ih)))
    return (d_x, d_h0, d_w_hh, d_b_hh, None, None, None, None, None, None, d_ln_hh, d_ln_ih,
            d_b_ih)


for _name in ("lstm_reg_backward", "gru_reg_backward"):
    register_autograd(f"fusedrnn::{_name}", _refuse_backward(_name), _refuse_setup_context)
register_autograd("fusedrnn::lstm_reg_forward", _lstm_reg_backward, _lstm_reg_setup_context)
register_autograd("fusedrnn::gru_reg_forward", _gru_reg_backward, _gru_reg_setup_context)


def _looped(op):
    return lambda info, in_dims, *args: _loop(op, info, in_dims, args)


# Under vmap, one call per mapped copy: simple and right; folding the copies
# into the batch (Note [vmap by folding] in _vmap.py) is left undone here.
for _name in ("lstm_reg_forward", "lstm_reg_backward", "gru_reg_forward", "gru_reg_backward"):
    torch.library.register_vmap(f"fusedrnn::{_name}", _looped(getattr(ops, _name)))


# ------------------------------------------------------------------ layers
def _check_masks(reg):
    for name in ("rec_mask", "zone_h", "zone_c"):
        m = getattr(reg, name)
        if m is not None and torch.is_grad_enabled() and m.requires_grad:
            raise RuntimeError(f"fusedrnn: reg.{name} requires grad, but the masks of a LayerReg "
                               "are not differentiable (draw them without grad)")


def lstm_layer(x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse, reg):
    """_ops.lstm_layer with an active LayerReg `reg`: the fused op."""
    _check_masks(reg)
    train = needs_grad(x_proj, h0, c0, w_hh, w_hr, b_hh, reg.ln_hh, reg.ln_c_w, reg.ln_c_b,
                       reg.ln_ih, reg.b_ih)
    out, h_n, c_n, *_ = ops.lstm_reg_forward(x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes,
                                             reverse, train, *reg)
    return out, h_n, c_n


def gru_layer(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after, reg):
    """_ops.gru_layer with an active LayerReg `reg`: the fused op."""
    _check_masks(reg)
    if reg.zone_c is not None or reg.ln_c_w is not None or reg.ln_c_b is not None:
        raise ValueError("a GRU has no cell state: reg.zone_c, reg.ln_c_w and reg.ln_c_b "
                         "must be None")
    if (reg.ln_hh is not None or reg.ln_ih is not None) and not reset_after:
        raise ValueError("layer_norm needs the GRU form with reset_after=True")
    train = needs_grad(x_proj, h0, w_hh, b_hh, reg.ln_hh, reg.ln_ih, reg.b_ih)
    out, h_n, *_ = ops.gru_reg_forward(x_proj, h0, w_hh, b_hh, batch_sizes, reverse,
                                       reset_after, train, reg.rec_mask, reg.zone_h, reg.ln_hh,
                                       reg.ln_ih, reg.b_ih)
    return out, h_n
