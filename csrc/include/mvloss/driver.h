// The class-chunk loop shared by the CPU and CUDA backends (host code, ATen only).
//
// Per chunk of n classes: raw = xhat_g @ w_g[c0:c0+n]^T by an ATen GEMM (MKL / cuBLAS) into a bounded B x n
// workspace, then the backend's fused epilogue (Epi) turns raw into logits and folds them into per-row online
// (max, sum-exp) states (forward), or into dc (backward), followed by two more GEMMs for dxhat and dwhat.
// Nothing of size B x C is allocated.  Epi supplies:
//   static bool gemm_in_16bit(at::ScalarType)            // GEMM directly in fp16/bf16 with an fp32 result?
//   static bool row_block_gemm()                         // true: forward_chunk_gemm / backward_chunk_gemm run the
//                                                        //   cosine (and dxhat) GEMMs themselves, per row block,
//                                                        //   and weight_grad_gemm(dcw, dct, xhat, dw_rows) the
//                                                        //   dwhat one (dct: dcw transposed, 16-bit GEMMs only)
//   static void forward_chunk(const ChunkArgs&, at::Tensor& run_max, at::Tensor& run_sum, at::Tensor& zsum)
//   static void backward_chunk(const ChunkArgs&, const BackwardRowArgs&, at::Tensor& dcw, at::Tensor& dz,
//                              at::Tensor& dscale)
//   static void finish_w(const at::Tensor& v, const at::Tensor& w_rows, const at::Tensor& w_inv_rows, double eps,
//                        bool normalize, at::Tensor& out)     // fused weight gradient: one class chunk's
//                                                            //   normalisation backward (epilogue.h), W's dtype;
//                                                            //   out may be v itself (W in the acc dtype)
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <tuple>

#include "mvloss/epilogue.h"

namespace mvloss {

// One chunk of classes [c0, c0 + n): raw cosines (B x n, contiguous, acc dtype; not yet scaled by w_inv).
struct ChunkArgs {
  at::Tensor raw;      // (B, n) acc dtype, contiguous: xhat_i . w_k
  at::Tensor w_inv;    // (n,) acc
  at::Tensor labels;   // (B,) int64 (global class ids; -1 or out of range: no target)
  at::Tensor thr;      // (B,) acc
  at::Tensor scale;    // (B,) acc
  at::Tensor bias;     // (n,) acc, or undefined
  int64_t c0;
  int64_t n;
  int treatment;
  double param;
  bool clamp;
};

struct BackwardRowArgs {
  at::Tensor lse;      // (B,) acc
  at::Tensor g_lse;    // (B,) acc
  at::Tensor g_sum;    // (B,) acc
  at::Tensor g_cos;    // (B,) acc, or undefined: the target column's gradient, written into dc (fused dW only)
};

// The fused weight gradient's finish: W's gradient in W's dtype, each class chunk through the normalisation backward.
struct FinishW {
  at::Tensor w_out;    // (C, D) like W
  double eps;
  bool normalize;
};

inline int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  long long parsed = std::strtoll(v, &end, 10);
  return (end != v && parsed > 0) ? static_cast<int64_t>(parsed) : fallback;
}

// Classes per chunk: an explicit chunk, else workspace_elems / B (the workspace never depends on C).
inline int64_t chunk_columns(int64_t batch, int64_t classes, int64_t chunk, int64_t workspace_elems) {
  int64_t n = chunk > 0 ? chunk : workspace_elems / std::max<int64_t>(batch, 1);
  n = std::max<int64_t>(n, 1);
  return std::min<int64_t>(n, std::max<int64_t>(classes, 1));
}

inline void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& x_inv,
                         const at::Tensor& w_inv, const at::Tensor& labels, const at::Tensor& thr,
                         const at::Tensor& scale, const c10::optional<at::Tensor>& bias, int64_t treatment) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "mvloss: x and w must be 2-D, got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), "mvloss: feature dims differ: ", x.size(1), " vs ", w.size(1));
  const int64_t B = x.size(0), C = w.size(0);
  TORCH_CHECK(x.is_floating_point() && w.is_floating_point(), "mvloss: x and w must be floating tensors");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (auto* t : {&x_inv, &thr, &scale}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, "mvloss: per-row vectors must have shape (", B, ",), got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == acc, "mvloss: per-row vectors must be ", acc, ", got ", t->scalar_type());
  }
  TORCH_CHECK(w_inv.dim() == 1 && w_inv.size(0) == C, "mvloss: w_inv must have shape (", C, ",)");
  TORCH_CHECK(w_inv.scalar_type() == acc, "mvloss: w_inv must be ", acc);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == B && labels.scalar_type() == at::kLong,
              "mvloss: labels must be int64 of shape (", B, ",)");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, "mvloss: bias must have shape (", C, ",)");
    TORCH_CHECK(bias->is_floating_point(), "mvloss: bias must be floating");
  }
  TORCH_CHECK(valid_treatment(treatment), "mvloss: unknown treatment code ", treatment);
  for (auto* t : {&w, &x_inv, &w_inv, &labels, &thr, &scale}) {
    TORCH_CHECK(t->device() == x.device(), "mvloss: all inputs must be on ", x.device(), ", got ", t->device());
  }
}

