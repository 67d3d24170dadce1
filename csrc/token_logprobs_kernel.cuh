// token_logprobs kernels: one block per row of logits. No torch headers.
//
// Forward, for a row x (length V), temperature T and target y, z = x / T:
//   lse = log sum_j exp(z_j),  logp = z_y - lse,  H = -sum_j p_j log p_j,  p_j = exp(z_j - lse)
// computed in one pass over the row with an online log-sum-exp (common.cuh) in fp32, base 2.
//
// Backward, for upstream gradients g (of logp) and h (of H); with sum_k p_k z_k = lse - H:
//   dx_j = (g * (1[j == y] - p_j) - h * p_j * (z_j - (lse - H))) / T
// (dlogp/dz_j = 1[j == y] - p_j; dH/dz_j = -p_j (z_j - sum_k p_k z_k)); terms with p_j == 0
// are 0, so -inf logits get a zero gradient.
//
// Edge rules (the same as the torch and Triton backends): a row whose target is ignore_index
// reads no logits and gives logp = H = lse = 0 and a zero gradient; a row that is all -inf gives
// logp = -inf, H = 0, lse = -inf and a zero gradient; a target whose logit is -inf gets -inf.
// A target outside [0, V) (the front door rejects those) gives NaN instead of a stray read.
#pragma once

#include "common.cuh"

namespace cepo {

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kMaxThreads) token_logprobs_fwd_kernel(
    // pointers
    const T* __restrict__ logits,         // (N, V) fp16/bf16/fp32, row r at logits + r * stride_row
    const int64_t* __restrict__ targets,  // (N,) token ids, or ignore_index
    float* __restrict__ logp,             // (N,) out: log softmax(x / T)[y]
    float* __restrict__ entropy,          // (N,) out: entropy in nats (unused unless kEntropy)
    float* __restrict__ lse,              // (N,) out: log sum exp(x / T), natural log, for backward
    // sizes and strides (elements)
    int V,               // vocabulary size, < 2^31
    int64_t stride_row,  // logits row stride; the row offset is computed in int64
    // scalars
    float scale2,  // log2(e) / T: z2 = x * scale2 is z in base-2 units
    int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const int64_t target = targets[row];
  if (target == ignore_index) {  // uniform across the block: ignored rows read nothing
    if (threadIdx.x == 0) {
      logp[row] = 0.f;
      lse[row] = 0.f;
      if (kEntropy) entropy[row] = 0.f;
    }
    return;
  }
  const T* x = logits + row * stride_row;
  const LseState st = row_state<T, kEntropy>(x, V, scale2);
  if (threadIdx.x == 0) {
    const float lse2 = lse2_finish(st);
    const bool in_range = target >= 0 && target < V;
    const float z2_target = in_range ? to_float(x[target]) * scale2 : NAN;
    logp[row] = lse2 == -INFINITY ? -INFINITY : (z2_target - lse2) * kLn2;
    lse[row] = lse2 * kLn2;
    if (kEntropy) entropy[row] = entropy_finish(st);
  }
}

// Writes zeros over a row of V elements of out (vector stores where aligned).
template <typename T>
__device__ __forceinline__ void zero_row(T* __restrict__ out, int V) {
  using V16 = Vec<T>;
  constexpr int kVec = V16::kSize;
  const int head = head_elements(out, V);
  const int n_vec = (V - head) / kVec;
  for (int j = threadIdx.x; j < head; j += blockDim.x) out[j] = from_float<T>(0.f);
  float zeros[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) zeros[k] = 0.f;
  for (int i = threadIdx.x; i < n_vec; i += blockDim.x) V16::store(out + head + i * kVec, zeros);
  for (int j = head + n_vec * kVec + threadIdx.x; j < V; j += blockDim.x) out[j] = from_float<T>(0.f);
}

