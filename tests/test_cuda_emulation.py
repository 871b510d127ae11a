"""The CUDA ops on CPU tensors, through an emulation of the CUDA thread model (csrc/cuda/emulation.h).

The csrc/cuda/*.cu files are compiled as C++ with BNX_CUDA_EMULATION (every CUDA thread a fiber, blocks in
turn, __syncthreads and warp shuffles switching fibers) into a test-only library, `bnx_cuda_emulation`,
whose ops take CPU tensors. So on a machine without a GPU (CI) the CUDA kernels' walks, vector offsets,
per-lane channels, block and split reductions and launch plans are still tested, against bnx's CPU ops
(themselves tested against torch) and float64 references (tests/test_sanitizers.py runs them all again
with the kernels built with AddressSanitizer and UndefinedBehaviorSanitizer, so an access outside a tensor
or an overflowing index fails even where the values come out right). Not tested here: speed, races between unsynchronized
threads; tests/test_cuda.py and the CUDA cases of the other tests run on a GPU.

BNX_EMULATED_SMS sets the SM count the plans see (small by default, so small tensors still get channels
split across CTAs and the finalize kernel); BNX_CUDA_PLANE_GROUPS=0 turns off the plane-groups walk (on by
default);
BNX_EMULATION_SANITIZE=address,undefined builds the emulated library with those sanitizers (what
`scripts/sanitize.sh emulation` sets, with the runtime preloaded).
"""
import functools
import os
import random

import pytest
import torch
from torch.utils import cpp_extension

import bnx  # noqa: F401  (registers torch.ops.bnx, whose schemas the emulated library reuses)
from conftest import assert_bf16_maps_exact, assert_variance_exact

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ["batch_norm_stats", "batch_norm_train_forward", "batch_norm_elemt", "batch_norm_inference",
       "batch_norm_backward_reduce", "batch_norm_backward_elemt", "batch_norm_backward"]
KPLANES, KROWS, KGROUPS, KSEGMENTS = 0, 1, 2, 3
_LIBRARIES = []


@functools.lru_cache(maxsize=None)
def _emulated_ops():
    lib = torch.library.Library("bnx_cuda_emulation", "DEF")
    for name in OPS:
        schema = str(getattr(torch.ops.bnx, name).default._schema)
        lib.define(schema.split("::", 1)[1])
    _LIBRARIES.append(lib)  # the definitions live as long as the Library object
    sources = [os.path.join(ROOT, "tests", "cuda_emulation", f) for f in
               ("batch_norm_stats.cpp", "batch_norm_elemt.cpp", "batch_norm_backward.cpp", "plan.cpp")]
    sanitize = os.environ.get("BNX_EMULATION_SANITIZE", "")
    build = os.path.join(ROOT, "build", "cuda_emulation" + (f"-{sanitize.replace(',', '-')}" if sanitize else ""))
    os.makedirs(build, exist_ok=True)
    flags = ["-DBNX_CUDA_EMULATION", "-O1", "-fno-strict-aliasing", "-Wno-unknown-pragmas"]
    if sanitize:
        flags += [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    cpp_extension.load(
        name="bnx_cuda_emulation", sources=sources + [os.path.join(ROOT, "csrc", "checks.cpp")],
        extra_cflags=flags, extra_ldflags=[f"-fsanitize={sanitize}"] if sanitize else [],
        extra_include_paths=[os.path.join(ROOT, "csrc")], build_directory=build,
        is_python_module=False, verbose=False)
    return torch.ops.bnx_cuda_emulation


@pytest.fixture
def emu():
    return _emulated_ops()


CONFIGS = {  # name: (BNX_CUDA_PLANE_GROUPS, BNX_CUDA_L2_GROUPS, BNX_CUDA_L2_GROUPS_BARRIERS, BNX_CUDA_ON_CHIP)
    "default": ("1", "0", "", ""),
    "plane_groups_off": ("0", "0", "", ""),
    "l2_groups": ("1", "1", "", ""),
    "l2_groups_two_barriers": ("1", "1", "2", ""),
    "l2_groups_no_barrier": ("1", "1", "0", ""),
    "l2_groups_plane_groups_off": ("0", "1", "", ""),
    "on_chip": ("1", "0", "", "1"),
}


@pytest.fixture
def config(monkeypatch, request):
    plane, l2, barriers, on_chip = CONFIGS[request.param]
    monkeypatch.setenv("BNX_CUDA_PLANE_GROUPS", plane)
    monkeypatch.setenv("BNX_CUDA_L2_GROUPS", l2)
    monkeypatch.setenv("BNX_CUDA_L2_GROUPS_BARRIERS", barriers)
    monkeypatch.setenv("BNX_CUDA_ON_CHIP", on_chip)
    if on_chip:
        monkeypatch.setenv("BNX_EMULATED_SMEM_BYTES", str(4 << 20))  # room for every test tensor
    return request.param


def _tensor(shape, dtype, layout, scale=1.0, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)
    if layout == "cl":
        t = t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t


def _close(got, want, dtype, what):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert got.stride() == want.stride(), f"{what}: strides {got.stride()} vs {want.stride()}"
    tol = {torch.float64: 1e-12, torch.float32: 2e-5}.get(dtype, 1e-2)
    scale = want.double().abs().max().clamp_min(1.0) if want.numel() else 1.0
    torch.testing.assert_close(got.double() / scale, want.double() / scale, atol=tol, rtol=tol, msg=what)


# --- the emulator itself --------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [32, 96, 256, 1024])
def test_emulated_barriers_and_shuffles(emu, threads):
    """A block reduction by warp shuffles and shared memory across a __syncthreads gives the exact sum in
    every block (the shuffles exchange the right lanes, the barrier waits for every warp)."""
    out = emu.emulated_block_sums(3, threads, 1000)
    assert out.tolist() == [500500] * 3


def test_emulated_shuffle_in_partial_warp_raises(emu):
    """A shuffle in a warp with missing lanes (a 100-thread block) is refused, not answered with garbage."""
    with pytest.raises(RuntimeError, match="whole, converged warp"):
        emu.emulated_block_sums(1, 100, 1000)


def test_emulated_vector_access_must_be_aligned(emu):
    """16-byte vector loads from a 16-byte aligned address copy exactly; from an address 4 bytes further
    (what would fault on a GPU, and passes silently on x86) the emulation raises."""
    x = torch.arange(200, dtype=torch.float32)
    assert x.data_ptr() % 16 == 0
    torch.testing.assert_close(emu.emulated_vector_copy(x, 4, 32), x[4:132], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="misaligned 16-byte vector access"):
        emu.emulated_vector_copy(x, 1, 32)


# --- launch plans ---------------------------------------------------------------------------------------

PLAN_CASES = [
    # shape, dtype, layout, BNX_CUDA_PLANE_GROUPS (None: unset, the default), expected (walk, V)
    ((4, 16, 7, 7), torch.bfloat16, "nchw", "1", (KGROUPS, 8)),
    ((4, 16, 7, 7), torch.bfloat16, "nchw", None, (KGROUPS, 8)),     # on by default
    ((4, 16, 7, 7), torch.bfloat16, "nchw", "0", (KPLANES, 1)),
    ((4, 16, 7, 7), torch.float32, "nchw", "1", (KGROUPS, 4)),
    ((4, 16, 7, 7), torch.float64, "nchw", "1", (KGROUPS, 2)),
    ((4, 16, 14, 14), torch.bfloat16, "nchw", "1", (KGROUPS, 8)),   # 196 % 8 = 4: 8-byte vectors without
    ((4, 16, 14, 14), torch.bfloat16, "nchw", "0", (KPLANES, 4)),
    ((4, 16, 14, 14), torch.float32, "nchw", "1", (KPLANES, 4)),    # 16-byte vectors divide the plane
    ((4, 12, 7, 7), torch.bfloat16, "nchw", "1", (KPLANES, 1)),     # C not a multiple of 8
    ((4, 16, 17, 17), torch.bfloat16, "nchw", "1", (KPLANES, 1)),   # plane over 256 elements
    ((4, 16, 7), torch.bfloat16, "nchw", "1", (KGROUPS, 8)),        # S = 7 = V - 1: a vector spans two planes
    ((4, 16, 1, 5), torch.bfloat16, "nchw", "1", (KPLANES, 1)),     # S = 5 < V - 1: it would span three
    ((4, 16, 3), torch.float32, "nchw", "1", (KGROUPS, 4)),         # S = 3 = V - 1
    ((4, 16, 2), torch.float32, "nchw", "1", (KPLANES, 2)),         # S = 2 < V - 1
    ((4, 16, 7, 7), torch.bfloat16, "cl", "1", (KROWS, 8)),
    ((6, 16), torch.float32, "nchw", "1", (KROWS, 4)),
]


@pytest.mark.parametrize("shape,dtype,layout,groups,expected", PLAN_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}-{c[2]}-groups{c[3] or 'unset'}"
                              for c in PLAN_CASES])
