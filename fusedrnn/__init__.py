"""fusedrnn: fused LSTM and GRU layers for PyTorch (CPU and CUDA kernels)."""
import torch

# init, pooling and gradflow import only torch: loading them eagerly costs nothing measurable.
from . import _ops, gradflow, init, pooling, reference
from ._ops import gru_layer, lstm_layer
from .convert import from_torch, replace_rnns, restore_rnns, to_torch
from .modules import GRU, LSTM, GRUCell, LSTMCell

__all__ = ["GRU", "LSTM", "GRUCell", "LSTMCell", "backends", "from_torch", "gradflow",
           "gru_layer", "init", "lstm_layer", "pooling", "reference", "replace_rnns",
           "restore_rnns", "to_torch"]


def backends():
    """Devices with kernels compiled into this build, e.g. {"cpu": True, "cuda": False}."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {dev.lower(): has("fusedrnn::lstm_forward", dev) for dev in ("CPU", "CUDA")}
