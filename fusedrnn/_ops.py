"""Loads the compiled ops and gives them fake (meta) kernels and autograd.

The ops (schemas in csrc/ops.cpp) each run one layer in one direction:

    lstm_forward(x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse, train)
        -> output, h_n, c_n, gates, cells
    gru_forward(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after, train)
        -> output, h_n, gates

x_proj = x @ w_ih.T + b_ih for all steps, [T, B, G*H] or packed [N, G*H] with
`batch_sizes` (PackedSequence layout, int64 on the CPU). `gates`/`cells` are
what backward needs; they are empty unless `train`. The same layers with the
regularisers of a LayerReg are their own ops (_reg_ops.py).
"""
import math

import torch

from . import _C  # noqa: F401  (registers the ops)
from ._autograd import graph_needed, register_autograd
from .regularisers import active

ops = torch.ops.fusedrnn

LSTM_GATES = 4
GRU_GATES = 3
GRU_SAVED = 4  # r, z, n and W_hn h + b_hn
# What ops._persistent_layout returns, in order (csrc/persistent/layout.h, Layout).
PERSISTENT_LAYOUT_FIELDS = ("blocks", "units", "n", "n_pad", "k", "k_pad", "kc", "chunks",
                            "buffers", "b_pad", "ldw", "lda", "ldacc", "w_off", "a_off",
                            "a_bytes", "acc_off", "part_off", "in_off", "in_bytes",
                            "bytes")


# The device the CPU emulator of the persistent kernel assumes: an H100's SM
# count and opt-in shared memory per block (kEmulatedBlocks and
# kEmulatedSmemBytes in csrc/persistent/emulate.cpp).
H100_SMS, H100_SMEM = 132, 232448


def persistent_layout(hidden, batch, gates, backward, mode, elt, acc_elt, max_blocks,
                      smem_limit, max_chunk=0):
    """The persistent kernel's shared-memory layout for these sizes, as a dict."""
    vals = ops._persistent_layout(hidden, batch, gates, backward, mode, elt, acc_elt,
                                  max_blocks, smem_limit, max_chunk)
    return dict(zip(PERSISTENT_LAYOUT_FIELDS, vals))


def _acc_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ------------------------------------------------------------------ fake kernels
@torch.library.register_fake("fusedrnn::lstm_forward")
def _lstm_forward_fake(x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse, train):
    H, P = w_hh.shape[0] // LSTM_GATES, w_hh.shape[1]
    N = math.prod(x_proj.shape[:-1])  # symbolic under export and compile
    out = x_proj.new_empty((*x_proj.shape[:-1], P))
    gates = x_proj.new_empty((N if train else 0, LSTM_GATES * H))
    cells = x_proj.new_empty((N if train else 0, H), dtype=_acc_dtype(x_proj.dtype))
    return out, h0.new_empty(h0.shape), c0.new_empty(c0.shape), gates, cells


@torch.library.register_fake("fusedrnn::lstm_backward")
def _lstm_backward_fake(grad_output, grad_h_n, grad_c_n, output, gates, cells, h0, c0, w_hh,
                        w_hr, batch_sizes, reverse, has_bias):
    G = w_hh.shape[0]
    return (grad_output.new_empty((*grad_output.shape[:-1], G)),
            h0.new_empty(h0.shape), c0.new_empty(c0.shape), w_hh.new_empty(w_hh.shape),
            w_hr.new_empty(w_hr.shape) if w_hr is not None else w_hh.new_empty((0,)),
            w_hh.new_empty((G if has_bias else 0,)))


@torch.library.register_fake("fusedrnn::gru_forward")
def _gru_forward_fake(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after, train):
    H = w_hh.shape[1]
    N = math.prod(x_proj.shape[:-1])  # symbolic under export and compile
    out = x_proj.new_empty((*x_proj.shape[:-1], H))
    gates = x_proj.new_empty((N if train else 0, GRU_SAVED * H))
    return out, h0.new_empty(h0.shape), gates


