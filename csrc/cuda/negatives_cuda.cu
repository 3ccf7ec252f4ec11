// CUDA backend of the negatives contract (mvloss/negatives.py).
//
// Per class chunk: the cosine GEMM by cuBLAS through ATen (fp16/bf16 inputs with an fp32 result, or fp32/fp64) into
// a bounded workspace, then one fused kernel: one block per row scales by the weight inverse norms, clamps,
// applies mask/h/scale/bias and folds the chunk into the row's running (max, sum-exp) (forward), or forms
// dz, dc * w_inv and the row's sum dz * u (backward); two more GEMMs give dxhat and dwhat, and with the fused
// weight gradient a last kernel takes each chunk of dwhat through the normalisation backward into W's dtype.
// Indexing is int64; all launches go to the current stream; no device asserts (a label outside the chunk, or
// outside [0, C), simply never matches a column).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>

#include "mvloss/driver.h"
#include "mvloss/epilogue.h"

namespace mvloss {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ LseState<T> warp_lse(LseState<T> s) {
  for (int o = 16; o > 0; o >>= 1) {
    LseState<T> other{__shfl_xor_sync(0xffffffffu, s.max, o), __shfl_xor_sync(0xffffffffu, s.sum, o)};
    s = lse_merge(s, other);
  }
  return s;
}

// Block-wide sum; the result is valid in thread 0.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x < 32) {
    total = lane < kWarps ? shared[lane] : T(0);
    total = warp_sum(total);
  }
  return total;
}

template <typename T, int TREAT>
__global__ void __launch_bounds__(kThreads) forward_kernel(const T* __restrict__ raw, const T* __restrict__ w_inv,
                                                           const T* __restrict__ bias,
                                                           const int64_t* __restrict__ labels,
                                                           const T* __restrict__ thr, const T* __restrict__ scale,
                                                           T param, bool clamp, int64_t n, int64_t c0,
                                                           T* __restrict__ run_max, T* __restrict__ run_sum,
                                                           T* __restrict__ zsum) {
  __shared__ T sh_max[kWarps], sh_sum[kWarps], sh_z[kWarps];
  const int64_t i = blockIdx.x;
  const T* row = raw + i * n;
  const int64_t y = labels[i] - c0;
  const T t = thr[i], s = scale[i];
  LseState<T> st = lse_empty<T>();
  T zs = T(0);
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    if (j == y) continue;
    const T z = neg_logit<T>(row[j] * w_inv[j], t, s, bias ? bias[j] : T(0), TREAT, param, clamp);
    st = lse_push(st, z);
    zs += z;
  }
  st = warp_lse(st);
  zs = warp_sum(zs);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sh_max[warp] = st.max;
    sh_sum[warp] = st.sum;
    sh_z[warp] = zs;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    LseState<T> b = lane < kWarps ? LseState<T>{sh_max[lane], sh_sum[lane]} : lse_empty<T>();
    T bz = lane < kWarps ? sh_z[lane] : T(0);
    b = warp_lse(b);
    bz = warp_sum(bz);
    if (lane == 0) {
      LseState<T> merged = lse_merge(LseState<T>{run_max[i], run_sum[i]}, b);
      run_max[i] = merged.max;
      run_sum[i] = merged.sum;
      zsum[i] += bz;
    }
  }
}

