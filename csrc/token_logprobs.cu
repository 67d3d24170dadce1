// Launchers of token_logprobs_fwd / token_logprobs_bwd (kernels: token_logprobs_kernel.cuh).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ops.h"
#include "token_logprobs_kernel.cuh"

namespace cepo {
namespace {

// Calls fn with a typed null pointer whose type is the kernel element type of `dtype`.
template <typename Fn>
void dispatch_float(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kHalf:
      fn(static_cast<__half*>(nullptr));
      break;
    case at::kBFloat16:
      fn(static_cast<__nv_bfloat16*>(nullptr));
      break;
    default:
      fn(static_cast<float*>(nullptr));
      break;
  }
}

// fp32 (N,) copy-free view where possible: the kernels read upstream gradients as fp32.
at::Tensor as_float_vector(const char* op, const char* name, const at::Tensor& t, int64_t n, const at::Device& dev) {
  check_vector(op, name, t, n, dev);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a float tensor, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits, const at::Tensor& targets,
                                                                  double temperature, int64_t ignore_index,
                                                                  bool want_entropy) {
  constexpr const char* op = "cepo::token_logprobs_fwd";
  check_logits(op, "logits", logits);
  const int64_t n = logits.size(0);
  const int64_t v = logits.size(1);
  check_targets(op, targets, n, logits.device());
  check_temperature(op, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());

  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, f32);
  at::Tensor lse = at::empty({n}, f32);
  at::Tensor entropy = at::empty({want_entropy ? n : 0}, f32);
  if (n == 0) return {logp, entropy, lse};

  const at::Tensor tgt = targets.to(at::kLong).contiguous();
  const float scale2 = static_cast<float>(1.4426950408889634 / temperature);
  const int threads = threads_for_row(v, logits.element_size());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(logits.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto kernel = want_entropy ? token_logprobs_fwd_kernel<T, true> : token_logprobs_fwd_kernel<T, false>;
    kernel<<<static_cast<unsigned>(n), threads, 0, stream>>>(
        static_cast<const T*>(logits.data_ptr()), tgt.data_ptr<int64_t>(), logp.data_ptr<float>(),
        want_entropy ? entropy.data_ptr<float>() : nullptr, lse.data_ptr<float>(), static_cast<int>(v),
        logits.stride(0), scale2, ignore_index);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logp, entropy, lse};
}

at::Tensor token_logprobs_bwd(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                              const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& grad_logp,
                              const std::optional<at::Tensor>& grad_entropy, double temperature, int64_t ignore_index) {
  constexpr const char* op = "cepo::token_logprobs_bwd";
  check_logits(op, "logits", logits);
  const int64_t n = logits.size(0);
  const int64_t v = logits.size(1);
  const auto dev = logits.device();
  check_targets(op, targets, n, dev);
  check_temperature(op, temperature);
  check_vector(op, "lse", lse, n, dev);
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must be float32 (from token_logprobs_fwd), got ",
              lse.scalar_type());
  const bool has_g = grad_logp.has_value() && grad_logp->defined();
  const bool has_h = grad_entropy.has_value() && grad_entropy->defined();
  const bool has_entropy = entropy.has_value() && entropy->defined();
  TORCH_CHECK(!has_h || has_entropy, op, ": grad_entropy needs the forward's entropy, which was not given");
  const c10::cuda::CUDAGuard guard(dev);

  at::Tensor grad = at::empty({n, v}, logits.options());
  if (n == 0) return grad;
  const at::Tensor tgt = targets.to(at::kLong).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor g = has_g ? as_float_vector(op, "grad_logp", *grad_logp, n, dev) : at::Tensor();
  const at::Tensor h = has_h ? as_float_vector(op, "grad_entropy", *grad_entropy, n, dev) : at::Tensor();
  const at::Tensor ent = has_h ? as_float_vector(op, "entropy", *entropy, n, dev) : at::Tensor();
  const float* g_ptr = has_g ? g.data_ptr<float>() : nullptr;
  const float* h_ptr = has_h ? h.data_ptr<float>() : nullptr;
  const float* ent_ptr = has_h ? ent.data_ptr<float>() : nullptr;

  const float scale2 = static_cast<float>(1.4426950408889634 / temperature);
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  const int threads = threads_for_row(v, logits.element_size());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(logits.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto kernel = has_g ? (has_h ? token_logprobs_bwd_kernel<T, true, true> : token_logprobs_bwd_kernel<T, true, false>)
                        : (has_h ? token_logprobs_bwd_kernel<T, false, true> : token_logprobs_bwd_kernel<T, false, false>);
    kernel<<<static_cast<unsigned>(n), threads, 0, stream>>>(
        static_cast<const T*>(logits.data_ptr()), tgt.data_ptr<int64_t>(), lse_c.data_ptr<float>(), ent_ptr, g_ptr,
        h_ptr, static_cast<T*>(grad.data_ptr()), static_cast<int>(v), logits.stride(0), grad.stride(0), scale2,
        inv_temperature, ignore_index);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

}  // namespace cepo
