// Per-row epilogue kernels of the CPU backend.  Included by rows_{base,avx2,avx512}.cpp inside an anonymous
// namespace, after their standard headers and after any `#pragma GCC target`: include nothing here.
// The math comes from mvloss/epilogue.h; the loops are written so that they vectorise (omp simd).

#if defined(_OPENMP) || defined(MVLOSS_OPENMP_SIMD)
#define MVLOSS_PRAGMA(x) _Pragma(#x)
#define MVLOSS_SIMD MVLOSS_PRAGMA(omp simd)
#define MVLOSS_SIMD_MAX(v) MVLOSS_PRAGMA(omp simd reduction(max : v))
#define MVLOSS_SIMD_SUM(v) MVLOSS_PRAGMA(omp simd reduction(+ : v))
#else
#define MVLOSS_SIMD
#define MVLOSS_SIMD_MAX(v)
#define MVLOSS_SIMD_SUM(v)
#endif

// exp for float, branch-free so that loops calling it vectorise: Cody-Waite reduction, degree-6 polynomial,
// relative error ~1.2e-7 on [-87, 88]; inputs below -87 give ~1.6e-38 instead of a denormal.
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
  float kf = x * kLog2e + kShift;
  const int32_t ki = __builtin_bit_cast(int32_t, kf) - 0x4B400000;
  kf -= kShift;
  float r = x - kf * kLn2Hi;
  r = r - kf * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * __builtin_bit_cast(float, (ki + 127) << 23);
}
inline double fast_exp(double x) { return mv_exp(x); }

// z_j for every column of one row, in place over the raw cosines (the caller fixes up the target column).
template <typename T, int TREAT, bool CLAMP, bool BIAS>
inline void row_logits(T* __restrict__ row, const T* __restrict__ w_inv, const T* __restrict__ bias, int64_t n,
                       T thr, T s, T param) {
  MVLOSS_SIMD
  for (int64_t j = 0; j < n; ++j) {
    row[j] = neg_logit<T>(row[j] * w_inv[j], thr, s, BIAS ? bias[j] : T(0), TREAT, param, CLAMP);
  }
}

template <typename T>
inline T row_max(const T* __restrict__ z, int64_t n) {
  T m = neg_inf<T>();
  MVLOSS_SIMD_MAX(m)
  for (int64_t j = 0; j < n; ++j) m = z[j] > m ? z[j] : m;
  return m;
}

template <typename T>
inline T row_sum(const T* __restrict__ z, int64_t n) {
  T acc = T(0);
  MVLOSS_SIMD_SUM(acc)
  for (int64_t j = 0; j < n; ++j) acc += z[j];
  return acc;
}

template <typename T>
inline T row_sum_exp(const T* __restrict__ z, int64_t n, T m) {
  T acc = T(0);
  MVLOSS_SIMD_SUM(acc)
  for (int64_t j = 0; j < n; ++j) acc += fast_exp(z[j] - m);
  return acc;
}

template <typename T, int TREAT, bool CLAMP, bool BIAS>
void forward_rows(const FwdChunk<T>& a, int64_t r0, int64_t r1) {
  const int64_t n = a.n;
  for (int64_t i = r0; i < r1; ++i) {
    T* row = a.raw + i * n;  // z overwrites the raw cosines in place
    const int64_t y = a.labels[i] - a.c0;
    const bool has_target = y >= 0 && y < n;  // a label outside this chunk (or -1, or out of range): no target
    row_logits<T, TREAT, CLAMP, BIAS>(row, a.w_inv, a.bias, n, a.thr[i], a.scale[i], a.param);
    if (has_target) row[y] = T(0);
    const T zs = row_sum(row, n);
    if (has_target) row[y] = neg_inf<T>();
    const T m = row_max(row, n);
    if (m == neg_inf<T>()) continue;  // no negative in this chunk
    T sum = row_sum_exp(row, n, m);
    if (has_target) sum -= fast_exp(neg_inf<T>() - m);  // the target's clamped exp (~1e-38 in fp32, 0 in fp64)
    LseState<T> st = lse_merge_block(LseState<T>{a.run_max[i], a.run_sum[i]}, m, sum);
    a.run_max[i] = st.max;
    a.run_sum[i] = st.sum;
    a.zsum[i] += zs;
  }
}

