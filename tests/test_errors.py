"""Bad input raises the intended error (type and message); the empty batch behaves like torch."""
import pytest
import torch
import torch.nn.functional as F

import bnx
from conftest import DEVICES, HAS_CUDA, assert_close

bn_f = bnx.functional.batch_norm
NDIM_MSG = r"(?i)[0-9]-?D input|dim"  # e.g. "got 6-D input", "expected 2D to 5D input", "ndim"


# ------------------------------------------------------------------------------ ndim
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls,bad_shape,msg", [
    (bnx.BatchNorm1d, (2, 3, 4, 5), "expected 2D or 3D input \\(got 4D input\\)"),
    (bnx.BatchNorm1d, (3,), "expected 2D or 3D input \\(got 1D input\\)"),
    (bnx.BatchNorm2d, (2, 3, 4), "expected 4D input \\(got 3D input\\)"),
    (bnx.BatchNorm2d, (2, 3, 4, 4, 4), "expected 4D input \\(got 5D input\\)"),
    (bnx.BatchNorm3d, (2, 3, 4, 4), "expected 5D input \\(got 4D input\\)"),
])
def test_module_wrong_ndim(device, cls, bad_shape, msg):
    """Modules reject the wrong ndim with torch's ValueError message."""
    m = cls(3, device=device)
    with pytest.raises(ValueError, match=msg):
        m(torch.randn(bad_shape, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4,), (2, 2, 2, 2, 2, 2)], ids=["1D", "6D"])
@pytest.mark.parametrize("training", [True, False])
def test_functional_wrong_ndim(device, shape, training):
    """The functional accepts 2 <= ndim <= 5 only."""
    C = shape[1] if len(shape) > 1 else shape[0]
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    with pytest.raises((ValueError, RuntimeError), match=NDIM_MSG):
        bn_f(torch.randn(shape, device=device), rm, rv, training=training)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4,), (2, 2, 2, 2, 2, 2)], ids=["1D", "6D"])
def test_ops_wrong_ndim(device, shape):
    """The ops themselves check ndim too."""
    with pytest.raises(RuntimeError, match=NDIM_MSG):
        torch.ops.bnx.batch_norm_stats(torch.randn(shape, device=device), None, None, None,
                                       0.1, 1e-5)


# ------------------------------------------------------------------------------ channels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("training", [True, False])
def test_functional_channel_mismatch(device, bad, training):
    """A per-channel tensor of the wrong length is a RuntimeError naming that argument."""
    C = 3
    kw = dict(weight=torch.ones(C, device=device), bias=torch.zeros(C, device=device),
              running_mean=torch.zeros(C, device=device), running_var=torch.ones(C, device=device))
    kw[bad] = torch.ones(C + 1, device=device)
    x = torch.randn(4, C, 5, device=device)
    with pytest.raises(RuntimeError, match=bad):
        bn_f(x, kw["running_mean"], kw["running_var"], kw["weight"], kw["bias"], training=training)


