"""The command line (`python -m bnx explain|check|bench`, benchmarks/bench.py) and bnx.decompose_input_gradient."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bnx
from bnx.explain import decompose_input_gradient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available() and bnx.has_cuda_kernels()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (or bnx built without CUDA kernels)")
no_cuda_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")


def run_bnx(*args, timeout=300, cmd=None, extra_env=None):
    env = dict(os.environ)
    env.pop("BNX_DEBUG", None)
    env.update(extra_env or {})
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = cmd or [sys.executable, "-m", "bnx"]
    return subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def stderr_lines(p):
    # torch may warn on import (e.g. about CUDA_HOME) - keep our own lines
    return [ln for ln in p.stderr.splitlines() if ln.strip() and "cpp_extension" not in ln and "Warning" not in ln]


def _num(pattern, text):
    m = re.search(pattern, text)
    assert m, f"pattern {pattern!r} not found in output:\n{text}"
    return float(m.group(1))


# --------------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------------

def _check_explain_output(out):
    assert "Question:" in out and "Answer:" in out
    # 1. loss and outputs equal, gradients differ before the last BN, equal after
    assert _num(r"max \|loss difference\|\s*=\s*(\S+)", out) < 1e-10
    assert _num(r"max \|output difference\|\s*=\s*(\S+)", out) < 1e-10
    assert re.search(r"conv1\.weight\s+before the last BN\s+\S+\s+differs", out)
    assert re.search(r"fc\.weight\s+after the last BN\s+\S+\s+equal", out)
    assert "UNEXPECTED" not in out
    # 2. bnx reproduces both
    diffs = re.findall(r"max \|grad diff\| over all parameters = (\S+)\s+-> (EQUAL|DIFFERENT)", out)
    assert len(diffs) == 2 and all(v == "EQUAL" and float(d) < 1e-10 for d, v in diffs), diffs
    # 3. the decomposition adds up
    err = _num(r"decomposition check: max \|direct \+ through_mean \+ through_var - batch grad\| = (\S+)", out)
    assert err < 1e-10
    assert "summary: all checks passed" in out


def test_explain_default_and_outputs(tmp_path):
    js, png = tmp_path / "e.json", tmp_path / "e.png"
    p = run_bnx("explain", "--json", js, "--plot", png)
    assert p.returncode == 0, p.stderr
    _check_explain_output(p.stdout)
    d = json.loads(js.read_text())
    assert d["all_checks_passed"] is True
    s1, s2, s3 = d["section1"], d["section2"], d["section3"]
    assert s1["max_abs_output_diff"] < 1e-10 and s1["pattern_as_expected"]
    rows = {r["parameter"]: r for r in s1["gradients"]}
    assert rows["conv1.weight"]["differs"] and rows["conv2.weight"]["differs"]
    assert not rows["fc.weight"]["differs"] and not rows["fc.bias"]["differs"]
    assert s2["batch"]["max_abs_grad_diff"] < 1e-10 and s2["frozen"]["max_abs_grad_diff"] < 1e-10
    assert set(s3["layers"]) == {"bn1", "bn2"}
    assert s3["max_abs_error"] < 1e-10
    printed = _num(r"decomposition check: .*= (\S+)", p.stdout)
    assert abs(printed - s3["max_abs_error"]) <= 1e-3 * max(printed, 1e-300) + 1e-300
    for layer in s3["layers"].values():
        assert layer["max_abs_error"] < 1e-10
        # the decomposition's norms are consistent: ||total|| <= sum of the norms of the terms
        assert layer["norm_total"] <= layer["norm_direct"] + layer["norm_through_mean"] + layer["norm_through_var"] + 1e-12
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_subcommand_runs_explain():
    p = run_bnx("--seed", "1", "--batch-size", "4")
    assert p.returncode == 0, p.stderr
    _check_explain_output(p.stdout)
    assert "seed 1" in p.stdout


@requires_cuda
def test_explain_cuda():
    p = run_bnx("explain", "--device", "cuda")
    assert p.returncode == 0, p.stderr
    _check_explain_output(p.stdout)


# --------------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------------

def _check_check_output(p, device):
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    out = p.stdout
    assert "gradcheck" in out and "gradgradcheck" in out and "parity" in out
    assert re.search(r"result: PASS \((\d+)/\1 checks passed on " + device, out), out[-2000:]
    assert "FAIL" not in out
    for formula in ("batch", "frozen"):
        for rank in ("2-D", "3-D", "4-D", "5-D"):
            assert re.search(rf"{formula}\s+\w+\s+{rank}\s+contiguous", out)
        assert re.search(rf"{formula}\s+\w+\s+4-D\s+channels_last", out)
    assert re.search(r"bfloat16\s+4-D\s+channels_last\s+train", out)


def test_check_cpu(tmp_path):
    js = tmp_path / "c.json"
    p = run_bnx("check", "--device", "cpu", "--json", js)
    _check_check_output(p, "cpu")
    d = json.loads(js.read_text())
    assert d["passed"] is True and all(r["ok"] for r in d["gradcheck"] + d["parity"])


@requires_cuda
def test_check_cuda():
    _check_check_output(run_bnx("check", "--device", "cuda"), "cuda")


# --------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------

def _check_bench_json(d, shape, passes, layouts):
    assert d["env"]["device_type"] == "cpu" and d["env"]["torch"] == torch.__version__
    assert d["copy_gbps"] > 0
    assert "bench" in d["command"]
    cases = d["cases"]
    assert len(cases) == len(passes) * len(layouts)
    for c in cases:
        assert c["shape"] == list(shape) and c["pass"] in passes and c["layout"] in layouts
        assert c["times_us"]["bnx"] > 0 and c["times_us"]["native"] > 0
        assert c["frac"]["bnx"] > 0 and c["speedup"]["native"] > 0
        E = 1
        for s in shape:
            E *= s
        factor = {"train_fwd": 2, "train_bwd": 3, "train_fwd_bwd": 5, "eval_fwd": 2, "frozen_bwd_wgrad": 3,
                  "frozen_bwd_dx": 2, "bnx_train_frozen": 5}[c["pass"]]
        assert c["compulsory_bytes"] == factor * E * 4
        frac = c["compulsory_bytes"] / (c["times_us"]["bnx"] * 1e-6) / (d["copy_gbps"] * 1e9)
        assert abs(frac - c["frac"]["bnx"]) <= 1e-9 * frac
        assert c["speedup"]["native"] == pytest.approx(c["times_us"]["native"] / c["times_us"]["bnx"])
        if c["pass"] != "bnx_train_frozen":
            assert c["max_rel_diff_vs_native"] is not None and c["max_rel_diff_vs_native"] < 1e-3
    assert d["summary"]["rows"] and d["summary"]["min_frac_bnx"] > 0


def test_bench_cpu_quick(tmp_path):
    js, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    shape = (4, 8, 6, 6)
    p = run_bnx("bench", "--device", "cpu", "--quick", "--shapes", "4,8,6,6", "--reps", "3", "--threads", "1",
                "--json", js, "--md", md, "--plot", png)
    assert p.returncode == 0, p.stderr
    _check_bench_json(json.loads(js.read_text()), shape, set(
        ["train_fwd", "train_bwd", "train_fwd_bwd", "eval_fwd", "frozen_bwd_wgrad", "frozen_bwd_dx",
         "bnx_train_frozen"]), {"nchw", "nhwc"})
    text = md.read_text()
    assert "| train_fwd_bwd | fp32 | nhwc | 4,8,6,6 |" in text and "copy bandwidth" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"\[1/14\] train_fwd fp32 nchw 4,8,6,6 \.\.\. bnx", p.stderr)
    assert "min frac (bnx)" in p.stdout and "geomean" in p.stdout


def test_bench_reports_bnx_settings(tmp_path):
    """The BNX_* switches in effect are part of the results (they select kernels): in the JSON, the
    markdown header and the progress log."""
    md, js = tmp_path / "b.md", tmp_path / "b.json"
    p = run_bnx("bench", "--device", "cpu", "--quick", "--shapes", "2,4,3,3", "--passes", "eval_fwd", "--reps", "2",
                "--threads", "1", "--layout", "nchw", "--md", md, "--json", js,
                extra_env={"BNX_CUDA_L2_GROUPS": "1", "BNX_CPU_KERNELS": "default"})
    assert p.returncode == 0, p.stderr
    assert json.loads(js.read_text())["env"]["bnx_settings"]["BNX_CUDA_L2_GROUPS"] == "1"
    assert "bnx settings: BNX_CPU_KERNELS=default, BNX_CUDA_L2_GROUPS=1" in md.read_text()
    assert "bnx settings: BNX_CPU_KERNELS=default, BNX_CUDA_L2_GROUPS=1" in p.stderr
    log, md2 = tmp_path / "progress.log", tmp_path / "rebuilt.md"
    log.write_text(p.stderr)
    q = run_bnx("bench", "--device", "cpu", "--quick", "--shapes", "2,4,3,3", "--passes", "eval_fwd", "--layout", "nchw",
                "--from-progress", log, "--md", md2)
    assert q.returncode == 0, q.stderr
    assert "bnx settings: BNX_CPU_KERNELS=default, BNX_CUDA_L2_GROUPS=1" in md2.read_text()


def test_bench_script_wrapper(tmp_path):
    js = tmp_path / "b.json"
    p = run_bnx("--device", "cpu", "--shapes", "6,4", "--passes", "train_fwd_bwd,eval_fwd", "--reps", "2",
                "--threads", "1", "--json", js, cmd=[sys.executable, os.path.join(ROOT, "benchmarks", "bench.py")])
    assert p.returncode == 0, p.stderr
    # 2-D input: nhwc is skipped
    _check_bench_json(json.loads(js.read_text()), (6, 4), {"train_fwd_bwd", "eval_fwd"}, {"nchw"})


def test_cpu_layers_script_runs():
    """benchmarks/cpu_layers.py (a measurement, not a test of speed): it runs and prints every comparison with
    a ratio and both times, and the per-call rows."""
    p = run_bnx("--shape", "4,8,6,6", "--seconds", "0.01", "--calls", "5", "--threads", "1",
                cmd=[sys.executable, os.path.join(ROOT, "benchmarks", "cpu_layers.py")])
    assert p.returncode == 0, p.stderr
    labels = ["op: eval forward", "op: training forward", "op: backward (batch)", "Function: eval forward vs op",
              "functional: eval forward", "ops, bare", "functional vs F.batch_norm", "functional vs Python Function"]
    for label in labels:
        m = re.search(re.escape(label) + r"\s+(\S+)x\s+\(bnx\s+(\S+) us, reference\s+(\S+) us\)", p.stdout)
        assert m, f"{label!r} missing:\n{p.stdout}"
        assert all(float(v) > 0 for v in m.groups())
    for name in ("bnx.functional", "F.batch_norm", "bnx.BatchNorm2d", "torch.nn.BatchNorm2d"):
        assert re.search(re.escape(name) + r"\s+forward\s+\S+ us\s+forward \+ backward\s+\S+ us", p.stdout), p.stdout


def _bench_json(path, times, settings):
    """A minimal bench JSON: times maps (pass, shape) to (bnx us, native us)."""
    cases = [{"pass": ps, "dtype": "fp32", "layout": "nchw", "shape": list(shape),
              "times_us": {"bnx": t, "native": n}} for (ps, shape), (t, n) in times.items()]
    path.write_text(json.dumps({"env": {"bnx_settings": settings}, "cases": cases}))
    return path


def test_compare_runs_script(tmp_path):
    """benchmarks/compare_runs.py: per case, bnx's time in each run and its ratio to the first run's;
    the geomean over the cases every run has; the settings as labels."""
    script = os.path.join(ROOT, "benchmarks", "compare_runs.py")
    a = _bench_json(tmp_path / "a.json", {("train_fwd", (2, 4)): (10.0, 30.0), ("train_bwd", (2, 4)): (20.0, 40.0)},
                    {"BNX_X": ""})
    b = _bench_json(tmp_path / "b.json", {("train_fwd", (2, 4)): (5.0, 31.0), ("train_bwd", (2, 4)): (40.0, 41.0),
                                          ("eval_fwd", (2, 4)): (1.0, 2.0)}, {"BNX_X": "1"})
    md = tmp_path / "c.md"
    p = subprocess.run([sys.executable, script, str(a), str(b), "--md", str(md)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "[0] BNX_X=" in p.stdout and "[1] BNX_X=1" in p.stdout
    assert "| train_fwd | fp32 | nchw | 2,4 | 10.0 | 5.0 | 0.500 | 30.0 |" in p.stdout
    assert "| train_bwd | fp32 | nchw | 2,4 | 20.0 | 40.0 | 2.000 | 40.0 |" in p.stdout
    assert "eval_fwd" not in p.stdout  # not in every run
    assert "over 2 cases: [0] 1.000, [1] 1.000" in p.stdout  # sqrt(0.5 * 2)
    assert md.read_text().strip() == p.stdout.strip()
    c = _bench_json(tmp_path / "c.json", {("eval_fwd", (9, 9)): (1.0, 1.0)}, {})
    q = subprocess.run([sys.executable, script, str(a), str(c)], capture_output=True, text=True)
    assert q.returncode != 0 and "no case in common" in q.stderr
    q = subprocess.run([sys.executable, script, str(a), str(b), "--labels", "x"], capture_output=True, text=True)
    assert q.returncode == 2 and "--labels has 1 names for 2 runs" in q.stderr


def test_ceilings_script(tmp_path):
    """benchmarks/ceilings.py: per case, the DRAM transfers of the training forward + backward when channel
    groups are re-read from L2 where they fit, the ceiling frac 5 / transfers, and the targets at it."""
    script = os.path.join(ROOT, "benchmarks", "ceilings.py")

    def case(name, shape, layout, b, fr):
        return {"pass": "train_fwd_bwd", "dtype": "bf16" if b == 2 else "fp32", "layout": layout,
                "shape": list(shape), "shape_name": name, "elements": math.prod(shape), "bytes_per_element": b,
                "frac": fr}
    # L2 of 3 MiB, a third per group: 1 MiB. NCHW (4,2,256,256) fp32: a channel is 1 MiB -> fits for the
    # forward, not with dy for the backward (2+5); channels-last (64,8,32,32) bf16: 16 channels per 32-byte
    # sector, capped at C = 8 -> 65536 rows x 16 B = 1 MiB (2+5); (1024,8,32,32) bf16: 16 MiB (3+5); the
    # eval_fwd case and the non-ResNet name stay out of the targets.
    cases = [case("rn50-112", (4, 2, 256, 256), "nchw", 4, {"bnx": 0.5, "native": 0.25, "compile": 0.5}),
             case("rn50-56", (64, 8, 32, 32), "nhwc", 2, {"bnx": 0.6, "native": 0.5, "compile": 0.6}),
             case("rn50-7", (2, 8, 4, 4), "nhwc", 2, {"bnx": 0.4, "native": 0.1, "compile": 0.2}),
             case("other", (1024, 8, 32, 32), "nhwc", 2, {"bnx": 0.3, "native": 0.3}),
             dict(case("rn50-14", (2, 2, 2, 2), "nchw", 4, {"bnx": 1.0, "native": 0.01}), **{"pass": "eval_fwd"})]
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"cases": cases}))
    md = tmp_path / "c.md"
    p = subprocess.run([sys.executable, script, str(run), "--l2-mib", "3", "--md", str(md)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "| fp32 | nchw | 4,2,256,256 | 0.500 | 0.250 | 0.500 | 2+5 | 0.714 | 2.86x | 1.43x |" in out
    assert "| bf16 | nhwc | 64,8,32,32 | 0.600 | 0.500 | 0.600 | 2+5 | 0.714 | 1.43x | 1.19x |" in out
    assert "| bf16 | nhwc | 2,8,4,4 | 0.400 | 0.100 | 0.200 | 2+3 | 1.000 | 10.00x | 5.00x |" in out
    assert "| bf16 | nhwc | 1024,8,32,32 | 0.300 | 0.300 | - | 3+5 | 0.625 | 2.08x | - |" in out
    assert "2,2,2,2" not in out  # not a train_fwd_bwd case
    # two-pass: every ResNet case at 0.625; bf16 vs native: sqrt(0.625/0.5 * 0.625/0.1) = 2.80
    assert "- two-pass: geomean frac 0.625 (target 0.60: reachable)" in out
    assert "geomean speedup vs native, bf16: 2.80x (target 2.5x: reachable)" in out
    assert "geomean speedup vs native, fp32: 2.50x (target 1.5x: reachable)" in out
    # vs compile at 0.625: 1.25x (fp32 nchw), 1.04x (short), 3.12x
    assert "every case (target 1.2x): out of reach in 1 of 3: bf16 nhwc 64,8,32,32 at most 1.04x" in out
    # grouped: (0.714 * 0.714 * 1.0) ** (1/3) = 0.799; the 64,8,32,32 case still short of 1.2x over compile
    assert "- grouped: geomean frac 0.799" in out
    assert "out of reach in 1 of 3: bf16 nhwc 64,8,32,32 at most 1.19x" in out
    assert md.read_text() == out
    # the whole L2 for one group: the backward's 2 MiB fits too
    q = subprocess.run([sys.executable, script, str(run), "--l2-mib", "3", "--group-fraction", "1"],
                       capture_output=True, text=True)
    assert q.returncode == 0 and "| 4,2,256,256 | 0.500 | 0.250 | 0.500 | 2+3 | 1.000 |" in q.stdout
    assert "speedup vs torch.compile, every case (target 1.2x): reachable in all 3 cases" in q.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cases": [cases[-1]]}))
    q = subprocess.run([sys.executable, script, str(bad)], capture_output=True, text=True)
    assert q.returncode != 0 and "has no train_fwd_bwd case" in q.stderr
    q = subprocess.run([sys.executable, script, str(run), "--group-fraction", "0"], capture_output=True, text=True)
    assert q.returncode == 2 and "--group-fraction must be in (0, 1]" in q.stderr


def _ncu_output(case, rows, prof_lines=True):
    """What `ncu --csv ... ncu_case.py` prints: the program's record (once per application replay), ncu's
    own lines, then the details page as CSV (one row per kernel and metric)."""
    head = ['"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
            '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"']
    out = [json.dumps(case)]
    if prof_lines:
        out = ["==PROF== Connected to process 123 (/usr/bin/python3)", json.dumps(case),
               "==PROF== Profiling \"channel_sums_kernel\": 0%....50%....100% - 1 pass", json.dumps(case),
               "==PROF== Disconnected from process 123"]
    out += head
    for kid, name, grid, metric, unit, value in rows:
        out.append(f'"{kid}","123","python3","host","{name}","1","7","(256, 1, 1)","{grid}","0","9.0","Command line '
                   f'profiler metrics","{metric}","{unit}","{value}"')
    return "\n".join(out) + "\n"


def test_ncu_summary_script(tmp_path):
    """benchmarks/ncu_summary.py: per kernel its time, DRAM bytes (scaled units converted, thousands
    separators read) and L2 hit rate from ncu's CSV; per run the DRAM traffic over the compulsory bytes and
    in tensor transfers; runs side by side; a file without ncu's CSV named, the others still summarized."""
    script = os.path.join(ROOT, "benchmarks", "ncu_summary.py")
    case = dict(tool="ncu_case", shape=[4, 8, 6, 6], dtype="bf16", layout="nchw", pass_="train_fwd_bwd", impl="bnx",
                iters=1, input_sets=9, tensor_bytes=1_000_000, compulsory_bytes=5_000_000,
                bnx_settings={"BNX_CUDA_L2_GROUPS": "0"})
    sums = "void bnx::cuda::(anonymous namespace)::channel_sums_kernel<c10::BFloat16, float, (Walk)0>(Params)"
    rows = [(0, sums, "(132, 8, 1)", "dram__bytes_read.sum", "byte", "1,000,000"),
            (0, sums, "(132, 8, 1)", "dram__bytes_write.sum", "byte", "4,096"),
            (0, sums, "(132, 8, 1)", "gpu__time_duration.sum", "nsecond", "12,500"),
            (0, sums, "(132, 8, 1)", "lts__t_sector_hit_rate.pct", "%", "3.5"),
            (0, sums, "(132, 8, 1)", "sm__throughput.avg.pct_of_peak_sustained_elapsed", "%", "40"),
            (1, "map_kernel<float>", "(528, 1, 1)", "dram__bytes_read.sum", "Mbyte", "0.5"),
            (1, "map_kernel<float>", "(528, 1, 1)", "dram__bytes_write.sum", "Kbyte", "995.904"),
            (1, "map_kernel<float>", "(528, 1, 1)", "gpu__time_duration.sum", "usecond", "7.5"),
            (1, "map_kernel<float>", "(528, 1, 1)", "lts__t_sector_hit_rate.pct", "%", "51.25")]
    a = tmp_path / "a.txt"
    a.write_text(_ncu_output(case, rows))
    b = tmp_path / "b.txt"
    case_b = dict(case, iters=2, bnx_settings={"BNX_CUDA_L2_GROUPS": "1"})
    b.write_text(_ncu_output(case_b, rows[:4] + [(2,) + r[1:] for r in rows[:4]], prof_lines=False))
    md = tmp_path / "s.md"
    p = subprocess.run([sys.executable, script, str(a), str(b), "--md", str(md)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "## a.txt: train_fwd_bwd bf16 nchw 4,8,6,6, bnx (BNX_CUDA_L2_GROUPS=0)" in out
    assert "| 0 | channel_sums_kernel | (132, 8, 1) | (256, 1, 1) | 12.5 | 1.0 | 0.0 | 3.5 |" in out
    assert "| 1 | map_kernel | (528, 1, 1) | (256, 1, 1) | 7.5 | 0.5 | 1.0 | 51.2 |" in out
    # 1 + 0.004096 + 0.5 + 0.995904 = 2.5 MB: 0.50x the compulsory 5 MB, 2.50 transfers of the 1 MB tensor
    assert ("Per call: 2 kernels, 20.0 us of kernel time, DRAM 1.5 MB read + 1.0 MB written = 0.50x the "
            "compulsory bytes (2.50 tensor transfers).") in out
    # b: two calls of one kernel each: per call 12.5 us and 1.004096 MB
    assert "| b.txt | train_fwd_bwd bf16 nchw 4,8,6,6, bnx (BNX_CUDA_L2_GROUPS=1) | 1 | 12.5 | 1.0 | 0.20 | 1.00 |" in out
    assert "| a.txt | train_fwd_bwd bf16 nchw 4,8,6,6, bnx (BNX_CUDA_L2_GROUPS=0) | 2 | 20.0 | 2.5 | 0.50 | 2.50 |" in out
    assert md.read_text().strip() == out.strip()
    bad = tmp_path / "bad.txt"
    bad.write_text(json.dumps(case) + "\n==ERROR== Failed to profile\n")
    q = subprocess.run([sys.executable, script, str(bad), str(a)], capture_output=True, text=True)
    assert q.returncode == 1 and "bad.txt: no ncu CSV" in q.stderr and "## a.txt" in q.stdout
    none = tmp_path / "none.txt"
    none.write_text(_ncu_output(case, rows).replace('"tool": "ncu_case"', '"tool": "other"'))
    q = subprocess.run([sys.executable, script, str(none)], capture_output=True, text=True)
    assert q.returncode == 1 and "no ncu_case.py record" in q.stderr and q.stdout == ""
    unit = tmp_path / "unit.txt"
    unit.write_text(_ncu_output(case, [rows[0][:4] + ("furlong", "3")]))
    q = subprocess.run([sys.executable, script, str(unit)], capture_output=True, text=True)
    assert q.returncode == 1 and "unknown metric unit 'furlong'" in q.stderr


def _ptxas_entry(mangled, registers, smem, spills=(0, 0)):
    return (f"ptxas info    : Compiling entry function '{mangled}' for 'sm_90'\n"
            f"ptxas info    : Function properties for {mangled}\n"
            f"    {spills[0]} bytes stack frame, {spills[0]} bytes spill stores, {spills[1]} bytes spill loads\n"
            f"ptxas info    : Used {registers} registers, used 1 barriers" + (f", {smem} bytes smem" if smem else "") +
            "\nptxas info    : Compile time = 60.152 ms\n")


def test_kernel_resources_script(tmp_path):
    """benchmarks/kernel_resources.py --log: per kernel, op and walk (and the grouped launch's synchronization)
    and per dtype, the 16-byte-vector kernels' most registers and the resident CTAs of 256 threads per SM on
    sm_90 (registers allocated per warp in units of 256, at most 2048 threads and 228 KB of shared memory,
    1 KB reserved per CTA), and their spills."""
    import importlib.util

    script = os.path.join(ROOT, "benchmarks", "kernel_resources.py")
    spec = importlib.util.spec_from_file_location("kernel_resources", script)
    kr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kr)
    # 74 registers: 2368 per warp, 2560 allocated -> 20480 per CTA -> 3 CTAs; 48: 5; 80: 3 by registers, but
    # 120 KB of shared memory allows 1; 216: 6912 per warp -> 55296 per CTA -> 1; 32: 8 by the thread slots.
    assert [kr.resident_ctas(r, m) for r, m in [(74, 16384), (48, 0), (80, 120_000), (216, 18433), (32, 0)]] == \
        [3, 5, 1, 1, 8]
    sums = ("_ZN3bnx4cuda19channel_sums_kernelIfLi8ELi1ENS0_16ShiftedMomentsOpIN3c108BFloat16EfEENS0_15MomentsFinalize"
            "IS4_fEEEEvNS0_4PlanET2_T3_PT_")
    grouped = ("_ZN3bnx4cuda23grouped_sums_map_kernelIfLi8ELi2ELi2ENS0_61_GLOBAL__N__0997ce1f_22_batch_norm_backward_cu_"
               "64006aef_1703010GradSumsOpIN3c108BFloat16EfLb0EEENS2_12GradFinalizeIfEENS2_16BatchGradInputOpIS5_fEEEEvN"
               "S0_4PlanENS0_6GroupsET3_T4_T5_PT_Pj")
    fin = "_ZN3bnx4cuda15finalize_kernelIfNS0_15MomentsFinalizeIN3c108BFloat16EfEEEEvPKT_llT0_"
    on_chip = ("_ZN3bnx4cuda23on_chip_sums_map_kernelIfLi8ELi1ELb0ENS0_16ShiftedMomentsOpIN3c108BFloat16EfEENS0_15"
               "MomentsFinalizeIS4_fEENS0_8AffineOpIS4_fEEEEvNS0_4PlanET3_T4_T5_PT_l")
    log = tmp_path / "ptxas.log"
    # The 4-wide sums kernel (150 registers) is not a 16-byte one: left out of its row.
    log.write_text("nvcc noise\n" + _ptxas_entry(sums, 74, 16384)
                   + _ptxas_entry(sums.replace("Li8ELi1E", "Li4ELi1E"), 150, 0)
                   + _ptxas_entry(grouped, 216, 18433, spills=(32, 40)) + _ptxas_entry(fin, 32, 0)
                   + _ptxas_entry(sums.replace("IN3c108BFloat16EfEE", "IffEE"), 80, 120_000)
                   + _ptxas_entry(on_chip, 64, 18432) + _ptxas_entry(on_chip.replace("Lb0E", "Lb1E"), 78, 18432))
    md = tmp_path / "r.md"
    p = subprocess.run([sys.executable, script, "--log", str(log), "--md", str(md)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "| kernel | op | walk / sync | fp32 | bf16 | fp32 acc |" in out
    assert "| channel_sums_kernel | ShiftedMomentsOp | rows | 80 / 1 | 74 / 3 | - |" in out
    assert "| grouped_sums_map_kernel | GradSumsOp | plane groups, no barrier | - | 216 / 1 (1: 72 B) | - |" in out
    assert "| finalize_kernel | - | - | - | - | 32 / 8 |" in out
    assert "| on_chip_sums_map_kernel | ShiftedMomentsOp | rows | - | 64 / 4 | - |" in out
    assert "| on_chip_sums_map_kernel | ShiftedMomentsOp | rows, partial | - | 78 / 3 | - |" in out
    assert md.read_text().strip() == out.strip()
    empty = tmp_path / "empty.log"
    empty.write_text("nvcc: nothing compiled\n")
    q = subprocess.run([sys.executable, script, "--log", str(empty)], capture_output=True, text=True)
    assert q.returncode != 0 and "ptxas reported no kernel for sm_90" in q.stderr


def test_ncu_case_script_says_it_needs_a_gpu():
    """benchmarks/ncu_case.py without a CUDA device: a clear message, a failing exit status."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ncu_case.py")], capture_output=True,
                       text=True)
    assert p.returncode == 1 and "ncu_case: needs a CUDA device" in p.stderr


@requires_cuda
def test_ncu_case_script_cuda():
    """benchmarks/ncu_case.py runs its case (without ncu, the profiler start and stop do nothing) and prints
    the case's record first."""
    p = run_bnx("--shape", "4,8,6,6", "--dtype", "fp32", "--layout", "nhwc", "--iters", "2",
                cmd=[sys.executable, os.path.join(ROOT, "benchmarks", "ncu_case.py")])
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout.splitlines()[0])
    assert rec["tool"] == "ncu_case" and rec["shape"] == [4, 8, 6, 6] and rec["iters"] == 2
    assert rec["tensor_bytes"] == 4 * 8 * 6 * 6 * 4 and rec["compulsory_bytes"] == 5 * rec["tensor_bytes"]


@requires_cuda
def test_profile_kernels_script_cuda():
    """benchmarks/profile_kernels.py lists the kernels of both implementations (bnx's by name)."""
    p = run_bnx("--shape", "4,8,6,6", "--iters", "2",
                cmd=[sys.executable, os.path.join(ROOT, "benchmarks", "profile_kernels.py")])
    assert p.returncode == 0, p.stderr
    assert "== bnx: fp32 nhwc (4, 8, 6, 6)" in p.stdout and "== native:" in p.stdout
    assert "channel_sums_kernel" in p.stdout


def test_bench_importable():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench as bench_script  # noqa: F401
        assert callable(bench_script.main)
    finally:
        sys.path.pop(0)


def test_bench_cpu_timing_alternates():
    """On the CPU the implementations of a case are called in alternation, each call on the next input set
    (so no call finds its input in cache from the call before), the starting one rotating."""
    from bnx.bench import Timer

    calls = []
    fns = {name: (lambda i, name=name: calls.append((name, i))) for name in ("bnx", "native", "compile")}
    nsets, warmup, reps = 4, 2, 5
    res = Timer(torch.device("cpu"), reps=reps, warmup=warmup, cpu_seconds=0.0).cpu_interleaved(fns, nsets)
    assert set(res) == set(fns)
    assert all(r[2] == reps and r[0] >= 0 and r[1] <= r[0] for r in res.values())
    assert len(calls) == len(fns) * (warmup + reps)
    assert [i for _, i in calls] == [j % nsets for j in range(len(calls))]
    timed = [name for name, _ in calls[len(fns) * warmup:]]
    rounds = [timed[k:k + len(fns)] for k in range(0, len(timed), len(fns))]
    assert all(sorted(r) == sorted(fns) for r in rounds)
    assert [r[0] for r in rounds[:3]] == ["bnx", "native", "compile"]


def test_bench_cuda_host_time_excludes_first_allocations(monkeypatch):
    """The GPU timer's host time per call is probed only after every kept output slot has been filled once
    (first calls allocate: cudaMalloc would be counted as launch time), as the median of calls timed alone.
    Runs the timer's logic on a stand-in for torch.cuda, so it needs no GPU."""
    import time

    from bnx.bench import Timer

    class _Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

        def query(self):
            return False  # the sleep holding the GPU has not ended: no queue again

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: None, raising=False)
    nsets, warmup, reps = 4, 1, 3
    calls = []

    def fn(i):
        calls.append(i)
        if len(calls) <= nsets:  # the first use of each output slot: an allocation, slow on the host
            time.sleep(0.05)
        return torch.empty(1)

    median_us, min_us, n, host_us = Timer(torch.device("cuda"), reps=reps, warmup=warmup, cpu_seconds=0.0)(fn, nsets)
    assert n == reps and 0 <= min_us <= median_us
    assert host_us < 25_000, host_us  # not the 50 ms first calls
    warm = max(warmup, nsets + 1)
    assert calls == [j % nsets for j in range(warm)] + [j % nsets for j in range(5)] + [r % nsets for r in range(reps)]


def test_bench_cuda_queues_again_when_the_sleep_ends_first(monkeypatch):
    """Where the sleep holding the GPU has ended before every timed call is queued (the event after it has
    passed), the GPU may have waited for the host and the events timed the host: the timer queues the calls
    again behind a sleep four times as long, keeps the timing of the try that the sleep outlasted, and says
    how many tries it took; after Timer.QUEUE_TRIES outrun tries it keeps the last and says so. Runs on a
    stand-in for torch.cuda (no GPU): a timed call's event interval is 500 us on an outrun try, 10 us else."""
    from bnx.bench import Timer

    state = {"outrun_tries": 0, "try": 0}
    sleeps = []

    class _Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = state["try"]

        def elapsed_time(self, end):  # ms
            return 0.5 if self.t <= state["outrun_tries"] else 0.01

        def query(self):
            return state["try"] <= state["outrun_tries"]

    def _sleep(cycles):
        state["try"] += 1
        sleeps.append(cycles)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "_sleep", _sleep, raising=False)
    monkeypatch.setattr(Timer, "_calibrate_sleep", staticmethod(lambda: 1000.0))
    calls = []
    reps, nsets = 4, 3
    for outrun, want_tries, want_us in [(0, 1, 10.0), (1, 2, 10.0), (2, 3, 10.0), (3, 4, 500.0), (5, 4, 500.0)]:
        state.update(outrun_tries=outrun, **{"try": 0})
        sleeps.clear()
        calls.clear()
        timer = Timer(torch.device("cuda"), reps=reps, warmup=1, cpu_seconds=0.0)
        median_us, min_us, n, _ = timer(lambda i: calls.append(i), nsets)
        assert timer.last_queue_tries == want_tries, (outrun, timer.last_queue_tries)
        assert median_us == pytest.approx(want_us) and min_us == pytest.approx(want_us), (outrun, median_us)
        tries = min(outrun + 1, Timer.QUEUE_TRIES)
        assert len(sleeps) == tries
        assert all(abs(b - min(4 * a, 1_000_000)) <= 4 for a, b in zip(sleeps, sleeps[1:])), sleeps  # 4x longer
        probe = (nsets + 1) + 5  # warm-up, then the host-time probe
        assert len(calls) == probe + tries * reps
        assert calls[probe:] == [r % nsets for r in range(tries * reps)]  # each try rotates on from the last


