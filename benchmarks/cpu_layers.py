"""Where bnx's CPU time goes, layer by layer, against native: `python benchmarks/cpu_layers.py --help`.

Three measurements; the first two are ratios reference time / bnx time from implementations called in
alternation (as `python -m bnx bench --device cpu` does), on inputs that rotate so that no call finds its
input in cache:
- ops: bnx's ops against native's (eval forward, training forward, backward); then the same eval forward
  through bnx's Python autograd.Function and through bnx.functional, against F.batch_norm.
- autograd: training forward + backward (torch.autograd.grad of x, weight, bias): bnx's ops called bare
  against native's, then bnx.functional (the C++ autograd op) against F.batch_norm, and against the same
  through bnx's Python autograd.Function: what the layers around the kernels cost on a large input.
- calls: per-call time on a tiny input (the layers' fixed cost): F.batch_norm against bnx.functional, and
  torch.nn.BatchNorm2d against bnx.BatchNorm2d, forward and forward + backward.
Run it a few times: a shared machine moves these ratios by several per cent from run to run.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

try:
    import bnx
except ImportError:  # running from a source checkout without the package on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import bnx
from bnx.bench import EPS, MOMENTUM, Timer

NSETS = 6


def _input_sets(shape, channels_last, requires_grad=False):
    """NSETS inputs and output gradients of `shape` in the chosen layout (seeded)."""
    mf = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    xs = [torch.randn(shape).contiguous(memory_format=mf).requires_grad_(requires_grad) for _ in range(NSETS)]
    dys = [torch.randn(shape).contiguous(memory_format=mf) for _ in range(NSETS)]
    return xs, dys


def _pairs(shape, channels_last):
    """{label: (bnx_fn, native_fn)}, each fn(i) working on input set i."""
    C = shape[1]
    xs, dys = _input_sets(shape, channels_last)
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    rm, rv = torch.randn(C) * 0.1, torch.rand(C) + 0.5
    saved = [torch.ops.bnx.batch_norm_train_forward(x, w, b, None, None, None, MOMENTUM, EPS) for x in xs]
    nsaved = [torch.ops.aten.native_batch_norm(x, w, b, None, None, True, MOMENTUM, EPS) for x in xs]
    return {
        "op: eval forward": (
            lambda i: torch.ops.bnx.batch_norm_inference(xs[i], w, b, rm, rv, EPS),
            lambda i: torch.ops.aten.native_batch_norm(xs[i], w, b, rm, rv, False, MOMENTUM, EPS)),
        "op: training forward": (
            lambda i: torch.ops.bnx.batch_norm_train_forward(xs[i], w, b, rm, rv, None, MOMENTUM, EPS),
            lambda i: torch.ops.aten.native_batch_norm(xs[i], w, b, rm, rv, True, MOMENTUM, EPS)),
        "op: backward (batch)": (
            lambda i: torch.ops.bnx.batch_norm_backward(dys[i], xs[i], saved[i][1], saved[i][2], w, "batch",
                                                        [True, True, True]),
            lambda i: torch.ops.aten.native_batch_norm_backward(dys[i], xs[i], w, None, None, nsaved[i][1],
                                                               nsaved[i][2], True, EPS, [True, True, True])),
        "Function: eval forward vs op": (
            lambda i: bnx.autograd.BatchNormEvalFunction.apply(xs[i], w, b, rm, rv, EPS),
            lambda i: torch.ops.bnx.batch_norm_inference(xs[i], w, b, rm, rv, EPS)),
        "functional: eval forward": (
            lambda i: bnx.functional.batch_norm(xs[i], rm, rv, w, b, False, MOMENTUM, EPS),
            lambda i: F.batch_norm(xs[i], rm, rv, w, b, False, MOMENTUM, EPS)),
    }


def _autograd_pairs(shape, channels_last):
    """{label: (bnx_fn, reference_fn)} for training forward + backward, each fn(i) working on input set i."""
    C = shape[1]
    xs, dys = _input_sets(shape, channels_last, requires_grad=True)
    w, b = (torch.rand(C) + 0.5).requires_grad_(), torch.randn(C).requires_grad_()
    rm, rv = torch.zeros(C), torch.ones(C)
    wd, bd, mask = w.detach(), b.detach(), [True, True, True]

    def bare_bnx(i):
        x = xs[i].detach()
        _, mean, invstd = torch.ops.bnx.batch_norm_train_forward(x, wd, bd, rm, rv, None, MOMENTUM, EPS)
        return torch.ops.bnx.batch_norm_backward(dys[i], x, mean, invstd, wd, "batch", mask)

    def bare_native(i):
        x = xs[i].detach()
        _, mean, invstd = torch.ops.aten.native_batch_norm(x, wd, bd, rm, rv, True, MOMENTUM, EPS)
        return torch.ops.aten.native_batch_norm_backward(dys[i], x, wd, rm, rv, mean, invstd, True, EPS, mask)

    def layer(f):
        return lambda i: torch.autograd.grad(f(xs[i]), (xs[i], w, b), dys[i])

    bnx_functional = layer(lambda x: bnx.functional.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS))
    python_function = layer(lambda x: bnx.autograd.BatchNormTrainFunction.apply(
        x, w, b, rm, rv, None, MOMENTUM, EPS, "batch")[0])
    return {
        "ops, bare": (bare_bnx, bare_native),
        "functional vs F.batch_norm": (bnx_functional, layer(lambda x: F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS))),
        "functional vs Python Function": (bnx_functional, python_function),
    }


def _per_call_us(fn, n, repeats=5):
    for _ in range(max(10, n // 20)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def calls(n):
    shape, C = (2, 64, 2, 2), 64
    torch.manual_seed(0)
    x = torch.randn(shape).requires_grad_()
    dy = torch.randn(shape)
    rows = []
    w, b = (torch.rand(C) + 0.5).requires_grad_(), torch.randn(C).requires_grad_()
    rm, rv = torch.zeros(C), torch.ones(C)
    fns = {"bnx.functional": lambda t: bnx.functional.batch_norm(t, rm, rv, w, b, True, MOMENTUM, EPS),
           "F.batch_norm": lambda t: F.batch_norm(t, rm, rv, w, b, True, MOMENTUM, EPS)}
    for name, f in fns.items():
        rows.append((name, _per_call_us(lambda: f(x), n),
                     _per_call_us(lambda: torch.autograd.grad(f(x), (x, w, b), dy), n)))
    for name, m in (("bnx.BatchNorm2d", bnx.BatchNorm2d(C)), ("torch.nn.BatchNorm2d", torch.nn.BatchNorm2d(C))):
        params = (x,) + tuple(m.parameters())
        rows.append((name, _per_call_us(lambda: m(x), n),
                     _per_call_us(lambda: torch.autograd.grad(m(x), params, dy), n)))
    print(f"per call, training mode, input {shape} (best of 5 loops of {n} calls):")
    for name, fwd, fwd_bwd in rows:
        print(f"  {name:22s} forward {fwd:6.1f} us   forward + backward {fwd_bwd:6.1f} us")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="16,64,56,56", help="N,C,H,W for the op comparison (default 16,64,56,56)")
    p.add_argument("--layout", choices=["nhwc", "nchw"], default="nhwc", help="default nhwc (channels_last)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seconds", type=float, default=0.25, help="timing per implementation and pair (default 0.25)")
    p.add_argument("--calls", type=int, default=2000, help="calls per loop for the per-call times (0: skip)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split(","))
    print(f"torch {torch.__version__}, bnx CPU kernels {bnx.cpu_kernels()}, threads {torch.get_num_threads()}")
    timer = Timer(torch.device("cpu"), reps=None, warmup=2, cpu_seconds=args.seconds)
    print(f"{args.layout} {shape} float32: native time / bnx time (calls alternate; inputs rotate among {NSETS} sets)")
    def compare(pairs):
        for label, (mine, theirs) in pairs.items():
            res = timer.cpu_interleaved({"bnx": mine, "ref": theirs}, NSETS)
            print(f"  {label:30s} {res['ref'][0] / res['bnx'][0]:5.2f}x   "
                  f"(bnx {res['bnx'][0]:8.1f} us, reference {res['ref'][0]:8.1f} us)")

    with torch.no_grad():
        compare(_pairs(shape, args.layout == "nhwc"))
    print("training forward + backward:")
    compare(_autograd_pairs(shape, args.layout == "nhwc"))
    if args.calls:
        calls(args.calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