@pytest.mark.parametrize("device", DEVICES)
def test_module_channel_mismatch(device):
    """Module with num_features != input channels raises a RuntimeError naming the parameter."""
    m = bnx.BatchNorm2d(4, device=device)
    with pytest.raises(RuntimeError, match="weight|bias|running_mean|running_var"):
        m(torch.randn(2, 3, 4, 4, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_ops_channel_mismatch(device):
    """Op-level checks name the offending argument."""
    x = torch.randn(4, 3, 5, device=device)
    one, bad = torch.ones(3, device=device), torch.ones(2, device=device)
    ops = torch.ops.bnx
    with pytest.raises(RuntimeError, match="weight"):
        ops.batch_norm_elemt(x, bad, one, one, one)
    with pytest.raises(RuntimeError, match="bias"):
        ops.batch_norm_elemt(x, one, bad, one, one)
    with pytest.raises(RuntimeError, match="mean"):
        ops.batch_norm_elemt(x, one, one, bad, one)
    with pytest.raises(RuntimeError, match="invstd"):
        ops.batch_norm_elemt(x, one, one, one, bad)
    with pytest.raises(RuntimeError, match="running_var"):
        ops.batch_norm_inference(x, one, one, one, bad, 1e-5)
    with pytest.raises(RuntimeError, match="running_mean"):
        ops.batch_norm_stats(x, bad, one.clone(), None, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="invstd"):
        ops.batch_norm_backward(x, x, one, bad, one, "batch", [True, True, True])
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.batch_norm_backward(x[:, :2], x, one, one, one, "batch", [True, True, True])


# ------------------------------------------------------------------------------ dtype
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_or_bool_input(device, dtype):
    """Integer / bool input is rejected with an error naming the dtype."""
    x = torch.randint(0, 2, (4, 3, 5), device=device).to(dtype)
    with pytest.raises((TypeError, RuntimeError),
                       match=r"(?i)dtype|int|long|byte|bool|char|floating"):
        bn_f(x, None, None, training=True)
    with pytest.raises((TypeError, RuntimeError),
                       match=r"(?i)dtype|int|long|byte|bool|char|floating"):
        bnx.BatchNorm1d(3, device=device)(x)


@pytest.mark.parametrize("device", DEVICES)
def test_integer_weight(device):
    """Integer per-channel tensors are rejected too."""
    x = torch.randn(4, 3, device=device)
    with pytest.raises((TypeError, RuntimeError), match=r"(?i)dtype|int|long|floating"):
        bn_f(x, None, None, torch.ones(3, dtype=torch.long, device=device), training=True)


# ------------------------------------------------------------------------------ torch-identical messages
TORCH_ONE_VALUE = "Expected more than 1 value per channel when training"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)])
def test_one_value_per_channel_training(device, shape):
    """Training with one value per channel: the same ValueError as torch (functional + module)."""
    x = torch.randn(shape, device=device)
    with pytest.raises(ValueError, match=TORCH_ONE_VALUE):
        F.batch_norm(x, None, None, training=True)  # the message we must match
    with pytest.raises(ValueError, match=TORCH_ONE_VALUE):
        bn_f(x, None, None, training=True)
    cls = {2: bnx.BatchNorm1d, 3: bnx.BatchNorm1d, 4: bnx.BatchNorm2d, 5: bnx.BatchNorm3d}
    with pytest.raises(ValueError, match=TORCH_ONE_VALUE):
        cls[len(shape)](3, device=device).train()(x)
    # eval mode with one value is fine
    m = cls[len(shape)](3, device=device).eval()
    assert_close(m(x), x / (1 + 1e-5) ** 0.5, 1e-6, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["mean_only", "var_only"])
@pytest.mark.parametrize("training", [True, False])
def test_running_mean_without_running_var(device, which, training):
    """Only one of running_mean / running_var: ValueError with torch's message."""
    x = torch.randn(4, 3, device=device)
    rm = torch.zeros(3, device=device) if which == "mean_only" else None
    rv = torch.ones(3, device=device) if which == "var_only" else None
    msg = "running_mean and running_var must either both be None or neither be None"
    if training:
        with pytest.raises(ValueError, match=msg):
            F.batch_norm(x, rm, rv, training=True)
    with pytest.raises(ValueError, match=msg):
        bn_f(x, rm, rv, training=training)


@pytest.mark.parametrize("device", DEVICES)
def test_eval_without_running_stats(device):
    """training=False needs running statistics (torch raises too)."""
    x = torch.randn(4, 3, device=device)
    with pytest.raises((ValueError, RuntimeError), match="running_mean|running_var|running"):
        bn_f(x, None, None, training=False)


