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
#include "bf16_gemm.h"
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

// Rows per GEMM block: keeps a block of the cosine chunk (about 4 MB) close between its GEMM and its epilogue, and
// no more than an even share of the rows, so every thread gets a block (one block would run on one thread alone).
int64_t row_block(int64_t n, int64_t rows) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_size = env_int("MVLOSS_CPU_BLOCK_ELEMS", 1024 * 1024) / std::max<int64_t>(n, 1);
  return std::max<int64_t>(1, std::min(by_size, (rows + threads - 1) / threads));
}

// The cosine GEMM of a block of rows, raw[b0:b1] = xhat[b0:b1] @ wc^T: ATen's mm in the acc dtype, or bf16 operands
// on the brgemm micro-kernel (bf16_gemm.h) with wc^T packed once per chunk.
class CosineGemm {
 public:
  CosineGemm(const at::Tensor& xhat, const at::Tensor& wc) : xhat_(xhat), wt_(wc.t()) {
    if (xhat.scalar_type() == at::kBFloat16) packed_.emplace(wt_);
  }
  void operator()(at::Tensor& raw, int64_t b0, int64_t b1) const {
    at::Tensor out = raw.narrow(0, b0, b1 - b0);
    if (packed_) {
      packed_->gemm(b1 - b0, xhat_.data_ptr<at::BFloat16>() + b0 * xhat_.size(1), xhat_.size(1),
                    out.data_ptr<float>(), raw.size(1), false);
    } else {
      at::mm_out(out, xhat_.narrow(0, b0, b1 - b0), wt_);
    }
  }

 private:
  at::Tensor xhat_, wt_;
  c10::optional<PackedB> packed_;
};

// One parallel region per chunk: each thread runs the cosine GEMM of its block of rows into the workspace (ATen
// GEMMs inside a parallel region run single-threaded) and, while the block is warm in cache, ``body(b0, b1)``.
template <typename Body>
void for_each_row_block(const at::Tensor& xhat, const at::Tensor& wc, const ChunkArgs& a, const Body& body) {
  const int64_t rb = row_block(a.n, a.raw.size(0));
  const CosineGemm cosine(xhat, wc);
  at::Tensor raw = a.raw;
  // ATen calls on the pool's threads must see this thread's dispatch state (below autograd, modes, grad mode)
  const at::ThreadLocalState state;
  at::parallel_for(0, a.raw.size(0), rb, [&](int64_t r0, int64_t r1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t b0 = r0; b0 < r1; b0 += rb) {
      const int64_t b1 = std::min(r1, b0 + rb);
      cosine(raw, b0, b1);
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

// With bf16 GEMM operands (xhat, wc, dcw and dct bf16): the epilogue writes dc * w_inv in fp32 over raw, which each
// block then rounds into dcw (for its dxhat GEMM, wc packed once per chunk) and into dct = dcw^T (for the chunk's
// dwhat GEMM), as the CUDA backend's bf16 GEMMs round it.
template <typename T>
void backward_chunk_gemm_t(const at::Tensor& xhat, const at::Tensor& wc, const ChunkArgs& a,
                           const BackwardRowArgs& r, at::Tensor& dcw, at::Tensor& dct, at::Tensor& dz, at::Tensor& ds,
                           at::Tensor& dxhat, void (*fn)(const BwdChunk<T>&, int64_t, int64_t)) {
  const bool bf16 = dcw.scalar_type() == at::kBFloat16;
  T* dc_acc = bf16 ? a.raw.data_ptr<T>() : dcw.data_ptr<T>();
  BwdChunk<T> c{a.raw.data_ptr<T>(), dc_acc, ptr_or_null<T>(dz), ptr_or_null<T>(ds), a.w_inv.data_ptr<T>(),
                ptr_or_null<T>(a.bias), a.labels.data_ptr<int64_t>(), a.thr.data_ptr<T>(), a.scale.data_ptr<T>(),
                r.lse.data_ptr<T>(), r.g_lse.data_ptr<T>(), r.g_sum.data_ptr<T>(), ptr_or_null<T>(r.g_cos),
                static_cast<T>(a.param), a.n, a.c0, a.treatment, a.clamp};
  c10::optional<PackedB> w_packed;
  if (bf16) w_packed.emplace(wc);
  for_each_row_block(xhat, wc, a, [&](int64_t b0, int64_t b1) {
    fn(c, b0, b1);
    if (bf16) {
      at::Tensor rows = dcw.narrow(0, b0, b1 - b0);
      rows.copy_(a.raw.narrow(0, b0, b1 - b0));
      const at::BFloat16* dc_rows = rows.data_ptr<at::BFloat16>();
      transpose_bf16(dc_rows, b1 - b0, a.n, a.n, dct.data_ptr<at::BFloat16>() + b0, dct.size(1));
      w_packed->gemm(b1 - b0, dc_rows, a.n, dxhat.data_ptr<float>() + b0 * dxhat.size(1), dxhat.size(1), true);
    } else {
      dxhat.narrow(0, b0, b1 - b0).addmm_(dcw.narrow(0, b0, b1 - b0), wc);
    }
  });
}

// dwhat rows of a chunk: dw_rows = dcw^T @ xhat (bf16 operands: dct on the micro-kernel, xhat packed).
void weight_grad_gemm_cpu(const at::Tensor& dcw, const at::Tensor& dct, const at::Tensor& xhat, at::Tensor& dw_rows) {
  if (dcw.scalar_type() != at::kBFloat16) {
    at::mm_out(dw_rows, dcw.t(), xhat);
    return;
  }
  const PackedB x_packed(xhat);
  x_packed.gemm_parallel(dct.size(0), dct.data_ptr<at::BFloat16>(), dct.size(1), dw_rows.data_ptr<float>(),
                         dw_rows.size(1), false);
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
  // bf16 operands on the brgemm micro-kernel where this CPU packs them (bf16_gemm.h); otherwise chunks are upcast
  static bool gemm_in_16bit(at::ScalarType st) {
    return st == at::kBFloat16 && row_block_gemm() && bf16_gemm_enabled();
  }
  static void weight_grad_gemm(const at::Tensor& dcw, const at::Tensor& dct, const at::Tensor& xhat,
                               at::Tensor& dw_rows) {
    weight_grad_gemm_cpu(dcw, dct, xhat, dw_rows);
  }
  static void forward_chunk_gemm(const at::Tensor& xhat, const at::Tensor& wc, const ChunkArgs& a, at::Tensor& m,
                                 at::Tensor& s, at::Tensor& z) {
    if (a.raw.scalar_type() == at::kDouble) {
      forward_chunk_gemm_t<double>(xhat, wc, a, m, s, z, kernels().fwd_d);
    } else {
      forward_chunk_gemm_t<float>(xhat, wc, a, m, s, z, kernels().fwd_f);
    }
  }
  static void backward_chunk_gemm(const at::Tensor& xhat, const at::Tensor& wc, const ChunkArgs& a,
                                  const BackwardRowArgs& r, at::Tensor& dcw, at::Tensor& dct, at::Tensor& dz,
                                  at::Tensor& ds, at::Tensor& dxhat) {
    if (a.raw.scalar_type() == at::kDouble) {
      backward_chunk_gemm_t<double>(xhat, wc, a, r, dcw, dct, dz, ds, dxhat, kernels().bwd_d);
    } else {
      backward_chunk_gemm_t<float>(xhat, wc, a, r, dcw, dct, dz, ds, dxhat, kernels().bwd_f);
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
