"""bnx benchmark engine (``python -m bnx bench`` and ``benchmarks/bench.py``).

Times bnx against native ``F.batch_norm`` (cuDNN on and off) and ``torch.compile`` (GPU) per pass, shape,
dtype and layout, and reports microseconds, speedups and "frac" = compulsory bytes / time / copy bandwidth
(the copy bandwidth is measured in the same run; see PERF-BASELINE.md for the byte counts).

GPU timing: CUDA events around each repetition, median after warm-up. Before the timed repetitions a
``torch.cuda._sleep`` kernel holds the GPU while the CPU queues them, so the numbers are device time (CPU
launch overhead hidden, gaps between kernels included). CPU timing: wall clock (time.perf_counter) medians,
the implementations called in alternation (a shared machine's load then weighs on all of them alike).
Small inputs rotate among several input sets (and the outputs of the last few calls are kept alive, so each
call writes fresh memory) so repeated runs don't measure the L2 cache.

--json and --md are rewritten (atomically) after every case, marked "partial" until the last one, so a run
cut short still leaves its results; ``--from-progress LOG`` rebuilds the reports from a run's progress log
(its stderr) instead of timing.
"""

import collections
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

PASSES = ["train_fwd", "train_bwd", "train_fwd_bwd", "eval_fwd", "frozen_bwd_wgrad", "frozen_bwd_dx",
          "bnx_train_frozen"]
PASS_TEXT = {
    "train_fwd": "training forward incl. running-stat update (x, weight, bias require grad)",
    "train_bwd": "training backward only (batch formula), from a saved graph: grads of x, weight, bias",
    "train_fwd_bwd": "training forward + backward (x, weight, bias require grad)",
    "eval_fwd": "eval forward with running stats (no grad)",
    "frozen_bwd_wgrad": "eval-mode backward only: grads of x, weight, bias",
    "frozen_bwd_dx": "eval-mode backward only: grad of x (weight, bias don't require grad)",
    "bnx_train_frozen": "bnx training forward + backward='frozen' (peers: native training fwd+bwd, reference)",
}
# compulsory bytes per pass, in units of E*b (elements * bytes per element)
BYTES_FACTOR = {"train_fwd": 2, "train_bwd": 3, "train_fwd_bwd": 5, "eval_fwd": 2, "frozen_bwd_wgrad": 3,
                "frozen_bwd_dx": 2, "bnx_train_frozen": 5}
# which torch.compile'd function a pass uses (one compile per group and shape/dtype/layout)
COMPILE_GROUP = {"train_fwd": "train", "train_bwd": "train", "train_fwd_bwd": "train",
                 "bnx_train_frozen": "train", "eval_fwd": "infer", "frozen_bwd_wgrad": "eval_wgrad",
                 "frozen_bwd_dx": "eval_dx"}
TRAIN_PASSES = ["train_fwd", "train_bwd", "train_fwd_bwd", "bnx_train_frozen"]

GPU_SHAPES = [
    ("rn50-112", (256, 64, 112, 112)),
    ("rn50-56", (256, 256, 56, 56)),
    ("rn50-28", (256, 512, 28, 28)),
    ("rn50-14", (256, 1024, 14, 14)),
    ("rn50-7", (256, 2048, 7, 7)),
    ("launch", (32, 64, 56, 56)),
    ("wide-image", (8, 32, 256, 256)),
]
GPU_QUICK = ["rn50-112", "rn50-28", "rn50-7", "launch"]
CPU_SHAPES = [("cpu-56", (16, 64, 56, 56)), ("cpu-14", (64, 256, 14, 14))]
RESNET = {n for n, _ in GPU_SHAPES if n.startswith("rn50")}
SHAPE_GROUPS = {"rn50": [n for n, _ in GPU_SHAPES if n.startswith("rn50")], "resnet": None, "gpu": None,
                "cpu": None, "all": None}
SHAPE_GROUPS["resnet"] = SHAPE_GROUPS["rn50"]
SHAPE_GROUPS["gpu"] = [n for n, _ in GPU_SHAPES]
SHAPE_GROUPS["cpu"] = [n for n, _ in CPU_SHAPES]
SHAPE_GROUPS["all"] = SHAPE_GROUPS["gpu"] + SHAPE_GROUPS["cpu"]
NAMED = dict(GPU_SHAPES + CPU_SHAPES)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, "fp64": torch.float64}
LAYOUTS = ["nchw", "nhwc"]
IMPLS = ["bnx", "native", "native_nocudnn", "compile"]
IMPL_TEXT = {"bnx": "bnx", "native": "native", "native_nocudnn": "no-cuDNN", "compile": "compile"}
PEERS_GPU = ["native", "native_nocudnn", "compile"]
PEERS_CPU = ["native"]

L2_GUARD_BYTES = 128 << 20  # rotate input sets until this many bytes separate two uses of one set
MAX_SETS = 8
MOMENTUM, EPS = 0.1, 1e-5


class BenchUsageError(ValueError):
    pass


# ------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------

def add_arguments(p):
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="cuda or cpu (default: cuda if available, else cpu)")
    p.add_argument("--shapes", metavar="LIST",
                   help="';'-separated shapes 'N,C,H,W' (any rank 2-5) and/or names: "
                        + ", ".join(NAMED) + "; groups: rn50, gpu, cpu, all "
                        "(default: the 7 GPU shapes, --quick: " + ", ".join(GPU_QUICK) + "; CPU: cpu)")
    p.add_argument("--dtype", default=None, metavar="LIST",
                   help="comma list of bf16, fp32, fp16, fp64 (default GPU: bf16,fp32; CPU: fp32). "
                        "Weight/bias/running stats are fp32 for bf16/fp16 input, as in AMP")
    p.add_argument("--layout", default="nchw,nhwc", metavar="LIST",
                   help="comma list of nchw (contiguous), nhwc (channels_last; channels_last_3d for 5-D; "
                        "skipped for 2-D/3-D input) (default both)")
    p.add_argument("--passes", default=None, metavar="LIST", help="comma list of " + ", ".join(PASSES)
                   + " (default all)")
    p.add_argument("--peers", default=None, metavar="LIST",
                   help="comma list of native, native_nocudnn, compile (default GPU: all three; CPU: native)")
    p.add_argument("--quick", action="store_true",
                   help="fewer shapes and repetitions; torch.compile only for the training passes")
    p.add_argument("--reps", type=int, default=None, metavar="N",
                   help="timed repetitions per measurement (default GPU 20, quick 10; CPU: as many as fit in "
                        "0.25 s, quick 0.08 s, at least 5)")
    p.add_argument("--warmup", type=int, default=None, metavar="N", help="warm-up calls (default 3, CPU 2)")
    p.add_argument("--compile-passes", default=None, metavar="LIST",
                   help="passes that get a torch.compile peer (default all; --quick: the training passes)")
    p.add_argument("--compile-budget", type=float, default=None, metavar="SEC",
                   help="stop compiling new functions after this many seconds in total "
                        "(default 200, quick 60); the training passes' compiles get it first; "
                        "cases left without one show compile as n/a")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch.set_num_threads (default on CPU: 2)")
    p.add_argument("--json", metavar="FILE", help="write all results as JSON")
    p.add_argument("--md", metavar="FILE", help="write a markdown report")
    p.add_argument("--plot", metavar="FILE.png", help="write a PNG chart (frac per case, bnx vs best peer)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip comparing bnx's results with native's (max relative difference per case)")
    p.add_argument("--from-progress", metavar="LOG",
                   help="time nothing: rebuild the results from a progress log (the stderr of an earlier run, "
                        "e.g. one cut short) and write --json/--md/--plot from it. The device and peers come "
                        "from the log's header; pass the earlier run's --shapes/--dtype/--layout/--passes/--quick "
                        "if it wasn't run with the defaults. Cases missing from the log are marked absent")


def _split(s):
    return [t.strip() for t in s.split(",") if t.strip()]


