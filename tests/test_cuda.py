"""CUDA-only execution-model tests (skipped without a GPU / CUDA kernels).

- kernels run on the current stream, and work under CUDA graph capture (no host sync).
- a >2**31-element tensor (marked `large`, BNX_LARGE_TESTS=1).
The accuracy / determinism tests (tests/test_numerics.py) run on CUDA too.
"""
import pytest
import torch

import bnx
from conftest import HAS_CUDA, LARGE_ENABLED, assert_bf16_maps_exact, assert_close, requires_cuda, train_fwd_bwd

pytestmark = requires_cuda
ops = torch.ops.bnx
DEV = "cuda"


@pytest.mark.parametrize("pdl", ["0", "1"], ids=["plain", "pdl"])
def test_runs_on_current_stream(pdl, monkeypatch):
    """Kernels are launched on the current stream: work queued behind a long sleep on a side
    stream is seen by bnx (a kernel on the default stream would read stale data). Also with the
    programmatic dependent launches (BNX_CUDA_PDL=1)."""
    monkeypatch.setenv("BNX_CUDA_PDL", pdl)
    torch.manual_seed(53)
    shape = (16, 8, 32, 32)
    old = torch.randn(shape, device=DEV)
    new = torch.randn(shape, device=DEV) * 3 + 2
    gy = torch.randn(shape, device=DEV)
    w, b = torch.rand(8, device=DEV) + 0.5, torch.randn(8, device=DEV)
    expected = train_fwd_bwd(new, w, b, gy, "batch")
    torch.cuda.synchronize()

    x = old.clone()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(int(2e8))  # ~0.1 s of GPU time on s
        x.copy_(new)  # happens on s after the sleep
        got = train_fwd_bwd(x, w, b, gy, "batch")
        mean, invstd = ops.batch_norm_stats(x, None, None, None, 0.1, 1e-5)
        y_op = ops.batch_norm_elemt(x, w, b, mean, invstd)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    for a, e in zip(got, expected):
        assert_close(a, e, 1e-5, 1e-5)
    assert_close(y_op, expected[0], 1e-5, 1e-5)


@pytest.mark.parametrize("switch", ["", "BNX_CUDA_L2_GROUPS", "BNX_CUDA_PDL", "BNX_CUDA_ON_CHIP"],
                         ids=["default", "l2_groups", "pdl", "on_chip"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "num_batches_tracked"])
def test_cuda_graph_capture(momentum, switch, monkeypatch):
    """Functional train forward (with running-stat update; momentum=None reads
    num_batches_tracked on the device) + backward ops captured in a CUDA graph; replay on new
    data equals eager execution (no host synchronization inside). Also with BNX_CUDA_L2_GROUPS=1, whose
    cooperative launches must be capturable too, and with BNX_CUDA_PDL=1 (programmatic dependent launches
    become programmatic edges of the graph)."""
    if switch:
        monkeypatch.setenv(switch, "1")
    torch.manual_seed(54)
    shape, C = (8, 6, 16, 16), 6
    w, b = torch.rand(C, device=DEV) + 0.5, torch.randn(C, device=DEV)
    static_x = torch.randn(shape, device=DEV)
    static_gy = torch.randn(shape, device=DEV)
    rm, rv = torch.zeros(C, device=DEV), torch.ones(C, device=DEV)
    nbt = torch.tensor(0, device=DEV)

    def body(x, gy, rm, rv, nbt):
        if momentum is None:
            nbt.add_(1)
            y = bnx.functional.batch_norm(x, rm, rv, w, b, training=True, momentum=None,
                                          num_batches_tracked=nbt)
        else:
            y = bnx.functional.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum)
        mean, invstd = ops.batch_norm_stats(x, None, None, None, 0.1, 1e-5)
        gi, gw, gb = ops.batch_norm_backward(gy, x, mean, invstd, w, "batch", [True, True, True])
        return y, gi, gw, gb

    # warm up on a side stream (as recommended for capture)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            body(static_x, static_gy, rm.clone(), rv.clone(), nbt.clone())
    torch.cuda.current_stream().wait_stream(s)

    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        static_out = body(static_x, static_gy, rm, rv, nbt)

    # graph state after capture: capture does not execute; reset the stats it would touch
    rm.zero_(), rv.fill_(1.0), nbt.zero_()
    e_rm, e_rv, e_nbt = rm.clone(), rv.clone(), nbt.clone()
    for step in range(3):
        x = torch.randn(shape, device=DEV) * (step + 1) + step
        gy = torch.randn(shape, device=DEV)
        static_x.copy_(x), static_gy.copy_(gy)
        g.replay()
        with torch.no_grad():
            expected = body(x, gy, e_rm, e_rv, e_nbt)
        torch.cuda.synchronize()
        for a, e in zip(static_out, expected):
            assert_close(a, e, 1e-5, 1e-5, f"replay {step}")
        assert_close(rm, e_rm, 1e-6, 1e-5, "running_mean")
        assert_close(rv, e_rv, 1e-6, 1e-5, "running_var")
        assert torch.equal(nbt, e_nbt)