# ------------------------------------------------------------------------------ devices
OTHER_DEVICE = "cuda" if HAS_CUDA else "meta"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", ["weight", "bias", "running_mean", "running_var"])
def test_tensors_on_different_devices(device, bad):
    """A per-channel tensor on another device than the input is an error mentioning devices."""
    other = OTHER_DEVICE if device == "cpu" else "cpu"
    C = 3
    kw = dict(weight=torch.ones(C, device=device), bias=torch.zeros(C, device=device),
              running_mean=torch.zeros(C, device=device), running_var=torch.ones(C, device=device))
    kw[bad] = kw[bad].to(other)
    x = torch.randn(4, C, 5, device=device)
    for training in (True, False):
        with pytest.raises((RuntimeError, ValueError), match=r"(?i)device"):
            bn_f(x, kw["running_mean"], kw["running_var"], kw["weight"], kw["bias"],
                 training=training)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_on_different_devices(device):
    """The ops check devices as well (CPU input, other-device mean)."""
    other = OTHER_DEVICE if device == "cpu" else "cpu"
    x = torch.randn(4, 3, 5, device=device)
    one = torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match=r"(?i)device"):
        torch.ops.bnx.batch_norm_elemt(x, one, one, one.to(other), one)
    with pytest.raises(RuntimeError, match=r"(?i)device"):
        torch.ops.bnx.batch_norm_backward(x, x, one, one, one.to(other), "frozen",
                                          [True, True, True])


# ------------------------------------------------------------------------------ backward= / eps
@pytest.mark.parametrize("device", DEVICES)
def test_unknown_backward(device):
    """backward="foo": ValueError listing the valid choices (functional, module, op)."""
    x = torch.randn(4, 3, device=device)
    with pytest.raises(ValueError, match="foo") as e:
        bn_f(x, None, None, training=True, backward="foo")
    assert "batch" in str(e.value) and "frozen" in str(e.value)
    with pytest.raises(ValueError, match="foo") as e:
        m = bnx.BatchNorm1d(3, device=device, backward="foo")
        m(x)
    assert "batch" in str(e.value) and "frozen" in str(e.value)
    m = bnx.BatchNorm1d(3, device=device)
    with pytest.raises(ValueError, match="foo") as e:
        m.backward = "foo"
        m(x)
    assert "batch" in str(e.value) and "frozen" in str(e.value)
    with pytest.raises(RuntimeError, match="foo"):
        one = torch.ones(3, device=device)
        torch.ops.bnx.batch_norm_backward(x, x, one, one, one, "foo", [True, True, True])


