// A CPU stand-in for the part of the CUDA execution model the bnx kernels use, so that the CUDA ops
// (csrc/cuda/*.cu compiled as C++ with BNX_CUDA_EMULATION) run on CPU tensors in tests on machines
// without a GPU (tests/test_cuda_emulation.py). Not part of the bnx build.
//
// Every thread of a block is a fiber (ucontext) on one OS thread; __syncthreads and the warp shuffles switch
// fibers until every live thread of the block (or warp) has arrived. Blocks of a plain launch run one after
// another on the calling thread; those of a cooperative launch each get an OS thread, all at once, and
// grid_sync() waits for every block. `__shared__` becomes `static thread_local`: one copy per OS thread,
// that is per running block.
// What it checks beyond the results: barriers that leave threads waiting forever (deadlock), shuffles whose
// mask is not the full warp or whose warp has fewer than 32 live threads, and vector loads and stores not
// aligned to their size (common.cuh's load_vec / store_vec) raise instead of hanging, reading garbage or
// passing on x86 what would fault on a GPU. Built with -fsanitize=address (`scripts/sanitize.sh emulation`),
// every global load and store outside a tensor is caught too (fiber switches are announced to ASan).
// What it cannot check: timing, memory coalescing, races
// between the threads of a block that do not synchronize (fibers switch only at barriers, so such a race
// reads one fixed order); races between the blocks of a cooperative launch are real but not reproducible.
#pragma once

#include <ucontext.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#if defined(__SANITIZE_ADDRESS__)  // scripts/sanitize.sh emulation builds it with -fsanitize=address
#include <sanitizer/common_interface_defs.h>
#define BNX_EMULATION_ASAN 1
#endif

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
using std::sqrt;

