"""``python -m bnx check``: gradcheck / gradgradcheck of both backward formulas and parity with torch."""

import json
import time

import torch
import torch.nn.functional as F

# float64 gradcheck shapes: small enough for the slow (exact) gradcheck, odd sizes on purpose
GRAD_SHAPES = {2: (5, 3), 3: (3, 2, 5), 4: (2, 3, 3, 4), 5: (2, 2, 3, 2, 3)}
# parity shapes (float32 / bfloat16 against torch)
PARITY_SHAPES = {2: (64, 24), 4: (8, 16, 10, 12), 5: (4, 8, 4, 6, 5)}
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
EPS = 1e-5
MOMENTUM = 0.1


def add_arguments(p):
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="device to check (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--json", metavar="FILE", help="write all results as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="print the full error of each failure")


def _layouts(rank):
    if rank == 4:
        return [("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)]
    if rank == 5:
        return [("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last_3d)]
    return [("contiguous", torch.contiguous_format)]


def _err_line(e):
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:150]


def _gradchecks(dev, verbose):
    from . import functional as bnxF

    rows = []
    for formula in ("batch", "frozen"):
        for rank, shape in GRAD_SHAPES.items():
            C = shape[1]
            for lname, mf in _layouts(rank):
                for affine in (True, False):
                    x = torch.randn(shape, dtype=torch.float64, device=dev).to(memory_format=mf)
                    x.requires_grad_(True)
                    inputs = [x]
                    if affine:
                        w = (torch.rand(C, dtype=torch.float64, device=dev) + 0.5).requires_grad_(True)
                        b = torch.randn(C, dtype=torch.float64, device=dev).requires_grad_(True)
                        inputs += [w, b]
                    rm = torch.randn(C, dtype=torch.float64, device=dev) * 0.1
                    rv = torch.rand(C, dtype=torch.float64, device=dev) + 0.5
                    training = formula == "batch"

                    def fn(x, w=None, b=None, rm=rm, rv=rv, training=training, formula=formula):
                        return bnxF.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS, backward=formula)

                    row = dict(formula=formula, forward="train" if training else "eval", rank=rank,
                               layout=lname, affine=affine, shape=list(shape))
                    t0 = time.perf_counter()
                    for name, checker in (("gradcheck", torch.autograd.gradcheck),
                                          ("gradgradcheck", torch.autograd.gradgradcheck)):
                        try:
                            ok = checker(fn, tuple(inputs), raise_exception=True)
                            row[name] = "pass" if ok else "FAIL"
                            row[name + "_error"] = None
                        except Exception as e:  # report, don't stop
                            row[name] = "FAIL"
                            row[name + "_error"] = str(e) if verbose else _err_line(e)
                    # layout of the output must follow the input
                    try:
                        with torch.no_grad():
                            y = fn(*[t.detach() for t in inputs])
                        row["layout_kept"] = bool(y.is_contiguous(memory_format=mf)) and y.dtype == x.dtype
                    except Exception as e:
                        row["layout_kept"] = False
                        row["layout_error"] = _err_line(e)
                    row["seconds"] = time.perf_counter() - t0
                    row["ok"] = row["gradcheck"] == "pass" and row["gradgradcheck"] == "pass" and row["layout_kept"]
                    rows.append(row)
    return rows


def _rel_err(a, b):
    """max |a - b| / max(1, max |b|), computed in float64; None if either is missing."""
    if a is None or b is None:
        return None
    a = a.detach().double()
    b = b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def _parity(dev):
    from . import functional as bnxF

    dtypes = [torch.float32, torch.bfloat16]
    rows = []
    for dt in dtypes:
        for rank, shape in PARITY_SHAPES.items():
            C = shape[1]
            for lname, mf in _layouts(rank):
                for mode in ("train", "eval"):
                    training = mode == "train"
                    x0 = (torch.randn(shape, device=dev) * 2 + 0.5).to(dt).to(memory_format=mf)
                    dy = torch.randn(shape, device=dev).to(dt).to(memory_format=mf)
                    w0 = torch.rand(C, device=dev) + 0.5  # float32 params (as in AMP for bfloat16 input)
                    b0 = torch.randn(C, device=dev)
                    rm0 = torch.randn(C, device=dev) * 0.1
                    rv0 = torch.rand(C, device=dev) + 0.5
                    res = {}
                    err = None
                    for impl in ("torch", "bnx", "ref"):
                        x = x0.detach().clone(memory_format=torch.preserve_format)
                        w, b, rm, rv = (t.clone() for t in (w0, b0, rm0, rv0))
                        if impl == "ref":
                            x, w, b, rm, rv = (t.double() for t in (x, w, b, rm, rv))
                        x.requires_grad_(True)
                        w.requires_grad_(True)
                        b.requires_grad_(True)
                        try:
                            if impl == "bnx":
                                y = bnxF.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)
                            else:
                                y = F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)
                            gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy.to(y.dtype))
                            res[impl] = dict(y=y, gx=gx, gw=gw, gb=gb, rm=rm, rv=rv)
                        except Exception as e:
                            if impl == "bnx":
                                err = _err_line(e)
                            res[impl] = None
                    row = dict(dtype=str(dt).replace("torch.", ""), rank=rank, layout=lname, mode=mode,
                               shape=list(shape), tol=TOL[dt], error=err)
                    t, bn_, ref = res["torch"], res["bnx"], res["ref"]
                    keys = ("y", "gx", "gw", "gb") + (("rm", "rv") if training else ())
                    for k in keys:
                        row[k] = _rel_err(bn_[k], t[k]) if (bn_ and t) else None
                        row[k + "_torch_vs_fp64"] = _rel_err(t[k], ref[k]) if (t and ref) else None
                        row[k + "_bnx_vs_fp64"] = _rel_err(bn_[k], ref[k]) if (bn_ and ref) else None
                    if bn_:
                        row["dtype_kept"] = bn_["y"].dtype == dt and bn_["gx"].dtype == dt and bn_["gw"].dtype == w0.dtype
                        row["layout_kept"] = bool(bn_["y"].is_contiguous(memory_format=mf)
                                                  and bn_["gx"].is_contiguous(memory_format=mf))
                    else:
                        row["dtype_kept"] = row["layout_kept"] = False
                    vals = [row[k] for k in keys]
                    row["max_err"] = max(v for v in vals if v is not None) if bn_ and t else None
                    row["ok"] = (bn_ is not None and t is not None and all(v is not None and v <= TOL[dt] for v in vals)
                                 and row["dtype_kept"] and row["layout_kept"])
                    rows.append(row)
    return rows


