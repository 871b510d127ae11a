"""The two autograd paths of bnx.functional: the layer op bnx::batch_norm with its C++ autograd kernel (eager
calls) and the Python autograd.Functions (torch.compile, torch.func transforms, forward-mode AD).

Both run the same forward and backward ops, so they must agree exactly; the formulas themselves are checked
against finite differences and torch for both paths in test_gradcheck.py / test_parity.py (the
`autograd_path` fixture)."""
import pytest
import torch
from torch.autograd import forward_ad

import bnx
from conftest import DEVICES, make_input

CPP_NODE = "CppNode<bnx::BatchNormFunction>"


def _graph_node(y):
    return y.grad_fn.name()


def _setup(device, dtype=torch.float32, pdtype=None, shape=(4, 3, 5, 2), mf=None, affine=True):
    pdtype = pdtype or dtype
    C = shape[1]
    x = make_input(shape, dtype, device, mf, scale=2.0, shift=1.0)
    w = (torch.rand(C) + 0.5).to(device, pdtype) if affine else None
    b = torch.randn(C).to(device, pdtype) if affine else None
    rm = (torch.randn(C) * 0.1).to(device, pdtype)
    rv = (torch.rand(C) + 0.5).to(device, pdtype)
    gy = make_input(shape, dtype, device, mf)
    return x, w, b, rm, rv, gy


def _run(path, monkeypatch, x, w, b, rm, rv, gy, training, formula, create_graph=False):
    """Output, running stats after the call and gradients of the leaves that require grad, via one path."""
    with monkeypatch.context() as m:
        if path == "python":
            m.setattr(bnx.functional, "_python_function_needed", lambda: True)
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in (x, w, b)]
        rm_c, rv_c = rm.clone(), rv.clone()
        y = bnx.functional.batch_norm(leaves[0], rm_c, rv_c, leaves[1], leaves[2], training=training,
                                      backward=formula)
        node = _graph_node(y) if y.grad_fn is not None else None
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, wanted, gy, create_graph=create_graph) if wanted else ()
        if create_graph:  # a second-order quantity: the gradient of sum(grad_x * gy) wrt the leaves
            s = sum((g * gy.to(g.dtype)).sum() for g in grads if g.shape == gy.shape)
            # (frozen without weight: grad_x = invstd * gy depends on no leaf)
            grads = torch.autograd.grad(s, wanted, allow_unused=True) if s.requires_grad else (None,) * len(wanted)
    return y, rm_c, rv_c, grads, node


MODES = [(True, "batch"), (True, "frozen"), (False, "frozen")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES, ids=["train_batch", "train_frozen", "eval"])
@pytest.mark.parametrize("dtypes", [(torch.float64, None), (torch.float32, None), (torch.bfloat16, torch.float32)],
                         ids=["f64", "f32", "bf16_f32params"])
