"""bnx.BatchNorm{1,2,3}d as drop-in torch modules: state_dict, kwargs, the `backward` switch."""
import copy
import inspect
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

import bnx
from conftest import DEVICES, assert_close, make_input

PAIRS = [
    (torch.nn.BatchNorm1d, bnx.BatchNorm1d, (6, 3, 4)),
    (torch.nn.BatchNorm2d, bnx.BatchNorm2d, (4, 3, 5, 5)),
    (torch.nn.BatchNorm3d, bnx.BatchNorm3d, (3, 3, 2, 4, 4)),
]
PAIR_IDS = ["1d", "2d", "3d"]
TORCH_HAS_BIAS_KWARG = "bias" in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters


def _trained_torch(tcls, shape, device, **kw):
    ref = tcls(shape[1], **kw).to(device)
    with torch.no_grad():
        if ref.affine:
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    ref.train()
    for _ in range(3):
        ref(make_input(shape, device=device, scale=2.0, shift=1.0))
    return ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_isinstance_and_same_structure(device, pair):
    """bnx modules subclass the torch ones and have the same parameters/buffers."""
    tcls, bcls, _ = pair
    m, ref = bcls(3, device=device), tcls(3, device=device)
    assert isinstance(m, tcls)
    assert isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in m.named_buffers()] == [n for n, _ in ref.named_buffers()]
    for (n, a), (_, b) in zip(m.state_dict().items(), ref.state_dict().items()):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, n
        assert torch.equal(a, b), n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("kw", [dict(), dict(affine=False), dict(track_running_stats=False),
                                dict(momentum=None)], ids=["default", "noaffine", "notrack",
                                                           "momentum_none"])
def test_state_dict_round_trip(device, pair, kw):
    """torch -> bnx -> torch with load_state_dict(strict=True): same keys, equal values,
    and the loaded bnx module computes what the torch module computes."""
    tcls, bcls, shape = pair
    ref = _trained_torch(tcls, shape, device, **kw)
    sd = ref.state_dict()
    m = bcls(shape[1], device=device, **kw)
    res = m.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    sd2 = m.state_dict()
    assert list(sd2.keys()) == list(sd.keys())
    for k in sd:
        assert sd2[k].dtype == sd[k].dtype and torch.equal(sd2[k], sd[k]), k
    assert sd2._metadata[""]["version"] == sd._metadata[""]["version"]

    back = tcls(shape[1], device=device, **kw)
    back.load_state_dict(sd2, strict=True)
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k]), k

    x = make_input(shape, device=device)
    for mode in (True, False):
        m.train(mode), ref.train(mode)
        assert_close(m(x), ref(x), 1e-5, 1e-5, f"training={mode}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metadata", ["version1", "no_metadata"])
def test_load_old_checkpoint_without_num_batches_tracked(device, metadata):
    """A pre-num_batches_tracked checkpoint (version < 2 or no metadata) loads into bnx exactly
    as into torch (num_batches_tracked filled in, strict load succeeds)."""
    ref = _trained_torch(torch.nn.BatchNorm2d, (4, 3, 5, 5), device)
    old = OrderedDict((k, v.clone()) for k, v in ref.state_dict().items()
                      if k != "num_batches_tracked")
    if metadata == "version1":
        old._metadata = OrderedDict({"": {"version": 1}})

    results = []
    for cls in (torch.nn.BatchNorm2d, bnx.BatchNorm2d):
        mod = cls(3, device=device)
        with torch.no_grad():
            mod.num_batches_tracked.fill_(17)
        sd = copy.copy(old)
        if hasattr(old, "_metadata"):
            sd._metadata = copy.deepcopy(old._metadata)
        mod.load_state_dict(sd, strict=True)
        results.append(mod.state_dict())
    t_sd, b_sd = results
    assert list(t_sd.keys()) == list(b_sd.keys())
    for k in t_sd:
        assert torch.equal(t_sd[k], b_sd[k]), k


@pytest.mark.parametrize("device", DEVICES)
def test_nested_state_dict_swap(device):
    """A Sequential holding torch BN saves a state_dict that a Sequential holding bnx BN loads
    strictly, and vice versa."""
    seq_t = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).to(device)
    seq_t(make_input((4, 3, 3, 3), device=device))
    seq_b = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bnx.BatchNorm2d(4)).to(device)
    seq_b.load_state_dict(seq_t.state_dict(), strict=True)
    seq_t2 = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).to(device)
    seq_t2.load_state_dict(seq_b.state_dict(), strict=True)
    for k, v in seq_t.state_dict().items():
        assert torch.equal(seq_t2.state_dict()[k], v), k