@pytest.mark.parametrize("device", DEVICES)
def test_batch_backward_with_running_stats_rejected(device):
    """backward="batch" with running statistics (eval forward) is a ValueError explaining it."""
    x = torch.randn(4, 3, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(ValueError, match=r"(?i)running|statistic"):
        bn_f(x, rm, rv, training=False, backward="batch")
    # but frozen/None with running stats, and batch in training with running stats, are fine
    bn_f(x, rm, rv, training=False, backward="frozen")
    bn_f(x, rm, rv, training=False)
    bn_f(x, rm, rv, training=True, backward="batch")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_nonpositive_eps_in_training(device, eps):
    """eps <= 0 in training is rejected (functional and module)."""
    x = torch.randn(4, 3, device=device)
    with pytest.raises((ValueError, RuntimeError), match="eps"):
        bn_f(x, None, None, training=True, eps=eps)
    with pytest.raises((ValueError, RuntimeError), match="eps"):
        bnx.BatchNorm1d(3, eps=eps, device=device).train()(x)


# ------------------------------------------------------------------------------ empty batch
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (0, 3, 2, 2), (0, 3, 2, 2, 2),
                                   (2, 3, 0, 4)], ids=["NC", "NCL", "NCHW", "NCDHW", "H0"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_like_torch(device, shape, momentum, training):
    """N=0 (or an empty spatial dim): empty output and grad_input, zero grad_weight/grad_bias,
    running stats unchanged and num_batches_tracked incremented exactly like torch."""
    cls = {2: (bnx.BatchNorm1d, torch.nn.BatchNorm1d), 3: (bnx.BatchNorm1d, torch.nn.BatchNorm1d),
           4: (bnx.BatchNorm2d, torch.nn.BatchNorm2d), 5: (bnx.BatchNorm3d, torch.nn.BatchNorm3d)}
    bcls, tcls = cls[len(shape)]
    ref = tcls(3, momentum=momentum).to(device)
    with torch.no_grad():
        ref.running_mean.normal_()
        ref.running_var.uniform_(0.5, 2)
        ref.weight.uniform_(0.5, 1.5)
    m = bcls(3, momentum=momentum).to(device)
    m.load_state_dict(ref.state_dict())
    rm0, rv0 = ref.running_mean.clone(), ref.running_var.clone()
    outs = []
    for mod in (m, ref):
        mod.train(training)
        x = torch.randn(shape, device=device, requires_grad=True)
        y = mod(x)
        y.sum().backward()
        outs.append((y, x.grad, mod.weight.grad, mod.bias.grad))
    (y, gx, gw, gb), (ty, tgx, tgw, tgb) = outs
    assert y.shape == shape and y.numel() == 0 and y.dtype == ty.dtype
    assert gx.shape == shape
    assert gw is not None and torch.equal(gw, torch.zeros_like(gw))
    assert gb is not None and torch.equal(gb, torch.zeros_like(gb))
    assert torch.equal(gw, tgw) and torch.equal(gb, tgb)
    assert torch.equal(m.running_mean, rm0) and torch.equal(m.running_var, rv0)
    assert torch.equal(m.running_mean, ref.running_mean)
    assert torch.equal(m.running_var, ref.running_var)
    assert torch.equal(m.num_batches_tracked, ref.num_batches_tracked)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 2, 2), (2, 3, 0, 4)], ids=["NC", "NCHW", "H0"])
def test_empty_batch_eval_without_running_stats_like_torch(device, dtype, shape):
    """training=False with no running statistics: torch returns the empty output for an empty input (its
    empty-input return comes before its check) and raises only for a non-empty one; bnx does the same."""
    outs = []
    for fn in (bn_f, F.batch_norm):
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        w = torch.rand(3, device=device, dtype=dtype, requires_grad=True)
        b = torch.rand(3, device=device, dtype=dtype, requires_grad=True)
        y = fn(x, None, None, w, b, training=False)
        outs.append((y, *torch.autograd.grad(y.sum(), (x, w, b))))
    for got, want in zip(*outs):
        assert got.shape == want.shape and got.dtype == want.dtype and got.stride() == want.stride()
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="training=False normalizes with running_mean and running_var"):
        bn_f(torch.randn(2, 3, device=device, dtype=dtype), None, None, training=False)

@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_ops(device):
    """Op level, M == 0: mean 0, invstd 1/sqrt(eps), running stats untouched, zero reductions."""
    x = torch.randn(0, 3, 4, device=device)
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    mean, invstd = torch.ops.bnx.batch_norm_stats(x, rm, rv, None, 0.1, 1e-4)
    assert torch.equal(mean, torch.zeros(3, device=device))
    assert_close(invstd, torch.full((3,), 1e-4 ** -0.5), 1e-6, 1e-6)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    gi, gw, gb = torch.ops.bnx.batch_norm_backward(x, x, mean, invstd, torch.ones(3, device=device),
                                                   "batch", [True, True, True])
    assert gi.shape == x.shape
    assert torch.equal(gw, torch.zeros(3, device=device))
    assert torch.equal(gb, torch.zeros(3, device=device))
    sum_dy, sum_dy_xmu = torch.ops.bnx.batch_norm_backward_reduce(x, x, mean, invstd)
    assert torch.equal(sum_dy, torch.zeros(3, device=device))
    assert torch.equal(sum_dy_xmu, torch.zeros(3, device=device))


