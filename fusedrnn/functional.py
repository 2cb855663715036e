"""Layer stacking, directions, packed sequences, dropout and dtypes around the ops.

One op call per layer and direction; no Python loop over time steps. The input
projection x W_ih^T + b_ih of all steps is one GEMM (fusedrnn::linear) per layer
and direction, so autograd forms dW_ih and db_ih with one GEMM/reduction each.

Note [Autocast]
torch.nn's result dtypes under autocast depend on the implementation it
dispatches to. What it runs as one library kernel (cuDNN on CUDA, the CUDA
cells, oneDNN for a CPU LSTM without projection on padded float32/bfloat16
input) autocast casts as a whole: every result is in the autocast dtype. Its
unfused ATen loop (CPU GRU, packed or projected CPU LSTM, CPU cells) has only
its matmuls cast; the pointwise update then promotes them with the state it
carries (c for LSTM, h for GRU), so the results take promote(autocast dtype,
state dtype), except the projected h of an LSTM with proj_size, which is a
matmul's. We return the same dtypes, and where they are wider than the
autocast dtype we compute in them (more accurate than torch's low-precision
matmuls). Autocast never casts float64. The same promotion lets torch.nn's
unfused loop take a c0 of another float dtype without autocast; so do we.
"""
import contextlib

import torch
import torch.nn.functional as F

from . import _ops, regularised

_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device_type):
    """The dtype autocast asks for on this device, or None (also on a device
    autocast does not know, such as meta, where is_autocast_enabled raises).
    That is asked in eager mode only: torch 2.11's Dynamo cannot trace it."""
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return None
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _torch_fuses(mode, data, packed, proj):
    """Whether torch.nn runs this whole-sequence call as one cuDNN/oneDNN kernel
    (Note [Autocast]); mirrors use_cudnn/use_mkldnn in aten/src/ATen/native/RNN.cpp."""
    if data.numel() == 0:
        return False
    if data.device.type == "cuda":
        return torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled
    if data.device.type != "cpu" or mode != "LSTM" or packed or proj:
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if data.dtype == torch.float32:
        return True
    if data.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if data.dtype == torch.float16:
        return not torch.is_grad_enabled() and torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


def plan_dtypes(name, x, matmul_states, state_name, state, weight, fused, ac, proj=False):
    """The dtypes torch.nn gives this call (Note [Autocast]), checking its inputs.

    x: the input; matmul_states: (name, tensor) pairs of the states that enter a
    matmul with the weights; state: the state the pointwise update promotes with
    (c0 for LSTM, h0 for GRU); weight: any weight; fused: whether torch.nn runs
    the call as one library kernel (a callable, asked only when it matters);
    ac: autocast_dtype(x.device.type). Returns (compute dtype, dtype of output
    and h_n, dtype of c_n). Raises RuntimeError where torch.nn fails in a
    matmul or in cuDNN/oneDNN.
    """
    def low(t):  # t's dtype in a matmul under autocast
        return ac if ac is not None and t.dtype in _AUTOCAST_ELIGIBLE else t.dtype

    w = low(weight)
    under = "" if ac is None else f" under autocast to {ac}"
    for what, t in [("input", x)] + matmul_states:
        if low(t) != w:
            raise RuntimeError(f"{name}: {what} dtype ({t.dtype}) does not match weight dtype "
                               f"({weight.dtype}){under}")
    if ac is None and state.dtype == w:
        return w, w, w
    if fused():
        if torch.promote_types(w, low(state)) != w:
            raise RuntimeError(
                f"{name}: {state_name} dtype ({state.dtype}) is wider than the weight dtype "
                f"({weight.dtype}){under}")
        return w, w, w
    s = torch.promote_types(w, state.dtype)
    return s, (w if proj else s), s


def _caster(dtype):
    """t -> t in dtype (None stays None). Tensor.to costs about 0.7 us even when
    it returns t itself, and a cell call casts ten tensors."""
    return lambda t: t if t is None or t.dtype == dtype else t.to(dtype)


def _autocast_off(device_type, ac):
    # Our casts are explicit (plan_dtypes); nothing inside may recast them.
    return contextlib.nullcontext() if ac is None else torch.autocast(device_type, enabled=False)


def check_devices(name, x, named):
    """Raises unless every (name, tensor) in `named` is on x's device."""
    for what, t in named:
        if t.device != x.device:
            raise RuntimeError(f"{name}: {what} is on {t.device} but input is on {x.device}")