// dc_j * w_inv_j (and dz_j) for every column of one row; returns sum_j dz_j u_j when DSCALE.
template <typename T, int TREAT, bool CLAMP, bool BIAS, bool DZ, bool DSCALE>
inline T row_backward(const T* raw, const T* __restrict__ w_inv, const T* __restrict__ bias, T* out,
                      T* __restrict__ dzrow, int64_t n, int64_t y, T thr, T s, T param, T lse, T gl, T gs) {
  T du = T(0);
  MVLOSS_SIMD_SUM(du)
  for (int64_t j = 0; j < n; ++j) {
    const T wi = w_inv[j];
    const T r = raw[j] * wi;
    const T u = treated<T>(clamp_cos<T>(r, CLAMP), thr, TREAT, param);
    const T z = s * u + (BIAS ? bias[j] : T(0));
    const T dz = (j == y) ? T(0) : gl * fast_exp(z - lse) + gs;  // the target column is no negative
    if (DSCALE) du += dz * u;
    if (DZ) dzrow[j] = dz;
    out[j] = neg_dcos<T>(r, dz, thr, s, TREAT, param, CLAMP) * wi;
  }
  return du;
}

template <typename T, int TREAT, bool CLAMP, bool BIAS>
void backward_rows(const BwdChunk<T>& a, int64_t r0, int64_t r1) {
  const int64_t n = a.n;
  for (int64_t i = r0; i < r1; ++i) {
    const T* rrow = a.raw + i * n;
    T* orow = a.out + i * n;
    T* zrow = a.dz ? a.dz + i * n : nullptr;
    const int64_t y = a.labels[i] - a.c0;
    const bool has_target = y >= 0 && y < n;
    T l = a.lse[i], gl = a.g_lse[i];
    if (l == neg_inf<T>()) {  // no negatives at all: p = 0
      l = T(0);
      gl = T(0);
    }
    const T t = a.thr[i], s = a.scale[i], gs = a.g_sum[i];
    const int64_t yy = has_target ? y : -1;
    T du = T(0);
    if (a.dscale) {
      du = zrow ? row_backward<T, TREAT, CLAMP, BIAS, true, true>(rrow, a.w_inv, a.bias, orow, zrow, n, yy, t, s,
                                                                  a.param, l, gl, gs)
                : row_backward<T, TREAT, CLAMP, BIAS, false, true>(rrow, a.w_inv, a.bias, orow, zrow, n, yy, t, s,
                                                                   a.param, l, gl, gs);
    } else {
      zrow ? row_backward<T, TREAT, CLAMP, BIAS, true, false>(rrow, a.w_inv, a.bias, orow, zrow, n, yy, t, s, a.param,
                                                              l, gl, gs)
           : row_backward<T, TREAT, CLAMP, BIAS, false, false>(rrow, a.w_inv, a.bias, orow, zrow, n, yy, t, s,
                                                               a.param, l, gl, gs);
    }
    if (a.dscale) a.dscale[i] += du;
    if (has_target && a.g_cos) orow[y] = target_dcw<T>(a.g_cos[i], a.w_inv[y]);  // was 0: no negative there
  }
}

// Entry points: the (treatment, clamp, bias) switch happens once per chunk, outside the inner loops.
#define MVLOSS_ROWS_CASE_B(F, T, TR, CL) \
  if (a.bias) F<T, TR, CL, true>(a, r0, r1); else F<T, TR, CL, false>(a, r0, r1);
#define MVLOSS_ROWS_CASE_C(F, T, TR) \
  if (a.clamp) { MVLOSS_ROWS_CASE_B(F, T, TR, true) } else { MVLOSS_ROWS_CASE_B(F, T, TR, false) }
#define MVLOSS_ROWS_SWITCH(F, T)                                     \
  switch (a.treatment) {                                             \
    case kNone: MVLOSS_ROWS_CASE_C(F, T, kNone) break;               \
    case kFixed: MVLOSS_ROWS_CASE_C(F, T, kFixed) break;             \
    case kAdaptive: MVLOSS_ROWS_CASE_C(F, T, kAdaptive) break;       \
    case kCurricular: MVLOSS_ROWS_CASE_C(F, T, kCurricular) break;   \
    default: MVLOSS_ROWS_CASE_C(F, T, kFilter) break;                \
  }

template <typename T>
void forward_entry(const FwdChunk<T>& a, int64_t r0, int64_t r1) {
  MVLOSS_ROWS_SWITCH(forward_rows, T)
}

template <typename T>
void backward_entry(const BwdChunk<T>& a, int64_t r0, int64_t r1) {
  MVLOSS_ROWS_SWITCH(backward_rows, T)
}

#undef MVLOSS_ROWS_SWITCH
#undef MVLOSS_ROWS_CASE_C
#undef MVLOSS_ROWS_CASE_B

inline RowKernels make_row_kernels(const char* isa) {
  return RowKernels{isa, &forward_entry<float>, &forward_entry<double>, &backward_entry<float>,
                    &backward_entry<double>};
}
