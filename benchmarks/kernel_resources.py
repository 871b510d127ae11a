"""Registers, spills and resident CTAs per SM of bnx's CUDA kernels, from ptxas (no GPU needed).

    python benchmarks/kernel_resources.py [--arch 90] [-D NAME=VALUE ...] [--md out.md] [FILE.cu ...]
    python benchmarks/kernel_resources.py --log ptxas.log [--log ...]   # tabulate logs already made

Compiles each .cu file (all of csrc/cuda/*.cu by default) for one architecture with `nvcc -Xptxas -v` and the
build's flags, then tabulates what ptxas reports for every kernel instantiation: registers per thread, stack
and spill bytes, static shared memory, and how many CTAs of kThreads threads can be resident on one SM, the
least of the register file, the thread slots and shared memory allow. A cooperative launch (the L2-grouped
launch) gets exactly that many CTAs per SM, so its registers set how many loads it can keep in flight. (The
on-chip launch's CTAs also take dynamic shared memory, sized per input at run time, which ptxas does not
see: its column counts registers and static shared memory only.)
A few minutes per file on two cores; --save-logs keeps ptxas's output for --log.
"""
import argparse
import glob
import os
import re
import subprocess
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

THREADS = 256  # kThreads in csrc/cuda/common.cuh: every bnx kernel's CTA
# Per-SM limits of compute capability 9.0 (CUDA C++ Programming Guide, "Technical Specifications per Compute
# Capability"), by architecture: register file, thread slots, CTA slots, shared memory for CTAs, per-CTA
# reserved shared memory.
SM_LIMITS = {
    "90": dict(registers=65536, threads=2048, ctas=32, smem=233472, smem_reserved=1024),
    "80": dict(registers=65536, threads=2048, ctas=32, smem=167936, smem_reserved=1024),
}

ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text):
    """[{mangled, arch, registers, stack, spill_stores, spill_loads, smem}] from `ptxas -v` output."""
    out, cur = [], None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            cur = dict(mangled=m.group(1), arch=m.group(2), stack=0, spill_stores=0, spill_loads=0, smem=0)
            continue
        if cur is None:
            continue
        m = FRAME.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            s = SMEM.search(line)
            cur["smem"] = int(s.group(1)) if s else 0
            out.append(cur)
            cur = None
    return out


def resident_ctas(registers, smem, arch="90", threads=THREADS):
    """CTAs of `threads` threads one SM can hold: registers are allocated per warp in units of 256."""
    lim = SM_LIMITS[arch]
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = lim["registers"] // (per_warp * warps)
    by_threads = lim["threads"] // (warps * 32)
    by_smem = lim["smem"] // (smem + lim["smem_reserved"])
    return min(by_regs, by_threads, by_smem, lim["ctas"])


def demangle(names):
    try:
        r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        out = r.stdout.splitlines()
        if len(out) == len(names):
            return out
    except (OSError, subprocess.CalledProcessError):
        pass
    return list(names)


def _template_args(name):
    """Top-level template arguments of the function in a demangled name."""
    start = name.find("<")
    if start < 0:
        return []
    args, depth, cur = [], 0, []
    for ch in name[start + 1:]:
        if ch == "<":
            depth += 1
        elif ch == ">":
            if depth == 0:
                args.append("".join(cur).strip())
                break
            depth -= 1
        elif ch == "," and depth == 0:
            args.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    return args


WALKS = {"0": "planes", "1": "rows", "2": "plane groups", "3": "plane segments"}
SYNCS = {"0": "two barriers", "1": "one barrier", "2": "no barrier"}


# Kernels whose template arguments are <acc_t, V, walk, [sync or kPartial,] op, ...>.
KERNELS_WITH_OPS = ("channel_sums_kernel", "channel_map_kernel", "grouped_sums_map_kernel", "on_chip_sums_map_kernel")

DTYPES = {"float": "fp32", "c10::BFloat16": "bf16", "c10::Half": "fp16", "double": "fp64"}


def describe(demangled):
    """(kernel, op, dtype, variant, width) for a demangled bnx kernel name: the sums or map op it runs (without
    its template arguments), the input dtype, the walk and, for the grouped launch, its synchronization (for the
    on-chip launch, "partial" where it reads what does not fit from global memory), and
    the vector width V in elements (0 where the kernel has none)."""
    base = re.sub(r"^void\s+", "", demangled)
    kernel = base[: base.find("<")] if "<" in base else base[: base.find("(")]
    kernel = kernel.split("::")[-1]
    args = _template_args(base)
    variant, op, dtype, width = [], "", "", 0
    if kernel in KERNELS_WITH_OPS and len(args) >= 4:
        variant.append(WALKS.get(args[2], "walk " + args[2]))
        width = int(args[1]) if args[1].isdigit() else 0
        op_arg = args[3]
        if kernel == "grouped_sums_map_kernel" and len(args) >= 5:
            variant.append(SYNCS.get(args[3], "sync " + args[3]))
            op_arg = args[4]
        elif kernel == "on_chip_sums_map_kernel" and len(args) >= 5 and args[3] in ("false", "true"):
            if args[3] == "true":  # kPartial: an input that only partly fits in shared memory
                variant.append("partial")
            op_arg = args[4]
        op = re.sub(r"<.*", "", op_arg).split("::")[-1]
        op_args = _template_args(op_arg)
        dtype = DTYPES.get(op_args[0], op_args[0]) if op_args else ""
    elif kernel == "finalize_kernel" and args:
        dtype = DTYPES.get(args[0], args[0]) + " acc"
    return kernel, op, dtype, ", ".join(variant), width