def _e(v):
    return "n/a" if v is None else f"{v:.1e}"


def run(args):
    from .__main__ import default_device

    dev = torch.device(args.device or default_device())
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"bnx check on {dev} ({name}), torch {torch.__version__}")

    print("\n1. gradcheck and gradgradcheck, float64 (\"batch\": training forward; \"frozen\": eval forward, "
          "constant running stats)")
    grows = _gradchecks(dev, args.verbose)
    print(f"  {'formula':<8}{'forward':<8}{'rank':<6}{'layout':<15}{'affine':<8}{'gradcheck':<11}"
          f"{'gradgradcheck':<15}{'layout kept':<13}{'result'}")
    for r in grows:
        print(f"  {r['formula']:<8}{r['forward']:<8}{str(r['rank']) + '-D':<6}{r['layout']:<15}"
              f"{'yes' if r['affine'] else 'no':<8}{r['gradcheck']:<11}{r['gradgradcheck']:<15}"
              f"{'yes' if r['layout_kept'] else 'NO':<13}{'pass' if r['ok'] else 'FAIL'}")
        for k in ("gradcheck_error", "gradgradcheck_error", "layout_error"):
            if r.get(k):
                print(f"      {k.replace('_error', '')}: {r[k]}")

    print("\n2. parity with torch.nn.functional.batch_norm (same dtype; float32 weight/bias/running stats): "
          "max |bnx - torch| / max(1, max |torch|)")
    prows = _parity(dev)
    print(f"  {'dtype':<10}{'rank':<6}{'layout':<15}{'mode':<7}{'output':>9}{'grad_in':>9}{'grad_w':>9}"
          f"{'grad_b':>9}{'run_mean':>9}{'run_var':>9}{'tol':>9}   {'torch vs fp64':>13}  result")
    for r in prows:
        tv = [r.get(k + "_torch_vs_fp64") for k in ("y", "gx", "gw", "gb")]
        tv = max([v for v in tv if v is not None], default=None)
        print(f"  {r['dtype']:<10}{str(r['rank']) + '-D':<6}{r['layout']:<15}{r['mode']:<7}"
              + "".join(f"{_e(r.get(k)) if k in r else '-':>9}" for k in ("y", "gx", "gw", "gb", "rm", "rv"))
              + f"{r['tol']:>9.0e}   {_e(tv):>13}  {'pass' if r['ok'] else 'FAIL'}"
              + ("" if r["layout_kept"] or r["error"] else "  (layout/dtype not kept)"))
        if r["error"]:
            print(f"      bnx: {r['error']}")

    n_ok = sum(r["ok"] for r in grows) + sum(r["ok"] for r in prows)
    n = len(grows) + len(prows)
    ok = n_ok == n
    print(f"\nresult: {'PASS' if ok else 'FAIL'} ({n_ok}/{n} checks passed on {dev}, "
          f"{time.perf_counter() - t0:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(dev), device_name=name, torch=torch.__version__, passed=ok,
                           gradcheck=grows, parity=prows), f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0 if ok else 1


def main(argv=None):
    import sys
    from .__main__ import main as cli_main
    return cli_main(["check"] + list(sys.argv[1:] if argv is None else argv))
