"""Gradient flow through time: how much of the loss's gradient reaches each step.

``gradient_flow(model, x, target)`` measures, for one batch, ``||dLoss/dx_t||`` and
``||dLoss/dh_t||`` for every time step ``t``. ``python -m benchmarks.gradflow`` uses it
to draw ``benchmarks/results/gradflow.png`` (plain RNN, GRU and LSTM on the adding
problem, at initialisation and after training).

Note [What dLoss/dh_t measures]
``dh_t`` is the *total* derivative of the loss with respect to the top layer's hidden
state at step ``t``: through the output at ``t`` and through every later step. A
whole-sequence module keeps its states inside, so the gradient of its output
sequence (``retain_grad`` on ``output``) holds only the direct part: with a loss on
the last step it is zero at every ``t < T`` and says nothing about vanishing. So, for
the one measured forward pass, a forward hook reruns the recurrent module one step at
a time, ``output_t, hx = rnn(x_t, hx)``, which is the same function with the same
weights, and builds the output sequence from ``hx``; each ``h_t`` is then a node of
the graph that both the output and the next step use, and its gradient is the total
derivative. This needs a unidirectional module called on a padded tensor (and, for
the same function, no inter-layer dropout in training mode: each step would draw
its own masks).

Norms are Frobenius norms over the batch and the features at one step; with a loss
averaged over the batch they shrink about as ``1 / sqrt(B)``.
"""

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

__all__ = ["gradient_flow"]


def _stepwise_hook(states):
    """A forward hook that reruns the module one step at a time, appending each step's
    hidden state ``(num_layers, B, H)`` (``H`` = ``proj_size`` if set) to ``states``;
    see Note [What dLoss/dh_t measures].
    """

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        if isinstance(x, PackedSequence) or x.dim() != 3 or getattr(module, "bidirectional", False):
            raise ValueError(
                "gradient_flow: dh_t needs a unidirectional module called on a 3-D padded tensor"
            )
        time_dim = 1 if getattr(module, "batch_first", False) else 0
        outputs = []
        for x_t in x.split(1, dim=time_dim):
            _, hx = module.forward(x_t, hx)
            h = hx[0] if isinstance(hx, tuple) else hx
            states.append(h)
            outputs.append(h[-1].unsqueeze(time_dim))
        return torch.cat(outputs, dim=time_dim), hx

    return hook


def _find_rnn(model):
    for sub in model.modules():
        if isinstance(getattr(sub, "weight_hh_l0", None), torch.Tensor):
            return sub
    raise ValueError(
        "gradient_flow: no recurrent module (with a weight_hh_l0) in the model; pass rnn="
    )


def gradient_flow(model, x, target, loss_fn=nn.functional.mse_loss, rnn=None):
    """Per-step gradient norms of ``loss_fn(model(x), target)`` for one batch.

    x: the model's input, ``(T, B, I)`` (``(B, T, I)`` if ``rnn.batch_first``); the model
    must call ``rnn`` (default: its first submodule with a ``weight_hh_l0``) once.
    Returns a dict: ``loss`` (float), ``dx`` ``(T,)`` = ``||dLoss/dx_t||`` and ``dh``
    ``(T,)`` = ``||dLoss/dh_t||`` for the top layer, total derivative (Note [What
    dLoss/dh_t measures]). Parameter ``.grad`` is left untouched.
    """
    rnn = _find_rnn(model) if rnn is None else rnn
    x = x.detach().requires_grad_()
    states = []
    handle = rnn.register_forward_hook(_stepwise_hook(states), with_kwargs=True)
    try:
        loss = loss_fn(model(x), target)
    finally:
        handle.remove()
    time_dim = 1 if getattr(rnn, "batch_first", False) else 0
    if len(states) != x.shape[time_dim]:
        raise ValueError(
            f"gradient_flow: expected one call of the rnn over {x.shape[time_dim]} steps"
        )
    grads = torch.autograd.grad(loss, [x, *states], allow_unused=True)
    # Norms in float64: squaring a float32 gradient below ~1e-19 would underflow to 0.
    dx = grads[0].transpose(0, time_dim).flatten(1).double().norm(dim=1)
    dh = torch.stack(
        [g[-1].double().norm() if g is not None else dx.new_zeros(()) for g in grads[1:]]
    )
    return {"loss": loss.item(), "dx": dx.detach(), "dh": dh.detach()}
