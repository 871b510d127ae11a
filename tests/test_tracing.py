"""torch.fx symbolic tracing, the __torch_function__ protocol, and TorchScript.

fx-based tools (torchvision's feature extraction, FX graph-mode quantization, graph rewriters) trace models
with torch.fx.symbolic_trace. It keeps torch.nn's modules as call_module leaves and records
torch.nn.functional.batch_norm as one call_function node (through __torch_function__); bnx's modules and
functional must trace the same way, and the traced module must compute what the eager one does."""
import copy
import io
import subprocess
import sys
import warnings

import pytest
import torch

import bnx


def _models(backward):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnx.BatchNorm2d(4, backward=backward), torch.nn.ReLU())
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    native = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    native.load_state_dict(model.state_dict())
    return model, native


def _step(model, x):
    """Output, input gradient and parameter gradients of one forward + backward of sum(out * g)."""
    x = x.detach().requires_grad_(True)
    out = model(x)
    g = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    (out * g).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("backward", [None, "frozen"])
def test_module_is_traced_as_one_call_module_node(backward):
    model, native = _models(backward)
    eager = copy.deepcopy(model)
    gm = torch.fx.symbolic_trace(model)
    ops = [(n.op, n.target) for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert ops == [("call_module", "0"), ("call_module", "1"), ("call_module", "2")]
    assert gm.get_submodule("1") is model[1]
    # Tracing ran nothing: the buffers are as they were.
    assert model[1].num_batches_tracked.item() == 0
    assert torch.equal(model[1].running_mean, torch.zeros(4))

    x = torch.randn(6, 3, 7, 7)
    out, gx, grads = _step(gm, x)
    e_out, e_gx, e_grads = _step(eager, x)
    n_out, n_gx, n_grads = _step(native, x)
    # The traced module is the eager module's code: bit for bit.
    assert torch.equal(out, e_out) and torch.equal(gx, e_gx)
    assert all(torch.equal(a, b) for a, b in zip(grads, e_grads))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(eager[1], name))
        torch.testing.assert_close(getattr(model[1], name), getattr(native[1], name))
    torch.testing.assert_close(out, n_out)
    # The formula is the module's: native's training gradient for "batch", not for "frozen".
    same_as_native = torch.allclose(gx, n_gx, atol=1e-5, rtol=1e-4)
    assert same_as_native == (backward is None)

    # The training flag is read when the traced module runs, not baked in when it was traced.
    gm.eval(), eager.eval(), native.eval()
    out, gx, _ = _step(gm, x)
    e_out, e_gx, _ = _step(eager, x)
    n_out, n_gx, _ = _step(native, x)
    assert torch.equal(out, e_out) and torch.equal(gx, e_gx)
    torch.testing.assert_close(out, n_out)
    torch.testing.assert_close(gx, n_gx)
    assert model[1].num_batches_tracked.item() == 1


def test_module_as_the_traced_root_fails_as_native_does():
    # fx traces into the root module itself, native's too; neither forward is traceable that way.
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(torch.nn.BatchNorm2d(3))
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(bnx.BatchNorm2d(3))


class _FunctionalBatchNorm(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, channels))
        self.bias = torch.nn.Parameter(torch.linspace(-0.5, 0.5, channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return bnx.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.2, 1e-3, backward="frozen"
        )


def test_functional_is_traced_as_one_call_function_node():
    module = _FunctionalBatchNorm(5)
    eager = copy.deepcopy(module)
    gm = torch.fx.symbolic_trace(module)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [bnx.functional.batch_norm]
    assert calls[0].kwargs["backward"] == "frozen" and calls[0].kwargs["momentum"] == 0.2
    assert torch.equal(module.running_mean, torch.zeros(5))

    x = torch.randn(8, 5, 3)
    out, gx, grads = _step(gm, x)
    e_out, e_gx, e_grads = _step(eager, x)
    assert torch.equal(out, e_out) and torch.equal(gx, e_gx)
    assert all(torch.equal(a, b) for a, b in zip(grads, e_grads))
    assert torch.equal(module.running_mean, eager.running_mean) and torch.equal(module.running_var, eager.running_var)
    # Frozen formula: dx = weight * invstd * dy with the batch's statistics.
    var = x.var(dim=(0, 2), unbiased=False)
    g = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    expected = g * (module.weight.detach() / torch.sqrt(var + 1e-3))[None, :, None]
    torch.testing.assert_close(gx, expected)


class _LoggingTensor(torch.Tensor):
    calls = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("overridden", ["input", "weight"])
def test_functional_follows_the_torch_function_protocol(overridden):
    x = torch.randn(4, 3, 5)
    weight = torch.linspace(0.5, 1.5, 3)
    args = {"input": x, "weight": weight}
    args[overridden] = args[overridden].as_subclass(_LoggingTensor)
    _LoggingTensor.calls.clear()
    out = bnx.functional.batch_norm(args["input"], None, None, args["weight"], None, True)
    assert _LoggingTensor.calls[0] is bnx.functional.batch_norm
    assert type(out) is _LoggingTensor
    torch.testing.assert_close(out.as_subclass(torch.Tensor), torch.nn.functional.batch_norm(x, None, None, weight, None, True))


def test_torch_jit_script_names_the_module_and_the_alternatives():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnx.BatchNorm3d(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        with pytest.raises(RuntimeError, match=r"bnx.BatchNorm3d cannot be compiled by torch.jit.script.*torch.export"):
            torch.jit.script(model)


def test_torch_jit_trace_records_the_layer_op_with_its_gradient():
    model, _ = _models("frozen")
    eager = copy.deepcopy(model)
    x = torch.randn(6, 3, 7, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
        traced = torch.jit.trace(model, x, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    assert [n.kind() for n in loaded.inlined_graph.nodes() if n.kind().startswith("bnx::")] == ["bnx::batch_norm"]
    eager(x)  # the trace ran the forward once
    out, gx, grads = _step(loaded, x)
    e_out, e_gx, e_grads = _step(eager, x)
    assert torch.equal(out, e_out) and torch.equal(gx, e_gx)
    assert all(torch.equal(a, b) for a, b in zip(grads, e_grads))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(getattr(loaded, "1"), name), getattr(eager[1], name))
    # The traced op checks its arguments when it runs: one value per channel in training.
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        loaded(torch.randn(1, 3, 3, 3))


def test_torch_jit_trace_gives_no_tracer_warnings_from_bnx():
    # bnx's argument checks branch on traced sizes, which TracerWarning flags; as torch does for its own
    # modules, bnx ignores these (the traced op checks its arguments when it runs). Run in a fresh process:
    # pytest restores the warning filters after collecting, dropping those that imports added.
    code = (
        "import warnings, torch, bnx\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bnx.BatchNorm2d(4), bnx.BatchNorm2d(4).eval())\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    torch.jit.trace(m, torch.randn(4, 3, 5, 5))\n"
        "print([str(w.message)[:80] for w in caught if issubclass(w.category, torch.jit.TracerWarning)])\n"
        "print([w.category.__name__ for w in caught])\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    tracer_warnings, categories = p.stdout.strip().splitlines()
    assert tracer_warnings == "[]"
    assert "FutureWarning" in categories  # warnings were recorded at all (torch.jit.trace is deprecated)