@torch.library.register_fake("fusedrnn::gru_backward")
def _gru_backward_fake(grad_output, grad_h_n, output, gates, h0, w_hh, batch_sizes, reverse,
                       reset_after, has_bias):
    G = w_hh.shape[0]
    return (grad_output.new_empty((*grad_output.shape[:-1], G)), h0.new_empty(h0.shape),
            w_hh.new_empty(w_hh.shape), w_hh.new_empty((G if has_bias else 0,)))


@torch.library.register_fake("fusedrnn::lstm_input_forward")
def _lstm_input_forward_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, train):
    x_proj = input.new_empty((*input.shape[:-1], w_ih.shape[0]))
    return _lstm_forward_fake(x_proj, h0, c0, w_hh, None, b_hh, None, reverse, train)


@torch.library.register_fake("fusedrnn::lstm_input_backward")
def _lstm_input_backward_fake(grad_output, grad_h_n, grad_c_n, input, output, gates, cells, h0,
                              c0, w_ih, w_hh, reverse, has_bias, input_grad, w_ih_grad,
                              b_ih_grad):
    d_xp, d_h0, d_c0, d_w_hh, _, d_b_hh = _lstm_backward_fake(
        grad_output, grad_h_n, grad_c_n, output, gates, cells, h0, c0, w_hh, None, None, reverse,
        has_bias)
    d_x, d_w_ih, d_b_ih = _linear_backward_fake(d_xp, input, w_ih, input_grad, w_ih_grad,
                                                b_ih_grad)
    return d_x, d_h0, d_c0, d_w_ih, d_w_hh, d_b_ih, d_b_hh


@torch.library.register_fake("fusedrnn::gru_input_forward")
def _gru_input_forward_fake(input, h0, w_ih, w_hh, b_ih, b_hh, reverse, reset_after, train):
    x_proj = input.new_empty((*input.shape[:-1], w_ih.shape[0]))
    return _gru_forward_fake(x_proj, h0, w_hh, b_hh, None, reverse, reset_after, train)


# ------------------------------------------------------------------ autograd
# Note [Double backward]
# The backward ops are not themselves differentiable. When autograd builds a
# graph of the backward (create_graph=True: gradient penalties, Hessian-vector
# products, torch.func transforms that nest), the gradients come instead from
# the reference's torch ops (one Python step per time step, slower), recomputed
# from the saved inputs, so that a second backward sees every dependence. The
# backward ops refuse a backward of their own (_refuse_backward) rather than
# return silently wrong values. Under torch.func, which always asks for a
# graph, only a graph that something outside the transform can see counts
# (graph_needed, Note [Autograd under torch.func] in _autograd.py).
def _reference_grads(layer, inputs, needs, outputs_grads):
    """Gradients of `layer(*inputs)` (a reference layer function) for the inputs
    with `needs`, given the output gradients, as a differentiable graph.
    Half types are computed in float32, as the kernels do."""
    acc = _acc_dtype(inputs[0].dtype)
    wanted = [t for t, n in zip(inputs, needs) if n and t is not None]
    with torch.enable_grad():
        up = [t.to(acc) if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs]
        outs = layer(*up)
        pairs = [(o, g) for o, g in zip(outs, outputs_grads) if g is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], wanted,
                                    [g.to(o.dtype) for o, g in pairs],
                                    create_graph=True, allow_unused=True)
    it = iter(grads)
    res = []
    for t, n in zip(inputs, needs):
        g = next(it) if n and t is not None else None
        if g is None and n and t is not None:
            g = torch.zeros_like(t)
        res.append(g)
    return res


def _lstm_setup_context(ctx, inputs, output):
    x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse, train = inputs
    out, _, _, gates, cells = output
    ctx.save_for_backward(out, gates, cells, x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes)
    ctx.reverse = reverse
    ctx.train = train
    # The saved gates and cells never get a gradient: no zeros of their size.
    ctx.set_materialize_grads(False)