@pytest.mark.parametrize("mf", [None, torch.channels_last], ids=["contiguous", "cl"])
@pytest.mark.parametrize("grads", ["all", "input", "params", "weight"])
def test_paths_agree_exactly(device, mode, dtypes, mf, grads, monkeypatch):
    """Same output, running statistics and gradients (bit for bit) from the C++ op as from the Python
    Functions, whatever subset of input / weight / bias requires grad."""
    training, formula = mode
    x, w, b, rm, rv, gy = _setup(device, dtypes[0], dtypes[1], mf=mf)
    x.requires_grad_(grads in ("all", "input"))
    w.requires_grad_(grads in ("all", "params", "weight"))
    b.requires_grad_(grads in ("all", "params"))
    got = _run("cpp", monkeypatch, x, w, b, rm, rv, gy, training, formula)
    ref = _run("python", monkeypatch, x, w, b, rm, rv, gy, training, formula)
    assert got[4] is not None and CPP_NODE in got[4]
    assert ref[4] is not None and "BatchNorm" in ref[4] and CPP_NODE not in ref[4]
    for a, e in zip(got[:3], ref[:3]):
        assert torch.equal(a, e)
    assert len(got[3]) == len(ref[3]) > 0
    for a, e in zip(got[3], ref[3]):
        assert a.dtype == e.dtype and a.stride() == e.stride()
        assert torch.equal(a, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES, ids=["train_batch", "train_frozen", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_paths_agree_on_double_backward(device, mode, affine, monkeypatch):
    """create_graph=True: both paths build the same differentiable backward."""
    training, formula = mode
    x, w, b, rm, rv, gy = _setup(device, torch.float64, affine=affine)
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_()
    got = _run("cpp", monkeypatch, x, w, b, rm, rv, gy, training, formula, create_graph=True)
    ref = _run("python", monkeypatch, x, w, b, rm, rv, gy, training, formula, create_graph=True)
    for a, e in zip(got[3], ref[3]):
        assert (a is None) == (e is None)
        if a is not None:
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_eager_calls_take_the_cpp_op_and_transforms_take_the_functions():
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    assert CPP_NODE in _graph_node(bnx.functional.batch_norm(x, None, None, training=True))
    assert CPP_NODE in _graph_node(bnx.functional.batch_norm(x, rm, rv, training=False))
    assert CPP_NODE in _graph_node(bnx.BatchNorm2d(3)(x))
    assert not bnx.functional._python_function_needed()
    with forward_ad.dual_level():
        assert bnx.functional._python_function_needed()
    seen = []
    torch.func.grad(lambda t: (seen.append(bnx.functional._python_function_needed()), t.sum())[1])(torch.ones(2))
    assert seen == [True]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_func_grad_goes_through_the_python_function(device, training):
    """torch.func.grad (a functorch transform, which refuses C++ autograd Functions) gives the gradient
    torch.autograd.grad gives in eager mode."""
    x, w, b, rm, rv, gy = _setup(device, torch.float64)

    def loss(x):
        return (bnx.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training) * gy).sum()

    xr = x.clone().requires_grad_()
    expected = torch.autograd.grad(loss(xr), xr)[0]
    torch.testing.assert_close(torch.func.grad(loss)(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_saved_tensors_modified_in_place_are_an_error(device, training):
    """The C++ op saves its input (and in eval the running statistics) as autograd does for any op: an
    in-place change before the backward raises instead of giving a wrong gradient."""
    x, w, b, rm, rv, gy = _setup(device)
    x.requires_grad_()
    xin = x * 1
    y = bnx.functional.batch_norm(xin, rm, rv, w, b, training=training)
    with torch.no_grad():
        xin.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(gy)
    if not training:
        y = bnx.functional.batch_norm(x, rm, rv, w, b, training=False)
        rm.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward(gy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inference_mode_runs_the_forward_alone(device, training):
    """Under torch.inference_mode the autograd kernel is skipped; the op's forward-only kernel gives the
    same output and the same running-statistics update."""
    x, w, b, rm, rv, gy = _setup(device)
    rm2, rv2 = rm.clone(), rv.clone()
    expected = bnx.functional.batch_norm(x, rm, rv, w, b, training=training)
    with torch.inference_mode():
        got = torch.ops.bnx.batch_norm(x, w, b, rm2, rv2, None, training, 0.1, 1e-5,
                                       "batch" if training else "frozen")
    assert torch.equal(got, expected)
    assert torch.equal(rm2, rm) and torch.equal(rv2, rv)


def test_op_checks_its_arguments():
    x = torch.randn(4, 3, 2, 2)
    rm, rv = torch.zeros(3), torch.ones(3)
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode):
            with pytest.raises(RuntimeError, match="training=False normalizes with running_mean and running_var"):
                torch.ops.bnx.batch_norm(x, None, None, None, None, None, False, 0.1, 1e-5, "frozen")
            with pytest.raises(RuntimeError, match='formula must be "frozen", got "batch"'):
                torch.ops.bnx.batch_norm(x, None, None, rm, rv, None, False, 0.1, 1e-5, "batch")
            with pytest.raises(RuntimeError, match="formula"):
                torch.ops.bnx.batch_norm(x, None, None, None, None, None, True, 0.1, 1e-5, "exact")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("how", ["no_grad", "nothing_requires_grad"])
def test_no_graph_calls_run_the_forward_alone(device, training, how):
    """Without a graph to build the autograd kernel runs the forward alone: same output and running
    statistics as with a graph, no grad_fn."""
    x, w, b, rm, rv, gy = _setup(device)
    rm2, rv2 = rm.clone(), rv.clone()
    formula = "batch" if training else "frozen"
    expected = torch.ops.bnx.batch_norm(x.clone().requires_grad_(), w, b, rm, rv, None, training, 0.1, 1e-5, formula)
    assert expected.grad_fn is not None
    if how == "no_grad":
        with torch.no_grad():
            got = torch.ops.bnx.batch_norm(x.clone().requires_grad_(), w, b, rm2, rv2, None, training, 0.1, 1e-5,
                                           formula)
    else:
        got = torch.ops.bnx.batch_norm(x, w, b, rm2, rv2, None, training, 0.1, 1e-5, formula)
    assert got.grad_fn is None and not got.requires_grad
    assert torch.equal(got, expected.detach())
    assert torch.equal(rm2, rm) and torch.equal(rv2, rv)


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_op_refuses_forward_mode_tangents(grad_mode):
    """Forward-mode AD goes through the Python Functions (bnx.functional routes it there); the C++ op called
    with a dual tensor raises, also under no_grad (which does not turn forward AD off), instead of returning
    an output without the tangent."""
    x, w, b, rm, rv, gy = _setup("cpu")
    with forward_ad.dual_level(), torch.set_grad_enabled(grad_mode):
        dual = forward_ad.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="jvp is not implemented"):
            torch.ops.bnx.batch_norm(dual, w, b, rm, rv, None, False, 0.1, 1e-5, "frozen")
