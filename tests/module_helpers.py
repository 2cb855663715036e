"""Shared pieces of the module tests: twin modules, inputs for every layout, and
one call that returns every output and every gradient."""
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from torch.utils._python_dispatch import TorchDispatchMode

import fusedrnn

from helpers import B, H, I, T

LAYOUTS = ("padded", "unbatched", "packed", "packed_unsorted")
# Packed batches: sorted for enforce_sorted=True, shuffled for enforce_sorted=False.
PACKED_LENGTHS = {"packed": [T, 3, 3, 1], "packed_unsorted": [3, T, 1, 3]}


def twins(kind, device, dtype, **kw):
    """(torch.nn module, fusedrnn module) with the same weights."""
    ref = getattr(nn, kind)(I, H, **kw).to(device, dtype)
    ours = getattr(fusedrnn, kind)(I, H, **kw).to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def rnn_inputs(module, layout, hx_given, device, dtype, generator=None):
    """Leaf tensors of a call: {"x", "h0", "c0"} (states only when given),
    shaped for `module` (an nn.LSTM/GRU or its twin) and `layout`."""
    lstm = module.mode == "LSTM"
    dirs = 2 if module.bidirectional else 1
    out = module.proj_size if module.proj_size > 0 else module.hidden_size
    batch = len(PACKED_LENGTHS[layout]) if layout.startswith("packed") else B
    opts = dict(device=device, dtype=dtype, generator=generator)
    if layout == "unbatched":
        leaves = {"x": torch.randn(T, module.input_size, **opts)}
        state_shape = (module.num_layers * dirs,)
    else:
        shape = (batch, T) if module.batch_first else (T, batch)
        leaves = {"x": torch.randn(*shape, module.input_size, **opts)}
        state_shape = (module.num_layers * dirs, batch)
    if hx_given:
        leaves["h0"] = torch.randn(*state_shape, out, **opts)
        if lstm:
            leaves["c0"] = torch.randn(*state_shape, module.hidden_size, **opts)
    return leaves


def rnn_call_args(module, layout, leaves):
    """(input, hx) for module(input, hx) from the leaves of rnn_inputs."""
    x = leaves["x"]
    if layout.startswith("packed"):
        x = pack_padded_sequence(x, PACKED_LENGTHS[layout], batch_first=module.batch_first,
                                 enforce_sorted=layout == "packed")
    if "h0" not in leaves:
        return x, None
    return x, ((leaves["h0"], leaves["c0"]) if "c0" in leaves else leaves["h0"])


def flat_outputs(result):
    """[output (packed: its data), h_n(, c_n)] of an RNN, or the states of a cell."""
    if isinstance(result, torch.Tensor):
        return [result]
    out, hidden = result
    if isinstance(out, PackedSequence):
        out = out.data
    if isinstance(hidden, torch.Tensor):
        return [out, hidden]
    return [out, *hidden]


def outputs_and_grads(module, args, leaves, weights=None):
    """Runs module(*args): (outputs, {name: gradient} for every leaf and parameter)
    of a random weighting of all outputs (the same weighting given the same
    `weights`, which is returned too)."""
    result = module(*args)
    outs = flat_outputs(result)
    if weights is None:
        g = torch.Generator(device=outs[0].device).manual_seed(1234)
        weights = [torch.randn(o.shape, generator=g, device=o.device, dtype=torch.float64)
                   for o in outs]
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    params = getattr(module, "_orig_mod", module).named_parameters()  # torch.compile'd or not
    named = dict(leaves, **dict(params))
    grads = torch.autograd.grad(loss, list(named.values()))
    return result, outs, dict(zip(named, grads)), weights


def fresh_leaves(leaves, dtype=None):
    """Copies of the leaves (optionally in another dtype) that require grad."""
    return {k: v.detach().to(dtype or v.dtype).requires_grad_(True) for k, v in leaves.items()}


class OpLog(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher inside it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))
