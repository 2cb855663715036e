"""Pooling over time that respects sequence lengths.

Every function and module here reduces a variable-length batch of sequences to one
vector per sequence, ``(B, F)``, and only the valid steps of each sequence count.
The input is either

- a ``torch.nn.utils.rnn.PackedSequence`` (sorted or ``enforce_sorted=False``); the
  result is in the original batch order, as ``pad_packed_sequence`` returns it; or
- a padded tensor, ``(T, B, F)`` or with ``batch_first=True`` ``(B, T, F)``, with
  ``lengths`` (``(B,)`` ints, a tensor or a list, each in ``[1, T]``); ``lengths=None``
  means every sequence has all ``T`` steps.

Note [Padded steps never count]
Padded steps are replaced (``masked_fill``) before any arithmetic touches them, never
multiplied by a zero mask: ``0 * nan`` and ``0 * inf`` are ``nan``, so a multiplied
mask would let whatever the padding holds leak into the result and, through the
backward of the scorer, into the parameter gradients. With ``masked_fill`` the result
is the same whatever the padding holds, and the gradient there is exactly zero.
"""

from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

__all__ = ["mean_pool", "max_pool", "attention_pool", "MeanPool", "MaxPool", "AttentionPool"]


def _padded_batch_major(x: Union[Tensor, PackedSequence], lengths: Optional[Tensor],
                        batch_first: bool) -> Tuple[Tensor, Tensor]:
    """Returns ``(x, mask)``: ``x`` as ``(B, T, F)``, ``mask`` ``(B, T)``, True at valid steps.
    Compiles with TorchScript (which passes ``lengths`` as a tensor or None)."""
    if isinstance(x, PackedSequence):
        if lengths is not None:
            raise ValueError("pooling: a PackedSequence carries its own lengths; pass lengths=None")
        padded, lengths = pad_packed_sequence(x, batch_first=True)
    else:
        if not torch.jit.is_scripting() and not isinstance(x, torch.Tensor):
            raise ValueError(f"pooling: expected a PackedSequence or a 3-D tensor, got "
                             f"{type(x).__name__}")
        if x.dim() != 3:
            layout = "(B, T, F)" if batch_first else "(T, B, F)"
            raise ValueError(f"pooling: expected a PackedSequence or a 3-D tensor ({layout}), "
                             f"got {_shape(x)}")
        padded = x if batch_first else x.transpose(0, 1)
    batch, steps = padded.size(0), padded.size(1)
    if lengths is None:
        return padded, torch.ones(batch, steps, dtype=torch.bool, device=padded.device)
    lengths = torch.as_tensor(lengths, device=padded.device)
    if (lengths.dim() != 1 or lengths.size(0) != batch or lengths.is_floating_point()
            or lengths.is_complex()):
        raise ValueError(
            f"pooling: lengths must be {batch} integers, one per sequence, got {lengths}"
        )
    # Each sequence needs at least one valid step: the mean and the max of nothing are undefined.
    # Under torch.compile and torch.export the lengths are data, not known while tracing:
    # there the check runs with the graph (an assert op) instead of branching in Python.
    compiling = False
    if not torch.jit.is_scripting():
        compiling = torch.compiler.is_compiling()
    if compiling:
        torch._assert_async(((lengths >= 1) & (lengths <= steps)).all(),
                            "pooling: every length must be in [1, T]")
    elif bool(((lengths < 1) | (lengths > steps)).any()):
        values: List[int] = lengths.tolist()
        raise ValueError(f"pooling: every length must be in [1, {steps}], got {values}")
    mask = torch.arange(steps, device=padded.device) < lengths.unsqueeze(1)
    return padded, mask


def _shape(x: Tensor) -> str:
    """x's shape as a tuple, e.g. (5, 7)."""
    return "(" + ", ".join([str(n) for n in x.shape]) + ("," if x.dim() == 1 else "") + ")"


def mean_pool(x: Union[Tensor, PackedSequence], lengths: Optional[Tensor] = None,
              batch_first: bool = False) -> Tensor:
    """Mean of the valid steps of each sequence.

    x: PackedSequence, or ``(T, B, F)`` / ``(B, T, F)`` with ``lengths`` ``(B,)``.
    Returns ``(B, F)``.
    """
    padded, mask = _padded_batch_major(x, lengths, batch_first)
    total = padded.masked_fill(~mask.unsqueeze(-1), 0).sum(1)
    return total / mask.sum(1, keepdim=True).to(total.dtype)


