"""Between torch.nn and fusedrnn: from_torch and replace_rnns move recurrent layers onto
fusedrnn; to_torch and restore_rnns move them back (e.g. for tools that only know
torch.nn: ONNX export, TorchScript, other runtimes)."""
import torch
from torch import nn

from .modules import GRU, LSTM, GRUCell, LSTMCell

_TWINS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell}
_TORCH = {fused: torch_cls for torch_cls, fused in _TWINS.items()}
# Options beyond torch.nn, as (attribute, the value that torch.nn computes): a module
# with another value has no torch.nn equivalent, and to_torch refuses it.
_TORCH_ONLY_FORM = (("reset_after", True),)


def _config(m):
    if isinstance(m, nn.RNNBase):
        kw = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first,
                  dropout=m.dropout, bidirectional=m.bidirectional)
        if m.mode == "LSTM":
            kw["proj_size"] = m.proj_size
        return (m.input_size, m.hidden_size), kw
    return (m.input_size, m.hidden_size), dict(bias=m.bias)


def _twin(module, twin_cls):
    """A twin_cls built with module's configuration: a copy of its weights on the same
    device and dtype, the same requires_grad flags and train/eval mode."""
    args, kw = _config(module)
    p = next(module.parameters())
    # Built on the meta device: no initialisation to overwrite, and the global
    # RNG is left as it was (as if the module had not been converted).
    twin = twin_cls(*args, **kw, device="meta", dtype=p.dtype).to_empty(device=p.device)
    with torch.no_grad():
        twin.load_state_dict(module.state_dict())
    for name, param in module.named_parameters():
        getattr(twin, name).requires_grad_(param.requires_grad)
    return twin.train(module.training)


def from_torch(module):
    """The fusedrnn twin of an nn.LSTM/GRU/LSTMCell/GRUCell: same configuration,
    a copy of its weights on the same device and dtype, the same requires_grad
    flags and train/eval mode."""
    twin_cls = _TWINS.get(type(module))
    if twin_cls is None:
        if type(module) in _TORCH:
            raise TypeError(f"{type(module).__name__} is already a fusedrnn module")
        raise TypeError("from_torch expects torch.nn.LSTM, GRU, LSTMCell or GRUCell, got "
                        f"{type(module).__name__}")
    return _twin(module, twin_cls)


def to_torch(module):
    """The torch.nn twin of a fusedrnn LSTM/GRU/LSTMCell/GRUCell, the inverse of
    from_torch: same configuration, a copy of its weights on the same device and dtype,
    the same requires_grad flags and train/eval mode. Raises ValueError for a module
    that torch.nn cannot compute (a GRU with reset_after=False)."""
    torch_cls = _TORCH.get(type(module))
    if torch_cls is None:
        if type(module) in _TWINS:
            raise TypeError(f"{type(module).__name__} is already a torch.nn module")
        raise TypeError("to_torch expects fusedrnn.LSTM, GRU, LSTMCell or GRUCell, got "
                        f"{type(module).__name__}")
    _refuse_beyond_torch(module)
    return _twin(module, torch_cls)


def replace_rnns(model):
    """Swaps every nn.LSTM/GRU/LSTMCell/GRUCell inside `model` (at any depth) for
    its fusedrnn twin, in place, and returns `model` (or the twin, when `model`
    itself is one of them). A module registered in several places (shared
    weights) gets one twin, registered in all of them."""
    return _replace(model, _TWINS, from_torch, {})


def restore_rnns(model):
    """The inverse of replace_rnns: swaps every fusedrnn LSTM/GRU/LSTMCell/GRUCell
    inside `model` for its torch.nn twin (to_torch), in place, and returns `model` (or
    the twin, when `model` itself is one of them). Shared modules stay shared. Raises
    before changing anything when one of them has no torch.nn equivalent."""
    for m in model.modules():
        if type(m) in _TORCH:
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
    if type(module) in classes:
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
