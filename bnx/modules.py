"""Drop-in BatchNorm modules: subclasses of torch.nn.BatchNorm1d/2d/3d with a ``backward`` switch."""
import torch

from . import functional as bnx_functional

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


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

    def forward(self, input):
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
        return bnx_functional.batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            backward=self.backward,
            num_batches_tracked=num_batches_tracked,
        )


class BatchNorm1d(_BackwardSwitch, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d with ``backward=None | "batch" | "frozen"``."""


class BatchNorm2d(_BackwardSwitch, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d with ``backward=None | "batch" | "frozen"``."""


class BatchNorm3d(_BackwardSwitch, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d with ``backward=None | "batch" | "frozen"``."""
