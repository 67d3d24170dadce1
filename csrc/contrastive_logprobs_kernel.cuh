// contrastive_logprobs kernel: one block per token reads the token's row of policy, r+ and r-
// logits once each (online log-sum-exp in fp32, common.cuh), the target logit as a scalar, then
// applies the CEPO weighting (common.cuh: contrastive_weight). No torch headers.
//
// The three logits tensors may differ in dtype: each stream's dtype is a run-time code, one
// uniform branch per stream and row. A token that is not kept (keep false or target ==
// ignore_index) reads no logits and gives log-probs 0, weight 1 and advantage 0.
#pragma once

#include "common.cuh"

namespace cepo {

// log softmax(x / T)[target] of one row (fp32, natural log), valid in thread 0.
template <typename T>
__device__ __forceinline__ float row_logprob_typed(const T* __restrict__ x, int64_t target, int V, float scale2) {
  const LseState st = row_state<T, false>(x, V, scale2);
  const float lse2 = lse2_finish(st);
  const bool in_range = target >= 0 && target < V;
  const float z2_target = in_range ? to_float(x[target]) * scale2 : NAN;
  return lse2 == -INFINITY ? -INFINITY : (z2_target - lse2) * kLn2;
}

__device__ __forceinline__ float row_logprob(const void* logits, DType dtype, int64_t row, int64_t stride_row,
                                             int64_t target, int V, float scale2) {
  const int64_t offset = row * stride_row;  // int64: N * V exceeds 2^31
  switch (dtype) {
    case DType::kFloat16:
      return row_logprob_typed(static_cast<const __half*>(logits) + offset, target, V, scale2);
    case DType::kBFloat16:
      return row_logprob_typed(static_cast<const __nv_bfloat16*>(logits) + offset, target, V, scale2);
    default:
      return row_logprob_typed(static_cast<const float*>(logits) + offset, target, V, scale2);
  }
}

template <bool kPolicy>
__global__ void __launch_bounds__(kMaxThreads) contrastive_logprobs_kernel(
    // pointers
    const void* __restrict__ policy,      // (N, V) logits under [prompt, y] (unused unless kPolicy)
    const void* __restrict__ pos,         // (N, V) logits under [prompt, r+, y]
    const void* __restrict__ neg,         // (N, V) logits under [prompt, r-, y]
    const int64_t* __restrict__ targets,  // (N,) token ids; ignore_index where not kept
    const float* __restrict__ adv,        // (N,) fp32 per-token advantage A
    const float* __restrict__ sign,       // (N,) fp32 sign of the token's sequence advantage
    const bool* __restrict__ keep,        // (N,) true where the token counts
    float* __restrict__ out_policy,       // (N,) out (unused unless kPolicy)
    float* __restrict__ out_pos,          // (N,) out
    float* __restrict__ out_neg,          // (N,) out
    float* __restrict__ out_weight,       // (N,) out: clipped weight c
    float* __restrict__ out_adv,          // (N,) out: A_t
    // dtypes of the three streams
    DType policy_dtype, DType pos_dtype, DType neg_dtype,
    // sizes and strides (elements)
    int V,  // vocabulary size, < 2^31
    int64_t stride_policy_row, int64_t stride_pos_row, int64_t stride_neg_row,
    // scalars
    float scale2,  // log2(e) / T
    int64_t ignore_index,
    float lam,       // weighting strength
    float clip_lo,   // 1 - eps_w
    float clip_hi) {  // 1 + eps_w
  const int64_t row = blockIdx.x;
  const int64_t target = targets[row];
  const bool kept = keep[row] && target != ignore_index;  // uniform across the block
  float lp_policy = 0.f, lp_pos = 0.f, lp_neg = 0.f;
  if (kept) {
    lp_pos = row_logprob(pos, pos_dtype, row, stride_pos_row, target, V, scale2);
    lp_neg = row_logprob(neg, neg_dtype, row, stride_neg_row, target, V, scale2);
    if (kPolicy) lp_policy = row_logprob(policy, policy_dtype, row, stride_policy_row, target, V, scale2);
  }
  if (threadIdx.x == 0) {
    float weight, advantage;
    contrastive_weight(lp_pos, lp_neg, adv[row], sign[row], kept, lam, clip_lo, clip_hi, &weight, &advantage);
    if (kPolicy) out_policy[row] = lp_policy;
    out_pos[row] = lp_pos;
    out_neg[row] = lp_neg;
    out_weight[row] = weight;
    out_adv[row] = advantage;
  }
}

}  // namespace cepo
