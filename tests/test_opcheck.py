"""torch.library.opcheck on every op in torch.ops.bnx.

opcheck runs: test_schema (declared mutation/aliasing is what the kernel does),
test_autograd_registration, test_faketensor (fake/meta kernel agrees with the real one on
shapes, dtypes, strides) and test_aot_dispatch_dynamic (the op traces under
AOTAutograd with dynamic shapes and gives the eager result).
"""
import pytest
import torch
from torch.library import opcheck

import bnx  # noqa: F401
from conftest import DEVICES, make_input

ops = torch.ops.bnx
COVERED = {
    "bnx::batch_norm",
    "bnx::batch_norm_stats",
    "bnx::batch_norm_train_forward",
    "bnx::batch_norm_elemt",
    "bnx::batch_norm_inference",
    "bnx::batch_norm_backward_reduce",
    "bnx::batch_norm_backward_elemt",
    "bnx::batch_norm_backward",
}

LAYOUTS = {
    "2d": ((4, 3, 3, 5), None),
    "2d_cl": ((4, 3, 3, 5), torch.channels_last),
    "3d_cl": ((2, 3, 2, 3, 4), torch.channels_last_3d),
    "NC": ((6, 3), None),
    "NCL": ((4, 3, 5), None),
}
# (input dtype, per-channel param dtype)
DTYPES = {
    "f32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16_f32params": (torch.bfloat16, torch.float32),
}
MASKS = [[True, True, True], [True, False, False], [False, True, True], [True, True, False],
         [False, False, False]]


def test_every_bnx_op_is_covered():
    """The set of registered bnx ops is exactly the set this file opchecks."""
    names = {n.split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("bnx::")}
    assert names == COVERED


def _setup(device, layout, dtype_case):
    shape, mf = LAYOUTS[layout]
    idt, pdt = DTYPES[dtype_case]
    C = shape[1]
    x = make_input(shape, idt, device, mf, scale=2.0, shift=1.0)
    gy = make_input(shape, idt, device, mf)
    w = (torch.rand(C) + 0.5).to(device, pdt)
    b = torch.randn(C).to(device, pdt)
    rm = torch.randn(C).to(device, pdt)
    rv = (torch.rand(C) + 0.5).to(device, pdt)
    mean, invstd = ops.batch_norm_stats(x, None, None, None, 0.1, 1e-5)
    return x, gy, w, b, rm, rv, mean, invstd


PARAMS = [pytest.mark.parametrize("device", DEVICES),
          pytest.mark.parametrize("layout", list(LAYOUTS)),
          pytest.mark.parametrize("dtype_case", list(DTYPES))]


def params(f):
    for p in reversed(PARAMS):
        f = p(f)
    return f


@params
@pytest.mark.parametrize("running", ["none", "momentum", "num_batches_tracked"])
def test_opcheck_batch_norm_stats(device, layout, dtype_case, running):
    """batch_norm_stats with and without (in-place updated) running stats."""
    x, gy, w, b, rm, rv, mean, invstd = _setup(device, layout, dtype_case)
    if running == "none":
        args = (x, None, None, None, 0.1, 1e-5)
    elif running == "momentum":
        args = (x, rm, rv, None, 0.1, 1e-5)
    else:
        args = (x, rm, rv, torch.tensor(3, device=device), 0.1, 1e-5)
    opcheck(ops.batch_norm_stats.default, args)


@params
@pytest.mark.parametrize("running", ["none", "momentum", "num_batches_tracked"])
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck_batch_norm_train_forward(device, layout, dtype_case, running, affine):
    """The fused training forward, with and without (in-place updated) running stats."""
    x, gy, w, b, rm, rv, mean, invstd = _setup(device, layout, dtype_case)
    w, b = (w, b) if affine else (None, None)
    if running == "none":
        args = (x, w, b, None, None, None, 0.1, 1e-5)
    elif running == "momentum":
        args = (x, w, b, rm, rv, None, 0.1, 1e-5)
    else:
        args = (x, w, b, rm, rv, torch.tensor(3, device=device), 0.1, 1e-5)
    opcheck(ops.batch_norm_train_forward.default, args)