def max_pool(x: Union[Tensor, PackedSequence], lengths: Optional[Tensor] = None,
             batch_first: bool = False) -> Tensor:
    """Elementwise maximum over the valid steps of each sequence.

    x: PackedSequence, or ``(T, B, F)`` / ``(B, T, F)`` with ``lengths`` ``(B,)``.
    Returns ``(B, F)``; the gradient goes to the step holding the maximum (split evenly
    between exact ties, as ``torch.amax``).
    """
    padded, mask = _padded_batch_major(x, lengths, batch_first)
    return padded.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)


def attention_pool(x, score, lengths=None, batch_first=False, return_weights=False):
    """Softmax-weighted sum of the valid steps of each sequence.

    x: PackedSequence, or ``(T, B, F)`` / ``(B, T, F)`` with ``lengths`` ``(B,)``.
    score: a callable mapping ``(B, T, F)`` to ``(B, T, 1)`` unnormalised scores.
    Returns ``(B, F)``, and with ``return_weights`` also the weights ``(B, T)``
    (batch-major whatever the input layout; they sum to 1 over the valid steps of
    each sequence and are exactly 0 at padded steps).
    """
    x, mask = _padded_batch_major(x, lengths, batch_first)
    x = x.masked_fill(~mask.unsqueeze(-1), 0)
    pooled, weights = _attend(x, score(x), mask)
    return (pooled, weights) if return_weights else pooled


def _attend(x: Tensor, scores: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """x (B, T, F) with padded steps zeroed, scores (B, T, 1), mask (B, T) ->
    (pooled (B, F), weights (B, T))."""
    weights = torch.softmax(scores.squeeze(-1).masked_fill(~mask, float("-inf")), dim=1)
    return torch.einsum("bt,btf->bf", weights, x), weights


class MeanPool(nn.Module):
    """Module form of :func:`mean_pool`: ``forward(x, lengths=None) -> (B, F)``."""

    def __init__(self, batch_first=False):
        super().__init__()
        self.batch_first = batch_first

    def forward(self, x: Union[Tensor, PackedSequence], lengths: Optional[Tensor] = None) -> Tensor:
        return mean_pool(x, lengths, self.batch_first)

    def extra_repr(self):
        return f"batch_first={self.batch_first}"


class MaxPool(nn.Module):
    """Module form of :func:`max_pool`: ``forward(x, lengths=None) -> (B, F)``."""

    def __init__(self, batch_first=False):
        super().__init__()
        self.batch_first = batch_first

    def forward(self, x: Union[Tensor, PackedSequence], lengths: Optional[Tensor] = None) -> Tensor:
        return max_pool(x, lengths, self.batch_first)

    def extra_repr(self):
        return f"batch_first={self.batch_first}"


class AttentionPool(nn.Module):
    """Attention pooling with a learned score, masked softmax over the valid steps.

    The score of step ``t`` is ``w . x_t`` (a learned vector, ``hidden_size=None``) or,
    with ``hidden_size``, a small MLP ``v . tanh(W x_t + b)``. No bias on the last
    layer: softmax ignores a constant shift.

    ``forward(x, lengths=None, return_weights=False)`` returns ``(B, F)`` and, on
    request, the weights ``(B, T)``; see :func:`attention_pool`.
    """

    def __init__(self, input_size, hidden_size=None, batch_first=False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.batch_first = batch_first
        if hidden_size is None:
            self.score = nn.Linear(input_size, 1, bias=False, **factory)
        else:
            self.score = nn.Sequential(
                nn.Linear(input_size, hidden_size, **factory),
                nn.Tanh(),
                nn.Linear(hidden_size, 1, bias=False, **factory),
            )

    def forward(self, x: Union[Tensor, PackedSequence], lengths: Optional[Tensor] = None,
                return_weights: bool = False):
        if torch.jit.is_scripting():  # resolved when compiled: the eager branch is not
            if return_weights:
                raise RuntimeError(
                    "fusedrnn.pooling.AttentionPool under TorchScript: return_weights=True is "
                    "not supported (a compiled forward returns one type); run it eagerly")
            padded, mask = _padded_batch_major(x, lengths, self.batch_first)
            padded = padded.masked_fill(~mask.unsqueeze(-1), 0)
            return _attend(padded, self.score(padded), mask)[0]
        return attention_pool(x, self.score, lengths, self.batch_first, return_weights)

    def extra_repr(self):
        return (
            f"input_size={self.input_size}, hidden_size={self.hidden_size}, "
            f"batch_first={self.batch_first}"
        )