def test_bench_report_names_the_cases_queued_again():
    """The markdown report and the progress line name each case and implementation whose calls were queued
    again (queue_tries in the JSON), and say where every try was outrun (the time may include host waits)."""
    from bnx import bench

    res = json.load(open(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "h100-2026-11-27b.json")))
    assert all(not c.get("queue_tries") for c in res["cases"])  # that run predates the queueing again
    assert "## Queued again" not in bench.markdown(res)
    res["cases"][3]["queue_tries"] = {"bnx": 2}
    res["cases"][5]["queue_tries"] = {"native": bench.Timer.QUEUE_TRIES + 1}
    md = bench.markdown(res)
    section = md[md.index("## Queued again"):].split("\n## ")[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("- ")]
    assert lines == [f"- {bench.case_label(res['cases'][3])}, bnx: 2 tries",
                     f"- {bench.case_label(res['cases'][5])}, native: {bench.Timer.QUEUE_TRIES} tries, the last "
                     "outran its sleep too: this time may include host waits"]
    assert bench._progress_tail(res["cases"][3], ["bnx", "native"]).endswith("queued again: bnx 2 tries")
    assert "(ALL OUTRAN THE SLEEP)" in bench._progress_tail(res["cases"][5], ["bnx", "native"])


def _case_key(c):
    return (c["pass"], c["dtype"], c["layout"], tuple(c["shape"]))


