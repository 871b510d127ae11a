"""Inputs off the beaten path: odd strides, odd sizes, larger (multi-threaded) sizes,
partial requires_grad, weight without bias and vice versa, broadcast (stride-0) grad_out,
momentum with num_batches_tracked. All compared against torch in float64.
"""
import pytest
import torch
import torch.nn.functional as F

import bnx
from conftest import DEVICES, assert_close

bn_f = bnx.functional.batch_norm


def _leaf(t, dtype=None):
    return None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_()


def _run(fn, x, rm, rv, w, b, gy, dtype, **kw):
    """Forward + backward of fn on fresh leaves of `dtype`; returns y and grads and stats."""
    xx, ww, bb = _leaf(x, dtype), _leaf(w, dtype), _leaf(b, dtype)
    rmm = None if rm is None else rm.to(dtype).clone()
    rvv = None if rv is None else rv.to(dtype).clone()
    y = fn(xx, rmm, rvv, ww, bb, **kw)
    y.backward(gy.to(dtype))
    return [y, xx.grad, None if ww is None else ww.grad, None if bb is None else bb.grad, rmm, rvv]


def _check_vs_float64(x, gy, C, device, training, affine=True, tol=2e-5):
    w = (torch.rand(C) + 0.5).to(device) if affine else None
    b = torch.randn(C).to(device) if affine else None
    rm, rv = torch.randn(C).to(device), (torch.rand(C) + 0.5).to(device)
    got = _run(bn_f, x, rm, rv, w, b, gy, x.dtype, training=training, momentum=0.2)
    ref = _run(F.batch_norm, x, rm, rv, w, b, gy, torch.float64, training=training, momentum=0.2)
    for n, a, e in zip(["y", "grad_input", "grad_weight", "grad_bias", "running_mean",
                        "running_var"], got, ref):
        if e is None:
            assert a is None, n
            continue
        scale = e.abs().max().clamp_min(1.0).item() if e.numel() else 1.0
        assert_close(a, e, tol * scale, tol, n)
    return got


def _strided_cases(device):
    base = torch.randn(6, 5, 8, 9, device=device)
    return {
        "sliced": base[:, :, ::2, 1:],
        "transposed_hw": base.transpose(2, 3),
        "transposed_nc": torch.randn(5, 6, 8, 9, device=device).transpose(0, 1),
        "expanded": torch.randn(1, 5, 8, 9, device=device).expand(6, 5, 8, 9),
        "ncl_transposed": torch.randn(6, 7, 5, device=device).transpose(1, 2),
        "cl_hw1": torch.randn(6, 5, 1, 1, device=device).contiguous(memory_format=torch.channels_last),
        "cl_sliced": base.contiguous(memory_format=torch.channels_last)[:, :, 1:],
        "cl3d_sliced": torch.randn(3, 5, 4, 4, 4, device=device)
        .contiguous(memory_format=torch.channels_last_3d)[:, :, :, ::2],
        "nc_transposed": torch.randn(5, 9, device=device).t(),
        "channel_slice": torch.randn(4, 10, 3, 3, device=device)[:, 2:7],
        # dense but with a data pointer that is not 16-byte aligned (vectorized loads must cope)
        "offset_contiguous": torch.randn(1 + 6 * 5 * 8 * 8, device=device)[1:].view(6, 5, 8, 8),
        "offset_cl": torch.randn(1 + 6 * 5 * 8 * 8, device=device)[1:].view(6, 8, 8, 5)
        .permute(0, 3, 1, 2),
        "offset_NC": torch.randn(3 + 7 * 12, device=device)[3:].view(7, 12),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(_strided_cases("cpu")))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_arbitrary_strides(device, case, training, autograd_path):
    """Non-contiguous / overlapping-stride inputs give the values of the contiguous input."""
    torch.manual_seed(60)
    x = _strided_cases(device)[case]
    gy = torch.randn(x.shape, device=device)
    if case.startswith("offset"):  # grad_out dense in x's layout, misaligned as well
        gy = torch.randn(1 + x.numel(), device=device)[1:].as_strided(x.shape, x.stride())
    _check_vs_float64(x, gy, x.shape[1], device, training)


