"""What the batch-statistics gradient of BatchNorm is, and what it is not.

Library function: :func:`decompose_input_gradient` (exported as ``bnx.decompose_input_gradient``)
splits the training-mode (batch statistics) input gradient of a BatchNorm layer into

* ``direct``       = w * invstd * dy                              (the frozen / eval-mode term)
* ``through_mean`` = -w * invstd * mean(dy)                       (gradient through the batch mean)
* ``through_var``  = -w * invstd * xhat * mean(dy * xhat)         (gradient through the batch variance)

with means per channel over all dimensions but C, ``xhat = (x - mean) * invstd`` and
``invstd = 1 / sqrt(biased_var + eps)``. ``total`` is their sum, i.e. the batch-formula grad_input.

``python -m bnx explain`` (``run(args)`` here) demonstrates it on a small CNN.

This module only imports torch at import time (bnx/__init__.py imports it), the rest of bnx lazily.
"""

import json
import math
import sys

import torch

from .functional import _DTYPES

__all__ = ["decompose_input_gradient", "run", "add_arguments"]


def _reduce_dims(t):
    return [0] + list(range(2, t.dim()))


def decompose_input_gradient(input, grad_output, weight=None, eps=1e-5):
    """Split the batch-statistics BatchNorm input gradient into its three terms.

    Args:
        input: the BatchNorm input x, shape (N, C, *) (any rank >= 2, any memory format / dtype).
        grad_output: dL/dy at the BatchNorm output, same shape as ``input``.
        weight: optional per-channel scale (C,) (None means 1).
        eps: the layer's eps.

    Returns:
        dict with tensors ``direct``, ``through_mean``, ``through_var`` and ``total`` (all shaped like
        ``input``, in ``input``'s dtype and memory format). ``total = direct + through_mean + through_var``
        is the training-mode grad_input of ``torch.nn.functional.batch_norm`` (and of bnx with
        ``backward="batch"``); ``direct`` alone is the grad_input of the frozen formula (eval mode with the
        running statistics equal to this batch's mean and biased variance, or bnx ``backward="frozen"``).

    The math is done in float64 for float64 input and in float32 otherwise.
    """
    x, dy = input, grad_output
    for name, t in (("input", x), ("grad_output", dy), ("weight", weight)):
        if t is None and name == "weight":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"decompose_input_gradient: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:  # integer input would be averaged in integers: wrong numbers
            raise TypeError(
                f"decompose_input_gradient: {name} must be float64, float32, float16 or bfloat16, got {t.dtype}")
        if t.device != x.device:
            raise RuntimeError(
                f"decompose_input_gradient: expected all tensors on the same device, but input is on {x.device} "
                f"and {name} is on {t.device}")
    if x.dim() < 2:
        raise ValueError(f"decompose_input_gradient: input must be (N, C, *), got shape {tuple(x.shape)}")
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(
            f"decompose_input_gradient: grad_output shape {tuple(dy.shape)} != input shape {tuple(x.shape)}")
    C = x.shape[1]
    if weight is not None and weight.numel() != C:
        raise ValueError(f"decompose_input_gradient: weight has {weight.numel()} elements, expected C={C}")
    eps = float(eps)
    if not eps > 0.0:  # as training-mode batch_norm: with eps <= 0 a constant channel divides by zero
        raise ValueError(f"decompose_input_gradient: eps must be positive, got {eps}")
    if C and x.numel() == C:  # as training-mode batch_norm: one value has no batch statistics to speak of
        raise ValueError(
            f"decompose_input_gradient: expected more than 1 value per channel, got input size {list(x.shape)}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.numel() == 0:
        z = torch.zeros_like(x)
        return dict(direct=z, through_mean=z.clone(), through_var=z.clone(), total=z.clone())

    dims = _reduce_dims(x)
    view = [1, C] + [1] * (x.dim() - 2)
    xa = x.to(acc)
    dya = dy.to(acc)
    if dya.stride() != xa.stride():  # compute in x's layout, so the results come out in it
        dya = torch.empty_like(xa).copy_(dya)
    mean = xa.mean(dims, keepdim=True)
    xmu = xa - mean
    var = (xmu * xmu).mean(dims, keepdim=True)  # biased, as used for normalization
    invstd = torch.rsqrt(var + eps)
    xhat = xmu * invstd
    scale = invstd if weight is None else invstd * weight.to(acc).reshape(view)

    direct = scale * dya
    mean_dy = dya.mean(dims, keepdim=True)
    mean_dy_xhat = (dya * xhat).mean(dims, keepdim=True)
    # full-size tensor laid out like x (empty_like keeps x's memory format)
    through_mean = torch.empty_like(xa).copy_((-scale * mean_dy).expand_as(xa))
    through_var = -(scale * mean_dy_xhat) * xhat
    total = direct + through_mean + through_var

    def out(t):
        return t.to(x.dtype) if t.dtype != x.dtype else t

    return dict(direct=out(direct), through_mean=out(through_mean), through_var=out(through_var), total=out(total))


# --------------------------------------------------------------------------------------------------
# the `python -m bnx explain` demonstration
# --------------------------------------------------------------------------------------------------

MODEL_TEXT = "conv3x3(3->8)-BN-ReLU-conv3x3(8->16)-BN-ReLU-avgpool-linear(16->10), no conv bias"
EQUAL_TOL = 1e-10  # float64: anything below this is rounding


def _int_at_least(lo):
    import argparse

    def conv(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}")
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return conv


def add_arguments(p):
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where to run (default cpu; the demo is tiny and runs in float64)")
    p.add_argument("--batch-size", type=_int_at_least(2), default=8, metavar="N", help="images per batch (default 8, >= 2)")
    p.add_argument("--image-size", type=_int_at_least(1), default=16, metavar="S", help="synthetic images are 3xSxS (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and synthetic data (default 0)")
    p.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the per-layer gradient-term norms")
    p.add_argument("--json", metavar="FILE", help="write every number printed (and more) as JSON")


def _make_model(norm_cls, **norm_kw):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        norm_cls(8, **norm_kw),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        norm_cls(16, **norm_kw),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


_NAMES = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "8": "fc"}


