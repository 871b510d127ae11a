"""Command-line interface: ``python -m bnx [explain|check|bench] ...``.

With no subcommand it runs ``explain``. Usage errors print one line to stderr and exit 2; failures (no CUDA
for ``--device cuda``, a failed check, an exception) print one line to stderr and exit 1.
Set BNX_DEBUG=1 to get the full traceback of an unexpected exception.
"""

import argparse
import os
import sys

PROG = "python -m bnx"


class UsageError(Exception):
    """Bad command line (exit 2)."""


class Failure(Exception):
    """Environment or runtime failure with a clear message (exit 1)."""


class CLIParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr (exit 2) instead of usage + message."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


_FMT = argparse.RawDescriptionHelpFormatter

EXPLAIN_HELP = """\
Show, on a small float64 CNN with synthetic data, what the batch-statistics (train mode) gradient of
BatchNorm is:
  1. native train mode vs native eval mode with running stats set to the batch statistics: the loss and
     outputs are equal, the gradients of every layer upstream of a BN are not;
  2. bnx backward="batch" reproduces the train-mode gradients and backward="frozen" the eval-mode ones,
     exactly;
  3. per BN layer, the input gradient split into the direct (frozen) term, the term through the batch mean
     and the term through the batch variance (bnx.decompose_input_gradient), checked to add up.
Exit status 0 when every check holds, 1 otherwise."""

CHECK_HELP = """\
Verify bnx on one device: torch.autograd.gradcheck and gradgradcheck (float64) of the "batch" formula
(training forward) and the "frozen" formula (eval forward, constant running stats) over memory layouts
(contiguous, channels_last), ranks 2-D..5-D and affine on/off; then float32/bfloat16 parity with
torch.nn.functional.batch_norm (outputs, grads, running stats). Prints a pass/fail table with max errors.
Exit status 0 when everything passes, 1 otherwise."""

BENCH_HELP = """\
Time bnx against native F.batch_norm (cuDNN on and off) and torch.compile (GPU) on the ResNet-50
BatchNorm shapes (CPU: two small shapes), per pass, dtype and layout. Reports microseconds, speedups and
"frac" = compulsory bytes / time / copy bandwidth (a device-to-device copy measured in the same run).
Passes (compulsory bytes, E elements of b bytes):
  train_fwd 2Eb, train_bwd 3Eb (backward only), train_fwd_bwd 5Eb, eval_fwd 2Eb,
  frozen_bwd_wgrad 3Eb (eval backward, x/weight/bias grads), frozen_bwd_dx 2Eb (x grad only),
  bnx_train_frozen 5Eb (bnx training forward + backward="frozen"; peers: native training fwd+bwd).
GPU: CUDA-event medians of device time (host launch time reported separately); CPU: wall-clock medians, implementations
called in alternation.
Progress on stderr, summary on stdout; --json/--md/--plot write results. Same tool as benchmarks/bench.py."""


def build_parser():
    from . import bench, check, explain

    p = CLIParser(prog=PROG, formatter_class=_FMT,
                  description="bnx: BatchNorm with a choice of backward formula (\"batch\" or \"frozen\").\n"
                              "Subcommands: explain (default), check, bench. "
                              "'python -m bnx SUBCOMMAND --help' explains each.")
    sub = p.add_subparsers(dest="command", metavar="{explain,check,bench}", parser_class=CLIParser)
    pe = sub.add_parser("explain", help="what the batch-statistics gradient is (default subcommand)",
                        description=EXPLAIN_HELP, formatter_class=_FMT)
    explain.add_arguments(pe)
    pc = sub.add_parser("check", help="gradcheck/gradgradcheck and parity with torch on one device",
                        description=CHECK_HELP, formatter_class=_FMT)
    check.add_arguments(pc)
    pb = sub.add_parser("bench", help="benchmark bnx against native BatchNorm and torch.compile",
                        description=BENCH_HELP, formatter_class=_FMT)
    bench.add_arguments(pb)
    return p


def require_device(device):
    """Raise Failure with one clear line when the device can't be used."""
    import torch

    if device is not None and str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise Failure(f"--device {device} requested but CUDA is not available "
                          f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
        if not cuda_kernels_built():
            raise Failure(f"--device {device} requested but this build of bnx has no CUDA kernels "
                          "(rebuild it where nvcc and a CUDA torch are available)")


def cuda_kernels_built():
    import bnx

    f = getattr(bnx, "has_cuda_kernels", None)
    return True if f is None else bool(f())


def default_device():
    import torch

    return "cuda" if torch.cuda.is_available() and cuda_kernels_built() else "cpu"


def _one_line(e):
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # no subcommand (or only options) -> explain, the built-in default
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["explain"] + argv
    args = parser.parse_args(argv)
    args.cli_argv = argv
    cmd = args.command
    prog = f"{PROG} {cmd}"
    try:
        if cmd == "explain":
            from . import explain
            require_device(args.device)
            return explain.run(args)
        if cmd == "check":
            from . import check
            require_device(args.device)
            return check.run(args)
        if cmd == "bench":
            from . import bench
            require_device(args.device)
            try:
                return bench.run(args)
            except bench.BenchUsageError as e:
                raise UsageError(str(e))
            except bench._NoCuda as e:
                raise Failure(str(e))
        parser.error(f"unknown command {cmd!r}")
    except UsageError as e:
        sys.stderr.write(f"{prog}: error: {e} (see '{prog} --help')\n")
        return 2
    except Failure as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except Exception as e:  # one clear line, not a traceback
        if os.environ.get("BNX_DEBUG"):
            raise
        sys.stderr.write(f"{prog}: error: {_one_line(e)} (set BNX_DEBUG=1 for the traceback)\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
