// Runs the cepo CUDA kernels on the CPU through cuda_host_emulation.h and checks them against a
// float64 computation written from the formulas: token_logprobs forward (logp, entropy, lse) and
// backward, contrastive_logprobs (three streams of mixed dtypes) and contrastive_advantage.
// Covers fp32/fp16/bf16, vocabularies 1 to 32003, rows that start off a 16-byte boundary,
// a gradient misaligned differently from the logits, -inf logits, all -inf rows, -inf targets
// and ignored rows. Built and run by tests/kernels/test_cuda_compile.py:
//   c++ -std=c++20 -O1 -pthread -I<cuda>/include -Icsrc csrc/tests/kernel_emulation_test.cpp
// Prints one line per failure (at most a few per case) and exits non-zero if any check fails.
#include "cuda_host_emulation.h"
// the kernels, compiled for the host
#include "contrastive_advantage_kernel.cuh"
#include "contrastive_logprobs_kernel.cuh"
#include "token_logprobs_kernel.cuh"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace {

int failures = 0;
constexpr int64_t kIgnore = -100;
const double kInf = INFINITY;

bool close(double got, double want, double atol, double rtol) {
  if (std::isinf(want) || std::isinf(got)) return got == want;
  if (std::isnan(want) || std::isnan(got)) return std::isnan(want) && std::isnan(got);
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

void expect(const std::string& what, double got, double want, double atol, double rtol) {
  if (!close(got, want, atol, rtol)) {
    if (++failures < 40) std::printf("FAIL %s: got %.9g, want %.9g\n", what.c_str(), got, want);
  }
}

template <typename T>
T from_double(double x);
template <>
float from_double<float>(double x) { return static_cast<float>(x); }
template <>
__half from_double<__half>(double x) { return __float2half_rn(static_cast<float>(x)); }
template <>
__nv_bfloat16 from_double<__nv_bfloat16>(double x) { return __float2bfloat16_rn(static_cast<float>(x)); }

template <typename T>
const char* name_of() { return sizeof(T) == 4 ? "fp32" : (std::is_same_v<T, __half> ? "fp16" : "bf16"); }

template <typename T>
cepo::DType code_of() {
  return sizeof(T) == 4 ? cepo::DType::kFloat32 : (std::is_same_v<T, __half> ? cepo::DType::kFloat16 : cepo::DType::kBFloat16);
}

// Float64 row statistics of z = x / T: lse, entropy, p.
struct RowRef {
  double lse, entropy;
  std::vector<double> p, z;
};

RowRef row_reference(const std::vector<double>& x, double temperature) {
  RowRef r;
  r.z.resize(x.size());
  double m = -kInf;
  for (size_t j = 0; j < x.size(); ++j) {
    r.z[j] = x[j] / temperature;
    m = std::fmax(m, r.z[j]);
  }
  r.p.assign(x.size(), 0.0);
  if (m == -kInf) {
    r.lse = -kInf;
    r.entropy = 0;
    return r;
  }
  double s = 0;
  for (double v : r.z) s += std::exp(v - m);
  r.lse = m + std::log(s);
  r.entropy = 0;
  for (size_t j = 0; j < x.size(); ++j) {
    r.p[j] = std::exp(r.z[j] - r.lse);
    if (r.p[j] > 0) r.entropy -= r.p[j] * (r.z[j] - r.lse);
  }
  return r;
}

// N rows of V logits of type T at a row stride of V + pad, starting `shift` elements into the
// buffer (so rows start off 16-byte boundaries); the values as doubles (after rounding to T).
template <typename T>
struct Logits {
  std::vector<T> buffer;
  std::vector<std::vector<double>> rows;
  const T* data;
  int64_t stride;
};

template <typename T>
Logits<T> make_logits(int n, int v, int shift, int pad, std::mt19937& rng, double scale) {
  std::normal_distribution<double> normal(0.0, scale);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  Logits<T> L;
  L.stride = v + pad;
  L.buffer.assign(static_cast<size_t>(shift + n * L.stride + 16), from_double<T>(0.0));
  L.rows.assign(n, std::vector<double>(v));
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < v; ++j) {
      double val = normal(rng);
      if (i == 1 && unit(rng) < 0.3) val = -kInf;  // a masked vocabulary
      if (i == 2) val = -kInf;                     // all -inf row
      const T t = from_double<T>(val);
      L.buffer[shift + i * L.stride + j] = t;
      L.rows[i][j] = static_cast<double>(cepo::to_float(t));
    }
  }
  L.data = L.buffer.data() + shift;
  return L;
}