# ------------------------------------------------------------------------------ > 2**31 elements
@pytest.mark.large
@pytest.mark.skipif(not (HAS_CUDA and LARGE_ENABLED), reason="set BNX_LARGE_TESTS=1 on a GPU")
def test_more_than_2_31_elements_bf16():
    """bf16 tensor of 2**31 + 2**20 elements (64-bit indexing): stats, forward and backward on
    sampled channels, including the tail beyond element 2**31, match chunked references."""
    torch.manual_seed(55)
    N, C, H, W = 2, 4, 2 ** 14, 2 ** 14 + 16
    assert N * C * H * W > 2 ** 31
    x = torch.empty((N, C, H, W), device=DEV, dtype=torch.bfloat16)
    for n in range(N):  # keep generation temporaries small
        for c in range(C):
            x[n, c].normal_(mean=float(c), std=1.0 + c)
    w = torch.rand(C, device=DEV) + 0.5
    b = torch.randn(C, device=DEV)
    M = N * H * W
    rows = 2048

    def chunks(t, n, c):
        for h in range(0, H, rows):
            yield t[n, c, h:h + rows]

    mean, invstd = ops.batch_norm_stats(x, None, None, None, 0.1, 1e-5)
    y = ops.batch_norm_elemt(x, w, b, mean, invstd)
    assert y.shape == x.shape and y.dtype == torch.bfloat16

    sample = [0, C - 1]  # x[1, C-1] ends beyond element 2**31
    for c in sample:
        s = sum(ch.double().sum() for n in range(N) for ch in chunks(x, n, c))
        mu = (s / M).item()
        ss = sum(((ch.double() - mu) ** 2).sum() for n in range(N) for ch in chunks(x, n, c))
        var = (ss / M).item()
        assert abs(mean[c].item() - mu) < 1e-3 * (1 + c)
        assert abs(1.0 / invstd[c].item() ** 2 - 1e-5 - var) / var < 1e-3
        istd = (var + 1e-5) ** -0.5
        for n in range(N):
            for yc, xc in zip(chunks(y, n, c), chunks(x, n, c)):
                ref = (xc.double() - mu) * istd * w[c].double() + b[c].double()
                err = ((yc.double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
                assert err < 2 ** -7, (n, c, err)
    del y
    torch.cuda.empty_cache()

    gy = torch.empty_like(x)
    for n in range(N):
        for c in range(C):
            gy[n, c].normal_()
    gi, gw, gb = ops.batch_norm_backward(gy, x, mean, invstd, w, "batch", [True, True, True])
    assert gi.shape == x.shape
    for c in sample:
        mu, istd = mean[c].double(), invstd[c].double()
        sdy = sum(ch.double().sum() for n in range(N) for ch in chunks(gy, n, c))
        sdyx = sum((g.double() * (xc.double() - mu)).sum() for n in range(N)
                   for g, xc in zip(chunks(gy, n, c), chunks(x, n, c)))
        assert abs(gb[c].double() - sdy).item() < 1e-3 * M ** 0.5
        assert abs(gw[c].double() - sdyx * istd).item() < 1e-3 * M ** 0.5
        n = N - 1
        for g, xc, gic in list(zip(chunks(gy, n, c), chunks(x, n, c), chunks(gi, n, c)))[-2:]:
            ref = w[c].double() * istd * (g.double() - sdy / M
                                          - (xc.double() - mu) * istd ** 2 * sdyx / M)
            err = ((gic.double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
            assert err < 2 ** -6, (c, err)


@pytest.mark.parametrize("walks", ["10", "00", "11", "112", "110", "01"],
                         ids=["default", "plane_groups_off", "l2_groups", "l2_groups_two_barriers",
                              "l2_groups_no_barrier", "l2_groups_plane_groups_off"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 5, 7, 9), (4, 7, 16, 16), (3, 4, 5, 6, 8), (9, 16, 7, 7), (5, 16, 14, 14),
                                   (300, 32, 3, 3), (32, 48, 48, 48)])
def test_fused_passes_match_reference(dtype, shape, walks, monkeypatch):
    """The fused training forward (statistics, running stats, normalize walking in reverse) and the fused
    backward (sums, then grad_input) on odd shapes (odd plane sizes take the plane-groups walk where C allows:
    7x7, 3x3, 14x14 in bf16, and the narrow-vector paths with BNX_CUDA_PLANE_GROUPS=0) give the
    float64 reference's outputs, running stats and gradients, both formulas; also as the L2-grouped
    cooperative launch (BNX_CUDA_L2_GROUPS=1, with one, two or no grid barriers per group; in fp32 the
    (32,48,48,48) input spans two groups of a 50-60 MB L2)."""
    monkeypatch.setenv("BNX_CUDA_PLANE_GROUPS", walks[0])
    monkeypatch.setenv("BNX_CUDA_L2_GROUPS", walks[1])
    monkeypatch.setenv("BNX_CUDA_L2_GROUPS_BARRIERS", walks[2:])
    _fused_passes_against_float64(shape, dtype, torch.contiguous_format)


@pytest.mark.large
@pytest.mark.skipif(not (HAS_CUDA and LARGE_ENABLED), reason="set BNX_LARGE_TESTS=1 on a GPU")
def test_few_long_planes_at_least_as_accurate_as_native():
    """bf16 NCHW (2,4,4096,4096): the benchmark case where bnx's and native's training forward + backward
    differ by 1.1e-2 of native's largest value (on an H100). Each output (y, grad input, grad weight, grad
    bias; the latter two float32 sums of 33.5 million terms per channel that largely cancel) is, against a
    float64 reference, at least as close as native F.batch_norm's: an error (max |out - ref| / max |ref|) no
    larger than 1.5x native's, or than a floor (a bf16 half-ulp for y and grad input, 1e-6 for the float32
    sums)."""
    import torch.nn.functional as F

    torch.manual_seed(56)
    shape = (2, 4, 4096, 4096)
    N, C, H, W = shape
    M = N * H * W
    x = torch.empty(shape, device=DEV, dtype=torch.bfloat16).normal_()
    gy = torch.empty_like(x).normal_()
    w = torch.rand(C, device=DEV) + 0.5
    b = torch.randn(C, device=DEV)
    got = train_fwd_bwd(x, w, b, gy, "batch")
    xn, wn, bn = (t.clone().requires_grad_() for t in (x, w, b))
    yn = F.batch_norm(xn, None, None, wn, bn, training=True, eps=1e-5)
    yn.backward(gy)
    native = [yn.detach(), xn.grad, wn.grad, bn.grad]
    del xn, yn
    names = ["y", "grad input", "grad weight", "grad bias"]
    err = {k: [0.0, 0.0] for k in names}  # max |bnx - ref|, max |native - ref|
    scale = dict.fromkeys(names, 0.0)  # max |ref|
    for c in range(C):  # one channel at a time in float64 (268 MB each)
        xc, gyc = x[:, c].double(), gy[:, c].double()
        mu = xc.mean()
        istd = ((xc - mu).square().mean() + 1e-5).rsqrt()
        xhat = (xc - mu) * istd
        sdy, sdyx = gyc.sum(), (gyc * xhat).sum()
        wc, bc = w[c].double(), b[c].double()
        refs = {"y": xhat * wc + bc, "grad input": wc * istd * (gyc - sdy / M - xhat * (sdyx / M)),
                "grad weight": sdyx, "grad bias": sdy}
        for i, k in enumerate(names):
            pick = (lambda t: t[:, c]) if i < 2 else (lambda t: t[c])
            ref = refs[k]
            scale[k] = max(scale[k], ref.abs().max().item())
            for j, outs in enumerate((got, native)):
                err[k][j] = max(err[k][j], (pick(outs[i]).double() - ref).abs().max().item())
        del xc, gyc, xhat, refs
    for k in names:
        floor = 2.0 ** -8 if k in ("y", "grad input") else 1e-6  # bf16: 7 stored mantissa bits
        e_bnx, e_native = err[k][0] / scale[k], err[k][1] / scale[k]
        assert e_bnx <= max(1.5 * e_native, floor), (k, e_bnx, e_native)


@pytest.mark.parametrize("walks", ["10", "110"], ids=["default", "l2_groups_no_barrier"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 256, 256), (1, 2, 181, 181), (3, 1, 181, 181), (1, 1, 901, 949)])
def test_fused_passes_on_plane_segments(dtype, shape, walks, monkeypatch):
    """NCHW with a few long planes: the plans cut each plane into segments that many CTAs sum (including a
    ragged last segment, and (1,1,901,949), whose map plan's last segment is shorter than a block; the cuts
    are tested in the emulation). The fused passes give the float64 reference's results."""
    monkeypatch.setenv("BNX_CUDA_PLANE_GROUPS", walks[0])
    monkeypatch.setenv("BNX_CUDA_L2_GROUPS", walks[1])
    monkeypatch.setenv("BNX_CUDA_L2_GROUPS_BARRIERS", walks[2:])
    _fused_passes_against_float64(shape, dtype, torch.contiguous_format)


@pytest.mark.parametrize("barriers", ["0", "2"], ids=["no_barrier", "two_barriers"])
@pytest.mark.parametrize("row_bytes", ["", "16"], ids=["row64", "row16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_launch_on_narrowed_channels_last_columns(dtype, row_bytes, barriers, monkeypatch):
    """The L2-grouped launch where it narrows channels-last tile columns: (16,64,32,32), 16384 rows, with
    groups of 1.5 MB (BNX_CUDA_L2_GROUP_BYTES) instead of a third of the L2, so the full-width column (256
    bytes of every row in fp32, 128 in bf16: 4 or 2 MB) is cut to 64 bytes for the forward; the backward's x
    and dy need 32, which BNX_CUDA_L2_GROUP_ROW_BYTES=16 allows. With and without grid barriers: the float64
    reference's results."""
    monkeypatch.setenv("BNX_CUDA_L2_GROUPS", "1")
    monkeypatch.setenv("BNX_CUDA_L2_GROUPS_BARRIERS", barriers)
    monkeypatch.setenv("BNX_CUDA_L2_GROUP_BYTES", str(3 << 19))
    monkeypatch.setenv("BNX_CUDA_L2_GROUP_ROW_BYTES", row_bytes)
    _fused_passes_against_float64((16, 64, 32, 32), dtype, torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,memory_format", [((32, 16, 64, 64), torch.contiguous_format),
                                                 ((8, 128, 32, 32), torch.channels_last)], ids=["nchw", "nhwc"])
def test_auto_l2_groups_match_reference(shape, memory_format, dtype, monkeypatch):
    """BNX_CUDA_L2_GROUPS=auto with 1 MiB groups (BNX_CUDA_L2_GROUP_BYTES), so that test-sized inputs count as
    larger than the L2 (3 MiB) and their columns fit in a group (NCHW: 256-512 KiB channels; channels-last:
    columns narrowed to 64 bytes of every row, 512 KiB of x): the barrier-free grouped launch, where the rule
    takes it (which one it took is tested in the emulation), gives the float64 reference's results."""
    monkeypatch.setenv("BNX_CUDA_L2_GROUPS", "auto")
    monkeypatch.setenv("BNX_CUDA_L2_GROUP_BYTES", str(1 << 20))
    monkeypatch.delenv("BNX_CUDA_L2_GROUP_ROW_BYTES", raising=False)
    _fused_passes_against_float64(shape, dtype, memory_format)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 5, 7, 9), (9, 16, 7, 7), (32, 64, 28, 28), (300, 32, 3, 3), (32, 64, 56, 56)])
