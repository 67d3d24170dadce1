// Launchers of the cepo CUDA ops (one .cu per op) and the argument checks they share. The op
// schemas are registered in one place, ops.cpp; the kernels live in <op>_kernel.cuh.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

namespace cepo {

// logp (N,), entropy (N,) or (0,) when not wanted, lse (N,); all fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits, const at::Tensor& targets,
                                                                  double temperature, int64_t ignore_index,
                                                                  bool want_entropy);

// Gradient with respect to logits (N, V), in the logits' dtype, contiguous.
at::Tensor token_logprobs_bwd(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                              const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& grad_logp,
                              const std::optional<at::Tensor>& grad_entropy, double temperature, int64_t ignore_index);

// policy (N,) or (0,) without policy logits, pos, neg, weights, advantages (N,); all fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_logprobs_fwd(
    const std::optional<at::Tensor>& policy, const at::Tensor& pos, const at::Tensor& neg, const at::Tensor& targets,
    const at::Tensor& a_tok, const at::Tensor& sign, const at::Tensor& keep, double lam, double eps_w,
    double temperature, int64_t ignore_index);

// advantages (N,), weights (N,), fp32, N = pos.numel().
std::tuple<at::Tensor, at::Tensor> contrastive_advantage_fwd(const at::Tensor& a_tok, const at::Tensor& sign,
                                                             const at::Tensor& pos, const at::Tensor& neg, double lam,
                                                             double eps_w, const std::optional<at::Tensor>& mask);

// ---------------------------------------------------------------------------------------------
// checks shared by the launchers; every message names the op and the argument
// ---------------------------------------------------------------------------------------------

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + (t.dim() == 1 ? ",)" : ")");
}

inline bool is_low_precision_float(const at::Tensor& t) {
  const auto d = t.scalar_type();
  return d == at::kFloat || d == at::kHalf || d == at::kBFloat16;
}

// (N, V) fp16/bf16/fp32 CUDA logits with a contiguous last dimension.
inline void check_logits(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (N, V), got shape ", shape_str(t));
  TORCH_CHECK(is_low_precision_float(t), op, ": ", name, " must be float16, bfloat16 or float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.size(1) >= 1, op, ": ", name, " needs a vocabulary dimension of at least 1, got shape ",
              shape_str(t));
  TORCH_CHECK(t.size(1) <= std::numeric_limits<int32_t>::max(), op, ": ", name,
              " has a vocabulary dimension of ", t.size(1), "; at most 2^31 - 1 is supported");
  TORCH_CHECK(t.size(0) <= std::numeric_limits<int32_t>::max(), op, ": ", name, " has ", t.size(0),
              " rows; at most 2^31 - 1 are supported (one block per row)");
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) == 1, op, ": ", name,
              " must have a contiguous last dimension (stride 1), got strides (", t.stride(0), ", ", t.stride(1),
              ")");
}

// A CUDA tensor of n elements on `device`.
inline void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t n, const at::Device& device) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " like the logits, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape (", n, ",), got ", shape_str(t));
}

inline void check_targets(const char* op, const at::Tensor& targets, int64_t n, const at::Device& device) {
  check_vector(op, "targets", targets, n, device);
  TORCH_CHECK(!at::isFloatingType(targets.scalar_type()) && targets.scalar_type() != at::kBool, op,
              ": targets must be an integer tensor, got ", targets.scalar_type());
}

inline void check_temperature(const char* op, double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be finite and > 0, got ",
              temperature);
}

// The kernels' run-time dtype code (common.cuh: DType): 0 float32, 1 float16, 2 bfloat16.
inline int dtype_code(at::ScalarType t) { return t == at::kHalf ? 1 : t == at::kBFloat16 ? 2 : 0; }

inline void check_lam_eps(const char* op, double lam, double eps_w) {
  TORCH_CHECK(lam >= 0 && lam <= 1, op, ": lam must be in [0, 1], got ", lam);
  TORCH_CHECK(eps_w >= 0 && eps_w < 1, op, ": eps_w must be in [0, 1), got ", eps_w);
}

}  // namespace cepo
