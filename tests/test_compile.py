"""torch.compile(fullgraph=True) of a small CNN with bnx layers equals eager execution.

Covers the training step (forward + backward, in-place running-stat updates,
num_batches_tracked increment, momentum=None cumulative average read on the device) and an
eval forward. Kept to a few compiles: each takes ~20 s on CPU.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bnx
from conftest import DEVICES, assert_close


class Net(nn.Module):
    def __init__(self, **bn_kwargs):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = bnx.BatchNorm2d(6, **bn_kwargs)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = bnx.BatchNorm2d(8, **bn_kwargs)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _compare_models(eager, compiled_mod, tag):
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled_mod.named_parameters()):
        assert_close(b.grad, a.grad, 1e-5, 1e-4, f"{tag} grad {n}")
    for (n, a), (_, b) in zip(eager.named_buffers(), compiled_mod.named_buffers()):
        if a.dtype == torch.long:
            assert torch.equal(a, b), f"{tag} {n}: {a} vs {b}"
        else:
            assert_close(b, a, 1e-6, 1e-5, f"{tag} {n}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentum_none"])
def test_compile_fullgraph_matches_eager(device, momentum):
    """Two compiled training steps and one compiled eval forward reproduce eager results:
    outputs, all grads, running stats and num_batches_tracked."""
    torch._dynamo.reset()
    torch.manual_seed(40)
    eager = Net(momentum=momentum).to(device)
    with torch.no_grad():
        for bn in (eager.bn1, eager.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)

    for step in range(2):
        x = torch.randn(4, 3, 6, 6, device=device) * 2 + step
        eager.zero_grad(), model.zero_grad()
        y_e = eager(x)
        y_c = compiled(x)
        assert_close(y_c, y_e, 1e-5, 1e-4, f"train step {step} output")
        y_e.square().sum().backward()
        y_c.square().sum().backward()
        _compare_models(eager, model, f"train step {step}")
    assert model.bn1.num_batches_tracked.item() == 2

    eager.eval(), model.eval()
    x = torch.randn(4, 3, 6, 6, device=device)
    with torch.no_grad():
        assert_close(compiled(x), eager(x), 1e-5, 1e-4, "eval output")
    _compare_models(eager, model, "after eval")
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_compile_functional_frozen_backward(device):
    """The functional with backward="frozen" in training mode compiles with fullgraph=True and
    gives eager grads."""
    torch._dynamo.reset()
    torch.manual_seed(41)
    x0 = torch.randn(6, 4, 5, device=device)
    w0 = torch.rand(4, device=device) + 0.5
    b0 = torch.randn(4, device=device)

    def f(x, w, b, rm, rv):
        return bnx.functional.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2,
                                         backward="frozen")

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    res = []
    for fn in (f, cf):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
        y = fn(x, w, b, rm, rv)
        y.backward(torch.ones_like(y) * torch.arange(5, device=device))
        res.append((y, x.grad, w.grad, b.grad, rm, rv))
    for n, a, e in zip(["y", "gx", "gw", "gb", "rm", "rv"], res[1], res[0]):
        assert_close(a, e, 1e-5, 1e-5, n)
    torch._dynamo.reset()