def _or_zeros(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def _check_trained(ctx, name):
    if not ctx.train:
        raise RuntimeError(
            f"fusedrnn::{name} was called with train=False, so nothing was saved for "
            "backward; call it with train=True when a gradient is needed")


def _lstm_backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    out, gates, cells, x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes = ctx.saved_tensors
    grad_out, grad_h_n, grad_c_n = (_or_zeros(g, t) for g, t in
                                    ((grad_out, out), (grad_h_n, h0), (grad_c_n, c0)))
    _check_trained(ctx, "lstm_forward")
    inputs = (x_proj, h0, c0, w_hh, w_hr, b_hh)
    if graph_needed(grad_out, grad_h_n, grad_c_n, *inputs):
        from . import reference  # Note [Double backward]
        grads = _reference_grads(
            lambda *a: reference.lstm_layer(*a, batch_sizes=batch_sizes, reverse=ctx.reverse),
            inputs, ctx.needs_input_grad[:6], (grad_out, grad_h_n, grad_c_n))
        return (*grads, None, None, None)
    d_x, d_h0, d_c0, d_w_hh, d_w_hr, d_b_hh = ops.lstm_backward(
        grad_out, grad_h_n, grad_c_n, out, gates, cells, h0, c0, w_hh, w_hr, batch_sizes,
        ctx.reverse, b_hh is not None)
    return (d_x, d_h0, d_c0, d_w_hh, d_w_hr if w_hr is not None else None,
            d_b_hh if b_hh is not None else None, None, None, None)


def _gru_setup_context(ctx, inputs, output):
    x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after, train = inputs
    out, _, gates = output
    ctx.save_for_backward(out, gates, x_proj, h0, w_hh, b_hh, batch_sizes)
    ctx.reverse = reverse
    ctx.reset_after = reset_after
    ctx.train = train
    ctx.set_materialize_grads(False)  # as for the LSTM


def _gru_backward(ctx, grad_out, grad_h_n, _grad_gates):
    out, gates, x_proj, h0, w_hh, b_hh, batch_sizes = ctx.saved_tensors
    grad_out, grad_h_n = _or_zeros(grad_out, out), _or_zeros(grad_h_n, h0)
    _check_trained(ctx, "gru_forward")
    inputs = (x_proj, h0, w_hh, b_hh)
    if graph_needed(grad_out, grad_h_n, *inputs):
        from . import reference  # Note [Double backward]
        grads = _reference_grads(
            lambda *a: reference.gru_layer(*a, batch_sizes=batch_sizes, reverse=ctx.reverse,
                                           reset_after=ctx.reset_after),
            inputs, ctx.needs_input_grad[:4], (grad_out, grad_h_n))
        return (*grads, None, None, None, None)
    d_x, d_h0, d_w_hh, d_b_hh = ops.gru_backward(
        grad_out, grad_h_n, out, gates, h0, w_hh, batch_sizes, ctx.reverse, ctx.reset_after,
        b_hh is not None)
    return d_x, d_h0, d_w_hh, d_b_hh if b_hh is not None else None, None, None, None, None


def _refuse_setup_context(ctx, inputs, output):
    pass


def _refuse_backward(name):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"fusedrnn::{name} is not differentiable; differentiate through the forward op "
            "(its autograd builds a differentiable backward under create_graph=True)")
    return backward


for _name in ("lstm_backward", "gru_backward", "linear_backward"):
    register_autograd(f"fusedrnn::{_name}", _refuse_backward(_name), _refuse_setup_context)

register_autograd("fusedrnn::lstm_forward", _lstm_backward, _lstm_setup_context)
register_autograd("fusedrnn::gru_forward", _gru_backward, _gru_setup_context)


def needs_grad(*tensors):
    """Whether autograd will want a backward through these tensors. Always
    under torch.jit.trace: the answer is recorded as a constant, and the traced
    graph must serve calls with and without grad (trace's own check reruns it
    under no_grad)."""
    if torch.jit.is_tracing():
        return True
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)


def lstm_layer(x_proj, h0, c0, w_hh, w_hr=None, b_hh=None, batch_sizes=None, reverse=False,
               reg=None):
    """One LSTM layer and direction. Returns (output, h_n, c_n). reg: a
    fusedrnn.regularisers.LayerReg (layer norm, zoneout, recurrent dropout)."""
    if active(reg):
        return _reg_ops.lstm_layer(x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse, reg)
    train = needs_grad(x_proj, h0, c0, w_hh, w_hr, b_hh)
    out, h_n, c_n, _, _ = ops.lstm_forward(x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes,
                                           reverse, train)
    return out, h_n, c_n