template <typename T>
void check_token_logprobs(int v, int shift, int grad_shift, std::mt19937& rng) {
  const int n = 5;
  const double temperature = 0.7;
  Logits<T> L = make_logits<T>(n, v, shift, 3, rng, 3.0);
  std::vector<int64_t> targets(n);
  for (int i = 0; i < n; ++i) targets[i] = static_cast<int64_t>(rng() % v);
  targets[3] = kIgnore;  // ignored row
  if (v > 1) {           // row 1 targets a -inf entry when there is one
    for (int j = 0; j < v; ++j)
      if (L.rows[1][j] == -kInf) targets[1] = j;
  }
  const std::string tag = std::string(name_of<T>()) + " V=" + std::to_string(v) + " shift=" + std::to_string(shift);
  std::vector<float> logp(n, -1), entropy(n, -1), lse(n, -1);
  const float scale2 = static_cast<float>(1.4426950408889634 / temperature);
  const int threads = cepo::threads_for_row(v, sizeof(T));
  cepo_emu::launch(n, threads, [&] {
    cepo::token_logprobs_fwd_kernel<T, true>(L.data, targets.data(), logp.data(), entropy.data(), lse.data(), v,
                                             L.stride, scale2, kIgnore);
  });
  std::vector<RowRef> refs;
  for (int i = 0; i < n; ++i) {
    refs.push_back(row_reference(L.rows[i], temperature));
    const RowRef& r = refs.back();
    const bool ignored = targets[i] == kIgnore;
    const double want_lp = ignored ? 0.0 : (r.lse == -kInf ? -kInf : r.z[targets[i]] - r.lse);
    expect(tag + " logp row " + std::to_string(i), logp[i], want_lp, 2e-5, 1e-5);
    expect(tag + " entropy row " + std::to_string(i), entropy[i], ignored ? 0.0 : r.entropy, 2e-5, 1e-5);
    expect(tag + " lse row " + std::to_string(i), lse[i], ignored ? 0.0 : r.lse, 2e-5, 1e-6);
  }
  // without entropy: the same log-probs, bit for bit
  std::vector<float> logp2(n, -1), lse2(n, -1);
  cepo_emu::launch(n, threads, [&] {
    cepo::token_logprobs_fwd_kernel<T, false>(L.data, targets.data(), logp2.data(), nullptr, lse2.data(), v, L.stride,
                                              scale2, kIgnore);
  });
  for (int i = 0; i < n; ++i) {
    if (!(logp2[i] == logp[i] || (std::isnan(logp2[i]) && std::isnan(logp[i])))) {
      ++failures;
      std::printf("FAIL %s: logp without entropy differs at row %d\n", tag.c_str(), i);
    }
  }

  // backward with both upstream gradients; the gradient buffer is shifted by grad_shift
  std::vector<float> g = {0.7f, -1.3f, 2.0f, 0.4f, -0.9f}, h = {-0.5f, 1.1f, 0.3f, 2.0f, 0.8f};
  const int64_t grad_stride = v;
  std::vector<T> grad_buffer(static_cast<size_t>(grad_shift + n * grad_stride + 16), from_double<T>(12345.0));
  T* grad = grad_buffer.data() + grad_shift;
  cepo_emu::launch(n, threads, [&] {
    cepo::token_logprobs_bwd_kernel<T, true, true>(L.data, targets.data(), lse.data(), entropy.data(), g.data(),
                                                   h.data(), grad, v, L.stride, grad_stride, scale2,
                                                   static_cast<float>(1.0 / temperature), kIgnore);
  });
  const double rtol = sizeof(T) == 4 ? 1e-5 : (std::is_same_v<T, __half> ? 2e-3 : 1.6e-2);
  int reported = 0;
  for (int i = 0; i < n; ++i) {
    const RowRef& r = refs[i];
    const bool live = targets[i] != kIgnore && r.lse != -kInf;
    const double mean_z = r.lse - r.entropy;
    for (int j = 0; j < v; ++j) {
      double want = 0;
      if (live) {
        const double p = r.p[j];
        want = g[i] * ((j == targets[i] ? 1.0 : 0.0) - p);
        if (p > 0) want -= h[i] * p * (r.z[j] - mean_z);
        want /= temperature;
      }
      const double got = cepo::to_float(grad[i * grad_stride + j]);
      if (!close(got, want, 1e-6, rtol) && reported++ < 3) {
        ++failures;
        std::printf("FAIL %s grad_shift=%d: grad[%d][%d] = %.9g, want %.9g\n", tag.c_str(), grad_shift, i, j, got,
                    want);
      }
    }
  }
  // nothing written outside the rows
  for (int k = 0; k < grad_shift; ++k) {
    if (cepo::to_float(grad_buffer[k]) != cepo::to_float(from_double<T>(12345.0))) {
      ++failures;
      std::printf("FAIL %s: the backward wrote before the gradient\n", tag.c_str());
    }
  }
}