def test_bench_from_progress_matches_run(tmp_path):
    """A tiny CPU bench with its progress log (stderr) captured; --from-progress on that log rebuilds the same
    cases and times (to the printed precision)."""
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    opts = ["--shapes", "4,8,6,6", "--passes", "train_fwd,train_fwd_bwd,eval_fwd,bnx_train_frozen"]
    p = run_bnx("bench", "--device", "cpu", "--quick", "--reps", "3", "--threads", "1", *opts, "--json", js,
                "--md", md)
    assert p.returncode == 0, p.stderr
    log = tmp_path / "progress.log"
    log.write_text(p.stderr)
    rjs, rmd, rpng = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    q = run_bnx("bench", "--from-progress", log, *opts, "--json", rjs, "--md", rmd, "--plot", rpng)
    assert q.returncode == 0, q.stderr
    a, b = json.loads(js.read_text()), json.loads(rjs.read_text())
    assert "partial" not in a and "from_progress" not in a
    fp = b["from_progress"]
    assert fp["log"] == str(log) and fp["cases_found"] == fp["cases_total"] == len(a["cases"]) == 8
    assert fp["missing"] == []
    assert b["env"]["device_type"] == "cpu" and b["env"]["torch"] == a["env"]["torch"]
    assert b["impls"] == a["impls"] and b["passes"] == a["passes"] and b["quick"] is True
    assert abs(b["copy_gbps"] - a["copy_gbps"]) <= 5e-4 * a["copy_gbps"]  # printed to 4 significant digits
    assert b["copy_bytes"] == a["copy_bytes"]
    assert [_case_key(c) for c in b["cases"]] == [_case_key(c) for c in a["cases"]]
    for ca, cb in zip(a["cases"], b["cases"]):
        for k in ("shape_name", "elements", "bytes_per_element", "compulsory_bytes", "input_sets", "best_peer"):
            assert cb[k] == ca[k], (k, ca, cb)
        assert set(cb["times_us"]) == set(ca["times_us"]) == {"bnx", "native"}
        assert cb["errors"] == ca["errors"]
        tb = ca["times_us"]["bnx"]
        for i, t in ca["times_us"].items():
            assert abs(cb["times_us"][i] - t) <= 0.05 + 1e-9 * t, (i, t, cb["times_us"][i])  # printed as .1f
            rel = 0.05 / t + 6e-4
            assert cb["frac"][i] == pytest.approx(ca["frac"][i], rel=rel)
        s = ca["speedup"]["native"]
        assert cb["speedup"]["native"] == pytest.approx(s, rel=0.05 / tb + 0.05 / ca["times_us"]["native"] + 1e-9)
    # the same summary, reports written like a normal run's
    assert [(r["pass_"], r["dtype"], r["n"]) for r in b["summary"]["rows"]] == \
        [(r["pass_"], r["dtype"], r["n"]) for r in a["summary"]["rows"]]
    assert b["summary"]["min_frac_case"] == a["summary"]["min_frac_case"]
    text = rmd.read_text()
    assert "| train_fwd_bwd | fp32 | nhwc | 4,8,6,6 |" in text and "rebuilt from the progress log" in text
    assert rpng.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "min frac (bnx)" in q.stdout and "8 of 8 cases" in q.stdout
    # options that select another case list than the log's: one-line usage error
    q = run_bnx("bench", "--from-progress", log, "--shapes", "4,8,6,6", "--json", tmp_path / "x.json")
    assert q.returncode == 2 and len(stderr_lines(q)) == 1 and "cases" in q.stderr
    assert not (tmp_path / "x.json").exists()


