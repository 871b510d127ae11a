"""Drop-in BatchNorm modules: subclasses of torch.nn.BatchNorm1d/2d/3d with a ``backward`` switch."""
import torch

from . import functional as bnx_functional

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _NoBatchStatistics(torch.autograd.Function):
    """Identity whose backward explains that backward="batch" needs a forward with batch statistics.

    A module built with backward="batch" still evaluates in eval mode (validation loops work); only a
    gradient through that eval forward is refused, since its statistics are constants."""

    @staticmethod
    def forward(ctx, output):
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            "bnx: this BatchNorm module has backward='batch', but its forward used the running statistics "
            "(eval mode), which are constants: there is no gradient through them. Use model.train(), or set "
            "module.backward = 'frozen' (or None) for gradients of the eval-mode function."
        )


class _BackwardSwitch:
    """Adds the ``backward`` keyword and attribute to a torch BatchNorm class, and routes forward to bnx."""

    def __init__(self, *args, backward=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backward = backward

    @property
    def backward(self):
        """None (match the forward's statistics), "batch" or "frozen"; may be changed at any time."""
        return self._backward

    @backward.setter
    def backward(self, value):
        if value is not None and value not in ("batch", "frozen"):
            raise ValueError(f"backward must be None, 'batch' or 'frozen', got {value!r}")
        self.__dict__["_backward"] = value

    def extra_repr(self):
        return super().extra_repr() + f", backward={self.backward!r}"

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module it is about to compile; without it, the error would be
        # TorchScript's about the first Python construct it cannot compile, deep in bnx.functional.
        raise RuntimeError(
            f"bnx.{type(self).__name__} cannot be compiled by torch.jit.script (deprecated by PyTorch): its "
            "forward goes through Python autograd code. Use torch.export or torch.compile, or torch.jit.trace, "
            "which records the bnx.batch_norm op with its gradient (and the training flag as traced)."
        )

    def forward(self, input):
        if isinstance(input, torch.fx.Proxy) and input.tracer.root is not self:
            # torch.fx symbolic tracing keeps torch.nn's modules as leaves but traces into others. This forward
            # branches on the input's shape and updates buffers, which a trace would fail on or bake in, so
            # record one call_module node, as fx does for torch.nn.BatchNorm2d: the traced module then runs
            # this forward, with the training flag and backward formula read when it runs.
            tracer = input.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), (input,), {})
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        num_batches_tracked = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average: factor 1/num_batches_tracked, read on the device
                num_batches_tracked = self.num_batches_tracked
        # Batch statistics in training, and in eval when there are no running statistics (as torch does).
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Running statistics are passed only when they are to be used or updated.
        track = not self.training or self.track_running_stats
        defer_batch_error = self.backward == "batch" and not use_batch_stats
        output = bnx_functional.batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            backward=None if defer_batch_error else self.backward,
            num_batches_tracked=num_batches_tracked,
        )
        if defer_batch_error and output.requires_grad:
            output = _NoBatchStatistics.apply(output)
        return output


class BatchNorm1d(_BackwardSwitch, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d with ``backward=None | "batch" | "frozen"``."""


class BatchNorm2d(_BackwardSwitch, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d with ``backward=None | "batch" | "frozen"``."""


class BatchNorm3d(_BackwardSwitch, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d with ``backward=None | "batch" | "frozen"``."""
