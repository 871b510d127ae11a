"""bnx's Python autograd.Functions: batch norm with a switchable backward.

Eager calls of bnx.functional go to the layer op torch.ops.bnx.batch_norm, whose autograd kernel is C++
(csrc/autograd.cpp). These Functions run the same ops for what a C++ autograd Function cannot serve:
torch.compile tracing, torch.func transforms and forward-mode AD (bnx.functional._python_function_needed);
they are also public, for direct use."""
import inspect

import torch

FORMULAS = ("batch", "frozen")

# The ops' overloads, looked up once: calling an OpOverloadPacket (torch.ops.bnx.name) resolves the overload on
# every call, which shows in the per-call time of small inputs.
_train_forward_op = torch.ops.bnx.batch_norm_train_forward.default
_inference_op = torch.ops.bnx.batch_norm_inference.default
_backward_op = torch.ops.bnx.batch_norm_backward.default


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


def _backward(ctx, grad_out, input, weight, mean, invstd, formula):
    needs_input_grad = ctx.needs_input_grad
    needs = [
        needs_input_grad[0],
        weight is not None and needs_input_grad[1],
        ctx.bias_dtype is not None and needs_input_grad[2],
    ]
    if torch.is_grad_enabled():  # create_graph=True: stay differentiable
        grad_input, grad_weight, grad_bias = differentiable_backward(
            grad_out, input, weight, mean, invstd, ctx.eps, formula, needs
        )
    else:
        grad_input, grad_weight, grad_bias = _backward_op(grad_out, input, mean, invstd, weight, formula, needs)
        # The op returns empty tensors for the outputs it was not asked for.
        grad_input = grad_input if needs[0] else None
        grad_weight = grad_weight if needs[1] else None
        grad_bias = grad_bias if needs[2] else None
    if grad_bias is not None and grad_bias.dtype != ctx.bias_dtype:
        grad_bias = grad_bias.to(ctx.bias_dtype)
    return grad_input, grad_weight, grad_bias


class BatchNormTrainFunction(torch.autograd.Function):
    """Training forward (batch statistics, running statistics updated in place) with a choice of backward.

    ``apply(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, formula)``
    returns ``(output, mean, invstd)``; mean and invstd are not differentiable outputs. ``formula`` "batch"
    differentiates through the batch statistics, "frozen" treats them as constants."""

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, formula):
        return _train_forward_op(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias = inputs[:3]
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        # mean and invstd get no gradient: leave theirs None rather than materializing zeros on every backward
        # (and an undefined output gradient gives no gradients, as in torch).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.eps, ctx.formula = inputs[7], inputs[8]
        ctx.bias_dtype = bias.dtype if bias is not None else None

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_invstd):
        if grad_out is None:
            return (None,) * 9
        input, weight, mean, invstd = ctx.saved_tensors
        grads = _backward(ctx, grad_out, input, weight, mean, invstd, ctx.formula)
        return grads + (None,) * 6


class BatchNormEvalFunction(torch.autograd.Function):
    """Eval forward with the running statistics (constants), so its backward is the frozen formula.

    ``apply(input, weight, bias, running_mean, running_var, eps)``."""

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, eps):
        return _inference_op(input, weight, bias, running_mean, running_var, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, running_mean, running_var, eps = inputs
        ctx.save_for_backward(input, weight, running_mean, running_var)
        ctx.eps = eps
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.set_materialize_grads(False)  # an undefined output gradient gives no gradients, as in torch

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 6
        input, weight, running_mean, running_var = ctx.saved_tensors
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        mean, invstd = running_mean.to(acc), torch.rsqrt(running_var.to(acc) + ctx.eps)
        grads = _backward(ctx, grad_out, input, weight, mean, invstd, "frozen")
        return grads + (None,) * 3


class _BoundPositional:
    """What _PositionalSignature.bind returns when every argument is given positionally."""

    __slots__ = ("args",)
    kwargs = {}

    def __init__(self, args):
        self.args = args

    def apply_defaults(self):
        pass


class _PositionalSignature(inspect.Signature):
    """forward's signature, with a bind that is free when all arguments are positional.

    Function.apply binds the arguments of setup_context-style functions to forward's signature on every
    call (inspect.signature(forward).bind(...)): about 20 us in Python, more than the op itself on small
    inputs. bnx.functional passes every argument positionally, so there is nothing to bind; any other call
    takes inspect's bind."""

    __slots__ = ("_count",)

    def __init__(self, signature):
        super().__init__(list(signature.parameters.values()), return_annotation=signature.return_annotation)
        self._count = len(signature.parameters)

    def bind(self, *args, **kwargs):
        if not kwargs and len(args) == self._count:
            return _BoundPositional(args)
        return super().bind(*args, **kwargs)


for _function in (BatchNormTrainFunction, BatchNormEvalFunction):
    _function.forward.__signature__ = _PositionalSignature(inspect.signature(_function.forward))
