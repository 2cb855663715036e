"""TorchScript forward of the modules: the eager path's op calls, in the
Python subset that torch.jit.script compiles.

Each module's forward (modules.py) runs its eager path in Python and, under
torch.jit.is_scripting() (a condition TorchScript resolves when it compiles, so
the eager branch is never compiled), the methods mixed in from here. They check
the input as the eager path does, with its messages, and make the same op calls
(functional.rnn_layers and functional.cell): fusedrnn::linear for the input
projection of all steps, then one fusedrnn::lstm_forward or gru_forward per layer
and direction, dropout between layers in training mode. Outputs and gradients
are the eager ones.

Note [TorchScript]
- The module itself is compiled, not a twin returned by __prepare_scriptable__:
  torch.jit.script writes a prepared child back into its parent's _modules, so
  the user's eager model would be left holding the twin.
- The weights come from RNNBase._flat_weights, as in torch.nn.LSTM's scripted
  forward: the same tensors as the parameters, so training, load_state_dict and
  .to() on the ScriptModule reach them, also after torch.jit.save/load.
- The compiled code calls torch.ops.fusedrnn.*, whose autograd is registered
  in Python (_ops.py): torch.jit.load of a scripted fusedrnn module needs
  `import fusedrnn` first (else "Unknown builtin op: fusedrnn::..."), and it
  runs only in a Python process.
- Not scripted, each refused with an error that names it and points to
  fusedrnn.restore_rnns (back to torch.nn, whose modules script):
  * PackedSequence input (packed inside the compiled code; one passed from
    Python TorchScript's argument check refuses first, naming the type): the
    output would be a PackedSequence, and forward's result type must be a
    tensor for the common case to compile (TorchScript overloads of forward
    would leave a top-level ScriptModule without a forward).
  * autocast, and states of another floating dtype than the weights: the
    eager path's result dtypes there depend on which torch kernel torch.nn
    would run (functional.py, Note [Autocast]), which TorchScript cannot ask.
- A module with a regulariser on (layer_norm, zoneout, zoneout_cell,
  recurrent_dropout, weight_drop; regularised.py) is refused when
  torch.jit.script is called (its __prepare_scriptable__, which torch.jit.script
  calls on every module of a model before compiling any), with an error naming
  the options: its layer functions take a LayerReg, a Python NamedTuple whose
  layer function runs Python, and torch.nn has no such module to restore to.
  torch.compile runs them.
"""
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence


def _unsupported(name: str, feature: str) -> str:
    return (f"fusedrnn.{name} under TorchScript: {feature} is not supported. Run the model "
            "eagerly, or call fusedrnn.restore_rnns(model) before torch.jit.script to script "
            "torch.nn's modules instead")


def refuse_regularised(module):
    """Raises (at torch.jit.script time) for a module with a regulariser on;
    see Note [TorchScript]."""
    from . import regularised
    on = regularised.non_default(regularised.options(module))
    if on:
        name = type(module).__name__
        given = ", ".join(f"{k}={v}" for k, v in on.items())
        raise RuntimeError(
            f"fusedrnn.{name} under TorchScript: the regularisers beyond torch.nn ({given}) "
            "are not supported. Run the model eagerly or under torch.compile, or script a "
            f"fusedrnn.{name} without them")


def _dtype_name(dtype: int) -> str:
    """torch's name of a dtype (TorchScript formats a dtype as a number)."""
    names = {torch.float64: "torch.float64", torch.float32: "torch.float32",
             torch.float16: "torch.float16", torch.bfloat16: "torch.bfloat16",
             torch.int64: "torch.int64", torch.int32: "torch.int32", torch.int16: "torch.int16",
             torch.int8: "torch.int8", torch.uint8: "torch.uint8", torch.bool: "torch.bool",
             torch.complex64: "torch.complex64", torch.complex128: "torch.complex128"}
    if dtype in names:
        return names[dtype]
    return f"dtype {dtype}"