def input_layer(lstm, input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, reset_after=True):
    """One plain layer and direction with its input projection, one op and one
    autograd node (Note [a layer and its projection in one node] in
    csrc/plain_ops.cpp): (output, h_n, c_n) or (output, h_n)."""
    if lstm:
        train = needs_grad(input, h0, c0, w_ih, w_hh, b_ih, b_hh)
        return ops.lstm_input_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, train)[:3]
    train = needs_grad(input, h0, w_ih, w_hh, b_ih, b_hh)
    return ops.gru_input_forward(input, h0, w_ih, w_hh, b_ih, b_hh, reverse, reset_after,
                                 train)[:2]


def gru_layer(x_proj, h0, w_hh, b_hh=None, batch_sizes=None, reverse=False, reset_after=True,
              reg=None):
    """One GRU layer and direction. Returns (output, h_n). reg: as for lstm_layer."""
    if active(reg):
        return _reg_ops.gru_layer(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after, reg)
    train = needs_grad(x_proj, h0, w_hh, b_hh)
    out, h_n, _ = ops.gru_forward(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after,
                                  train)
    return out, h_n


# ------------------------------------------------------------------ input projection
@torch.library.register_fake("fusedrnn::linear")
def _linear_fake(input, weight, bias):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.register_fake("fusedrnn::linear_backward")
def _linear_backward_fake(grad, input, weight, input_grad, weight_grad, bias_grad):
    return (input.new_empty(input.shape if input_grad else (0,)),
            weight.new_empty(weight.shape if weight_grad else (0,)),
            weight.new_empty((weight.shape[0],) if bias_grad else (0,)))


def _linear_setup_context(ctx, inputs, output):
    input, weight, bias = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None


def _linear_grads(grad, input, weight, need_x, need_w, need_b):
    """(d_input, d_weight, d_bias) of linear for the gradients asked for, None
    for the others (need_b: a bias exists and needs one)."""
    if not (need_x or need_w or need_b):
        return None, None, None
    # Note [Double backward]: torch's differentiable ops.
    if graph_needed(grad, input, weight):
        acc = _acc_dtype(input.dtype)
        g2, x2 = grad.flatten(0, -2), input.flatten(0, -2)
        return (grad @ weight if need_x else None,
                (g2.to(acc).T @ x2.to(acc)).to(weight.dtype) if need_w else None,
                g2.to(acc).sum(0).to(weight.dtype) if need_b else None)
    dx, dw, db = ops.linear_backward(grad, input, weight, need_x, need_w, need_b)
    return dx if need_x else None, dw if need_w else None, db if need_b else None


def _linear_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    return _linear_grads(grad, input, weight, need_x, need_w, need_b and ctx.has_bias)


register_autograd("fusedrnn::linear", _linear_backward, _linear_setup_context)


# The layers with their projection (Note [a layer and its projection in one
# node] in csrc/plain_ops.cpp): one node, the layer's backward op, then
# linear's; under Note [Double backward], the reference layer on F.linear.
# Where no torch.func transform is active the node is C++ (Note [a layer's
# autograd in C++] in csrc/layer_autograd.cpp), which calls the two
# *_reference_grads below for a graph.
def _lstm_input_reference_grads(input, h0, c0, w_ih, w_hh, b_ih, b_hh, grads, needs, reverse):
    from . import reference  # Note [Double backward]
    return _reference_grads(
        lambda x, h, c, wi, wh, bi, bh: reference.lstm_layer(
            torch.nn.functional.linear(x, wi, bi), h, c, wh, None, bh, reverse=reverse),
        (input, h0, c0, w_ih, w_hh, b_ih, b_hh), needs, grads)


def _gru_input_reference_grads(input, h0, w_ih, w_hh, b_ih, b_hh, grads, needs, reverse,
                               reset_after):
    from . import reference  # Note [Double backward]
    return _reference_grads(
        lambda x, h, wi, wh, bi, bh: reference.gru_layer(
            torch.nn.functional.linear(x, wi, bi), h, wh, bh, reverse=reverse,
            reset_after=reset_after),
        (input, h0, w_ih, w_hh, b_ih, b_hh), needs, grads)


