"""Numerical accuracy and determinism of the kernels (CPU, and CUDA when present).

- float32 variance of data with a large mean (1e4 + N(0,1)) is accurate (no E[x^2]-E[x]^2).
- float32 variance of a channel with an outlier at its first element, and (CPU) at every element the
  statistics take their shift from, is accurate.
- bfloat16 input accumulates in float32 (M = 2**20 per channel).
- bitwise determinism of forward and backward in every dtype.
"""
import pytest
import torch

import bnx
from conftest import DEVICES, assert_variance_exact, train_fwd_bwd

ops = torch.ops.bnx


def _ref_stats(x):
    d = [0] + list(range(2, x.dim()))
    xd = x.double()
    return xd.mean(d), xd.var(d, unbiased=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_float32_large_mean_variance(device, memory_format):
    """1e4 + N(0,1) in float32: batch var (via running_var with momentum 1, and via invstd)
    within 1e-4 relative of the float64 reference of the same float32 data."""
    torch.manual_seed(50)
    x = (1e4 + torch.randn(64, 4, 64, 64, device=device)).contiguous(memory_format=memory_format)
    mean_ref, var_ref = _ref_stats(x)
    M = x.numel() // x.shape[1]
    eps = 1e-5

    rm, rv = torch.zeros(4, device=device), torch.zeros(4, device=device)
    mean, invstd = ops.batch_norm_stats(x, rm, rv, None, 1.0, eps)
    assert mean.dtype == torch.float32 and invstd.dtype == torch.float32
    var_from_invstd = 1.0 / invstd.double() ** 2 - eps
    assert ((var_from_invstd - var_ref).abs() / var_ref).max().item() < 1e-4
    unbiased_ref = var_ref * M / (M - 1)
    assert ((rv.double() - unbiased_ref).abs() / unbiased_ref).max().item() < 1e-4
    assert (mean.double() - mean_ref).abs().max().item() < 2e-3  # float32 ulp at 1e4 ~ 1e-3
    assert (rm.double() - mean_ref).abs().max().item() < 2e-3

    # through the functional too
    rm2, rv2 = torch.zeros(4, device=device), torch.zeros(4, device=device)
    y = bnx.functional.batch_norm(x, rm2, rv2, training=True, momentum=1.0, eps=eps)
    assert ((rv2.double() - unbiased_ref).abs() / unbiased_ref).max().item() < 1e-4
    y_ref = (x.double() - mean_ref.view(1, -1, 1, 1)) / (var_ref.view(1, -1, 1, 1) + eps).sqrt()
    assert (y.double() - y_ref).abs().max().item() < 5e-3


# Where the statistics take the samples their shift is the median of (csrc/common.h, shift_samples): fractions
# of the M elements of a channel, in 2^-16.
SHIFT_SAMPLE_FRACTIONS = (7411, 20483, 33331, 46153, 58997)


def _channel_positions(x, positions):
    """Index tuples of element p of every channel, for each p in positions (p in (N, *spatial) order)."""
    spatial = x.shape[2:]
    out = []
    for p in positions:
        n, s = divmod(p, x[0, 0].numel())
        out.append((n, slice(None), *(int(i) for i in torch.unravel_index(torch.tensor(s), spatial))))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_float32_variance_with_an_outlier_at_the_first_element(device, memory_format):
    """N(0,1) float32 channels of 2^20 values with 1000 at each channel's first element (the corner pixel
    of the first image): variance within 1e-5 relative of the float64 reference (room for the GPU's float32
    partial sums). Shifting the sums by that element (as bnx did) left 3e-3."""
    torch.manual_seed(53)
    x = torch.randn(1024, 4, 32, 32, device=device)
    x[0, :, 0, 0] = 1000.0
    assert_variance_exact(ops.batch_norm_stats, x.contiguous(memory_format=memory_format), 1e-5)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_cpu_variance_with_outliers_at_every_shift_sample(memory_format):
    """The same with 1000 at all five elements the shift is the median of, so the shift is 1000 deviations
    off: the CPU op takes its sums again around the mean it found, and the variance is as accurate."""
    torch.manual_seed(54)
    x = torch.randn(1024, 4, 32, 32)
    M = x.numel() // x.shape[1]
    for idx in _channel_positions(x, [M * f // 65536 for f in SHIFT_SAMPLE_FRACTIONS]):
        x[idx] = 1000.0
    assert_variance_exact(ops.batch_norm_stats, x.contiguous(memory_format=memory_format), 2e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_bfloat16_accumulates_in_float32(device, memory_format):
    """bf16 input, M = 2**20 per channel: stats, output and backward reductions match a float64
    reference far better than bf16 (or fp16) accumulation could."""
    torch.manual_seed(51)
    x = (3.0 + 2.0 * torch.randn(16, 2, 256, 256, device=device)).to(torch.bfloat16)
    gy = (0.5 + torch.randn_like(x, dtype=torch.float32)).to(torch.bfloat16)
    x = x.contiguous(memory_format=memory_format)
    gy = gy.contiguous(memory_format=memory_format)
    mean_ref, var_ref = _ref_stats(x)
    mean, invstd = ops.batch_norm_stats(x, None, None, None, 0.1, 1e-5)
    assert mean.dtype == torch.float32
    # bf16 accumulation of 1e6 values of ~3 would stall at 2**(8+2) -> errors O(1)
    assert (mean.double() - mean_ref).abs().max().item() < 1e-4
    var = 1.0 / invstd.double() ** 2 - 1e-5
    assert ((var - var_ref).abs() / var_ref).max().item() < 1e-4

    w = torch.tensor([1.5, 0.7], device=device)
    b = torch.tensor([0.1, -0.2], device=device)
    y = ops.batch_norm_elemt(x, w, b, mean, invstd)
    assert y.dtype == torch.bfloat16
    y_ref = ((x.double() - mean_ref.view(1, -1, 1, 1)) / (var_ref.view(1, -1, 1, 1) + 1e-5).sqrt()
             * w.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1))
    err = ((y.double() - y_ref).abs() / y_ref.abs().clamp_min(1.0)).max().item()
    assert err <= 2.0 ** -8 + 1e-4  # one bf16 rounding

    sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(gy, x, mean, invstd)
    d = (0, 2, 3)
    sum_dy_ref = gy.double().sum(d)
    sum_dy_xmu_ref = (gy.double() * (x.double() - mean.double().view(1, -1, 1, 1))).sum(d)
    scale_dy = gy.double().abs().sum(d)
    scale_xmu = (gy.double() * (x.double() - mean_ref.view(1, -1, 1, 1))).abs().sum(d)
    assert ((sum_dy.double() - sum_dy_ref).abs() / scale_dy).max().item() < 1e-5
    assert ((sum_dy_xmu.double() - sum_dy_xmu_ref).abs() / scale_xmu).max().item() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("formula", ["batch", "frozen"])
def test_determinism(device, dtype, memory_format, formula):
    """Same input twice -> bitwise identical outputs, grads and running stats."""
    torch.manual_seed(52)
    x = torch.randn(32, 24, 33, 47, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    gy = torch.randn_like(x)
    w = torch.rand(24, device=device, dtype=dtype) + 0.5
    b = torch.randn(24, device=device, dtype=dtype)
    res = []
    for _ in range(2):
        rm, rv = torch.zeros(24, device=device, dtype=dtype), torch.ones(24, device=device, dtype=dtype)
        res.append(train_fwd_bwd(x, w, b, gy, formula, rm, rv) + [rm, rv])
    for i, (a, c) in enumerate(zip(*res)):
        assert torch.equal(a, c), i
    # and the op-level reductions
    mean, invstd = ops.batch_norm_stats(x, None, None, None, 0.1, 1e-5)
    mean2, invstd2 = ops.batch_norm_stats(x, None, None, None, 0.1, 1e-5)
    assert torch.equal(mean, mean2) and torch.equal(invstd, invstd2)
    r1 = ops.batch_norm_backward_reduce(gy, x, mean, invstd)
    r2 = ops.batch_norm_backward_reduce(gy, x, mean, invstd)
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
