"""from_torch and replace_rnns: move torch.nn recurrent layers onto fusedrnn."""
import torch
from torch import nn

from .modules import GRU, LSTM, GRUCell, LSTMCell

_TWINS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell}


def _config(m):
    if isinstance(m, nn.RNNBase):
        kw = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first,
                  dropout=m.dropout, bidirectional=m.bidirectional)
        if isinstance(m, nn.LSTM):
            kw["proj_size"] = m.proj_size
        return (m.input_size, m.hidden_size), kw
    return (m.input_size, m.hidden_size), dict(bias=m.bias)


def from_torch(module):
    """The fusedrnn twin of an nn.LSTM/GRU/LSTMCell/GRUCell: same configuration,
    a copy of its weights on the same device and dtype, the same requires_grad
    flags and train/eval mode."""
    twin_cls = _TWINS.get(type(module))
    if twin_cls is None:
        if type(module) in _TWINS.values():
            raise TypeError(f"{type(module).__name__} is already a fusedrnn module")
        raise TypeError("from_torch expects torch.nn.LSTM, GRU, LSTMCell or GRUCell, got "
                        f"{type(module).__name__}")
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


def replace_rnns(model):
    """Swaps every nn.LSTM/GRU/LSTMCell/GRUCell inside `model` (at any depth) for
    its fusedrnn twin, in place, and returns `model` (or the twin, when `model`
    itself is one of them). A module registered in several places (shared
    weights) gets one twin, registered in all of them."""
    return _replace(model, {})


def _replace(module, twins):
    if type(module) in _TWINS:
        if module not in twins:
            twins[module] = from_torch(module)
        return twins[module]
    # _modules, not named_children(): that skips a module's second name.
    for name, child in list(module._modules.items()):
        if child is not None:
            new = _replace(child, twins)
            if new is not child:
                setattr(module, name, new)
    return module
