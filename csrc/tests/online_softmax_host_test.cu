// Host-side test of the math helpers in common.cuh (no GPU needed): the online log-sum-exp and
// entropy state (fold in blocks, merge in any order, -inf entries and all -inf rows) against a
// direct float64 computation, and the CEPO weighting's edge cases. Built and run by
// tests/kernels/test_cuda_compile.py: `nvcc -std=c++20 -Icsrc csrc/tests/online_softmax_host_test.cu`.
// Prints one line per failure and exits non-zero if any check fails.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "common.cuh"

namespace {

int failures = 0;

void expect_close(const char* what, int trial, double got, double want, double atol, double rtol) {
  const bool same_inf = std::isinf(got) && std::isinf(want) && (got > 0) == (want > 0);
  if (same_inf) return;
  if (!(std::fabs(got - want) <= atol + rtol * std::fabs(want))) {
    std::printf("FAIL %s (trial %d): got %.9g, want %.9g\n", what, trial, got, want);
    ++failures;
  }
}

// Direct float64 lse and entropy (nats) of z (natural units).
void direct(const std::vector<double>& z, double* lse, double* entropy) {
  double m = -INFINITY;
  for (double v : z) m = std::fmax(m, v);
  if (m == -INFINITY) {
    *lse = -INFINITY;
    *entropy = 0.0;
    return;
  }
  double s = 0.0;
  for (double v : z) s += std::exp(v - m);
  *lse = m + std::log(s);
  double h = 0.0;
  for (double v : z) {
    const double p = std::exp(v - *lse);
    if (p > 0) h -= p * (v - *lse);
  }
  *entropy = h;
}

// Fold z (natural units, converted to base 2) in blocks of K into `lanes` states assigned
// round-robin, then merge the states pairwise as a warp tree would.
template <int K>
cepo::LseState fold_and_merge(const std::vector<double>& z, int lanes) {
  std::vector<cepo::LseState> st(lanes, cepo::lse_empty());
  const size_t n_blocks = z.size() / K;
  for (size_t b = 0; b < n_blocks; ++b) {
    float block[K];
    for (int k = 0; k < K; ++k) block[k] = static_cast<float>(z[b * K + k]) * cepo::kLog2e;
    cepo::lse_fold<true, K>(st[b % lanes], block);
  }
  for (size_t j = n_blocks * K; j < z.size(); ++j) {
    const float one = static_cast<float>(z[j]) * cepo::kLog2e;
    cepo::lse_fold<true, 1>(st[j % lanes], &one);
  }
  for (int width = lanes / 2; width > 0; width /= 2) {
    for (int i = 0; i < width; ++i) {
      const cepo::LseState a = cepo::lse_merge<true>(st[i], st[i + width]);
      const cepo::LseState b = cepo::lse_merge<true>(st[i + width], st[i]);
      if (a.m != b.m || a.s != b.s || a.a != b.a) {
        std::printf("FAIL merge is not symmetric\n");
        ++failures;
      }
      st[i] = a;
    }
  }
  return st[0];
}

template <int K>
void check_rows(const char* name, std::mt19937& rng) {
  std::normal_distribution<double> normal(0.0, 4.0);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (int trial = 0; trial < 200; ++trial) {
    const int len = 1 + static_cast<int>(unit(rng) * 3000);
    const double p_masked = trial % 4 == 0 ? 0.0 : unit(rng);  // share of -inf entries
    std::vector<double> z(len);
    for (auto& v : z) v = unit(rng) < p_masked ? -INFINITY : static_cast<double>(static_cast<float>(normal(rng)));
    if (trial % 10 == 3) std::fill(z.begin(), z.end(), -INFINITY);  // all -inf row
    if (trial % 10 == 5) {  // peaked row: one +3, the rest -15 (tiny entropy)
      std::fill(z.begin(), z.end(), -15.0);
      z[len / 2] = 3.0;
    }
    if (trial % 10 == 7) std::sort(z.begin(), z.end());  // the max keeps growing: many re-centrings
    const int lanes = 1 << (trial % 6);
    const cepo::LseState st = fold_and_merge<K>(z, lanes);
    double lse, entropy;
    direct(z, &lse, &entropy);
    expect_close(name, trial, cepo::lse2_finish(st) * cepo::kLn2, lse, 2e-5, 2e-6);
    expect_close(name, trial, cepo::entropy_finish(st), entropy, 2e-5, 1e-5);
    if (lse == -INFINITY && !(cepo::entropy_finish(st) == 0.0f)) {
      std::printf("FAIL %s: an all -inf row must give entropy exactly 0\n", name);
      ++failures;
    }
  }
}

void check_weighting() {
  const float lo = 0.8f, hi = 1.2f;
  struct Case {
    float pos, neg, adv, sign;
    bool keep;
    float lam, want_c, want_a;
  };
  const float inf = INFINITY;
  const Case cases[] = {
      {-1.0f, -1.0f, 2.0f, 1.0f, true, 0.5f, 1.0f, 2.0f},            // delta 0: weight 1
      {-1.0f, -3.0f, 2.0f, 1.0f, true, 0.5f, 1.2f, 2.0f * 1.1f},     // exp(2) clipped to hi
      {-1.0f, -3.0f, -2.0f, -1.0f, true, 0.5f, 0.8f, -2.0f * 0.9f},  // exp(-2) clipped to lo
      {-inf, -inf, 2.0f, 1.0f, true, 0.5f, 1.0f, 2.0f},              // NaN delta: weight 1
      {-inf, -1.0f, 2.0f, 1.0f, true, 0.5f, 0.8f, 2.0f * 0.9f},      // delta -inf: lo
      {-1.0f, -inf, 2.0f, -1.0f, true, 0.5f, 0.8f, 2.0f * 0.9f},     // sign -1, delta +inf: lo
      {-1.0f, -3.0f, 0.0f, 0.0f, true, 0.5f, 1.0f, 0.0f},            // sign 0: weight 1
      {-1.0f, -3.0f, 2.0f, 1.0f, false, 0.5f, 1.0f, 0.0f},           // masked
      {-1.0f, -3.0f, 2.5f, 1.0f, true, 0.0f, 1.2f, 2.5f},            // lam 0: A exactly
  };
  int i = 0;
  for (const Case& c : cases) {
    float w, a;
    cepo::contrastive_weight(c.pos, c.neg, c.adv, c.sign, c.keep, c.lam, lo, hi, &w, &a);
    expect_close("weight", i, w, c.want_c, 1e-6, 1e-6);
    expect_close("advantage", i, a, c.want_a, 1e-6, 1e-6);
    if (std::isnan(w) || std::isnan(a)) {
      std::printf("FAIL weighting case %d gives NaN\n", i);
      ++failures;
    }
    ++i;
  }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  check_rows<1>("lse K=1", rng);
  check_rows<8>("lse K=8", rng);
  check_rows<16>("lse K=16", rng);
  check_weighting();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
