// The CPU epilogue kernels (rows_impl.h) compiled for one instruction set: base.  Picked at run time.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "mvloss/epilogue.h"  // before any target pragma: shared inline helpers keep the baseline ISA
#include "rows_api.h"

namespace mvloss {
namespace cpu {
namespace {
#include "rows_impl.h"
}  // namespace

RowKernels row_kernels_base() { return make_row_kernels("baseline"); }

}  // namespace cpu
}  // namespace mvloss