template <typename T, typename O, int TREAT>
__global__ void __launch_bounds__(kThreads) backward_kernel(
    const T* raw, const T* __restrict__ w_inv, const T* __restrict__ bias, const int64_t* __restrict__ labels,
    const T* __restrict__ thr, const T* __restrict__ scale, const T* __restrict__ lse, const T* __restrict__ g_lse,
    const T* __restrict__ g_sum, const T* __restrict__ g_cos, T param, bool clamp, int64_t n, int64_t c0, O* dcw,
    T* __restrict__ dz, T* __restrict__ dscale) {
  __shared__ T sh[kWarps];
  const int64_t i = blockIdx.x;
  const T* row = raw + i * n;  // dcw may alias raw (same element read, then written, by one thread)
  O* out = dcw + i * n;
  T* dzrow = dz ? dz + i * n : nullptr;
  const int64_t y = labels[i] - c0;
  const T t = thr[i], s = scale[i], gs = g_sum[i];
  T l = lse[i], gl = g_lse[i];
  if (l == neg_inf<T>()) {  // no negatives in the row: p = 0
    l = T(0);
    gl = T(0);
  }
  T acc = T(0);
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    if (j == y) {  // no negative: the target column's own gradient when the weight gradient is fused, else 0
      out[j] = static_cast<O>(g_cos ? target_dcw<T>(g_cos[i], w_inv[j]) : T(0));
      if (dzrow) dzrow[j] = T(0);
      continue;
    }
    const T wi = w_inv[j];
    const T r = row[j] * wi;
    const T u = treated<T>(clamp_cos<T>(r, clamp), t, TREAT, param);
    const T z = s * u + (bias ? bias[j] : T(0));
    const T d = gl * mv_exp(z - l) + gs;
    acc += d * u;
    if (dzrow) dzrow[j] = d;
    out[j] = static_cast<O>(neg_dcos<T>(r, d, t, s, TREAT, param, clamp) * wi);
  }
  if (dscale != nullptr) {
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) dscale[i] += acc;
  }
}

// One block per weight row of a class chunk: the normalisation backward (epilogue.h) of v = w_inv * dwhat into
// out, in W's dtype.
template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) finish_w_kernel(const T* v, const W* __restrict__ w,
                                                            const T* __restrict__ w_inv, W* out, int64_t D, T eps,
                                                            bool normalize) {
  // out may be v (W in the acc dtype): each entry is read, then written, by the same thread
  __shared__ T sh[kWarps];
  __shared__ T sh_dot;
  const int64_t k = blockIdx.x;
  const T* vk = v + k * D;
  const W* wk = w + k * D;
  const T inv = w_inv[k];
  const bool project = norm_backward_projects<T>(inv, eps, normalize);  // the same for the whole block
  T dot = T(0);
  if (project) {
    for (int64_t j = threadIdx.x; j < D; j += kThreads) dot += vk[j] * (static_cast<T>(wk[j]) * inv);
    dot = block_sum(dot, sh);
    if (threadIdx.x == 0) sh_dot = dot;
    __syncthreads();
    dot = sh_dot;
  }
  for (int64_t j = threadIdx.x; j < D; j += kThreads) {
    out[k * D + j] = static_cast<W>(norm_backward_entry<T>(vk[j], dot, static_cast<T>(wk[j]) * inv, project));
  }
}