def _lstm_input_setup_context(ctx, inputs, output):
    input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, train = inputs
    out, _, _, gates, cells = output
    ctx.save_for_backward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, out, gates, cells)
    ctx.reverse, ctx.train = reverse, train
    ctx.set_materialize_grads(False)  # as for lstm_forward


def _lstm_input_backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    input, h0, c0, w_ih, w_hh, b_ih, b_hh, out, gates, cells = ctx.saved_tensors
    grad_out, grad_h_n, grad_c_n = (_or_zeros(g, t) for g, t in
                                    ((grad_out, out), (grad_h_n, h0), (grad_c_n, c0)))
    _check_trained(ctx, "lstm_input_forward")
    inputs = (input, h0, c0, w_ih, w_hh, b_ih, b_hh)
    needs = ctx.needs_input_grad[:7]
    if graph_needed(grad_out, grad_h_n, grad_c_n, *inputs):
        return (*_lstm_input_reference_grads(*inputs, (grad_out, grad_h_n, grad_c_n), needs,
                                             ctx.reverse), None, None)
    d_xp, d_h0, d_c0, d_w_hh, _, d_b_hh = ops.lstm_backward(
        grad_out, grad_h_n, grad_c_n, out, gates, cells, h0, c0, w_hh, None, None, ctx.reverse,
        b_hh is not None)
    d_x, d_w_ih, d_b_ih = _linear_grads(d_xp, input, w_ih, needs[0], needs[3],
                                        needs[5] and b_ih is not None)
    return (d_x, d_h0, d_c0, d_w_ih, d_w_hh, d_b_ih, d_b_hh if b_hh is not None else None,
            None, None)


def _gru_input_setup_context(ctx, inputs, output):
    input, h0, w_ih, w_hh, b_ih, b_hh, reverse, reset_after, train = inputs
    out, _, gates = output
    ctx.save_for_backward(input, h0, w_ih, w_hh, b_ih, b_hh, out, gates)
    ctx.reverse, ctx.reset_after, ctx.train = reverse, reset_after, train
    ctx.set_materialize_grads(False)


def _gru_input_backward(ctx, grad_out, grad_h_n, _grad_gates):
    input, h0, w_ih, w_hh, b_ih, b_hh, out, gates = ctx.saved_tensors
    grad_out, grad_h_n = _or_zeros(grad_out, out), _or_zeros(grad_h_n, h0)
    _check_trained(ctx, "gru_input_forward")
    inputs = (input, h0, w_ih, w_hh, b_ih, b_hh)
    needs = ctx.needs_input_grad[:6]
    if graph_needed(grad_out, grad_h_n, *inputs):
        return (*_gru_input_reference_grads(*inputs, (grad_out, grad_h_n), needs, ctx.reverse,
                                            ctx.reset_after), None, None, None)
    d_xp, d_h0, d_w_hh, d_b_hh = ops.gru_backward(
        grad_out, grad_h_n, out, gates, h0, w_hh, None, ctx.reverse, ctx.reset_after,
        b_hh is not None)
    d_x, d_w_ih, d_b_ih = _linear_grads(d_xp, input, w_ih, needs[0], needs[2],
                                        needs[4] and b_ih is not None)
    return (d_x, d_h0, d_w_ih, d_w_hh, d_b_ih, d_b_hh if b_hh is not None else None,
            None, None, None)


register_autograd("fusedrnn::lstm_input_forward", _lstm_input_backward,
                  _lstm_input_setup_context)
register_autograd("fusedrnn::gru_input_forward", _gru_input_backward, _gru_input_setup_context)


def linear(input, weight, bias=None):
    """input [..., K] @ weight[N, K]^T + bias: the input projection of all steps,
    one GEMM (on AVX-512 CPUs in float32, fusedrnn's own; elsewhere ATen's)."""
    return ops.linear(input, weight, bias)


from . import _vmap  # noqa: E402,F401  (batching rules, Note [vmap by folding])
from . import _reg_ops  # noqa: E402  (the ops behind LayerReg)