def _pname(name):
    mod, _, leaf = name.partition(".")
    return f"{_NAMES.get(mod, mod)}.{leaf}"


def _maxabs(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def _fmt(v):
    if v is None:
        return "n/a"
    if v == 0:
        return "0"
    return f"{v:.2e}"


def _verdict(v, tol=EQUAL_TOL):
    return "EQUAL" if v is not None and v <= tol else "DIFFERENT"


def _grads(model, loss):
    params = [p for p in model.parameters()]
    gs = torch.autograd.grad(loss, params)
    return {_pname(n): g for (n, _), g in zip(model.named_parameters(), gs)}


def _section(title, question):
    bar = "=" * 100
    print(f"\n{bar}\n{title}\nQuestion: {question}\n{bar}")


def run(args):
    """Run the demonstration. Returns a process exit code (0: every check held)."""
    from . import functional as bnxF  # noqa: F401  (makes sure the package imports)
    from .modules import BatchNorm2d as BnxBatchNorm2d

    if args.batch_size < 2:
        raise ValueError("--batch-size must be >= 2 (batch statistics need more than one value per channel)")
    dev = torch.device(args.device)
    dt = torch.float64
    torch.manual_seed(args.seed)
    native = _make_model(torch.nn.BatchNorm2d).to(dev, dt)
    S = args.image_size
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    x = torch.randn(args.batch_size, 3, S, S, generator=gen, dtype=dt).to(dev)
    target = torch.randint(0, 10, (args.batch_size,), generator=gen).to(dev)
    lossf = torch.nn.CrossEntropyLoss()
    state0 = {k: v.clone() for k, v in native.state_dict().items()}
    bn_idx = [i for i, m in enumerate(native) if isinstance(m, torch.nn.BatchNorm2d)]
    bn_names = [_NAMES[str(i)] for i in bn_idx]
    report = {
        "config": dict(model=MODEL_TEXT, dtype="float64", device=str(dev), batch_size=args.batch_size,
                       image_size=S, seed=args.seed, torch=torch.__version__),
    }
    ok = True

    print("bnx explain: the batch-statistics gradient of BatchNorm, and what bnx does with it")
    print(f"model: {MODEL_TEXT}; float64 on {dev}; synthetic batch {args.batch_size}x3x{S}x{S}, "
          f"10 classes, cross-entropy loss, seed {args.seed}")

    # ---- native, train mode, with hooks capturing BN input x, output grad dy and input grad dx -------
    captured = {}

    def hook_for(name):
        def fwd_hook(mod, inp, out):
            xin = inp[0]
            rec = captured.setdefault(name, {})
            rec["x"] = xin.detach()
            rec["weight"] = mod.weight.detach()
            rec["eps"] = mod.eps
            if xin.requires_grad:
                xin.register_hook(lambda g: rec.__setitem__("dx", g.detach()))
            out.register_hook(lambda g: rec.__setitem__("dy", g.detach()))
        return fwd_hook

    handles = [native[i].register_forward_hook(hook_for(n)) for i, n in zip(bn_idx, bn_names)]
    native.train()
    out_train = native(x)
    loss_train = lossf(out_train, target)
    g_train = _grads(native, loss_train)
    for h in handles:
        h.remove()

    # ---- native, eval mode, running stats := batch statistics (biased variance) ---------------------
    native_eval = _make_model(torch.nn.BatchNorm2d).to(dev, dt)
    native_eval.load_state_dict(state0)
    for i, n in zip(bn_idx, bn_names):
        xb = captured[n]["x"]
        dims = _reduce_dims(xb)
        native_eval[i].running_mean.copy_(xb.mean(dims))
        native_eval[i].running_var.copy_(xb.var(dims, unbiased=False))
    native_eval.eval()
    out_eval = native_eval(x)
    loss_eval = lossf(out_eval, target)
    g_eval = _grads(native_eval, loss_eval)

    # ================================ section 1 ========================================================
    _section("1. Native PyTorch: train mode vs eval mode with running statistics = this batch's statistics",
             "the forward passes compute the same numbers; are the gradients the same too?")
    out_diff = _maxabs(out_train, out_eval)
    loss_diff = abs(loss_train.item() - loss_eval.item())
    print(f"  loss, train mode:                 {loss_train.item():.17g}")
    print(f"  loss, eval mode:                  {loss_eval.item():.17g}")
    print(f"  max |loss difference|           = {_fmt(loss_diff)}  -> {_verdict(loss_diff)}")
    print(f"  max |output difference|         = {_fmt(out_diff)}  -> {_verdict(out_diff)}")
    last_bn = bn_idx[-1]
    rows = []
    print("\n  parameter       where                ||g_train - g_eval|| / ||g_train||   verdict")
    all_as_expected = True
    for (n, _), (pn, gt) in zip(native.named_parameters(), g_train.items()):
        ge = g_eval[pn]
        mod_i = int(n.split(".")[0])
        before = mod_i < last_bn
        kind = type(native[mod_i]).__name__
        where = "before the last BN" if before else ("last BN" if mod_i == last_bn else "after the last BN")
        denom = gt.norm().item()
        rel = (gt - ge).norm().item() / denom if denom > 0 else float("inf")
        differs = rel > EQUAL_TOL
        as_expected = differs == before
        all_as_expected &= as_expected
        rows.append(dict(parameter=pn, module=kind, position=where, rel_diff=rel,
                         differs=differs, expected_to_differ=before))
        print(f"  {pn:<15} {where:<20} {rel:>14.3e}                      "
              f"{'differs' if differs else 'equal'}{'' if as_expected else '  (UNEXPECTED)'}")
    ok &= all_as_expected and out_diff <= EQUAL_TOL and loss_diff <= EQUAL_TOL
    print("\nAnswer: the forward passes are identical (loss and outputs equal to rounding), but the gradients "
          "are NOT:\n  every parameter upstream of a BN input gets a different gradient, because in train mode "
          "the batch mean and\n  variance are functions of that input and the gradient also flows through "
          "them; eval mode treats them as\n  constants. Parameters after the last BN (and that BN's own weight "
          "and bias) get the same gradient in both modes."
          + ("" if all_as_expected else "\n  WARNING: the pattern above is not the expected one."))
    report["section1"] = dict(loss_train=loss_train.item(), loss_eval=loss_eval.item(),
                              max_abs_loss_diff=loss_diff, max_abs_output_diff=out_diff,
                              gradients=rows, pattern_as_expected=all_as_expected)

    # ================================ section 2 ========================================================
    _section("2. bnx: backward=\"batch\" and backward=\"frozen\", both in train mode (batch-statistics forward)",
             "does bnx reproduce each of the two native gradients exactly?")
    sec2 = {}
    for formula, ref_g, ref_out, ref_name in (("batch", g_train, out_train, "native train mode"),
                                              ("frozen", g_eval, out_eval, "native eval mode, running stats = batch stats")):
        m = _make_model(BnxBatchNorm2d, backward=formula).to(dev, dt)
        m.load_state_dict(state0)
        m.train()
        o = m(x)
        g = _grads(m, lossf(o, target))
        od = _maxabs(o, ref_out)
        gd = max(_maxabs(g[k], ref_g[k]) for k in g)
        per = {k: _maxabs(g[k], ref_g[k]) for k in g}
        okf = od <= EQUAL_TOL and gd <= EQUAL_TOL
        ok &= okf
        sec2[formula] = dict(reference=ref_name, max_abs_output_diff=od, max_abs_grad_diff=gd, per_parameter=per,
                             equal=okf)
        print(f"  bnx backward={formula!r:<9} vs {ref_name}:")
        print(f"      max |output diff| = {_fmt(od)}   max |grad diff| over all parameters = {_fmt(gd)}"
              f"  -> {_verdict(max(od, gd))}")
    print("\nAnswer: " + ("yes. backward=\"batch\" gives the train-mode gradients and backward=\"frozen\" gives the "
                          "eval-mode (frozen statistics)\n  gradients, while both normalize with the batch "
                          "statistics in the forward pass."
                          if sec2["batch"]["equal"] and sec2["frozen"]["equal"] else
                          "NO - see the differences above (this is a bug)."))
    report["section2"] = sec2

    # ================================ section 3 ========================================================
    _section("3. The batch-statistics input gradient of each BN layer, term by term",
             "what does the gradient through the batch mean and variance add to the direct (frozen) term?")
    print("  dL/dx = direct + through_mean + through_var, per channel (means over N, H, W):\n"
          "    direct       =  w * invstd * dy                          (all that eval mode / backward=\"frozen\" keeps)\n"
          "    through_mean = -w * invstd * mean(dy)\n"
          "    through_var  = -w * invstd * xhat * mean(dy * xhat)\n"
          "  library: bnx.decompose_input_gradient(input, grad_output, weight, eps) -> dict of the four tensors\n")
    print(f"  {'layer':<6}{'||direct||':>12}{'||thr_mean||':>14}{'||thr_var||':>13}{'||total||':>12}"
          f"{'cos(direct,total)':>19}{'max|sum - grad|':>17}{'vs bnx op':>11}")
    sec3 = {}
    max_err = 0.0
    bnx_op_err = None
    for n in bn_names:
        rec = captured[n]
        d = decompose_input_gradient(rec["x"], rec["dy"], rec["weight"], rec["eps"])
        err = _maxabs(d["total"], rec["dx"])
        max_err = max(max_err, err)
        norms = {k: v.norm().item() for k, v in d.items()}
        cos = (d["direct"] * d["total"]).sum().item() / max(norms["direct"] * norms["total"], 1e-300)
        # orthogonality: the batch gradient sums to 0 and is orthogonal to xhat, per channel
        dims = _reduce_dims(rec["x"])
        xm = rec["x"] - rec["x"].mean(dims, keepdim=True)
        sum_tot = d["total"].sum(dims).abs().max().item()
        sum_tot_x = (d["total"] * xm).sum(dims).abs().max().item()
        # the same numbers from the bnx backward op
        op_err = None
        try:
            xb = rec["x"]
            mean = xb.mean(dims)
            invstd = torch.rsqrt(xb.var(dims, unbiased=False) + rec["eps"])
            gi_b = torch.ops.bnx.batch_norm_backward(rec["dy"], xb, mean, invstd, rec["weight"], "batch",
                                                     [True, False, False])[0]
            gi_f = torch.ops.bnx.batch_norm_backward(rec["dy"], xb, mean, invstd, rec["weight"], "frozen",
                                                     [True, False, False])[0]
            op_err = max(_maxabs(gi_b, d["total"]), _maxabs(gi_f, d["direct"]))
            bnx_op_err = op_err if bnx_op_err is None else max(bnx_op_err, op_err)
        except (AttributeError, RuntimeError, NotImplementedError):
            pass
        sec3[n] = dict(norm_direct=norms["direct"], norm_through_mean=norms["through_mean"],
                       norm_through_var=norms["through_var"], norm_total=norms["total"],
                       cos_direct_total=cos, max_abs_error=err, max_abs_channel_sum_of_total=sum_tot,
                       max_abs_channel_sum_of_total_times_xmu=sum_tot_x, max_abs_diff_vs_bnx_op=op_err)
        print(f"  {n:<6}{norms['direct']:>12.4e}{norms['through_mean']:>14.4e}{norms['through_var']:>13.4e}"
              f"{norms['total']:>12.4e}{cos:>19.6f}{err:>17.2e}{_fmt(op_err):>11}")
    ok &= max_err <= EQUAL_TOL and (bnx_op_err is None or bnx_op_err <= EQUAL_TOL)
    print(f"\n  decomposition check: max |direct + through_mean + through_var - batch grad| = {max_err:.3e}"
          f"  -> {'PASS' if max_err <= EQUAL_TOL else 'FAIL'}")
    if bnx_op_err is not None:
        print(f"  bnx op check: max |batch_norm_backward('batch') - total|, |('frozen') - direct| = "
              f"{bnx_op_err:.3e}  -> {'PASS' if bnx_op_err <= EQUAL_TOL else 'FAIL'}")
    per_layer = []
    for n in bn_names:
        v = sec3[n]
        extra = _maxabs_norm_ratio(v)
        angle = math.degrees(math.acos(max(-1.0, min(1.0, v["cos_direct_total"]))))
        v["angle_direct_total_deg"] = angle
        v["norm_ratio_extra_to_direct"] = extra
        per_layer.append(f"{n}: {angle:.1f} degrees, ||through_mean + through_var|| / ||direct|| = {extra:.2f}")
    print("\nAnswer: the two extra terms remove, per channel, the mean of dy and its component along xhat, so "
          "the batch\n  gradient sums to zero and is orthogonal to xhat in every channel (max |channel sum| = "
          f"{max(v['max_abs_channel_sum_of_total'] for v in sec3.values()):.1e}).\n  Angle between the batch "
          "gradient and the direct term:\n    " + "\n    ".join(per_layer)
          + "\n  Eval mode (and backward=\"frozen\") keeps only the direct term; the differences compound "
          "through the layers\n  below (section 1).")
    report["section3"] = dict(layers=sec3, max_abs_error=max_err, max_abs_diff_vs_bnx_op=bnx_op_err)
    report["all_checks_passed"] = bool(ok)

    print(f"\nsummary: {'all checks passed' if ok else 'SOME CHECKS FAILED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        _plot(report, bn_names, args.plot)
        print(f"wrote {args.plot}")
    return 0 if ok else 1


def _maxabs_norm_ratio(v):
    # ||through_mean + through_var|| = ||total - direct||; from the norms and the cosine
    d, t, c = v["norm_direct"], v["norm_total"], v["cos_direct_total"]
    return math.sqrt(max(d * d + t * t - 2 * d * t * c, 0.0)) / d if d > 0 else float("nan")


def _plot(report, bn_names, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    terms = [("norm_direct", "direct (frozen)"), ("norm_through_mean", "through mean"),
             ("norm_through_var", "through variance"), ("norm_total", "total (batch)")]
    width = 0.2
    layers = report["section3"]["layers"]
    for j, (key, label) in enumerate(terms):
        ax1.bar([i + (j - 1.5) * width for i in range(len(bn_names))], [layers[n][key] for n in bn_names],
                width, label=label)
    ax1.set_xticks(range(len(bn_names)))
    ax1.set_xticklabels(bn_names)
    ax1.set_ylabel("L2 norm of the input-gradient term")
    ax1.set_title("batch-statistics input gradient, by term")
    ax1.legend(fontsize=8)
    rows = report["section1"]["gradients"]
    vals = [max(r["rel_diff"], 1e-18) for r in rows]
    colors = ["tab:red" if r["expected_to_differ"] else "tab:green" for r in rows]
    ax2.bar(range(len(rows)), vals, color=colors)
    ax2.set_yscale("log")
    ax2.set_xticks(range(len(rows)))
    ax2.set_xticklabels([r["parameter"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax2.set_ylabel("||g_train - g_eval|| / ||g_train||")
    ax2.set_title("train vs eval gradients (red: upstream of a BN)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    from .__main__ import main as cli_main
    return cli_main(["explain"] + list(sys.argv[1:] if argv is None else argv))