template <typename T, typename W>
void launch_finish_w(const at::Tensor& v, const at::Tensor& w, const at::Tensor& w_inv, double eps, bool normalize,
                     at::Tensor& out) {
  const int64_t n = v.size(0);
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  finish_w_kernel<T, W><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
      v.data_ptr<T>(), reinterpret_cast<const W*>(w.data_ptr()), w_inv.data_ptr<T>(),
      reinterpret_cast<W*>(out.data_ptr()), v.size(1), static_cast<T>(eps), normalize);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void finish_w_t(const at::Tensor& v, const at::Tensor& w, const at::Tensor& w_inv, double eps, bool normalize,
                at::Tensor& out) {
  const at::Tensor wc = w.contiguous();
  switch (w.scalar_type()) {
    case at::kDouble: launch_finish_w<T, double>(v, wc, w_inv, eps, normalize, out); break;
    case at::kHalf: launch_finish_w<T, c10::Half>(v, wc, w_inv, eps, normalize, out); break;
    case at::kBFloat16: launch_finish_w<T, c10::BFloat16>(v, wc, w_inv, eps, normalize, out); break;
    default: launch_finish_w<T, float>(v, wc, w_inv, eps, normalize, out); break;
  }
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

template <typename T>
T* mut_ptr_or_null(at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

#define MVLOSS_TREATMENT_SWITCH(treatment, ...)             \
  switch (treatment) {                                      \
    case kNone: { constexpr int TR = kNone; __VA_ARGS__ } break;             \
    case kFixed: { constexpr int TR = kFixed; __VA_ARGS__ } break;           \
    case kAdaptive: { constexpr int TR = kAdaptive; __VA_ARGS__ } break;     \
    case kCurricular: { constexpr int TR = kCurricular; __VA_ARGS__ } break; \
    default: { constexpr int TR = kFilter; __VA_ARGS__ } break;              \
  }

template <typename T>
void launch_forward(const ChunkArgs& a, at::Tensor& m, at::Tensor& s, at::Tensor& z) {
  const int64_t B = a.raw.size(0);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const T* bias = ptr_or_null<T>(a.bias);
  MVLOSS_TREATMENT_SWITCH(a.treatment, {
    forward_kernel<T, TR><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        a.raw.data_ptr<T>(), a.w_inv.data_ptr<T>(), bias, a.labels.data_ptr<int64_t>(), a.thr.data_ptr<T>(),
        a.scale.data_ptr<T>(), static_cast<T>(a.param), a.clamp, a.n, a.c0, m.data_ptr<T>(), s.data_ptr<T>(),
        z.data_ptr<T>());
  })
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename O>
void launch_backward(const ChunkArgs& a, const BackwardRowArgs& r, at::Tensor& dcw, at::Tensor& dz,
                     at::Tensor& ds) {
  const int64_t B = a.raw.size(0);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const T* bias = ptr_or_null<T>(a.bias);
  T* dzp = mut_ptr_or_null<T>(dz);
  T* dsp = mut_ptr_or_null<T>(ds);
  O* out = reinterpret_cast<O*>(dcw.data_ptr());
  MVLOSS_TREATMENT_SWITCH(a.treatment, {
    backward_kernel<T, O, TR><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        a.raw.data_ptr<T>(), a.w_inv.data_ptr<T>(), bias, a.labels.data_ptr<int64_t>(), a.thr.data_ptr<T>(),
        a.scale.data_ptr<T>(), r.lse.data_ptr<T>(), r.g_lse.data_ptr<T>(), r.g_sum.data_ptr<T>(),
        ptr_or_null<T>(r.g_cos), static_cast<T>(a.param), a.clamp, a.n, a.c0, out, dzp, dsp);
  })
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct CudaEpilogue {
  static bool row_block_gemm() { return false; }  // one cuBLAS GEMM per chunk, then the epilogue kernel
  static void forward_chunk_gemm(const at::Tensor&, const at::Tensor&, const ChunkArgs&, at::Tensor&, at::Tensor&,
                                 at::Tensor&) {}
  static void backward_chunk_gemm(const at::Tensor&, const at::Tensor&, const ChunkArgs&, const BackwardRowArgs&,
                                  at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&) {}
  static void weight_grad_gemm(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&) {}
  // bf16 GEMMs on the tensor cores with an fp32 result (cuBLAS through at::mm with out_dtype).  fp16 inputs are
  // upcast per chunk instead: dc * w_inv can exceed fp16's range when a weight row is tiny.
  // MVLOSS_CUDA_FP32_GEMM=1 upcasts bf16 too.
  static bool gemm_in_16bit(at::ScalarType st) {
    return st == at::kBFloat16 && env_int("MVLOSS_CUDA_FP32_GEMM", 0) != 1;
  }
  static int64_t workspace_elems() { return env_int("MVLOSS_CUDA_WORKSPACE_ELEMS", 4 * 1024 * 1024); }
  static void finish_w(const at::Tensor& v, const at::Tensor& w, const at::Tensor& w_inv, double eps, bool normalize,
                       at::Tensor& out) {
    TORCH_CHECK(v.size(0) <= 2147483647LL, "mvloss cuda: class chunk too large for one grid dimension");
    if (v.scalar_type() == at::kDouble) {
      finish_w_t<double>(v, w, w_inv, eps, normalize, out);
    } else {
      finish_w_t<float>(v, w, w_inv, eps, normalize, out);
    }
  }
  static void forward_chunk(const ChunkArgs& a, at::Tensor& m, at::Tensor& s, at::Tensor& z) {
    if (a.raw.scalar_type() == at::kDouble) {
      launch_forward<double>(a, m, s, z);
    } else {
      launch_forward<float>(a, m, s, z);
    }
  }
  static void backward_chunk(const ChunkArgs& a, const BackwardRowArgs& r, at::Tensor& dcw, at::Tensor& dz,
                             at::Tensor& ds) {
    if (a.raw.scalar_type() == at::kDouble) {
      launch_backward<double, double>(a, r, dcw, dz, ds);
    } else if (dcw.scalar_type() == at::kHalf) {
      launch_backward<float, c10::Half>(a, r, dcw, dz, ds);
    } else if (dcw.scalar_type() == at::kBFloat16) {
      launch_backward<float, c10::BFloat16>(a, r, dcw, dz, ds);
    } else {
      launch_backward<float, float>(a, r, dcw, dz, ds);
    }
  }
};

std::tuple<at::Tensor, at::Tensor> neg_forward_cuda(const at::Tensor& x, const at::Tensor& w,
                                                    const at::Tensor& x_inv, const at::Tensor& w_inv,
                                                    const at::Tensor& labels, const at::Tensor& thr,
                                                    const at::Tensor& scale, const c10::optional<at::Tensor>& bias,
                                                    int64_t treatment, double param, bool clamp, int64_t chunk) {
  TORCH_CHECK(x.size(0) <= 2147483647LL, "mvloss cuda: batch too large for one grid dimension");
  const c10::cuda::CUDAGuard guard(x.device());
  return Driver<CudaEpilogue>::forward(x, w, x_inv, w_inv, labels, thr, scale, bias, treatment, param, clamp, chunk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> neg_backward_cuda(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& x_inv, const at::Tensor& w_inv,
    const at::Tensor& labels, const at::Tensor& thr, const at::Tensor& scale, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lse, const at::Tensor& g_lse, const at::Tensor& g_sum, int64_t treatment, double param,
    bool clamp, bool need_dscale, bool need_dbias, int64_t chunk) {
  TORCH_CHECK(x.size(0) <= 2147483647LL, "mvloss cuda: batch too large for one grid dimension");
  const c10::cuda::CUDAGuard guard(x.device());
  return Driver<CudaEpilogue>::backward(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, treatment,
                                        param, clamp, need_dscale, need_dbias, chunk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> neg_backward_w_cuda(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& x_inv, const at::Tensor& w_inv,
    const at::Tensor& labels, const at::Tensor& thr, const at::Tensor& scale, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lse, const at::Tensor& g_lse, const at::Tensor& g_sum, const at::Tensor& g_cos,
    int64_t treatment, double param, bool clamp, bool need_dscale, bool need_dbias, bool normalize_w, double eps,
    int64_t chunk) {
  TORCH_CHECK(x.size(0) <= 2147483647LL, "mvloss cuda: batch too large for one grid dimension");
  const c10::cuda::CUDAGuard guard(x.device());
  return Driver<CudaEpilogue>::backward_w(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, g_cos,
                                          treatment, param, clamp, need_dscale, need_dbias, normalize_w, eps, chunk);
}

}  // namespace
}  // namespace cuda
}  // namespace mvloss

TORCH_LIBRARY_IMPL(mvloss, CUDA, m) {
  m.impl("neg_forward", &mvloss::cuda::neg_forward_cuda);
  m.impl("neg_backward", &mvloss::cuda::neg_backward_cuda);
  m.impl("neg_backward_w", &mvloss::cuda::neg_backward_w_cuda);
}
