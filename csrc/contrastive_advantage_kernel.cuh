// contrastive_advantage kernel: the CEPO weighting alone, elementwise over N tokens
// (common.cuh: contrastive_weight). No torch headers.
//
//   c = clip(exp(s * (pos - neg)), 1 - eps_w, 1 + eps_w)   (1 where pos - neg is NaN or s == 0)
//   A_t = A * (1 + lam * (c - 1));   c = 1 and A_t = 0 where mask is false.
#pragma once

#include "common.cuh"

namespace cepo {

__global__ void contrastive_advantage_kernel(
    // pointers, all (N,) contiguous
    const float* __restrict__ adv,   // fp32 per-token advantage A
    const float* __restrict__ sign,  // fp32 sign of the token's sequence advantage
    const void* __restrict__ pos,    // fp16/bf16/fp32 log-probs under r+ (dtype pos_dtype)
    const void* __restrict__ neg,    // fp16/bf16/fp32 log-probs under r- (dtype neg_dtype)
    const bool* __restrict__ mask,   // true where the token counts; nullptr: all count
    float* __restrict__ out_adv,     // fp32 out: A_t
    float* __restrict__ out_weight,  // fp32 out: c
    // dtypes
    DType pos_dtype, DType neg_dtype,
    // sizes
    int64_t n,  // tokens; indices are int64
    // scalars
    float lam, float clip_lo, float clip_hi) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const bool keep = mask == nullptr || mask[i];
    float weight, advantage;
    contrastive_weight(load_as_float(pos, pos_dtype, i), load_as_float(neg, neg_dtype, i), adv[i], sign[i], keep, lam,
                       clip_lo, clip_hi, &weight, &advantage);
    out_weight[i] = weight;
    out_adv[i] = advantage;
  }
}

}  // namespace cepo