def parse_shapes(text, device_type, quick):
    if not text:
        if device_type == "cpu":
            return list(CPU_SHAPES)
        names = GPU_QUICK if quick else [n for n, _ in GPU_SHAPES]
        return [(n, NAMED[n]) for n in names]
    out = []
    for tok in [t.strip() for t in text.replace(" ", "").split(";") if t.strip()]:
        low = tok.lower()
        if low in SHAPE_GROUPS:
            out += [(n, NAMED[n]) for n in SHAPE_GROUPS[low]]
        elif low in NAMED:
            out.append((low, NAMED[low]))
        else:
            try:
                dims = tuple(int(v) for v in tok.split(",") if v != "")
            except ValueError:
                raise BenchUsageError(f"bad shape {tok!r}: use N,C[,D][,H],W or a name ({', '.join(NAMED)})")
            if not 2 <= len(dims) <= 5 or min(dims) <= 0:
                raise BenchUsageError(f"bad shape {tok!r}: need 2 to 5 positive sizes (N,C,...)")
            name = next((n for n, s in NAMED.items() if s == dims), ",".join(map(str, dims)))
            out.append((name, dims))
    seen, uniq = set(), []
    for n, s in out:
        if s not in seen:
            seen.add(s)
            uniq.append((n, s))
    return uniq


def _check_list(vals, allowed, what):
    bad = [v for v in vals if v not in allowed]
    if bad:
        raise BenchUsageError(f"unknown {what} {', '.join(bad)} (choose from {', '.join(allowed)})")
    if not vals:
        raise BenchUsageError(f"empty {what} list")
    return vals


# ------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------

class Timer:
    QUEUE_TRIES = 3  # GPU: times the reps are queued behind a sleep before the timing is taken as it is

    def __init__(self, device, reps, warmup, cpu_seconds):
        self.device = device
        self.reps = reps
        self.warmup = warmup
        self.cpu_seconds = cpu_seconds
        self.cycles_per_ms = None
        self.last_queue_tries = 1
        if device.type == "cuda" and hasattr(torch.cuda, "_sleep"):
            self.cycles_per_ms = self._calibrate_sleep()

    @staticmethod
    def _calibrate_sleep():
        try:
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1000)
            s.record()
            torch.cuda._sleep(2_000_000)
            e.record()
            torch.cuda.synchronize()
            ms = s.elapsed_time(e)
            return 2_000_000 / ms if ms > 0 else None
        except Exception:
            return None

    def __call__(self, fn, nsets):
        """fn(i) runs one repetition on input set i. Returns (median_us, min_us, reps, host_us).

        host_us (GPU only): host time to issue one call (CPU launch overhead), else None."""
        if self.device.type == "cuda":
            return self._cuda(fn, nsets)
        return self.cpu_interleaved({"fn": fn}, nsets)["fn"]

    def _cuda(self, fn, nsets):
        # With several input sets, the outputs of the last nsets calls stay alive, so every call also writes
        # to memory that isn't in cache (the allocator would otherwise hand back the block just freed).
        keep = collections.deque(maxlen=nsets if nsets > 1 else 0)
        # Warm up until the kept outputs fill their slots, so that from here on every call's outputs reuse
        # blocks the caching allocator already holds (a first allocation calls cudaMalloc, which costs the
        # host far more than issuing the kernels and would be counted as launch time below).
        for j in range(max(self.warmup, nsets + 1)):
            keep.append(fn(j % nsets))
        torch.cuda.synchronize()
        # Host time to issue one call: the median of a few calls, each timed alone (they queue on the GPU).
        host_s = []
        for j in range(5):
            t0 = time.perf_counter()
            out = fn(j % nsets)
            host_s.append(time.perf_counter() - t0)
            keep.append(out)
            out = None
        cpu_per_call = statistics.median(host_s)
        torch.cuda.synchronize()
        reps = self.reps
        # The sleep must outlast the queueing: where it ends first, the GPU waits for the host between calls
        # and the events time the host (a stall of the host while queueing made medians of 219 and 333 us
        # out of 37 and 206 us cases, their minima unchanged, in an H100 run). So an event recorded after the
        # sleep is asked, once every call is queued, whether it has passed; if it has, the calls are queued
        # again behind a sleep four times as long, at most QUEUE_TRIES times in all. last_queue_tries says
        # how many it took (QUEUE_TRIES + 1: the last try was outrun too).
        sleep_ms = min(200.0, reps * cpu_per_call * 1e3 * 1.5 + 0.05)
        for attempt in range(self.QUEUE_TRIES):
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            held = None
            if self.cycles_per_ms:
                torch.cuda._sleep(int(sleep_ms * self.cycles_per_ms))
                held = torch.cuda.Event()
                held.record()
            for r in range(reps):
                starts[r].record()
                keep.append(fn((attempt * reps + r) % nsets))  # a try goes on rotating from where the last one left
                ends[r].record()
            outran = held is not None and held.query()
            torch.cuda.synchronize()
            ts = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
            if not outran:
                break
            sleep_ms = min(1000.0, sleep_ms * 4)
        self.last_queue_tries = attempt + 1 + outran  # outran still: every try was outrun
        keep.clear()
        return statistics.median(ts), min(ts), reps, cpu_per_call * 1e6

    def cpu_interleaved(self, fns, nsets):
        """CPU: times several implementations of one case in alternation, one call each per round (the
        starting one rotating), so that a shared machine's load drifts over all of them alike.
        fns: {name: fn}. Returns {name: (median_us, min_us, reps, None)}."""
        names = list(fns)
        keep = {k: collections.deque(maxlen=nsets if nsets > 1 else 0) for k in names}
        calls = 0  # every call takes the next input set, so no call finds its input in cache from the last one
        for k in names:
            for j in range(self.warmup):
                keep[k].append(fns[k](calls % nsets))
                calls += 1
        ts = {k: [] for k in names}
        t_end = time.perf_counter() + self.cpu_seconds * len(names)
        r = 0
        while True:
            for k in names[r % len(names):] + names[:r % len(names)]:
                i = calls % nsets
                calls += 1
                t0 = time.perf_counter()
                out = fns[k](i)
                t1 = time.perf_counter()
                keep[k].append(out)
                out = None
                ts[k].append((t1 - t0) * 1e6)
            r += 1
            if self.reps is not None:
                if r >= self.reps:
                    break
            elif (r >= 5 and time.perf_counter() >= t_end) or r >= 200:
                break
        for d in keep.values():
            d.clear()
        return {k: (statistics.median(v), min(v), len(v), None) for k, v in ts.items()}


