// Shared helpers for the cepo CUDA kernels: 16-byte vector loads, an online log-sum-exp (and
// entropy) state with its block reduction, and run-time dtype loads. No torch headers here:
// everything works on raw pointers, so this file also compiles into small standalone test units.
//
// Units: the kernels work in base 2. A logit x becomes z2 = x * log2(e) / T, so
// exp(z - m) == exp2(z2 - m2); results are converted back to natural units (times ln 2) at the end.
//
// Offsets: a row's start is `row * stride_row` computed in int64 (N * V exceeds 2^31 at real
// sizes, e.g. 8192 x 151936); offsets inside one row are int (the launchers check V < 2^31).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace cepo {

constexpr float kLog2e = 1.4426950408889634f;  // log2(e)
constexpr float kLn2 = 0.6931471805599453f;    // ln(2)
constexpr int kMaxThreads = 512;               // threads per block of the row kernels
constexpr int kUnroll = 2;                     // 16-byte loads in flight per thread per step

// ---------------------------------------------------------------------------------------------
// dtypes
// ---------------------------------------------------------------------------------------------

// Float dtype of a stream chosen at run time (the contrastive kernels take three logits tensors
// that may differ in dtype; the launcher maps the torch dtype to this code).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

__host__ __device__ __forceinline__ float to_float(float x) { return x; }
__host__ __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// One element of a run-time-typed array, as fp32.
__device__ __forceinline__ float load_as_float(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16:
      return to_float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16:
      return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// ---------------------------------------------------------------------------------------------
// 16-byte vectors
// ---------------------------------------------------------------------------------------------

// kSize elements of T in 16 bytes: 8 fp16/bf16 or 4 fp32.
template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);

  // Streaming (evict-first) 16-byte load; `p` must be 16-byte aligned.
  __device__ __forceinline__ static uint4 load(const T* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }

  // The kSize elements of `raw`, converted to fp32.
  __device__ __forceinline__ static void unpack(const uint4& raw, float* out) {
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < kSize; ++k) out[k] = to_float(e[k]);
  }

  // Streaming 16-byte store of kSize fp32 values rounded to T; `p` must be 16-byte aligned.
  __device__ __forceinline__ static void store(T* p, const float* in) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int k = 0; k < kSize; ++k) e[k] = from_float<T>(in[k]);
    __stcs(reinterpret_cast<uint4*>(p), raw);
  }
};

// Number of elements before the first 16-byte boundary at or after `p` (0 when `p` is
// aligned), at most `n`. `p` is aligned to sizeof(T), as every tensor element is.
template <typename T>
__device__ __forceinline__ int head_elements(const T* p, int n) {
  const unsigned mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) & 15u);
  const int head = mis == 0 ? 0 : static_cast<int>((16u - mis) / sizeof(T));
  return head < n ? head : n;
}

// ---------------------------------------------------------------------------------------------
// online log-sum-exp (and entropy), base 2, fp32
// ---------------------------------------------------------------------------------------------

// State over the values z2 seen so far:
//   m = max z2 (-inf while nothing finite was seen), s = sum 2^(z2 - m), a = sum 2^(z2 - m) (z2 - m).
// s > 0 exactly when m is finite (the maximum contributes 2^0 = 1). An empty state is (-inf, 0, 0).
struct LseState {
  float m;
  float s;
  float a;
};

__host__ __device__ __forceinline__ LseState lse_empty() { return LseState{-INFINITY, 0.f, 0.f}; }

// Fold K values z2 (-inf allowed, +inf and NaN are not) into `st`. The running sums are
// re-centred only when the maximum grows, so a block of K values costs K exp2 (+1 on growth).
template <bool kEntropy, int K>
__host__ __device__ __forceinline__ void lse_fold(LseState& st, const float* z) {
  float mx = z[0];
#pragma unroll
  for (int k = 1; k < K; ++k) mx = fmaxf(mx, z[k]);
  if (mx > st.m) {  // the max grows (so mx is finite)
    if (st.s > 0.f) {
      const float scale = exp2f(st.m - mx);
      // (z2 - mx) = (z2 - m) + (m - mx): re-centre the entropy sum on the new max
      if (kEntropy) st.a = scale * (st.a + st.s * (st.m - mx));
      st.s *= scale;
    }
    st.m = mx;
  }
  if (st.m == -INFINITY) return;  // everything so far is -inf: nothing to add
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float d = z[k] - st.m;
    const float e = exp2f(d);  // 0 for z = -inf
    st.s += e;
    if (kEntropy) st.a += e > 0.f ? e * d : 0.f;  // -inf entries (e == 0) add nothing, never NaN
  }
}

// Merge two states. Symmetric: merge(x, y) and merge(y, x) give the same bits.
template <bool kEntropy>
__host__ __device__ __forceinline__ LseState lse_merge(const LseState& x, const LseState& y) {
  const float m = fmaxf(x.m, y.m);
  if (m == -INFINITY) return lse_empty();
  float sx = 0.f, sy = 0.f, ax = 0.f, ay = 0.f;
  if (x.s > 0.f) {
    const float c = exp2f(x.m - m);
    sx = x.s * c;
    if (kEntropy) ax = c * (x.a + x.s * (x.m - m));
  }
  if (y.s > 0.f) {
    const float c = exp2f(y.m - m);
    sy = y.s * c;
    if (kEntropy) ay = c * (y.a + y.s * (y.m - m));
  }
  return LseState{m, sx + sy, ax + ay};
}