def _autocast_changes(name: str, x: Tensor):
    """Raises if autocast is on and would change this computation's dtype.

    A probe matmul: autocast casts it exactly when it would cast the eager
    path's matmuls (never float64, nothing already in the autocast dtype).
    torch.is_autocast_cpu_enabled() cannot be asked instead: under CPU autocast
    the TorchScript interpreter crashes on it.
    """
    probe = torch.ones(1, 1, dtype=x.dtype, device=x.device)
    if torch.mm(probe, probe).dtype != x.dtype:
        raise RuntimeError(_unsupported(name, "autocast"))


def _check_dtypes(name: str, x: Tensor, matmul_state: Tuple[str, Tensor],
                  state: Tuple[str, Tensor], weight: Tensor):
    """functional.plan_dtypes without autocast: input and the state that meets
    W_hh in the weights' dtype; the other state too (the eager path would
    promote it)."""
    if x.dtype != weight.dtype:
        raise RuntimeError(f"{name}: input dtype ({_dtype_name(x.dtype)}) does not match weight "
                           f"dtype ({_dtype_name(weight.dtype)})")
    what, t = matmul_state
    if t.dtype != weight.dtype:
        raise RuntimeError(f"{name}: {what} dtype ({_dtype_name(t.dtype)}) does not match weight "
                           f"dtype ({_dtype_name(weight.dtype)})")
    what, t = state
    if t.dtype != weight.dtype:
        raise RuntimeError(_unsupported(
            name, f"{what} of dtype {_dtype_name(t.dtype)} with weights of dtype "
                  f"{_dtype_name(weight.dtype)}"))


def _check_size(t: Tensor, expected: Tuple[int, int, int], what: str):
    """modules._check_size, for a state of the right rank."""
    if t.size(0) != expected[0] or t.size(1) != expected[1] or t.size(2) != expected[2]:
        raise RuntimeError(f"Expected {what} size {expected}, got {t.size()}")


def _check_device(name: str, x: Tensor, what: str, t: Tensor):
    """functional.check_devices for one tensor."""
    if t.device != x.device:
        raise RuntimeError(f"{name}: {what} is on {t.device} but input is on {x.device}")