template <class Epi>
struct Driver {
  struct Prepared {
    at::ScalarType acc, gemm;
    at::Tensor xhat;     // (B, D) gemm dtype
    at::Tensor w_inv, labels, thr, scale, bias;
    int64_t B, C, D, n;
  };

  static Prepared prepare(const at::Tensor& x, const at::Tensor& w, const at::Tensor& x_inv, const at::Tensor& w_inv,
                          const at::Tensor& labels, const at::Tensor& thr, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& bias, int64_t treatment, int64_t chunk) {
    check_inputs(x, w, x_inv, w_inv, labels, thr, scale, bias, treatment);
    Prepared p;
    p.acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
    p.gemm = (half && w.scalar_type() == x.scalar_type() && Epi::gemm_in_16bit(x.scalar_type())) ? x.scalar_type()
                                                                                                 : p.acc;
    p.B = x.size(0);
    p.C = w.size(0);
    p.D = x.size(1);
    p.xhat = (x.to(p.acc) * x_inv.unsqueeze(1)).to(p.gemm).contiguous();
    p.w_inv = w_inv.contiguous();
    p.labels = labels.contiguous();
    p.thr = thr.contiguous();
    p.scale = scale.contiguous();
    if (bias.has_value() && bias->defined()) p.bias = bias->to(p.acc).contiguous();
    p.n = chunk_columns(p.B, p.C, chunk, Epi::workspace_elems());
    return p;
  }

  // w[c0:c0+n] in the GEMM dtype (a view when it already is; else converted into `buf`).
  static at::Tensor weight_chunk(const at::Tensor& w, const Prepared& p, int64_t c0, int64_t n, at::Tensor& buf) {
    at::Tensor chunk = w.narrow(0, c0, n);
    if (chunk.scalar_type() == p.gemm) return chunk;
    if (!buf.defined()) buf = at::empty({p.n * p.D}, w.options().dtype(p.gemm));
    at::Tensor out = buf.narrow(0, 0, n * p.D).view({n, p.D});
    out.copy_(chunk);
    return out;
  }

  static at::Tensor view2d(at::Tensor& buf, int64_t rows, int64_t cols) {
    return buf.narrow(0, 0, rows * cols).view({rows, cols});
  }

  // acc += a @ b for 16-bit a, b and an fp32 acc: one GEMM with beta = 1 and an fp32 result where this torch has
  // addmm with out_dtype for them, else a GEMM into tmp and an add (the argument checks throw before any launch).
  static void add_half_gemm(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b, at::Tensor& tmp) {
    static bool fused = true;
    if (fused) {
      try {
        at::addmm_out(acc, acc, a, b, acc.scalar_type());
        return;
      } catch (const std::exception&) {  // c10::Error and its NotImplementedError
        fused = false;
      }
    }
    at::mm_out(tmp, a, b, acc.scalar_type());
    acc.add_(tmp);
  }

  // raw = xhat @ wc^T in the acc dtype, into the workspace.
  static void cosine_gemm(const Prepared& p, const at::Tensor& wc, at::Tensor& raw) {
    if (p.gemm == p.acc) {
      at::mm_out(raw, p.xhat, wc.t());
    } else {
      at::mm_out(raw, p.xhat, wc.t(), p.acc);
    }
  }

  static ChunkArgs chunk_args(const Prepared& p, at::Tensor raw, int64_t c0, int64_t n, int64_t treatment,
                              double param, bool clamp) {
    ChunkArgs a;
    a.raw = raw;
    a.w_inv = p.w_inv.narrow(0, c0, n);
    a.labels = p.labels;
    a.thr = p.thr;
    a.scale = p.scale;
    if (p.bias.defined()) a.bias = p.bias.narrow(0, c0, n);
    a.c0 = c0;
    a.n = n;
    a.treatment = static_cast<int>(treatment);
    a.param = param;
    a.clamp = clamp;
    return a;
  }

