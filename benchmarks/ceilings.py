"""How fast a standalone BatchNorm op could run the training forward + backward, from its DRAM traffic, next
to what a GPU benchmark run measured (JSON of `python -m bnx bench --json`), and which of the project's
speed targets that bound leaves reachable.

    python benchmarks/ceilings.py RUN.json [--l2-mib 50] [--group-fraction 0.333] [--sector 32] [--md FILE]

The model, per train_fwd_bwd case (E elements of b bytes, M = E / C per channel):
- compulsory: the forward reads x and writes y, the backward reads x and dy and writes dx: 5 tensor
  transfers (the benchmark's frac counts these bytes).
- a channel's output needs that channel's statistics (forward) or gradient sums (backward) over all of its
  M elements first. So each pass reads its inputs twice, from DRAM, unless it walks the channels in groups
  whose inputs stay in L2 until the second read: 3 + 5 = 8 transfers without that, 2 + 3 with it.
- the narrowest group DRAM serves efficiently: one channel in NCHW (its planes are contiguous), sector / b
  adjacent channels in channels-last (every row gives the group one sector). A group stays in L2 when its
  inputs (x; x and dy for the backward) take at most group-fraction of the L2 (a third: bnx's grouped
  launch keeps two groups in flight; 1 is the most generous bound).
- each transfer at the copy bandwidth: ceiling frac = 5 / transfers (the two-pass ceiling is 5 / 8 = 0.625).
The speedups at a ceiling divide it by the peer's measured frac, so they assume the peer stays where it was.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bnx.bench import RESNET, TARGETS, geomean  # noqa: E402

COMPULSORY = 5  # tensor transfers of the training forward + backward


def transfers(case, l2_bytes, group_fraction, sector):
    """(forward, backward) DRAM tensor transfers when channel groups are re-read from L2 where they fit."""
    C = case["shape"][1]
    M = case["elements"] // C
    b = case["bytes_per_element"]
    if case["layout"] == "nchw":
        group_bytes = M * b
    else:
        group_bytes = M * b * min(C, max(1, sector // b))
    room = l2_bytes * group_fraction
    fwd = 2 if group_bytes <= room else 3
    bwd = 3 if 2 * group_bytes <= room else 5
    return fwd, bwd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="JSON of a GPU `python -m bnx bench --json` run with train_fwd_bwd cases")
    ap.add_argument("--l2-mib", type=float, default=50.0, help="L2 size in MiB (H100 and H200: 50)")
    ap.add_argument("--group-fraction", type=float, default=1 / 3,
                    help="share of the L2 one channel group's inputs may take (default a third)")
    ap.add_argument("--sector", type=int, default=32, help="DRAM access granularity in bytes (default 32)")
    ap.add_argument("--md", help="also write the report to this markdown file")
    args = ap.parse_args(argv)
    if not 0 < args.group_fraction <= 1:
        ap.error("--group-fraction must be in (0, 1]")
    if args.l2_mib <= 0 or args.sector <= 0:
        ap.error("--l2-mib and --sector must be positive")
    with open(args.run) as f:
        run = json.load(f)
    cases = [c for c in run.get("cases", []) if c.get("pass") == "train_fwd_bwd" and "bnx" in c.get("frac", {})
             and c.get("elements")]
    if not cases:
        raise SystemExit(f"ceilings: {args.run} has no train_fwd_bwd case with bnx's frac")
    l2 = int(args.l2_mib * 2 ** 20)
    peers = [p for p in ("native", "compile") if any(c["frac"].get(p) for c in cases)]

    out = [f"# Traffic ceilings: {os.path.basename(args.run)}", "",
           f"L2 {args.l2_mib:g} MiB, a channel group may take {args.group_fraction:.3g} of it, DRAM sector "
           f"{args.sector} B; frac = compulsory bytes / time / copy bandwidth. Two-pass: every pass reads its "
           f"inputs twice from DRAM (8 transfers, ceiling {COMPULSORY / 8:.3f}); grouped: re-reads from L2 "
           "where a channel group fits (benchmarks/ceilings.py explains the model).", ""]
    head = ["dtype", "layout", "shape", "frac bnx"] + [f"frac {p}" for p in peers] + \
        ["transfers fwd+bwd", "ceiling frac"] + [f"ceiling vs {p}" for p in peers]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    rows = []
    for c in cases:
        fwd, bwd = transfers(c, l2, args.group_fraction, args.sector)
        ceil = COMPULSORY / (fwd + bwd)
        fr = c["frac"]
        vs = {p: (ceil / fr[p] if fr.get(p) else None) for p in peers}
        rows.append((c, ceil, vs))
        cells = [c["dtype"], c["layout"], ",".join(map(str, c["shape"])), f"{fr['bnx']:.3f}"] + \
            [f"{fr[p]:.3f}" if fr.get(p) else "-" for p in peers] + [f"{fwd}+{bwd}", f"{ceil:.3f}"] + \
            [f"{vs[p]:.2f}x" if vs[p] else "-" for p in peers]
        out.append("| " + " | ".join(cells) + " |")

    rn = [r for r in rows if r[0].get("shape_name") in RESNET]
    out += ["", "## The targets at the ceilings (ResNet-50 shapes)", ""]
    if not rn:
        out.append("No ResNet-50 shapes in this run.")
    for label, two_pass in (("two-pass", True), ("grouped", False)):
        if not rn:
            break
        ceil_of = (lambda r: COMPULSORY / 8) if two_pass else (lambda r: r[1])  # noqa: E731
        g = geomean([ceil_of(r) for r in rn])
        out.append(f"- {label}: geomean frac {g:.3f} (target {TARGETS['fwd_bwd_geomean_frac']:.2f}: "
                   f"{'reachable' if g >= TARGETS['fwd_bwd_geomean_frac'] else 'out of reach'})")
        for dt, goal in TARGETS["vs_native"].items():
            v = [ceil_of(r) / r[0]["frac"]["native"] for r in rn if r[0]["dtype"] == dt and r[0]["frac"].get("native")]
            if v:
                s = geomean(v)
                out.append(f"  - geomean speedup vs native, {dt}: {s:.2f}x (target {goal:g}x: "
                           f"{'reachable' if s >= goal else 'out of reach'})")
        comp = [(r, ceil_of(r) / r[0]["frac"]["compile"]) for r in rn if r[0]["frac"].get("compile")]
        if comp:
            short = [(r, s) for r, s in comp if s < TARGETS["vs_compile"]]
            out.append(f"  - speedup vs torch.compile, every case (target {TARGETS['vs_compile']:g}x): " +
                       ("reachable in all " + str(len(comp)) + " cases" if not short else
                        f"out of reach in {len(short)} of {len(comp)}: " + ", ".join(
                            f"{r[0]['dtype']} {r[0]['layout']} {','.join(map(str, r[0]['shape']))} at most {s:.2f}x"
                            for r, s in short)))
    text = "\n".join(out) + "\n"
    sys.stdout.write(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
