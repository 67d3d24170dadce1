// Launcher of contrastive_advantage_fwd (kernel: contrastive_advantage_kernel.cuh).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "contrastive_advantage_kernel.cuh"
#include "ops.h"

namespace cepo {

std::tuple<at::Tensor, at::Tensor> contrastive_advantage_fwd(const at::Tensor& a_tok, const at::Tensor& sign,
                                                             const at::Tensor& pos, const at::Tensor& neg, double lam,
                                                             double eps_w, const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "cepo::contrastive_advantage_fwd";
  TORCH_CHECK(pos.is_cuda(), op, ": pos must be a CUDA tensor, got one on ", pos.device());
  const auto dev = pos.device();
  const int64_t n = pos.numel();
  TORCH_CHECK(is_low_precision_float(pos), op, ": pos must be float16, bfloat16 or float32, got ", pos.scalar_type());
  TORCH_CHECK(is_low_precision_float(neg), op, ": neg must be float16, bfloat16 or float32, got ", neg.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"neg", &neg}, {"a_tok", &a_tok},
                                {"sign", &sign}}) {
    TORCH_CHECK(t->device() == dev, op, ": ", name, " must be on ", dev, " like pos, got ", t->device());
    TORCH_CHECK(t->numel() == n, op, ": ", name, " must have ", n, " elements like pos ", shape_str(pos), ", got ",
                shape_str(*t));
  }
  TORCH_CHECK(a_tok.scalar_type() == at::kFloat, op, ": a_tok must be float32, got ", a_tok.scalar_type());
  TORCH_CHECK(sign.scalar_type() == at::kFloat, op, ": sign must be float32, got ", sign.scalar_type());
  const bool has_mask = mask.has_value() && mask->defined();
  if (has_mask) {
    TORCH_CHECK(mask->device() == dev, op, ": mask must be on ", dev, " like pos, got ", mask->device());
    TORCH_CHECK(mask->numel() == n, op, ": mask must have ", n, " elements like pos, got ", shape_str(*mask));
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be bool, got ", mask->scalar_type());
  }
  check_lam_eps(op, lam, eps_w);
  const c10::cuda::CUDAGuard guard(dev);

  const auto f32 = pos.options().dtype(at::kFloat);
  at::Tensor out_adv = at::empty({n}, f32);
  at::Tensor out_weight = at::empty({n}, f32);
  if (n == 0) return {out_adv, out_weight};

  // flat contiguous views (a per-sequence advantage arrives expanded with stride 0)
  const at::Tensor adv_c = a_tok.reshape({-1}).contiguous();
  const at::Tensor sign_c = sign.reshape({-1}).contiguous();
  const at::Tensor pos_c = pos.reshape({-1}).contiguous();
  const at::Tensor neg_c = neg.reshape({-1}).contiguous();
  const at::Tensor mask_c = has_mask ? mask->reshape({-1}).contiguous() : at::Tensor();

  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, int64_t{1} << 20);  // grid-stride beyond
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  contrastive_advantage_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      adv_c.data_ptr<float>(), sign_c.data_ptr<float>(), pos_c.data_ptr(), neg_c.data_ptr(),
      has_mask ? mask_c.data_ptr<bool>() : nullptr, out_adv.data_ptr<float>(), out_weight.data_ptr<float>(),
      static_cast<DType>(dtype_code(pos.scalar_type())), static_cast<DType>(dtype_code(neg.scalar_type())), n,
      static_cast<float>(lam), static_cast<float>(1.0 - eps_w), static_cast<float>(1.0 + eps_w));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out_adv, out_weight};
}

}  // namespace cepo