  static std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& x_inv,
                                                    const at::Tensor& w_inv, const at::Tensor& labels,
                                                    const at::Tensor& thr, const at::Tensor& scale,
                                                    const c10::optional<at::Tensor>& bias, int64_t treatment,
                                                    double param, bool clamp, int64_t chunk) {
    Prepared p = prepare(x, w, x_inv, w_inv, labels, thr, scale, bias, treatment, chunk);
    auto vec = x.options().dtype(p.acc);
    at::Tensor run_max = at::full({p.B}, -INFINITY, vec);
    at::Tensor run_sum = at::zeros({p.B}, vec);
    at::Tensor zsum = at::zeros({p.B}, vec);
    if (p.B == 0) return {run_max, zsum};
    at::Tensor ws = at::empty({p.B * p.n}, vec);
    at::Tensor wbuf;
    for (int64_t c0 = 0; c0 < p.C; c0 += p.n) {
      const int64_t n = std::min(p.n, p.C - c0);
      at::Tensor raw = view2d(ws, p.B, n);
      at::Tensor wc = weight_chunk(w, p, c0, n, wbuf);
      if (Epi::row_block_gemm()) {  // the epilogue runs the cosine GEMM itself, block of rows by block
        Epi::forward_chunk_gemm(p.xhat, wc, chunk_args(p, raw, c0, n, treatment, param, clamp), run_max, run_sum,
                                zsum);
      } else {
        cosine_gemm(p, wc, raw);
        Epi::forward_chunk(chunk_args(p, raw, c0, n, treatment, param, clamp), run_max, run_sum, zsum);
      }
    }
    at::Tensor lse = at::where(run_sum > 0, run_max + at::log(run_sum), at::full({}, -INFINITY, vec));
    return {lse, zsum};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& x, const at::Tensor& w, const at::Tensor& x_inv, const at::Tensor& w_inv,
      const at::Tensor& labels, const at::Tensor& thr, const at::Tensor& scale, const c10::optional<at::Tensor>& bias,
      const at::Tensor& lse, const at::Tensor& g_lse, const at::Tensor& g_sum, int64_t treatment, double param,
      bool clamp, bool need_dscale, bool need_dbias, int64_t chunk) {
    Prepared p = prepare(x, w, x_inv, w_inv, labels, thr, scale, bias, treatment, chunk);
    BackwardRowArgs rows = row_args(p, x, lse, g_lse, g_sum, nullptr);
    return run_backward(p, w, rows, treatment, param, clamp, need_dscale, need_dbias, nullptr);
  }

  // The backward of a training step: dxhat and W's gradient (W's dtype, through the normalisation backward, finished
  // per class chunk: no C x D fp32 buffer), both with the target column's gradient g_cos (at labels_i, none where
  // the label is -1) carried by the chunk GEMMs.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_w(
      const at::Tensor& x, const at::Tensor& w, const at::Tensor& x_inv, const at::Tensor& w_inv,
      const at::Tensor& labels, const at::Tensor& thr, const at::Tensor& scale, const c10::optional<at::Tensor>& bias,
      const at::Tensor& lse, const at::Tensor& g_lse, const at::Tensor& g_sum, const at::Tensor& g_cos,
      int64_t treatment, double param, bool clamp, bool need_dscale, bool need_dbias, bool normalize_w, double eps,
      int64_t chunk) {
    Prepared p = prepare(x, w, x_inv, w_inv, labels, thr, scale, bias, treatment, chunk);
    // a chunk's fp32 weight gradient (n x D) stays within the workspace size too
    if (chunk <= 0) p.n = std::min(p.n, std::max<int64_t>(1, Epi::workspace_elems() / std::max<int64_t>(p.D, 1)));
    BackwardRowArgs rows = row_args(p, x, lse, g_lse, g_sum, &g_cos);
    FinishW fin{at::empty_like(w, at::MemoryFormat::Contiguous), eps, normalize_w};
    return run_backward(p, w, rows, treatment, param, clamp, need_dscale, need_dbias, &fin);
  }

 private:
  static BackwardRowArgs row_args(const Prepared& p, const at::Tensor& x, const at::Tensor& lse,
                                  const at::Tensor& g_lse, const at::Tensor& g_sum, const at::Tensor* g_cos) {
    for (const at::Tensor* t : {&lse, &g_lse, &g_sum, g_cos}) {
      if (t == nullptr) continue;
      TORCH_CHECK(t->dim() == 1 && t->size(0) == p.B && t->scalar_type() == p.acc && t->device() == x.device(),
                  "mvloss: lse, g_lse, g_sum (and g_cos) must be ", p.acc, " vectors of shape (", p.B, ",)");
    }
    return BackwardRowArgs{lse.contiguous(), g_lse.contiguous(), g_sum.contiguous(),
                           g_cos ? g_cos->contiguous() : at::Tensor()};
  }

  // The class-chunk loop of both backwards; with `fin`, W's gradient is finished per chunk into fin->w_out.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_backward(
      const Prepared& p, const at::Tensor& w, const BackwardRowArgs& rows, int64_t treatment, double param,
      bool clamp, bool need_dscale, bool need_dbias, FinishW* fin) {
    auto vec = p.xhat.options().dtype(p.acc);
    at::Tensor dxhat = at::zeros({p.B, p.D}, vec);
    // fused dW in the acc dtype (fp32 W, fp64 W): each chunk's GEMM writes straight into W's gradient and the finish
    // runs in place; otherwise one chunk's buffer (n x D, acc)
    const bool in_place = fin && fin->w_out.scalar_type() == p.acc;
    at::Tensor dwhat = !fin ? at::empty({p.C, p.D}, vec) : at::empty({in_place ? 0 : std::min(p.n, p.C), p.D}, vec);
    at::Tensor dscale = at::zeros({need_dscale ? p.B : 0}, vec);
    at::Tensor dbias = at::zeros({need_dbias ? p.C : 0}, vec);
    if (p.B == 0) {
      if (fin) {
        fin->w_out.zero_();
      } else {
        dwhat.zero_();
      }
      return {dxhat, fin ? fin->w_out : dwhat, dscale, dbias};
    }
    at::Tensor ws = at::empty({p.B * p.n}, vec);
    // dc * w_inv_k: written in place over raw when the GEMMs run in the acc dtype, else in its own buffer.
    at::Tensor dc_buf = p.gemm == p.acc ? ws : at::empty({p.B * p.n}, vec.dtype(p.gemm));
    // and, for a row-block epilogue's 16-bit GEMMs, dcw transposed (n x B): the dwhat GEMM's row-major operand
    at::Tensor dct_buf = p.gemm != p.acc && Epi::row_block_gemm() ? at::empty_like(dc_buf) : at::Tensor();
    at::Tensor dz_buf = need_dbias ? at::empty({p.B * p.n}, vec) : at::Tensor();
    at::Tensor dx_tmp = p.gemm == p.acc ? at::Tensor() : at::empty({p.B, p.D}, vec);
    // dwhat_k = (sum_i dc_ik w_inv_k xhat_i) / w_inv_k; the fused finish takes w_inv_k dwhat_k as it is
    at::Tensor w_norm = fin ? at::Tensor() : at::reciprocal(p.w_inv);
    at::Tensor wbuf;
    for (int64_t c0 = 0; c0 < p.C; c0 += p.n) {
      const int64_t n = std::min(p.n, p.C - c0);
      at::Tensor raw = view2d(ws, p.B, n);
      at::Tensor wc = weight_chunk(w, p, c0, n, wbuf);
      at::Tensor dcw = view2d(dc_buf, p.B, n);
      at::Tensor dz = need_dbias ? view2d(dz_buf, p.B, n) : at::Tensor();
      at::Tensor dw_rows = !fin      ? dwhat.narrow(0, c0, n)
                           : in_place ? fin->w_out.narrow(0, c0, n)
                                      : dwhat.narrow(0, 0, n);
      ChunkArgs a = chunk_args(p, raw, c0, n, treatment, param, clamp);
      if (Epi::row_block_gemm()) {  // cosine GEMM, epilogue and dxhat GEMM per block of rows
        at::Tensor dct = dct_buf.defined() ? view2d(dct_buf, n, p.B) : at::Tensor();
        Epi::backward_chunk_gemm(p.xhat, wc, a, rows, dcw, dct, dz, dscale, dxhat);
        Epi::weight_grad_gemm(dcw, dct, p.xhat, dw_rows);
      } else {
        cosine_gemm(p, wc, raw);
        Epi::backward_chunk(a, rows, dcw, dz, dscale);
        if (p.gemm == p.acc) {
          dxhat.addmm_(dcw, wc);
          at::mm_out(dw_rows, dcw.t(), p.xhat);
        } else {
          add_half_gemm(dxhat, dcw, wc, dx_tmp);
          at::mm_out(dw_rows, dcw.t(), p.xhat, p.acc);
        }
      }
      if (fin) {
        at::Tensor out = fin->w_out.narrow(0, c0, n);
        Epi::finish_w(dw_rows, w.narrow(0, c0, n), a.w_inv, fin->eps, fin->normalize, out);
      } else {
        dw_rows.mul_(w_norm.narrow(0, c0, n).unsqueeze(1));
      }
      if (need_dbias) {
        at::Tensor db = dbias.narrow(0, c0, n);
        at::sum_out(db, dz, at::IntArrayRef{0});
      }
    }
    return {dxhat, fin ? fin->w_out : dwhat, dscale, dbias};
  }
};

}  // namespace mvloss
