// Launcher of contrastive_logprobs_fwd (kernel: contrastive_logprobs_kernel.cuh).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "contrastive_logprobs_kernel.cuh"
#include "ops.h"

namespace cepo {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_logprobs_fwd(
    const std::optional<at::Tensor>& policy, const at::Tensor& pos, const at::Tensor& neg, const at::Tensor& targets,
    const at::Tensor& a_tok, const at::Tensor& sign, const at::Tensor& keep, double lam, double eps_w,
    double temperature, int64_t ignore_index) {
  constexpr const char* op = "cepo::contrastive_logprobs_fwd";
  const bool has_policy = policy.has_value() && policy->defined();
  check_logits(op, "pos", pos);
  check_logits(op, "neg", neg);
  const int64_t n = pos.size(0);
  const int64_t v = pos.size(1);
  const auto dev = pos.device();
  TORCH_CHECK(neg.sizes() == pos.sizes(), op, ": neg must have the shape of pos ", shape_str(pos), ", got ",
              shape_str(neg));
  TORCH_CHECK(neg.device() == dev, op, ": neg must be on ", dev, " like pos, got ", neg.device());
  if (has_policy) {
    check_logits(op, "policy", *policy);
    TORCH_CHECK(policy->sizes() == pos.sizes(), op, ": policy must have the shape of pos ", shape_str(pos), ", got ",
                shape_str(*policy));
    TORCH_CHECK(policy->device() == dev, op, ": policy must be on ", dev, " like pos, got ", policy->device());
  }
  check_targets(op, targets, n, dev);
  check_vector(op, "a_tok", a_tok, n, dev);
  check_vector(op, "sign", sign, n, dev);
  check_vector(op, "keep", keep, n, dev);
  TORCH_CHECK(a_tok.scalar_type() == at::kFloat, op, ": a_tok must be float32, got ", a_tok.scalar_type());
  TORCH_CHECK(sign.scalar_type() == at::kFloat, op, ": sign must be float32, got ", sign.scalar_type());
  TORCH_CHECK(keep.scalar_type() == at::kBool, op, ": keep must be bool, got ", keep.scalar_type());
  check_temperature(op, temperature);
  check_lam_eps(op, lam, eps_w);
  const c10::cuda::CUDAGuard guard(dev);

  const auto f32 = pos.options().dtype(at::kFloat);
  at::Tensor out_policy = at::empty({has_policy ? n : 0}, f32);
  at::Tensor out_pos = at::empty({n}, f32);
  at::Tensor out_neg = at::empty({n}, f32);
  at::Tensor out_weight = at::empty({n}, f32);
  at::Tensor out_adv = at::empty({n}, f32);
  if (n == 0) return {out_policy, out_pos, out_neg, out_weight, out_adv};

  const at::Tensor tgt = targets.to(at::kLong).contiguous();
  const at::Tensor adv_c = a_tok.contiguous();
  const at::Tensor sign_c = sign.contiguous();
  const at::Tensor keep_c = keep.contiguous();
  const at::Tensor& pol = has_policy ? *policy : pos;  // not read without a policy stream
  int64_t widest = std::max(pos.element_size(), neg.element_size());
  if (has_policy) widest = std::max(widest, pol.element_size());
  const int threads = threads_for_row(v, widest);
  const float scale2 = static_cast<float>(1.4426950408889634 / temperature);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto kernel = has_policy ? contrastive_logprobs_kernel<true> : contrastive_logprobs_kernel<false>;
  kernel<<<static_cast<unsigned>(n), threads, 0, stream>>>(
      pol.data_ptr(), pos.data_ptr(), neg.data_ptr(), tgt.data_ptr<int64_t>(), adv_c.data_ptr<float>(),
      sign_c.data_ptr<float>(), keep_c.data_ptr<bool>(), has_policy ? out_policy.data_ptr<float>() : nullptr,
      out_pos.data_ptr<float>(), out_neg.data_ptr<float>(), out_weight.data_ptr<float>(), out_adv.data_ptr<float>(),
      static_cast<DType>(dtype_code(pol.scalar_type())), static_cast<DType>(dtype_code(pos.scalar_type())),
      static_cast<DType>(dtype_code(neg.scalar_type())), static_cast<int>(v), pol.stride(0), pos.stride(0),
      neg.stride(0), scale2, ignore_index, static_cast<float>(lam), static_cast<float>(1.0 - eps_w),
      static_cast<float>(1.0 + eps_w));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out_policy, out_pos, out_neg, out_weight, out_adv};
}

}  // namespace cepo
