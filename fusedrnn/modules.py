"""Drop-in replacements for torch.nn.LSTM, GRU, LSTMCell and GRUCell.

Constructor arguments and their checks, parameter names, shapes,
initialisation, state_dict keys, repr and the input checks are torch's own;
only the computation is ours.

Beyond torch.nn, keyword arguments off by default (definitions: regularised.py):
LSTM and GRU take layer_norm, zoneout, recurrent_dropout, weight_drop (and LSTM
zoneout_cell); LSTMCell and GRUCell take layer_norm and zoneout (LSTMCell
zoneout_cell); GRU and GRUCell take reset_after. layer_norm adds parameters
named after torch's scheme: layernorm_ih_weight_l{k}[_reverse] and
layernorm_hh_weight_l{k}[_reverse] (G*H), and for an LSTM layernorm_c_weight_l{k}
and layernorm_c_bias_l{k} (H), initialised to ones and zeros (also by
reset_parameters()); the cells' have no suffix.

Note [Not a subclass of nn.LSTM]
LSTM and GRU subclass nn.RNNBase and borrow nn.LSTM's methods rather than
subclass nn.LSTM and nn.GRU: torch.compile refuses to trace any instance of
nn.RNN, nn.GRU or nn.LSTM (torch._dynamo.config.allow_rnn), which would rule
out fullgraph=True. The cells subclass nn.LSTMCell and nn.GRUCell.
"""
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import _ops, regularised
from .functional import cell, check_devices, rnn_layers
from .scripting import ScriptedCell, ScriptedRNN, refuse_regularised


def _check_size(t, expected, what, short_rank_error=RuntimeError):
    """torch.nn's check_hidden_size. Under torch.compile a packed batch size
    (batch_sizes[0]) is data, so there the comparison is a runtime assert
    (torch._check) rather than a guard. Its message function takes `what` as a
    default argument, not from the enclosing scope: torch 2.11's Dynamo
    refuses a torch._check message that is a closure."""
    msg = lambda: f"Expected {what} size {expected}, got {list(t.size())}"  # noqa: E731
    if t.dim() != len(expected):
        raise (short_rank_error if t.dim() < len(expected) else RuntimeError)(msg())
    if torch.compiler.is_compiling():
        for got, want in zip(t.shape, expected):
            torch._check(got == want, lambda what=what: f"Expected {what} size does not match hx")
    elif t.size() != expected:
        raise RuntimeError(msg())


class _Regularisable:
    """Layers' and cells' share of the regularisers (regularised.py): their
    LayerNorm parameters through reset_parameters, their options in the repr,
    and the TorchScript refusal. Comes before the torch.nn base."""

    def reset_parameters(self):
        super().reset_parameters()
        regularised.reset_layer_norm(self)

    def extra_repr(self):
        return super().extra_repr() + regularised.repr_suffix(self)

    def __prepare_scriptable__(self):
        refuse_regularised(self)
        return self