def measure_copy_bandwidth(device, nbytes):
    """bytes read + written per second of a device-to-device copy (GB/s, 1e9)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)  # float: uint8 copies are slower on CPU
    src.fill_(1)
    dst = torch.empty_like(src)
    ts = []
    if device.type == "cuda":
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize()
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dst.copy_(src)
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e) * 1e-3)
    else:
        dst.copy_(src)
        for _ in range(7):
            t0 = time.perf_counter()
            dst.copy_(src)
            ts.append(time.perf_counter() - t0)
    # GPU: median; CPU (often shared, noisy): the best run
    t = statistics.median(ts) if device.type == "cuda" else min(ts)
    del src, dst
    return 2 * nbytes / t / 1e9


# ------------------------------------------------------------------------------------------------------
# implementations
# ------------------------------------------------------------------------------------------------------

def _nocudnn():
    return torch.backends.cudnn.flags(enabled=False)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _native_bn(x, rm, rv, w, b, training):
    return F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)


def _make_compiled(training):
    def bn_fn(x, rm, rv, w, b):
        return F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)
    return torch.compile(bn_fn, dynamic=False)


class Combo:
    """Data for one (shape, dtype, layout): rotating input sets, dy, params."""

    def __init__(self, shape, dtype, layout, device, nsets):
        self.shape, self.dtype, self.layout, self.device = shape, dtype, layout, device
        C = shape[1]
        mf = torch.contiguous_format
        if layout == "nhwc":
            mf = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        self.mf = mf
        pdt = torch.float64 if dtype == torch.float64 else torch.float32
        g = torch.Generator(device="cpu").manual_seed(0)
        self.w0 = (torch.rand(C, generator=g, dtype=pdt) + 0.5).to(device)
        self.b0 = torch.randn(C, generator=g, dtype=pdt).to(device)
        self.rm0 = (torch.randn(C, generator=g, dtype=pdt) * 0.1).to(device)
        self.rv0 = (torch.rand(C, generator=g, dtype=pdt) + 0.5).to(device)
        self.nsets = nsets
        self.xs, self.dys = [], []
        for i in range(nsets):
            self.xs.append(self._rand(i * 2 + 1))
            self.dys.append(self._rand(i * 2 + 2))

    def _rand(self, seed):
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
            t = torch.empty(self.shape, dtype=self.dtype, device=self.device, memory_format=self.mf)
            return t.normal_()
        torch.manual_seed(seed)
        return torch.randn(self.shape, dtype=self.dtype).to(memory_format=self.mf)


def build_fn(impl, pass_name, combo, compiled, bnxF):
    """Returns (fn(i) -> outputs, keepalive). Setup work (saved graphs for backward-only passes) is done here."""
    k = combo.nsets
    w_rg = pass_name not in ("eval_fwd", "frozen_bwd_dx")
    x_rg = pass_name != "eval_fwd"
    X = [x.detach().requires_grad_(x_rg) for x in combo.xs]
    DY = combo.dys
    W = combo.w0.clone().requires_grad_(w_rg)
    B = combo.b0.clone().requires_grad_(w_rg)
    rm, rv = combo.rm0.clone(), combo.rv0.clone()
    ctx = _nocudnn if impl == "native_nocudnn" else _Null

    if impl == "bnx":
        backward = "frozen" if pass_name == "bnx_train_frozen" else None

        def bn(x, training):
            return bnxF.batch_norm(x, rm, rv, W, B, training, MOMENTUM, EPS, backward=backward)
    elif impl == "compile":
        cf = compiled

        def bn(x, training):
            return cf(x, rm, rv, W, B)
    else:
        def bn(x, training):
            return _native_bn(x, rm, rv, W, B, training)

    wrt = lambda i: (X[i], W, B) if w_rg else (X[i],)  # noqa: E731

    if pass_name == "train_fwd":
        def fn(i):
            with ctx():
                return bn(X[i], True)
    elif pass_name in ("train_fwd_bwd", "bnx_train_frozen"):
        def fn(i):
            with ctx():
                y = bn(X[i], True)
                return torch.autograd.grad(y, wrt(i), DY[i])
    elif pass_name == "eval_fwd":
        def fn(i):
            with ctx(), torch.no_grad():
                return bn(X[i], False)
    elif pass_name in ("train_bwd", "frozen_bwd_wgrad", "frozen_bwd_dx"):
        training = pass_name == "train_bwd"
        with ctx():
            Y = [bn(X[i], training) for i in range(k)]

        def fn(i):
            with ctx():
                return torch.autograd.grad(Y[i], wrt(i), DY[i], retain_graph=True)
    else:
        raise ValueError(pass_name)
    return fn


def _is_oom(e):
    return isinstance(e, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(e).lower()


def _short(e):
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:160]


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _outputs_list(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [o for o in out if isinstance(o, torch.Tensor)]


def _max_rel_diff(a, b):
    worst = 0.0
    for u, v in zip(_outputs_list(a), _outputs_list(b)):
        d = (u.detach().float() - v.detach().float()).abs().max().item()
        s = max(v.detach().float().abs().max().item(), 1e-30)
        worst = max(worst, d / s)
    return worst


# ------------------------------------------------------------------------------------------------------
# main loop
# ------------------------------------------------------------------------------------------------------

def _nsets(shape, dtype, device):
    e = math.prod(shape)
    b = torch.empty((), dtype=dtype).element_size()
    per_set = 2 * e * b  # x + y (or dy) at least
    if per_set >= L2_GUARD_BYTES:
        return 1
    return min(MAX_SETS, math.ceil(L2_GUARD_BYTES / per_set) + 1)


def _env(device, args_threads):
    info = dict(device_type=device.type, torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=(torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None),
                python=platform.python_version(), host=platform.node(), threads=torch.get_num_threads())
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device_name=p.name, sm_count=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
    else:
        info.update(device_name=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
    # bnx's switches (BNX_CUDA_PLANE_GROUPS, BNX_CUDA_L2_GROUPS, ...): results mean little without them
    info["bnx_settings"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("BNX_")}
    try:
        import bnx
        info["bnx"] = getattr(bnx, "__version__", None)
        info["bnx_cpu_kernels"] = bnx.cpu_kernels()
    except Exception:
        pass
    return info


def geomean(vals):
    vals = [v for v in vals if v is not None and v > 0 and math.isfinite(v)]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def summarize(cases):
    sel = [c for c in cases if c["shape_name"] in RESNET]
    scope = "ResNet-50 shapes"
    if not sel:
        sel, scope = cases, "all shapes"
    rows = []
    keys = []
    for c in sel:
        k = (c["pass"], c["dtype"])
        if k not in keys:
            keys.append(k)
    for p, d in keys:
        cs = [c for c in sel if c["pass"] == p and c["dtype"] == d]
        rows.append(dict(
            pass_=p, dtype=d, n=sum(1 for c in cs if c["times_us"].get("bnx")),
            geomean_frac_bnx=geomean([c["frac"].get("bnx") for c in cs]),
            geomean_frac_best_peer=geomean([c["frac"].get(c["best_peer"]) if c["best_peer"] else None for c in cs]),
            geomean_speedup_vs_native=geomean([c["speedup"].get("native") for c in cs]),
            geomean_speedup_vs_best_peer=geomean([c["speedup"].get("best_peer") for c in cs]),
        ))
    ok = [c for c in cases if c["frac"].get("bnx")]
    mn = min(ok, key=lambda c: c["frac"]["bnx"]) if ok else None
    return dict(scope=scope, rows=rows,
                min_frac_bnx=(mn["frac"]["bnx"] if mn else None),
                min_frac_case=(case_label(mn) if mn else None),
                geomean_frac_bnx_all=geomean([c["frac"].get("bnx") for c in cases]),
                geomean_speedup_vs_best_peer_all=geomean([c["speedup"].get("best_peer") for c in cases]))


def case_label(c):
    return f"{c['pass']} {c['dtype']} {c['layout']} {','.join(map(str, c['shape']))}"


def _f(v, fmt):
    return "n/a" if v is None else format(v, fmt)


class _NoCuda(RuntimeError):
    """--device cuda without CUDA (the CLI prints it as one line, exit 1)."""


def run(args):
    """Run the benchmark from parsed args (or, with --from-progress, rebuild its results). Returns an exit code.

    Raises BenchUsageError (bad option value) or _NoCuda; the CLI turns them into one-line errors."""
    if getattr(args, "from_progress", None):
        return _rebuild(args)
    return _run(args)


def _select_cases(args, device_type, quick):
    """(passes, combos): the passes in run order and the (shape name, shape, dtype, layout) combinations,
    in the order the benchmark runs them (each combination runs every pass)."""
    is_cuda = device_type == "cuda"
    shapes = parse_shapes(args.shapes, device_type, quick)
    dtypes = _check_list(_split(args.dtype or ("bf16,fp32" if is_cuda else "fp32")), list(DTYPES), "dtype")
    layouts = _check_list(_split(args.layout), LAYOUTS, "layout")
    passes = _check_list(_split(args.passes) if args.passes else list(PASSES), PASSES, "pass")
    passes = [p for p in PASSES if p in passes]
    # the case list (nhwc needs rank 4 or 5)
    combos = []
    for sname, shape in shapes:
        for d in dtypes:
            for lay in layouts:
                if lay == "nhwc" and len(shape) not in (4, 5):
                    continue
                combos.append((sname, shape, d, lay))
    if not combos:
        raise BenchUsageError("no cases selected (nhwc needs 4-D or 5-D shapes)")
    return passes, combos


def _new_case(pname, dname, lay, shape, sname, nsets):
    E = math.prod(shape)
    bpe = torch.empty((), dtype=DTYPES[dname]).element_size()
    return {"pass": pname, "dtype": dname, "layout": lay, "shape": list(shape), "shape_name": sname,
            "elements": E, "bytes_per_element": bpe, "compulsory_bytes": BYTES_FACTOR[pname] * E * bpe,
            "input_sets": nsets, "times_us": {}, "min_us": {}, "reps": {}, "host_us": {}, "queue_tries": {},
            "errors": {}, "speedup": {}, "frac": {}, "best_peer": None, "max_rel_diff_vs_native": None}


def _gbps_text(v):
    return f"{v:.0f}" if v >= 1000 else f"{v:.4g}"


def _timing_text(is_cuda, reps, warmup, cpu_seconds):
    if is_cuda:
        return ("CUDA events, median of %d after %d warm-up (GPU held by torch.cuda._sleep while queueing; "
                "queued again behind a longer sleep, up to %d times, where the sleep ended first)"
                % (reps, warmup, Timer.QUEUE_TRIES - 1))
    return ("time.perf_counter, the implementations called in alternation (one call each per round), median "
            "of as many rounds as fit (%s)" % ("%d rounds" % reps if reps else "%.2f s per implementation" % cpu_seconds))


def _atomic_write(path, text):
    """Write text to path through a temporary file in the same folder and os.replace, so a reader (or a run
    killed while writing) never sees a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_reports(result, args, out=None, with_plot=True):
    """--json and --md (atomically), and --plot when with_plot; prints 'wrote FILE' to out when given."""
    if args.json:
        _atomic_write(args.json, json.dumps(result, indent=1, default=str))
        if out:
            print(f"wrote {args.json}", file=out)
    if args.md:
        _atomic_write(args.md, markdown(result))
        if out:
            print(f"wrote {args.md}", file=out)
    if args.plot and with_plot:
        plot(result, args.plot)
        if out:
            print(f"wrote {args.plot}", file=out)