@pytest.mark.skipif(not TORCH_HAS_BIAS_KWARG, reason="torch.nn.BatchNorm has no bias= kwarg")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_bias_false_kwarg(device, pair):
    """bias=False (torch kwarg) gives weight but no bias, and matches torch's module."""
    tcls, bcls, shape = pair
    ref = tcls(3, bias=False, device=device)
    m = bcls(3, bias=False, device=device)
    assert m.bias is None and m.weight is not None
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    m.load_state_dict(ref.state_dict(), strict=True)
    assert list(m.state_dict()) == list(ref.state_dict())
    x = make_input(shape, device=device)
    gy = make_input(shape, device=device)
    for mode in (True, False):
        m.train(mode), ref.train(mode)
        outs = []
        for mod in (m, ref):
            xx = x.clone().requires_grad_()
            mod.zero_grad()
            y = mod(xx)
            y.backward(gy)
            outs.append((y, xx.grad, mod.weight.grad))
        for a, b in zip(*outs):
            assert_close(a, b, 1e-4, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_device_dtype_kwargs(device, dtype):
    """device=/dtype= factory kwargs place parameters and running stats like torch does."""
    m = bnx.BatchNorm2d(5, device=device, dtype=dtype)
    ref = torch.nn.BatchNorm2d(5, device=device, dtype=dtype)
    for (n, a), (_, b) in zip(m.state_dict().items(), ref.state_dict().items()):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), n
    assert m.weight.device.type == device and m.weight.dtype == dtype
    assert m.num_batches_tracked.dtype == torch.long
    x = make_input((4, 5, 3, 3), dtype, device)
    y = m(x)
    assert y.dtype == dtype and y.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_backward_switchable_at_runtime(device):
    """Changing module.backward between steps changes grad_input to the chosen formula."""
    torch.manual_seed(30)
    m = bnx.BatchNorm2d(3, device=device).train()
    assert m.backward is None
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    x = make_input((4, 3, 4, 4), device=device)
    gy = make_input((4, 3, 4, 4), device=device)

    def grad_input():
        xx = x.clone().requires_grad_()
        m(xx).backward(gy)
        return xx.grad

    g_default = grad_input()
    m.backward = "frozen"
    g_frozen = grad_input()
    m.backward = "batch"
    g_batch = grad_input()
    m.backward = None
    g_none = grad_input()

    xx = x.clone().requires_grad_()
    F.batch_norm(xx, None, None, m.weight.detach(), m.bias.detach(), training=True).backward(gy)
    invstd = (x.var((0, 2, 3), unbiased=False) + m.eps).rsqrt()
    expected_frozen = gy * (m.weight.detach() * invstd).view(1, 3, 1, 1)
    assert_close(g_batch, xx.grad, 1e-5, 1e-5)
    assert_close(g_default, xx.grad, 1e-5, 1e-5)
    assert_close(g_none, xx.grad, 1e-5, 1e-5)
    assert_close(g_frozen, expected_frozen, 1e-5, 1e-5)
    assert (g_frozen - g_batch).abs().max() > 1e-2


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("backward", [None, "batch", "frozen"])
def test_backward_kwarg_repr_copy_pickle(pair, backward):
    """backward= is stored, shown in repr/extra_repr next to torch's fields, and survives
    deepcopy / pickle."""
    tcls, bcls, _ = pair
    m = bcls(7, eps=1e-3, momentum=0.2, backward=backward)
    assert m.backward == backward
    r = repr(m)
    assert "backward" in r and "backward" in m.extra_repr()
    assert str(backward) in m.extra_repr()
    assert tcls(7, eps=1e-3, momentum=0.2).extra_repr() in m.extra_repr()
    assert copy.deepcopy(m).backward == backward
    m2 = pickle.loads(pickle.dumps(m))
    assert type(m2) is bcls and m2.backward == backward


@pytest.mark.parametrize("device", DEVICES)
def test_module_to_dtype_and_half(device):
    """.double()/.to(bfloat16) convert like torch modules and still compute correctly."""
    torch.manual_seed(31)
    ref = torch.nn.BatchNorm2d(3).to(device)
    m = bnx.BatchNorm2d(3).to(device)
    m.load_state_dict(ref.state_dict())
    m.double(), ref.double()
    x = make_input((4, 3, 4, 4), torch.float64, device)
    assert_close(m(x), ref(x), 1e-10, 1e-10)
    assert m.running_mean.dtype == torch.float64


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mf", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "cl"])
def test_meta_device_module(training, mf):
    """A module on the meta device runs forward/backward (fake kernels) with torch's shapes
    and strides."""
    res = []
    for cls in (torch.nn.BatchNorm2d, bnx.BatchNorm2d):
        m = cls(3, device="meta").train(training)
        x = torch.empty(2, 3, 4, 5, device="meta").contiguous(memory_format=mf).requires_grad_()
        y = m(x)
        y.backward(torch.empty_like(y))
        res.append((y, x.grad, m.weight.grad, m.bias.grad))
    for a, e in zip(*res):
        assert a.device.type == "meta"
        assert a.shape == e.shape and a.dtype == e.dtype
        if a.dim() == 4:
            assert a.is_contiguous(memory_format=mf)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_backward_module_in_eval_mode(device):
    """A module with backward="batch" still evaluates in eval mode (equal to torch's eval forward), and
    only a gradient through that eval forward raises, explaining why."""
    ref = torch.nn.BatchNorm2d(3).to(device)
    ref.running_mean.uniform_(-1, 1)
    ref.running_var.uniform_(0.5, 2)
    m = bnx.BatchNorm2d(3, backward="batch").to(device)
    m.load_state_dict(ref.state_dict())
    ref.eval()
    m.eval()
    x = torch.randn(4, 3, 5, 5, device=device, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x))
    y = m(x)
    torch.testing.assert_close(y, ref(x))
    with pytest.raises(RuntimeError, match="backward='batch'.*running statistics"):
        y.sum().backward()
