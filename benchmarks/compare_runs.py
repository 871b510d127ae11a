"""Compare bnx's times across benchmark runs (JSON files of `python -m bnx bench --json`), case by case.

    python benchmarks/compare_runs.py base.json other.json [...] [--labels a,b,...] [--md FILE]

The first file is the baseline: each case shows bnx's microseconds in every run, each run's time as a
ratio to the baseline's (below 1: faster), and native's time in the baseline run; the last line gives
the geometric mean of the ratios over the cases every run has. For comparing settings of bnx's switches
(which the JSON records under env.bnx_settings) measured on one machine in one session.
"""
import argparse
import json
import math
import os


def load(path):
    with open(path) as f:
        d = json.load(f)
    cases = {}
    for c in d["cases"]:
        t = c["times_us"].get("bnx")
        if t is None:
            continue
        key = (c["pass"], c["dtype"], c["layout"], ",".join(map(str, c["shape"])))
        cases[key] = (t, c["times_us"].get("native"))
    return d, cases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="JSON files; the first is the baseline")
    ap.add_argument("--labels", help="comma list of names for the runs (default: bnx settings or file names)")
    ap.add_argument("--md", help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        ap.error("give at least two runs")
    loaded = [load(p) for p in args.runs]
    if args.labels:
        labels = args.labels.split(",")
        if len(labels) != len(args.runs):
            ap.error(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    else:
        labels = []
        for path, (d, _) in zip(args.runs, loaded):
            settings = d.get("env", {}).get("bnx_settings") or {}
            labels.append(" ".join(f"{k}={v}" for k, v in sorted(settings.items())) or os.path.basename(path))
    base = loaded[0][1]
    keys = [k for k in base if all(k in cases for _, cases in loaded[1:])]
    if not keys:
        raise SystemExit("compare_runs: the runs have no case in common")
    head = ["pass", "dtype", "layout", "shape"] + [f"bnx us [{i}]" for i in range(len(labels))] + \
        [f"[{i}]/[0]" for i in range(1, len(labels))] + ["native us [0]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    logs = [0.0] * len(labels)
    for k in keys:
        times = [cases[k][0] for _, cases in loaded]
        for i, t in enumerate(times):
            logs[i] += math.log(t / times[0])
        native = base[k][1]
        lines.append("| " + " | ".join(list(k) + [f"{t:.1f}" for t in times] +
                                       [f"{t / times[0]:.3f}" for t in times[1:]] +
                                       [f"{native:.1f}" if native else "n/a"]) + " |")
    geo = [math.exp(s / len(keys)) for s in logs]
    out = [f"[{i}] {label}" for i, label in enumerate(labels)] + [""] + lines + [
        "", f"geomean of [i]/[0] over {len(keys)} cases: " + ", ".join(f"[{i}] {g:.3f}" for i, g in enumerate(geo))]
    text = "\n".join(out)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    return geo


if __name__ == "__main__":
    main()
