"""Layer stacking, directions, packed sequences and dropout around the ops.

One op call per layer and direction; no Python loop over time steps. The input
projection x W_ih^T + b_ih of all steps is one GEMM (F.linear) per layer and
direction, so autograd forms dW_ih and db_ih with one GEMM/reduction each.
"""
import torch
import torch.nn.functional as F

from . import _ops

# Autocast: torch runs whole-sequence RNNs in the autocast dtype on every
# device, and the cells only on CUDA (on the CPU, lstm_cell/gru_cell are not in
# autocast's lists and run in the weights' dtype).
_CELL_AUTOCAST_DEVICES = ("cuda",)


def autocast_dtype(device_type, cell=False):
    """The dtype autocast asks for here, or None."""
    if cell and device_type not in _CELL_AUTOCAST_DEVICES:
        return None
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t, dtype):
    return t if t is None or dtype is None else t.to(dtype)


def rnn_layers(mode, data, batch_sizes, hx, weights, num_layers, dropout, training,
               bidirectional):
    """Runs the stack.

    mode: "LSTM" or "GRU". data: [T, B, I] (time-major) or packed [N, I] with
    batch_sizes. hx: h0 [L*D, B, P] (and c0 [L*D, B, H] for LSTM, as a tuple).
    weights: one (w_ih, w_hh, b_ih, b_hh, w_hr) tuple per layer and direction,
    in torch's order (layer-major, forward before reverse); absent ones None.
    Returns output ([T, B, D*P] or [N, D*P]) and h_n (LSTM: (h_n, c_n)).
    """
    lstm = mode == "LSTM"
    dirs = 2 if bidirectional else 1
    ac = autocast_dtype(data.device.type)
    h0, c0 = hx if lstm else (hx, None)
    data, h0, c0 = _cast(data, ac), _cast(h0, ac), _cast(c0, ac)
    h_n, c_n = [], []
    layer_in = data
    for layer in range(num_layers):
        if layer > 0 and dropout > 0 and training:
            layer_in = F.dropout(layer_in, dropout, True)
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            w_ih, w_hh, b_ih, b_hh, w_hr = (_cast(w, ac) for w in weights[k])
            x_proj = F.linear(layer_in, w_ih, b_ih)
            if lstm:
                out, h, c = _ops.lstm_layer(x_proj, h0[k], c0[k], w_hh, w_hr, b_hh,
                                            batch_sizes, reverse=d == 1)
                c_n.append(c)
            else:
                out, h = _ops.gru_layer(x_proj, h0[k], w_hh, b_hh, batch_sizes, reverse=d == 1)
            outs.append(out)
            h_n.append(h)
        layer_in = outs[0] if dirs == 1 else torch.cat(outs, dim=-1)
    h_n = torch.stack(h_n)
    return layer_in, ((h_n, torch.stack(c_n)) if lstm else h_n)
