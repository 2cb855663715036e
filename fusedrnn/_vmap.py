"""Batching rules (torch.vmap) for the ops.

Note [vmap by folding]
The recurrence of each sequence is independent of the others, so V mapped
copies of a call are one call with V times the batch, as long as the weights
are shared. The mapped dimension goes next to the batch, sequence-major:

    x_proj [T, B, G]   -> [T, B, V, G] -> [T, B*V, G]   (folded row = n*V + v,
    x_proj [N, G] packed -> [N, V, G] -> [N*V, G]        n the unmapped row)
    h0     [B, P]      -> [B, V, P]    -> [B*V, P]
    batch_sizes        -> batch_sizes * V

A PackedSequence stays valid (sequence j of step t is folded row j*V + v at
every step), and every result unfolds as a view with the mapped dimension
just before its last: out [T, B*V, P] -> [T, B, V, P] (out_dim 2), h_n, gates
and cells [rows*V, C] -> [rows, V, C] (out_dim 1). One kernel call for all V.

Where a weight or batch_sizes is mapped, and in the backward ops (whose
weight gradients are per copy: a folded call would sum them), the rule calls
the op once per copy and stacks the results.
"""
import torch

ops = torch.ops.fusedrnn


def _loop(op, info, in_dims, args):
    """op once per mapped copy, results stacked on dim 0."""
    results = [op(*(a if d is None else a.select(d, v) for a, d in zip(args, in_dims)))
               for v in range(info.batch_size)]
    if isinstance(results[0], torch.Tensor):
        return torch.stack(results), 0
    out = tuple(torch.stack(r) for r in zip(*results))
    return out, (0,) * len(out)


def _fold(t, d, V):
    """[*rows, C] with mapped dim d (None: shared) -> [*rows[:-1], rows[-1]*V, C]."""
    t = t.unsqueeze(-2).expand(*t.shape[:-1], V, t.shape[-1]) if d is None else t.movedim(d, -2)
    return t.reshape(*t.shape[:-3], t.shape[-3] * V, t.shape[-1])


def _unfold(t, V):
    """Inverse of _fold: [..., R*V, C] -> [..., R, V, C] (a view), and its out_dim."""
    return t.view(*t.shape[:-2], -1, V, t.shape[-1]), t.dim() - 1


def _unfold_all(results, V):
    pairs = [_unfold(t, V) for t in results]
    return tuple(t for t, _ in pairs), tuple(d for _, d in pairs)


def _lstm_forward_vmap(info, in_dims, x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse,
                       train):
    args = (x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse, train)
    if any(d is not None for d in in_dims[3:]):
        return _loop(ops.lstm_forward, info, in_dims, args)
    V = info.batch_size
    x, h, c = (_fold(t, d, V) for t, d in zip((x_proj, h0, c0), in_dims))
    bs = None if batch_sizes is None else batch_sizes * V
    return _unfold_all(ops.lstm_forward(x, h, c, w_hh, w_hr, b_hh, bs, reverse, train), V)


def _gru_forward_vmap(info, in_dims, x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after,
                      train):
    args = (x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after, train)
    if any(d is not None for d in in_dims[2:]):
        return _loop(ops.gru_forward, info, in_dims, args)
    V = info.batch_size
    x, h = (_fold(t, d, V) for t, d in zip((x_proj, h0), in_dims))
    bs = None if batch_sizes is None else batch_sizes * V
    return _unfold_all(ops.gru_forward(x, h, w_hh, b_hh, bs, reverse, reset_after, train), V)


def _linear_vmap(info, in_dims, input, weight, bias):
    if in_dims[1] is not None or in_dims[2] is not None:
        return _loop(ops.linear, info, in_dims, (input, weight, bias))
    return ops.linear(input.movedim(in_dims[0], 0), weight, bias), 0


def _linear_backward_vmap(info, in_dims, grad, input, weight, input_grad, weight_grad,
                          bias_grad):
    args = (grad, input, weight, input_grad, weight_grad, bias_grad)
    if weight_grad or bias_grad or in_dims[2] is not None:
        return _loop(ops.linear_backward, info, in_dims, args)
    V = info.batch_size
    g, x = (t.movedim(d, 0) if d is not None else t.expand(V, *t.shape)
            for t, d in zip((grad, input), in_dims))
    d_x, d_w, d_b = ops.linear_backward(g, x, weight, True, False, False)
    return (d_x, d_w, d_b), (0, None, None)


def _looped(op):
    return lambda info, in_dims, *args: _loop(op, info, in_dims, args)


for _name, _rule in (("lstm_forward", _lstm_forward_vmap), ("gru_forward", _gru_forward_vmap),
                     ("linear", _linear_vmap), ("linear_backward", _linear_backward_vmap),
                     ("lstm_backward", _looped(ops.lstm_backward)),
                     ("gru_backward", _looped(ops.gru_backward))):
    torch.library.register_vmap(f"fusedrnn::{_name}", _rule)