@params
@pytest.mark.parametrize("mode", ["train_batch", "train_frozen", "train_running", "eval_frozen"])
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck_batch_norm(device, layout, dtype_case, mode, affine):
    """The layer op (C++ autograd kernel), with inputs that require grad so its backward is checked too."""
    x, gy, w, b, rm, rv, mean, invstd = _setup(device, layout, dtype_case)
    x.requires_grad_()
    w, b = (w.requires_grad_(), b.requires_grad_()) if affine else (None, None)
    training = mode != "eval_frozen"
    running = mode in ("train_running", "eval_frozen")
    formula = "batch" if mode in ("train_batch", "train_running") else "frozen"
    args = (x, w, b, rm if running else None, rv if running else None, None, training, 0.1, 1e-5, formula)
    opcheck(ops.batch_norm.default, args)


@params
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck_batch_norm_elemt(device, layout, dtype_case, affine):
    x, gy, w, b, rm, rv, mean, invstd = _setup(device, layout, dtype_case)
    args = (x, w if affine else None, b if affine else None, mean, invstd)
    opcheck(ops.batch_norm_elemt.default, args)


@params
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck_batch_norm_inference(device, layout, dtype_case, affine):
    x, gy, w, b, rm, rv, mean, invstd = _setup(device, layout, dtype_case)
    args = (x, w if affine else None, b if affine else None, rm, rv, 1e-5)
    opcheck(ops.batch_norm_inference.default, args)


@params
def test_opcheck_batch_norm_backward_reduce(device, layout, dtype_case):
    x, gy, w, b, rm, rv, mean, invstd = _setup(device, layout, dtype_case)
    opcheck(ops.batch_norm_backward_reduce.default, (gy, x, mean, invstd))


@params
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck_batch_norm_backward_elemt(device, layout, dtype_case, affine):
    x, gy, w, b, rm, rv, mean, invstd = _setup(device, layout, dtype_case)
    sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(gy, x, mean, invstd)
    count = x.numel() // x.shape[1]
    args = (gy, x, mean, invstd, w if affine else None, sum_dy, sum_dy_xmu, count)
    opcheck(ops.batch_norm_backward_elemt.default, args)


@params
@pytest.mark.parametrize("formula", ["batch", "frozen"])
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck_batch_norm_backward(device, layout, dtype_case, formula, affine):
    """Fused backward, both formulas, all outputs wanted."""
    x, gy, w, b, rm, rv, mean, invstd = _setup(device, layout, dtype_case)
    args = (gy, x, mean, invstd, w if affine else None, formula, [True, True, True])
    opcheck(ops.batch_norm_backward.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["2d", "2d_cl"])
@pytest.mark.parametrize("dtype_case", ["f32", "bf16"])
@pytest.mark.parametrize("formula", ["batch", "frozen"])
@pytest.mark.parametrize("mask", MASKS[1:], ids=lambda m: "".join("1" if v else "0" for v in m))
def test_opcheck_batch_norm_backward_masks(device, layout, dtype_case, formula, mask):
    """Fused backward with partial output masks."""
    x, gy, w, b, rm, rv, mean, invstd = _setup(device, layout, dtype_case)
    args = (gy, x, mean, invstd, w, formula, mask)
    opcheck(ops.batch_norm_backward.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype_case", list(DTYPES))
@pytest.mark.parametrize("affine", [True, False])
def test_backward_output_mask_shapes_and_dtypes(device, dtype_case, affine):
    """Unwanted outputs are empty (0,) tensors; wanted grad_weight/grad_bias have weight's dtype
    (acc dtype without weight); grad_input has input's dtype and shape."""
    x, gy, w, b, rm, rv, mean, invstd = _setup(device, "2d_cl", dtype_case)
    weight = w if affine else None
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    pdt = w.dtype if affine else acc
    full = ops.batch_norm_backward(gy, x, mean, invstd, weight, "batch", [True, True, True])
    for mask in MASKS:
        outs = ops.batch_norm_backward(gy, x, mean, invstd, weight, "batch", mask)
        for i, (o, want, f) in enumerate(zip(outs, mask, full)):
            dt = x.dtype if i == 0 else pdt
            assert o.dtype == dt, (mask, i)
            if want:
                assert o.shape == f.shape and torch.equal(o, f), (mask, i)
            else:
                assert o.shape == (0,), (mask, i)
    assert full[0].shape == x.shape
    assert full[1].shape == (x.shape[1],) and full[2].shape == (x.shape[1],)
