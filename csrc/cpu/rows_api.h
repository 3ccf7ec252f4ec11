// Interface between the ATen side of the CPU backend (negatives_cpu.cpp) and its per-row epilogue kernels
// (rows_impl.h), which are compiled once per instruction set (rows_base.cpp, rows_avx2.cpp, rows_avx512.cpp) and
// picked at run time.  No ATen here: the kernel translation units compile fast.
#pragma once

#include <cstdint>

namespace mvloss {
namespace cpu {

template <typename T>
struct FwdChunk {
  T* raw;                 // (B, n) raw cosines xhat . w_k; overwritten with logits
  const T* w_inv;         // (n,)
  const T* bias;          // (n,) or nullptr
  const int64_t* labels;  // (B,)
  const T* thr;           // (B,)
  const T* scale;         // (B,)
  T* run_max;             // (B,) running state, updated
  T* run_sum;
  T* zsum;
  T param;
  int64_t n, c0;
  int treatment;
  bool clamp;
};

template <typename T>
struct BwdChunk {
  const T* raw;           // (B, n) raw cosines
  T* out;                 // (B, n) dc * w_inv (may alias raw)
  T* dz;                  // (B, n) or nullptr
  T* dscale;              // (B,) or nullptr: += sum_k dz u
  const T* w_inv;
  const T* bias;
  const int64_t* labels;
  const T* thr;
  const T* scale;
  const T* lse;
  const T* g_lse;
  const T* g_sum;
  const T* g_cos;         // (B,) or nullptr: the target column's upstream gradient (fused weight gradient)
  T param;
  int64_t n, c0;
  int treatment;
  bool clamp;
};

struct RowKernels {
  const char* isa;
  void (*fwd_f)(const FwdChunk<float>&, int64_t r0, int64_t r1);
  void (*fwd_d)(const FwdChunk<double>&, int64_t r0, int64_t r1);
  void (*bwd_f)(const BwdChunk<float>&, int64_t r0, int64_t r1);
  void (*bwd_d)(const BwdChunk<double>&, int64_t r0, int64_t r1);
};

RowKernels row_kernels_base();
RowKernels row_kernels_avx2();    // nullptr members when not built for x86-64
RowKernels row_kernels_avx512();

}  // namespace cpu
}  // namespace mvloss
