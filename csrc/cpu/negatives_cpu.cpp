// CPU backend of the negatives contract (mvloss/negatives.py): ATen GEMMs per class chunk (csrc/include/mvloss/
// driver.h) + a fused C++ epilogue (mask, treatment h, scale, bias, online log-sum-exp / dc; rows_impl.h, built for
// baseline x86-64, AVX2 and AVX-512 and chosen at run time) parallelised over rows with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "mvloss/driver.h"
#include "mvloss/epilogue.h"
#include "rows_api.h"

namespace mvloss {
namespace cpu {
namespace {

bool isa_supported(const std::string& isa) {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  __builtin_cpu_init();
  if (isa == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  }
  if (isa == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
           __builtin_cpu_supports("f16c");
  }
#endif
  return isa == "base" || isa == "baseline";
}

// The widest epilogue build this CPU runs; MVLOSS_CPU_ISA=base|avx2|avx512 caps it.
RowKernels pick_kernels() {
  const char* env = std::getenv("MVLOSS_CPU_ISA");
  const std::string cap = env ? env : "";
  const bool allow512 = cap.empty() || cap == "avx512";
  const bool allow2 = allow512 || cap == "avx2";
  RowKernels k = row_kernels_avx512();
  if (allow512 && k.fwd_f != nullptr && isa_supported("avx512")) return k;
  k = row_kernels_avx2();
  if (allow2 && k.fwd_f != nullptr && isa_supported("avx2")) return k;
  return row_kernels_base();
}

const RowKernels& kernels() {
  static const RowKernels k = pick_kernels();
  return k;
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

template <typename T>
void forward_chunk_t(const ChunkArgs& a, at::Tensor& m, at::Tensor& s, at::Tensor& z,
                     void (*fn)(const FwdChunk<T>&, int64_t, int64_t)) {
  FwdChunk<T> c{a.raw.data_ptr<T>(), a.w_inv.data_ptr<T>(), ptr_or_null<T>(a.bias), a.labels.data_ptr<int64_t>(),
                a.thr.data_ptr<T>(), a.scale.data_ptr<T>(), m.data_ptr<T>(), s.data_ptr<T>(), z.data_ptr<T>(),
                static_cast<T>(a.param), a.n, a.c0, a.treatment, a.clamp};
  at::parallel_for(0, a.raw.size(0), row_grain(a.n), [&](int64_t r0, int64_t r1) { fn(c, r0, r1); });
}

template <typename T>
void backward_chunk_t(const ChunkArgs& a, const BackwardRowArgs& r, at::Tensor& dcw, at::Tensor& dz,
                      at::Tensor& ds, void (*fn)(const BwdChunk<T>&, int64_t, int64_t)) {
  BwdChunk<T> c{a.raw.data_ptr<T>(), dcw.data_ptr<T>(), ptr_or_null<T>(dz), ptr_or_null<T>(ds), a.w_inv.data_ptr<T>(),
                ptr_or_null<T>(a.bias), a.labels.data_ptr<int64_t>(), a.thr.data_ptr<T>(), a.scale.data_ptr<T>(),
                r.lse.data_ptr<T>(), r.g_lse.data_ptr<T>(), r.g_sum.data_ptr<T>(), ptr_or_null<T>(r.g_cos),
                static_cast<T>(a.param), a.n, a.c0, a.treatment, a.clamp};
  at::parallel_for(0, a.raw.size(0), row_grain(a.n), [&](int64_t r0, int64_t r1) { fn(c, r0, r1); });
}

// Rows per GEMM block: keeps a block of the cosine chunk (about 4 MB) close between its GEMM and its epilogue.
int64_t row_block(int64_t n) {
  return std::max<int64_t>(1, env_int("MVLOSS_CPU_BLOCK_ELEMS", 1024 * 1024) / std::max<int64_t>(n, 1));
}

// One parallel region per chunk: each thread runs the cosine GEMM of its block of rows into the workspace (ATen
// GEMMs inside a parallel region run single-threaded) and, while the block is warm in cache, ``body(b0, b1)``.
template <typename Body>
void for_each_row_block(const at::Tensor& xhat, const at::Tensor& wc, const ChunkArgs& a, const Body& body) {
  const int64_t rb = row_block(a.n);
  const at::Tensor wt = wc.t();
  // ATen calls on the pool's threads must see this thread's dispatch state (below autograd, modes, grad mode)
  const at::ThreadLocalState state;
  at::parallel_for(0, a.raw.size(0), rb, [&](int64_t r0, int64_t r1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t b0 = r0; b0 < r1; b0 += rb) {
      const int64_t b1 = std::min(r1, b0 + rb);
      at::Tensor out = a.raw.narrow(0, b0, b1 - b0);
      at::mm_out(out, xhat.narrow(0, b0, b1 - b0), wt);
      body(b0, b1);
    }
  });
}

template <typename T>
void forward_chunk_gemm_t(const at::Tensor& xhat, const at::Tensor& wc, const ChunkArgs& a, at::Tensor& m,
                          at::Tensor& s, at::Tensor& z, void (*fn)(const FwdChunk<T>&, int64_t, int64_t)) {
  FwdChunk<T> c{a.raw.data_ptr<T>(), a.w_inv.data_ptr<T>(), ptr_or_null<T>(a.bias), a.labels.data_ptr<int64_t>(),
                a.thr.data_ptr<T>(), a.scale.data_ptr<T>(), m.data_ptr<T>(), s.data_ptr<T>(), z.data_ptr<T>(),
                static_cast<T>(a.param), a.n, a.c0, a.treatment, a.clamp};
  for_each_row_block(xhat, wc, a, [&](int64_t b0, int64_t b1) { fn(c, b0, b1); });
}

template <typename T>
void backward_chunk_gemm_t(const at::Tensor& xhat, const at::Tensor& wc, const ChunkArgs& a,
                           const BackwardRowArgs& r, at::Tensor& dcw, at::Tensor& dz, at::Tensor& ds,
                           at::Tensor& dxhat, void (*fn)(const BwdChunk<T>&, int64_t, int64_t)) {
  BwdChunk<T> c{a.raw.data_ptr<T>(), dcw.data_ptr<T>(), ptr_or_null<T>(dz), ptr_or_null<T>(ds), a.w_inv.data_ptr<T>(),
                ptr_or_null<T>(a.bias), a.labels.data_ptr<int64_t>(), a.thr.data_ptr<T>(), a.scale.data_ptr<T>(),
                r.lse.data_ptr<T>(), r.g_lse.data_ptr<T>(), r.g_sum.data_ptr<T>(), ptr_or_null<T>(r.g_cos),
                static_cast<T>(a.param), a.n, a.c0, a.treatment, a.clamp};
  for_each_row_block(xhat, wc, a, [&](int64_t b0, int64_t b1) {
    fn(c, b0, b1);
    dxhat.narrow(0, b0, b1 - b0).addmm_(dcw.narrow(0, b0, b1 - b0), wc);
  });
}

// A class chunk's weight rows through the normalisation backward (epilogue.h): v = w_inv * dwhat (n x D, acc),
// w (n x D, W's dtype), out like w (or v itself, when W is in the acc dtype); one pass, rows in parallel.
template <typename T, typename W>
void finish_rows(const T* v, const W* w, const T* w_inv, W* out, int64_t n, int64_t D, T eps, bool normalize) {
  at::parallel_for(0, n, row_grain(D), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const T* vk = v + k * D;
      const W* wk = w + k * D;
      W* ok = out + k * D;
      const T inv = w_inv[k];
      const bool project = norm_backward_projects<T>(inv, eps, normalize);
      T dot = T(0);
      if (project) {
        for (int64_t j = 0; j < D; ++j) dot += vk[j] * (static_cast<T>(wk[j]) * inv);
      }
      for (int64_t j = 0; j < D; ++j) {
        ok[j] = static_cast<W>(norm_backward_entry<T>(vk[j], dot, static_cast<T>(wk[j]) * inv, project));
      }
    }
  });
}

template <typename T>
void finish_w_t(const at::Tensor& v, const at::Tensor& w, const at::Tensor& w_inv, double eps, bool normalize,
                at::Tensor& out) {
  const at::Tensor wc = w.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "mvloss_cpu_finish_w", [&] {
    finish_rows<T, scalar_t>(v.data_ptr<T>(), wc.data_ptr<scalar_t>(), w_inv.data_ptr<T>(), out.data_ptr<scalar_t>(),
                             v.size(0), v.size(1), static_cast<T>(eps), normalize);
  });
}

