"""Fake (meta) kernels for every bnx op, so torch.compile and FakeTensor can trace them.

Shapes, dtypes and strides follow the real kernels in csrc/ (see docs/DESIGN.md)."""
import torch
from torch.library import register_fake


def stat_dtype(input):
    """The statistics / accumulate dtype: float64 for float64 input, float32 otherwise."""
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _strides_like_channels_last(input):
    """csrc/common.h: strides_like_channels_last."""
    D = input.dim()
    if D not in (4, 5) or input.shape[1] <= 1:
        return False
    stride, inner = input.stride(), input.stride(1)
    for d in [*range(D - 1, 1, -1), 0]:
        if input.shape[d] <= 1:
            continue
        if stride[d] <= inner:
            return False
        inner = stride[d]
    return True


def output_format(input):
    """The memory format the kernels return (csrc/common.h: output_format)."""
    if input.is_contiguous():
        return torch.contiguous_format
    if input.dim() < 4:
        return torch.contiguous_format
    channels_last = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
    if input.is_contiguous(memory_format=channels_last) or _strides_like_channels_last(input):
        return channels_last
    return torch.contiguous_format


def _check_input(input, **others):
    torch._check(2 <= input.dim() <= 5, lambda: f"bnx: expected 2-D to 5-D input, got {input.dim()}-D")
    torch._check(input.dtype.is_floating_point, lambda: f"bnx: expected floating-point input, got {input.dtype}")
    # A call that mixes a meta tensor with real ones lands here: check devices as the real kernels do.
    for name, t in others.items():
        if t is not None:
            torch._check(
                t.device == input.device,
                lambda: f"bnx: expected {name} on the input's device {input.device}, got it on {t.device}",
            )


def is_count_dtype(dtype):
    """An integer dtype other than bool, as num_batches_tracked needs (csrc/checks.cpp: at::isIntegralType)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_count(num_batches_tracked):
    """csrc/checks.cpp: check_stats_args' num_batches_tracked checks."""
    if num_batches_tracked is not None:
        t = num_batches_tracked
        torch._check(
            t.numel() == 1,
            lambda: f"bnx: num_batches_tracked must be a one-element tensor on the input's device, got shape {list(t.shape)}",
        )
        torch._check(
            is_count_dtype(t.dtype),
            lambda: f"bnx: num_batches_tracked must be an integer tensor (a count of batches), got dtype {t.dtype}",
        )


def _channel_stats(input):
    return input.new_empty((input.shape[1],), dtype=stat_dtype(input))


def _like_input(input):
    return torch.empty_like(input, memory_format=output_format(input))


@register_fake("bnx::batch_norm_stats")
def _batch_norm_stats_fake(input, running_mean, running_var, num_batches_tracked, momentum, eps):
    _check_input(input, running_mean=running_mean, running_var=running_var, num_batches_tracked=num_batches_tracked)
    _check_count(num_batches_tracked)
    return _channel_stats(input), _channel_stats(input)


@register_fake("bnx::batch_norm_train_forward")
def _batch_norm_train_forward_fake(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    _check_input(
        input,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
        num_batches_tracked=num_batches_tracked,
    )
    _check_count(num_batches_tracked)
    return _like_input(input), _channel_stats(input), _channel_stats(input)


@register_fake("bnx::batch_norm_elemt")
def _batch_norm_elemt_fake(input, weight, bias, mean, invstd):
    _check_input(input, weight=weight, bias=bias, mean=mean, invstd=invstd)
    return _like_input(input)


@register_fake("bnx::batch_norm_inference")
def _batch_norm_inference_fake(input, weight, bias, running_mean, running_var, eps):
    _check_input(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    return _like_input(input)


@register_fake("bnx::batch_norm_backward_reduce")
def _batch_norm_backward_reduce_fake(grad_out, input, mean, invstd):
    _check_input(input, grad_out=grad_out, mean=mean, invstd=invstd)
    return _channel_stats(input), _channel_stats(input)


@register_fake("bnx::batch_norm_backward_elemt")
def _batch_norm_backward_elemt_fake(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    _check_input(input, grad_out=grad_out, mean=mean, invstd=invstd, weight=weight, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu)
    return _like_input(input)


@register_fake("bnx::batch_norm_backward")
def _batch_norm_backward_fake(grad_out, input, mean, invstd, weight, formula, output_mask):
    _check_input(input, grad_out=grad_out, mean=mean, invstd=invstd, weight=weight)
    torch._check(formula in ("batch", "frozen"), lambda: f'bnx: formula must be "batch" or "frozen", got "{formula}"')
    param_dtype = weight.dtype if weight is not None else stat_dtype(input)
    C = input.shape[1]
    grad_input = _like_input(input) if output_mask[0] else input.new_empty((0,))
    grad_weight = input.new_empty((C,) if output_mask[1] else (0,), dtype=param_dtype)
    grad_bias = input.new_empty((C,) if output_mask[2] else (0,), dtype=param_dtype)
    return grad_input, grad_weight, grad_bias


@register_fake("bnx::batch_norm")
def _batch_norm_fake(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps, backward):
    torch._check(backward in ("batch", "frozen"), lambda: f'bnx: formula must be "batch" or "frozen", got "{backward}"')
    torch._check(
        training or (running_mean is not None and running_var is not None),
        lambda: "bnx: batch_norm with training=False normalizes with running_mean and running_var, but they are None",
    )
    if training:
        return _batch_norm_train_forward_fake(
            input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps
        )[0]
    return _batch_norm_inference_fake(input, weight, bias, running_mean, running_var, eps)