def _layer(lstm, x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse, reset_after=True,
           reg=None):
    """One op call: (output, h_n) or (output, h_n, c_n). reg: a LayerReg or None
    (the plain layer)."""
    if x_proj.numel() == 0:
        # The op needs B > 0 and torch.nn takes an empty batch. Zero-size results
        # that still depend on every input, so backward gives torch.nn's zero
        # gradients rather than None.
        anchor = sum(t.sum() for t in (x_proj, h0, c0, w_hh, w_hr, b_hh, *(reg or ()))
                     if t is not None) * 0
        out = x_proj.new_zeros((*x_proj.shape[:-1], w_hh.size(1))) + anchor
        return (out, h0 + anchor) + ((c0 + anchor,) if lstm else ())
    if lstm:
        return _ops.lstm_layer(x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse=reverse,
                               reg=reg)
    return _ops.gru_layer(x_proj, h0, w_hh, b_hh, batch_sizes, reverse=reverse,
                          reset_after=reset_after, reg=reg)


def _stack(lstm, layer_in, num_layers, dropout, training, dirs, one):
    """The layers' loop: dropout between layers in training, and per layer and
    direction k, one(k, its input, reverse) -> (output, h_n[, c_n]). Returns
    the last layer's output (directions concatenated), the h_n and the c_n."""
    h_n, c_n = [], []
    for layer in range(num_layers):
        if layer > 0 and dropout > 0 and training:
            layer_in = F.dropout(layer_in, dropout, True)
        outs = []
        for d in range(dirs):
            res = one(layer * dirs + d, layer_in, d == 1)
            outs.append(res[0])
            h_n.append(res[1])
            if lstm:
                c_n.append(res[2])
        layer_in = outs[0] if dirs == 1 else torch.cat(outs, dim=-1)
    return layer_in, h_n, c_n


def _nothing_to_plan(x, states, weights):
    """Whether a call on input x has no dtype or autocast planning to do (the
    short way of _plain_layers): eager, on the CPU or CUDA, no
    autocast on x's device, every state (None: absent) of x's dtype and on its
    device, every weight (None: absent) of x's dtype. The weights' devices are
    the ops' to check, as for the planned path."""
    dev, dtype = x.device, x.dtype
    if (dev.type not in ("cpu", "cuda") or torch.compiler.is_compiling()
            or torch.is_autocast_enabled(dev.type)):
        return False
    for t in states:
        if t is not None and (t.dtype != dtype or t.device != dev):
            return False
    for t in weights:
        if t is not None and t.dtype != dtype:
            return False
    return True


def _plain_layers(lstm, data, h0, c0, weights, num_layers, dropout, training, dirs,
                  reset_after):
    """rnn_layers() for a padded stack without regularisers where it has nothing
    to plan: no autocast, every state and weight of data's dtype, the states on
    its device, a batch. The same ops in the same order, without the dtype and
    regulariser planning.

    Note [a plain stack's short way]
    A layer called on a short input (one step at a time, as in a decoder or an
    agent's loop) is mostly Python: LSTM(8, 8) on one step took 113 us, its two
    ops 33 us (2-core Xeon). Interleaved, inference, one step, two runs: LSTM(8,
    8) 115 -> 95 and 144 -> 134 us (torch.nn 89 and 114 us), GRU(8, 8) 90 -> 75
    and 123 -> 107 us (torch.nn 46 and 71 us); at H=256 3-13% faster; at T=100
    within the noise. Returns None where rnn_layers must plan."""
    if data.numel() == 0 or not _nothing_to_plan(data, (h0, c0),
                                                  (t for ws in weights for t in ws)):
        return None

    def one(k, layer_in, reverse):
        w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
        c = c0[k] if lstm else None
        if w_hr is None:  # Note [a layer and its projection in one node]
            return _ops.input_layer(lstm, layer_in, h0[k], c, w_ih, w_hh, b_ih, b_hh, reverse,
                                    reset_after)
        return _layer(lstm, _ops.linear(layer_in, w_ih, b_ih), h0[k], c, w_hh, w_hr, b_hh, None,
                      reverse, reset_after)

    out, h_n, c_n = _stack(lstm, data, num_layers, dropout, training, dirs, one)
    return out, ((torch.stack(h_n), torch.stack(c_n)) if lstm else torch.stack(h_n))


