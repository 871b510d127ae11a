"""bnx's autograd.Functions bind positional arguments without inspect (a per-call cost); every other way of
calling apply behaves as this torch's Function.apply does (torch 2.11 refuses keywords, 2.14 binds them)."""
import inspect

import pytest
import torch

import bnx
from conftest import assert_close


class _Scale(torch.autograd.Function):
    """A plain setup_context-style Function, to learn what this torch's apply does with keywords."""

    @staticmethod
    def forward(x, k):
        return x * k

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.k = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return g * ctx.k, None


def _torch_apply_takes_keywords():
    try:
        _Scale.apply(torch.ones(2), k=2.0)
        return True
    except TypeError:  # torch 2.11: "apply() takes no keyword arguments"
        return False


def test_forward_signature_still_describes_forward():
    for fn in (bnx.BatchNormTrainFunction, bnx.BatchNormEvalFunction):
        sig = inspect.signature(fn.forward)
        assert list(sig.parameters)[:3] == ["input", "weight", "bias"]
        assert sig.bind(*range(len(sig.parameters))).args == tuple(range(len(sig.parameters)))


@pytest.mark.parametrize("how", ["positional", "keywords", "too_few"])
def test_eval_function_apply(how):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, requires_grad=True)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    if how == "positional":
        y = bnx.BatchNormEvalFunction.apply(x, w, b, rm, rv, 1e-5)
    elif how == "keywords":
        if not _torch_apply_takes_keywords():  # then bnx's apply must refuse them the same way
            with pytest.raises(TypeError, match="keyword"):
                bnx.BatchNormEvalFunction.apply(x, w, b, rm, rv, eps=1e-5)
            return
        y = bnx.BatchNormEvalFunction.apply(x, w, b, rm, rv, eps=1e-5)
    else:
        with pytest.raises(TypeError, match="eps"):
            bnx.BatchNormEvalFunction.apply(x, w, b, rm, rv)
        return
    ref = torch.nn.functional.batch_norm(x, rm, rv, w, b, training=False, eps=1e-5)
    assert_close(y, ref, 1e-6, 1e-6)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    assert_close(gx, gx_ref, 1e-6, 1e-6)


def test_train_function_apply_with_keywords():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, requires_grad=True)
    args = (x, None, None, None, None, None, 0.1, 1e-5)
    y1, m1, s1 = bnx.BatchNormTrainFunction.apply(*args, "batch")
    if not _torch_apply_takes_keywords():
        with pytest.raises(TypeError, match="keyword"):
            bnx.BatchNormTrainFunction.apply(*args, formula="batch")
        return
    y2, m2, s2 = bnx.BatchNormTrainFunction.apply(*args, formula="batch")
    assert torch.equal(y1, y2) and torch.equal(m1, m2) and torch.equal(s1, s2)
    assert y1.requires_grad and not m1.requires_grad
