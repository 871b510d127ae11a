"""The train/eval experiment on a small CNN (conv-bn-relu-conv-bn-relu-pool-linear).

Native torch: a train-mode step and an eval-mode step whose running statistics were set to
the batch statistics of that train step produce the same output, yet different gradients
for the layers before the BatchNorms (eval treats mean/var as constants). bnx reproduces
the train gradients with backward="batch" and the eval gradients -- while staying in
training mode -- with backward="frozen".
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bnx
from conftest import DEVICES, assert_close


class SmallCNN(nn.Module):
    def __init__(self, bn=nn.BatchNorm2d, **bn_kwargs):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = bn(8, **bn_kwargs)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = bn(16, **bn_kwargs)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _bns(model):
    return [model.bn1, model.bn2]


def _step(model, x, target):
    """One forward/backward; returns output, loss and a dict of parameter grads."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.cross_entropy(out, target)
    loss.backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_train_eval_experiment(device, memory_format):
    """Native train vs eval-with-batch-stats: same outputs, different pre-BN grads; bnx "batch"
    reproduces native train grads, bnx "frozen" (in train mode) reproduces native eval grads."""
    torch.manual_seed(20)
    native = SmallCNN().to(device)
    with torch.no_grad():  # non-trivial affine parameters
        for bn in _bns(native):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.5)
    init_state = copy.deepcopy(native.state_dict())
    x = torch.randn(8, 3, 8, 8, device=device).contiguous(memory_format=memory_format)
    target = torch.randint(0, 10, (8,), device=device)

    # --- native train mode, capturing each BN's batch statistics -------------------------
    stats = {}

    def hook(name):
        def pre_hook(module, args):
            inp = args[0].detach().double()
            stats[name] = (inp.mean((0, 2, 3)).float(), inp.var((0, 2, 3), unbiased=False).float())
        return pre_hook

    handles = [bn.register_forward_pre_hook(hook(n)) for n, bn in [("bn1", native.bn1),
                                                                    ("bn2", native.bn2)]]
    native.train()
    out_train, g_train = _step(native, x, target)
    for h in handles:
        h.remove()
    train_running = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in _bns(native)]

    # --- native eval mode with running stats := batch stats -------------------------------
    native_eval = SmallCNN().to(device)
    native_eval.load_state_dict(init_state)
    with torch.no_grad():
        for name, bn in [("bn1", native_eval.bn1), ("bn2", native_eval.bn2)]:
            bn.running_mean.copy_(stats[name][0])
            bn.running_var.copy_(stats[name][1])
    native_eval.eval()
    out_eval, g_eval = _step(native_eval, x, target)

    # the experiment's premise: same function value, different gradient
    assert_close(out_eval, out_train, atol=1e-5, rtol=1e-5, msg="native eval vs train output")
    for n in ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "bn1.weight"]:
        assert _rel(g_eval[n], g_train[n]) > 1e-3, n
    for n in ["fc.weight", "fc.bias", "bn2.weight", "bn2.bias"]:  # after the last BN: equal
        assert_close(g_eval[n], g_train[n], atol=1e-5, rtol=1e-4, msg=n)
    # batch formula: a per-channel constant before BN gets zero gradient (mean is subtracted)
    assert g_train["conv1.bias"].abs().max() < 1e-5 * g_eval["conv1.bias"].abs().max().clamp_min(1)
    assert g_eval["conv1.bias"].abs().max() > 1e-4

    # --- bnx models with the same weights --------------------------------------------------
    def bnx_model(backward):
        m = SmallCNN(bn=bnx.BatchNorm2d, backward=backward).to(device)
        m.load_state_dict(init_state)
        assert isinstance(m.bn1, bnx.BatchNorm2d) and m.bn1.backward == backward
        return m.train()

    for backward, out_ref, g_ref in [(None, out_train, g_train), ("batch", out_train, g_train),
                                     ("frozen", out_train, g_eval)]:
        m = bnx_model(backward)
        out, g = _step(m, x, target)
        assert_close(out, out_ref, atol=1e-5, rtol=1e-5, msg=f"bnx {backward} output")
        assert g.keys() == g_ref.keys()
        for n in g:
            assert_close(g[n], g_ref[n], atol=1e-6, rtol=1e-4, msg=f"bnx {backward} grad {n}")
        # it is a training-mode forward in every case: running stats updated like native train
        for bn, (rm, rv) in zip(_bns(m), train_running):
            assert_close(bn.running_mean, rm, atol=1e-6, rtol=1e-5)
            assert_close(bn.running_var, rv, atol=1e-6, rtol=1e-5)
            assert bn.num_batches_tracked.item() == 1

    # bnx in eval mode with the batch statistics reproduces native eval exactly as well
    m = SmallCNN(bn=bnx.BatchNorm2d).to(device)
    m.load_state_dict(native_eval.state_dict())
    m.eval()
    out, g = _step(m, x, target)
    assert_close(out, out_eval, atol=1e-5, rtol=1e-5)
    for n in g:
        assert_close(g[n], g_eval[n], atol=1e-6, rtol=1e-4, msg=f"bnx eval grad {n}")