class _FusedRNNBase(_Regularisable, nn.RNNBase, ScriptedRNN):
    """Shared forward of LSTM and GRU (the eager one; TorchScript compiles
    ScriptedRNN's, see scripting.py)."""

    def __init__(self, mode, *args, reset_after=True, layer_norm=False, zoneout=0.0,
                 zoneout_cell=0.0, recurrent_dropout=0.0, weight_drop=0.0, **kwargs):
        super().__init__(mode, *args, **kwargs)
        if mode == "GRU":
            self.reset_after = bool(reset_after)
        regularised.configure(self, mode == "LSTM", False, layer_norm, zoneout, zoneout_cell,
                              recurrent_dropout, weight_drop)

    def _layer_weights(self):
        """(w_ih, w_hh, b_ih, b_hh, w_hr) per layer and direction, from the
        _flat_weights that forward's _update_flat_weights has just taken, as
        torch.nn.LSTM's forward uses them: a parametrized weight is evaluated
        as often as there (spectral_norm's power iteration, run on each
        evaluation in training mode, then takes the same steps)."""
        flat = dict(zip(self._flat_weights_names, self._flat_weights))
        suffixes = ["", "_reverse"] if self.bidirectional else [""]
        out = []
        for layer in range(self.num_layers):
            for sfx in suffixes:
                get = lambda n: flat.get(f"{n}_l{layer}{sfx}")  # noqa: E731
                out.append((get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"),
                            get("weight_hr") if self.proj_size > 0 else None))
        return out

    def _check_args(self, data, hx, batch_sizes, max_batch):
        """torch.nn's check_forward_args, with the packed batch size passed in."""
        lstm = self.mode == "LSTM"
        # torch.nn.LSTM runs no Python checks on packed input: its errors come
        # from ATen, RuntimeError, or IndexError for an hx of too low a rank.
        # Same types here, with the messages of torch.nn's Python checks.
        aten_errors = lstm and batch_sizes is not None
        try:
            self.check_input(data, batch_sizes)
        except ValueError as e:
            if not aten_errors:
                raise
            raise RuntimeError(str(e)) from None
        rank_error = IndexError if aten_errors else RuntimeError
        expected = (self.num_layers * (2 if self.bidirectional else 1), max_batch,
                    self.proj_size if self.proj_size > 0 else self.hidden_size)
        if lstm:
            _check_size(hx[0], expected, "hidden[0]", rank_error)
            _check_size(hx[1], expected[:2] + (self.hidden_size,), "hidden[1]", rank_error)
        else:
            _check_size(hx, expected, "hidden")

    def _plain(self, input, hx):
        """The call in one op (Note [a plain stack in one call] in
        csrc/plain_ops.cpp) where it has nothing to check or plan: no
        regulariser, projection or dropout between layers, a padded batch of
        steps or one unbatched sequence, the states absent or of the expected
        shapes, every tensor of input's dtype, the states on its device, eager,
        no autocast. None where forward's full path must run (it raises as
        torch.nn does); the checks are the cheap reads of Note [a plain cell's
        short way]."""
        opts = self.__dict__
        if _regularised(opts):
            return None
        layers, bidirectional = opts["num_layers"], opts["bidirectional"]
        if opts["proj_size"] or (opts["dropout"] and opts["training"] and layers > 1):
            return None
        if not isinstance(input, Tensor):
            return None
        shape, hidden, batch_first = input.shape, opts["hidden_size"], opts["batch_first"]
        batched = len(shape) == 3
        if (not batched and len(shape) != 2) or shape[-1] != opts["input_size"] or 0 in shape \
                or hidden == 0:
            return None
        lstm = opts["mode"] == "LSTM"
        states = _states(lstm, hx)
        if states is None:
            return None
        state = (layers * (2 if bidirectional else 1),) \
            + ((shape[0 if batch_first else 1],) if batched else ()) + (hidden,)
        if not _plain_place(input, state, states):
            return None
        # A parametrized or pruned weight is not in the dict: torch.nn.LSTM
        # evaluates it more than once a call (_update_flat_weights), the full
        # path as often.
        params = self._parameters
        weights = [params.get(name) for name in self._flat_weights_names]
        for w in weights:
            if w is None or w.dtype != input.dtype:
                return None
        if batched:
            data = input.transpose(0, 1) if batch_first else input
        else:  # one sequence: a batch of one, time-major
            data, states = input.unsqueeze(1), tuple(s.unsqueeze(1) for s in states)
        if lstm:
            h0, c0 = states or (None, None)
            out, h_n, c_n = _ops.ops.lstm_layers(data, h0, c0, weights, opts["bias"], layers,
                                                 bidirectional)
            finals = (h_n, c_n)
        else:
            out, h_n = _ops.ops.gru_layers(data, states[0] if states else None, weights,
                                           opts["bias"], layers, bidirectional,
                                           opts.get("reset_after", True))
            finals = (h_n,)
        if not batched:
            out, finals = out.squeeze(1), tuple(f.squeeze(1) for f in finals)
        elif batch_first:
            out = out.transpose(0, 1)
        return out, (finals if lstm else finals[0])

    def forward(self, input, hx=None):
        plain = self._plain(input, hx)
        if plain is not None:
            return plain
        self._update_flat_weights()
        lstm = self.mode == "LSTM"
        name = self.mode
        dirs = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            # sorted_indices.numel() == batch_sizes[0], but is static under torch.compile.
            max_batch = (sorted_indices.numel() if sorted_indices is not None
                         else int(batch_sizes[0]))
            is_batched = True
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            data = input if is_batched else input.unsqueeze(batch_dim)
            batch_sizes = sorted_indices = unsorted_indices = None
            max_batch = data.size(batch_dim)
            if hx is not None:
                hs = (hx[0], hx[1]) if lstm else (hx,)
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

        if hx is None:
            opts = dict(dtype=data.dtype, device=data.device)
            h0 = torch.zeros(self.num_layers * dirs, max_batch, out_size, **opts)
            hx = (h0, torch.zeros(self.num_layers * dirs, max_batch, self.hidden_size, **opts)) \
                if lstm else h0
        elif lstm and len(hx) != 2:
            raise RuntimeError(f"LSTM expects two hidden states (h_0, c_0), got {len(hx)}")
        self._check_args(data, hx, batch_sizes, max_batch)
        if not packed and data.size(1 if self.batch_first else 0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        check_devices(name, data, list(zip(("hx[0]", "hx[1]"), hx)) if lstm else [("hx", hx)])
        if not packed and self.batch_first:
            data = data.transpose(0, 1)
        output, hidden = rnn_layers(self.mode, data, batch_sizes, hx, self._layer_weights(),
                                    self.num_layers, self.dropout, self.training,
                                    self.bidirectional, getattr(self, "reset_after", True),
                                    regularised.options(self),
                                    regularised.ln_weights(self, lstm, False))
        if packed:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output, self.permute_hidden(hidden, unsorted_indices)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = tuple(h.squeeze(1) for h in hidden) if lstm else hidden.squeeze(1)
        return output, hidden


class LSTM(_FusedRNNBase):
    """torch.nn.LSTM computed by fusedrnn's kernels (same arguments and outputs),
    plus the options beyond torch.nn of this module's docstring.
    See Note [Not a subclass of nn.LSTM]."""

    def __init__(self, *args, **kwargs):
        if "reset_after" in kwargs:
            raise TypeError("LSTM.__init__() got an unexpected keyword argument 'reset_after'")
        super().__init__("LSTM", *args, **kwargs)

    def forward(self, input: Union[Tensor, PackedSequence],
                hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        if torch.jit.is_scripting():  # resolved when compiled; Note [TorchScript]
            return self._scripted_lstm(input, hx)
        return super().forward(input, hx)

    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden


class GRU(_FusedRNNBase):
    """torch.nn.GRU computed by fusedrnn's kernels (same arguments and outputs),
    plus the options beyond torch.nn of this module's docstring.
    See Note [Not a subclass of nn.LSTM].

    reset_after=False (beyond torch.nn) selects the classic form of Cho et al.,
    n = tanh(W_in x + b_in + W_hn (r * h) + b_hn); the default True is torch's
    and cuDNN's, n = tanh(W_in x + b_in + r * (W_hn h + b_hn)). Parameters are
    the same, so a checkpoint loads into either form.
    """

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if "zoneout_cell" in kwargs:
            regularised.refuse_zoneout_cell("GRU")
        super().__init__("GRU", *args, **kwargs)

    def forward(self, input: Union[Tensor, PackedSequence],
                hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if torch.jit.is_scripting():  # resolved when compiled; Note [TorchScript]
            return self._scripted_gru(input, hx)
        return super().forward(input, hx)


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
        states = tuple(states[i].unsqueeze(0) for i in range(n_states))
    if len(states) != n_states:
        raise RuntimeError("lstm_cell expects two hidden states")
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
    return input, states, batched


class _CellOptions(_Regularisable):
    """What the cells share beyond torch.nn: the regularisers' options and
    parameters (regularised.py)."""

    def _configure(self, lstm, layer_norm, zoneout, zoneout_cell, unsupported):
        regularised.refuse_on_cell(type(self).__name__, lstm, unsupported)
        regularised.configure(self, lstm, True, layer_norm, zoneout, zoneout_cell)

    def _cell(self, mode, input, states):
        lstm = mode == "LSTM"
        reset_after = lstm or getattr(self, "reset_after", True)
        return cell(mode, input, states, self.weight_ih, self.weight_hh, self.bias_ih,
                    self.bias_hh, reset_after, regularised.options(self),
                    regularised.ln_weights(self, lstm, True), self.training)

    def _plain(self, lstm, input, hx):
        """The call in one op (Note [a plain cell's short way]) where it has
        nothing to check, plan or reshape: no regulariser, a batch with its
        states (absent: torch.nn's zeros), every shape as the ops want it,
        every tensor of input's dtype, the states on its device, eager, no
        autocast. None where forward's full path must run (it raises as
        torch.nn does)."""
        # Note [a plain cell's short way]
        # At batch 1 H=256 on a 2-core Xeon, a plain LSTMCell call spent as long
        # in Python as in its op: dtype, autocast and regulariser planning it
        # does not use, torch.nn's shape checks as a dozen size() calls, and
        # torch.device objects built to compare devices. Here each check is one
        # cheap read, and every case they do not cover takes the full path.
        opts = self.__dict__
        if _regularised(opts):
            return None
        shape = input.shape
        if len(shape) != 2 or shape[0] == 0 or shape[1] != opts["input_size"]:
            return None
        state = (shape[0], opts["hidden_size"])
        states = _states(lstm, hx)
        # hidden_size 0: the full path (_layer's way for empty results).
        if states is None or state[1] == 0 or not _plain_place(input, state, states):
            return None
        weights = [_tensor(self, name) for name in _CELL_WEIGHTS]
        for w in weights:
            if w is not None and w.dtype != input.dtype:
                return None
        if not states:  # torch.nn's zeros
            zeros = torch.zeros(state, dtype=input.dtype, device=input.device)
            states = (zeros, zeros) if lstm else (zeros,)
        if lstm:  # Note [a plain cell in one call] (csrc/plain_ops.cpp)
            return _ops.ops.lstm_cell(input, *states, *weights)
        return _ops.ops.gru_cell(input, *states, *weights, opts.get("reset_after", True))


_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _regularised(opts):
    """Whether any regulariser is on, from a module's __dict__."""
    for name in regularised.OPTIONS:
        if opts.get(name):
            return True
    return False


def _states(lstm, hx):
    """hx of a short way as a tuple of its states, () where absent; None where
    its structure is not the plain one (the full path's to judge)."""
    if hx is None:
        return ()
    if not lstm:
        return (hx,)
    return hx if type(hx) is tuple and len(hx) == 2 else None


def _plain_place(input, state, states):
    """The short ways' checks on the states (Note [a plain cell's short way]):
    tensors of shape `state` and of input's dtype, on its device (compared
    without building torch.device objects), no autocast there, eager."""
    dtype = input.dtype
    for s in states:
        if not isinstance(s, Tensor) or s.shape != state or s.dtype != dtype:
            return False
    if input.is_cpu:
        if torch.is_autocast_enabled("cpu") or not all(s.is_cpu for s in states):
            return False
    elif (not input.is_cuda or torch.is_autocast_enabled("cuda")
          or not all(s.is_cuda and s.get_device() == input.get_device() for s in states)):
        return False
    return not torch.compiler.is_compiling()


def _tensor(module, name):
    """getattr(module, name) for a parameter, read from the parameters' dict
    where it is there (nn.Module.__getattr__ is the slow way to it); a
    parametrization or pruning moves the name out of that dict."""
    p = module._parameters.get(name)
    return p if p is not None else getattr(module, name)


class LSTMCell(_CellOptions, nn.LSTMCell, ScriptedCell):
    """torch.nn.LSTMCell computed by fusedrnn's kernels: one op call with T = 1.
    layer_norm, zoneout and zoneout_cell as for LSTM (zoneout draws fresh masks on
    every call: a call is one step)."""

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *,
                 layer_norm=False, zoneout=0.0, zoneout_cell=0.0, **unsupported):
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self._configure(True, layer_norm, zoneout, zoneout_cell, unsupported)

    def forward(self, input: Tensor,
                hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        if torch.jit.is_scripting():  # resolved when compiled; Note [TorchScript]
            return self._scripted_lstm_cell(input, hx)
        out = self._plain(True, input, hx)
        if out is not None:
            return out
        input, states, batched = _cell_inputs(self, "LSTMCell", input, hx, 2)
        h, c = self._cell("LSTM", input, states)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(_CellOptions, nn.GRUCell, ScriptedCell):
    """torch.nn.GRUCell computed by fusedrnn's kernels: one op call with T = 1.
    reset_after=False selects the classic form, as for GRU; layer_norm and
    zoneout as for GRU (zoneout draws fresh masks on every call)."""

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None,
                 reset_after=True, *, layer_norm=False, zoneout=0.0, **unsupported):
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.reset_after = bool(reset_after)
        if "zoneout_cell" in unsupported:
            regularised.refuse_zoneout_cell("GRUCell")
        self._configure(False, layer_norm, zoneout, 0.0, unsupported)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():  # resolved when compiled; Note [TorchScript]
            return self._scripted_gru_cell(input, hx)
        out = self._plain(False, input, hx)
        if out is not None:
            return out
        input, states, batched = _cell_inputs(self, "GRUCell", input, hx, 1)
        (h,) = self._cell("GRU", input, states)
        return h if batched else h.squeeze(0)