template <typename P, typename Q, typename R>
void check_contrastive(int v, std::mt19937& rng) {
  const int n = 6;
  const double temperature = 0.5, lam = 0.7, eps_w = 0.3;
  Logits<P> pol = make_logits<P>(n, v, 1, 0, rng, 2.0);
  Logits<Q> pos = make_logits<Q>(n, v, 0, 5, rng, 2.0);
  Logits<R> neg = make_logits<R>(n, v, 3, 1, rng, 2.0);
  std::vector<int64_t> targets(n);
  for (int i = 0; i < n; ++i) targets[i] = static_cast<int64_t>(rng() % v);
  targets[4] = kIgnore;
  bool keep[n] = {true, true, true, true, false, false};  // row 5 not kept though its target is valid
  std::vector<float> adv = {1.5f, -2.0f, 0.7f, 3.0f, 1.0f, -1.0f}, sign = {1, -1, 1, 1, 1, -1};
  std::vector<float> out_pol(n), out_pos(n), out_neg(n), out_w(n), out_a(n);
  const int threads = cepo::threads_for_row(v, 4);
  cepo_emu::launch(n, threads, [&] {
    cepo::contrastive_logprobs_kernel<true>(
        pol.data, pos.data, neg.data, targets.data(), adv.data(), sign.data(), keep, out_pol.data(), out_pos.data(),
        out_neg.data(), out_w.data(), out_a.data(), code_of<P>(), code_of<Q>(), code_of<R>(), v, pol.stride,
        pos.stride, neg.stride, static_cast<float>(1.4426950408889634 / temperature), kIgnore,
        static_cast<float>(lam), static_cast<float>(1 - eps_w), static_cast<float>(1 + eps_w));
  });
  const std::string tag = std::string("contrastive ") + name_of<P>() + "/" + name_of<Q>() + "/" + name_of<R>() +
                          " V=" + std::to_string(v);
  for (int i = 0; i < n; ++i) {
    const bool kept = keep[i] && targets[i] != kIgnore;
    auto lp = [&](const std::vector<double>& row) {
      if (!kept) return 0.0;
      const RowRef r = row_reference(row, temperature);
      return r.lse == -kInf ? -kInf : r.z[targets[i]] - r.lse;
    };
    const double want_pol = lp(pol.rows[i]), want_pos = lp(pos.rows[i]), want_neg = lp(neg.rows[i]);
    expect(tag + " policy row " + std::to_string(i), out_pol[i], want_pol, 2e-5, 1e-5);
    expect(tag + " pos row " + std::to_string(i), out_pos[i], want_pos, 2e-5, 1e-5);
    expect(tag + " neg row " + std::to_string(i), out_neg[i], want_neg, 2e-5, 1e-5);
    // weighting from the kernel's own log-probs (the formula, float64)
    const double delta = static_cast<double>(out_pos[i]) - out_neg[i];
    double w = (std::isnan(delta) || sign[i] == 0) ? 1.0 : std::exp(sign[i] * delta);
    w = std::fmin(std::fmax(w, 1 - eps_w), 1 + eps_w);
    expect(tag + " weight row " + std::to_string(i), out_w[i], kept ? w : 1.0, 1e-6, 1e-6);
    expect(tag + " advantage row " + std::to_string(i), out_a[i], kept ? adv[i] * ((1 - lam) + lam * w) : 0.0, 1e-6,
           1e-6);
  }
}