struct CpuEpilogue {
  // MVLOSS_CPU_ROW_BLOCK_GEMM=0: one multi-threaded GEMM per chunk, then the epilogue (more parallel regions).
  static bool row_block_gemm() {
    const char* v = std::getenv("MVLOSS_CPU_ROW_BLOCK_GEMM");
    return v == nullptr || std::string(v) != "0";
  }
  static bool gemm_in_16bit(at::ScalarType) { return false; }  // upcast chunks: fp32 GEMMs are exact on CPU
  static void forward_chunk_gemm(const at::Tensor& xhat, const at::Tensor& wc, const ChunkArgs& a, at::Tensor& m,
                                 at::Tensor& s, at::Tensor& z) {
    if (a.raw.scalar_type() == at::kDouble) {
      forward_chunk_gemm_t<double>(xhat, wc, a, m, s, z, kernels().fwd_d);
    } else {
      forward_chunk_gemm_t<float>(xhat, wc, a, m, s, z, kernels().fwd_f);
    }
  }
  static void backward_chunk_gemm(const at::Tensor& xhat, const at::Tensor& wc, const ChunkArgs& a,
                                  const BackwardRowArgs& r, at::Tensor& dcw, at::Tensor& dz, at::Tensor& ds,
                                  at::Tensor& dxhat) {
    if (a.raw.scalar_type() == at::kDouble) {
      backward_chunk_gemm_t<double>(xhat, wc, a, r, dcw, dz, ds, dxhat, kernels().bwd_d);
    } else {
      backward_chunk_gemm_t<float>(xhat, wc, a, r, dcw, dz, ds, dxhat, kernels().bwd_f);
    }
  }
  static int64_t workspace_elems() { return env_int("MVLOSS_CPU_WORKSPACE_ELEMS", 2 * 1024 * 1024); }
  static void finish_w(const at::Tensor& v, const at::Tensor& w, const at::Tensor& w_inv, double eps, bool normalize,
                       at::Tensor& out) {
    if (v.scalar_type() == at::kDouble) {
      finish_w_t<double>(v, w, w_inv, eps, normalize, out);
    } else {
      finish_w_t<float>(v, w, w_inv, eps, normalize, out);
    }
  }
  static void forward_chunk(const ChunkArgs& a, at::Tensor& m, at::Tensor& s, at::Tensor& z) {
    if (a.raw.scalar_type() == at::kDouble) {
      forward_chunk_t<double>(a, m, s, z, kernels().fwd_d);
    } else {
      forward_chunk_t<float>(a, m, s, z, kernels().fwd_f);
    }
  }
  static void backward_chunk(const ChunkArgs& a, const BackwardRowArgs& r, at::Tensor& dcw, at::Tensor& dz,
                             at::Tensor& ds) {
    if (a.raw.scalar_type() == at::kDouble) {
      backward_chunk_t<double>(a, r, dcw, dz, ds, kernels().bwd_d);
    } else {
      backward_chunk_t<float>(a, r, dcw, dz, ds, kernels().bwd_f);
    }
  }
};

}  // namespace

