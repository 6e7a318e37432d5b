// CPU emulation of the CUDA execution model, just enough to run the kernels of csrc/*.cu on a machine without a
// GPU. tests/cuda_emu/build.py prepends this header to a copy of each .cu file whose `k<<<grid, block, smem,
// stream>>>(args)` launches it rewrote to `::lk_emu::launch(k, grid, block, smem, stream, args)`.
//
// Model: the blocks of a grid run one after another. The threads of a block are fibers (each with its own stack)
// scheduled cooperatively on the calling OS thread: a fiber runs until it reaches __syncthreads() or a warp
// shuffle, where it waits until every live thread of its block (or lane of its warp) has arrived. A kernel whose
// threads diverge around a barrier would hang or misbehave on the device; here the scheduler finds that no fiber
// can run, reports the barrier each thread is stuck at, and fails the launch. A shuffle that reads a lane that
// has exited fails the launch too. `__shared__` variables become function-level statics: one copy per kernel
// instantiation, shared by the threads of the running block. Device memory is host memory (CPU tensors).
// Float arithmetic is the host's IEEE arithmetic with the rounding of the device's _rn intrinsics; fmaf is a
// true fused multiply-add. Compile with -ffp-contract=off so that the host compiler fuses nothing the device
// code wrote unfused.
//
// What it cannot show: speed, coalescing, races between blocks that run concurrently on a GPU, the device
// compiler's own behaviour. What it does show: indexing, bounds, tails, vector-path selection, dropout masks,
// shuffle/scan logic and the host launchers, all executed for real.
//
// x86-64 only (the fiber switch is a few lines of assembly).
#pragma once

#if !defined(__x86_64__)
#error "the lora_kernels CUDA emulator needs x86-64"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#undef __shared__
#define __shared__ static
#undef __global__
#define __global__
#undef __launch_bounds__
#define __launch_bounds__(...)

// void lk_emu_switch(void** save_sp, void* load_sp): saves the callee-saved registers, MXCSR and the x87 control
// word on the current stack, stores its stack pointer in *save_sp, and resumes the context saved at load_sp.
asm(R"(
  .text
  .p2align 4
  .weak lk_emu_switch
  .hidden lk_emu_switch
  .type lk_emu_switch,@function
lk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lk_emu_switch,.-lk_emu_switch
)");
extern "C" void lk_emu_switch(void** save_sp, void* load_sp) __attribute__((visibility("hidden")));

namespace lk_emu {

enum class State { kRunnable, kAtSyncthreads, kAtShuffle, kDone };

struct Fiber {
  void* sp = nullptr;
  std::vector<unsigned char> stack;
  State state = State::kRunnable;
  uint3 tid{}, bid{};
  int linear = 0;
  const char* where = "";  // the barrier it waits at (for deadlock reports)
};

struct Warp {
  int live = 0, waiting = 0;
  uint64_t slots[32] = {};
  bool alive[32] = {};
};

struct Scheduler {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int live = 0, at_sync = 0;
  dim3 bdim, gdim;
  void* main_sp = nullptr;
  Fiber* cur = nullptr;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::string error;
  void fail(const std::string& what) {
    if (error.empty()) error = what;
  }
};

inline Scheduler& sched() {
  static Scheduler s;
  return s;
}

inline cudaError_t& last_error_ref() {
  static cudaError_t e = cudaSuccess;
  return e;
}

inline Fiber& me() { return *sched().cur; }

// Back to the scheduler; returns when this fiber is scheduled again.
inline void yield() {
  Scheduler& s = sched();
  lk_emu_switch(&s.cur->sp, s.main_sp);
}

inline void release_warp(Warp& w, int warp) {
  Scheduler& s = sched();
  const int first = warp * 32;
  for (int l = 0; l < 32 && first + l < static_cast<int>(s.fibers.size()); ++l)
    if (s.fibers[first + l].state == State::kAtShuffle) s.fibers[first + l].state = State::kRunnable;
  w.waiting = 0;
}

inline void release_block() {
  Scheduler& s = sched();
  for (Fiber& f : s.fibers)
    if (f.state == State::kAtSyncthreads) f.state = State::kRunnable;
  s.at_sync = 0;
}

inline void sync_threads() {
  Scheduler& s = sched();
  me().state = State::kAtSyncthreads;
  me().where = "__syncthreads";
  if (++s.at_sync == s.live) {
    release_block();
    return;
  }
  yield();
}

inline void warp_barrier(const char* what) {
  Scheduler& s = sched();
  Warp& w = s.warps[me().linear / 32];
  me().state = State::kAtShuffle;
  me().where = what;
  if (++w.waiting == w.live) {
    release_warp(w, me().linear / 32);
    return;
  }
  yield();
}

// One value per lane through the warp's slots; src(lane) is the lane to read, or -1 to keep the own value.
template <typename T, typename F>
inline T warp_exchange(unsigned mask, T v, F src, const char* what) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  Scheduler& s = sched();
  const int lane = me().linear % 32;
  Warp& w = s.warps[me().linear / 32];
  if (mask != 0xffffffffu) s.fail(std::string(what) + ": only full-warp masks are emulated");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slots[lane] = bits;
  warp_barrier(what);
  const int from = src(lane);
  T out = v;
  if (from >= 0) {
    if (from >= 32 || !w.alive[from]) {
      s.fail(std::string(what) + ": lane " + std::to_string(lane) + " reads lane " + std::to_string(from) +
             ", which has exited or does not exist");
    } else {
      const uint64_t sb = w.slots[from];
      std::memcpy(&out, &sb, sizeof(T));
    }
  }
  warp_barrier(what);  // nobody overwrites a slot before every lane has read
  return out;
}