template <typename T, bool kGradLogp, bool kGradEntropy>
__global__ void __launch_bounds__(kMaxThreads) token_logprobs_bwd_kernel(
    // pointers
    const T* __restrict__ logits,             // (N, V) the forward's logits, row stride stride_row
    const int64_t* __restrict__ targets,      // (N,) token ids, or ignore_index
    const float* __restrict__ lse,            // (N,) from the forward (natural log)
    const float* __restrict__ entropy,        // (N,) from the forward (unused unless kGradEntropy)
    const float* __restrict__ grad_logp,      // (N,) upstream gradient of logp (unused unless kGradLogp)
    const float* __restrict__ grad_entropy,   // (N,) upstream gradient of H (unused unless kGradEntropy)
    T* __restrict__ grad,                     // (N, V) out, logits dtype, row stride stride_grad_row
    // sizes and strides (elements)
    int V,                    // vocabulary size, < 2^31
    int64_t stride_row,       // logits row stride (int64 row offsets)
    int64_t stride_grad_row,  // grad row stride
    // scalars
    float scale2,           // log2(e) / T
    float inv_temperature,  // 1 / T
    int64_t ignore_index) {
  using V16 = Vec<T>;
  constexpr int kVec = V16::kSize;
  const int64_t row = blockIdx.x;
  const int64_t target = targets[row];
  const float row_lse = lse[row];
  T* out = grad + row * stride_grad_row;
  const bool live = target != ignore_index && row_lse != -INFINITY;
  if (!live) {  // ignored and all -inf rows: zero gradient, no read of the logits
    zero_row(out, V);
    return;
  }
  const T* x = logits + row * stride_row;
  const float g = kGradLogp ? grad_logp[row] : 0.f;
  const float h = kGradEntropy ? grad_entropy[row] : 0.f;
  const float neg_lse2 = -row_lse * kLog2e;                             // p_j = exp2(x_j * scale2 - lse2)
  const float mean_z = kGradEntropy ? row_lse - entropy[row] : 0.f;  // sum_k p_k z_k
  // dx_j, from the element x_j at column j (fp32)
  auto grad_at = [&](float xj, int j) -> float {
    const float p = exp2f(fmaf(xj, scale2, neg_lse2));
    float d = g * ((j == target ? 1.f : 0.f) - p);
    if (kGradEntropy) d -= p > 0.f ? h * (p * fmaf(xj, inv_temperature, -mean_z)) : 0.f;
    return d * inv_temperature;
  };

  const int head = head_elements(x, V);
  if (head != head_elements(out, V)) {  // x and out not aligned alike: scalar loop over the row
    for (int j = threadIdx.x; j < V; j += blockDim.x) out[j] = from_float<T>(grad_at(to_float(x[j]), j));
    return;
  }
  if (static_cast<int>(threadIdx.x) < head) {
    const int j = threadIdx.x;
    out[j] = from_float<T>(grad_at(to_float(x[j]), j));
  }
  const int n_vec = (V - head) / kVec;
  const int n_threads = blockDim.x;
  int i = threadIdx.x;
  for (; i + (kUnroll - 1) * n_threads < n_vec; i += kUnroll * n_threads) {  // kUnroll loads in flight
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = V16::load(x + head + (i + u * n_threads) * kVec);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j0 = head + (i + u * n_threads) * kVec;
      float v[kVec];
      V16::unpack(raw[u], v);
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[k] = grad_at(v[k], j0 + k);
      V16::store(out + j0, v);
    }
  }
  for (; i < n_vec; i += n_threads) {
    const int j0 = head + i * kVec;
    float v[kVec];
    V16::unpack(V16::load(x + j0), v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = grad_at(v[k], j0 + k);
    V16::store(out + j0, v);
  }
  for (int j = head + n_vec * kVec + threadIdx.x; j < V; j += blockDim.x) {
    out[j] = from_float<T>(grad_at(to_float(x[j]), j));
  }
}

}  // namespace cepo
