"""Between torch.nn and fusedrnn: from_torch and replace_rnns move recurrent layers onto
fusedrnn; to_torch and restore_rnns move them back (e.g. for tools that only know
torch.nn: ONNX export, TorchScript, other runtimes)."""
import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import regularised
from .modules import GRU, LSTM, GRUCell, LSTMCell

_TWINS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell}
_TORCH = {fused: torch_cls for torch_cls, fused in _TWINS.items()}
# Options beyond torch.nn, as (attribute, the value that torch.nn computes): a module
# with another value has no torch.nn equivalent, and to_torch refuses it.
_TORCH_ONLY_FORM = (("reset_after", True),) + tuple(zip(regularised.OPTIONS,
                                                       regularised.Options()))


def _config(m):
    if isinstance(m, nn.RNNBase):
        kw = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first,
                  dropout=m.dropout, bidirectional=m.bidirectional)
        if m.mode == "LSTM":
            kw["proj_size"] = m.proj_size
        return (m.input_size, m.hidden_size), kw
    return (m.input_size, m.hidden_size), dict(bias=m.bias)


def _plain_type(module):
    """module's class, or for a module with parametrized weights
    (torch.nn.utils.parametrize) the class it was made from."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _twin(module, twin_cls, options=None):
    """A twin_cls built with module's configuration (and `options`, keyword
    arguments beyond torch.nn): a copy of its weights on the same device and dtype,
    the same requires_grad flags and train/eval mode, and copies of its weights'
    parametrizations (weight_norm, spectral_norm, ...) with their state. New
    LayerNorm parameters get their initial values (ones and zeros)."""
    args, kw = _config(module)
    p = next(module.parameters())
    # Built on the meta device: no initialisation to overwrite, and the global
    # RNG is left as it was (as if the module had not been converted).
    twin = twin_cls(*args, **kw, **(options or {}), device="meta",
                    dtype=p.dtype).to_empty(device=p.device)
    for name, chain in getattr(module, "parametrizations", {}).items():
        for f in chain:  # their originals and buffers come with the state_dict below
            parametrize.register_parametrization(twin, name, copy.deepcopy(f), unsafe=True)
    with torch.no_grad():
        missing, unexpected = twin.load_state_dict(module.state_dict(), strict=False)
        if unexpected or not all(regularised.is_ln_parameter(n) for n in missing):
            twin.load_state_dict(module.state_dict())  # raises torch's error
        regularised.reset_layer_norm(twin)
    for name, param in module.named_parameters():
        twin.get_parameter(name).requires_grad_(param.requires_grad)
    return twin.train(module.training)


def from_torch(module, **options):
    """The fusedrnn twin of an nn.LSTM/GRU/LSTMCell/GRUCell: same configuration,
    a copy of its weights on the same device and dtype, the same requires_grad
    flags and train/eval mode. `options` are fusedrnn's keyword arguments beyond
    torch.nn (layer_norm=True, zoneout=p, ...; see fusedrnn.LSTM), e.g.
    from_torch(lstm, layer_norm=True, zoneout=0.1): the torch weights are copied,
    the new LayerNorm parameters start at ones (gains) and zeros (biases)."""
    cls = _plain_type(module)
    twin_cls = _TWINS.get(cls)
    if twin_cls is None:
        if cls in _TORCH:
            raise TypeError(f"{type(module).__name__} is already a fusedrnn module")
        raise TypeError("from_torch expects torch.nn.LSTM, GRU, LSTMCell or GRUCell, got "
                        f"{type(module).__name__}")
    return _twin(module, twin_cls, options)


def to_torch(module):
    """The torch.nn twin of a fusedrnn LSTM/GRU/LSTMCell/GRUCell, the inverse of
    from_torch: same configuration, a copy of its weights on the same device and dtype,
    the same requires_grad flags and train/eval mode. Raises ValueError for a module
    that torch.nn cannot compute (a GRU with reset_after=False, any of the regularisers
    layer_norm, zoneout, zoneout_cell, recurrent_dropout, weight_drop)."""
    cls = _plain_type(module)
    torch_cls = _TORCH.get(cls)
    if torch_cls is None:
        if cls in _TWINS:
            raise TypeError(f"{type(module).__name__} is already a torch.nn module")
        raise TypeError("to_torch expects fusedrnn.LSTM, GRU, LSTMCell or GRUCell, got "
                        f"{type(module).__name__}")
    _refuse_beyond_torch(module)
    return _twin(module, torch_cls)


def replace_rnns(model, **options):
    """Swaps every nn.LSTM/GRU/LSTMCell/GRUCell inside `model` (at any depth) for
    its fusedrnn twin, in place, and returns `model` (or the twin, when `model`
    itself is one of them). A module registered in several places (shared
    weights) gets one twin, registered in all of them. `options` go to every twin
    (from_torch); one that a twin does not take (zoneout_cell on a GRU,
    recurrent_dropout on a cell, ...) raises before anything is changed: give
    different options to different modules with from_torch."""
    twins = {}
    for m in model.modules():  # every twin built first: an error changes nothing
        if _plain_type(m) in _TWINS and m not in twins:
            twins[m] = from_torch(m, **options)
    return _replace(model, _TWINS, from_torch, twins)


def restore_rnns(model):
    """The inverse of replace_rnns: swaps every fusedrnn LSTM/GRU/LSTMCell/GRUCell
    inside `model` for its torch.nn twin (to_torch), in place, and returns `model` (or
    the twin, when `model` itself is one of them). Shared modules stay shared. Raises
    before changing anything when one of them has no torch.nn equivalent."""
    for m in model.modules():
        if _plain_type(m) in _TORCH:
            _refuse_beyond_torch(m)
    return _replace(model, _TORCH, to_torch, {})


def _refuse_beyond_torch(module):
    for attr, torch_value in _TORCH_ONLY_FORM:
        value = getattr(module, attr, torch_value)
        if value != torch_value:
            name = type(module).__name__
            raise ValueError(f"fusedrnn.{name} with {attr}={value} has no torch.nn equivalent: "
                             f"torch.nn.{name} is the {attr}={torch_value} form")


def _replace(module, classes, convert, twins):
    if _plain_type(module) in classes:
        if module not in twins:
            twins[module] = convert(module)
        return twins[module]
    # _modules, not named_children(): that skips a module's second name.
    for name, child in list(module._modules.items()):
        if child is not None:
            new = _replace(child, classes, convert, twins)
            if new is not child:
                setattr(module, name, new)
    return module