def _layout_cases(device):
    cases = dict(_strided_cases(device))
    cases["cl_channel_split"] = torch.randn(4, 10, 5, 6, device=device).contiguous(
        memory_format=torch.channels_last)[:, 3:7]
    cases["cl3d_channel_split"] = torch.randn(2, 8, 3, 4, 5, device=device).contiguous(
        memory_format=torch.channels_last_3d)[:, :5]
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["cl_sliced", "cl3d_sliced", "cl_channel_split", "cl3d_channel_split",
                                  "sliced", "channel_slice", "transposed_hw"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_output_layout_of_strided_inputs_like_torch(device, case, training):
    """The output of a strided input that is dense in no format has torch's layout: channels_last(_3d) for
    a slice of a channels_last(_3d) tensor (channel splits, x[:, :k], keep a channels_last model in
    channels_last), contiguous for a slice of a contiguous one. The fake kernel gives the same strides.
    The layout is torch's CPU one on every device: on CUDA torch's own depends on its path (cuDNN's follows
    the CPU rule; its native kernels keep the strides of a dense input such as transposed_hw)."""
    torch.manual_seed(61)
    x = _layout_cases(device)[case]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    C = x.shape[1]
    rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    y = bnx.functional.batch_norm(x, rm.clone(), rv.clone(), training=training)
    want = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), training=training)
    x_cpu = _layout_cases("cpu")[case]
    want_cpu = torch.nn.functional.batch_norm(x_cpu, rm.cpu(), rv.cpu(), training=training)
    assert x_cpu.stride() == x.stride()
    assert y.stride() == want_cpu.stride(), (y.stride(), want_cpu.stride())
    if device == "cpu":
        assert y.stride() == want.stride()
    assert_close(y, want, 1e-5, 1e-5, "y")
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        fy = bnx.functional.batch_norm(fake, mode.from_tensor(rm), mode.from_tensor(rv), training=training)
    assert fy.stride() == y.stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(7, 1, 3, 3), (3, 67, 5, 3), (2, 13, 1, 1), (5, 3, 1, 17),
                                   (2, 129, 3), (9, 31), (2, 3, 3, 5, 7), (1, 4, 3, 3)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_odd_sizes(device, shape, channels_last, training):
    """Odd channel counts and element counts (vector tails, C=1, N=1) match torch."""
    torch.manual_seed(61)
    x = torch.randn(shape, device=device) * 2 + 1
    if channels_last:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        elif x.dim() == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        else:
            pytest.skip("no channels_last format for this ndim")
    gy = torch.randn(shape, device=device).contiguous(
        memory_format=torch.channels_last if channels_last and x.dim() == 4 else
        torch.channels_last_3d if channels_last else torch.contiguous_format)
    _check_vs_float64(x, gy, shape[1], device, training)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,mf", [((64, 16, 32, 32), None),
                                      ((64, 16, 32, 32), torch.channels_last),
                                      ((100000, 3), None),
                                      ((3, 1000, 77), None),
                                      ((8, 2, 2048), None)],
                         ids=["4d", "4d_cl", "NC_tall", "NCL_wideC", "NCL_fewC"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_larger_inputs(device, shape, mf, dtype):
    """Sizes that take the parallel paths: train forward/backward match float64 torch."""
    torch.manual_seed(62)
    x = (torch.randn(shape, device=device) * 3 + 5).to(dtype)
    gy = torch.randn(shape, device=device).to(dtype)
    if mf is not None:
        x, gy = x.contiguous(memory_format=mf), gy.contiguous(memory_format=mf)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    got = _check_vs_float64(x, gy, shape[1], device, True, tol=tol)
    if mf is not None:
        assert got[0].is_contiguous(memory_format=mf)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", ["x", "w", "b", "wb", "xb"])
def test_partial_requires_grad(device, training, which, autograd_path):
    """Only the tensors that require grad get one, with torch's values."""
    torch.manual_seed(63)
    C = 3
    x0 = torch.randn(5, C, 4, device=device)
    w0, b0 = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    gy = torch.randn_like(x0)
    outs = []
    for fn in (bn_f, F.batch_norm):
        x, w, b = x0.clone(), w0.clone(), b0.clone()
        for name, t in zip("xwb", (x, w, b)):
            t.requires_grad_(name in which)
        y = fn(x, rm.clone(), rv.clone(), w, b, training=training)
        y.backward(gy)
        outs.append([x.grad, w.grad, b.grad])
    for n, a, e in zip("xwb", *outs):
        assert (a is None) == (n not in which), n
        assert_close(a, e, 1e-5, 1e-5, n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("formula", [None, "frozen"])
@pytest.mark.parametrize("which", ["weight_only", "bias_only"])
def test_weight_without_bias_and_bias_without_weight(device, training, formula, which, autograd_path):
    """weight=None or bias=None (the other given) match torch."""
    if formula == "frozen" and not training:
        formula = None
    torch.manual_seed(64)
    C = 4
    x = torch.randn(6, C, 3, 3, device=device)
    gy = torch.randn_like(x)
    w = (torch.rand(C) + 0.5).to(device) if which == "weight_only" else None
    b = torch.randn(C).to(device) if which == "bias_only" else None
    rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    got = _run(bn_f, x, rm, rv, w, b, gy, torch.float32, training=training, backward=formula)
    # The float64 reference runs on the CPU: torch 2.11's CUDA batch norm backward fails with bias but
    # no weight ("tensor does not have a device").
    x, gy, w, b, rm, rv = (None if t is None else t.cpu() for t in (x, gy, w, b, rm, rv))
    if formula == "frozen":  # reference: eval with the batch statistics
        d = (0, 2, 3)
        ref = _run(F.batch_norm, x, x.double().mean(d), x.double().var(d, unbiased=False), w, b,
                   gy, torch.float64, training=False)
        got, ref = got[:4], ref[:4]
    else:
        ref = _run(F.batch_norm, x, rm, rv, w, b, gy, torch.float64, training=training)
    for n, a, e in zip(["y", "gx", "gw", "gb", "rm", "rv"], got, ref):
        assert_close(a, e, 1e-4, 1e-5, n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("formula", [None, "frozen"])
def test_broadcast_grad_out(device, training, formula, autograd_path):
    """A stride-0 (expanded) grad_out, as produced by (y * v).sum(), gives torch's grads."""
    if formula == "frozen" and not training:
        formula = None
    torch.manual_seed(65)
    C = 3
    x = torch.randn(4, C, 5, 5, device=device)
    v = torch.randn(1, C, 1, 1, device=device)
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    res = []
    for fn, kw in [(bn_f, dict(backward=formula)), (F.batch_norm, {})]:
        xx, ww, bb = _leaf(x), _leaf(w), _leaf(b)
        if fn is F.batch_norm and formula == "frozen":
            d = (0, 2, 3)
            y = fn(xx, x.mean(d), x.var(d, unbiased=False), ww, bb, training=False)
        else:
            y = fn(xx, rm.clone(), rv.clone(), ww, bb, training=training, **kw)
        (y * v).sum().backward()
        res.append((xx.grad, bb.grad))
    # grad_weight = sum(v * xhat) = v * sum(xhat) ~ 0: pure rounding noise, not compared.
    for n, a, e in zip(["gx", "gb"], *res):
        assert_close(a, e, 1e-5, 1e-5, n)


class _NoGradient(torch.autograd.Function):
    """Uses its input but passes no gradient back to it (an undefined gradient, as some Functions return)."""

    @staticmethod
    def forward(ctx, y):
        return y.sum() * 0

    @staticmethod
    def backward(ctx, g):
        return None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_output_without_gradient(device, training, autograd_path):
    """When the output's gradient is undefined, x, weight and bias get none from batch norm, as with torch's:
    weight and bias come back None (not zeros) and x's gradient is only what reaches it by other paths."""
    torch.manual_seed(66)
    C = 3
    x = torch.randn(4, C, 2, 2, device=device)
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    res = []
    for fn in (bn_f, F.batch_norm):
        xx, ww, bb = _leaf(x), _leaf(w), _leaf(b)
        y = fn(xx, rm.clone(), rv.clone(), ww, bb, training=training)
        loss = _NoGradient.apply(y) + (2 * xx).sum()
        res.append(torch.autograd.grad(loss, (xx, ww, bb), allow_unused=True))
    (gx, gw, gb), (ex, ew, eb) = res
    assert ew is None and eb is None  # what torch does, which bnx must match
    assert gw is None and gb is None, (gw, gb)
    assert_close(gx, ex, 0, 0, "gx")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [None, 0.3])
def test_num_batches_tracked_overrides_momentum(device, momentum):
    """With num_batches_tracked given, the factor is 1/num_batches_tracked whatever momentum
    is (docs/DESIGN.md)."""
    torch.manual_seed(66)
    x = torch.randn(6, 3, 4, device=device) * 2 + 1
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    bn_f(x, rm, rv, training=True, momentum=momentum,
         num_batches_tracked=torch.tensor(4, device=device))
    F.batch_norm(x, rm2, rv2, training=True, momentum=0.25)
    assert_close(rm, rm2, 1e-6, 1e-6)
    assert_close(rv, rv2, 1e-6, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_module_under_no_grad_and_inference_mode(device, autograd_path):
    """Train-mode forward under no_grad / inference_mode still normalizes with batch stats and
    updates running stats, like torch."""
    torch.manual_seed(67)
    ref = torch.nn.BatchNorm2d(3).to(device)
    m = bnx.BatchNorm2d(3).to(device)
    for ctx in (torch.no_grad, torch.inference_mode):
        x = torch.randn(4, 3, 5, 5, device=device)
        with ctx():
            assert_close(m(x), ref(x), 1e-5, 1e-5)
        assert_close(m.running_mean, ref.running_mean, 1e-6, 1e-6)
        assert_close(m.running_var, ref.running_var, 1e-6, 1e-6)
        assert torch.equal(m.num_batches_tracked, ref.num_batches_tracked)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_noncontiguous_per_channel_tensors(device, training, autograd_path):
    """Strided views as weight/bias/running stats: same values as torch, and the in-place
    running-stat update writes through the view into the underlying buffer."""
    torch.manual_seed(68)
    C = 3
    x = torch.randn(5, C, 4, device=device) * 2 + 1
    gy = torch.randn_like(x)
    w_buf, b_buf = torch.rand(2 * C, device=device) + 0.5, torch.randn(2 * C, device=device)
    rm_buf, rv_buf = torch.randn(2 * C, device=device), torch.rand(2 * C, device=device) + 0.5
    rm_buf0, rv_buf0 = rm_buf.clone(), rv_buf.clone()
    w, b = w_buf[::2].requires_grad_(), b_buf[1::2].requires_grad_()
    rm, rv = rm_buf[::2], rv_buf[1::2]
    assert not (w.is_contiguous() or rm.is_contiguous())
    xx = x.clone().requires_grad_()
    y = bn_f(xx, rm, rv, w, b, training=training, momentum=0.3)
    y.backward(gy)

    x2 = x.clone().requires_grad_()
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    rm2, rv2 = rm_buf0[::2].clone(), rv_buf0[1::2].clone()
    y2 = F.batch_norm(x2, rm2, rv2, w2, b2, training=training, momentum=0.3)
    y2.backward(gy)
    for n, a, e in [("y", y, y2), ("gx", xx.grad, x2.grad), ("gw", w.grad, w2.grad),
                    ("gb", b.grad, b2.grad), ("rm", rm_buf[::2], rm2), ("rv", rv_buf[1::2], rv2)]:
        assert_close(a, e, 1e-5, 1e-5, n)
    # the other half of the buffers is untouched
    assert torch.equal(rm_buf[1::2], rm_buf0[1::2]) and torch.equal(rv_buf[::2], rv_buf0[::2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_dt,stat_dt", [(torch.float32, torch.float64),
                                           (torch.float32, torch.bfloat16),
                                           (torch.float32, torch.float16),
                                           (torch.bfloat16, torch.float64),
                                           (torch.float16, torch.float32),
                                           (torch.float64, torch.float32)],
                         ids=["f32_f64", "f32_bf16", "f32_f16", "bf16_f64", "f16_f32", "f64_f32"])
def test_per_channel_dtype_differs_from_input(device, in_dt, stat_dt, autograd_path):
    """Running stats / weight / bias in another float dtype than the input (DESIGN: allowed):
    output in input's dtype, grads and running stats in their own dtype, values per formula."""
    torch.manual_seed(69)
    C, mom, eps = 3, 0.25, 1e-5
    x = (torch.randn(6, C, 5, device=device) * 2 + 1).to(in_dt)
    gy = torch.randn(x.shape, device=device).to(in_dt)
    w = (torch.rand(C, device=device) + 0.5).to(stat_dt).requires_grad_()
    b = torch.randn(C, device=device).to(stat_dt).requires_grad_()
    rm0 = torch.randn(C, device=device).to(stat_dt)
    rv0 = (torch.rand(C, device=device) + 0.5).to(stat_dt)
    rm, rv = rm0.clone(), rv0.clone()
    xx = x.clone().requires_grad_()
    y = bn_f(xx, rm, rv, w, b, training=True, momentum=mom, eps=eps)
    y.backward(gy)
    assert y.dtype == in_dt and xx.grad.dtype == in_dt
    assert w.grad.dtype == stat_dt and b.grad.dtype == stat_dt
    assert rm.dtype == stat_dt and rv.dtype == stat_dt

    # float64 reference on the same values
    xd = x.double().requires_grad_()
    wd, bd = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    rmd, rvd = rm0.double(), rv0.double()
    yd = F.batch_norm(xd, rmd, rvd, wd, bd, training=True, momentum=mom, eps=eps)
    yd.backward(gy.double())
    low = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float32: 2e-5, torch.float64: 2e-5}
    tol_in, tol_st = low[in_dt], max(low[stat_dt], low[in_dt])
    assert_close(y, yd, tol_in, tol_in, "y")
    assert_close(xx.grad, xd.grad, tol_in, tol_in, "grad_input")
    assert_close(w.grad, wd.grad, tol_st * 10, tol_st, "grad_weight")
    assert_close(b.grad, bd.grad, tol_st * 10, tol_st, "grad_bias")
    assert_close(rm, rmd, tol_st, tol_st, "running_mean")
    assert_close(rv, rvd, tol_st, tol_st, "running_var")