_GPU_LOG = """\
bnx bench: NVIDIA H200 (cuda), torch 2.11.0+cu130, 196 cases, impls bnx, native, native_nocudnn, compile
copy bandwidth: 4181 GB/s (device-to-device copy of 1024 MiB, read + write)
[1/196] train_fwd bf16 nchw 256,64,112,112 ... bnx 336.0us | native 2990.8us (8.90x) | no-cuDNN 2995.1us (8.91x) \
| compile n/a | frac 0.59 | bnx host 90us
[2/196] train_bwd bf16 nchw 256,64,112,112 ... bnx 505.5us | native 5586.6us (11.05x) | no-cuDNN n/a [OOM] \
| compile n/a [n/a (compile budget exhausted)] | frac 0.58 | bnx host 606us (HOST-BOUND)
[3/196] train_fwd_bwd bf16 nchw 256,64,112,112 ... (compiling)/some/file.py:1: UserWarning: a warning | with a bar
  warnings.warn(
 bnx 839.4us | native 8582.3us (10.22x) | no-cuDNN 8580.0us (10.22x) | compile 1294.0us (1.54x) | frac 0.59 \
| bnx host 289us | MISMATCH vs native: max rel diff 2.0e-01
[4/196] eval_fwd bf16 nchw 256,64,112,112 ...python -m bnx bench: interrupted
"""


