"""Per kernel: time, DRAM bytes and L2 hit rate, from the output of `ncu --csv ... benchmarks/ncu_case.py`.

    python benchmarks/ncu_summary.py ncu-defaults.txt ncu-l2groups.txt [--md out.md]

Each file is one ncu run's whole output (ncu_case.py's JSON record of the case, ncu's "==PROF==" lines, then
the CSV of its details page: one row per kernel and metric). Prints, per run, each kernel's time and DRAM
traffic, and the run's totals: DRAM bytes over the case's compulsory bytes (1.00 would be each tensor moved
once) and in tensor transfers (a training forward + backward moves 5 at the least, 8 when both passes read
their input twice from DRAM). Then, with two or more runs, their totals side by side.
"""
import argparse
import csv
import json
import re
import sys

METRICS = {
    "gpu__time_duration.sum": "time",
    "dram__bytes_read.sum": "dram_read",
    "dram__bytes_write.sum": "dram_write",
    "lts__t_sector_hit_rate.pct": "l2_hit_pct",
}
# To base units (ns, bytes): ncu scales units unless run with --print-units base.
UNIT_SCALE = {
    "nsecond": 1.0, "usecond": 1e3, "msecond": 1e6, "second": 1e9,
    "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12,
    "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2.0 ** 10, "MiB": 2.0 ** 20, "GiB": 2.0 ** 30,
    "%": 1.0, "": 1.0,
    # other spellings, in case a version prints them
    "ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9, "B": 1.0, "bytes": 1.0,
}


class NcuOutputError(ValueError):
    pass


def _number(text, unit):
    t = text.strip().replace(",", "")
    if t in ("", "n/a", "N/A"):
        return None
    if unit not in UNIT_SCALE:
        raise NcuOutputError(f"unknown metric unit {unit!r}")
    return float(t) * UNIT_SCALE[unit]


def short_kernel_name(name):
    """'void bnx::cuda::(anonymous namespace)::batch_norm_stats_kernel<float, ...>(...)' -> 'batch_norm_stats_kernel'."""
    n = re.sub(r"^void\s+", "", name.strip())
    # drop the argument list and template arguments (nested), then the namespaces
    depth, out = 0, []
    for ch in n:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    base = "".join(out).strip()
    return base.split("::")[-1] or name.strip()


def parse(text):
    """The case record and the kernels, in launch order: [{id, name, grid, block, time, dram_read, ...}]."""
    case = None
    lines = text.splitlines()
    header_at = None
    for i, line in enumerate(lines):
        s = line.strip()
        if case is None and s.startswith("{") and '"tool": "ncu_case"' in s:
            case = json.loads(s)
        if s.startswith('"ID"') and "Metric Name" in s:
            header_at = i
            break
    if case is None:
        raise NcuOutputError("no ncu_case.py record (its first line of output) in this file")
    if header_at is None:
        raise NcuOutputError("no ncu CSV (a header line starting with \"ID\" and naming \"Metric Name\") in this file")
    body = [ln for ln in lines[header_at:] if ln.startswith('"')]  # drop ==PROF== and program lines
    kernels = {}
    for row in csv.DictReader(body):
        metric = row.get("Metric Name", "")
        if metric not in METRICS:
            continue
        kid = int(row["ID"])
        k = kernels.setdefault(kid, dict(id=kid, name=row.get("Kernel Name", "?"), grid=row.get("Grid Size", ""),
                                         block=row.get("Block Size", "")))
        k[METRICS[metric]] = _number(row.get("Metric Value", ""), row.get("Metric Unit", ""))
    if not kernels:
        raise NcuOutputError("the ncu CSV names none of the metrics " + ", ".join(METRICS))
    return case, [kernels[i] for i in sorted(kernels)]


def totals(case, kernels):
    t = sum(k.get("time") or 0.0 for k in kernels)
    rd = sum(k.get("dram_read") or 0.0 for k in kernels)
    wr = sum(k.get("dram_write") or 0.0 for k in kernels)
    iters = case.get("iters", 1)
    per = lambda v: v / iters  # noqa: E731
    return dict(kernels=len(kernels), time_us=per(t) / 1e3, dram_read=per(rd), dram_write=per(wr),
                dram_over_compulsory=per(rd + wr) / case["compulsory_bytes"],
                transfers=per(rd + wr) / case["tensor_bytes"])


def _case_text(case):
    s = f"{case['pass_']} {case['dtype']} {case['layout']} {','.join(map(str, case['shape']))}, {case['impl']}"
    if case.get("bnx_settings"):
        s += " (" + " ".join(f"{k}={v}" for k, v in case["bnx_settings"].items()) + ")"
    return s


def _f(v, spec):
    return "n/a" if v is None else format(v, spec)


def markdown(runs):
    """runs: [(label, case, kernels)]."""
    L = []
    run_totals = [totals(case, kernels) for _, case, kernels in runs]
    for (label, case, kernels), t in zip(runs, run_totals):
        L += [f"## {label}: {_case_text(case)}", "",
              f"{case['iters']} call(s) profiled; tensor {case['tensor_bytes'] / 1e6:.1f} MB, compulsory "
              f"{case['compulsory_bytes'] / 1e6:.1f} MB per call.", "",
              "| # | kernel | grid | block | us | DRAM read MB | DRAM write MB | L2 hit % |",
              "|---:|---|---|---|---:|---:|---:|---:|"]
        for k in kernels:
            time_us = None if k.get("time") is None else k["time"] / 1e3
            rd = None if k.get("dram_read") is None else k["dram_read"] / 1e6
            wr = None if k.get("dram_write") is None else k["dram_write"] / 1e6
            L.append(f"| {k['id']} | {short_kernel_name(k['name'])} | {k['grid']} | {k['block']} | "
                     f"{_f(time_us, '.1f')} | {_f(rd, '.1f')} | {_f(wr, '.1f')} | {_f(k.get('l2_hit_pct'), '.1f')} |")
        L += ["", f"Per call: {t['kernels'] / case['iters']:.0f} kernels, {t['time_us']:.1f} us of kernel time, DRAM "
              f"{t['dram_read'] / 1e6:.1f} MB read + {t['dram_write'] / 1e6:.1f} MB written = "
              f"{t['dram_over_compulsory']:.2f}x the compulsory bytes ({t['transfers']:.2f} tensor transfers).", ""]
    if len(runs) > 1:
        L += ["## Side by side (per call)", "",
              "| run | case | kernels | kernel us | DRAM MB | x compulsory | transfers |",
              "|---|---|---:|---:|---:|---:|---:|"]
        for (label, case, _), t in zip(runs, run_totals):
            L.append(f"| {label} | {_case_text(case)} | {t['kernels'] / case['iters']:.0f} | {t['time_us']:.1f} | "
                     f"{(t['dram_read'] + t['dram_write']) / 1e6:.1f} | {t['dram_over_compulsory']:.2f} | "
                     f"{t['transfers']:.2f} |")
        L.append("")
    return "\n".join(L)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="ncu outputs of benchmarks/ncu_case.py")
    ap.add_argument("--md", help="also write the markdown here")
    args = ap.parse_args(argv)
    runs, failed = [], 0
    for path in args.files:
        with open(path, errors="replace") as f:
            text = f.read()
        try:
            case, kernels = parse(text)
        except NcuOutputError as e:  # say which, and summarize the others (a failed ncu run is one file of many)
            print(f"ncu_summary: {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        runs.append((path.rsplit("/", 1)[-1], case, kernels))
    if not runs:
        return 1
    md = markdown(runs)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