[[noreturn]] inline void fiber_entry() {
  Scheduler& s = sched();
  s.body(s.body_arg);
  Fiber& f = me();
  f.state = State::kDone;
  Warp& w = s.warps[f.linear / 32];
  w.alive[f.linear % 32] = false;
  --w.live;
  --s.live;
  // An exiting thread no longer holds back the barriers the others wait at.
  if (w.live > 0 && w.waiting == w.live) release_warp(w, f.linear / 32);
  if (s.live > 0 && s.at_sync == s.live) release_block();
  yield();
  std::abort();  // a finished fiber is never resumed
}

constexpr size_t kStackBytes = 128 * 1024;

inline void reset_fiber(Fiber& f) {
  if (f.stack.empty()) f.stack.resize(kStackBytes);
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack.data() + f.stack.size()) & ~uintptr_t(15);
  // Frame popped by lk_emu_switch: [mxcsr | x87 cw] r15 r14 r13 r12 rbx rbp, then `ret` to fiber_entry with the
  // stack pointer at top - 8 (16-byte aligned + 8, as after a call).
  uint64_t* slot = reinterpret_cast<uint64_t*>(top - 16);
  slot[1] = 0;                                               // fake return address of fiber_entry (never used)
  slot[0] = reinterpret_cast<uint64_t>(&fiber_entry);        // `ret` target
  for (int i = 1; i <= 6; ++i) slot[-i] = 0;                 // rbp rbx r12 r13 r14 r15
  uint32_t* ctl = reinterpret_cast<uint32_t*>(slot - 7);
  ctl[0] = 0x1F80;                                           // MXCSR: round to nearest, exceptions masked
  ctl[1] = 0x037F;                                           // x87 control word: default
  f.sp = slot - 7;
  f.state = State::kRunnable;
  f.where = "";
}