def _run(args):
    from .__main__ import default_device

    dev_name = args.device or default_device()
    if dev_name == "cuda" and not torch.cuda.is_available():
        raise _NoCuda(f"--device cuda requested but CUDA is not available "
                      f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
    device = torch.device(dev_name)
    is_cuda = device.type == "cuda"
    quick = args.quick

    passes, combos = _select_cases(args, device.type, quick)
    total = len(combos) * len(passes)
    peers = _check_list(_split(args.peers) if args.peers else (PEERS_GPU if is_cuda else PEERS_CPU),
                        ["native", "native_nocudnn", "compile"], "peer")
    if not is_cuda:
        peers = [p for p in peers if p != "native_nocudnn"]  # cuDNN is GPU only
    cpasses = _check_list(_split(args.compile_passes), PASSES, "pass") if args.compile_passes else (
        TRAIN_PASSES if quick else list(PASSES))
    budget = args.compile_budget if args.compile_budget is not None else (60.0 if quick else 200.0)
    if args.reps is not None and args.reps < 1:
        raise BenchUsageError("--reps must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise BenchUsageError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    elif not is_cuda:
        torch.set_num_threads(2)

    from . import functional as bnxF

    reps = args.reps if args.reps is not None else ((10 if quick else 20) if is_cuda else None)
    warmup = args.warmup if args.warmup is not None else (3 if is_cuda else 2)
    timer = Timer(device, reps, warmup, 0.08 if quick else 0.25)
    impls = ["bnx"] + peers

    if is_cuda:
        torch.backends.cudnn.benchmark = False
    if "compile" in impls:
        try:
            import torch._dynamo as dynamo
            for name in ("cache_size_limit", "recompile_limit"):
                if hasattr(dynamo.config, name):
                    setattr(dynamo.config, name, 64)
        except Exception:
            pass
        try:  # backward-only passes call the compiled backward repeatedly (retain_graph=True)
            import torch._functorch.config as functorch_config
            if hasattr(functorch_config, "donated_buffer"):
                functorch_config.donated_buffer = False
        except Exception:
            pass

    env = _env(device, args.threads)
    copy_bytes = (1 << 30) if is_cuda else (256 << 20)
    log = lambda s: (sys.stderr.write(s), sys.stderr.flush())  # noqa: E731
    log(f"bnx bench: {env['device_name']} ({device.type}), torch {env['torch']}, {total} cases, "
        f"impls {', '.join(impls)}{' (quick)' if quick else ''}\n")
    log(f"bnx settings: {_settings_text(env)}\n")
    copy_gbps = measure_copy_bandwidth(device, copy_bytes)
    log(f"copy bandwidth: {_gbps_text(copy_gbps)} GB/s (device-to-device copy of {copy_bytes >> 20} MiB, "
        "read + write)\n")
    meta = dict(tool="bnx bench", command=_command_line(args), argv=sys.argv, env=env, copy_gbps=copy_gbps,
                copy_bytes=copy_bytes, timing=_timing_text(is_cuda, reps, warmup, timer.cpu_seconds), quick=quick,
                impls=impls, passes=passes, pass_text={p: PASS_TEXT[p] for p in passes},
                bytes_factor={p: BYTES_FACTOR[p] for p in passes})

    t_start = time.perf_counter()
    compile_spent = 0.0
    compile_exhausted = False
    compile_times = {}  # group -> [seconds]
    compile_failures = 0
    train_needed = any(COMPILE_GROUP[p] == "train" for p in passes if p in cpasses)
    cases = []
    n = 0
    bnx_errors = 0
    for ci, (sname, shape, dname, lay) in enumerate(combos):
        dtype = DTYPES[dname]
        nsets = _nsets(shape, dtype, device)
        combo = None
        combo_err = None
        try:
            combo = Combo(shape, dtype, lay, device, nsets)
        except Exception as e:  # typically OOM
            combo_err = "OOM" if _is_oom(e) else _short(e)
            _free(device)
        compiled = {}
        compile_err = {}
        compile_secs = {}
        fwdbwd_peer = {}  # train_fwd_bwd peer timings, reused by bnx_train_frozen
        if "compile" in impls:
            try:
                torch._dynamo.reset()
            except Exception:
                pass
        for pname in passes:
            n += 1
            prefix = f"[{n}/{total}] {pname} {dname} {lay} {','.join(map(str, shape))}"
            log(prefix + " ...")
            case = _new_case(pname, dname, lay, shape, sname, nsets)
            outs = {}
            cpu_fns = {}

            def record(impl, fn, timing):
                med, mn, r, host = timing
                case["times_us"][impl], case["min_us"][impl], case["reps"][impl] = med, mn, r
                case["host_us"][impl] = host
                if is_cuda and timer.last_queue_tries > 1:  # the first queue outran its sleep (Timer._cuda)
                    case["queue_tries"][impl] = timer.last_queue_tries
                if pname == "train_fwd_bwd" and impl != "bnx":
                    fwdbwd_peer[impl] = timing
                if not args.no_verify and impl in ("bnx", "native") and pname != "bnx_train_frozen":
                    outs[impl] = fn(0)

            for impl in impls:
                if combo is None:
                    case["errors"][impl] = combo_err
                    continue
                if impl == "compile" and pname not in cpasses:
                    case["errors"][impl] = "not run (--compile-passes)"
                    continue
                if pname == "bnx_train_frozen" and impl != "bnx" and impl in fwdbwd_peer:
                    t = fwdbwd_peer[impl]
                    (case["times_us"][impl], case["min_us"][impl], case["reps"][impl],
                     case["host_us"][impl]) = t
                    continue
                fn = None
                try:
                    cf = None
                    if impl == "compile":
                        grp = COMPILE_GROUP[pname]
                        if compile_failures >= 2:
                            compile_err[grp] = "n/a (torch.compile disabled after 2 failures)"
                        if grp in compile_err:
                            raise RuntimeError(compile_err[grp])
                        if grp not in compiled:
                            # the training group (the main comparison) gets the budget first: other groups
                            # compile only while the training compiles still to come would fit
                            est_train = statistics.mean(compile_times.get("train") or [8.0])
                            rem_train = 0
                            if grp != "train" and train_needed:
                                rem_train = len(combos) - ci - 1
                            est_this = 0.0 if grp == "train" else statistics.mean(
                                compile_times.get(grp) or [0.6 * est_train])
                            if compile_spent + rem_train * est_train + est_this > budget:
                                compile_exhausted = True
                                compile_err[grp] = ("n/a (compile budget exhausted)" if rem_train == 0 else
                                                    "n/a (compile budget kept for the training passes)")
                                raise RuntimeError(compile_err[grp])
                            log(" (compiling)")
                            t0 = time.perf_counter()
                            try:
                                cfn = _make_compiled(grp == "train")
                                _warm_compiled(cfn, grp, combo, device)
                                compiled[grp] = cfn
                            except Exception as e:
                                compile_err[grp] = "OOM" if _is_oom(e) else "compile failed: " + _short(e)
                                if not _is_oom(e):
                                    compile_failures += 1
                                raise RuntimeError(compile_err[grp])
                            finally:
                                dt_c = time.perf_counter() - t0
                                compile_spent += dt_c
                                compile_secs[grp] = dt_c
                                compile_times.setdefault(grp, []).append(dt_c)
                        cf = compiled[grp]
                    fn = build_fn(impl, pname, combo, cf, bnxF)
                    if not is_cuda:  # timed below, in alternation with the other implementations
                        cpu_fns[impl] = fn
                        continue
                    record(impl, fn, timer(fn, nsets))
                except Exception as e:
                    msg = e.args[0] if isinstance(e, RuntimeError) and e.args and str(e.args[0]).startswith(
                        ("n/a", "compile failed", "OOM")) else ("OOM" if _is_oom(e) else _short(e))
                    case["errors"][impl] = msg
                    if impl == "bnx" and msg != "OOM":
                        bnx_errors += 1
                        if os.environ.get("BNX_DEBUG"):
                            raise
                finally:
                    fn = None
                    if is_cuda:
                        _free(device)
            if cpu_fns:
                try:
                    for impl, timing in timer.cpu_interleaved(cpu_fns, nsets).items():
                        record(impl, cpu_fns[impl], timing)
                except Exception as e:
                    for impl in cpu_fns:
                        case["errors"].setdefault(impl, _short(e))
                    if "bnx" in cpu_fns:
                        bnx_errors += 1
                        if os.environ.get("BNX_DEBUG"):
                            raise
                cpu_fns = None
            if "bnx" in outs and "native" in outs:
                try:
                    case["max_rel_diff_vs_native"] = _max_rel_diff(outs["bnx"], outs["native"])
                except Exception:
                    pass
            outs = None
            if "compile" in impls and COMPILE_GROUP[pname] in compile_secs:
                case["compile_seconds"] = compile_secs[COMPILE_GROUP[pname]]
            _finish_case(case, impls, copy_gbps)
            cases.append(case)
            log(" " + _progress_tail(case, impls) + "\n")
            if n < total:  # results so far, so a run cut short still leaves them (the last case: below)
                partial = dict(meta, compile_seconds_total=compile_spent, compile_budget_exhausted=compile_exhausted,
                               elapsed_seconds=time.perf_counter() - t_start, cases=cases, summary=summarize(cases),
                               partial=dict(cases_done=len(cases), cases_total=total))
                _write_reports(partial, args, with_plot=False)
        combo = None
        compiled = None
        if "compile" in impls:
            try:
                torch._dynamo.reset()
            except Exception:
                pass
        _free(device)

    elapsed = time.perf_counter() - t_start
    result = dict(meta, compile_seconds_total=compile_spent, compile_budget_exhausted=compile_exhausted,
                  elapsed_seconds=elapsed, cases=cases, summary=summarize(cases))

    out = sys.stdout
    print_summary(result, out)
    _write_reports(result, args, out)
    n_ok = sum(1 for c in cases if c["times_us"].get("bnx"))
    if n_ok == 0 or bnx_errors:
        print(f"bnx failed in {bnx_errors} case(s); {n_ok}/{len(cases)} cases measured", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------------
# --from-progress: rebuild the results from a progress log
# ------------------------------------------------------------------------------------------------------

_HEAD_RE = re.compile(r"^bnx bench: (.*) \((cuda|cpu)\), torch (\S+), (\d+) cases, impls (.*?)( \(quick\))?\s*$")
_COPY_RE = re.compile(r"^copy bandwidth: ([0-9.eE+]+) GB/s \(device-to-device copy of (\d+) MiB")
_CASE_RE = re.compile(r"^\[(\d+)/(\d+)\] (\S+) (\S+) (\S+) (\S+) \.\.\.(.*)$")
_TAIL_RE = re.compile(r"(?:^|\s)(bnx (?:[0-9.]+us|n/a)(?: |$).*)$")
_TIME_RE = re.compile(r"^([0-9.]+)us(?: \(([0-9.]+)x\))?$")
_NA_RE = re.compile(r"^n/a(?: \[(.*)\])?$")
ABSENT = "absent (not in the progress log)"


def _tail_parts(tail):
    """A progress line's tail split at ' | ', with pieces that start with no known label (an error message
    that contained ' | ') put back together."""
    labels = tuple(t + " " for t in IMPL_TEXT.values()) + ("frac ", "MISMATCH ")
    parts = []
    for piece in tail.strip().split(" | "):
        if parts and not piece.startswith(labels):
            parts[-1] += " | " + piece
        else:
            parts.append(piece)
    return parts


def parse_progress_line(tail, impls):
    """The fields of one case's progress tail (after 'PREFIX ...' and ' (compiling)'): dict with times_us,
    speedup (as printed), errors, frac (bnx, as printed), host_us (bnx), max_rel_diff."""
    rec = dict(times_us={}, speedup={}, errors={}, frac=None, host_us=None, max_rel_diff=None)
    by_text = {IMPL_TEXT[i]: i for i in impls}
    for part in _tail_parts(tail):
        if part.startswith("bnx host "):
            m = re.match(r"bnx host ([0-9.]+)us", part)
            if m:
                rec["host_us"] = float(m.group(1))
            continue
        if part.startswith("frac "):
            v = part[5:].strip()
            rec["frac"] = None if v == "n/a" else float(v)
            continue
        if part.startswith("MISMATCH vs native: max rel diff "):
            rec["max_rel_diff"] = float(part.rsplit(" ", 1)[1])
            continue
        label, _, rest = part.partition(" ")
        impl = by_text.get(label)
        if impl is None:
            continue
        m = _TIME_RE.match(rest)
        if m:
            rec["times_us"][impl] = float(m.group(1))
            if m.group(2):
                rec["speedup"][impl] = float(m.group(2))
            continue
        m = _NA_RE.match(rest)
        if m:
            # without a bracket the case printed 'n/a' alone: a peer not run (--compile-passes)
            rec["errors"][impl] = m.group(1) if m.group(1) is not None else "not run (--compile-passes)"
    return rec


def read_progress_log(path):
    """Parse a progress log: (header dict, {case number: (prefix fields, tail, compiling)}).

    Lines of other output (warnings) are skipped; a case whose tail was pushed to a later line by such output
    is joined back to it. A case line without a tail (the run stopped during it) is left out."""
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()
    head, found, pending = {}, {}, None
    for ln in lines:
        m = _HEAD_RE.match(ln)
        if m and "device_name" not in head:
            head.update(device_name=m.group(1), device_type=m.group(2), torch=m.group(3), total=int(m.group(4)),
                        impls=[t.strip() for t in m.group(5).split(",") if t.strip()], quick=bool(m.group(6)))
            continue
        if ln.startswith("bnx settings: ") and "bnx_settings" not in head:
            text = ln[len("bnx settings: "):].strip()
            head["bnx_settings"] = ({} if text == "none (defaults)" else
                                    dict(kv.split("=", 1) for kv in text.split(", ") if "=" in kv))
            continue
        m = _COPY_RE.match(ln)
        if m and "copy_gbps" not in head:
            head.update(copy_gbps=float(m.group(1)), copy_bytes=int(m.group(2)) << 20)
            continue
        m = _CASE_RE.match(ln)
        if m:
            pending = None
            num, total, pname, dname, lay, shape_s, rest = m.groups()
            key = (int(num), int(total), pname, dname, lay, shape_s)
            compiling = "(compiling)" in rest
            t = _TAIL_RE.search(rest)
            if t:
                found[int(num)] = (key, t.group(1), compiling)
            else:
                pending = (key, compiling)
            continue
        if pending is not None:
            t = _TAIL_RE.search(ln)
            if t and " | frac " in t.group(1):
                found[pending[0][0]] = (pending[0], t.group(1), pending[1])
                pending = None
    return head, found


def _rebuild(args):
    path = args.from_progress
    try:
        head, found = read_progress_log(path)
    except OSError as e:
        raise BenchUsageError(f"--from-progress: can't read {path}: {e.strerror or e}")
    if "device_type" not in head or "copy_gbps" not in head:
        raise BenchUsageError(f"--from-progress: {path} has no 'bnx bench: ...' and 'copy bandwidth: ...' header "
                              "lines (is it the stderr of python -m bnx bench?)")
    bad = [i for i in head["impls"] if i not in IMPLS]
    if bad or not head["impls"] or head["impls"][0] != "bnx":
        raise BenchUsageError(f"--from-progress: {path}: unexpected impls {', '.join(head['impls'])}")
    dev_type = head["device_type"]
    is_cuda = dev_type == "cuda"
    if args.device and args.device != dev_type:
        raise BenchUsageError(f"--from-progress: the log is of a {dev_type} run, not --device {args.device}")
    quick = head["quick"] or args.quick
    impls = head["impls"]
    passes, combos = _select_cases(args, dev_type, quick)
    total = len(combos) * len(passes)
    if total != head["total"]:
        raise BenchUsageError(
            f"--from-progress: the log's run had {head['total']} cases, these options select {total}: pass the "
            "--shapes/--dtype/--layout/--passes/--quick it was run with")
    copy_gbps = head["copy_gbps"]
    cases, missing, n = [], [], 0
    mismatches = []
    for sname, shape, dname, lay in combos:
        nsets = _nsets(shape, DTYPES[dname], torch.device("cpu"))
        for pname in passes:
            n += 1
            case = _new_case(pname, dname, lay, shape, sname, nsets)
            got = found.get(n)
            if got is not None:
                key = got[0]
                if key[2:] != (pname, dname, lay, ",".join(map(str, shape))):
                    raise BenchUsageError(
                        f"--from-progress: case {n} of the log is {' '.join(key[2:])}, these options expect "
                        f"{case_label(case)}: pass the --shapes/--dtype/--layout/--passes it was run with")
                rec = parse_progress_line(got[1], impls)
                case["times_us"] = rec["times_us"]
                case["errors"] = {i: rec["errors"].get(i, ABSENT) for i in impls if i not in rec["times_us"]}
                if rec["host_us"] is not None:
                    case["host_us"]["bnx"] = rec["host_us"]
                case["max_rel_diff_vs_native"] = rec["max_rel_diff"]
                _finish_case(case, impls, copy_gbps)
                # the printed values must agree with the ones recomputed from the printed times
                tb = case["times_us"].get("bnx")
                for i, sp in rec["speedup"].items():
                    ti = case["times_us"][i]
                    tol = 0.0051 + sp * (0.05 / tb + 0.05 / ti)
                    if abs(case["speedup"].get(i, 0) - sp) > tol:
                        mismatches.append(f"{case_label(case)} {i} speedup {sp} vs {case['speedup'].get(i)}")
                fb = case["frac"].get("bnx")
                if rec["frac"] is not None and fb is not None:
                    tol = 0.0051 + fb * (0.05 / tb + 0.5 / copy_gbps)
                    if abs(fb - rec["frac"]) > tol:
                        mismatches.append(f"{case_label(case)} frac {rec['frac']} vs {fb:.4f}")
            else:
                case["errors"] = {i: ABSENT for i in impls}
                missing.append(n)
            cases.append(case)
    if mismatches:
        sys.stderr.write(f"--from-progress: {len(mismatches)} printed value(s) disagree with the ones recomputed "
                         "from the printed times (kept the recomputed): " + "; ".join(mismatches[:5]) + "\n")
    env = dict(device_type=dev_type, torch=head["torch"], cuda=None, cudnn=None, python=None, host=None,
               threads=None, device_name=head["device_name"], bnx_settings=head.get("bnx_settings"))
    reps = args.reps if args.reps is not None else ((10 if quick else 20) if is_cuda else None)
    warmup = args.warmup if args.warmup is not None else (3 if is_cuda else 2)
    timing = _timing_text(is_cuda, reps, warmup, 0.08 if quick else 0.25) + \
        " [as these options set it; the progress log doesn't record it]"
    compile_exhausted = any("budget" in e for c in cases for e in c["errors"].values())
    result = dict(tool="bnx bench", command=_command_line(args), argv=sys.argv, env=env, copy_gbps=copy_gbps,
                  copy_bytes=head["copy_bytes"], timing=timing, quick=quick, impls=impls, passes=passes,
                  pass_text={p: PASS_TEXT[p] for p in passes}, bytes_factor={p: BYTES_FACTOR[p] for p in passes},
                  compile_seconds_total=None, compile_budget_exhausted=compile_exhausted, elapsed_seconds=None,
                  cases=cases, summary=summarize(cases),
                  from_progress=dict(log=path, log_abspath=os.path.abspath(path), cases_found=total - len(missing),
                                     cases_total=total, missing=[case_label(cases[k - 1]) for k in missing],
                                     missing_numbers=missing,
                                     not_in_log="min_us, reps, compile_seconds, host_us of the peers, "
                                                "max_rel_diff_vs_native (unless it was flagged), the env "
                                                "beyond device name and torch version, elapsed time"))
    out = sys.stdout
    print_summary(result, out)
    _write_reports(result, args, out)
    return 0 if any(c["times_us"].get("bnx") for c in cases) else 1


def _command_line(args):
    import shlex
    argv = getattr(args, "cli_argv", None)
    if argv is not None:
        return shlex.join(["python", "-m", "bnx"] + list(argv))
    return shlex.join(["python"] + sys.argv)


def _warm_compiled(cfn, grp, combo, device):
    """First call(s) of a compiled function: compiles forward (and backward)."""
    x = combo.xs[0].detach()
    rm, rv = combo.rm0.clone(), combo.rv0.clone()
    if grp == "infer":
        with torch.no_grad():
            cfn(x, rm, rv, combo.w0, combo.b0)
    else:
        wg = grp != "eval_dx"
        x = x.requires_grad_(True)
        w = combo.w0.clone().requires_grad_(wg)
        b = combo.b0.clone().requires_grad_(wg)
        y = cfn(x, rm, rv, w, b)
        torch.autograd.grad(y, (x, w, b) if wg else (x,), combo.dys[0])
    if device.type == "cuda":
        torch.cuda.synchronize()


def _finish_case(case, impls, copy_gbps):
    t = case["times_us"]
    tb = t.get("bnx")
    peers = [i for i in impls if i != "bnx" and t.get(i)]
    if peers:
        case["best_peer"] = min(peers, key=lambda i: t[i])
    for i in impls:
        if t.get(i):
            case["frac"][i] = case["compulsory_bytes"] / (t[i] * 1e-6) / (copy_gbps * 1e9)
    if tb:
        for i in peers:
            case["speedup"][i] = t[i] / tb
        if case["best_peer"]:
            case["speedup"]["best_peer"] = t[case["best_peer"]] / tb


def _progress_tail(case, impls):
    t = case["times_us"]
    parts = []
    for i in impls:
        if t.get(i):
            s = f"{IMPL_TEXT[i]} {t[i]:.1f}us"
            if i != "bnx" and case["speedup"].get(i):
                s += f" ({case['speedup'][i]:.2f}x)"
            parts.append(s)
        else:
            err = case["errors"].get(i, "n/a")
            parts.append(f"{IMPL_TEXT[i]} n/a" + ("" if err.startswith("not run") else f" [{err}]"))
    fb = case["frac"].get("bnx")
    parts.append(f"frac {fb:.2f}" if fb else "frac n/a")
    hb = case["host_us"].get("bnx")
    if hb is not None and t.get("bnx"):
        parts.append(f"bnx host {hb:.0f}us" + (" (HOST-BOUND)" if hb > t["bnx"] else ""))
    q = case.get("queue_tries") or {}
    if q:  # Timer._cuda: the first queue outran its sleep; QUEUE_TRIES + 1: so did the last
        parts.append("queued again: " + ", ".join(
            f"{IMPL_TEXT[i]} {min(n, Timer.QUEUE_TRIES)} tries" + (" (ALL OUTRAN THE SLEEP)" if n > Timer.QUEUE_TRIES else "")
            for i, n in q.items()))
    d = case.get("max_rel_diff_vs_native")
    if d is not None and d > (5e-2 if case["dtype"] in ("bf16", "fp16") else 1e-3):
        parts.append(f"MISMATCH vs native: max rel diff {d:.1e}")
    return " | ".join(parts)


# ------------------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------------------

def _settings_text(env):
    settings = env.get("bnx_settings")
    if settings is None:
        return "n/a"
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "none (defaults)"


def _header_lines(res):
    e = res["env"]
    v = lambda k: "n/a" if e.get(k) is None else e.get(k)  # noqa: E731
    lines = [
        f"device: {e.get('device_name')} ({e['device_type']}"
        + (f", {e.get('sm_count')} SMs" if e.get("sm_count") else "") + ")",
        f"torch {e['torch']}, CUDA {v('cuda')}, cuDNN {v('cudnn')}, bnx {v('bnx')}, threads {v('threads')}"
        + (f", bnx CPU kernels {e['bnx_cpu_kernels']}" if e["device_type"] == "cpu" and e.get("bnx_cpu_kernels") else ""),
        f"copy bandwidth: {_gbps_text(res['copy_gbps'])} GB/s (read + write, {res['copy_bytes'] >> 20} MiB)",
        f"bnx settings: {_settings_text(e)}",
        f"timing: {res['timing']}",
        f"command: {res['command']}",
    ]
    fp = res.get("from_progress")
    if fp:
        lines.append(f"rebuilt from the progress log {fp['log']} (no timing in this run): {fp['cases_found']} of "
                     f"{fp['cases_total']} cases"
                     + (f"; absent: {'; '.join(fp['missing'])}" if fp["missing"] else ""))
    pa = res.get("partial")
    if pa:
        lines.append(f"PARTIAL: {pa['cases_done']} of {pa['cases_total']} cases (written after each case; "
                     "the run hadn't finished)")
    return lines


def print_summary(res, out):
    s = res["summary"]
    print("\n".join(_header_lines(res)), file=out)
    print(f"\nsummary over the {s['scope']} (geomeans; speedup = peer time / bnx time):", file=out)
    print(f"  {'pass':<18}{'dtype':<6}{'cases':>6}{'frac bnx':>10}{'frac best peer':>16}{'vs native':>11}"
          f"{'vs best peer':>14}", file=out)
    for r in s["rows"]:
        print(f"  {r['pass_']:<18}{r['dtype']:<6}{r['n']:>6}{_f(r['geomean_frac_bnx'], '.2f'):>10}"
              f"{_f(r['geomean_frac_best_peer'], '.2f'):>16}{_f(r['geomean_speedup_vs_native'], '.2f'):>11}"
              f"{_f(r['geomean_speedup_vs_best_peer'], '.2f'):>14}", file=out)
    n_meas = sum(1 for c in res["cases"] if c["times_us"].get("bnx"))
    took = ""
    if res.get("elapsed_seconds") is not None:
        took = f" in {res['elapsed_seconds']:.0f} s"
        if res.get("compile_seconds_total") is not None:
            took += (f" (compile {res['compile_seconds_total']:.0f} s"
                     + (", budget exhausted" if res["compile_budget_exhausted"] else "") + ")")
    print(f"  min frac (bnx): {_f(s['min_frac_bnx'], '.3f')} ({s['min_frac_case']}); geomean frac over all "
          f"cases {_f(s['geomean_frac_bnx_all'], '.2f')}, geomean speedup vs best peer "
          f"{_f(s['geomean_speedup_vs_best_peer_all'], '.2f')}x; {len(res['cases'])} cases"
          + (f" ({n_meas} with a bnx time)" if n_meas != len(res["cases"]) else "") + took, file=out)
    t = targets(res)
    if t:
        print("\n" + "\n".join(_targets_text(t)), file=out)


def markdown(res):
    impls = res["impls"]
    L = ["# bnx benchmark", ""] + [f"- {h}" for h in _header_lines(res)] + [""]
    L += ["frac = compulsory bytes / time / copy bandwidth; compulsory bytes per pass (E elements, b bytes each): "
          + ", ".join(f"{p} {res['bytes_factor'][p]}Eb" for p in res["passes"]) + ".",
          "speedup = peer time / bnx time; best peer = the fastest of "
          + ", ".join(IMPL_TEXT[i] for i in impls if i != "bnx") + ". "
          "max rel diff = max |bnx - native| / max |native| over the pass's outputs. "
          "bnx host us (GPU) = host time to issue one bnx call; above the device time the call is host-bound "
          "(flagged).",
          ""]
    L += ["Passes:", ""] + [f"- `{p}`: {res['pass_text'][p]}" for p in res["passes"]] + [""]
    s = res["summary"]
    L += [f"## Summary ({s['scope']}, geomeans)", "",
          "| pass | dtype | cases | frac bnx | frac best peer | speedup vs native | speedup vs best peer |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for r in s["rows"]:
        L.append(f"| {r['pass_']} | {r['dtype']} | {r['n']} | {_f(r['geomean_frac_bnx'], '.2f')} | "
                 f"{_f(r['geomean_frac_best_peer'], '.2f')} | {_f(r['geomean_speedup_vs_native'], '.2f')} | "
                 f"{_f(r['geomean_speedup_vs_best_peer'], '.2f')} |")
    L += ["", f"Min frac (bnx): {_f(s['min_frac_bnx'], '.3f')} ({s['min_frac_case']}).", "",
          "## All cases (microseconds, frac in parentheses)", ""]
    hdr = "| pass | dtype | layout | shape | " + " | ".join(IMPL_TEXT[i] for i in impls) + \
          " | vs native | vs best peer | best peer | max rel diff | bnx host us |"
    L += [hdr, "|" + "---|" * 4 + "---:|" * (len(impls) + 2) + "---|---:|---:|"]
    for c in res["cases"]:
        cells = []
        for i in impls:
            t = c["times_us"].get(i)
            if t:
                cells.append(f"{t:.1f} ({c['frac'][i]:.2f})")
            else:
                err = c["errors"].get(i, "n/a")
                cells.append("-" if err.startswith("not run") else ("OOM" if err == "OOM" else "n/a"))
        d = c.get("max_rel_diff_vs_native")
        L.append(f"| {c['pass']} | {c['dtype']} | {c['layout']} | {','.join(map(str, c['shape']))} | "
                 + " | ".join(cells)
                 + f" | {_f(c['speedup'].get('native'), '.2f')} | {_f(c['speedup'].get('best_peer'), '.2f')} | "
                 f"{IMPL_TEXT.get(c['best_peer'], 'n/a')} | {_f(d, '.1e')} | "
                 f"{_host_cell(c)} |")
    nm = []
    for c in res["cases"]:
        errs = {i: e for i, e in c["errors"].items() if not e.startswith("not run")}
        if errs and len(errs) == len(impls) and len(set(errs.values())) == 1:
            nm.append(f"- {case_label(c)}: {next(iter(errs.values()))}")  # the whole case, one line
        else:
            nm += [f"- {case_label(c)}, {IMPL_TEXT[i]}: {e}" for i, e in errs.items()]
    if nm:
        L += ["", "## Not measured", ""] + nm
    qa = [f"- {case_label(c)}, {IMPL_TEXT[i]}: {min(n, Timer.QUEUE_TRIES)} tries"
          + (", the last outran its sleep too: this time may include host waits" if n > Timer.QUEUE_TRIES else "")
          for c in res["cases"] for i, n in (c.get("queue_tries") or {}).items()]
    if qa:
        L += ["", "## Queued again (the first queue of calls outran the sleep holding the GPU)", ""] + qa
    t = targets(res)
    if t:
        L += ["", "## Targets", ""] + _targets_markdown(t)
    return "\n".join(L) + "\n"


# the project's GPU goals, checked by targets() on every GPU run that has the ResNet-50 train_fwd_bwd cases
TARGETS = dict(fwd_bwd_geomean_frac=0.60, fwd_bwd_min_frac=0.40, vs_native={"bf16": 2.5, "fp32": 1.5},
               vs_compile=1.2, wgrad_geomean_frac=0.70, eval_geomean_frac=0.80, launch_vs_native=1.0)
LAUNCH_SHAPE = NAMED["launch"]


def targets(res):
    """The targets against the data: dict(items=[...], compile=[...], launch=[...]) or None (a CPU run, or no
    ResNet-50 train_fwd_bwd cases). Items: what, value (text), goal (text), status (MET, NOT MET, NOT
    MEASURED, or 'MET where measured'), detail. Judged on the unrounded values."""
    if res["env"].get("device_type") != "cuda":
        return None
    T = TARGETS
    rn = [c for c in res["cases"] if c["shape_name"] in RESNET and c["dtype"] in ("bf16", "fp32")
          and c["layout"] in LAYOUTS]
    fb = [c for c in rn if c["pass"] == "train_fwd_bwd"]
    if not fb:
        return None
    items = []

    def status(ok, measured=True):
        return "NOT MEASURED" if not measured else ("MET" if ok else "NOT MET")

    def every_case(pairs, bound):
        """(measured, below, status) for a goal every measured case must reach: pairs of (case, value or None)."""
        measured = [(c, v) for c, v in pairs if v]
        below = [(c, v) for c, v in measured if v < bound]
        st = status(not below, bool(measured))
        if measured and not below and len(measured) < len(pairs):
            st = "MET where measured"
        return measured, below, st

    def frac_item(what, cs, goal):
        vals = [c["frac"]["bnx"] for c in cs if c["frac"].get("bnx")]
        g = geomean(vals)
        items.append(dict(what=what, value=_f(g, ".3f"), goal=f">= {goal:.2f}", status=status(
            g is not None and g >= goal, g is not None), detail=f"{len(vals)} of {len(cs)} cases"))

    frac_item("train_fwd_bwd geomean frac", fb, T["fwd_bwd_geomean_frac"])
    ok = [c for c in fb if c["frac"].get("bnx")]
    mn = min(ok, key=lambda c: c["frac"]["bnx"]) if ok else None
    low = [c for c in ok if c["frac"]["bnx"] < T["fwd_bwd_min_frac"]]
    items.append(dict(what="train_fwd_bwd min frac", value=_f(mn and mn["frac"]["bnx"], ".3f"),
                      goal=f"no case < {T['fwd_bwd_min_frac']:.2f}", status=status(not low, bool(ok)),
                      detail=(f"lowest: {case_label(mn)}" if mn else "")
                      + (f"; {len(low)} case(s) below: " + ", ".join(
                          f"{c['dtype']} {c['layout']} {','.join(map(str, c['shape']))} {c['frac']['bnx']:.3f}"
                          for c in low) if low else "")))
    for d, goal in T["vs_native"].items():
        cs = [c for c in fb if c["dtype"] == d]
        if not cs:
            continue
        vals = [c["speedup"]["native"] for c in cs if c["speedup"].get("native")]
        g = geomean(vals)
        items.append(dict(what=f"train_fwd_bwd geomean speedup vs native, {d}", value=_f(g, ".2f") + "x",
                          goal=f">= {goal}x", status=status(g is not None and g >= goal, g is not None),
                          detail=f"{len(vals)} of {len(cs)} cases"))
    comp = [(c, c["speedup"].get("compile")) for c in fb]
    meas, slow, st = every_case(comp, T["vs_compile"])
    items.append(dict(what="train_fwd_bwd speedup vs torch.compile, every case", value=(
        f"min {min(v for _, v in meas):.2f}x" if meas else "n/a"), goal=f">= {T['vs_compile']}x", status=st,
        detail=f"measured in {len(meas)} of {len(comp)} cases" + (f"; {len(slow)} below" if slow else "")))
    for pname, key in (("frozen_bwd_wgrad", "wgrad_geomean_frac"), ("eval_fwd", "eval_geomean_frac")):
        cs = [c for c in rn if c["pass"] == pname]
        if cs:
            frac_item(f"{pname} geomean frac", cs, T[key])
    launch = [c for c in res["cases"] if tuple(c["shape"]) == LAUNCH_SHAPE]
    if launch:
        lv = [(c, c["speedup"].get("native")) for c in launch]
        lm, lslow, st = every_case(lv, T["launch_vs_native"])
        items.append(dict(
            what=f"launch-bound {','.join(map(str, LAUNCH_SHAPE))}: speedup vs native, every case",
            value=(f"min {min(v for _, v in lm):.2f}x" if lm else "n/a"), goal="no slower than native (>= 1x)",
            status=st, detail=f"{len(lm)} of {len(lv)} cases" + (
                f"; slower in {len(lslow)}: " + ", ".join(f"{c['pass']} {c['dtype']} {c['layout']} {v:.2f}x"
                                                            for c, v in lslow) if lslow else "")))
    else:
        lv = []
    return dict(items=items, compile=comp, launch=lv)


_TARGET_SCOPE = ("train_fwd_bwd, frozen_bwd_wgrad and eval_fwd over the 5 ResNet-50 shapes x {bf16, fp32} x "
                 "{nchw, nhwc}; frac = compulsory bytes / time / copy bandwidth; speedup = peer time / bnx time")


def _targets_text(t):
    L = ["targets (" + _TARGET_SCOPE + "):"]
    w = max(len(it["status"]) for it in t["items"]) + 3
    for it in t["items"]:
        L.append(f"  {'[' + it['status'] + ']':<{w}}{it['what']}: {it['value']} (goal {it['goal']})"
                 + (f"; {it['detail']}" if it["detail"] else ""))
    met = sum(1 for it in t["items"] if it["status"] == "MET")
    L.append(f"  met {met} of {len(t['items'])}; not met: "
             + ("; ".join(it["what"] for it in t["items"] if it["status"] != "MET") or "none"))
    L.append("  train_fwd_bwd speedup vs torch.compile per case:")
    for c, v in t["compile"]:
        L.append(f"    {c['dtype']:<5}{c['layout']:<5}{','.join(map(str, c['shape'])):<18}"
                 + (f"{v:.2f}x" if v else "n/a (" + c["errors"].get("compile", "n/a") + ")"))
    if t["launch"]:
        L.append(f"  launch-bound {','.join(map(str, LAUNCH_SHAPE))}: speedup vs native per case:")
        for c, v in t["launch"]:
            L.append(f"    {c['pass']:<18}{c['dtype']:<5}{c['layout']:<5}"
                     + (f"{v:.2f}x" + ("  SLOWER" if v < TARGETS["launch_vs_native"] else "") if v else "n/a"))
    return L


def _targets_markdown(t):
    L = ["Scope: " + _TARGET_SCOPE + ". Judged on the unrounded values.", "",
         "| target | value | goal | status | detail |", "|---|---:|---|---|---|"]
    for it in t["items"]:
        L.append(f"| {it['what']} | {it['value']} | {it['goal']} | **{it['status']}** | {it['detail']} |")
    met = sum(1 for it in t["items"] if it["status"] == "MET")
    L += ["", f"Met {met} of {len(t['items'])}; not met: "
          + ("; ".join(it["what"] for it in t["items"] if it["status"] != "MET") or "none") + ".", "",
          "train_fwd_bwd speedup over torch.compile per case:", "",
          "| dtype | layout | shape | vs compile |", "|---|---|---|---:|"]
    for c, v in t["compile"]:
        L.append(f"| {c['dtype']} | {c['layout']} | {','.join(map(str, c['shape']))} | "
                 + (f"{v:.2f}x" if v else "n/a (" + c["errors"].get("compile", "n/a") + ")") + " |")
    if t["launch"]:
        L += ["", f"Launch-bound shape {','.join(map(str, LAUNCH_SHAPE))}, speedup over native per case:", "",
              "| pass | dtype | layout | vs native |", "|---|---|---|---:|"]
        for c, v in t["launch"]:
            L.append(f"| {c['pass']} | {c['dtype']} | {c['layout']} | "
                     + (f"{v:.2f}x" + (" (slower)" if v < TARGETS["launch_vs_native"] else "") if v else "n/a")
                     + " |")
    return L


def _host_cell(c):
    h, t = c.get("host_us", {}).get("bnx"), c["times_us"].get("bnx")
    return _f(h, ".0f") + (" (host-bound)" if h is not None and t and h > t else "")


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = res["passes"]
    cases = res["cases"]
    shapes = []
    for c in cases:
        if c["shape"] not in shapes:
            shapes.append(c["shape"])
    series = []
    for c in cases:
        k = (c["dtype"], c["layout"])
        if k not in series:
            series.append(k)
    ncol = 2 if len(passes) > 1 else 1
    nrow = math.ceil(len(passes) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(7.5 * ncol, 3.2 * nrow), squeeze=False)
    width = 0.8 / max(1, len(series))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ai, p in enumerate(passes):
        ax = axes[ai // ncol][ai % ncol]
        for si, (d, lay) in enumerate(series):
            xs, fb, fp, sp = [], [], [], []
            for xi, sh in enumerate(shapes):
                c = next((c for c in cases if c["pass"] == p and c["dtype"] == d and c["layout"] == lay
                          and c["shape"] == sh), None)
                if c is None:
                    continue
                xs.append(xi + (si - (len(series) - 1) / 2) * width)
                fb.append(c["frac"].get("bnx") or 0)
                fp.append(c["frac"].get(c["best_peer"]) if c["best_peer"] else None)
                sp.append(c["speedup"].get("best_peer"))
            ax.bar(xs, fb, width, color=colors[si % len(colors)], label=f"bnx {d} {lay}")
            ax.scatter([x for x, v in zip(xs, fp) if v], [v for v in fp if v], marker="_", color="k", s=60,
                       zorder=3, label="best peer" if si == 0 else None)
            for x, v, s in zip(xs, fb, sp):
                if s:
                    ax.text(x, v + 0.02, f"{s:.1f}x", ha="center", va="bottom", fontsize=5, rotation=90)
        ax.set_title(p, fontsize=9)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(["x".join(map(str, s)) for s in shapes], fontsize=6, rotation=15)
        ax.set_ylim(0, 1.25)
        ax.axhline(1.0, color="gray", lw=0.5, ls="--")
        ax.set_ylabel("frac of copy bandwidth", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for aj in range(len(passes), nrow * ncol):
        axes[aj // ncol][aj % ncol].axis("off")
    h, lab = axes[0][0].get_legend_handles_labels()
    e = res["env"]
    top = 1 - 0.55 / fig.get_figheight()
    fig.suptitle(f"bnx: fraction of copy bandwidth ({res['copy_gbps']:.0f} GB/s) on {e.get('device_name')}; "
                 "bar labels: speedup over the best peer; black ticks: best peer's frac", fontsize=8, y=0.998)
    fig.legend(h, lab, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.22 / fig.get_figheight()),
               ncol=min(6, len(lab)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None):
    """Standalone entry point (benchmarks/bench.py): same options as ``python -m bnx bench``."""
    from .__main__ import main as cli_main
    return cli_main(["bench"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