def _needs_grad(tensors: List[Optional[Tensor]]) -> bool:
    """_ops.needs_grad: whether the op must save what backward needs."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _layer(lstm: bool, x_proj: Tensor, h0: Tensor, c0: Optional[Tensor], w_hh: Tensor,
           w_hr: Optional[Tensor], b_hh: Optional[Tensor], reverse: bool,
           reset_after: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """functional._layer: one op call, (output, h_n, c_n or None)."""
    if x_proj.numel() == 0:
        # Empty batch: zero-size results that depend on every input (as functional._layer).
        anchor = x_proj.sum() + h0.sum() + w_hh.sum()
        for t in [c0, w_hr, b_hh]:
            if t is not None:
                anchor = anchor + t.sum()
        anchor = anchor * 0
        out = x_proj.new_zeros(x_proj.shape[:-1] + [w_hh.size(1)]) + anchor
        if c0 is not None:
            return out, h0 + anchor, c0 + anchor
        return out, h0 + anchor, None
    if lstm:
        assert c0 is not None
        train = _needs_grad([x_proj, h0, c0, w_hh, w_hr, b_hh])
        out, h_n, c_n, _, _ = torch.ops.fusedrnn.lstm_forward(x_proj, h0, c0, w_hh, w_hr, b_hh,
                                                             None, reverse, train)
        return out, h_n, c_n
    train = _needs_grad([x_proj, h0, w_hh, b_hh])
    out, h_n, _ = torch.ops.fusedrnn.gru_forward(x_proj, h0, w_hh, b_hh, None, reverse,
                                                 reset_after, train)
    return out, h_n, None


def _rnn_layers(lstm: bool, data: Tensor, h0: Tensor, c0: Optional[Tensor],
                weights: List[Tensor], bias: bool, proj: bool, num_layers: int, dirs: int,
                dropout: float, training: bool,
                reset_after: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """functional.rnn_layers for time-major data [T, B, I] and states of the
    weights' dtype. weights: RNNBase._flat_weights, per layer and direction
    w_ih, w_hh, (b_ih, b_hh), (w_hr). Returns (output, h_n, c_n or None)."""
    per_direction = 2 + (2 if bias else 0) + (1 if proj else 0)
    h_n: List[Tensor] = []
    c_n: List[Tensor] = []
    layer_in = data
    for layer in range(num_layers):
        if layer > 0 and dropout > 0 and training:
            layer_in = F.dropout(layer_in, dropout, True)
        outs: List[Tensor] = []
        for d in range(dirs):
            k = layer * dirs + d
            w = weights[k * per_direction:(k + 1) * per_direction]
            b_ih: Optional[Tensor] = None
            b_hh: Optional[Tensor] = None
            w_hr: Optional[Tensor] = None
            if bias:
                b_ih, b_hh = w[2], w[3]
            if proj:
                w_hr = w[-1]
            c0_k: Optional[Tensor] = None
            if c0 is not None:
                c0_k = c0[k]
            out, h, c = _layer(lstm, torch.ops.fusedrnn.linear(layer_in, w[0], b_ih), h0[k],
                               c0_k, w[1], w_hr, b_hh, d == 1, reset_after)
            outs.append(out)
            h_n.append(h)
            if c is not None:
                c_n.append(c)
        layer_in = outs[0] if dirs == 1 else torch.cat(outs, dim=-1)
    if lstm:
        return layer_in, torch.stack(h_n), torch.stack(c_n)
    return layer_in, torch.stack(h_n), None


class ScriptedRNN:
    """TorchScript forward of fusedrnn.LSTM and GRU (mixed into modules._FusedRNNBase,
    so `self` is the module). See Note [TorchScript]."""

    def _scripted_lstm(self, input: Union[Tensor, PackedSequence],
                       hx: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        if isinstance(input, PackedSequence):
            raise RuntimeError(_unsupported("LSTM", "PackedSequence input"))
        h0: Optional[Tensor] = None
        c0: Optional[Tensor] = None
        if hx is not None:
            h0, c0 = hx
        out, h_n, c_n = self._scripted_rnn(input, h0, c0)
        assert c_n is not None
        return out, (h_n, c_n)

    def _scripted_gru(self, input: Union[Tensor, PackedSequence],
                      hx: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if isinstance(input, PackedSequence):
            raise RuntimeError(_unsupported("GRU", "PackedSequence input"))
        out, h_n, _ = self._scripted_rnn(input, hx, None)
        return out, h_n

    def _scripted_rnn(self, input: Tensor, h0: Optional[Tensor],
                      c0: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """modules._FusedRNNBase.forward for a tensor input; c0 is None for GRU
        (and when not given)."""
        lstm = self.mode == "LSTM"
        name = self.mode
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        data = input if batched else input.unsqueeze(batch_dim)
        batch = data.size(batch_dim)
        dirs = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if h0 is None:
            h = torch.zeros(self.num_layers * dirs, batch, out_size, dtype=data.dtype,
                            device=data.device)
            c: Optional[Tensor] = None
            if lstm:
                c = torch.zeros(self.num_layers * dirs, batch, self.hidden_size,
                                dtype=data.dtype, device=data.device)
        else:
            h, c = h0, c0
            want = 3 if batched else 2
            kind = "batched 3-D" if batched else "unbatched 2-D"
            if c is not None:
                if h.dim() != want or c.dim() != want:
                    raise RuntimeError(
                        f"For {kind} input, hx and cx should also be {want}-D but got "
                        f"({h.dim()}-D, {c.dim()}-D) tensors")
                if not batched:
                    c = c.unsqueeze(1)
            elif h.dim() != want:
                raise RuntimeError(
                    f"For {kind} input, hx should also be {want}-D but got {h.dim()}-D tensor")
            if not batched:
                h = h.unsqueeze(1)
        self.check_input(data, None)  # torch.nn's rank and feature-size checks
        weights = self._flat_weights
        if data.dtype != weights[0].dtype:  # the rest of check_input, skipped when scripted
            w, x = _dtype_name(weights[0].dtype), _dtype_name(data.dtype)
            raise ValueError(f"RNN input dtype ({x}) does not match weight dtype ({w}). "
                             f"Convert input: input.to({w}), or convert model: model.to({x})")
        expected = (self.num_layers * dirs, batch, out_size)
        if c is not None:
            _check_size(h, expected, "hidden[0]")
            _check_size(c, (self.num_layers * dirs, batch, self.hidden_size), "hidden[1]")
        else:
            _check_size(h, expected, "hidden")
        if data.size(1 if self.batch_first else 0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if c is not None:
            _check_device(name, data, "hx[0]", h)
            _check_device(name, data, "hx[1]", c)
            _autocast_changes(name, data)
            _check_dtypes(name, data, ("hx[0]", h), ("hx[1]", c), weights[0])
        else:
            _check_device(name, data, "hx", h)
            _autocast_changes(name, data)
            _check_dtypes(name, data, ("hx", h), ("hx", h), weights[0])
        if self.batch_first:
            data = data.transpose(0, 1)
        reset_after = True
        if hasattr(self, "reset_after"):
            reset_after = self.reset_after
        output, h_n, c_n = _rnn_layers(lstm, data, h, c, weights, self.bias,
                                       self.proj_size > 0, self.num_layers, dirs,
                                       float(self.dropout), self.training, reset_after)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            output = output.squeeze(batch_dim)
            h_n = h_n.squeeze(1)
            if c_n is not None:
                c_n = c_n.squeeze(1)
        return output, h_n, c_n


class ScriptedCell:
    """TorchScript forward of fusedrnn.LSTMCell and GRUCell (mixed into them).
    See Note [TorchScript]."""

    def _scripted_lstm_cell(self, input: Tensor,
                            hx: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
        h: Optional[Tensor] = None
        c: Optional[Tensor] = None
        if hx is not None:
            h, c = hx
        h1, c1 = self._scripted_cell("LSTMCell", input, h, c)
        assert c1 is not None
        return h1, c1

    def _scripted_gru_cell(self, input: Tensor, hx: Optional[Tensor]) -> Tensor:
        h1, _ = self._scripted_cell("GRUCell", input, hx, None)
        return h1

    def _scripted_cell(self, name: str, input: Tensor, h: Optional[Tensor],
                       c: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """modules._cell_inputs and functional.cell: input [B, I] or [I]."""
        lstm = name == "LSTMCell"
        if input.dim() != 1 and input.dim() != 2:
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if h is not None:
            given = [h]
            if c is not None:
                given.append(c)
            for idx, value in enumerate(given):
                if value.dim() != 1 and value.dim() != 2:
                    what = f"hx[{idx}]" if lstm else "hidden"
                    raise ValueError(
                        f"{name}: Expected {what} to be 1D or 2D, got {value.dim()}D instead")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if h is None:
            h1 = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype,
                             device=input.device)
            c1: Optional[Tensor] = None
            if lstm:
                c1 = torch.zeros_like(h1)
        else:
            h1, c1 = h, c
            if not batched:
                h1 = h1.unsqueeze(0)
                if c1 is not None:
                    c1 = c1.unsqueeze(0)
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} "
                               f"expected {self.input_size}")
        states = [h1]
        if c1 is not None:
            states.append(c1)
        for idx, s in enumerate(states):
            if s.size(0) != input.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{idx} "
                                   f"batch size {s.size(0)}")
            if s.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{idx} has inconsistent hidden_size: got {s.size(1)}, "
                                   f"expected {self.hidden_size}")
        matmul_name = "hx[0]" if lstm else "hx"
        state_name = "hx[1]" if lstm else "hx"
        _check_device(name, input, matmul_name, h1)
        _check_device(name, input, state_name, states[-1])
        _autocast_changes(name, input)
        _check_dtypes(name, input, (matmul_name, h1), (state_name, states[-1]), self.weight_ih)
        reset_after = True
        if hasattr(self, "reset_after"):
            reset_after = self.reset_after
        x_proj = torch.ops.fusedrnn.linear(input, self.weight_ih, self.bias_ih).unsqueeze(0)
        _, h_new, c_new = _layer(lstm, x_proj, h1, c1, self.weight_hh, None, self.bias_hh, False,
                                 reset_after)
        if batched:
            return h_new, c_new
        if c_new is not None:
            c_new = c_new.squeeze(0)
        return h_new.squeeze(0), c_new
