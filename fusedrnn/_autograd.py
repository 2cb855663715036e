"""Autograd kernels for the ops that work under torch.func transforms.

Note [Autograd under torch.func]
torch.library.register_autograd wraps the formula in an autograd.Function
whose forward takes ctx and which has no setup_context; under a torch.func
transform (grad, vjp, jacrev, vmap of a grad) Function.apply refuses such a
Function ("it must override the setup_context staticmethod"), a known
limitation of torch.library in this torch. `register_autograd` below is the
same kernel built on autograd.function._SingleLevelFunction, applied under
enable_single_level_autograd_function(), which is what torch.func itself does
for the nodes it records (torch/_functorch/autograd_function.py). It is
right for ops: the dispatcher calls the Autograd kernel once per grad level,
and the forward's redispatch below Autograd takes the call to the next level.

torch.func.grad always runs its backward with create_graph=True, so under
Note [Double backward] every torch.func.grad would take the reference's
differentiable (slow) path. `graph_needed` asks instead whether anything
outside the innermost transform can see the gradient's graph: an enclosing
grad level that tracks one of the tensors, or plain autograd on the tensors
underneath. Only then is a differentiable backward built; a plain
torch.func.grad (inputs that do not require grad outside it) runs the fused
backward ops, whose node at the innermost level is never used. Parameters
passed as they are (model.named_parameters(), requiring grad) are tracked by
plain autograd, so they take the differentiable path: detach them, as
torch.func's own examples do, for the fused one.
"""
import torch
from torch._C import _functorch
from torch.autograd.forward_ad import _set_fwd_grad_enabled

from . import _C


def register_autograd(qualname, backward, setup_context):
    """Registers backward(ctx, *grads) and setup_context(ctx, inputs, output) as
    the autograd of the op `qualname` (no keyword-only arguments): the Python
    kernel below, behind the C++ Autograd kernel that redispatches itself where
    nothing needs grad (Note [Autograd kernel in C++ where nothing needs grad]
    in csrc/autograd_kernel.cpp)."""
    op = torch._library.utils.lookup_op(qualname)
    # Looked up once: this runs on every gradient-tracking call.
    below, after = torch._C._AutoDispatchBelowAutograd, torch._C._after_autograd_keyset
    allowed = _functorch.get_single_level_autograd_function_allowed
    allow = _functorch.set_single_level_autograd_function_allowed

    def redispatch(keyset, args):
        with below():
            return op.redispatch(keyset & after, *args)

    def forward(ctx, *args):
        keyset, args = args[-1], args[:-1]
        if _functorch.maybe_current_level() is None:
            result = redispatch(keyset, args)
        else:
            # apply() turned gradients off; the levels below this one need them
            # back to record the call (as torch.func's own nodes do).
            with torch.enable_grad(), _set_fwd_grad_enabled(True):
                result = redispatch(keyset, args)
        setup_context(ctx, args, result)
        return result

    def grads(ctx, *out_grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[:-1]  # not the keyset's
        try:
            return (*backward(ctx, *out_grads), None)
        finally:
            ctx.needs_input_grad = needs

    fn = type(f"{op._opname}_autograd", (torch.autograd.function._SingleLevelFunction,),
              {"forward": staticmethod(forward), "backward": staticmethod(grads)})

    def kernel(keyset, *args):  # called where grad mode is on and an input requires grad
        # torch._functorch.utils.enable_single_level_autograd_function(),
        # without a generator-based context manager's cost.
        prev = allowed()
        allow(True)
        try:
            return fn.apply(*args, keyset)
        finally:
            allow(prev)

    _C._set_autograd_kernel(qualname.split("::")[1], kernel)


def _tracked_below(t, level):
    """Whether autograd below functorch level `level` (an enclosing grad
    transform, or plain autograd) tracks t, seen through its wrappers."""
    while _functorch.is_functorch_wrapped_tensor(t):
        if (_functorch.maybe_get_level(t) < level and _functorch.is_gradtrackingtensor(t)
                and t.requires_grad):
            return True
        t = _functorch.get_unwrapped(t)
    return t.requires_grad


def graph_needed(*tensors):
    """Whether a backward running now must build a differentiable graph of the
    gradients of these tensors (Note [Double backward] in _ops.py): under
    torch.func, whether anything below the grad level whose backward runs
    (the level of its saved tensors) can see it (Note [Autograd under torch.func])."""
    if not torch.is_grad_enabled():
        return False
    tensors = [t for t in tensors if t is not None]
    levels = [_functorch.maybe_get_level(t) for t in tensors
              if _functorch.is_gradtrackingtensor(t)]
    if not levels:
        return any(t.requires_grad for t in tensors)
    return any(_tracked_below(t, max(levels)) for t in tensors)
