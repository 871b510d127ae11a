"""The CPU kernels on shapes that reach every branch of their loops, against float64 references.

The CPU kernels are compiled twice, for the x86-64 baseline and for AVX2 + FMA + F16C, and the faster set that
the CPU supports is chosen when the library loads (BNX_CPU_KERNELS=default forces the baseline). The tests
here run in this process (the chosen set) and once more in a subprocess on the baseline set.

The shapes are larger than the parity tests' so that the loops split the data into several slices, a
slice starts and ends inside an (n, c) plane, a plane is longer than one accumulation block, the
channel count is not a multiple of the vector width, the channels-last row count is not a multiple of
the row unroll (wide rows are taken several at a time), and the normalize / grad_input passes walk several cache-sized chunks per thread.
"""
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bnx
from conftest import assert_bf16_maps_exact, assert_close, make_input, train_fwd_bwd

EPS = 1e-5

# (id, shape, memory format)
SHAPES = [
    ("nchw_big_planes", (3, 3, 70, 70), None),             # planes of 4900 elements, slices cut planes
    ("nchw_odd", (5, 70, 9, 11), None),                    # 99-element planes, C = 70
    ("nchw_tiny_planes", (701, 20, 2, 3), None),           # 6-element planes (fewer than the lanes), slices cut planes
    ("nchw_s15", (3, 9, 3, 5), None),                      # 15-element planes, one slice
    ("nhwc_c70", (5, 70, 9, 11), torch.channels_last),     # 495 rows (not a multiple of 4), C = 70
    ("nhwc_c130", (2, 130, 17, 17), torch.channels_last),  # C > 64
    ("nhwc_c16", (4, 16, 30, 31), torch.channels_last),    # few channels, many rows
    ("ncdhw_cl3d", (3, 5, 4, 4, 130), torch.channels_last_3d),
    ("nc_rows", (6001, 7), None),                          # (N, C): rows of 7 channels
    ("ncl", (16, 300, 33), None),
    # A pass after another walks each thread's range in 1 MiB chunks, last chunk first: ranges of one full
    # and one partial chunk (and more in float64), planes / rows not dividing a chunk.
    ("nchw_chunks", (8, 6, 100, 110), None),               # 44,000-byte float32 planes, 48 planes
    ("nhwc_chunks", (4, 40, 60, 70), torch.channels_last),  # 16,800 rows of 160 bytes (float32)
    # Rows of 8 KiB of opmath values and more are summed and mapped four at a time (kManyRowsBytes):
    # 189 rows, slices and chunks of row counts that four does not divide, C not a multiple of 8.
    ("nhwc_wide_rows", (3, 2050, 7, 9), torch.channels_last),
    # The batch backward one channel at a time (Kernels::backward_by_channel_fits): planes of 4800 bytes and
    # more in every dtype, a channel's dy and x 115 KB at most, 8 channels for up to 4 threads.
    ("nchw_by_channel", (3, 8, 48, 50), None),
]

# input dtype -> (atol, rtol) against the float64 reference
DTYPES = {
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (4e-3, 3e-3),
    torch.float64: (1e-9, 1e-9),
}


def _reference(x, w, b, gy, rm, rv, formula, momentum=0.1):
    """float64 torch: output, grads (x, w, b) and the updated running statistics."""
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_()
    rmd, rvd = rm.double().clone(), rv.double().clone()
    if formula == "batch":
        y = F.batch_norm(xd, rmd, rvd, wd, bd, training=True, momentum=momentum, eps=EPS)
    else:
        # Frozen statistics: the eval forward with the batch statistics as constants.
        dims = [0] + list(range(2, x.dim()))
        mean, var = xd.detach().mean(dims), xd.detach().var(dims, unbiased=False)
        F.batch_norm(xd.detach(), rmd, rvd, None, None, training=True, momentum=momentum, eps=EPS)
        y = F.batch_norm(xd, mean, var, wd, bd, training=False, eps=EPS)
    y.backward(gy.double())
    return [y.detach(), xd.grad, wd.grad, bd.grad], rmd, rvd


