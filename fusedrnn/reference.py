"""The oracle: LSTM and GRU equations in plain torch ops, one Python step at a
time. Needs no extension; slow on purpose (it is read, not run in production).

Layer functions mirror the ops: they take the input projection
x_proj = x @ w_ih.T + b_ih for all steps, [T, B, G*H] or packed [N, G*H] with
`batch_sizes` (step t uses the first batch_sizes[t] rows), and run one
direction. Gate order is torch's: LSTM (i, f, g, o), GRU (r, z, n).
"""
import torch


def lstm_cell(xp, h, c, w_hh, b_hh=None, w_hr=None):
    """xp [B, 4H] (x W_ih^T + b_ih), h [B, P], c [B, H] -> (h', c')."""
    gates = xp + h @ w_hh.T
    if b_hh is not None:
        gates = gates + b_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if w_hr is not None:
        h = h @ w_hr.T
    return h, c


def gru_cell(xp, h, w_hh, b_hh=None, reset_after=True):
    """xp [B, 3H] (x W_ih^T + b_ih), h [B, H] -> h'.

    reset_after=True is torch's and cuDNN's form, n = tanh(x_n + r * (W_hn h + b_hn));
    False is the classic form (Cho et al.), n = tanh(x_n + W_hn (r * h) + b_hn).
    """
    H = h.shape[-1]
    b_hh = b_hh if b_hh is not None else xp.new_zeros(3 * H)
    xr, xz, xn = xp.chunk(3, dim=-1)
    w_rz, w_n = w_hh[: 2 * H], w_hh[2 * H:]
    hr, hz = (h @ w_rz.T + b_hh[: 2 * H]).chunk(2, dim=-1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    if reset_after:
        n = torch.tanh(xn + r * (h @ w_n.T + b_hh[2 * H:]))
    else:
        n = torch.tanh(xn + (r * h) @ w_n.T + b_hh[2 * H:])
    return (1 - z) * n + z * h


def _steps(x_proj, batch_sizes, reverse):
    """(rows, row offset) per time step, in processing order; and x_proj as 2-D."""
    if batch_sizes is None:
        T, B = x_proj.shape[:2]
        sizes = [B] * T
        flat = x_proj.reshape(T * B, -1)
    else:
        sizes = [int(b) for b in batch_sizes]
        flat = x_proj
    offsets, total = [], 0
    for b in sizes:
        offsets.append(total)
        total += b
    order = list(zip(sizes, offsets))
    return (order[::-1] if reverse else order), flat


def _run(step, x_proj, states, batch_sizes, reverse):
    """Runs `step(xp_rows, *state_rows) -> new states` over time. State rows
    beyond batch_sizes[t] are frozen, as in a PackedSequence."""
    order, flat = _steps(x_proj, batch_sizes, reverse)
    outs = {}
    states = list(states)
    for bt, off in order:
        new = step(flat[off:off + bt], *[s[:bt] for s in states])
        states = [torch.cat([n, s[bt:]]) for n, s in zip(new, states)]
        outs[off] = new[0]
    out = torch.cat([outs[off] for _, off in sorted(order, key=lambda o: o[1])])
    if batch_sizes is None:
        out = out.reshape(*x_proj.shape[:2], -1)
    return out, states


def lstm_layer(x_proj, h0, c0, w_hh, w_hr=None, b_hh=None, batch_sizes=None, reverse=False):
    """One LSTM layer and direction. Returns (output, h_n, c_n)."""
    out, (h, c) = _run(lambda xp, h, c: lstm_cell(xp, h, c, w_hh, b_hh, w_hr),
                       x_proj, (h0, c0), batch_sizes, reverse)
    return out, h, c


def gru_layer(x_proj, h0, w_hh, b_hh=None, batch_sizes=None, reverse=False, reset_after=True):
    """One GRU layer and direction. Returns (output, h_n)."""
    out, (h,) = _run(lambda xp, h: (gru_cell(xp, h, w_hh, b_hh, reset_after),),
                     x_proj, (h0,), batch_sizes, reverse)
    return out, h