def test_bench_from_progress_gpu_log_partial(tmp_path):
    """A GPU run's log cut short (no GPU needed): the fields of each line, the missing cases, the targets."""
    log = tmp_path / "gpu.log"
    log.write_text(_GPU_LOG)
    js, md = tmp_path / "g.json", tmp_path / "g.md"
    p = run_bnx("bench", "--from-progress", log, "--json", js, "--md", md)
    assert p.returncode == 0, p.stderr
    d = json.loads(js.read_text())
    assert d["env"]["device_name"] == "NVIDIA H200" and d["env"]["device_type"] == "cuda"
    assert d["copy_gbps"] == 4181 and d["copy_bytes"] == 1 << 30
    assert d["impls"] == ["bnx", "native", "native_nocudnn", "compile"]
    assert len(d["cases"]) == 196
    fp = d["from_progress"]
    assert fp["cases_found"] == 3 and fp["cases_total"] == 196 and len(fp["missing"]) == 193
    assert fp["missing"][0] == "eval_fwd bf16 nchw 256,64,112,112"
    c1, c2, c3, c4 = d["cases"][:4]
    assert c1["times_us"] == {"bnx": 336.0, "native": 2990.8, "native_nocudnn": 2995.1}
    assert c1["errors"] == {"compile": "not run (--compile-passes)"} and c1["host_us"] == {"bnx": 90.0}
    E = 256 * 64 * 112 * 112
    assert c1["compulsory_bytes"] == 2 * E * 2
    assert c1["frac"]["bnx"] == pytest.approx(2 * E * 2 / 336.0e-6 / 4181e9)
    assert c1["frac"]["native"] == pytest.approx(2 * E * 2 / 2990.8e-6 / 4181e9)
    assert c1["speedup"]["native"] == pytest.approx(2990.8 / 336.0) and c1["best_peer"] == "native"
    assert c2["errors"] == {"native_nocudnn": "OOM", "compile": "n/a (compile budget exhausted)"}
    assert c2["host_us"] == {"bnx": 606.0} and d["compile_budget_exhausted"] is True
    assert c3["times_us"]["compile"] == 1294.0 and c3["speedup"]["compile"] == pytest.approx(1294.0 / 839.4)
    assert c3["max_rel_diff_vs_native"] == pytest.approx(0.2) and c3["best_peer"] == "compile"
    assert c4["times_us"] == {} and set(c4["errors"].values()) == {"absent (not in the progress log)"}
    text = md.read_text()
    assert "606 (host-bound)" in text and "3 of 196 cases" in text
    assert "- eval_fwd bf16 nchw 256,64,112,112: absent (not in the progress log)" in text
    assert "## Targets" in text and "train_fwd_bwd geomean frac" in text
    assert "targets (" in p.stdout and "NOT MEASURED" in p.stdout


