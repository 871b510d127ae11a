"""Benchmark bnx vs native BatchNorm and torch.compile: `python benchmarks/bench.py --help`.

A thin wrapper: the engine is bnx/bench.py, also reachable as `python -m bnx bench`.
"""
import os
import sys

try:
    import bnx.bench as _bench
except ImportError:  # running from a source checkout without the package on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import bnx.bench as _bench


def main(argv=None):
    return _bench.main(argv)


if __name__ == "__main__":
    sys.exit(main())