// log2-sum-exp2 of the values: m + log2(s); -inf when nothing finite was seen.
__host__ __device__ __forceinline__ float lse2_finish(const LseState& st) {
  return st.s > 0.f ? st.m + log2f(st.s) : -INFINITY;
}

// Entropy in nats, H = ln2 * (log2(s) - a / s); 0 when nothing finite was seen.
__host__ __device__ __forceinline__ float entropy_finish(const LseState& st) {
  return st.s > 0.f ? kLn2 * (log2f(st.s) - st.a / st.s) : 0.f;
}

template <bool kEntropy>
__device__ __forceinline__ LseState warp_reduce(LseState st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    LseState other;
    other.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    other.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    other.a = kEntropy ? __shfl_xor_sync(0xffffffffu, st.a, offset) : 0.f;
    st = lse_merge<kEntropy>(st, other);
  }
  return st;
}

// Merge every thread's state; all threads of the block get the result. blockDim.x must be a
// multiple of 32 (at most 1024). Ends with a barrier, so it may be called again right away.
template <bool kEntropy>
__device__ __forceinline__ LseState block_reduce(LseState st) {
  __shared__ LseState partial[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  st = warp_reduce<kEntropy>(st);
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  st = lane < n_warps ? partial[lane] : lse_empty();
  st = warp_reduce<kEntropy>(st);
  __syncthreads();
  return st;
}

// The state of a whole row of V logits x (fp32 accumulation, one pass, z2 = x * scale2): a
// scalar head up to the first 16-byte boundary, 16-byte vectors (kUnroll in flight per thread),
// a scalar tail. Every thread of the block returns the state of the whole row.
template <typename T, bool kEntropy>
__device__ __forceinline__ LseState row_state(const T* __restrict__ x, int V, float scale2) {
  using V16 = Vec<T>;
  constexpr int kVec = V16::kSize;
  const int tid = threadIdx.x;
  const int n_threads = blockDim.x;
  LseState st = lse_empty();

  const int head = head_elements(x, V);
  if (tid < head) {
    const float z = to_float(x[tid]) * scale2;
    lse_fold<kEntropy, 1>(st, &z);
  }
  const T* body = x + head;
  const int n_vec = (V - head) / kVec;
  int i = tid;
  for (; i + (kUnroll - 1) * n_threads < n_vec; i += kUnroll * n_threads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = V16::load(body + (i + u * n_threads) * kVec);
    float z[kUnroll * kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) V16::unpack(raw[u], z + u * kVec);
#pragma unroll
    for (int k = 0; k < kUnroll * kVec; ++k) z[k] *= scale2;
    lse_fold<kEntropy, kUnroll * kVec>(st, z);
  }
  for (; i < n_vec; i += n_threads) {
    float z[kVec];
    V16::unpack(V16::load(body + i * kVec), z);
#pragma unroll
    for (int k = 0; k < kVec; ++k) z[k] *= scale2;
    lse_fold<kEntropy, kVec>(st, z);
  }
  for (int j = head + n_vec * kVec + tid; j < V; j += n_threads) {  // fewer than kVec elements
    const float z = to_float(x[j]) * scale2;
    lse_fold<kEntropy, 1>(st, &z);
  }
  return block_reduce<kEntropy>(st);
}

// Threads per block for a row of V elements of `elem_size` bytes: the smallest power of two
// (32 to kMaxThreads) that covers the row's 16-byte vectors in kUnroll steps.
inline int threads_for_row(int64_t V, int64_t elem_size) {
  const int64_t n_vec = (V * elem_size + 15) / 16;
  int threads = 32;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * kUnroll < n_vec) threads *= 2;
  return threads;
}

// ---------------------------------------------------------------------------------------------
// CEPO weighting of one token
// ---------------------------------------------------------------------------------------------

// From fp32 log-probs under r+ and r-, the token's advantage A and its sequence's sign s:
//   c = clip(exp(s * (pos - neg)), lo, hi)   (exp(0) = 1 where pos - neg is NaN or s == 0)
//   A_t = A * (1 + lam * (c - 1));   c = 1 and A_t = 0 where the token is not kept.
// lo = 1 - eps_w and hi = 1 + eps_w are rounded to fp32 once, on the host.
__host__ __device__ __forceinline__ void contrastive_weight(float pos, float neg, float adv, float sign, bool keep,
                                                            float lam, float lo, float hi, float* weight,
                                                            float* advantage) {
  const float delta = pos - neg;
  const bool undefined = delta != delta || sign == 0.f;  // NaN: -inf - -inf or inf - inf
  const float w = expf(undefined ? 0.f : sign * delta);
  const float c = fminf(fmaxf(w, lo), hi);
  *weight = keep ? c : 1.f;
  *advantage = keep ? adv * (1.f + lam * (c - 1.f)) : 0.f;
}

}  // namespace cepo
