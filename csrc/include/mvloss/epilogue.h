// mvloss epilogue math, shared by the CPU and CUDA backends (see mvloss/negatives.py for the contract).
//
// Everything a fused backend does per cosine entry lives here, written once:
//   c  = clamp?(raw)                        clamp_cos / clamp_passes
//   u  = c > thr ? h(c) : c                  is_hard / treat / treated
//   du/dc = c > thr ? h'(c) : 1              treat_grad / treated_grad
//   running (max, sum exp) merge             lse_push / lse_merge / lse_finish
//   the weight rows' normalisation backward  target_dcw / norm_backward_projects / norm_backward_entry
// Functions are templates over the accumulation type (float, or double for fp64 inputs) and are
// __host__ __device__ when compiled by nvcc; plain inline C++ otherwise.
#pragma once

#include <cmath>
#include <cstdint>
#include <math.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MVLOSS_HD __host__ __device__ __forceinline__
#else
#define MVLOSS_HD inline
#endif

namespace mvloss {

// Treatment codes: identical to mvloss.negatives.Treatment.
enum Treatment : int { kNone = 0, kFixed = 1, kAdaptive = 2, kCurricular = 3, kFilter = 4 };

MVLOSS_HD bool valid_treatment(int64_t t) { return t >= kNone && t <= kFilter; }

// h(c)
template <typename T>
MVLOSS_HD T treat(T c, int treatment, T param) {
  switch (treatment) {
    case kFixed: return c + param;
    case kAdaptive: return (param + T(1)) * c + param;
    case kCurricular: return c * (param + c);
    case kFilter: return T(0);
    default: return c;
  }
}

// h'(c)
template <typename T>
MVLOSS_HD T treat_grad(T c, int treatment, T param) {
  switch (treatment) {
    case kAdaptive: return param + T(1);
    case kCurricular: return param + T(2) * c;
    case kFilter: return T(0);
    default: return T(1);  // none, fixed
  }
}

// The MV mask: a negative is re-weighted when its cosine exceeds the row threshold (thr = +inf: never).
template <typename T>
MVLOSS_HD bool is_hard(T c, T thr) { return c > thr; }

// u = c > thr ? h(c) : c
template <typename T>
MVLOSS_HD T treated(T c, T thr, int treatment, T param) {
  return is_hard(c, thr) ? treat(c, treatment, param) : c;
}

// du/dc
template <typename T>
MVLOSS_HD T treated_grad(T c, T thr, int treatment, T param) {
  return is_hard(c, thr) ? treat_grad(c, treatment, param) : T(1);
}

// Optional clamp of the cosine to [-1, 1] and whether the gradient passes it.
template <typename T>
MVLOSS_HD T clamp_cos(T raw, bool clamp) {
  if (!clamp) return raw;
  return raw < T(-1) ? T(-1) : (raw > T(1) ? T(1) : raw);
}

template <typename T>
MVLOSS_HD bool clamp_passes(T raw, bool clamp) { return !clamp || (raw >= T(-1) && raw <= T(1)); }

// exp / log overloads usable from host and device code.
MVLOSS_HD float mv_exp(float x) { return ::expf(x); }
MVLOSS_HD double mv_exp(double x) { return ::exp(x); }
MVLOSS_HD float mv_log(float x) { return ::logf(x); }
MVLOSS_HD double mv_log(double x) { return ::log(x); }

template <typename T>
MVLOSS_HD T neg_inf() { return static_cast<T>(-INFINITY); }

// Online log-sum-exp state: lse = max + log(sum), sum relative to max.  Empty state: (-inf, 0).
template <typename T>
struct LseState {
  T max;
  T sum;
};

template <typename T>
MVLOSS_HD LseState<T> lse_empty() { return LseState<T>{neg_inf<T>(), T(0)}; }

// exp(a - m) where m may be -inf (then the state is empty and the factor is irrelevant: return 0).
template <typename T>
MVLOSS_HD T lse_rescale(T a, T m) {
  return (a == neg_inf<T>()) ? T(0) : mv_exp((a - m));
}

// Merge two partial states (associative and commutative).
template <typename T>
MVLOSS_HD LseState<T> lse_merge(LseState<T> a, LseState<T> b) {
  const T m = a.max > b.max ? a.max : b.max;
  if (m == neg_inf<T>()) return lse_empty<T>();
  return LseState<T>{m, a.sum * lse_rescale(a.max, m) + b.sum * lse_rescale(b.max, m)};
}

// Fold one logit into a state (one exp per element).
template <typename T>
MVLOSS_HD LseState<T> lse_push(LseState<T> s, T z) {
  if (z == neg_inf<T>()) return s;
  if (z > s.max) {
    return LseState<T>{z, s.sum * lse_rescale(s.max, z) + T(1)};
  }
  return LseState<T>{s.max, s.sum + mv_exp((z - s.max))};
}

// Merge a block summarised by its max and its sum of exp(z - block_max).
template <typename T>
MVLOSS_HD LseState<T> lse_merge_block(LseState<T> s, T block_max, T block_sum) {
  return lse_merge(s, LseState<T>{block_max, block_sum});
}

template <typename T>
MVLOSS_HD T lse_finish(LseState<T> s) {
  return s.sum > T(0) ? s.max + mv_log((s.sum)) : neg_inf<T>();
}

// Softmax probability of a logit given the row's lse (0 for an empty row, lse = -inf).
template <typename T>
MVLOSS_HD T prob(T z, T lse) {
  return lse == neg_inf<T>() ? T(0) : mv_exp((z - lse));
}

// The whole per-entry forward: logit z of a negative from its raw cosine (already scaled by both inverse norms).
template <typename T>
MVLOSS_HD T neg_logit(T raw, T thr, T scale, T bias, int treatment, T param, bool clamp) {
  return scale * treated(clamp_cos(raw, clamp), thr, treatment, param) + bias;
}

// The per-entry backward: dc from dz.
template <typename T>
MVLOSS_HD T neg_dcos(T raw, T dz, T thr, T scale, int treatment, T param, bool clamp) {
  if (!clamp_passes(raw, clamp)) return T(0);
  return dz * scale * treated_grad(clamp_cos(raw, clamp), thr, treatment, param);
}

// The target column's entry of dc * w_inv in a fused weight gradient: g_cos_i (the upstream gradient of the raw target
// cosine) times w_inv_y, so the backward's own dx and dW GEMMs carry the target column (no separate B x D pass).
template <typename T>
MVLOSS_HD T target_dcw(T g_cos, T w_inv) { return g_cos * w_inv; }

// Normalisation backward of one weight row, given v = w_inv * dwhat (what G^T x-hat gives) and dot = v . w-hat:
// d/dw of w / max(|w|, eps) is w_inv (dwhat - (dwhat . w-hat) w-hat) above eps and w_inv dwhat below it, which is
// v - dot * w-hat, or v (no rescaling either way).
template <typename T>
MVLOSS_HD bool norm_backward_projects(T w_inv, T eps, bool normalize) { return normalize && T(1) / w_inv > eps; }

template <typename T>
MVLOSS_HD T norm_backward_entry(T v, T dot, T what, bool project) { return project ? v - dot * what : v; }

}  // namespace mvloss
