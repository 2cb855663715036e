"""The oracle: LSTM and GRU equations in plain torch ops, one Python step at a
time. Needs no extension; slow on purpose (it is read, not run in production).

Layer functions mirror the ops: they take the input projection
x_proj = x @ w_ih.T + b_ih for all steps, [T, B, G*H] or packed [N, G*H] with
`batch_sizes` (step t uses the first batch_sizes[t] rows), and run one
direction. Gate order is torch's: LSTM (i, f, g, o), GRU (r, z, n).
Their `reg` (a fusedrnn.regularisers.LayerReg) adds layer normalisation,
zoneout and recurrent dropout, with the definitions written there (with
reg.ln_ih, x_proj is x @ w_ih.T alone and the layer normalises it).
"""
import torch
import torch.nn.functional as F

from .regularisers import LN_EPS, LayerReg


def _ln(v, gain):
    """LN over the last dimension without affine, times gain (layer_norm)."""
    return F.layer_norm(v, v.shape[-1:], eps=LN_EPS) * gain


def lstm_cell(xp, h, c, w_hh, b_hh=None, w_hr=None, reg=LayerReg()):
    """xp [B, 4H] (x W_ih^T + b_ih), h [B, P], c [B, H] -> (h', c').
    reg's masks are this step's rows (zone_h [B, P], zone_c [B, H])."""
    rec = h if reg.rec_mask is None else reg.rec_mask * h
    rec = rec @ w_hh.T
    gates = xp + (rec if reg.ln_hh is None else _ln(rec, reg.ln_hh))
    if b_hh is not None:
        gates = gates + b_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    cn = c_new if reg.ln_c_w is None else _ln(c_new, reg.ln_c_w) + reg.ln_c_b
    h_new = torch.sigmoid(o) * torch.tanh(cn)
    if w_hr is not None:
        h_new = h_new @ w_hr.T
    if reg.zone_h is not None:
        h_new = reg.zone_h * h + (1 - reg.zone_h) * h_new
    if reg.zone_c is not None:
        c_new = reg.zone_c * c + (1 - reg.zone_c) * c_new
    return h_new, c_new


def gru_cell(xp, h, w_hh, b_hh=None, reset_after=True, reg=LayerReg()):
    """xp [B, 3H] (x W_ih^T + b_ih), h [B, H] -> h'.

    reset_after=True is torch's and cuDNN's form, n = tanh(x_n + r * (W_hn h + b_hn));
    False is the classic form (Cho et al.), n = tanh(x_n + W_hn (r * h) + b_hn).
    reg as for lstm_cell; layer_norm (reg.ln_hh) needs reset_after.
    """
    H = h.shape[-1]
    b_hh = b_hh if b_hh is not None else xp.new_zeros(3 * H)
    xr, xz, xn = xp.chunk(3, dim=-1)
    hm = h if reg.rec_mask is None else reg.rec_mask * h
    if reset_after:
        a_h = hm @ w_hh.T
        a_h = (a_h if reg.ln_hh is None else _ln(a_h, reg.ln_hh)) + b_hh
        hr, hz, hn = a_h.chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
    else:
        if reg.ln_hh is not None:
            raise ValueError("layer_norm needs the GRU form with reset_after=True")
        w_rz, w_n = w_hh[: 2 * H], w_hh[2 * H:]
        hr, hz = (hm @ w_rz.T + b_hh[: 2 * H]).chunk(2, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + (r * hm) @ w_n.T + b_hh[2 * H:])
    h_new = (1 - z) * n + z * h
    if reg.zone_h is not None:
        h_new = reg.zone_h * h + (1 - reg.zone_h) * h_new
    return h_new


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


def _step_reg(reg, off, bt):
    """This step's rows of reg: the zone masks' rows at x_proj's, rec_mask's first bt."""
    if reg is None:
        return LayerReg()
    rows = lambda m: None if m is None else m.reshape(-1, m.shape[-1])[off:off + bt]  # noqa: E731
    return reg._replace(rec_mask=None if reg.rec_mask is None else reg.rec_mask[:bt],
                        zone_h=rows(reg.zone_h), zone_c=rows(reg.zone_c))


def _run(step, x_proj, states, batch_sizes, reverse, reg=None):
    """Runs `step(xp_rows, *state_rows, reg=step_reg) -> new states` over time.
    State rows beyond batch_sizes[t] are frozen, as in a PackedSequence."""
    order, flat = _steps(x_proj, batch_sizes, reverse)
    outs = {}
    states = list(states)
    for bt, off in order:
        new = step(flat[off:off + bt], *[s[:bt] for s in states], reg=_step_reg(reg, off, bt))
        states = [torch.cat([n, s[bt:]]) for n, s in zip(new, states)]
        outs[off] = new[0]
    out = torch.cat([outs[off] for _, off in sorted(order, key=lambda o: o[1])])
    if batch_sizes is None:
        out = out.reshape(*x_proj.shape[:2], -1)
    return out, states


def _input_norm(x_proj, reg):
    """The input side of layer_norm: LN(x_proj) * reg.ln_ih + reg.b_ih, per row."""
    if reg is None or reg.ln_ih is None:
        return x_proj
    return F.layer_norm(x_proj, x_proj.shape[-1:], reg.ln_ih, reg.b_ih, LN_EPS)


def lstm_layer(x_proj, h0, c0, w_hh, w_hr=None, b_hh=None, batch_sizes=None, reverse=False,
               reg=None):
    """One LSTM layer and direction. Returns (output, h_n, c_n)."""
    x_proj = _input_norm(x_proj, reg)
    out, (h, c) = _run(lambda xp, h, c, reg: lstm_cell(xp, h, c, w_hh, b_hh, w_hr, reg),
                       x_proj, (h0, c0), batch_sizes, reverse, reg)
    return out, h, c


def gru_layer(x_proj, h0, w_hh, b_hh=None, batch_sizes=None, reverse=False, reset_after=True,
              reg=None):
    """One GRU layer and direction. Returns (output, h_n)."""
    x_proj = _input_norm(x_proj, reg)
    out, (h,) = _run(lambda xp, h, reg: (gru_cell(xp, h, w_hh, b_hh, reset_after, reg),),
                     x_proj, (h0,), batch_sizes, reverse, reg)
    return out, h