void check_advantage(std::mt19937& rng) {
  const int64_t n = 1000;
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<float> adv(n), sign(n);
  std::vector<__nv_bfloat16> pos(n);
  std::vector<float> neg(n);
  bool* mask = new bool[n];
  for (int64_t i = 0; i < n; ++i) {
    adv[i] = static_cast<float>(unit(rng) * 4 - 2);
    sign[i] = i % 7 == 0 ? 0.f : (adv[i] > 0 ? 1.f : -1.f);
    pos[i] = __float2bfloat16_rn(static_cast<float>(-unit(rng) * 6));
    neg[i] = static_cast<float>(-unit(rng) * 6);
    if (i % 11 == 0) pos[i] = __float2bfloat16_rn(-INFINITY);
    if (i % 22 == 0) neg[i] = -INFINITY;
    mask[i] = unit(rng) > 0.3;
  }
  std::vector<float> out_a(n), out_w(n);
  const double lam = 0.6, eps_w = 0.25;
  cepo_emu::launch(2, 128, [&] {  // 256 threads over 1000 tokens: the grid-stride loop
    cepo::contrastive_advantage_kernel(adv.data(), sign.data(), pos.data(), neg.data(), mask, out_a.data(),
                                       out_w.data(), cepo::DType::kBFloat16, cepo::DType::kFloat32, n,
                                       static_cast<float>(lam), static_cast<float>(1 - eps_w),
                                       static_cast<float>(1 + eps_w));
  });
  for (int64_t i = 0; i < n; ++i) {
    const double delta = static_cast<double>(__bfloat162float(pos[i])) - neg[i];
    double w = (std::isnan(delta) || sign[i] == 0) ? 1.0 : std::exp(sign[i] * delta);
    w = std::fmin(std::fmax(w, 1 - eps_w), 1 + eps_w);
    expect("advantage weight " + std::to_string(i), out_w[i], mask[i] ? w : 1.0, 1e-6, 1e-6);
    expect("advantage " + std::to_string(i), out_a[i], mask[i] ? adv[i] * ((1 - lam) + lam * w) : 0.0, 1e-6, 1e-6);
  }
  delete[] mask;
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  for (int v : {1, 7, 1000, 32003}) {
    for (int shift : {0, 1, 3}) {
      const int grad_shift = shift == 3 ? 2 : 0;  // shift 3: logits and gradient misaligned differently
      check_token_logprobs<float>(v, shift, grad_shift, rng);
      check_token_logprobs<__nv_bfloat16>(v, shift, grad_shift, rng);
      check_token_logprobs<__half>(v, shift, grad_shift, rng);
    }
  }
  check_token_logprobs<__nv_bfloat16>(151936, 1, 0, rng);  // a real vocabulary (Qwen2/3)
  for (int v : {1, 7, 1000, 32003}) {
    check_contrastive<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>(v, rng);
    check_contrastive<float, __nv_bfloat16, __half>(v, rng);
  }
  check_advantage(rng);
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
