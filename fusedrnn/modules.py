"""Drop-in replacements for torch.nn.LSTM, GRU, LSTMCell and GRUCell.

Each subclasses its torch.nn counterpart, so constructor arguments and their
checks, parameter names, shapes, initialisation, state_dict keys, repr and the
input checks are torch's own; only the computation is ours.
"""
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import _ops
from .functional import autocast_dtype, rnn_layers


class _FusedRNNBase:
    """Shared forward of LSTM and GRU (mixed into the torch.nn classes)."""

    def _layer_weights(self):
        suffixes = ["", "_reverse"] if self.bidirectional else [""]
        out = []
        for layer in range(self.num_layers):
            for sfx in suffixes:
                get = lambda n: getattr(self, f"{n}_l{layer}{sfx}", None)  # noqa: E731
                out.append((get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"),
                            get("weight_hr") if self.proj_size > 0 else None))
        return out

    def _zeros(self, size, ref):
        return torch.zeros(size, dtype=ref.dtype, device=ref.device)

    def _check_hidden_dtype(self, input, hx):
        for i, h in enumerate(hx if isinstance(hx, tuple) else (hx,)):
            if h.dtype != input.dtype and autocast_dtype(input.device.type) is None:
                raise RuntimeError(
                    f"{type(self).__name__}: hx{'[%d]' % i if isinstance(hx, tuple) else ''} "
                    f"dtype ({h.dtype}) does not match input dtype ({input.dtype})")
            if h.device != input.device:
                raise RuntimeError(
                    f"{type(self).__name__}: hx{'[%d]' % i if isinstance(hx, tuple) else ''} "
                    f"is on {h.device} but input is on {input.device}")

    def forward(self, input, hx=None):
        lstm = self.mode == "LSTM"
        name = "LSTM" if lstm else "GRU"
        dirs = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch = int(batch_sizes[0])
            is_batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            data = input if is_batched else input.unsqueeze(batch_dim)
            batch_sizes = sorted_indices = unsorted_indices = None
            max_batch = data.size(batch_dim)

        if hx is None:
            h0 = self._zeros((self.num_layers * dirs, max_batch, out_size), data)
            hx = (h0, self._zeros((self.num_layers * dirs, max_batch, self.hidden_size), data)) \
                if lstm else h0
        elif not packed:
            hs = hx if lstm else (hx,)
            want = 3 if is_batched else 2
            if any(h.dim() != want for h in hs):
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                if lstm:
                    raise RuntimeError(
                        f"For {kind} input, hx and cx should also be {want}-D but got "
                        f"({hs[0].dim()}-D, {hs[1].dim()}-D) tensors")
                raise RuntimeError(
                    f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor")
            if not is_batched:
                hx = tuple(h.unsqueeze(1) for h in hs) if lstm else hx.unsqueeze(1)
        else:
            hx = self.permute_hidden(hx, sorted_indices)

        self.check_forward_args(data, hx, batch_sizes)
        self._check_hidden_dtype(data, hx)
        if not packed and self.batch_first:
            data = data.transpose(0, 1)
        output, hidden = rnn_layers(self.mode, data, batch_sizes, hx, self._layer_weights(),
                                    self.num_layers, self.dropout, self.training,
                                    self.bidirectional)
        if packed:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output, self.permute_hidden(hidden, unsorted_indices)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(1)
            hidden = tuple(h.squeeze(1) for h in hidden) if lstm else hidden.squeeze(1)
        return output, hidden


class LSTM(_FusedRNNBase, nn.LSTM):
    """torch.nn.LSTM computed by fusedrnn's kernels (same arguments and outputs)."""


class GRU(_FusedRNNBase, nn.GRU):
    """torch.nn.GRU computed by fusedrnn's kernels (same arguments and outputs)."""


def _cell_inputs(cell, name, input, hx, n_states):
    """torch's checks of a cell call; returns (input [B, I], states [B, H], batched)."""
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    states = hx if n_states == 2 else (None if hx is None else (hx,))
    if states is not None:
        for idx, value in enumerate(states):
            if value.dim() not in (1, 2):
                what = f"hx[{idx}]" if n_states == 2 else "hidden"
                raise ValueError(f"{name}: Expected {what} to be 1D or 2D, got {value.dim()}D instead")
    batched = input.dim() == 2
    if not batched:
        input = input.unsqueeze(0)
    if states is None:
        zeros = torch.zeros(input.size(0), cell.hidden_size, dtype=input.dtype, device=input.device)
        states = (zeros,) * n_states
    elif not batched:
        states = tuple(s.unsqueeze(0) for s in states)
    if input.size(1) != cell.input_size:
        raise RuntimeError(
            f"input has inconsistent input_size: got {input.size(1)} expected {cell.input_size}")
    for idx, s in enumerate(states):
        if s.size(0) != input.size(0):
            raise RuntimeError(
                f"Input batch size {input.size(0)} doesn't match hidden{idx} batch size {s.size(0)}")
        if s.size(1) != cell.hidden_size:
            raise RuntimeError(
                f"hidden{idx} has inconsistent hidden_size: got {s.size(1)}, expected {cell.hidden_size}")
    for s in states:
        if s.dtype != input.dtype or input.dtype != cell.weight_ih.dtype:
            raise RuntimeError(
                f"mat1 and mat2 must have the same dtype, but got {input.dtype} and "
                f"{cell.weight_ih.dtype if s.dtype == input.dtype else s.dtype}")
    return input, states, batched


def _cell_cast(cell, input, states):
    ac = autocast_dtype(input.device.type, cell=True)
    ws = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    if ac is None:
        return input, states, ws
    cast = lambda t: None if t is None else t.to(ac)  # noqa: E731
    return cast(input), tuple(cast(s) for s in states), tuple(cast(w) for w in ws)


class LSTMCell(nn.LSTMCell):
    """torch.nn.LSTMCell computed by fusedrnn's kernels: one op call with T = 1."""

    def forward(self, input, hx=None):
        input, (h0, c0), batched = _cell_inputs(self, "LSTMCell", input, hx, 2)
        with torch.autocast(input.device.type, enabled=False):
            input, (h0, c0), (w_ih, w_hh, b_ih, b_hh) = _cell_cast(self, input, (h0, c0))
            x_proj = torch.nn.functional.linear(input, w_ih, b_ih).unsqueeze(0)
            _, h, c = _ops.lstm_layer(x_proj, h0, c0, w_hh, None, b_hh)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(nn.GRUCell):
    """torch.nn.GRUCell computed by fusedrnn's kernels: one op call with T = 1."""

    def forward(self, input, hx=None):
        input, (h0,), batched = _cell_inputs(self, "GRUCell", input, hx, 1)
        with torch.autocast(input.device.type, enabled=False):
            input, (h0,), (w_ih, w_hh, b_ih, b_hh) = _cell_cast(self, input, (h0,))
            x_proj = torch.nn.functional.linear(input, w_ih, b_ih).unsqueeze(0)
            _, h = _ops.gru_layer(x_proj, h0, w_hh, b_hh)
        return h if batched else h.squeeze(0)