def test_on_chip_launch_matches_reference(shape, dtype, memory_format, monkeypatch):
    """BNX_CUDA_ON_CHIP=1: where the input fits in the shared memory of the resident CTAs (on an H100 or H200
    every shape here but the fp32 backward of (32,64,56,56), whose x and dy take 51 MB), the training forward
    and the batch backward run as one cooperative launch that reads each input from DRAM once; where it
    partly fits and the rest fits in half the L2 (that fp32 backward) the same launch with part of each
    thread's vectors read from global memory twice; elsewhere the two launches. Either way the float64
    reference's results, both formulas, three inputs in turn (one for the largest, whose float64 reference
    takes the host a while)."""
    monkeypatch.setenv("BNX_CUDA_ON_CHIP", "1")
    for seed in range(1 if shape == (32, 64, 56, 56) else 3):
        _fused_passes_against_float64(shape, dtype, memory_format, seed)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 5, 7, 9), (32, 64, 28, 28), (300, 32, 3, 3)])
def test_on_chip_partial_cache_matches_reference(shape, dtype, memory_format, monkeypatch):
    """The on-chip launch with at most 2 cache slots a thread (BNX_CUDA_ON_CHIP_SLOTS=2): the rest of each
    thread's vectors come from global memory in the sums and again in the map, as where an input only partly
    fits in shared memory; the float64 reference's results, both formulas."""
    monkeypatch.setenv("BNX_CUDA_ON_CHIP", "1")
    monkeypatch.setenv("BNX_CUDA_ON_CHIP_SLOTS", "2")
    for seed in range(2):
        _fused_passes_against_float64(shape, dtype, memory_format, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backward", [False, True])
def test_on_chip_launch_is_taken_where_the_input_fits(dtype, backward, monkeypatch):
    """The launch-bound channels-last (32,64,56,56) (25.7 MB in fp32, under the ~30 MB of shared memory of an
    H100's 132 SMs): with BNX_CUDA_ON_CHIP=1 the training forward and the batch backward run
    on_chip_sums_map_kernel, as the profiler sees, and no separate sums kernel. The fp32 backward's x and dy
    (51 MB) only partly fit: at 2 CTAs per SM (the kernel's registers allow no more) about 26 MB of them are
    cached and the other ~26 MB, just within half of the 50 MB L2, are read twice."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("BNX_CUDA_ON_CHIP", "1")
    x = torch.randn(32, 64, 56, 56, device=DEV, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(64, device=DEV) + 0.5, torch.randn(64, device=DEV)
    gy = torch.randn_like(x)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        y, mean, invstd = ops.batch_norm_train_forward(x, w, b, None, None, None, 0.1, 1e-5)
        if backward:
            ops.batch_norm_backward(gy, x, mean, invstd, w, "batch", [True, True, True])
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    on_chip = sum("on_chip_sums_map_kernel" in n for n in names)
    assert on_chip == (2 if backward else 1), names
    assert not any("channel_sums_kernel" in n for n in names), names


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 5, 7, 9), (32, 64, 28, 28), (2, 8, 3, 3)])
def test_programmatic_dependent_launch(shape, dtype, memory_format, monkeypatch):
    """With BNX_CUDA_PDL=1 the finalize and map kernels are launched while the kernel before them may still
    run, and wait for it on the GPU (griddepcontrol): the fused training forward and both backward formulas
    still give the float64 reference's results, with channels split over many CTAs ((32,64,28,28), whose
    finalize step has many partial sums to add) and over one ((2,8,3,3): no finalize launch, the map
    follows the sums directly). Five inputs in turn: a kernel that did not wait would read the statistics or
    sums of the call before (likely the same buffers, other values)."""
    monkeypatch.setenv("BNX_CUDA_PDL", "1")
    for seed in range(5):
        _fused_passes_against_float64(shape, dtype, memory_format, seed)


def _fused_passes_against_float64(shape, dtype, memory_format, seed=7):
    torch.manual_seed(seed)
    C = shape[1]
    x = (torch.randn(shape, device=DEV) * 2 + 1).to(dtype).contiguous(memory_format=memory_format)
    gy = torch.randn(shape, device=DEV).to(dtype).contiguous(memory_format=memory_format)
    w, b = torch.rand(C, device=DEV) + 0.5, torch.randn(C, device=DEV)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    for formula in ("batch", "frozen"):
        rm, rv = torch.zeros(C, device=DEV), torch.ones(C, device=DEV)
        got = train_fwd_bwd(x, w, b, gy, formula, rm, rv)
        xd = x.double().cpu().requires_grad_()
        wd, bd = w.double().cpu().requires_grad_(), b.double().cpu().requires_grad_()
        rmd, rvd = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
        if formula == "batch":
            yd = torch.nn.functional.batch_norm(xd, rmd, rvd, wd, bd, True, 0.1, 1e-5)
        else:  # eval-mode function with the batch statistics as constants
            dims = [0] + list(range(2, x.dim()))
            mean, var = xd.detach().mean(dims), xd.detach().var(dims, unbiased=False)
            yd = torch.nn.functional.batch_norm(xd, mean, var, wd, bd, False, 0.1, 1e-5)
            torch.nn.functional.batch_norm(xd.detach(), rmd, rvd, None, None, True, 0.1, 1e-5)
        yd.backward(gy.double().cpu())
        for g, r, name in zip(got, [yd.detach(), xd.grad, wd.grad, bd.grad], ["y", "dx", "dw", "db"]):
            scale = r.abs().max().clamp_min(1)
            torch.testing.assert_close(g.double().cpu() / scale, r / scale, **tol, msg=f"{formula} {name}")
        torch.testing.assert_close(rm.double().cpu(), rmd, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(rv.double().cpu(), rvd, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_bf16_maps_exact_on_every_value(layout):
    """bf16 elements are read from and written to 32-bit words in pairs (to_acc; from_acc by
    cvt.rn.bf16x2.f32): identity maps give every finite bfloat16 value back in its place."""
    assert_bf16_maps_exact(ops, layout, DEV)


@pytest.mark.parametrize("count", [0, -2])
def test_num_batches_tracked_below_one_makes_running_statistics_nan(count):
    """On the GPU a count below 1 (no cumulative-average factor) cannot be refused without waiting for the
    device: the running statistics become NaN, the output and batch statistics are those of a count of 1."""
    torch.manual_seed(11)
    x = torch.randn(6, 5, 4, 4, device=DEV)
    rm, rv = torch.zeros(5, device=DEV), torch.ones(5, device=DEV)
    want = ops.batch_norm_train_forward(x, None, None, rm.clone(), rv.clone(), torch.tensor(1, device=DEV), 0.1, 1e-5)
    got = ops.batch_norm_train_forward(x, None, None, rm, rv, torch.tensor(count, device=DEV), 0.1, 1e-5)
    assert rm.isnan().all() and rv.isnan().all()
    for g, w in zip(got, want):
        assert torch.equal(g, w)