def compile_flags():
    import torch  # noqa: F401  (the include paths are torch's)
    from torch.utils import cpp_extension

    try:
        inc = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch
        inc = cpp_extension.include_paths(cuda=True)
    # The headers that a minimal toolkit lacks, found as setup.py's cuda_header_dirs finds them (setup.py
    # cannot be imported: it runs setup()).
    for entry in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for d in sorted(glob.glob(os.path.join(entry, pattern))):
                if os.path.isdir(d) and d not in inc:
                    inc.append(d)
    return [f"-I{i}" for i in inc] + [f"-I{os.path.join(ROOT, 'csrc')}"]


def nvcc_path():
    home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else "")
    cand = os.path.join(home, "bin", "nvcc") if home else ""
    return cand if cand and os.path.exists(cand) else "nvcc"


def run_ptxas(path, arch, defines=()):
    cmd = [nvcc_path(), "-c", path, "-o", os.devnull, "-O3", "--expt-relaxed-constexpr", "-std=c++20",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-DTORCH_EXTENSION_NAME=_C",
           "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-U__CUDA_NO_HALF2_OPERATORS__"] + [f"-D{d}" for d in defines] + compile_flags()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"kernel_resources: nvcc failed on {path}:\n{r.stderr[-3000:]}")
    return r.stderr + r.stdout


def summarize(entries, arch="90"):
    """Rows per (kernel, op, walk / sync): for each dtype, its 16-byte-vector instantiations (the widest V,
    what every input with aligned rows or planes gets; the backward's sums with and without dx): the most
    registers, the fewest CTAs per SM, and those that spill."""
    names = demangle([e["mangled"] for e in entries])
    groups = defaultdict(lambda: defaultdict(list))
    for e, n in zip(entries, names):
        kernel, op, dtype, variant, width = describe(n)
        groups[(kernel, op, variant)][dtype].append(dict(e, width=width))
    rows = []
    for (kernel, op, variant), by_dtype in sorted(groups.items()):
        cells = {}
        for dtype, es in by_dtype.items():
            widest = max(e["width"] for e in es)
            es = [e for e in es if e["width"] == widest]
            worst = max(es, key=lambda e: e["registers"])
            spills = [e["spill_stores"] + e["spill_loads"] for e in es if e["spill_stores"] or e["spill_loads"]]
            cells[dtype] = dict(registers=worst["registers"],
                                ctas=min(resident_ctas(e["registers"], e["smem"], arch) for e in es),
                                spilling=len(spills), spill_max=max(spills, default=0))
        rows.append(dict(kernel=kernel, op=op, variant=variant, cells=cells))
    return rows


def markdown(rows, arch="90", sources=()):
    dtypes = [d for d in ("fp32", "bf16", "fp16", "fp64") if any(d in r["cells"] for r in rows)]
    dtypes += sorted({d for r in rows for d in r["cells"]} - set(dtypes))
    L = [f"Kernel resources for sm_{arch} (ptxas -v), CTAs of {THREADS} threads" +
         (f", from {', '.join(sources)}" if sources else "") + ".", "",
         "Per dtype, its 16-byte-vector kernels (with or without dx): the most registers per thread / the fewest "
         "resident CTAs per SM; where any spill, in brackets: how many, and the largest spill stores + loads in "
         "bytes.", "",
         "| kernel | op | walk / sync | " + " | ".join(dtypes) + " |",
         "|---|---|---|" + "---|" * len(dtypes)]
    for r in rows:
        cells = []
        for d in dtypes:
            c = r["cells"].get(d)
            if c is None:
                cells.append("-")
                continue
            t = f"{c['registers']} / {c['ctas']}"
            if c["spilling"]:
                t += f" ({c['spilling']}: {c['spill_max']} B)"
            cells.append(t)
        L.append(f"| {r['kernel']} | {r['op'] or '-'} | {r['variant'] or '-'} | " + " | ".join(cells) + " |")
    return "\n".join(L)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help=".cu files (default: csrc/cuda/*.cu)")
    ap.add_argument("--arch", default="90", choices=sorted(SM_LIMITS))
    ap.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME=VALUE",
                    help="a macro for the compile, e.g. BNX_CUDA_GROUPED_MIN_CTAS=2")
    ap.add_argument("--log", action="append", default=[], help="tabulate this ptxas -v log instead of compiling")
    ap.add_argument("--md", help="also write the table here")
    ap.add_argument("--save-logs", metavar="DIR", help="keep each file's ptxas -v output in DIR (for --log)")
    args = ap.parse_args(argv)
    entries, sources = [], []
    if args.log:
        for path in args.log:
            with open(path, errors="replace") as f:
                entries += parse_ptxas(f.read())
            sources.append(os.path.basename(path))
    else:
        files = args.files or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        for path in files:
            print(f"kernel_resources: compiling {os.path.relpath(path, ROOT)} for sm_{args.arch}", file=sys.stderr)
            text = run_ptxas(path, args.arch, args.defines)
            if args.save_logs:
                os.makedirs(args.save_logs, exist_ok=True)
                name = os.path.splitext(os.path.basename(path))[0]
                with open(os.path.join(args.save_logs, f"ptxas-sm{args.arch}-{name}.log"), "w") as f:
                    f.write(text)
            entries += parse_ptxas(text)
            sources.append(os.path.relpath(path, ROOT))
    entries = [e for e in entries if e["arch"] == args.arch]
    if not entries:
        raise SystemExit("kernel_resources: ptxas reported no kernel for sm_" + args.arch)
    if args.defines:
        sources.append(" ".join("-D" + d for d in args.defines))
    md = markdown(summarize(entries, args.arch), args.arch, sources)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
