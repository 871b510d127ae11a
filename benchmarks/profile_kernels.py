"""The GPU kernels of one training forward + backward, bnx against native, by torch.profiler.

    python benchmarks/profile_kernels.py [--shape 32,64,56,56] [--dtype fp32] [--layout nhwc] [--iters 10]

Prints, per implementation, the kernels with their total and mean device time over --iters calls
(after 5 warm-up calls). The same input every call, so an input that fits in L2 is partly read from
there: this shows which kernels run and their relative cost, not the benchmark's figures
(`python -m bnx bench` rotates inputs).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

try:
    import bnx
except ImportError:  # running from a source checkout without the package on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import bnx

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="32,64,56,56")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--layout", default="nhwc", choices=["nchw", "nhwc"])
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernels: needs a CUDA device")
    shape = tuple(int(s) for s in args.shape.split(","))
    C = shape[1]
    x = torch.randn(shape, device="cuda", dtype=DTYPES[args.dtype])
    if args.layout == "nhwc" and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.rand(C, device="cuda", requires_grad=True)
    b = torch.randn(C, device="cuda", requires_grad=True)
    gy = torch.randn_like(x)
    rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")

    def step(fn):
        y = fn(x, rm, rv, w, b, training=True)
        torch.autograd.grad(y, (x, w, b), gy)

    for name, fn in [("bnx", bnx.functional.batch_norm), ("native", F.batch_norm)]:
        for _ in range(5):
            step(fn)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                step(fn)
            torch.cuda.synchronize()
        print(f"== {name}: {args.dtype} {args.layout} {shape}, {args.iters} training forward + backward calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=90))


if __name__ == "__main__":
    main()
