"""bnx.functional.batch_norm: torch.nn.functional.batch_norm with a choice of backward formula."""
import numbers

import torch
from torch.autograd import forward_ad
from torch.overrides import handle_torch_function, has_torch_function_variadic

from ._meta import is_count_dtype, stat_dtype
from .autograd import FORMULAS, BatchNormEvalFunction, BatchNormTrainFunction

# The layer op with its autograd kernel in C++ (csrc/autograd.cpp), looked up once.
_layer_op = torch.ops.bnx.batch_norm.default

__all__ = ["batch_norm", "resolve_backward"]


def resolve_backward(backward, use_batch_stats):
    """The formula to use: ``backward`` checked against the statistics the forward uses."""
    if backward is None:
        return "batch" if use_batch_stats else "frozen"
    if backward not in FORMULAS:
        raise ValueError(f"backward must be None, 'batch' or 'frozen', got {backward!r}")
    if backward == "batch" and not use_batch_stats:
        raise ValueError(
            "backward='batch' needs batch statistics, but this forward normalizes with the running "
            "statistics (training=False), which are constants: there is no gradient through them. "
            "Use backward='frozen' (or None), or training=True."
        )
    return backward


def _python_function_needed():
    """True when the call must go through bnx's Python autograd.Functions rather than the C++ layer op:
    under torch.compile (dynamo traces the Functions), torch.func transforms (vmap, grad: a C++ autograd
    Function refuses them) and forward-mode AD (which custom C++ Functions do not support).

    Not under torch.export: it records a Function's forward ops and drops its backward, so the exported
    program would have no gradient; the layer op is recorded as one node that keeps its autograd kernel
    (and the backward formula, an argument of the op)."""
    return (
        (torch.compiler.is_compiling() and not torch.compiler.is_exporting())
        or torch._C._are_functorch_transforms_active()
        or forward_ad._current_level >= 0
    )


def _verify_batch_size(input):
    size = input.shape
    channels = size[1]
    if channels:  # values per channel = numel / C (one C call rather than a Python product)
        values = input.numel() // channels
    else:
        values = size[0]
        for s in size[2:]:
            values *= s
    if values == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(size)}")


_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _as_float(name, value):
    """momentum / eps as torch's argument parser takes them: a real number or a one-element tensor, not a
    string."""
    if type(value) is float:  # the usual case, ahead of the slower abstract-class check
        return value
    if isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        return float(value)
    raise TypeError(f"bnx.batch_norm: {name} must be a float, got {type(value).__name__}")


_TENSOR_ARGS = ("running_mean", "running_var", "weight", "bias", "num_batches_tracked")


def _check_tensors(input, *tensors):
    """tensors: running_mean, running_var, weight, bias, num_batches_tracked, each a tensor or None. (Written
    for speed too: it runs on every call.)"""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"bnx.batch_norm: input must be a Tensor, got {type(input).__name__}")
    if input.dtype not in _DTYPES:
        raise TypeError(
            f"bnx.batch_norm: expected a floating-point input (float64, float32, float16 or bfloat16), "
            f"got {input.dtype}"
        )
    if not 2 <= input.dim() <= 5:
        raise ValueError(
            f"bnx.batch_norm: expected input of shape (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), "
            f"got {input.dim()}-D input of shape {tuple(input.shape)}"
        )
    device, channels = input.device, (input.shape[1],)
    for name, t in zip(_TENSOR_ARGS, tensors):
        if t is None:
            continue
        if t.device != device:
            raise RuntimeError(
                f"bnx.batch_norm: expected all tensors on the same device, but input is on {input.device} "
                f"and {name} is on {t.device}"
            )
        if name == "num_batches_tracked":
            if not is_count_dtype(t.dtype) or t.numel() != 1:
                raise TypeError(
                    f"bnx.batch_norm: num_batches_tracked must be a one-element integer tensor (a count of "
                    f"batches), got {t.dtype} of shape {tuple(t.shape)}"
                )
        else:
            if t.dtype not in _DTYPES:
                raise TypeError(
                    f"bnx.batch_norm: {name} must be float64, float32, float16 or bfloat16, got {t.dtype}"
                )
            if t.shape != channels:
                raise RuntimeError(
                    f"bnx.batch_norm: {name} should be a 1-D tensor of {input.shape[1]} elements (one per "
                    f"channel of input of shape {tuple(input.shape)}), got shape {tuple(t.shape)}"
                )


def batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    *,
    backward=None,
    num_batches_tracked=None,
):
    """Batch normalization with the semantics of :func:`torch.nn.functional.batch_norm`, plus ``backward``.

    Args:
        backward: ``None`` (the formula that matches the forward: batch statistics -> ``"batch"``, running
            statistics -> ``"frozen"``), ``"batch"`` (gradient through the batch mean and variance) or
            ``"frozen"`` (mean and variance treated as constants: ``dx = weight * invstd * dy``).
        num_batches_tracked: with ``training=True`` and running statistics, update them with the cumulative
            average factor ``1 / num_batches_tracked`` (torch modules' ``momentum=None``). A one-element
            integer tensor, read on the device. It counts this batch too, so it is at least 1 (a smaller
            count is an error on the CPU; on a GPU, where a check would wait for the device, it makes the
            running statistics NaN).
    """
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias, num_batches_tracked):
        # The __torch_function__ protocol, as torch.nn.functional.batch_norm follows it: tensor subclasses
        # may override the call, and torch.fx records it as one call_function node.
        return handle_torch_function(
            batch_norm,
            (input, running_mean, running_var, weight, bias, num_batches_tracked),
            input,
            running_mean,
            running_var,
            weight=weight,
            bias=bias,
            training=training,
            momentum=momentum,
            eps=eps,
            backward=backward,
            num_batches_tracked=num_batches_tracked,
        )
    _check_tensors(input, running_mean, running_var, weight, bias, num_batches_tracked)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not training and running_mean is None and input.numel() == 0:
        # Nothing to normalize: torch returns the empty output here (its check comes after its empty-input
        # return), so stand-in statistics give the same output and zero parameter gradients.
        running_mean = torch.zeros(input.shape[1], dtype=stat_dtype(input), device=input.device)
        running_var = torch.ones_like(running_mean)
    if not training and running_mean is None:
        raise ValueError(
            "bnx.batch_norm: training=False normalizes with running_mean and running_var, but they are None"
        )
    if running_mean is not None and (running_mean.requires_grad or running_var.requires_grad) and (
        torch.is_grad_enabled()
    ):
        raise RuntimeError(
            "bnx.batch_norm: running_mean and running_var are statistics, not parameters: they cannot have "
            "requires_grad=True (detach them, or call under torch.no_grad())"
        )
    if momentum is not None:
        momentum = _as_float("momentum", momentum)
    eps = _as_float("eps", eps)
    if training:
        _verify_batch_size(input)
        if not eps > 0.0:  # also NaN
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif not eps >= 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    formula = resolve_backward(backward, training)
    if training:
        if momentum is None:
            if running_mean is not None and num_batches_tracked is None:
                raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
            momentum = 0.0
        if num_batches_tracked is not None and running_mean is None:
            num_batches_tracked = None
    else:  # the running statistics are only read
        num_batches_tracked, momentum = None, 0.0
    if not _python_function_needed():
        return _layer_op(
            input, weight, bias, running_mean, running_var, num_batches_tracked, training, float(momentum), float(eps),
            formula,
        )
    if not training:
        return BatchNormEvalFunction.apply(input, weight, bias, running_mean, running_var, eps)
    output, _, _ = BatchNormTrainFunction.apply(
        input, weight, bias, running_mean, running_var, num_batches_tracked, float(momentum), float(eps), formula
    )
    return output