def test_plan_picks_the_walk(emu, monkeypatch, shape, dtype, layout, groups, expected):
    """The ops' launch plan: plane groups (unless BNX_CUDA_PLANE_GROUPS=0) exactly where NCHW planes get no
    16-byte vector and the group conditions hold (C a multiple of V, V - 1 <= plane <= 256 elements, so that
    a vector's lanes lie in at most two channels); the CTA covers the group's S vectors with kThreads // S
    batch entries at a time and one CTA per V channels."""
    if groups is None:
        monkeypatch.delenv("BNX_CUDA_PLANE_GROUPS", raising=False)
    else:
        monkeypatch.setenv("BNX_CUDA_PLANE_GROUPS", groups)
    x = _tensor(shape, dtype, layout)
    walk, V, grid_x, splits, tx, ty, rows_per_split = emu.plan(x, "sums")
    assert (walk, V) == expected
    if walk == KGROUPS:
        S = x[0, 0].numel()
        assert (tx, ty, grid_x) == (S, 256 // S, shape[1] // V)
    assert splits * rows_per_split >= (shape[0] if walk != KROWS else x.numel() // shape[1])


def test_plan_needs_aligned_pointers_for_plane_groups(emu, monkeypatch):
    """A 16-byte vector walk over memory that is not 16-byte aligned would fault: an input starting one
    element into its storage falls back to the scalar plane walk."""
    monkeypatch.setenv("BNX_CUDA_PLANE_GROUPS", "1")
    base = torch.randn(4 * 16 * 49 + 1, dtype=torch.float32)
    x = base[1:].view(4, 16, 7, 7)
    assert tuple(emu.plan(x, "sums")[:2]) == (KPLANES, 1)
    assert tuple(emu.plan(base[:-1].view(4, 16, 7, 7), "sums")[:2]) == (KGROUPS, 4)


def test_plan_sizes_can_be_overridden(emu, monkeypatch):
    """BNX_CUDA_SUMS_PLAN / BNX_CUDA_MAP_PLAN ("ctas_per_sm,min_vecs_per_thread", for measuring other plans on
    a GPU) change the split count of their kernel shape only; anything unparsable leaves the defaults."""
    monkeypatch.setenv("BNX_EMULATED_SMS", "132")
    x = _tensor((32, 64, 56, 56), torch.float32, "cl")
    monkeypatch.delenv("BNX_CUDA_SUMS_PLAN", raising=False)
    monkeypatch.delenv("BNX_CUDA_MAP_PLAN", raising=False)
    sums, mapped = emu.plan(x, "sums")[3], emu.plan(x, "map")[3]
    assert (sums, mapped) == (392, 1568)  # min 16 vectors per thread binds the sums, 16 CTAs per SM the map
    monkeypatch.setenv("BNX_CUDA_SUMS_PLAN", "8,8")
    assert (emu.plan(x, "sums")[3], emu.plan(x, "map")[3]) == (784, mapped)
    monkeypatch.setenv("BNX_CUDA_MAP_PLAN", "8,4")
    assert (emu.plan(x, "sums")[3], emu.plan(x, "map")[3]) == (784, 1046)  # about 8 x 132 (96 rows each)
    for bad in ["", "8", "x,y", "0,8", "-1,4"]:
        monkeypatch.setenv("BNX_CUDA_SUMS_PLAN", bad)
        assert emu.plan(x, "sums")[3] == sums, bad


@pytest.mark.parametrize("sms", ["1", "64"])
def test_plan_split_count_follows_the_sm_count(emu, monkeypatch, sms):
    """With many SMs the batch is split across CTAs (a finalize kernel adds the partial sums); with one SM
    and few rows it is not, so both reduction endings are exercised by the op tests below."""
    monkeypatch.setenv("BNX_EMULATED_SMS", sms)
    monkeypatch.setenv("BNX_CUDA_PLANE_GROUPS", "1")
    splits = emu.plan(_tensor((200, 32, 7, 7), torch.float32, "nchw"), "sums")[3]
    assert (splits > 1) == (sms == "64")


@pytest.mark.parametrize("l2_kib,tiles_per_group", [(64, 1), (128, 2), (1024, 16)])
def test_grouped_plan_sizes_groups_by_the_l2(emu, monkeypatch, l2_kib, tiles_per_group):
    """The grouped launch cuts (16,16,16,16) fp32 NCHW (16 KiB per channel) into groups of channels whose
    input takes at most a third of the L2, at least one channel a group; the grid has at most the resident
    CTAs (2 SMs x 2) and no more than the group's tiles."""
    monkeypatch.setenv("BNX_EMULATED_L2_BYTES", str(l2_kib * 1024))
    x = _tensor((16, 16, 16, 16), torch.float32, "nchw")
    walk, V, grid_x, splits, tx, ty, rows_per_split, per_group, count, ctas, _ = emu.plan(x, "grouped")
    assert (walk, grid_x) == (KPLANES, 16)
    assert (per_group, count) == (tiles_per_group, 16 // tiles_per_group)
    assert 1 <= ctas <= min(4, per_group * splits)
    monkeypatch.setenv("BNX_CUDA_L2_GROUP_BYTES", str(48 * 1024))  # the override: 3 channels a group
    assert tuple(emu.plan(x, "grouped")[7:9]) == (3, 6)


@pytest.mark.parametrize("l2_kib,row_bytes,kind,tx", [
    (1024, "", "grouped", 8),            # the full-width column fits: unchanged
    (256, "", "grouped", 4),             # 64 bytes of every row fit
    (256, "", "grouped_backward", 8),    # x and dy would need 32 bytes, under the 64-byte floor: unchanged
    (256, "32", "grouped_backward", 2),  # a lower floor
    (64, "", "grouped", 8),              # not even 64 bytes fit: unchanged
    (64, "16", "grouped", 1)])
def test_grouped_plan_narrows_channels_last_columns(emu, monkeypatch, l2_kib, row_bytes, kind, tx):
    """Channels-last (64,32,4,4) fp32: 1024 rows of 32 channels, which the rows walk reads as 8 lanes of 4
    channels (128 bytes of every row: a 128 KiB column). The grouped launch halves the lanes (doubling the
    rows a CTA walks at once) until one column's inputs (x; x and dy for the backward) fit in a third of the
    L2, down to BNX_CUDA_L2_GROUP_ROW_BYTES (64) bytes of every row, and keeps the full width where even that
    does not fit."""
    monkeypatch.setenv("BNX_EMULATED_L2_BYTES", str(l2_kib * 1024))
    monkeypatch.setenv("BNX_CUDA_L2_GROUP_ROW_BYTES", row_bytes)
    x = _tensor((64, 32, 4, 4), torch.float32, "cl")
    walk, V, grid_x, splits, got_tx, ty, rows_per_split, per_group, count, ctas, _ = emu.plan(x, kind)
    assert (walk, V) == (KROWS, 4)
    assert (got_tx, ty, grid_x) == (tx, 256 // tx, 8 // tx)
    column = 1024 * tx * 4 * 4 * (1 if kind == "grouped" else 2)
    if tx < 8:
        assert column <= l2_kib * 1024 // 3 and per_group * count >= grid_x
    assert splits * rows_per_split >= 1024


AUTO_CASES = [
    # shape, layout, emulated L2 KiB, BNX_CUDA_L2_GROUP_ROW_BYTES, kind, expected (lanes across a row, reuses)
    # fp32 NCHW (16,16,16,16): 16 channels of 16 KiB (256 KiB; x and dy 512 KiB), one channel a column
    ((16, 16, 16, 16), "nchw", 1024, "", "grouped", (16, 0)),          # the input fits in the L2
    ((16, 16, 16, 16), "nchw", 192, "", "grouped", (16, 1)),           # 256 KiB over 192; 16 KiB in 64 KiB groups
    ((16, 16, 16, 16), "nchw", 192, "", "grouped_backward", (16, 1)),  # 32 KiB columns
    ((16, 16, 16, 16), "nchw", 48, "", "grouped_backward", (16, 0)),   # 32 KiB columns over 16 KiB groups
    ((16, 16, 16, 16), "nchw", 48, "", "grouped", (16, 1)),
    # fp32 channels-last (64,32,4,4): 1024 rows of 32 channels (128 KiB), 8 lanes of 4 channels a row
    ((64, 32, 4, 4), "cl", 96, "", "grouped", (8, 0)),     # even 64 bytes a row (64 KiB) over 32 KiB groups
    ((64, 32, 4, 4), "cl", 96, "16", "grouped", (2, 1)),   # 32 bytes a row fit
    ((64, 32, 4, 4), "cl", 512, "16", "grouped", (8, 0)),  # fits in the L2 whole
]


@pytest.mark.parametrize("shape,layout,l2_kib,row_bytes,kind,expected", AUTO_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{c[1]}-l2_{c[2]}k-row{c[3] or 64}-{c[4]}" for c in AUTO_CASES])
def test_auto_l2_groups_takes_the_grouped_launch_where_it_reuses_l2(emu, monkeypatch, shape, layout, l2_kib, row_bytes,
                                                                      kind, expected):
    """BNX_CUDA_L2_GROUPS=auto takes the (barrier-free) grouped launch only where it buys L2 reuse that the two
    launches do not get: a tile column (after narrowing, in channels-last) fits in a group (a third of the L2)
    and the pass's inputs (x; x and dy for the backward) are larger than the L2. The plan's last field says
    which; the lanes show the channels-last narrowing it was decided on."""
    monkeypatch.setenv("BNX_EMULATED_L2_BYTES", str(l2_kib * 1024))
    monkeypatch.setenv("BNX_CUDA_L2_GROUP_ROW_BYTES", row_bytes)
    monkeypatch.setenv("BNX_CUDA_PLANE_GROUPS", "1")
    plan = emu.plan(_tensor(shape, torch.float32, layout), kind)
    lanes = plan[4] if layout == "cl" else plan[2]  # channels-last: tx; NCHW: one column per channel
    assert (lanes, plan[10]) == expected


@pytest.mark.parametrize("dtype,l2_kib,cl_backward_grouped", [(torch.float32, 1536, 1), (torch.bfloat16, 768, 0)],
                         ids=["float32", "bfloat16"])
def test_emulated_ops_with_auto_l2_groups(emu, monkeypatch, dtype, l2_kib, cl_backward_grouped):
    """Every op with BNX_CUDA_L2_GROUPS=auto: NCHW (64,8,32,32) and channels-last (64,32,16,16) take the
    grouped launch for the forward and (but for the bf16 channels-last backward, whose narrowest column, one
    16-byte lane of x and dy a row, is 512 KiB) the backward, with several splits per column; (2,4,8,8) fits
    in the L2 and takes the two launches. The CPU ops' results in every case, and the count of cooperative
    launches shows which launch each op took."""
    monkeypatch.setenv("BNX_EMULATED_SMS", "8")
    monkeypatch.setenv("BNX_EMULATED_L2_BYTES", str(l2_kib * 1024))
    monkeypatch.setenv("BNX_CUDA_L2_GROUP_ROW_BYTES", "8")
    monkeypatch.setenv("BNX_CUDA_PLANE_GROUPS", "1")
    monkeypatch.setenv("BNX_CUDA_L2_GROUPS", "auto")
    monkeypatch.delenv("BNX_CUDA_L2_GROUPS_BARRIERS", raising=False)
    for shape, layout, grouped in [((64, 8, 32, 32), "nchw", (1, 1)), ((64, 32, 16, 16), "cl", (1, cl_backward_grouped)),
                                   ((2, 4, 8, 8), "nchw", (0, 0))]:
        x = _tensor(shape, dtype, layout)
        fwd, bwd = emu.plan(x, "grouped"), emu.plan(x, "grouped_backward")
        assert (fwd[10], bwd[10]) == grouped, shape
        for plan, used in zip((fwd, bwd), grouped):
            assert not used or plan[3] > 1, shape  # several splits: columns finished from partial sums
        before = emu.emulated_cooperative_launches()
        _assert_matches_cpu_ops(emu, _inputs(shape, dtype, layout), dtype, f"{shape} {layout} ")
        # what the ops took: _run_all makes one training forward and two batch backwards with grad_input
        assert emu.emulated_cooperative_launches() - before == grouped[0] + 2 * grouped[1], shape


@pytest.mark.parametrize("barriers", ["0", "2"], ids=["no_barrier", "two_barriers"])
@pytest.mark.parametrize("row_bytes", ["", "16"], ids=["row64", "row16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_emulated_grouped_ops_on_narrowed_channels_last_columns(emu, monkeypatch, barriers, row_bytes, dtype):
    """Every op through the grouped launch where it narrows the channels-last columns (4096 rows of 32
    channels: 128 bytes of every row in fp32 do not fit in a third of a 1 MiB emulated L2, 64 do), with
    and without grid barriers, several splits per column: the CPU ops' results."""
    monkeypatch.setenv("BNX_EMULATED_SMS", "8")
    monkeypatch.setenv("BNX_EMULATED_L2_BYTES", str(1 << 20))
    monkeypatch.setenv("BNX_CUDA_L2_GROUPS", "1")
    monkeypatch.setenv("BNX_CUDA_L2_GROUPS_BARRIERS", barriers)
    monkeypatch.setenv("BNX_CUDA_L2_GROUP_ROW_BYTES", row_bytes)
    shape = (4, 32, 32, 32)
    x = _tensor(shape, dtype, "cl")
    full = emu.plan(x, "sums")[4]
    fwd, bwd = emu.plan(x, "grouped"), emu.plan(x, "grouped_backward")
    # lanes of the column: the sums plan's, the grouped forward's (x), the grouped backward's (x and dy)
    if dtype == torch.float32:  # 4 channels a lane
        assert (full, fwd[4], bwd[4]) == ((8, 4, 8) if row_bytes == "" else (8, 4, 2))
    else:  # 8 bf16 channels a lane: the forward's full 4 lanes fit already
        assert (full, fwd[4], bwd[4]) == ((4, 4, 4) if row_bytes == "" else (4, 4, 2))
    assert fwd[3] > 1 and bwd[3] > 1  # several splits: the columns are finished from partial sums
    _assert_matches_cpu_ops(emu, _inputs(shape, dtype, "cl"), dtype)


# --- the ops against bnx's CPU ops --------------------------------------------------------------------

SHAPES = [
    ((5, 16, 7, 7), "nchw"),      # plane groups (any dtype)
    ((3, 8, 3, 3), "nchw"),       # S = 9: groups in bf16 (a vector spans two planes) and fp32/fp64
    ((3, 16, 1, 5), "nchw"),      # S = 5: groups in fp32 (a vector spans two planes); planes in bf16 (S < V - 1)
    ((2, 16, 14, 14), "nchw"),    # groups in bf16 only (S = 196)
    ((2, 8, 3, 3, 3), "nchw"),    # 5-D, S = 27
    ((4, 6, 4, 4), "nchw"),       # 16-byte plane vectors
    ((3, 5, 2, 3), "nchw"),       # narrow / scalar plane vectors
    ((4, 24, 5, 5), "cl"),        # channels-last rows, 16-byte vectors
    ((3, 7, 4, 4), "cl"),         # channels-last rows, scalar
    ((6, 10), "nchw"),            # (N, C): rows
    ((3, 8, 7), "nchw"),          # 3-D planes; S = 7 = V - 1 in bf16: a vector's lanes span two channels
    ((4, 8, 3), "nchw"),          # S = 3 = V - 1 in fp32: groups, two channels a vector; planes in bf16
]
DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
if os.environ.get("BNX_SANITIZED"):
    # Under the sanitizers (scripts/sanitize.sh), which check accesses, not values: float16 takes the plans,
    # walks, offsets and loads bfloat16 takes (both 2 bytes; its only code of its own converts elements in
    # registers), so it would repeat those checks, a quarter of this test's cases, in the longest CI step.
    DTYPES.remove(torch.float16)


def _run_all(ops, x, dy, w, b, rm, rv, nbt, fresh=torch.Tensor.clone):
    """Every op on the same inputs; returns {name: tensor} (running statistics after each update too, each
    update on fresh(rm), fresh(rv))."""
    out = {}
    rm1, rv1 = fresh(rm), fresh(rv)
    out["stats.mean"], out["stats.invstd"] = ops.batch_norm_stats(x, rm1, rv1, None, 0.1, 1e-5)
    out["stats.rm"], out["stats.rv"] = rm1, rv1
    rm2, rv2 = fresh(rm), fresh(rv)
    out["fwd.y"], mean, invstd = ops.batch_norm_train_forward(x, w, b, rm2, rv2, nbt, 0.1, 1e-5)
    out["fwd.mean"], out["fwd.invstd"], out["fwd.rm"], out["fwd.rv"] = mean, invstd, rm2, rv2
    out["elemt"] = ops.batch_norm_elemt(x, w, b, mean, invstd)
    out["inference"] = ops.batch_norm_inference(x, w, b, rm, rv, 1e-5)
    sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(dy, x, mean, invstd)
    out["reduce.sum_dy"], out["reduce.sum_dy_xmu"] = sum_dy, sum_dy_xmu
    out["bwd_elemt"] = ops.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu,
                                                     x.numel() // x.shape[1])
    for formula in ("batch", "frozen"):
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            key = f"bwd.{formula}.{''.join('1' if m else '0' for m in mask)}"
            for name, t in zip(("dx", "dw", "db"), ops.batch_norm_backward(dy, x, mean, invstd, w, formula, mask)):
                out[f"{key}.{name}"] = t
    return out


def _assert_matches_cpu_ops(emu, args, dtype, what="", fresh=torch.Tensor.clone):
    """Every op, emulated, against bnx's CPU ops on the same inputs."""
    got = _run_all(emu, *args, fresh=fresh)
    want = _run_all(torch.ops.bnx, *args, fresh=fresh)
    assert got.keys() == want.keys()
    for key in want:
        _close(got[key], want[key], dtype, f"{what}{key}")


def _inputs(shape, dtype, layout):
    C = shape[1]
    x = _tensor(shape, dtype, layout, scale=2.0, shift=3.0, seed=1)
    dy = _tensor(shape, dtype, layout, seed=2)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = _tensor((C,), pdt, "nchw", seed=3).abs() + 0.5
    b = _tensor((C,), pdt, "nchw", seed=4)
    rm, rv = _tensor((C,), pdt, "nchw", seed=5), _tensor((C,), pdt, "nchw", seed=6).abs() + 0.5
    nbt = torch.tensor(3)
    return x, dy, w, b, rm, rv, nbt


@pytest.mark.parametrize("config", list(CONFIGS), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape,layout", SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_emulated_cuda_ops_match_cpu_ops(emu, config, dtype, shape, layout):
    """Every CUDA op (statistics with the running-statistics update, training forward, normalize,
    inference, gradient sums, batch grad_input, the fused backward with both formulas and several output
    masks), emulated, gives bnx's CPU ops' results: same dtypes, shapes and strides, values within the
    accumulation-order tolerance. In every walk: the default ones (plane groups where they apply), plane
    groups off, and the L2-grouped cooperative launch of the training forward and batch backward (a 64 KiB
    emulated L2, so these tensors span several groups)."""
    if config.endswith("plane_groups_off") and layout == "cl":
        pytest.skip("plane groups only concern NCHW planes")
    _assert_matches_cpu_ops(emu, _inputs(shape, dtype, layout), dtype)


@pytest.mark.parametrize("config", ["default", "l2_groups"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_emulated_ops_on_misaligned_input(emu, config, dtype):
    """An input one element into its storage (data pointer 2 or 4 bytes off a 16-byte boundary): the
    plans fall back to narrower vectors, no access is misaligned (the emulation would raise), and the
    results are the CPU ops' results."""
    shape = (5, 16, 7, 7)
    x, dy, w, b, rm, rv, nbt = _inputs(shape, dtype, "nchw")
    x = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(shape)
    dy = torch.cat([dy.new_zeros(1), dy.flatten()])[1:].view(shape)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    _assert_matches_cpu_ops(emu, (x, dy, w, b, rm, rv, nbt), dtype)


@pytest.mark.parametrize("l2_groups", ["0", "1", "1/2", "1/0"],
                         ids=["two_launches", "l2_groups", "l2_groups_two_barriers", "l2_groups_no_barrier"])
@pytest.mark.parametrize("sms", ["1", "3", "200"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_emulated_ops_over_split_counts(emu, monkeypatch, sms, dtype, l2_groups):
    """The same on a larger batch with the plan's SM count varied, so channels are summed by one CTA
    (splits == 1: the CTA finishes them) or by many (partial sums and the finalize kernel, or the grouped
    kernel's finalize step: spread over the grid between two barriers, or each CTA finishing its own tiles'
    channels after one barrier, or with no barrier once the group's tiles have all been counted)."""
    monkeypatch.setenv("BNX_EMULATED_SMS", sms if l2_groups == "0" else str(min(int(sms), 8)))
    monkeypatch.setenv("BNX_CUDA_PLANE_GROUPS", "1")
    monkeypatch.setenv("BNX_CUDA_L2_GROUPS", l2_groups[0])
    monkeypatch.setenv("BNX_CUDA_L2_GROUPS_BARRIERS", l2_groups[2:])
    for shape, layout in [((200, 8, 7, 7), "nchw"), ((64, 4, 32, 32), "nchw"), ((512, 16, 3, 3), "cl")]:
        if sms == "200":  # many SMs: the batch is split, so the finalize step runs
            plan = emu.plan(_tensor(shape, dtype, layout), "grouped" if l2_groups != "0" else "sums")
            assert plan[3] > 1, shape
        _assert_matches_cpu_ops(emu, _inputs(shape, dtype, layout), dtype, f"{shape} {layout} ")


@pytest.mark.parametrize("shape,layout", [((1200, 2, 12, 12), "nchw"), ((600, 8, 8, 8), "cl")], ids=["nchw", "cl"])
def test_emulated_ops_over_many_splits(emu, monkeypatch, shape, layout):
    """Channels split over 300 CTAs, more than one warp's deep loads cover at once (32 lanes x kReduceDepth =
    256 splits a round in reduce_channel): the finalize kernel takes a full round and a partial one (a lane
    whose second round has no split, one whose has a few), and must still add every split once."""
    monkeypatch.setenv("BNX_EMULATED_SMS", "1000")
    monkeypatch.setenv("BNX_CUDA_SUMS_PLAN", "8,1")  # one vector a thread at least: as many splits as rows allow
    x = _tensor(shape, torch.float32, layout)
    splits = emu.plan(x, "sums")[3]
    assert 256 < splits < 320 and splits % 32 != 0, splits
    _assert_matches_cpu_ops(emu, _inputs(shape, torch.float32, layout), torch.float32, f"{shape} {layout} ")


# The on-chip launch (BNX_CUDA_ON_CHIP=1). Channels-last (64,32,16,16) fp32: one tile column of 8 lanes x 32
# thread-rows; the emulation holds 2 CTAs per SM, so 16 CTAs on 8 SMs take 1024 rows each (32 vectors a
# thread: 128 KiB of x, 256 KiB of x and dy), 8 on 8 SMs where only one CTA's share of an SM fits. Where
# no share holds a tile, a thread caches what fits of its walk (slots: 4 KiB a slot for x, 8 KiB for x and
# dy) if the rest of the input (at most (32 - slots) slots of each of the 16 tiles) fits in half the L2.
# smem per SM (KiB), L2 (KiB), kind, expected (splits, fits, slots, smem_bytes, cached_all)
ON_CHIP_PLANS = [
    (1024, 64, "on_chip", (16, 1, 32, 128 << 10, 1)),
    (1024, 64, "on_chip_backward", (16, 1, 32, 256 << 10, 1)),
    (256, 64, "on_chip", (16, 1, 32, 128 << 10, 1)),          # two shares of 128 KiB: just fits
    (256, 64, "on_chip_backward", None),                      # 256 KiB in 128 KiB shares, 512 KiB for one CTA: no
    (200, 64, "on_chip", None),                               # 100 KiB shares, or 256 KiB for one CTA: no
    (200, 1024, "on_chip", (16, 1, 25, 100 << 10, 0)),        # 25 slots of 100 KiB; 7 x 4 KiB x 16 = 448 <= 512 KiB
    (200, 800, "on_chip", None),                              # 448 KiB > 400 KiB
    (256, 4096, "on_chip_backward", (16, 1, 16, 128 << 10, 0)),  # 16 x 8 KiB x 16 = 2 MiB <= 2 MiB
    (256, 4000, "on_chip_backward", None),
]


@pytest.mark.parametrize("smem_kib,l2_kib,kind,expected", ON_CHIP_PLANS)
def test_on_chip_plan_fits_the_input_in_shared_memory(emu, monkeypatch, smem_kib, l2_kib, kind, expected):
    monkeypatch.setenv("BNX_EMULATED_SMS", "8")
    monkeypatch.setenv("BNX_EMULATED_SMEM_BYTES", str(smem_kib * 1024))
    monkeypatch.setenv("BNX_EMULATED_L2_BYTES", str(l2_kib * 1024))
    plan = emu.plan(_tensor((64, 32, 16, 16), torch.float32, "cl"), kind)
    assert tuple(plan[:2]) == (KROWS, 4) and tuple(plan[4:6]) == (8, 32)
    if expected is None:
        assert plan[7] == 0
    else:
        assert (plan[3], plan[7], plan[8], plan[9], plan[10]) == expected
        assert plan[3] * plan[6] >= 64 * 16 * 16  # every row in a tile
        assert (plan[8] * 32 >= plan[6]) == bool(plan[10])  # and in a slot where cached_all


def test_on_chip_slots_cap_takes_the_partial_form(emu, monkeypatch):
    """BNX_CUDA_ON_CHIP_SLOTS caps a thread's cache slots (for GPU tests of the partial form): the same tiles,
    3 slots (12 KiB a CTA) instead of 32, the rest read from global memory; a rest larger than half the L2
    still takes the two launches."""
    monkeypatch.setenv("BNX_EMULATED_SMS", "8")
    monkeypatch.setenv("BNX_EMULATED_SMEM_BYTES", str(1 << 20))
    monkeypatch.setenv("BNX_CUDA_ON_CHIP_SLOTS", "3")
    x = _tensor((64, 32, 16, 16), torch.float32, "cl")
    monkeypatch.setenv("BNX_EMULATED_L2_BYTES", str(8 << 20))
    assert list(emu.plan(x, "on_chip")[3:]) == [16, 8, 32, 1024, 1, 3, 12 << 10, 0]
    monkeypatch.setenv("BNX_EMULATED_L2_BYTES", str(2 << 20))  # 29 x 4 KiB x 16 = 1.8 MiB > 1 MiB
    assert emu.plan(x, "on_chip")[7] == 0


@pytest.mark.parametrize("sms,cache", [("1", "all"), ("8", "all"), ("8", "part"), ("8", "few")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape,layout", [((64, 32, 16, 16), "cl"), ((40, 8, 7, 7), "nchw"), ((16, 6, 10, 10), "nchw"),
                                          ((1, 2, 256, 256), "nchw"), ((300, 24), "nchw")],
                         ids=["rows", "plane_groups", "planes", "segments", "2d"])
def test_emulated_on_chip_launch_matches_cpu_ops(emu, monkeypatch, sms, cache, dtype, shape, layout):
    """With BNX_CUDA_ON_CHIP=1 and room in shared memory, the training forward and the batch backward with
    grad_input take the on-chip launch (one cooperative launch each, counted) in every walk, with one split
    per tile column or many (the channels then finished across the grid between the barriers); every op's
    results are the CPU ops'. The emulation fills shared memory with NaN at launch, so a map reading a
    vector the sums did not store shows, and so does an output element the map does not write; where the
    whole input is cached it fails a thread that walks past its slots. A large L2 and
    less shared memory: cache="part" (64 KiB per SM; rows: 8 of a thread's 32 vectors of x, 4 of x and dy) or
    "few" (16 KiB: 1-2 vectors, fewer than a batch of loads), so that a thread caches only the first
    vectors of its walk and reads the rest from global memory in both passes; the map takes the batches not
    wholly cached first, then those that are."""
    monkeypatch.setenv("BNX_EMULATED_SMS", sms)
    monkeypatch.setenv("BNX_EMULATED_SMEM_BYTES", str({"all": 8 << 20, "part": 64 << 10, "few": 16 << 10}[cache]))
    monkeypatch.setenv("BNX_EMULATED_L2_BYTES", str(64 << 20))
    monkeypatch.setenv("BNX_CUDA_PLANE_GROUPS", "1")
    monkeypatch.setenv("BNX_CUDA_L2_GROUPS", "0")
    monkeypatch.setenv("BNX_CUDA_ON_CHIP", "1")
    x = _tensor(shape, dtype, layout)
    fwd, bwd = emu.plan(x, "on_chip"), emu.plan(x, "on_chip_backward")
    # a CTA for every tile column, 2 CTAs per emulated SM: with fewer, the two launches
    fits = emu.plan(x, "sums")[2] <= 2 * int(sms)
    assert fwd[7] == bwd[7] == int(fits)
    if cache == "all":
        assert fwd[10] == bwd[10] == int(fits)  # every vector cached
    elif shape in [(64, 32, 16, 16), (1, 2, 256, 256)]:  # some read from global memory
        assert bwd[10] == 0 and (fwd[10] == 0 or shape[0] == 1 and cache == "part")
    if sms == "8":
        assert fwd[3] > 1  # several splits: the channels are finished from partial sums
    before = emu.emulated_cooperative_launches()
    _assert_matches_cpu_ops(emu, _inputs(shape, dtype, layout), dtype, f"{shape} {layout} ")
    # _run_all makes one training forward and two batch backwards with grad_input
    assert emu.emulated_cooperative_launches() - before == (3 if fits else 0)


def test_emulated_on_chip_launch_falls_back_where_the_input_does_not_fit(emu, monkeypatch):
    """Shared memory too small for the input: the two launches instead (no cooperative launch), same results."""
    monkeypatch.setenv("BNX_EMULATED_SMS", "8")
    monkeypatch.setenv("BNX_EMULATED_SMEM_BYTES", str(200 * 1024))
    monkeypatch.setenv("BNX_CUDA_L2_GROUPS", "0")
    monkeypatch.setenv("BNX_CUDA_ON_CHIP", "1")
    shape = (64, 32, 16, 16)
    assert emu.plan(_tensor(shape, torch.float32, "cl"), "on_chip")[7] == 0
    before = emu.emulated_cooperative_launches()
    _assert_matches_cpu_ops(emu, _inputs(shape, torch.float32, "cl"), torch.float32)
    assert emu.emulated_cooperative_launches() == before


# shape, dtype, emulated SMs, plan kind, expected (walk, segs, splits, rows_per_split)
SEGMENT_PLANS = [
    ((2, 3, 256, 256), torch.float32, "132", "sums", (KSEGMENTS, 4, 8, 1)),   # 16384 vectors a plane: 4 of 16 per thread
    ((2, 3, 256, 256), torch.float32, "132", "map", (KSEGMENTS, 16, 32, 1)),  # 16 of 4 per thread
    ((2, 3, 256, 256), torch.bfloat16, "132", "sums", (KSEGMENTS, 2, 4, 1)),  # 8192 vectors of 8
    ((1, 2, 181, 181), torch.float32, "132", "sums", (KSEGMENTS, 7, 7, 1)),   # scalar vectors; the last segment shorter
    ((3, 2, 256, 256), torch.float32, "2", "sums", (KSEGMENTS, 3, 5, 2)),     # a split takes two segments
    ((3, 1, 181, 181), torch.float32, "2", "map", (KSEGMENTS, 11, 17, 2)),    # ... across planes, ragged
    ((2, 3, 128, 128), torch.float32, "132", "sums", (KSEGMENTS, 1, 2, 1)),   # only the map plan cuts: the sums
    ((2, 3, 128, 128), torch.float32, "132", "map", (KSEGMENTS, 4, 8, 1)),    # walk whole planes as segments
    ((256, 64, 56, 56), torch.float32, "132", "sums", (KPLANES, 1, 16, 16)),  # batch entries enough: whole planes
    ((2, 3, 40, 40), torch.float32, "132", "sums", (KPLANES, 1, 1, 2)),       # planes too short to cut
]


@pytest.mark.parametrize("shape,dtype,sms,kind,expected", SEGMENT_PLANS,
                         ids=["fp32-sums", "fp32-map", "bf16-sums", "ragged", "two-a-split", "two-a-split-ragged",
                              "map-only-sums", "map-only-map", "many-entries", "short-planes"])
def test_plan_cuts_few_long_planes_into_segments(emu, monkeypatch, shape, dtype, sms, kind, expected):
    """NCHW with fewer batch entries than the splits a channel wants: the planes are cut into segments (of
    at least the plan's least vectors per thread), so a channel of a few long planes is summed by many CTAs,
    not by one CTA per plane (which took (2,4,16384,16400) bf16 down to 8 CTAs on an H100 and left each
    thread 10^5 elements per float32 accumulator: 1e-3 of the variance lost). Such inputs take their own walk
    (kPlaneSegments) in both kernel shapes, so that the whole-plane kernels stay as they were."""
    monkeypatch.setenv("BNX_EMULATED_SMS", sms)
    x = _tensor(shape, dtype, "nchw")
    walk, V, grid_x, splits, tx, ty, rows_per_split, segs, seg_vecs = emu.plan(x, f"{kind}_segments")
    assert grid_x == shape[1] and ty == 1
    assert (walk, segs, splits, rows_per_split) == expected
    vecs = x[0, 0].numel() // V
    assert segs * seg_vecs >= vecs > (segs - 1) * seg_vecs  # the segments cover the plane
    assert splits * rows_per_split >= shape[0] * segs


@pytest.mark.parametrize("config", ["default", "l2_groups", "l2_groups_no_barrier"], indirect=True)
@pytest.mark.parametrize("shape,dtype,sms", [((2, 3, 256, 256), torch.float32, "132"),
                                             ((2, 3, 256, 256), torch.bfloat16, "132"),
                                             ((1, 2, 181, 181), torch.float32, "132"),
                                             ((3, 2, 256, 256), torch.float32, "2"),
                                             ((3, 1, 181, 181), torch.float32, "2"),
                                             ((2, 3, 128, 128), torch.float32, "132")],
                         ids=["fp32", "bf16", "ragged", "two-a-split", "two-a-split-ragged", "map-only"])
def test_emulated_ops_on_plane_segments(emu, monkeypatch, config, shape, dtype, sms):
    """Every op on planes cut into segments (the plans of the test above), in the two-launch and grouped
    walks: the CPU ops' results."""
    monkeypatch.setenv("BNX_EMULATED_SMS", sms)
    assert emu.plan(_tensor(shape, dtype, "nchw"), "sums_segments")[0] == KSEGMENTS
    _assert_matches_cpu_ops(emu, _inputs(shape, dtype, "nchw"), dtype)


def test_emulated_map_with_a_last_segment_shorter_than_the_block(emu, monkeypatch):
    """A plane of 855049 scalar vectors cut for the map into 835 segments of 1025, the last 199 long: the
    threads past its end skip it. The normalize and the batch grad_input against the CPU ops."""
    monkeypatch.setenv("BNX_EMULATED_SMS", "132")
    x, dy, w, b, rm, rv, _ = _inputs((1, 1, 901, 949), torch.float32, "nchw")
    segs, seg_vecs = emu.plan(x, "map_segments")[7:9]
    assert (segs, seg_vecs, x.numel() - (segs - 1) * seg_vecs) == (835, 1025, 199)
    mean, invstd = torch.ops.bnx.batch_norm_stats(x, None, None, None, 0.1, 1e-5)
    _close(emu.batch_norm_elemt(x, w, b, mean, invstd), torch.ops.bnx.batch_norm_elemt(x, w, b, mean, invstd),
           torch.float32, "elemt")
    sum_dy, sum_dy_xmu = torch.ops.bnx.batch_norm_backward_reduce(dy, x, mean, invstd)
    args = (dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, x.numel())
    _close(emu.batch_norm_backward_elemt(*args), torch.ops.bnx.batch_norm_backward_elemt(*args), torch.float32,
           "backward_elemt")


def test_emulated_training_forward_backward_against_float64(emu, monkeypatch):
    """Independent of the CPU ops: the emulated plane-groups forward and backward of a bf16 (8,16,7,7)
    batch against torch's float64 batch norm and its autograd gradients."""
    monkeypatch.setenv("BNX_CUDA_PLANE_GROUPS", "1")
    x, dy, w, b, rm, rv, _ = _inputs((8, 16, 7, 7), torch.bfloat16, "nchw")
    assert tuple(emu.plan(x, "sums")[:2]) == (KGROUPS, 8)
    rm_e, rv_e = rm.clone(), rv.clone()
    y, mean, invstd = emu.batch_norm_train_forward(x, w, b, rm_e, rv_e, None, 0.1, 1e-5)
    dx, dw, db = emu.batch_norm_backward(dy, x, mean, invstd, w, "batch", [True, True, True])
    xd = x.double().requires_grad_()
    wd, bd = w.double().requires_grad_(), b.double().requires_grad_()
    rm_d, rv_d = rm.double(), rv.double()
    yd = torch.nn.functional.batch_norm(xd, rm_d, rv_d, wd, bd, True, 0.1, 1e-5)
    yd.backward(dy.double())
    for got, want, name in [(y, yd, "y"), (dx, xd.grad, "dx"), (dw, wd.grad, "dw"), (db, bd.grad, "db"),
                            (rm_e, rm_d, "running_mean"), (rv_e, rv_d, "running_var")]:
        scale = want.detach().abs().max().clamp_min(1)
        tol = 2e-2 if got.dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(got.double() / scale, want.detach() / scale, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_emulated_variance_with_an_outlier_at_the_first_element(emu, monkeypatch, layout):
    """float32 N(0,1) channels with 1000 at each channel's first element: the emulated statistics'
    variance within 2e-6 relative of the float64 reference (their shift is the median of five samples, not
    that element, which left errors of about 1e-4 here)."""
    monkeypatch.setenv("BNX_EMULATED_SMS", "4")
    x = _tensor((256, 2, 16, 16), torch.float32, "nchw", seed=9)
    x[0, :, 0, 0] = 1000.0
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    assert_variance_exact(emu.batch_norm_stats, x, 2e-6)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_emulated_bf16_maps_exact_on_every_value(emu, layout):
    """bf16 elements are read from and written to 32-bit words in pairs (to_acc, from_acc): identity maps give
    every finite bfloat16 value back in its place."""
    assert_bf16_maps_exact(emu, layout, "cpu")


@pytest.mark.parametrize("config", ["default", "l2_groups", "on_chip"], indirect=True)
@pytest.mark.parametrize("count", [0, -2])
def test_emulated_num_batches_tracked_below_one_makes_running_statistics_nan(emu, config, count):
    """A count below 1 has no cumulative-average factor (1/0; a negative one extrapolates). The CPU op refuses
    it; a CUDA check would wait for the device, so the kernels that finish each channel (in every launch
    form) write NaN running statistics instead of numbers that pass for right. The batch statistics and the
    output do not depend on the count and stay exact; a count of 1 still takes the batch's statistics."""
    x, _, w, b, rm, rv, _ = _inputs((6, 5, 4, 4), torch.float32, "nchw")
    rm1, rv1 = rm.clone(), rv.clone()
    want = emu.batch_norm_train_forward(x, w, b, rm1, rv1, torch.tensor(1), 0.1, 1e-5)
    torch.testing.assert_close(rm1, want[1])  # factor 1: the batch mean
    for op in ("batch_norm_train_forward", "batch_norm_stats"):
        rm2, rv2 = rm.clone(), rv.clone()
        args = (x, w, b) if op == "batch_norm_train_forward" else (x,)
        got = getattr(emu, op)(*args, rm2, rv2, torch.tensor(count), 0.1, 1e-5)
        assert rm2.isnan().all() and rv2.isnan().all(), op
        for g, wnt in zip(got, want[-len(got):]):
            assert torch.equal(g, wnt), op
        with pytest.raises(RuntimeError, match="num_batches_tracked .* must be at least 1"):
            getattr(torch.ops.bnx, op)(*args, rm.clone(), rv.clone(), torch.tensor(count), 0.1, 1e-5)


# --- random cases -----------------------------------------------------------------------------------------

def _strided(t, dtype):
    """t in dtype, every other element of a buffer twice its size (the gaps NaN, so a read of one shows)."""
    buf = torch.full((2 * t.numel(),), float("nan"), dtype=dtype)
    buf[::2] = t.to(dtype)
    return buf[::2]


def _reformed(t, form):
    """t's values in another memory form: an inner transpose, a slice of a wider tensor, or an element offset
    (so no 16-byte vector is aligned)."""
    if form == "transposed" and t.dim() >= 4:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if form == "sliced":
        return torch.cat([t, t], dim=-1)[..., :t.shape[-1]]
    if form == "offset":
        return torch.cat([t.new_zeros(3), t.contiguous().flatten()])[3:].view(t.shape)
    return t


def _random_case(seed):
    """A seeded random case: shape (2-5 dimensions, sizes from 1 up, at most 30000 elements, more than one
    value per channel), dtype, layout, memory forms of x and dy, parameter and running-statistics dtypes and
    strides, missing weight or bias, num_batches_tracked, and the launch switches and emulated machine."""
    r = random.Random(seed)
    rank = r.choice([2, 3, 4, 4, 5])
    size = lambda most: round(most ** r.random())  # log-uniform in [1, most]: small sizes as often as large
    while True:
        shape = (size(300), size(70), *[size(300 if rank == 3 else 24 if rank == 4 else 8) for _ in range(rank - 2)])
        per_channel = shape[0] * (torch.Size(shape[2:]).numel())
        if per_channel > 1 and per_channel * shape[1] <= 30000:
            break
    dtype = r.choice(DTYPES)
    pdt = torch.float64 if dtype == torch.float64 else r.choice([dtype, torch.float32])
    env = {"BNX_EMULATED_SMS": str(r.choice([1, 2, 3, 8, 33, 132, 1000])),
           "BNX_CUDA_PLANE_GROUPS": r.choice(["1", "1", "0"]),
           "BNX_CUDA_L2_GROUPS": r.choice(["0", "0", "1", "auto"]),
           "BNX_CUDA_L2_GROUPS_BARRIERS": r.choice(["", "0", "2"]),
           "BNX_CUDA_ON_CHIP": r.choice(["", "1"]),
           "BNX_EMULATED_SMEM_BYTES": str(r.choice([16 << 10, 64 << 10, 228 << 10, 4 << 20])),
           "BNX_EMULATED_L2_BYTES": str(r.choice([64 << 10, 1 << 20, 50 << 20])),
           "BNX_CUDA_ON_CHIP_SLOTS": r.choice(["", "", "", str(r.randint(1, 8))]),
           # CTAs per SM and vectors per thread at least: few vectors split small channels over many CTAs
           "BNX_CUDA_SUMS_PLAN": r.choice(["", f"{r.randint(1, 8)},{r.choice([1, 1, 2, 8])}"]),
           "BNX_CUDA_MAP_PLAN": r.choice(["", "", f"{r.randint(1, 8)},{r.choice([1, 2, 8])}"])}
    if env["BNX_CUDA_L2_GROUPS"] != "0" or env["BNX_CUDA_ON_CHIP"]:
        # a cooperative grid is resident at once; the emulation runs at most 256 of its blocks
        env["BNX_EMULATED_SMS"] = str(min(int(env["BNX_EMULATED_SMS"]), 8))
    return dict(
        shape=shape, dtype=dtype, layout=r.choice(["nchw", "cl"]) if rank >= 4 else "nchw",
        x_form=r.choice(["plain", "plain", "transposed", "sliced", "offset"]),
        dy_form=r.choice(["plain", "plain", "transposed", "sliced", "offset"]),
        param_dtype=pdt, params_strided=r.random() < 0.5, weight=r.random() < 0.8, bias=r.random() < 0.8,
        stat_dtype=torch.float64 if dtype == torch.float64 else r.choice([pdt, torch.float32]),
        stats_strided=r.random() < 0.5, nbt=r.choice([None, 1, 5]), env=env)


@pytest.mark.parametrize("seed", range(32))
def test_emulated_ops_on_random_cases(emu, monkeypatch, seed):
    """Every op, emulated, against bnx's CPU ops on a seeded random case (_random_case): shapes and launch
    configurations no hand-picked case has, with strided, sliced or misaligned inputs, parameters and running
    statistics of other dtypes and strides (updated in place through their strides), and missing weight or
    bias."""
    case = _random_case(seed)
    for name, value in case["env"].items():
        monkeypatch.setenv(name, value)
    shape, dtype, layout = case["shape"], case["dtype"], case["layout"]
    x, dy, w, b, rm, rv, _ = _inputs(shape, dtype, layout)
    x, dy = _reformed(x, case["x_form"]), _reformed(dy, case["dy_form"])
    pdt, sdt = case["param_dtype"], case["stat_dtype"]
    w, b = (_strided(t, pdt) if case["params_strided"] else t.to(pdt) for t in (w, b))
    fresh = (lambda t: _strided(t, sdt)) if case["stats_strided"] else (lambda t: t.to(sdt).clone())
    args = (x, dy, w if case["weight"] else None, b if case["bias"] else None, fresh(rm), fresh(rv),
            None if case["nbt"] is None else torch.tensor(case["nbt"]))
    _assert_matches_cpu_ops(emu, args, dtype, f"{case} ", fresh=fresh)


# --- argument checks ----------------------------------------------------------------------------------------

def _bad_argument_calls():
    """(op, argument, variant, args): each op's good arguments with one of them made bad."""
    x, dy, w, b, rm, rv, nbt = _inputs((4, 3, 5, 5), torch.float32, "nchw")
    mean, invstd = torch.ops.bnx.batch_norm_stats(x, None, None, None, 0.1, 1e-5)
    sum_dy, sum_dy_xmu = torch.ops.bnx.batch_norm_backward_reduce(dy, x, mean, invstd)
    good = dict(input=x, grad_out=dy, weight=w, bias=b, running_mean=rm, running_var=rv, num_batches_tracked=nbt,
                momentum=0.1, eps=1e-5, mean=mean, invstd=invstd, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu, count=100,
                formula="batch", output_mask=[True, True, True])
    signatures = {
        "batch_norm_stats": ["input", "running_mean", "running_var", "num_batches_tracked", "momentum", "eps"],
        "batch_norm_train_forward": ["input", "weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                                     "momentum", "eps"],
        "batch_norm_elemt": ["input", "weight", "bias", "mean", "invstd"],
        "batch_norm_inference": ["input", "weight", "bias", "running_mean", "running_var", "eps"],
        "batch_norm_backward_reduce": ["grad_out", "input", "mean", "invstd"],
        "batch_norm_backward_elemt": ["grad_out", "input", "mean", "invstd", "weight", "sum_dy", "sum_dy_xmu", "count"],
        "batch_norm_backward": ["grad_out", "input", "mean", "invstd", "weight", "formula", "output_mask"],
    }
    scalars = {"eps": [0.0, -1.0], "count": [0, -3], "formula": ["Batch", "eval"], "momentum": [], "output_mask": []}
    calls = []
    for op, names in signatures.items():
        for name in names:
            t = good[name]
            if name in scalars:
                variants = {repr(v): v for v in scalars[name]}
            elif t.dim() == 0:  # num_batches_tracked
                variants = {"two elements": t.expand(2), "float32": t.float(), "bool": t.bool(),
                            "complex": t.to(torch.complex64)}
            elif t.dim() == 1:
                variants = {"1 too few": t[:-1], "2-D": t.unsqueeze(0), "int64": t.long(), "complex": t.to(torch.complex64),
                            "empty": t[:0]}
            else:
                variants = {"1-D": t.flatten()[:4], "6-D": t.view(1, 4, 3, 5, 5, 1), "one channel more": torch.cat([t, t[:, :1]], 1),
                            "int64": t.long(), "complex": t.to(torch.complex64), "one entry fewer": t[1:]}
            for variant, value in variants.items():
                calls.append((op, name, variant, [value if n == name else good[n] for n in names]))
    return calls


def test_emulated_ops_refuse_bad_arguments_as_the_cpu_ops_do(emu):
    """Each op, with one argument made bad in turn (rank, channel count, dtype, size, empty, scalar values): the
    emulated CUDA op refuses it with the CPU op's message, or both accept it with the same results (a
    mismatch in the number of entries between grad_out and input, say, is an error in both). Found so: the
    CUDA training forward read the input's channels before checking its rank ("Dimension out of range"), and
    the CUDA ops took a float num_batches_tracked as int64 (2.5 as 2) where the CPU ops took it as 2.5."""
    refused = 0
    for op, name, variant, args in _bad_argument_calls():
        results = []
        for ops in (emu, torch.ops.bnx):
            try:
                results.append(getattr(ops, op)(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args]))
            except RuntimeError as e:
                results.append(str(e).splitlines()[0])
        what = f"{op} with {name} {variant}"
        assert type(results[0]) is type(results[1]), f"{what}: {results[0]!r} vs {results[1]!r}"
        if isinstance(results[1], str):
            refused += 1
            assert results[0] == results[1] and results[1].startswith(("bnx: ", "Expected more than 1")), what
        else:
            for got, want in zip(*(r if isinstance(r, tuple) else (r,) for r in results)):
                _close(got, want, torch.float32, what)
    assert refused > 100
