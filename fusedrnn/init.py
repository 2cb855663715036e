"""Initialisation against vanishing and exploding gradients, for LSTM, GRU and RNN.

Works on any module whose parameters carry ``torch.nn``'s names and gate order:
layers ``weight_ih_l{k}[_reverse]``, ``weight_hh_l{k}[_reverse]``,
``bias_ih_l{k}[_reverse]``, ``bias_hh_l{k}[_reverse]`` (and ``weight_hr_l{k}[_reverse]``
for an LSTM's ``proj_size``); cells ``weight_ih``, ``weight_hh``, ``bias_ih``,
``bias_hh``. That covers ``torch.nn.LSTM/GRU/RNN/LSTMCell/GRUCell/RNNCell`` and their
``fusedrnn`` twins. Gate order: LSTM ``i, f, g, o``; GRU ``r, z, n``.

- Recurrent weights ``W_hh``: each gate block ``(H, H)`` orthogonal, so at the start
  the recurrent matmul neither shrinks nor grows the state along any direction (the
  Jacobian's singular values are 1 times the gate derivatives). Per block, not over the
  stacked ``(G*H, H)`` matrix: a stacked orthogonal matrix has orthonormal columns,
  which leaves each block with singular values well below 1. An LSTM projection
  ``W_hr`` ``(P, H)`` is on the recurrent path too and is made semi-orthogonal.
- Input weights ``W_ih``: Xavier (Glorot) uniform, per gate block ``(H, I)``, so each
  gate's pre-activation has fan-in ``I`` and fan-out ``H``.
- Biases: zero, except the gate that keeps the state, which starts at ``forget_bias``
  (default 1) so that the state is mostly carried over at the start.

Note [Forget bias with two biases]
``torch.nn`` adds two biases, ``b_ih + b_hh``; only their sum reaches the gate. We put
the whole value in ``bias_ih``'s slice and 0 in ``bias_hh``'s, so the gate's bias is
exactly ``forget_bias``. The LSTM forget gate is ``f`` (rows ``H:2H``):
``c_t = f * c_{t-1} + i * g``. A GRU has no forget gate; its update gate ``z`` (rows
``H:2H``) plays the keep role, ``h_t = (1 - z) * n + z * h_{t-1}``, so ``forget_bias``
is put on ``z``: a positive value keeps the previous state. (The ``n`` gate's
``b_hn`` sits inside the reset product ``r * (W_hn h + b_hn)``; it stays 0.) A plain
RNN has no gates; its biases are all zero. Modules built with ``bias=False`` keep
no bias and only get the weights.
"""

import re

import torch
from torch import nn

__all__ = ["init_rnn_", "orthogonal_recurrent_", "xavier_input_", "forget_bias_"]

_GATES_TO_KIND = {4: "lstm", 3: "gru", 1: "rnn"}
_KEEP_GATE = {"lstm": 1, "gru": 1}  # index of f (LSTM i,f,g,o) and of z (GRU r,z,n)
_HH_NAME = re.compile(r"^weight_hh(_l\d+(_reverse)?)?$")


def _recurrent_groups(module):
    """Yields ``(kind, hidden_size, params)`` for each layer and direction (or cell) that
    ``module`` or its submodules own; ``params`` maps ``weight_ih``, ``weight_hh``,
    ``bias_ih``, ``bias_hh``, ``weight_hr`` to the parameter or None."""
    found = False
    for sub in module.modules():
        own = dict(sub.named_parameters(recurse=False))
        for name in own:
            match = _HH_NAME.match(name)
            if match is None:
                continue
            suffix = match.group(1) or ""
            params = {
                k: own.get(k + suffix)
                for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
            }
            w_hh, w_hr = params["weight_hh"], params["weight_hr"]
            # With proj_size, W_hh is (4H, P) and W_hr is (P, H): take H from W_hr.
            hidden = getattr(sub, "hidden_size", None) or (
                w_hr.shape[1] if w_hr is not None else w_hh.shape[1]
            )
            gates, rest = divmod(w_hh.shape[0], hidden)
            if rest or gates not in _GATES_TO_KIND:
                raise ValueError(
                    f"init: {name} has {w_hh.shape[0]} rows, not 1, 3 or 4 gates of size {hidden}"
                )
            found = True
            yield _GATES_TO_KIND[gates], hidden, params
    if not found:
        raise ValueError(
            f"init: {type(module).__name__} holds no weight named like torch.nn's weight_hh*"
        )


def _blocks(weight, hidden):
    """The gate blocks of a stacked ``(G*H, ...)`` weight, as in-place views ``(H, ...)``."""
    return weight.split(hidden, dim=0)


@torch.no_grad()
def orthogonal_recurrent_(module, gain=1.0):
    """Makes every gate block of each ``W_hh`` (and each ``W_hr``) (semi-)orthogonal,
    scaled by ``gain``. Returns ``module``."""
    for _, hidden, p in _recurrent_groups(module):
        for block in _blocks(p["weight_hh"], hidden):
            nn.init.orthogonal_(block, gain=gain)
        if p["weight_hr"] is not None:
            nn.init.orthogonal_(p["weight_hr"], gain=gain)
    return module


@torch.no_grad()
def xavier_input_(module, gain=1.0):
    """Xavier-uniform on every gate block ``(H, I)`` of each ``W_ih``. Returns ``module``."""
    for _, hidden, p in _recurrent_groups(module):
        for block in _blocks(p["weight_ih"], hidden):
            nn.init.xavier_uniform_(block, gain=gain)
    return module


@torch.no_grad()
def forget_bias_(module, value=1.0):
    """Zeros the biases and sets the keep gate's bias (LSTM ``f``, GRU ``z``) to ``value``,
    all of it in ``bias_ih``; see Note [Forget bias with two biases]. Returns ``module``."""
    for kind, hidden, p in _recurrent_groups(module):
        for name in ("bias_ih", "bias_hh"):
            if p[name] is not None:
                p[name].zero_()
        if kind in _KEEP_GATE and p["bias_ih"] is not None:
            _blocks(p["bias_ih"], hidden)[_KEEP_GATE[kind]].fill_(value)
    return module


def init_rnn_(module, forget_bias=1.0, hh_gain=1.0, ih_gain=1.0):
    """All three: orthogonal recurrent blocks, Xavier input blocks, keep-gate bias.

    ``module`` may be an LSTM/GRU/RNN layer or cell, or any model holding some: every
    submodule with ``torch.nn``-named recurrent parameters is initialised. Raises
    ``ValueError`` if there is none. Returns ``module``.
    """
    orthogonal_recurrent_(module, hh_gain)
    xavier_input_(module, ih_gain)
    return forget_bias_(module, forget_bias)