def check_case(shape, memory_format, dtype, formula):
    torch.manual_seed(0)
    C = shape[1]
    # A mean far from zero, so the variance needs the shifted sums to come out right.
    x = make_input(shape, dtype, memory_format=memory_format, scale=2.0, shift=3.0)
    gy = make_input(shape, dtype, memory_format=memory_format)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(C, dtype=torch.float64).to(dtype)
    rm = torch.randn(C, dtype=torch.float64).to(dtype)
    rv = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype)
    ref, rm_ref, rv_ref = _reference(x, w, b, gy, rm, rv, formula)
    rm_bnx, rv_bnx = rm.clone(), rv.clone()
    got = train_fwd_bwd(x, w, b, gy, formula, rm_bnx, rv_bnx)
    atol, rtol = DTYPES[dtype]
    M = x.numel() // C
    for name, a, e in zip(["output", "grad_input", "grad_weight", "grad_bias"], got, ref):
        # grad_weight / grad_bias are sums over M elements: their error grows with sqrt(M)
        scale = M ** 0.5 if name in ("grad_weight", "grad_bias") else 1.0
        assert_close(a, e, atol * scale, rtol, f"{name} ({formula}, {dtype}, {tuple(shape)})")
    assert_close(rm_bnx, rm_ref, atol, rtol, "running_mean")
    assert_close(rv_bnx, rv_ref, atol, rtol, "running_var")
    if memory_format is not None:
        assert got[0].is_contiguous(memory_format=memory_format)
        assert got[1].is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("formula", ["batch", "frozen"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", SHAPES, ids=[s[0] for s in SHAPES])
def test_cpu_kernels_against_float64(case, dtype, formula):
    _, shape, mf = case
    check_case(shape, mf, dtype, formula)


@pytest.mark.parametrize("case", SHAPES, ids=[s[0] for s in SHAPES])
def test_cpu_eval_forward_against_float64(case):
    _, shape, mf = case
    C = shape[1]
    x = make_input(shape, torch.float32, memory_format=mf, scale=2.0, shift=3.0)
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    y = bnx.functional.batch_norm(x, rm, rv, w, b, training=False)
    y_ref = F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), training=False, eps=EPS)
    assert_close(y, y_ref, 1e-5, 1e-5)


def _cpu_has_avx2_fma_f16c():
    if platform.machine() not in ("x86_64", "AMD64") or not os.path.exists("/proc/cpuinfo"):
        return None  # unknown
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    return "avx2" in flags and "fma" in flags and "f16c" in flags


def test_cpu_kernels_choice():
    """The AVX2 kernels run where the CPU has AVX2, FMA and F16C, unless BNX_CPU_KERNELS=default."""
    choice = bnx.cpu_kernels()
    assert choice in ("avx2", "default")
    if os.environ.get("BNX_CPU_KERNELS") == "default":
        assert choice == "default"
        return
    has = _cpu_has_avx2_fma_f16c()
    if has is None:
        pytest.skip("not an x86-64 Linux machine: cannot tell which kernels it should use")
    assert choice == ("avx2" if has else "default")


@pytest.mark.skipif(os.environ.get("BNX_CPU_KERNELS") == "default", reason="already on the baseline kernels")
def test_baseline_kernels_in_subprocess():
    """The same checks on the baseline kernels (the ones a CPU without AVX2 runs)."""
    env = dict(os.environ, BNX_CPU_KERNELS="default")
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(here, "test_cpu_kernels.py"),
           "-k", "not subprocess"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_bf16_maps_exact_on_every_value(layout):
    """The CPU ops' elementwise passes with identity coefficients give every finite bfloat16 value back in its
    place (the same check runs on the CUDA kernels: tests/test_cuda.py, tests/test_cuda_emulation.py)."""
    assert_bf16_maps_exact(torch.ops.bnx, layout, "cpu")


# Every 16-bit pattern, infinities and NaNs included.
def _every_16bit_value(dtype):
    return torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)


