"""Builds the bnx._C extension.

CUDA kernels are compiled whenever the installed torch has CUDA and nvcc is found (no GPU is needed);
otherwise the extension is CPU-only. BNX_CUDA=0 forces a CPU-only build (quick local iterations),
BNX_CUDA=1 makes a missing CUDA toolchain an error instead of a silent CPU-only build.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

# torch.utils.cpp_extension reads CUDA_HOME at import time. Where `nvcc` on PATH is a wrapper
# (e.g. /usr/local/bin/nvcc) torch would guess the wrong root, so prefer the real toolkit folder.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    for root in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(root, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = root
            break

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_wanted():
    switch = os.environ.get("BNX_CUDA", "auto").lower()
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and (
        os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc")
    )
    if switch in ("0", "off", "false", "no"):
        return False
    if switch in ("1", "on", "true", "yes") and not available:
        sys.exit(
            f"BNX_CUDA={switch} but no CUDA build is possible: torch.version.cuda={torch.version.cuda}, "
            f"CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    return bool(available)


def cuda_header_dirs():
    """Headers that a minimal CUDA toolkit lacks (cusparse.h, ...) ship in the nvidia-* wheels."""
    dirs = []
    for entry in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for d in sorted(glob.glob(os.path.join(entry, pattern))):
                if os.path.isdir(d) and d not in dirs:
                    dirs.append(d)
    return dirs


def make_extension():
    sources = [os.path.join("csrc", name) for name in ("ops.cpp", "checks.cpp", "autograd.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp"]  # at::parallel_for is inline OpenMP: without -fopenmp it runs on one thread
    define_macros = []
    if cuda_wanted():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # With no GPU to ask, torch cannot pick an arch (IndexError); build Ampere and Hopper, plus PTX.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("BNX_WITH_CUDA", None))
        return cpp_extension.CUDAExtension(
            "bnx._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")] + cuda_header_dirs(),
            define_macros=define_macros,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
            },
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "bnx._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="bnx",
    version="0.1.0",
    description="BatchNorm for PyTorch with a switchable backward formula (batch or frozen statistics)",
    packages=find_packages(include=["bnx", "bnx.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch"],
)
