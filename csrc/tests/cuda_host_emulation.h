// A minimal host emulation of the CUDA built-ins the cepo kernels use, so that the kernel
// headers compile with a host C++ compiler and run on the CPU in tests (no GPU needed):
// one std::thread per CUDA thread, a std::barrier for __syncthreads and for warp shuffles,
// `__shared__` as function-static storage (blocks run one at a time). It emulates semantics,
// not performance; every warp shuffle synchronises the whole block, which is valid only for
// code where all threads of the block reach each shuffle (as the cepo reductions do).
//
// Include this before any kernel header; compile with -std=c++20 -pthread and the CUDA include
// directory (for cuda_fp16.h / cuda_bf16.h, which have host implementations).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

namespace cepo_emu {

inline thread_local uint3 thread_idx;
inline thread_local uint3 block_idx;
inline uint3 block_dim;
inline uint3 grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline float shuffle_buffer[1024];

inline void sync_block() { block_barrier->arrive_and_wait(); }

inline float shfl_xor(float v, int offset) {
  const unsigned tid = thread_idx.x;
  sync_block();  // earlier readers of the buffer are done
  shuffle_buffer[tid] = v;
  sync_block();
  return shuffle_buffer[tid ^ static_cast<unsigned>(offset)];
}

// Runs `body` as a kernel over `grid` blocks of `block` threads (blocks one after another).
inline void launch(unsigned grid, unsigned block, const std::function<void()>& body) {
  grid_dim = {grid, 1, 1};
  block_dim = {block, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> barrier(static_cast<std::ptrdiff_t>(block));
    block_barrier = &barrier;
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, b, t] {
        thread_idx = {t, 0, 0};
        block_idx = {b, 0, 0};
        body();
        block_barrier->arrive_and_drop();  // threads that returned early no longer hold others up
      });
    }
    for (auto& th : threads) th.join();
    block_barrier = nullptr;
  }
}

}  // namespace cepo_emu

#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#define threadIdx (::cepo_emu::thread_idx)
#define blockIdx (::cepo_emu::block_idx)
#define blockDim (::cepo_emu::block_dim)
#define gridDim (::cepo_emu::grid_dim)
#define __syncthreads() ::cepo_emu::sync_block()
#define __shfl_xor_sync(mask, value, offset) ::cepo_emu::shfl_xor((value), (offset))

namespace cepo_emu {
// A GPU faults on a vector access that is not aligned to its size; so does the emulation.
inline void check_aligned(const void* p, size_t size, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % size != 0) {
    std::fprintf(stderr, "FAIL misaligned %zu-byte %s at %p\n", size, what, p);
    std::abort();
  }
}
}  // namespace cepo_emu

template <typename T>
inline T __ldcs(const T* p) {
  cepo_emu::check_aligned(p, sizeof(T), "load");
  return *p;
}
template <typename T>
inline void __stcs(T* p, T v) {
  cepo_emu::check_aligned(p, sizeof(T), "store");
  *p = v;
}