def _assert_same_values(got, expected, what):
    """Equal values (a zero's sign aside) and NaN where expected has NaN."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN in other places"
    bad = (got != expected) & ~nan
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} values differ, first at {i}: {got[tuple(i)].item()!r}, "
                             f"expected {expected[tuple(i)].item()!r}")


@pytest.mark.parametrize("scale", [1.0, 0.7, 3.1e-3, 1234.5, 1e-6])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_16bit_maps_round_every_value_as_torch(dtype, layout, scale):
    """The elementwise passes read and write the 16-bit types in blocks of eight (F16C / AVX2 in the AVX2
    kernels, c10's bit arithmetic in the baseline ones). With coefficients that make each pass a multiply by
    `scale`, every 16-bit value (infinities, NaN, subnormals) must come out as torch's float32 product rounded
    to the type: the normalize, the frozen dx alone and inside the gradient sums, and the batch dx. C = 13 and
    5183-element planes leave tails after the blocks of eight (and the sums' blocks of 16 lanes) in both
    layouts."""
    g = torch.Generator().manual_seed(0)
    values = _every_16bit_value(dtype)
    shape = (1, 13, 71, 73)
    n = 13 * 71 * 73
    extra = values[torch.randint(0, values.numel(), (n - values.numel(),), generator=g)]
    x = torch.cat([values, extra])[torch.randperm(n, generator=g)].reshape(shape)
    dy = x.flip(-1)
    if layout == "cl":
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    zeros, s = torch.zeros(C), torch.full((C,), scale)
    ops = torch.ops.bnx

    def expected(t):
        return (t.float() * scale).to(dtype)

    _assert_same_values(ops.batch_norm_elemt(x, None, None, zeros, s), expected(x), "normalize")
    dx, _, _ = ops.batch_norm_backward(dy, x, zeros, s, None, "frozen", [True, False, False])
    _assert_same_values(dx, expected(dy), "frozen dx alone")
    # With the parameter gradients, the frozen dx is written by the pass that sums them.
    dx, _, _ = ops.batch_norm_backward(dy, torch.zeros_like(x), zeros, s, None, "frozen", [True, True, True])
    _assert_same_values(dx, expected(dy), "frozen dx in the gradient sums")
    # Zero gradient sums: dx = dy * weight * invstd (x zero, so that x's infinities do not make 0 * inf).
    dx = ops.batch_norm_backward_elemt(dy, torch.zeros_like(x), zeros, s, None, zeros, zeros, n // C)
    _assert_same_values(dx, expected(dy), "batch dx")


@pytest.mark.parametrize("layout", ["nchw", "rows"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_16bit_sums_read_every_value(dtype, layout):
    """The gradient sums read the 16-bit types eight at a time. Each of 65536 channels holds one 16-bit value
    (every pattern once) among zeros, at a random place, so its sums are that value exactly: sum(dy) where dy
    holds it, sum(dy * (x - 0)) where x does. "nchw": planes of 19 elements (a block of 16 lanes and a tail);
    "rows": 19 rows of 65536 channels (taken four at a time, then one)."""
    g = torch.Generator().manual_seed(0)
    values = _every_16bit_value(dtype)
    C, M = values.numel(), 19
    place = torch.randint(0, M, (C,), generator=g)
    holder = torch.zeros(M, C, dtype=dtype)
    holder[place, torch.arange(C)] = values
    ones = torch.ones(M, C, dtype=dtype)
    if layout == "nchw":
        holder, ones = holder.t().unsqueeze(0).contiguous(), ones.t().unsqueeze(0).contiguous()  # (1, C, M)
    zeros, unit = torch.zeros(C), torch.ones(C)
    expected = values.float()
    sum_dy, sum_dy_xmu = torch.ops.bnx.batch_norm_backward_reduce(holder, ones, zeros, unit)
    _assert_same_values(sum_dy, expected, "sum(dy), dy holding the values")
    _assert_same_values(sum_dy_xmu, expected, "sum(dy * x), dy holding the values")
    sum_dy, sum_dy_xmu = torch.ops.bnx.batch_norm_backward_reduce(ones, holder, zeros, unit)
    _assert_same_values(sum_dy, torch.full((C,), float(M)), "sum(dy), dy all ones")
    _assert_same_values(sum_dy_xmu, expected, "sum(dy * x), x holding the values")


# (N, C, plane) for the tail test: every plane length up to 40 (shorter than a block of 8, of 16 lanes, between
# them, just over), a 196-element plane, and inputs of several slices whose edges fall inside planes.
_TAIL_SHAPES = [(3, 5, S) for S in range(1, 41)] + [(3, 5, 196), (7, 5, 1001), (2, 3, 12347), (41, 7, 197)]


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_16bit_tails_every_plane_length(dtype, layout):
    """The 16-bit passes' tails: the maps' last n % 8 elements are the eight ending at n again, the NC* sums'
    last elements of a block the 16 ending there with the ones already added masked off. With small integers
    every sum is exact, so an element added twice or missed, or an output left unwritten, shows. "cl" puts the
    plane length in the channels (rows of 1-40 channels)."""
    g = torch.Generator().manual_seed(1)
    ops = torch.ops.bnx
    for N, C, S in _TAIL_SHAPES:
        if layout == "cl":
            N, C, S = N * S, S, 1  # rows of S channels
            if C > 64:
                continue
        x = torch.randint(-8, 9, (N, C, S, 1), generator=g).to(dtype)
        dy = torch.randint(-8, 9, (N, C, S, 1), generator=g).to(dtype)
        if layout == "cl":
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        what = f"{tuple(x.shape)} {layout}"
        dims = (0, 2, 3)
        zeros, ones, scale = torch.zeros(C), torch.ones(C), torch.full((C,), 0.7)
        sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(dy, x, zeros, ones)
        _assert_same_values(sum_dy, dy.float().sum(dims), f"sum(dy) {what}")
        _assert_same_values(sum_dy_xmu, (dy.float() * x.float()).sum(dims), f"sum(dy * x) {what}")
        mean, _ = ops.batch_norm_stats(x, None, None, None, 0.1, 1e-5)
        torch.testing.assert_close(mean, x.double().mean(dims).float(), rtol=1e-6, atol=1e-6, msg=what)
        _assert_same_values(ops.batch_norm_elemt(x, None, None, zeros, scale), (x.float() * 0.7).to(dtype),
                            f"normalize {what}")
        dx, grad_weight, grad_bias = ops.batch_norm_backward(dy, x, zeros, scale, None, "frozen", [True, True, True])
        _assert_same_values(dx, (dy.float() * 0.7).to(dtype), f"frozen dx in the gradient sums {what}")
        torch.testing.assert_close(grad_bias, dy.float().sum(dims), rtol=0, atol=0, msg=what)
        torch.testing.assert_close(grad_weight, (dy.float() * x.float()).sum(dims) * 0.7, rtol=1e-6, atol=1e-6,
                                   msg=what)
