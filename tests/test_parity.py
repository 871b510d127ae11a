"""Parity with torch.nn.BatchNorm{1,2,3}d / torch.nn.functional.batch_norm.

float32: bnx vs native torch with tight tolerances.
bfloat16 / float16 (and float32 params with low-precision input): bnx vs a float64 reference
(the native module run in float64 on the same, exactly representable, values) with
tolerances that fit the output dtype.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import bnx
from conftest import DEVICES, assert_close, make_input

MODULES = {
    "1d_NC": (torch.nn.BatchNorm1d, bnx.BatchNorm1d, (8, 3)),
    "1d_NCL": (torch.nn.BatchNorm1d, bnx.BatchNorm1d, (4, 3, 5)),
    "2d": (torch.nn.BatchNorm2d, bnx.BatchNorm2d, (4, 3, 5, 4)),
    "3d": (torch.nn.BatchNorm3d, bnx.BatchNorm3d, (3, 3, 4, 3, 2)),
}

CONFIGS = {
    "default": dict(momentum=0.1, affine=True, track_running_stats=True),
    "momentum_none": dict(momentum=None, affine=True, track_running_stats=True),
    "momentum_0.5": dict(momentum=0.5, affine=True, track_running_stats=True),
    "no_affine": dict(momentum=0.1, affine=False, track_running_stats=True),
    "no_track": dict(momentum=0.1, affine=True, track_running_stats=False),
    "no_affine_no_track": dict(momentum=0.1, affine=False, track_running_stats=False),
}

# name -> (param dtype, input dtype, atol, rtol)
DTYPES = {
    "f32": (torch.float32, torch.float32, 1e-5, 1e-5),
    "f64": (torch.float64, torch.float64, 1e-10, 1e-10),
    "bf16": (torch.bfloat16, torch.bfloat16, 2e-2, 2e-2),
    "f16": (torch.float16, torch.float16, 4e-3, 4e-3),
    "f32p_bf16in": (torch.float32, torch.bfloat16, 2e-2, 2e-2),
    "f32p_f16in": (torch.float32, torch.float16, 4e-3, 4e-3),
}


def _make_pair(kind, cfg, device, param_dtype):
    tcls, bcls, shape = MODULES[kind]
    C = shape[1]
    ref = tcls(C, **cfg)
    with torch.no_grad():
        if ref.affine:
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
        if ref.track_running_stats:
            ref.running_mean.normal_()
            ref.running_var.uniform_(0.5, 2.0)
    mod = bcls(C, **cfg)
    mod.load_state_dict(ref.state_dict())
    return ref.to(device, param_dtype), mod.to(device, param_dtype), shape


def _step(m, x, gy):
    x = x.detach().clone().requires_grad_()
    y = m(x)
    y.backward(gy)
    return y.detach(), x.grad


def _param_grads(m):
    if not m.affine:
        return [None, None]
    return [m.weight.grad, m.bias.grad]


def _zero(m):
    for p in m.parameters():
        p.grad = None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype_case", list(DTYPES))
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("kind", list(MODULES))
def test_module_parity(device, dtype_case, cfg_name, kind, autograd_path):
    """Train steps then eval: outputs, input/weight/bias grads, running stats and
    num_batches_tracked agree with torch.nn.BatchNorm*d."""
    torch.manual_seed(10)
    pdt, idt, atol, rtol = DTYPES[dtype_case]
    cfg = CONFIGS[cfg_name]
    low = idt in (torch.float16, torch.bfloat16)
    ref, mod, shape = _make_pair(kind, cfg, device, pdt)
    # low precision: the reference is the native module in float64 on the same values
    if low:
        ref = copy.deepcopy(ref).to(torch.float64)
    ref_dt = torch.float64 if low else idt

    for step in range(3):
        x = make_input(shape, idt, device, scale=2.0, shift=step - 1.0)
        gy = make_input(shape, idt, device)
        _zero(mod), _zero(ref)
        y, gx = _step(mod, x, gy)
        y_ref, gx_ref = _step(ref, x.to(ref_dt), gy.to(ref_dt))
        assert y.dtype == idt and gx.dtype == idt
        assert_close(y, y_ref, atol, rtol, f"train step {step} output")
        assert_close(gx, gx_ref, atol, rtol, f"train step {step} grad_input")
        for n, a, b in zip(["weight", "bias"], _param_grads(mod), _param_grads(ref)):
            if a is not None:
                assert a.dtype == pdt
            # sums over M elements: scale the absolute tolerance with M
            assert_close(a, b, atol * 10, rtol, f"train step {step} grad_{n}")
        if ref.track_running_stats:
            assert mod.running_mean.dtype == pdt
            assert_close(mod.running_mean, ref.running_mean, atol, rtol, "running_mean")
            assert_close(mod.running_var, ref.running_var, atol, rtol, "running_var")
            assert torch.equal(mod.num_batches_tracked.cpu(), ref.num_batches_tracked.cpu())
            assert mod.num_batches_tracked.dtype == torch.long
        else:
            assert mod.running_mean is None and mod.running_var is None

    mod.eval(), ref.eval()
    x = make_input(shape, idt, device, scale=2.0)
    gy = make_input(shape, idt, device)
    _zero(mod), _zero(ref)
    y, gx = _step(mod, x, gy)
    y_ref, gx_ref = _step(ref, x.to(ref_dt), gy.to(ref_dt))
    assert_close(y, y_ref, atol, rtol, "eval output")
    assert_close(gx, gx_ref, atol, rtol, "eval grad_input")
    for n, a, b in zip(["weight", "bias"], _param_grads(mod), _param_grads(ref)):
        assert_close(a, b, atol * 10, rtol, f"eval grad_{n}")
    if ref.track_running_stats:  # eval must not touch running stats
        assert_close(mod.running_mean, ref.running_mean, atol, rtol, "running_mean after eval")
        assert torch.equal(mod.num_batches_tracked.cpu(), ref.num_batches_tracked.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype_case", ["f32", "bf16", "f16", "f32p_bf16in"])
@pytest.mark.parametrize("kind", ["2d", "3d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_in_channels_last_out(device, dtype_case, kind, training):
    """channels_last(_3d) input gives channels_last output and grad_input, same values as
    the contiguous computation."""
    torch.manual_seed(11)
    pdt, idt, atol, rtol = DTYPES[dtype_case]
    mf = torch.channels_last if kind == "2d" else torch.channels_last_3d
    _, mod, shape = _make_pair(kind, CONFIGS["default"], device, pdt)
    mod.train(training)
    mod_c = copy.deepcopy(mod)
    x = make_input(shape, idt, device)
    gy = make_input(shape, idt, device)

    xc = x.contiguous(memory_format=mf).requires_grad_()
    y = mod(xc)
    assert y.is_contiguous(memory_format=mf)
    gx, = torch.autograd.grad(y, xc, gy.contiguous(memory_format=mf))
    assert gx.is_contiguous(memory_format=mf)

    x2 = x.clone().requires_grad_()
    y2 = mod_c(x2)
    gx2, = torch.autograd.grad(y2, x2, gy)
    assert_close(y, y2, atol, rtol)
    assert_close(gx, gx2, atol, rtol)
    assert_close(mod.running_mean, mod_c.running_mean, atol, rtol)
    assert_close(mod.running_var, mod_c.running_var, atol, rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("formula", ["batch", "frozen"])
@pytest.mark.parametrize("mf", [torch.channels_last, torch.channels_last_3d], ids=["cl", "cl3d"])
@pytest.mark.parametrize("gy_format", ["same", "contiguous"])
def test_backward_op_keeps_input_memory_format(device, formula, mf, gy_format):
    """batch_norm_elemt / batch_norm_backward / backward_elemt return tensors in input's
    memory format (also when grad_out is contiguous), with the values of the contiguous case."""
    torch.manual_seed(12)
    shape = (3, 4, 3, 5) if mf == torch.channels_last else (3, 4, 2, 3, 5)
    x = make_input(shape, torch.float32, device, mf)
    gy = make_input(shape, torch.float32, device, mf if gy_format == "same" else None)
    w = torch.rand(4, device=device) + 0.5
    b = torch.randn(4, device=device)
    mean, invstd = torch.ops.bnx.batch_norm_stats(x, None, None, None, 0.1, 1e-5)
    y = torch.ops.bnx.batch_norm_elemt(x, w, b, mean, invstd)
    assert y.is_contiguous(memory_format=mf)
    gi, gw, gb = torch.ops.bnx.batch_norm_backward(gy, x, mean, invstd, w, formula,
                                                   [True, True, True])
    assert gi.is_contiguous(memory_format=mf)
    xc, gyc = x.contiguous(), gy.contiguous()
    gi2, gw2, gb2 = torch.ops.bnx.batch_norm_backward(gyc, xc, mean, invstd, w, formula,
                                                      [True, True, True])
    assert_close(gi, gi2, 1e-5, 1e-5)
    assert_close(gw, gw2, 1e-4, 1e-5)
    assert_close(gb, gb2, 1e-4, 1e-5)
    sum_dy, sum_dy_xmu = torch.ops.bnx.batch_norm_backward_reduce(gy, x, mean, invstd)
    count = x.numel() // x.shape[1]
    ge = torch.ops.bnx.batch_norm_backward_elemt(gy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count)
    assert ge.is_contiguous(memory_format=mf)
    if formula == "batch":
        assert_close(ge, gi2, 1e-5, 1e-5)


# ---------------------------------------------------------------------------------------
# functional parity
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 7), (4, 3, 5, 6), (2, 3, 4, 3, 5)],
                         ids=["2D", "3D", "4D", "5D"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_running", [True, False], ids=["running", "norunning"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_functional_parity(device, shape, training, with_running, affine, autograd_path):
    """bnx.functional.batch_norm == torch.nn.functional.batch_norm: output, grads, running
    stats (float32)."""
    if not training and not with_running:
        pytest.skip("eval needs running stats (error case tested in test_errors)")
    torch.manual_seed(13)
    C = shape[1]
    x = make_input(shape, torch.float32, device, scale=3.0, shift=1.0)
    gy = make_input(shape, torch.float32, device)
    w = (torch.rand(C) + 0.5).to(device) if affine else None
    b = torch.randn(C).to(device) if affine else None
    rm = torch.randn(C).to(device) if with_running else None
    rv = (torch.rand(C) + 0.5).to(device) if with_running else None

    res = []
    for fn in (bnx.functional.batch_norm, F.batch_norm):
        xx = x.clone().requires_grad_()
        ww = None if w is None else w.clone().requires_grad_()
        bb = None if b is None else b.clone().requires_grad_()
        rmm = None if rm is None else rm.clone()
        rvv = None if rv is None else rv.clone()
        y = fn(xx, rmm, rvv, ww, bb, training=training, momentum=0.3, eps=1e-3)
        y.backward(gy)
        res.append([y, xx.grad, None if ww is None else ww.grad, None if bb is None else bb.grad,
                    rmm, rvv])
    names = ["output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"]
    for n, a, e in zip(names, *res):
        assert_close(a, e, 1e-4 if n.startswith("grad_w") or n == "grad_bias" else 1e-5, 1e-5, n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nbt", [1, 2, 7])
def test_functional_num_batches_tracked_factor(device, nbt, autograd_path):
    """num_batches_tracked=k (momentum=None) updates running stats with factor 1/k, exactly
    like torch with momentum=1/k; the functional does not modify num_batches_tracked."""
    torch.manual_seed(14)
    x = make_input((5, 3, 4), torch.float32, device, scale=2.0, shift=3.0)
    rm0, rv0 = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    nbt_t = torch.tensor(nbt, device=device)
    rm, rv = rm0.clone(), rv0.clone()
    y = bnx.functional.batch_norm(x, rm, rv, training=True, momentum=None,
                                  num_batches_tracked=nbt_t)
    rm2, rv2 = rm0.clone(), rv0.clone()
    y2 = F.batch_norm(x, rm2, rv2, training=True, momentum=1.0 / nbt)
    assert_close(y, y2, 1e-5, 1e-5)
    assert_close(rm, rm2, 1e-6, 1e-6)
    assert_close(rv, rv2, 1e-6, 1e-6)
    assert nbt_t.item() == nbt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype_case", ["bf16", "f16", "f32p_bf16in", "f32p_f16in"])
def test_low_precision_not_worse_than_torch(device, dtype_case):
    """Low-precision output/grads are at least about as accurate as native torch's, measured
    against float64 (guards against accumulating in the low-precision type)."""
    torch.manual_seed(15)
    pdt, idt, _, _ = DTYPES[dtype_case]
    shape = (16, 4, 32, 32)
    x = make_input(shape, idt, device, scale=1.0, shift=4.0)
    gy = make_input(shape, idt, device)
    w = (torch.rand(4) + 0.5).to(device, pdt)
    b = torch.randn(4).to(device, pdt)

    def run(fn, dt_x, dt_p):
        xx = x.to(dt_x).requires_grad_()
        ww, bb = w.to(dt_p).requires_grad_(), b.to(dt_p).requires_grad_()
        y = fn(xx, None, None, ww, bb, training=True)
        y.backward(gy.to(dt_x))
        return [t.double() for t in (y, xx.grad, ww.grad, bb.grad)]

    ref = run(F.batch_norm, torch.float64, torch.float64)
    got = run(bnx.functional.batch_norm, idt, pdt)
    nat = run(F.batch_norm, idt, pdt)
    for n, r, g, t in zip(["output", "grad_input", "grad_weight", "grad_bias"], ref, got, nat):
        scale = r.abs().max().clamp_min(1.0)
        err_bnx = ((g - r).abs().max() / scale).item()
        err_nat = ((t - r).abs().max() / scale).item()
        assert err_bnx <= max(2 * err_nat, 1e-2), (n, err_bnx, err_nat)
