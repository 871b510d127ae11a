"""The autograd.Function behind bnx: the elementwise pass of batch norm with a switchable backward."""
import inspect

import torch

FORMULAS = ("batch", "frozen")


def _channel_view_shape(input):
    return [1, -1] + [1] * (input.dim() - 2)


def _reduce_dims(input):
    return [0] + list(range(2, input.dim()))


def differentiable_backward(grad_out, input, weight, mean, invstd, eps, formula, needs):
    """The backward written in differentiable torch ops, used when create_graph=True (double backward).

    For "batch" the statistics are recomputed from ``input`` so that second derivatives see their
    dependence on it; for "frozen" ``mean`` and ``invstd`` are constants."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    dims, shape = _reduce_dims(input), _channel_view_shape(input)
    x, dy = input.to(acc), grad_out.to(acc)
    if formula == "batch":
        mean = x.mean(dims)
        invstd = torch.rsqrt(x.var(dims, unbiased=False) + eps)
    else:
        mean, invstd = mean.detach().to(acc), invstd.detach().to(acc)
    xhat = (x - mean.view(shape)) * invstd.view(shape)
    gain = invstd.view(shape) if weight is None else weight.to(acc).view(shape) * invstd.view(shape)
    grad_input = grad_weight = grad_bias = None
    if needs[0]:
        if formula == "batch":
            grad_input = gain * (dy - dy.mean(dims, keepdim=True) - xhat * (dy * xhat).mean(dims, keepdim=True))
        else:
            grad_input = gain * dy
        grad_input = grad_input.to(input.dtype)
    if needs[1]:
        grad_weight = (dy * xhat).sum(dims).to(weight.dtype)
    if needs[2]:
        grad_bias = dy.sum(dims)
    return grad_input, grad_weight, grad_bias


class BatchNormFunction(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with given statistics, and a choice of backward formula.

    ``apply(input, weight, bias, mean, scale, eps, formula, running)``:
    - running=False: ``mean``/``scale`` are the batch mean and invstd (from ``torch.ops.bnx.batch_norm_stats``
      on the detached input); formula "batch" differentiates through them, "frozen" does not.
    - running=True: ``mean``/``scale`` are running_mean/running_var (constants); formula must be "frozen".
    """

    @staticmethod
    def forward(input, weight, bias, mean, scale, eps, formula, running):
        if running:
            return torch.ops.bnx.batch_norm_inference(input, weight, bias, mean, scale, eps)
        return torch.ops.bnx.batch_norm_elemt(input, weight, bias, mean, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, mean, scale, eps, formula, running = inputs
        ctx.save_for_backward(input, weight, mean, scale)
        ctx.eps, ctx.formula, ctx.running = eps, formula, running
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, mean, scale = ctx.saved_tensors
        if ctx.running:
            acc = torch.float64 if input.dtype == torch.float64 else torch.float32
            mean, invstd = mean.to(acc), torch.rsqrt(scale.to(acc) + ctx.eps)
        else:
            invstd = scale
        needs = (
            ctx.needs_input_grad[0],
            weight is not None and ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2],
        )
        if torch.is_grad_enabled():  # create_graph=True: stay differentiable
            grads = differentiable_backward(grad_out, input, weight, mean, invstd, ctx.eps, ctx.formula, needs)
        else:
            grads = torch.ops.bnx.batch_norm_backward(grad_out, input, mean, invstd, weight, ctx.formula, list(needs))
            grads = tuple(g if need else None for g, need in zip(grads, needs))
        grad_input, grad_weight, grad_bias = grads
        if grad_bias is not None and grad_bias.dtype != ctx.bias_dtype:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


# Function.apply asks for forward's signature on every call; compute it once.
BatchNormFunction.forward.__signature__ = inspect.signature(BatchNormFunction.forward)
