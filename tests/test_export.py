"""torch.export of bnx layers keeps their gradients, and the building-block ops refuse a backward.

torch.export records what an autograd.Function's forward runs and drops its backward, so bnx.functional
hands export the layer op, one node with its C++ autograd kernel and the backward formula as an argument. The
exported program must then give what the eager layer gives: output, running statistics and all three
gradients, for every formula (the frozen one included, which export would otherwise lose). The raw ops have no
derivative; a gradient through one raises, naming the op, rather than coming back unset.
"""
import copy

import pytest
import torch
import torch.nn as nn

import bnx
from conftest import DEVICES, assert_close

# (training, backward): the default formula in both modes, and frozen gradients of a training forward.
MODES = [(True, None), (True, "frozen"), (False, None)]


def _module(device, training, backward, momentum):
    m = bnx.BatchNorm2d(5, momentum=momentum, backward=backward, device=device).train(training)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2.0)
        m.num_batches_tracked.fill_(3)
    return m


def _step(module, x, gy):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(gy)
    return y.detach(), x.grad, module.weight.grad, module.bias.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("training,backward", MODES, ids=["train", "train_frozen", "eval"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentum_none"])
def test_exported_module_matches_eager(device, strict, training, backward, momentum):
    eager = _module(device, training, backward, momentum)
    exported = torch.export.export(copy.deepcopy(eager), (torch.randn(4, 5, 3, 3, device=device),),
                                   strict=strict).module()
    x = torch.randn(4, 5, 3, 3, device=device) * 2 + 1
    gy = torch.randn_like(x)
    got, expected = _step(exported, x, gy), _step(eager, x, gy)
    for name, a, b in zip(["output", "grad input", "grad weight", "grad bias"], got, expected):
        assert a is not None, f"{name}: no gradient through the exported program"
        assert_close(a, b, 1e-6, 1e-5, name)
    # The exported module carries the buffers it uses (eval drops the unused counter).
    buffers = dict(exported.named_buffers())
    for name, b in eager.named_buffers():
        if name in buffers:
            assert_close(buffers[name], b, 0, 0, name)
        else:
            assert not training and name == "num_batches_tracked", f"{name} missing from the exported module"


@pytest.mark.parametrize("device", DEVICES)
def test_exported_default_formulas_match_torch(device):
    """The exported bnx program against torch's exported BatchNorm2d, training and eval, default formulas."""
    for training in (True, False):
        ours = _module(device, training, None, 0.1)
        theirs = nn.BatchNorm2d(5, device=device).train(training)
        theirs.load_state_dict(ours.state_dict())
        example = (torch.randn(4, 5, 3, 3, device=device),)
        ours = torch.export.export(ours, example).module()
        theirs = torch.export.export(theirs, example).module()
        x = torch.randn(4, 5, 3, 3, device=device)
        gy = torch.randn_like(x)
        for name, a, b in zip(["output", "grad input", "grad weight", "grad bias"], _step(ours, x, gy),
                              _step(theirs, x, gy)):
            assert_close(a, b, 1e-5, 1e-4, f"training={training} {name}")


def test_export_records_the_layer_op():
    """One bnx.batch_norm node, with the backward formula as its last argument."""
    m = bnx.BatchNorm2d(5, backward="frozen")
    program = torch.export.export(m, (torch.randn(4, 5, 3, 3),))
    calls = [n for n in program.graph.nodes if n.op == "call_function" and "bnx" in str(n.target)]
    assert [str(n.target) for n in calls] == ["bnx.batch_norm.default"]
    assert calls[0].args[-1] == "frozen"


def _raw_op_calls(device):
    """(name, call) for every building-block op, on inputs that require grad."""
    ops = torch.ops.bnx
    x = torch.randn(4, 3, 2, 2, device=device, requires_grad=True)
    w = torch.randn(3, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    gy = torch.randn(4, 3, 2, 2, device=device, requires_grad=True)
    mean, invstd = torch.zeros(3, device=device), torch.ones(3, device=device)
    sums = torch.randn(3, device=device)
    return [
        ("batch_norm_stats", lambda: ops.batch_norm_stats(x, None, None, None, 0.1, 1e-5)[0]),
        ("batch_norm_train_forward", lambda: ops.batch_norm_train_forward(x, w, b, None, None, None, 0.1, 1e-5)[0]),
        ("batch_norm_elemt", lambda: ops.batch_norm_elemt(x, w, b, mean, invstd)),
        ("batch_norm_inference", lambda: ops.batch_norm_inference(x, w, b, mean, invstd, 1e-5)),
        ("batch_norm_backward_reduce", lambda: ops.batch_norm_backward_reduce(gy, x, mean, invstd)[0]),
        ("batch_norm_backward_elemt", lambda: ops.batch_norm_backward_elemt(gy, x, mean, invstd, w, sums, sums, 16)),
        ("batch_norm_backward", lambda: ops.batch_norm_backward(gy, x, mean, invstd, w, "batch", [True, True, True])[0]),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_raw_ops_refuse_backward(device):
    calls = _raw_op_calls(device)
    registered = {n.split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("bnx::")}
    assert {f"bnx::{name}" for name, _ in calls} == registered - {"bnx::batch_norm"}, "every op is covered"
    for name, call in calls:
        out = call()
        assert out.requires_grad, name
        with pytest.raises(RuntimeError, match=f"derivative for bnx::{name} is not implemented"):
            out.sum().backward()