namespace bnx {
namespace cuda {
namespace emulation {

// The SM count the launch plans see: BNX_EMULATED_SMS, default 2 (small, so that small test tensors still
// get channels split across several CTAs).
inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  const int n = v != nullptr ? std::atoi(v) : fallback;
  return n > 0 ? n : fallback;
}
inline int num_sms() { return env_int("BNX_EMULATED_SMS", 2); }
// Co-resident blocks per SM a cooperative launch may use (BNX_EMULATED_BLOCKS_PER_SM, default 2).
inline int blocks_per_sm() { return env_int("BNX_EMULATED_BLOCKS_PER_SM", 2); }
// The L2 size the plans see (BNX_EMULATED_L2_BYTES, default 64 KiB: test tensors span several groups).
inline int64_t l2_bytes() { return env_int("BNX_EMULATED_L2_BYTES", 64 * 1024); }

// Shared memory per SM that launch plans see (BNX_EMULATED_SMEM_BYTES, default 64 KiB); one block may take all
// of it.
inline int64_t smem_per_sm() { return env_int("BNX_EMULATED_SMEM_BYTES", 64 * 1024); }

// The running block's dynamic shared memory: the blocks of a cooperative launch each have an OS thread, so one
// buffer per thread. Filled with 0xff bytes at launch (NaN in every float type), so that a read of a slot that
// was never written shows in the results.
struct alignas(16) SmemChunk {
  unsigned char bytes[16];
};
inline std::vector<SmemChunk>& dynamic_smem_buffer() {
  static thread_local std::vector<SmemChunk> buffer;
  return buffer;
}
inline unsigned char* dynamic_smem() { return reinterpret_cast<unsigned char*>(dynamic_smem_buffer().data()); }

// The barrier of a cooperative launch, across OS threads; a block that returns stops counting.
class GridBarrier {
 public:
  explicit GridBarrier(int blocks) : live_(blocks) {}
  // False when the other blocks did not all arrive within two minutes.
  bool arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t g = generation_;
    if (++arrived_ == live_) {
      release();
      return true;
    }
    return cv_.wait_for(lock, std::chrono::seconds(120), [&] { return generation_ != g; });
  }
  void drop() {
    std::lock_guard<std::mutex> lock(mutex_);
    --live_;
    if (arrived_ > 0 && arrived_ == live_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  int live_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
};

class Block {
 public:
  static Block*& current() {
    static thread_local Block* block = nullptr;
    return block;
  }

  Block(dim3 block, std::function<void()> body, GridBarrier* grid = nullptr) : body_(std::move(body)), grid_(grid) {
    const int n = static_cast<int>(block.x * block.y * block.z);
    TORCH_CHECK(n > 0 && n <= 1024, "cuda emulation: block of ", n, " threads");
    fibers_.resize(n);
    warps_.resize((n + 31) / 32);
    for (int t = 0; t < n; ++t) {
      Fiber& f = fibers_[t];
      f.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      f.stack = stack_for(t);
      warps_[t / 32].live++;
    }
    live_ = n;
  }

  // Runs every thread of the block to completion.
  void run() {
    Block*& cur = current();
    cur = this;
    for (size_t t = 0; t < fibers_.size(); ++t) {
      Fiber& f = fibers_[t];
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack;
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &scheduler_;
      makecontext(&f.ctx, &Block::entry, 0);
    }
    std::string error;
    while (live_ > 0 && error.empty()) {
      progress_ = false;
      for (size_t t = 0; t < fibers_.size() && error.empty(); ++t) {
        Fiber& f = fibers_[t];
        if (f.done) continue;
        running_ = static_cast<int>(t);
        threadIdx = f.tid;
        void* fake_stack = nullptr;
        before_switch(&fake_stack, f.stack, kStack);
        swapcontext(&scheduler_, &f.ctx);
        after_switch(fake_stack, nullptr, nullptr);
        error = error_;
      }
      if (error.empty() && live_ > 0 && !progress_)
        error = "cuda emulation: deadlock: " + std::to_string(live_) + " threads wait at barriers that the others never reach";
    }
    cur = nullptr;
    TORCH_CHECK(error.empty(), error);
  }

  // __syncthreads: wait until every live thread of the block has arrived.
  void sync_block() { wait(block_barrier_, live_); }

  // Stops the launch with an error (raised by the launch, not from inside the fiber).
  [[noreturn]] void report(const std::string& message) { fail(message); }

  // Whether the block runs in a cooperative launch (all blocks at once, on their own OS threads).
  bool cooperative() const { return grid_ != nullptr; }

  // A grid-wide barrier (cooperative launches): the block's last thread to arrive waits for the other
  // blocks, then releases the block's threads.
  void sync_grid() {
    if (grid_ == nullptr) fail("cuda emulation: grid_sync outside a cooperative launch");
    progress_ = true;
    const uint64_t g = block_barrier_.generation;
    if (++block_barrier_.arrived == live_) {
      if (!grid_->arrive_and_wait()) fail("cuda emulation: grid_sync waited 120 s: a block never reached it");
      block_barrier_.arrived = 0;
      ++block_barrier_.generation;
      return;
    }
    grid_waiting_ = true;
    while (block_barrier_.generation == g) yield();
    grid_waiting_ = false;
  }

  template <typename T>
  T shfl_xor(unsigned mask, T v, int lane_mask, int width) {
    const int t = running_;
    Warp& w = warps_[t / 32];
    const int lane = t % 32;
    if (mask != 0xffffffffu || width != 32 || w.live != 32) {
      fail("cuda emulation: __shfl_xor_sync needs a whole, converged warp (mask " + std::to_string(mask) +
           ", " + std::to_string(w.live) + " live threads)");
    }
    static_assert(sizeof(T) <= 8, "cuda emulation: shuffle of a type wider than 8 bytes");
    std::memcpy(w.slots[lane], &v, sizeof(T));
    wait(w.barrier, w.live);
    T r;
    std::memcpy(&r, w.slots[lane ^ (lane_mask & 31)], sizeof(T));
    wait(w.barrier, w.live);
    return r;
  }

 private:
  static constexpr size_t kStack = 256 * 1024;
  struct Fiber {
    ucontext_t ctx;
    dim3 tid;
    bool done = false;
    char* stack = nullptr;
  };

  // Thread t's stack, kept for the next blocks (a block runs its threads to completion before the next starts).
  static char* stack_for(int t) {
    static thread_local std::vector<std::unique_ptr<char[]>> pool;
    while (static_cast<int>(pool.size()) <= t) pool.emplace_back(new char[kStack]);
    return pool[t].get();
  }
  struct Barrier {
    int arrived = 0;
    uint64_t generation = 0;
  };
  struct Warp {
    int live = 0;
    Barrier barrier;
    unsigned char slots[32][8];
  };

  // AddressSanitizer must be told of every switch between stacks (here the scheduler's, on the OS thread, and
  // the fibers'), or it takes a fiber's frames for a huge stack and may report false positives.
  static void before_switch(void** fake_stack, const void* bottom, size_t size) {
#ifdef BNX_EMULATION_ASAN
    __sanitizer_start_switch_fiber(fake_stack, bottom, size);
#endif
    (void)fake_stack, (void)bottom, (void)size;
  }
  static void after_switch(void* fake_stack, const void** bottom, size_t* size) {
#ifdef BNX_EMULATION_ASAN
    __sanitizer_finish_switch_fiber(fake_stack, bottom, size);
#endif
    (void)fake_stack, (void)bottom, (void)size;
  }

  static void entry() {
    Block* b = current();
    after_switch(nullptr, &b->scheduler_stack_, &b->scheduler_stack_size_);
    b->body_();
    b->finish();
    before_switch(nullptr, b->scheduler_stack_, b->scheduler_stack_size_);  // this fiber's stack is done
  }

  void yield() {
    void* fake_stack = nullptr;
    before_switch(&fake_stack, scheduler_stack_, scheduler_stack_size_);
    swapcontext(&fibers_[running_].ctx, &scheduler_);
    after_switch(fake_stack, nullptr, nullptr);
  }

  [[noreturn]] void fail(const std::string& message) {
    if (error_.empty()) error_ = message;
    while (true) yield();  // the scheduler stops at the error; this fiber is never resumed
  }

  void wait(Barrier& b, int live) {
    progress_ = true;
    const uint64_t g = b.generation;
    if (++b.arrived == live) {
      b.arrived = 0;
      ++b.generation;
      return;
    }
    while (b.generation == g) yield();
  }

  // A thread that returns no longer counts at barriers; if the others were all waiting for it, they go on.
  void finish() {
    const int t = running_;
    fibers_[t].done = true;
    progress_ = true;
    --live_;
    Warp& w = warps_[t / 32];
    --w.live;
    if (block_barrier_.arrived > 0 && block_barrier_.arrived == live_) {
      if (grid_waiting_ && !grid_->arrive_and_wait()) error_ = "cuda emulation: grid_sync timed out";
      block_barrier_.arrived = 0;
      ++block_barrier_.generation;
    }
    if (w.barrier.arrived > 0 && w.barrier.arrived == w.live) {
      w.barrier.arrived = 0;
      ++w.barrier.generation;
    }
    // uc_link returns to the scheduler.
  }

  std::function<void()> body_;
  GridBarrier* grid_ = nullptr;
  bool grid_waiting_ = false;
  std::vector<Fiber> fibers_;
  std::vector<Warp> warps_;
  ucontext_t scheduler_;
  const void* scheduler_stack_ = nullptr;  // the scheduler's stack, for AddressSanitizer
  size_t scheduler_stack_size_ = 0;
  Barrier block_barrier_;
  int live_ = 0;
  int running_ = 0;
  bool progress_ = false;
  std::string error_;
};

// Runs body as a kernel over grid x block, blocks in order (x fastest).
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  TORCH_CHECK(grid.y < 65536 && grid.z < 65536, "cuda emulation: grid.y / grid.z over 65535");
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        Block b(block, body);
        b.run();
      }
}

// A thread's spin-wait for other blocks (a count they raise with atomicAdd): only a cooperative launch
// runs the other blocks meanwhile; fails instead of hanging after 120 s.
template <typename P>
inline void wait_until(P&& pred) {
  Block* b = Block::current();
  if (!b->cooperative()) b->report("cuda emulation: a wait for other blocks outside a cooperative launch");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) b->report("cuda emulation: waited 120 s for other blocks");
    std::this_thread::yield();
  }
}