def test_bench_writes_results_after_each_case(tmp_path):
    """A run stopped part-way (SIGINT, as scripts/gpu_check.sh's timeout does) leaves the JSON and markdown of
    the cases done, marked partial."""
    import signal
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen([sys.executable, "-m", "bnx", "bench", "--device", "cpu", "--shapes", "8,64,28,28",
                             "--reps", "40", "--threads", "1", "--json", str(js), "--md", str(md)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while "[3/" not in seen:  # case 3 started: cases 1 and 2 have been written
            ch = proc.stderr.read(1)
            if not ch:
                break
            seen += ch
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "[3/" in seen, seen
    d = json.loads(js.read_text())
    if "partial" not in d:
        pytest.skip("the run finished before the signal")
    assert d["partial"]["cases_total"] == 14 and d["partial"]["cases_done"] == len(d["cases"]) >= 2
    assert all(c["times_us"]["bnx"] > 0 for c in d["cases"])
    assert "PARTIAL: " in md.read_text()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# --------------------------------------------------------------------------------------------------
# errors and help
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["--bogus"],
    ["check", "--device", "tpu"],
    ["bench", "--reps", "x"],
    ["frobnicate"],
])
def test_bad_option_exit_2_one_line(args):
    p = run_bnx(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = stderr_lines(p)
    assert len(lines) == 1 and "error" in lines[0], p.stderr
    assert p.stdout == ""


@pytest.mark.parametrize("args", [
    ["bench", "--device", "cpu", "--dtype", "fp8"],
    ["bench", "--device", "cpu", "--shapes", "1,2,3,4,5,6"],
])
def test_bench_bad_values_exit_2_one_line(args):
    p = run_bnx(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = stderr_lines(p)
    assert len(lines) == 1 and "error" in lines[0], p.stderr


@no_cuda_only
@pytest.mark.parametrize("sub", ["explain", "check", "bench"])
def test_cuda_requested_without_cuda(sub):
    p = run_bnx(sub, "--device", "cuda")
    assert p.returncode != 0
    lines = stderr_lines(p)
    assert len(lines) == 1 and "CUDA is not available" in lines[0], p.stderr


@pytest.mark.parametrize("sub", [[], ["bench"]])
def test_help(sub):
    p = run_bnx(*sub, "--help")
    assert p.returncode == 0 and "usage:" in p.stdout
    if sub:
        assert "--device" in p.stdout
    if sub == ["bench"]:
        for opt in ("--shapes", "--dtype", "--layout", "--passes", "--quick", "--reps", "--json", "--md",
                    "--plot", "--threads"):
            assert opt in p.stdout


# --------------------------------------------------------------------------------------------------
# decompose_input_gradient
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,mf", [
    ((7, 3), None),
    ((4, 3, 5), None),
    ((3, 4, 5, 6), None),
    ((3, 4, 5, 6), torch.channels_last),
    ((2, 3, 2, 3, 4), torch.channels_last_3d),
])
@pytest.mark.parametrize("affine", [True, False])
def test_decompose_input_gradient(shape, mf, affine):
    g = torch.Generator().manual_seed(1)
    C = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    if mf is not None:
        x, dy = x.contiguous(memory_format=mf), dy.contiguous(memory_format=mf)
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5 if affine else None
    b = torch.randn(C, generator=g, dtype=torch.float64) if affine else None
    eps = 1e-3

    d = decompose_input_gradient(x, dy, w, eps)
    assert set(d) == {"direct", "through_mean", "through_var", "total"}
    for t in d.values():
        assert t.shape == x.shape and t.dtype == x.dtype
        if mf is not None:
            assert t.is_contiguous(memory_format=mf)

    # the true batch-statistics grad_input
    xr = x.detach().clone().requires_grad_(True)
    y = F.batch_norm(xr, None, None, w, b, training=True, eps=eps)
    (gx_batch,) = torch.autograd.grad(y, xr, dy)
    torch.testing.assert_close(d["total"], gx_batch, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(d["direct"] + d["through_mean"] + d["through_var"], gx_batch, atol=1e-12, rtol=1e-10)

    # the direct term is the eval-mode grad with running stats = batch stats
    dims = [0] + list(range(2, x.dim()))
    rm, rv = x.mean(dims), x.var(dims, unbiased=False)
    xe = x.detach().clone().requires_grad_(True)
    ye = F.batch_norm(xe, rm, rv, w, b, training=False, eps=eps)
    (gx_eval,) = torch.autograd.grad(ye, xe, dy)
    torch.testing.assert_close(d["direct"], gx_eval, atol=1e-12, rtol=1e-10)

    # through_mean is constant per channel; the batch gradient sums to 0 per channel
    tm = d["through_mean"]
    assert torch.allclose(tm, tm.amax(dims, keepdim=True)) and torch.allclose(tm, tm.amin(dims, keepdim=True))
    assert d["total"].sum(dims).abs().max() < 1e-10

    # and bnx's batch / frozen formulas agree with it
    xb = x.detach().clone().requires_grad_(True)
    yb = bnx.functional.batch_norm(xb, None, None, w, b, True, 0.1, eps, backward="batch")
    torch.testing.assert_close(torch.autograd.grad(yb, xb, dy)[0], d["total"], atol=1e-12, rtol=1e-10)
    xf = x.detach().clone().requires_grad_(True)
    yf = bnx.functional.batch_norm(xf, None, None, w, b, True, 0.1, eps, backward="frozen")
    torch.testing.assert_close(torch.autograd.grad(yf, xf, dy)[0], d["direct"], atol=1e-12, rtol=1e-10)


def test_decompose_exported_and_low_precision():
    assert bnx.decompose_input_gradient is decompose_input_gradient
    x = torch.randn(8, 4, 5, 5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(8, 4, 5, 5).to(torch.bfloat16)
    d = decompose_input_gradient(x, dy, torch.rand(4) + 0.5)
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous(memory_format=torch.channels_last) for t in d.values())
    xr = x.float().detach().requires_grad_(True)
    w = torch.rand(4)
    d = decompose_input_gradient(x.float(), dy.float(), w)
    y = F.batch_norm(xr, None, None, w, None, training=True)
    torch.testing.assert_close(d["total"], torch.autograd.grad(y, xr, dy.float())[0], atol=1e-5, rtol=1e-4)


def test_decompose_errors():
    with pytest.raises(ValueError):
        decompose_input_gradient(torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError):
        decompose_input_gradient(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError):
        decompose_input_gradient(torch.randn(4, 3), torch.randn(4, 3), torch.ones(2))
    x = torch.randn(4, 3, 2)
    with pytest.raises(TypeError, match="input must be float64"):
        decompose_input_gradient(x.long(), x)
    with pytest.raises(TypeError, match="grad_output must be float64"):
        decompose_input_gradient(x, x.int())
    with pytest.raises(TypeError, match="weight must be a Tensor"):
        decompose_input_gradient(x, x, [1.0, 1.0, 1.0])
    with pytest.raises(RuntimeError, match="weight is on meta"):
        decompose_input_gradient(x, x, torch.ones(3, device="meta"))
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="eps must be positive"):
            decompose_input_gradient(x, x, eps=eps)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        decompose_input_gradient(torch.randn(1, 3, 1), torch.randn(1, 3, 1))
    decompose_input_gradient(torch.randn(2, 3, 1), torch.randn(2, 3, 1))  # two values per channel: fine
