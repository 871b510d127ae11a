"""Memory safety of the C++ code: the tests again under AddressSanitizer and UndefinedBehaviorSanitizer.

Each test runs `scripts/sanitize.sh` in a child process: the CPU suite against a copy of bnx built with both
sanitizers, and the emulated CUDA kernels (tests/test_cuda_emulation.py) built with both. A read or write
outside a tensor or buffer, including a load whose value is never used (which no value check can see, and
which is an illegal address on a GPU), or a signed overflow in index arithmetic aborts the child with the
sanitizer's report, and the test fails with it. Planted bugs that pass every value check and fail here: an
extra masked load in the CUDA `load_batch` (past the end of a channels-last input; from an unset offset in
the plane walk), a signed overflow planted there, a read one element past the input in the CPU statistics
kernel. Not covered: the emulation's `__shared__` arrays (thread_local variables, no redzones) and the
CUDA kernels on a GPU (compute-sanitizer there). The emulation run is the longer: about 25 minutes of a full
run at afc16b3, its build included (17 minutes of tests alone; float16 has been left out of it since, see
DTYPES in tests/test_cuda_emulation.py), hence a 45-minute limit for each run.
"""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIPPED = 77  # the script's exit status when the compiler has no sanitizer runtime

pytestmark = pytest.mark.skipif(bool(os.environ.get("BNX_SANITIZED")), reason="already the sanitized run")


def _run_sanitized(mode):
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "sanitize.sh"), mode, "-x"], cwd=ROOT,
                       capture_output=True, text=True, timeout=2700)
    if r.returncode == SKIPPED:
        pytest.skip(r.stdout.strip())
    out = r.stdout + r.stderr
    report = [ln for ln in out.splitlines()
              if "Sanitizer" in ln or "runtime error" in ln or " passed" in ln or " failed" in ln
              or ln.startswith(("FAILED", "E ", "    #0 ", "SUMMARY"))]
    assert r.returncode == 0, "\n".join(report[-40:] or out[-4000:].splitlines())
    assert " passed" in r.stdout, out[-4000:]
    assert "ERROR: AddressSanitizer" not in out and "runtime error" not in out, "\n".join(report[-40:])


def test_cpu_ops_under_sanitizers():
    """The CPU suite (parity, gradcheck, edge cases, errors, ...) with bnx._C built with both sanitizers."""
    _run_sanitized("cpu")


def test_emulated_cuda_kernels_under_sanitizers():
    """Every emulated CUDA op case with the kernels built with both sanitizers."""
    _run_sanitized("emulation")
