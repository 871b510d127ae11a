"""One benchmark case, for Nsight Compute: the calls to profile sit between cudaProfilerStart and Stop.

    ncu --profile-from-start off --replay-mode application --cache-control none --clock-control none \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct \\
        --csv --print-units base python benchmarks/ncu_case.py --shape 256,256,56,56 --dtype bf16 --layout nchw

The inputs are the benchmark's (`python -m bnx bench`: the same input sets, rotated, so no call finds its
input in L2 from the call before), and so is each pass. After --warmup calls, --iters calls are profiled.
With application replay and no cache control, each kernel sees the L2 that the kernels before it left, as
in the benchmark: that is what says whether a second pass reads its input from L2 or from DRAM. The first
line of output is a JSON record of the case (compulsory bytes, tensor bytes); benchmarks/ncu_summary.py reads
it with ncu's CSV (scripts/gpu_check.sh's `ncu` stage runs both).
"""
import argparse
import json
import math
import os
import sys

import torch

try:
    import bnx
except ImportError:  # running from a source checkout without the package on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import bnx
from bnx import bench
from bnx import functional as bnxF


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="256,256,56,56")
    ap.add_argument("--dtype", default="bf16", choices=sorted(bench.DTYPES))
    ap.add_argument("--layout", default="nchw", choices=["nchw", "nhwc"])
    ap.add_argument("--pass", dest="pass_name", default="train_fwd_bwd", choices=bench.PASSES)
    ap.add_argument("--impl", default="bnx", choices=["bnx", "native", "native_nocudnn"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=1)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ncu_case: needs a CUDA device")
    if args.impl == "bnx" and not bnx.has_cuda_kernels():
        raise SystemExit("ncu_case: bnx was built without its CUDA kernels")
    if args.warmup < 0 or args.iters < 1:
        raise SystemExit("ncu_case: --warmup must be >= 0 and --iters >= 1")
    shape = tuple(int(s) for s in args.shape.split(","))
    dtype = bench.DTYPES[args.dtype]
    device = torch.device("cuda")
    nsets = bench._nsets(shape, dtype, device)
    combo = bench.Combo(shape, dtype, args.layout, device, nsets)
    fn = bench.build_fn(args.impl, args.pass_name, combo, None, bnxF)
    calls = 0
    for _ in range(args.warmup):
        fn(calls % nsets)
        calls += 1
    torch.cuda.synchronize()
    elements = math.prod(shape)
    tensor_bytes = elements * torch.empty((), dtype=dtype).element_size()
    print(json.dumps(dict(tool="ncu_case", shape=list(shape), dtype=args.dtype, layout=args.layout,
                          pass_=args.pass_name, impl=args.impl, iters=args.iters, input_sets=nsets,
                          tensor_bytes=tensor_bytes,
                          compulsory_bytes=bench.BYTES_FACTOR[args.pass_name] * tensor_bytes,
                          bnx_settings={k: v for k, v in sorted(os.environ.items()) if k.startswith("BNX_")})),
          flush=True)
    torch.cuda.cudart().cudaProfilerStart()
    for _ in range(args.iters):
        fn(calls % nsets)
        calls += 1
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