// Runs one block of `body` to completion; returns false (with sched().error set) on a deadlock or a fault.
inline bool run_block(dim3 grid, dim3 block, uint3 bid, void (*body)(void*), void* arg) {
  Scheduler& s = sched();
  const int n = static_cast<int>(block.x * block.y * block.z);
  s.fibers.resize(n);
  s.warps.assign((n + 31) / 32, Warp{});
  for (int w = 0; w < static_cast<int>(s.warps.size()); ++w) {
    s.warps[w].live = std::min(32, n - 32 * w);
    for (int l = 0; l < s.warps[w].live; ++l) s.warps[w].alive[l] = true;
  }
  s.live = n;
  s.at_sync = 0;
  s.bdim = block;
  s.gdim = grid;
  s.body = body;
  s.body_arg = arg;
  for (int t = 0; t < n; ++t) {
    Fiber& f = s.fibers[t];
    reset_fiber(f);
    f.linear = t;
    f.tid = uint3{static_cast<unsigned>(t) % block.x, (static_cast<unsigned>(t) / block.x) % block.y,
                  static_cast<unsigned>(t) / (block.x * block.y)};
    f.bid = bid;
  }
  while (s.live > 0) {
    bool ran = false;
    for (Fiber& f : s.fibers) {
      if (f.state != State::kRunnable) continue;
      s.cur = &f;
      lk_emu_switch(&s.main_sp, f.sp);
      s.cur = nullptr;
      ran = true;
    }
    if (!ran) {
      std::string msg = "deadlock: no thread can run;";
      for (const Fiber& f : s.fibers)
        if (f.state != State::kDone) {
          msg += " thread " + std::to_string(f.linear) + " waits at " + f.where + ";";
          if (msg.size() > 400) break;
        }
      s.fail(msg + " (a barrier or shuffle that not every live thread reaches)");
      return false;
    }
  }
  return s.error.empty();
}

template <typename Kernel, typename ArgTuple>
struct Call {
  Kernel kernel;
  const ArgTuple* args;
  static void run(void* self) {
    auto* c = static_cast<Call*>(self);
    std::apply(c->kernel, *c->args);
  }
};

// Runs kernel(args...) over the grid, block after block.
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, const Args&... args) {
  const long long n = static_cast<long long>(block.x) * block.y * block.z;
  if (smem != 0 || n <= 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    last_error_ref() = cudaErrorInvalidConfiguration;
    return cudaErrorInvalidConfiguration;
  }
  const auto arg_tuple = std::tuple<Args...>(args...);
  Call<Kernel, std::tuple<Args...>> call{kernel, &arg_tuple};
  Scheduler& s = sched();
  s.error.clear();
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        if (!run_block(grid, block, uint3{bx, by, bz}, &Call<Kernel, std::tuple<Args...>>::run, &call)) {
          std::fprintf(stderr, "lk_emu: block (%u,%u,%u) of grid (%u,%u,%u) x (%u,%u,%u): %s\n", bx, by, bz, grid.x,
                       grid.y, grid.z, block.x, block.y, block.z, s.error.c_str());
          s.fibers.clear();  // abandoned fibers: fresh stacks next time
          last_error_ref() = cudaErrorLaunchFailure;
          return cudaErrorLaunchFailure;
        }
      }
  return cudaSuccess;
}

}  // namespace lk_emu

// ---- CUDA built-ins and intrinsics used by csrc/ --------------------------------------------------------------
#define threadIdx (::lk_emu::me().tid)
#define blockIdx (::lk_emu::me().bid)
#define blockDim (::lk_emu::sched().bdim)
#define gridDim (::lk_emu::sched().gdim)

inline void __syncthreads() { ::lk_emu::sync_threads(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  if (width != 32) ::lk_emu::sched().fail("__shfl_xor_sync: only width 32 is emulated");
  return ::lk_emu::warp_exchange(mask, v, [&](int lane) { return lane ^ lane_mask; }, "__shfl_xor_sync");
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (width != 32) ::lk_emu::sched().fail("__shfl_up_sync: only width 32 is emulated");
  return ::lk_emu::warp_exchange(
      mask, v, [&](int lane) { return lane >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : -1; },
      "__shfl_up_sync");
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (width != 32) ::lk_emu::sched().fail("__shfl_down_sync: only width 32 is emulated");
  return ::lk_emu::warp_exchange(
      mask, v, [&](int lane) { return lane + static_cast<int>(delta) < 32 ? lane + static_cast<int>(delta) : -1; },
      "__shfl_down_sync");
}

template <typename T>
inline T __ldg(const T* p) { return *p; }

template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;  // one OS thread runs every fiber: no concurrent access
  *p = old + v;
  return old;
}

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline unsigned __float_as_uint(float v) {
  unsigned u;
  std::memcpy(&u, &v, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

// cudaGetLastError of the launchers: the emulator's last launch error (then reset, like the runtime's).
inline cudaError_t lk_emu_get_last_error() {
  const cudaError_t e = ::lk_emu::last_error_ref();
  ::lk_emu::last_error_ref() = cudaSuccess;
  return e;
}
#define cudaGetLastError lk_emu_get_last_error
