"""bnx: BatchNorm for PyTorch with a switchable backward formula.

``backward="batch"`` differentiates through the batch mean and variance (what ``model.train()`` gives),
``backward="frozen"`` treats them as constants (what ``model.eval()`` gives); ``None`` picks the one that
matches the statistics the forward used.
"""
import warnings

import torch

from . import _C  # noqa: F401  (loads the library that registers torch.ops.bnx)
from . import _meta  # noqa: F401  (fake kernels, for torch.compile)
from . import functional
from .autograd import BatchNormEvalFunction, BatchNormTrainFunction
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormEvalFunction",
    "BatchNormTrainFunction",
    "functional",
    "decompose_input_gradient",
    "has_cuda_kernels",
    "cpu_kernels",
]

__version__ = "0.1.0"

# torch.jit.trace warns where Python branches on a traced size; bnx's branch only to check arguments, and the
# traced bnx.batch_norm op checks its arguments again whenever it runs. torch ignores these warnings from its
# own modules for the same reason (TracerWarning.ignore_lib_warnings).
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"bnx(\.|$)")


def has_cuda_kernels() -> bool:
    """True when this build of bnx carries CUDA kernels (independent of whether a GPU is present)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("bnx::batch_norm_elemt", "CUDA")


def cpu_kernels() -> str:
    """The instruction set the CPU kernels run with: "avx2" (AVX2 + FMA + F16C, chosen when the CPU has all three) or
    "default" (the compiler's baseline; also what BNX_CPU_KERNELS=default asks for)."""
    return _C.cpu_kernels


def __getattr__(name):
    # The analysis helpers pull in more than the layers need; load them on first use.
    if name == "decompose_input_gradient":
        from .explain import decompose_input_gradient

        return decompose_input_gradient
    raise AttributeError(f"module 'bnx' has no attribute {name!r}")
