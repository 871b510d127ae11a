"""Finite-difference checks of both backward formulas (float64), first and second order.

"batch":  gradient of the batch-statistics forward (training=True) wrt input, weight, bias.
"frozen": gradient of the function whose statistics are constants, i.e. the eval forward
          with running statistics (training=False) -- the frozen formula is *not* the
          derivative of the batch-statistics forward, so it is checked against the function
          it is the derivative of, and separately compared with the eval path in training mode.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import bnx
from conftest import DEVICES, SMALL_LAYOUTS, assert_close, batch_stats, make_input

LAYOUT_IDS = [c[0] for c in SMALL_LAYOUTS]


def _inputs(shape, memory_format, affine, device, dtype=torch.float64):
    C = shape[1]
    x = make_input(shape, dtype, device, memory_format, requires_grad=True)
    if affine:
        w = (torch.rand(C, dtype=torch.float64) + 0.5).to(device, dtype).requires_grad_()
        b = torch.randn(C, dtype=torch.float64).to(device, dtype).requires_grad_()
    else:
        w = b = None
    return x, w, b


def _running(C, device, dtype=torch.float64):
    rm = torch.randn(C, dtype=torch.float64).to(device, dtype)
    rv = (torch.rand(C, dtype=torch.float64) + 0.5).to(device, dtype)
    return rm, rv


def _fn(formula, running, affine):
    if formula == "batch":
        def f(x, *wb):
            w, b = wb if affine else (None, None)
            return bnx.functional.batch_norm(x, None, None, w, b, training=True, backward="batch")
    else:
        rm, rv = running

        def f(x, *wb):
            w, b = wb if affine else (None, None)
            return bnx.functional.batch_norm(x, rm, rv, w, b, training=False, backward="frozen")
    return f


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("formula", ["batch", "frozen"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("layout", SMALL_LAYOUTS, ids=LAYOUT_IDS)
def test_gradcheck(device, formula, affine, layout, autograd_path):
    """First derivatives of both formulas match finite differences (float64)."""
    torch.manual_seed(1)
    _, shape, mf = layout
    x, w, b = _inputs(shape, mf, affine, device)
    f = _fn(formula, _running(shape[1], device), affine)
    args = (x, w, b) if affine else (x,)
    assert gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("formula", ["batch", "frozen"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("layout", SMALL_LAYOUTS, ids=LAYOUT_IDS)
def test_gradgradcheck(device, formula, affine, layout, autograd_path):
    """Second derivatives (double backward, create_graph=True) match finite differences."""
    torch.manual_seed(2)
    _, shape, mf = layout
    x, w, b = _inputs(shape, mf, affine, device)
    f = _fn(formula, _running(shape[1], device), affine)
    args = (x, w, b) if affine else (x,)
    assert gradgradcheck(f, args, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_default_backward_picks_matching_formula(device, autograd_path):
    """backward=None is the true derivative of whatever forward runs (train and eval)."""
    torch.manual_seed(3)
    x, w, b = _inputs((4, 3, 2, 2), None, True, device)
    rm, rv = _running(3, device)
    assert gradcheck(lambda x, w, b: bnx.functional.batch_norm(x, None, None, w, b, training=True),
                     (x, w, b))
    assert gradcheck(lambda x, w, b: bnx.functional.batch_norm(x, rm, rv, w, b, training=False),
                     (x, w, b))


# ---------------------------------------------------------------------------------------
# frozen formula in training mode == eval mode with running stats set to the batch stats
# ---------------------------------------------------------------------------------------

def _grads(y, inputs, gy):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(y, inputs, gy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("with_running", [False, True], ids=["norunning", "running"])
@pytest.mark.parametrize("layout", SMALL_LAYOUTS, ids=LAYOUT_IDS)
def test_frozen_train_equals_eval_with_batch_stats(device, dtype, affine, with_running, layout, autograd_path):
    """training=True, backward="frozen": output is the batch-stats forward, and all grads equal
    those of the eval forward whose running stats are the batch mean / biased batch var (bnx
    eval path and native torch eval path)."""
    torch.manual_seed(4)
    _, shape, mf = layout
    shape = (5,) + tuple(shape[1:])  # a few more samples than gradcheck needs
    C = shape[1]
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)

    x0, w0, b0 = _inputs(shape, mf, affine, device, dtype)
    gy = make_input(shape, dtype, device, mf)

    def clones():
        x = x0.detach().clone().requires_grad_()
        w = None if w0 is None else w0.detach().clone().requires_grad_()
        b = None if b0 is None else b0.detach().clone().requires_grad_()
        return x, w, b

    # training mode, frozen backward
    x1, w1, b1 = clones()
    if with_running:
        rm1, rv1 = _running(C, device, dtype)
    else:
        rm1 = rv1 = None
    y1 = bnx.functional.batch_norm(x1, rm1, rv1, w1, b1, training=True, backward="frozen")
    g1 = _grads(y1, [x1, w1, b1], gy)

    # eval mode with running stats = batch stats
    mean, var = batch_stats(x0)
    mean, var = mean.to(dtype), var.to(dtype)
    x2, w2, b2 = clones()
    y2 = bnx.functional.batch_norm(x2, mean.clone(), var.clone(), w2, b2, training=False)
    g2 = _grads(y2, [x2, w2, b2], gy)

    # native torch eval mode
    x3, w3, b3 = clones()
    y3 = F.batch_norm(x3, mean.clone(), var.clone(), w3, b3, training=False)
    g3 = _grads(y3, [x3, w3, b3], gy)

    # native torch train forward (the frozen switch must not change the forward)
    y4 = F.batch_norm(x0.detach(), None, None, w0, b0, training=True)

    assert_close(y1, y4, **tol, msg="train forward")
    assert_close(y1, y2, **tol, msg="bnx eval output")
    assert_close(y2, y3, **tol, msg="torch eval output")
    names = ["grad_input", "grad_weight", "grad_bias"]
    for n, a, b_, c in zip(names, g1, g2, g3):
        assert_close(a, b_, **tol, msg=f"{n} frozen-train vs bnx eval")
        assert_close(a, c, **tol, msg=f"{n} frozen-train vs torch eval")


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_differs_from_batch_in_training(device, autograd_path):
    """Sanity: in training mode the two formulas give different grad_input (the switch works)
    but identical grad_weight / grad_bias."""
    torch.manual_seed(5)
    x0, w0, b0 = _inputs((6, 3, 4, 4), None, True, device)
    gy = torch.randn_like(x0)
    out = {}
    for formula in ["batch", "frozen"]:
        x, w, b = (t.detach().clone().requires_grad_() for t in (x0, w0, b0))
        y = bnx.functional.batch_norm(x, None, None, w, b, training=True, backward=formula)
        out[formula] = _grads(y, [x, w, b], gy)
    assert (out["batch"][0] - out["frozen"][0]).abs().max() > 1e-2
    assert_close(out["batch"][1], out["frozen"][1], atol=1e-10, rtol=1e-10)
    assert_close(out["batch"][2], out["frozen"][2], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("mode", [("train", None), ("train", "batch"), ("train", "frozen"),
                                  ("eval", None), ("eval", "frozen")],
                         ids=lambda m: f"{m[0]}-{m[1]}")
@pytest.mark.parametrize("mf", [None, torch.channels_last], ids=["contiguous", "cl"])
def test_create_graph_path_matches_fused_path(device, dtype, mode, mf, autograd_path):
    """First-order grads computed with create_graph=True (differentiable torch ops) equal the
    fused-kernel grads (create_graph=False), with the same dtypes and layouts."""
    torch.manual_seed(6)
    training = mode[0] == "train"
    x, w, b = _inputs((5, 3, 4, 4), mf, True, device, dtype)
    rm, rv = _running(3, device, dtype)
    gy = make_input((5, 3, 4, 4), dtype, device, mf)
    outs = []
    for create_graph in (False, True):
        y = bnx.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training,
                                      backward=mode[1])
        outs.append(torch.autograd.grad(y, (x, w, b), gy, create_graph=create_graph))
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for n, a, c in zip(["grad_input", "grad_weight", "grad_bias"], *outs):
        assert a.dtype == c.dtype == dtype, n
        assert_close(c, a, tol * 10, tol, n)
    if mf is not None:
        assert outs[0][0].is_contiguous(memory_format=mf)