std::string cpu_isa() { return kernels().isa; }

namespace {

std::tuple<at::Tensor, at::Tensor> neg_forward_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& x_inv,
                                                   const at::Tensor& w_inv, const at::Tensor& labels,
                                                   const at::Tensor& thr, const at::Tensor& scale,
                                                   const c10::optional<at::Tensor>& bias, int64_t treatment,
                                                   double param, bool clamp, int64_t chunk) {
  return Driver<CpuEpilogue>::forward(x, w, x_inv, w_inv, labels, thr, scale, bias, treatment, param, clamp, chunk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> neg_backward_cpu(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& x_inv, const at::Tensor& w_inv,
    const at::Tensor& labels, const at::Tensor& thr, const at::Tensor& scale, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lse, const at::Tensor& g_lse, const at::Tensor& g_sum, int64_t treatment, double param,
    bool clamp, bool need_dscale, bool need_dbias, int64_t chunk) {
  return Driver<CpuEpilogue>::backward(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, treatment,
                                       param, clamp, need_dscale, need_dbias, chunk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> neg_backward_w_cpu(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& x_inv, const at::Tensor& w_inv,
    const at::Tensor& labels, const at::Tensor& thr, const at::Tensor& scale, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lse, const at::Tensor& g_lse, const at::Tensor& g_sum, const at::Tensor& g_cos,
    int64_t treatment, double param, bool clamp, bool need_dscale, bool need_dbias, bool normalize_w, double eps,
    int64_t chunk) {
  return Driver<CpuEpilogue>::backward_w(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, g_cos,
                                         treatment, param, clamp, need_dscale, need_dbias, normalize_w, eps, chunk);
}

}  // namespace
}  // namespace cpu
}  // namespace mvloss

TORCH_LIBRARY_IMPL(mvloss, CPU, m) {
  m.impl("neg_forward", &mvloss::cpu::neg_forward_cpu);
  m.impl("neg_backward", &mvloss::cpu::neg_backward_cpu);
  m.impl("neg_backward_w", &mvloss::cpu::neg_backward_w_cpu);
}
