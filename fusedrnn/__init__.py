"""fusedrnn: fused LSTM and GRU layers for PyTorch (CPU and CUDA kernels)."""
import torch

# init, pooling and gradflow import only torch: loading them eagerly costs nothing measurable.
from . import _ops, gradflow, init, pooling, reference
from ._ops import gru_layer, lstm_layer
from .convert import from_torch, replace_rnns, restore_rnns, to_torch
from .modules import GRU, LSTM, GRUCell, LSTMCell
from .pooling import AttentionPool, MaxPool, MeanPool  # for Note [Safe globals]

# Note [Safe globals]
# torch.load's default (weights_only=True, torch >= 2.6) unpickles only allowed
# classes, so a whole-model checkpoint (torch.save(model)) holding our modules
# would not load in a script that allows only its own classes and torch.nn's,
# as it must for torch.nn.LSTM. Allowing these classes is safe: unpickling one
# makes an instance without calling __init__ and sets its state through
# nn.Module's (or nn.RNNBase's) __setstate__, which only stores attributes (and
# rebuilds RNNBase's list of its weights from them); the state itself passes the
# same weights_only checks (tensors, numbers, strings, lists, dicts). None of
# them holds anything else: parameters, the sizes and flags of the constructor
# (reset_after and layer_norm bools, the regularisers' rates floats), RNNBase's
# weight-name lists, and AttentionPool's scorer, a torch.nn.Linear or a
# Sequential of Linear and Tanh (torch.nn's classes, which the script allows
# as for any torch.nn module it holds).
torch.serialization.add_safe_globals([LSTM, GRU, LSTMCell, GRUCell,
                                      MeanPool, MaxPool, AttentionPool])

__all__ = ["GRU", "LSTM", "GRUCell", "LSTMCell", "backends", "empty_cpu_cache", "from_torch",
           "gradflow", "gru_layer", "init", "lstm_layer", "pooling", "reference",
           "replace_rnns", "restore_rnns", "to_torch"]


def empty_cpu_cache():
    """Gives back the memory that fusedrnn keeps for reuse by later CPU calls
    (its large step buffers, Note [reused step buffers] in
    csrc/cpu/step_buffers.cpp), as torch.cuda.empty_cache() does on CUDA.
    Returns the number of bytes released."""
    held = torch.ops.fusedrnn._step_buffer_cache_bytes()
    torch.ops.fusedrnn._empty_step_buffer_cache()
    return held


def backends():
    """Devices with kernels compiled into this build, e.g. {"cpu": True, "cuda": False}."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {dev.lower(): has("fusedrnn::lstm_forward", dev) for dev in ("CPU", "CUDA")}
