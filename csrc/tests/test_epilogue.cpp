// Unit tests of csrc/include/mvloss/epilogue.h (plain C++, no dependencies): run by ctest.
#include <cmath>
#include <cstdio>
#include <vector>

#include "mvloss/epilogue.h"

static int failures = 0;

#define CHECK(cond)                                                      \
  do {                                                                   \
    if (!(cond)) {                                                       \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                        \
    }                                                                    \
  } while (0)

#define CHECK_NEAR(a, b, tol) CHECK(std::fabs(double(a) - double(b)) <= (tol) * (1.0 + std::fabs(double(b))))

using namespace mvloss;

static void test_treatments() {
  const double t = 0.2;
  CHECK_NEAR(treat(0.5, kNone, t), 0.5, 1e-15);
  CHECK_NEAR(treat(0.5, kFixed, t), 0.7, 1e-15);
  CHECK_NEAR(treat(0.5, kAdaptive, t), 1.2 * 0.5 + 0.2, 1e-15);
  CHECK_NEAR(treat(0.5, kCurricular, t), 0.5 * (0.2 + 0.5), 1e-15);
  CHECK(treat(0.5, kFilter, t) == 0.0);
  // h' against central differences, every treatment
  for (int tr = kNone; tr <= kFilter; ++tr) {
    for (double c : {-0.9, -0.3, 0.0, 0.4, 0.95}) {
      const double h = 1e-6;
      const double fd = (treat(c + h, tr, t) - treat(c - h, tr, t)) / (2 * h);
      CHECK_NEAR(treat_grad(c, tr, t), fd, 1e-8);
    }
  }
  CHECK(valid_treatment(0) && valid_treatment(4) && !valid_treatment(5) && !valid_treatment(-1));
}

static void test_mask_and_clamp() {
  const double inf = INFINITY;
  CHECK(!is_hard(0.99, inf));
  CHECK(is_hard(0.5, 0.4) && !is_hard(0.4, 0.4));  // strict: c > thr
  CHECK_NEAR(treated(0.5, 0.4, kFixed, 0.2), 0.7, 1e-15);
  CHECK_NEAR(treated(0.3, 0.4, kFixed, 0.2), 0.3, 1e-15);
  CHECK(treated_grad(0.3, 0.4, kCurricular, 0.2) == 1.0);
  CHECK_NEAR(treated_grad(0.5, 0.4, kCurricular, 0.2), 1.2, 1e-15);
  CHECK(clamp_cos(1.5, true) == 1.0 && clamp_cos(-1.5, true) == -1.0 && clamp_cos(1.5, false) == 1.5);
  CHECK(clamp_passes(1.0, true) && !clamp_passes(1.0001, true) && clamp_passes(3.0, false));
  CHECK(neg_dcos(1.5, 2.0, 0.0, 4.0, kAdaptive, 0.2, true) == 0.0);
  CHECK_NEAR(neg_dcos(0.5, 2.0, 0.0, 4.0, kAdaptive, 0.2, true), 2.0 * 4.0 * 1.2, 1e-15);
  CHECK_NEAR(neg_logit(0.5, 0.0, 4.0, 0.25, kFixed, 0.2, false), 4.0 * 0.7 + 0.25, 1e-15);
  CHECK(neg_logit(0.5, 0.0, 4.0, 0.0, kFilter, 0.2, false) == 0.0);
}

template <typename T>
static void test_lse() {
  std::vector<T> z;
  for (int i = 0; i < 1000; ++i) z.push_back(T(40) * std::sin(T(0.37) * i) + T(i % 7));
  double m = -INFINITY, s = 0;
  for (T v : z) m = std::max(m, double(v));
  for (T v : z) s += std::exp(double(v) - m);
  const double want = m + std::log(s);
  // one element at a time
  LseState<T> a = lse_empty<T>();
  for (T v : z) a = lse_push(a, v);
  CHECK_NEAR(lse_finish(a), want, sizeof(T) == 4 ? 1e-6 : 1e-13);
  // in blocks, merged in two different orders
  LseState<T> parts[4] = {lse_empty<T>(), lse_empty<T>(), lse_empty<T>(), lse_empty<T>()};
  for (size_t i = 0; i < z.size(); ++i) parts[i % 4] = lse_push(parts[i % 4], z[i]);
  LseState<T> fwd = lse_empty<T>(), rev = lse_empty<T>();
  for (int k = 0; k < 4; ++k) fwd = lse_merge(fwd, parts[k]);
  for (int k = 3; k >= 0; --k) rev = lse_merge(parts[k], rev);
  CHECK_NEAR(lse_finish(fwd), want, sizeof(T) == 4 ? 1e-6 : 1e-13);
  CHECK_NEAR(lse_finish(rev), want, sizeof(T) == 4 ? 1e-6 : 1e-13);
  // empty states and -inf logits
  CHECK(lse_finish(lse_empty<T>()) == neg_inf<T>());
  LseState<T> e = lse_merge(lse_empty<T>(), lse_empty<T>());
  CHECK(e.max == neg_inf<T>() && e.sum == T(0));
  CHECK(lse_finish(lse_push(lse_empty<T>(), neg_inf<T>())) == neg_inf<T>());
  LseState<T> one = lse_push(lse_empty<T>(), T(3));
  CHECK_NEAR(lse_finish(lse_merge(one, lse_empty<T>())), 3.0, 1e-6);
  CHECK_NEAR(lse_finish(lse_merge_block(lse_empty<T>(), T(2), T(1))), 2.0, 1e-6);
  // huge logits do not overflow
  LseState<T> big = lse_push(lse_push(lse_empty<T>(), T(80)), T(85));
  CHECK_NEAR(lse_finish(big), 85.0 + std::log1p(std::exp(-5.0)), 1e-5);
  CHECK(prob(T(1), neg_inf<T>()) == T(0));
  CHECK_NEAR(prob(T(1), T(1)), 1.0, 1e-7);
}

int main() {
  test_treatments();
  test_mask_and_clamp();
  test_lse<float>();
  test_lse<double>();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("epilogue.h: all checks passed\n");
  return 0;
}
