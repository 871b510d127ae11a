// Test-only ops of the CUDA emulation module (tests/test_cuda_emulation.py): the launch plan the CUDA ops
// would use for an input, and self-checks of the emulated barriers and shuffles.
#include <torch/library.h>

#include "cuda/common.cuh"

namespace bnx {
namespace cuda {
namespace {

// [walk, V, grid_x, splits, tx, ty, rows_per_split] of the sums ("sums") or map ("map") plan that the ops
// use for `input` (pointers: input alone); "sums_segments" and "map_segments" append [segs, seg_vecs] (NCHW
// planes cut into segments); "grouped" (the L2-grouped launch of a training forward: x alone)
// and "grouped_backward" (of a batch backward: x and dy) append [tiles_per_group, groups, ctas, reuses_l2]
// (reuses_l2: whether BNX_CUDA_L2_GROUPS=auto takes the grouped launch); "on_chip" (the on-chip launch of a
// training forward) and "on_chip_backward" (of a batch backward) give its plan and append [fits, slots,
// smem_bytes, cached_all].
std::vector<int64_t> plan_of(const at::Tensor& input, c10::string_view kind) {
  const Layout L = layout_of(input);
  const Access a = choose_access(L, input.element_size(), {input.const_data_ptr()});
  const bool grouped = kind == "grouped" || kind == "grouped_backward";
  const bool segments = kind == "sums_segments" || kind == "map_segments";
  const bool on_chip = kind == "on_chip" || kind == "on_chip_backward";
  TORCH_CHECK(kind == "sums" || kind == "map" || grouped || segments || on_chip,
              "plan: kind must be 'sums', 'map', 'sums_segments', 'map_segments', 'grouped', 'grouped_backward', "
              "'on_chip' or 'on_chip_backward', got '", kind, "'");
  Plan p = kind == "map" || kind == "map_segments" ? map_plan(L, a) : sums_plan(L, a);
  if (on_chip) {
    const int64_t inputs = kind == "on_chip" ? 1 : 2;
    const OnChipPlan o = choose_on_chip_plan(p, inputs * p.V * input.element_size(), 0,
                                             [](const OnChipPlan&) { return emulation::blocks_per_sm(); });
    const Plan& q = o.fits ? o.p : p;
    return {q.walk, q.V, q.grid_x, q.splits, q.tx, q.ty, q.rows_per_split, o.fits ? 1 : 0, o.slots, o.smem_bytes,
            o.cached_all ? 1 : 0};
  }
  Groups groups;
  int64_t ctas = 0;
  const int64_t inputs = kind == "grouped" ? 1 : 2;
  if (grouped)
    p = grouped_plan(p, L, input.element_size(), inputs, static_cast<int64_t>(emulation::blocks_per_sm()) * num_sms(),
                     groups, ctas);
  std::vector<int64_t> out{p.walk, p.V, p.grid_x, p.splits, p.tx, p.ty, p.rows_per_split};
  if (segments) out.insert(out.end(), {p.segs, p.seg_vecs});
  if (grouped)
    out.insert(out.end(), {groups.tiles_per_group, groups.count, ctas,
                           grouped_reuses_l2(p, L, input.element_size() * inputs) ? 1 : 0});
  return out;
}

template <typename T>
__global__ void block_sum_kernel(T* out, int n_values) {
  // Each thread adds its ids' values; warps reduce by shuffles, warp leaders meet in shared memory.
  __shared__ T partial[32];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int threads = blockDim.x * blockDim.y;
  T v = 0;
  for (int i = tid; i < n_values; i += threads) v += static_cast<T>(i + 1);
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (tid % 32 == 0) partial[tid / 32] = v;
  __syncthreads();
  if (tid == 0) {
    T total = 0;
    for (int w = 0; w < threads / 32; ++w) total += partial[w];
    out[blockIdx.x] = total;
  }
}

// Runs block_sum_kernel over `blocks` blocks of `threads` threads: every entry of the result should be
// n_values * (n_values + 1) / 2. A block that is not a whole number of warps shuffles in a partial warp,
// which the emulation refuses.
at::Tensor emulated_block_sums(int64_t blocks, int64_t threads, int64_t n_values) {
  at::Tensor out = at::full({blocks}, -1, at::kLong);
  launch_kernel(&block_sum_kernel<int64_t>, dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads)),
                out.mutable_data_ptr<int64_t>(), static_cast<int>(n_values));
  return out;
}

__global__ void vector_copy_kernel(const float* in, float* out, int64_t offset) {
  store_vec<4>(out, 4 * threadIdx.x, load_vec<4>(in, offset + 4 * threadIdx.x));
}

// Copies 4 * threads floats with 16-byte vectors, reading from `offset` elements into `input`: an offset
// that is not a multiple of 4 is a misaligned vector access, which the emulation refuses.
at::Tensor emulated_vector_copy(const at::Tensor& input, int64_t offset, int64_t threads) {
  TORCH_CHECK(input.dtype() == at::kFloat && input.is_contiguous() && input.numel() >= offset + 4 * threads,
              "emulated_vector_copy: input must be contiguous float32 with offset + 4 * threads elements");
  at::Tensor out = at::empty({4 * threads}, input.options());
  launch_kernel(&vector_copy_kernel, dim3(1), dim3(static_cast<unsigned>(threads)), input.const_data_ptr<float>(),
                out.mutable_data_ptr<float>(), offset);
  return out;
}

// The number of cooperative (grouped) launches the emulated ops have made so far.
int64_t emulated_cooperative_launches() { return emulation::cooperative_launches().load(); }

}  // namespace
}  // namespace cuda
}  // namespace bnx

TORCH_LIBRARY_FRAGMENT(bnx_cuda_emulation, m) {
  m.def("plan(Tensor input, str kind) -> int[]");
  m.def("emulated_block_sums(int blocks, int threads, int n_values) -> Tensor");
  m.def("emulated_vector_copy(Tensor input, int offset, int threads) -> Tensor");
  m.def("emulated_cooperative_launches() -> int");
}

TORCH_LIBRARY_IMPL(bnx_cuda_emulation, CPU, m) {
  m.impl("plan", &bnx::cuda::plan_of);
  m.impl("emulated_vector_copy", &bnx::cuda::emulated_vector_copy);
}

TORCH_LIBRARY_IMPL(bnx_cuda_emulation, CompositeExplicitAutograd, m) {
  m.impl("emulated_block_sums", &bnx::cuda::emulated_block_sums);
  m.impl("emulated_cooperative_launches", &bnx::cuda::emulated_cooperative_launches);
}
