// The one registration block of the cepo ops: every schema is here, the CUDA launchers are in
// <op>.cu, and the fake (meta) functions that torch.compile needs are registered from Python
// (cepo_kernels/cuda/ops.py). No autograd is registered on these ops: the front doors'
// autograd Functions call the forward and backward ops explicitly.
//
// The library is the Python module cepo_kernels._C (a module with no functions: importing it
// runs the registrations below) or a JIT build of the same sources (cepo_kernels/cuda/jit.py).
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "cepo CUDA ops, registered as torch.ops.cepo.*", -1,
                               nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(cepo, m) {
  // logp, entropy ((0,) unless want_entropy), lse: fp32 (N,)
  m.def(
      "token_logprobs_fwd(Tensor logits, Tensor targets, float temperature, int ignore_index, bool want_entropy)"
      " -> (Tensor, Tensor, Tensor)");
  // gradient of the logits, (N, V) in their dtype
  m.def(
      "token_logprobs_bwd(Tensor logits, Tensor targets, Tensor lse, Tensor? entropy, Tensor? grad_logp,"
      " Tensor? grad_entropy, float temperature, int ignore_index) -> Tensor");
  // policy ((0,) without policy logits), pos, neg, weights, advantages: fp32 (N,)
  m.def(
      "contrastive_logprobs_fwd(Tensor? policy, Tensor pos, Tensor neg, Tensor targets, Tensor a_tok, Tensor sign,"
      " Tensor keep, float lam, float eps_w, float temperature, int ignore_index)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // advantages, weights: fp32 (numel,)
  m.def(
      "contrastive_advantage_fwd(Tensor a_tok, Tensor sign, Tensor pos, Tensor neg, float lam, float eps_w,"
      " Tensor? mask) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cepo, CUDA, m) {
  m.impl("token_logprobs_fwd", &cepo::token_logprobs_fwd);
  m.impl("token_logprobs_bwd", &cepo::token_logprobs_bwd);
  m.impl("contrastive_logprobs_fwd", &cepo::contrastive_logprobs_fwd);
  m.impl("contrastive_advantage_fwd", &cepo::contrastive_advantage_fwd);
}
