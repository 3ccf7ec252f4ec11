// The CPU epilogue kernels (rows_impl.h) compiled for one instruction set: avx512.  Picked at run time.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "mvloss/epilogue.h"  // before any target pragma: shared inline helpers keep the baseline ISA
#include "rows_api.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define MVLOSS_ROWS_ENABLED 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif

namespace mvloss {
namespace cpu {
#ifdef MVLOSS_ROWS_ENABLED
namespace {
#include "rows_impl.h"
}  // namespace

RowKernels row_kernels_avx512() { return make_row_kernels("avx512"); }
#else
RowKernels row_kernels_avx512() { return RowKernels{"avx512", nullptr, nullptr, nullptr, nullptr}; }
#endif

}  // namespace cpu
}  // namespace mvloss

#ifdef MVLOSS_ROWS_ENABLED
#pragma GCC pop_options
#endif