def rnn_layers(mode, data, batch_sizes, hx, weights, num_layers, dropout, training,
               bidirectional, reset_after=True, options=regularised.Options(), ln_weights=None):
    """Runs the stack.

    mode: "LSTM" or "GRU". data: [T, B, I] (time-major) or packed [N, I] with
    batch_sizes. hx: h0 [L*D, B, P] (and c0 [L*D, B, H] for LSTM, as a tuple).
    weights: one (w_ih, w_hh, b_ih, b_hh, w_hr) tuple per layer and direction,
    in torch's order (layer-major, forward before reverse); absent ones None.
    reset_after: GRU form (False: the classic one, reference.gru_cell).
    options: the regularisers (regularised.Options); ln_weights: with layer_norm,
    one (gamma_ih, gamma_hh, gamma_c, beta_c) per layer and direction, as weights.
    Returns output ([T, B, D*P] or [N, D*P]) and h_n (LSTM: (h_n, c_n)).
    """
    lstm = mode == "LSTM"
    dirs = 2 if bidirectional else 1
    h0, c0 = hx if lstm else (hx, None)
    if batch_sizes is None and ln_weights is None and not regularised.any_on(options):
        res = _plain_layers(lstm, data, h0, c0, weights, num_layers, dropout, training, dirs,
                            reset_after)
        if res is not None:
            return res
    if batch_sizes is not None and not torch.compiler.is_compiling():
        # torch.nn takes steps of no rows at the end (the ops do not): they change nothing.
        batch_sizes = batch_sizes[:int(torch.count_nonzero(batch_sizes))]
    proj = weights[0][4] is not None
    matmul_states = [("hx[0]" if lstm else "hx", h0)]
    state_name, state = ("hx[1]", c0) if lstm else ("hx", h0)
    fused = lambda: _torch_fuses(mode, data, batch_sizes is not None, proj)  # noqa: E731
    ac = autocast_dtype(data.device.type)
    compute, out_dtype, c_dtype = plan_dtypes(mode, data, matmul_states, state_name, state,
                                              weights[0][0], fused, ac, proj)
    cast = _caster(compute)

    def one(k, layer_in, reverse):
        w_ih, w_hh, b_ih, b_hh, w_hr = (cast(w) for w in weights[k])
        ln = None if ln_weights is None else [cast(w) for w in ln_weights[k]]
        w_hh = regularised.drop_weight(w_hh, options.weight_drop, training)
        x_proj = regularised.project(layer_in, w_ih, b_ih, ln)
        reg = regularised.layer_reg(options, training, x_proj, h0[k], c0[k] if lstm else None,
                                    ln, b_ih)
        return _layer(lstm, x_proj, h0[k], c0[k] if lstm else None, w_hh, w_hr, b_hh,
                      batch_sizes, reverse, reset_after, reg)

    with _autocast_off(data.device.type, ac):
        h0, c0 = cast(h0), cast(c0)
        out, h_n, c_n = _stack(lstm, cast(data), num_layers, dropout, training, dirs, one)
    to_out = _caster(out_dtype)
    h_n = to_out(torch.stack(h_n))
    return to_out(out), ((h_n, _caster(c_dtype)(torch.stack(c_n))) if lstm else h_n)


def cell(mode, input, states, w_ih, w_hh, b_ih, b_hh, reset_after=True,
         options=regularised.Options(), ln_weights=None, training=False):
    """One step of LSTMCell or GRUCell: input [B, I], states (h [B, H],) or (h, c).
    options, ln_weights (one tuple) and training as for rnn_layers; zoneout draws
    fresh masks on every call. Returns the new states, as a tuple."""
    lstm = mode == "LSTM"
    name = f"{mode}Cell"
    matmul_states = [("hx[0]" if lstm else "hx", states[0])]
    state_name = "hx[1]" if lstm else "hx"
    check_devices(name, input, matmul_states + [(state_name, states[-1])])
    # torch's CUDA cells are fused kernels that autocast casts whole; its CPU cells are unfused.
    fused = lambda: input.device.type == "cuda"  # noqa: E731
    ac = autocast_dtype(input.device.type)
    compute, out_dtype, c_dtype = plan_dtypes(name, input, matmul_states, state_name, states[-1],
                                              w_ih, fused, ac)
    cast = _caster(compute)
    with _autocast_off(input.device.type, ac):
        ln = None if ln_weights is None else [cast(w) for w in ln_weights[0]]
        x_proj = regularised.project(cast(input), cast(w_ih), cast(b_ih), ln).unsqueeze(0)
        h0, c0 = cast(states[0]), cast(states[-1]) if lstm else None
        reg = regularised.layer_reg(options, training, x_proj, h0, c0, ln, cast(b_ih))
        res = _layer(lstm, x_proj, h0, c0, cast(w_hh), None, cast(b_hh), None, False,
                     reset_after, reg)
    h = _caster(out_dtype)(res[1])
    return (h, _caster(c_dtype)(res[2])) if lstm else (h,)