// A vector access must be aligned to its size, as on the GPU (x86 would not fault).
inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    Block::current()->report("cuda emulation: misaligned " + std::to_string(bytes) + "-byte vector access at " +
                             std::to_string(reinterpret_cast<uintptr_t>(p)));
  }
}

// How many cooperative launches ran (tests read it to see which launch an op took).
inline std::atomic<int64_t>& cooperative_launches() {
  static std::atomic<int64_t> count{0};
  return count;
}

// A cooperative launch: every block at once, each on its own OS thread, so that grid_sync() can wait for
// all of them; each block gets smem_bytes of dynamic shared memory.
inline void launch_cooperative(dim3 grid, dim3 block, const std::function<void()>& body, size_t smem_bytes = 0) {
  const unsigned blocks = grid.x * grid.y * grid.z;
  if (blocks == 0) return;
  ++cooperative_launches();
  TORCH_CHECK(blocks <= 256, "cuda emulation: cooperative launch of ", blocks, " blocks");
  GridBarrier barrier(static_cast<int>(blocks));
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(blocks);
  for (unsigned b = 0; b < blocks; ++b) {
    threads.emplace_back([&, b] {
      gridDim = grid;
      blockDim = block;
      blockIdx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y));
      SmemChunk unwritten;
      std::memset(unwritten.bytes, 0xff, sizeof(unwritten.bytes));
      dynamic_smem_buffer().assign((smem_bytes + sizeof(SmemChunk) - 1) / sizeof(SmemChunk), unwritten);
      try {
        Block blk(block, body, &barrier);
        blk.run();
      } catch (...) {
        errors[b] = std::current_exception();
      }
      barrier.drop();
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace emulation
}  // namespace cuda
}  // namespace bnx

inline void __syncthreads() { bnx::cuda::emulation::Block::current()->sync_block(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* address, unsigned value) { return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return bnx::cuda::emulation::Block::current()->shfl_xor(mask, v, lane_mask, width);
}

// cuda_bf16.h's pair of bfloat16 and its round-to-nearest-even conversion from two floats (.x, the low half,
// from a), so that from_acc's pairing runs here as on the GPU.
struct __nv_bfloat162 {
  c10::BFloat16 x, y;
};
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {c10::BFloat16(a), c10::BFloat16(b)}; }