# ------------------------------------------------------------------------------ argument types and values
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", ["weight", "running_mean"])
def test_two_dimensional_channel_tensor_message_gives_its_shape(device, bad):
    """A (C, 1) per-channel tensor has C elements but the wrong shape: the message says so."""
    kw = dict(weight=None, running_mean=torch.zeros(3, device=device), running_var=torch.ones(3, device=device))
    kw[bad] = torch.ones(3, 1, device=device)
    if bad == "running_mean":
        kw["running_var"] = torch.ones(3, 1, device=device)
    with pytest.raises(RuntimeError, match=rf"{bad} should be a 1-D tensor of 3 elements .*got shape \(3, 1\)"):
        bn_f(torch.randn(4, 3, 5, device=device), kw["running_mean"], kw["running_var"], kw["weight"],
             training=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
                                   torch.float8_e5m2fnuz], ids=lambda d: str(d)[6:])
def test_float8_is_refused_with_bnx_message(device, dtype):
    """Every float8 dtype (floating point to torch, but not dispatched by the kernels) is refused with the
    list of supported dtypes, by the functional and by the ops."""
    x = torch.ones(4, 3, device=device).to(dtype)
    with pytest.raises(TypeError, match="float64, float32, float16 or bfloat16"):
        bn_f(x, None, None, training=True)
    with pytest.raises(RuntimeError, match="float64, float32, float16 or bfloat16"):
        torch.ops.bnx.batch_norm_stats(x, None, None, None, 0.1, 1e-5)
    w = torch.ones(3, device=device).to(dtype)
    with pytest.raises(TypeError, match="weight must be float64, float32, float16 or bfloat16"):
        bn_f(torch.randn(4, 3, device=device), None, None, w, training=True)
    with pytest.raises(RuntimeError, match="weight of dtype float64, float32, float16 or bfloat16"):
        torch.ops.bnx.batch_norm_train_forward(torch.randn(4, 3, device=device), w, None, None, None, None,
                                               0.1, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_nan_eps_is_a_value_error(device, training):
    """eps = NaN is refused like any other bad eps (a ValueError from the functional)."""
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(ValueError, match="eps must be"):
        bn_f(torch.randn(4, 3, device=device), rm, rv, training=training, eps=float("nan"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arg,value", [("momentum", "0.1"), ("eps", "1e-5"), ("momentum", [0.1])])
def test_momentum_and_eps_must_be_numbers(device, arg, value):
    """As torch: momentum and eps are numbers (a string is not converted)."""
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(TypeError, match=f"{arg} must be a float"):
        bn_f(torch.randn(4, 3, device=device), rm, rv, training=True, **{arg: value})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["numpy", "tensor", "int"])
def test_momentum_and_eps_as_torch_takes_them(device, kind):
    """What torch's argument parser takes for a float (a numpy scalar, a one-element tensor, an int) gives
    torch's result."""
    np = pytest.importorskip("numpy")
    make = {"numpy": np.float32, "tensor": torch.tensor, "int": int}[kind]
    momentum, eps = make(1) if kind == "int" else make(0.25), make(1) if kind == "int" else make(1e-3)
    x = torch.randn(4, 3, 5, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    trm, trv = rm.clone(), rv.clone()
    y = bn_f(x, rm, rv, training=True, momentum=momentum, eps=eps)
    want = F.batch_norm(x, trm, trv, training=True, momentum=momentum, eps=eps)
    assert_close(y, want, 1e-5, 1e-5)
    assert_close(rm, trm, 1e-6, 1e-6)
    assert_close(rv, trv, 1e-6, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_running_stats_that_require_grad_are_refused_like_torch(device, training):
    """Running statistics with requires_grad=True are refused while grad mode is on (torch: "not
    differentiable with respect to argument 'running_mean'"), and updated under torch.no_grad() like
    torch's."""
    x = torch.randn(4, 3, 5, device=device)
    rm = torch.zeros(3, device=device, requires_grad=True)
    rv = torch.ones(3, device=device, requires_grad=True)
    with pytest.raises(RuntimeError):
        F.batch_norm(x, rm, rv, training=training)
    with pytest.raises(RuntimeError, match="cannot have requires_grad=True"):
        bn_f(x, rm, rv, training=training)
    assert torch.equal(rm.detach(), torch.zeros(3, device=device))
    with torch.no_grad():
        trm, trv = rm.detach().clone().requires_grad_(), rv.detach().clone().requires_grad_()
        y = bn_f(x, rm, rv, training=training)
        ty = F.batch_norm(x, trm, trv, training=training)
    assert_close(y, ty, 1e-5, 1e-5)
    assert_close(rm.detach(), trm.detach(), 1e-6, 1e-6)
    assert_close(rv.detach(), trv.detach(), 1e-6, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool, torch.complex64])
def test_num_batches_tracked_must_be_an_integer_count(device, dtype):
    """num_batches_tracked is a count: a floating, complex or bool tensor is refused by the functional, the
    ops and their fake kernels (a float 2.5 gave a factor of 1/2.5 on the CPU and 1/2 on CUDA, which reads
    it as int64); int32 and int64 are taken alike. Nothing is updated."""
    x = torch.randn(4, 3, 5, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    bad = torch.tensor(3, device=device).to(dtype)
    with pytest.raises(TypeError, match="num_batches_tracked must be a one-element integer tensor"):
        bn_f(x, rm, rv, training=True, momentum=None, num_batches_tracked=bad)
    for op, args in [("batch_norm_stats", (x, rm, rv, bad, 0.1, 1e-5)),
                     ("batch_norm_train_forward", (x, None, None, rm, rv, bad, 0.1, 1e-5))]:
        with pytest.raises(RuntimeError, match="num_batches_tracked must be an integer tensor"):
            getattr(torch.ops.bnx, op)(*args)
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            with pytest.raises(RuntimeError, match="num_batches_tracked must be an integer tensor"):
                getattr(torch.ops.bnx, op)(*fake)
    assert torch.equal(rm, torch.zeros(3, device=device)) and torch.equal(rv, torch.ones(3, device=device))
    with pytest.raises(TypeError, match="one-element integer tensor"):
        bn_f(x, rm, rv, training=True, momentum=None, num_batches_tracked=torch.tensor([1, 2], device=device))
    results = []
    for count in (torch.tensor(3, dtype=torch.int32), torch.tensor(3)):
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        bn_f(x, rm, rv, training=True, momentum=None, num_batches_tracked=count.to(device))
        results.append((rm, rv))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("nbt", [0, -2])
def test_cpu_num_batches_tracked_below_one_is_refused(nbt):
    """num_batches_tracked counts the current batch too: a count below 1 (factor 1/0, or negative) is an
    error on the CPU, not NaN or extrapolated running statistics."""
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="num_batches_tracked .* must be at least 1"):
        bn_f(torch.randn(4, 3, 5), rm, rv, training=True, momentum=None, num_batches_tracked=torch.tensor(nbt))
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_elemt_count_must_be_positive_for_an_input(device):
    """batch_norm_backward_elemt's count (values per channel behind the sums) is positive unless the input
    is empty; 0 for a non-empty input is an error (it returned uninitialized memory)."""
    x, dy = torch.randn(4, 3, 5, device=device), torch.randn(4, 3, 5, device=device)
    zeros, ones = torch.zeros(3, device=device), torch.ones(3, device=device)
    for count in (0, -1):
        with pytest.raises(RuntimeError, match="count .* must be positive"):
            torch.ops.bnx.batch_norm_backward_elemt(dy, x, zeros, ones, None, ones, ones, count)
    empty = torch.randn(0, 3, 5, device=device)
    assert torch.ops.bnx.batch_norm_backward_elemt(empty, empty, zeros, ones, None, ones, ones, 0).shape == empty.shape
