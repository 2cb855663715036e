"""fusedrnn: fused LSTM and GRU layers for PyTorch (CPU and CUDA kernels)."""
import torch

from . import _ops, reference
from ._ops import gru_layer, lstm_layer
from .convert import from_torch, replace_rnns
from .modules import GRU, LSTM, GRUCell, LSTMCell

__all__ = ["GRU", "LSTM", "GRUCell", "LSTMCell", "backends", "from_torch", "gru_layer",
           "lstm_layer", "reference", "replace_rnns"]


def backends():
    """Devices with kernels compiled into this build, e.g. {"cpu": True, "cuda": False}."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {dev.lower(): has("fusedrnn::lstm_forward", dev) for dev in ("CPU", "CUDA")}
