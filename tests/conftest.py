"""Shared fixtures and helpers for the bnx test suite.

Every test is parametrized over devices: "cpu" always, "cuda" when a CUDA device is
present *and* bnx was built with CUDA kernels (otherwise the cuda cases are skipped).
"""
import os

import pytest
import torch

import bnx  # loads the extension and registers torch.ops.bnx


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "large: needs a GPU with lots of memory (>2**31 elements); run with BNX_LARGE_TESTS=1",
    )


def _bnx_has_cuda_kernels():
    if not torch.cuda.is_available():
        return False
    try:
        return bool(
            torch._C._dispatch_has_kernel_for_dispatch_key("bnx::batch_norm_elemt", "CUDA")
        )
    except Exception:  # pragma: no cover - very old torch
        return True


HAS_CUDA = _bnx_has_cuda_kernels()
requires_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="no CUDA device (or bnx built without CUDA kernels)"
)
LARGE_ENABLED = os.environ.get("BNX_LARGE_TESTS") == "1"

# Use DEVICES in @pytest.mark.parametrize("device", DEVICES) or the `device` fixture.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=["cpp", "python"])
def autograd_path(request, monkeypatch):
    """Runs a test through each of bnx.functional's two autograd paths: "cpp", the layer op with its C++
    autograd kernel (the eager default), and "python", the autograd.Functions of bnx/autograd.py (what
    torch.compile, torch.func transforms and forward-mode AD get)."""
    if request.param == "python":
        callspec = getattr(request.node, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            # GPU time is scarce: on CUDA the Python path is checked against the C++ one bit for bit in
            # test_cpp_autograd.py (every mode, dtype and layout) and under torch.compile in test_compile.py.
            pytest.skip("Python autograd path: covered on CUDA by test_cpp_autograd.py and test_compile.py")
        monkeypatch.setattr(bnx.functional, "_python_function_needed", lambda: True)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state (tests re-seed explicitly where it matters)."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _exact_cuda_math():
    """On GPUs, conv/matmul default to TF32 and nondeterministic algorithms; the CNN tests
    compare gradients at 1e-4, so use full-precision, deterministic convolutions."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


# --------------------------------------------------------------------------------------
# shape / layout cases
# --------------------------------------------------------------------------------------

# (name, shape, memory_format); N=3, C=2, tiny spatial sizes (gradcheck-friendly)
SMALL_LAYOUTS = [
    ("1d_NC", (3, 2), None),
    ("1d_NCL", (3, 2, 3), None),
    ("2d", (3, 2, 2, 3), None),
    ("2d_cl", (3, 2, 2, 3), torch.channels_last),
    ("3d", (3, 2, 2, 2, 2), None),
    ("3d_cl", (3, 2, 2, 2, 2), torch.channels_last_3d),
]


def make_input(shape, dtype=torch.float32, device="cpu", memory_format=None, requires_grad=False,
               scale=1.0, shift=0.0):
    x = torch.randn(shape, dtype=torch.float64) * scale + shift
    x = x.to(device=device, dtype=dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    if requires_grad:
        x.requires_grad_()
    return x


def reduce_dims(x):
    return [0] + list(range(2, x.dim()))


def batch_stats(x):
    """Per-channel batch mean and biased variance, computed in float64."""
    d = reduce_dims(x)
    xd = x.detach().double()
    return xd.mean(d), xd.var(d, unbiased=False)


def assert_variance_exact(stats, x, tol):
    """stats (a batch_norm_stats op) on x, with running statistics and momentum 1: the running variance, the
    variance behind invstd and the mean within tol (relative to the variance, the mean relative to the
    deviation) of float64 batch statistics."""
    mean_ref, var_ref = batch_stats(x)
    M = x.numel() // x.shape[1]
    C = x.shape[1]
    rm, rv = torch.zeros(C, device=x.device), torch.zeros(C, device=x.device)
    mean, invstd = stats(x, rm, rv, None, 1.0, 1e-5)
    unbiased_ref = var_ref * M / (M - 1)
    assert ((rv.double() - unbiased_ref).abs() / unbiased_ref).max().item() < tol
    var_from_invstd = 1.0 / invstd.double() ** 2 - 1e-5
    assert ((var_from_invstd - var_ref).abs() / var_ref).max().item() < tol
    assert ((mean.double() - mean_ref).abs() / var_ref.sqrt()).max().item() < tol


def assert_close(actual, expected, atol, rtol, msg=""):
    """torch.testing.assert_close with dtype promotion (compare values, not dtypes)."""
    if actual is None or expected is None:
        assert actual is None and expected is None, msg
        return
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected.detach().double().cpu(), atol=atol, rtol=rtol,
        msg=(lambda m: f"{msg}: {m}") if msg else None,
    )


def train_fwd_bwd(x, w, b, gy, formula, rm=None, rv=None):
    """bnx training forward + backward on fresh leaves: [y, grad x, grad weight, grad bias]."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    b = b.clone().requires_grad_()
    y = bnx.functional.batch_norm(x, rm, rv, w, b, training=True, backward=formula)
    y.backward(gy)
    return [y.detach(), x.grad, w.grad, b.grad]


def every_finite_bf16(layout, device, seed=0):
    """All 65280 finite bfloat16 values, in a random order, as (1, 8, 80, 102): 16-byte vectors of 8 elements
    in NCHW planes and channels-last rows alike."""
    bits = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.bfloat16)
    values = values[torch.isfinite(values)]
    g = torch.Generator().manual_seed(seed)
    values = values[torch.randperm(values.numel(), generator=g)].reshape(1, 8, 80, 102)
    if layout == "cl":
        values = values.contiguous(memory_format=torch.channels_last)
    return values.to(device)


def assert_bf16_maps_exact(ops, layout, device):
    """The elementwise passes with coefficients that make them identities, on every finite bfloat16 value: the
    normalize (mean 0, invstd 1), the frozen backward's dx (weight * invstd = 1) and the batch backward's dx
    (zero gradient sums) must give their input back, each element in its place (a vector's elements read or
    written in the wrong order, or rounded wrongly, would not)."""
    x = every_finite_bf16(layout, device, seed=1)
    dy = every_finite_bf16(layout, device, seed=2)
    C = x.shape[1]
    zeros = torch.zeros(C, device=device)
    ones = torch.ones(C, device=device)
    y = ops.batch_norm_elemt(x, None, None, zeros, ones)
    assert torch.equal(y, x), "normalize with mean 0, invstd 1"
    dx, _, _ = ops.batch_norm_backward(dy, x, zeros, ones, ones, "frozen", [True, False, False])
    assert torch.equal(dx, dy), "frozen dx with weight * invstd = 1"
    dx = ops.batch_norm_backward_elemt(dy, x, zeros, ones, ones, zeros, zeros, x.numel() // C)
    assert torch.equal(dx, dy), "batch dx with zero gradient sums"
