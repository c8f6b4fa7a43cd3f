"""The hand-written backwards are first-order only: `create_graph=True` through them is refused loudly."""

import functools

import torch


def first_order_only(backward):
    """Wrap an autograd Function's backward so that a double backward raises instead of returning gradients
    that silently carry no graph (the gradient comes from a kernel that is not itself differentiable)."""

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError("focal_kernels: double backward (create_graph=True) is not supported; the "
                               "gradient is computed by a kernel that is not differentiable")
        return backward(ctx, *grads)

    return checked
