// bf16 x bf16 -> fp32 GEMMs for the CPU backend on ATen's oneDNN batch-reduce GEMM micro-kernel (cpublas::brgemm,
// the kernel of ATen's CPU flash attention).  ATen's CPU mm has no bf16-in / fp32-out form, so without this the
// backend upcasts bf16 chunks and multiplies at the fp32 rate; on a CPU with AVX512-BF16 or AMX this is 4-5x that.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace mvloss {
namespace cpu {

// Whether the backend multiplies bf16 operands as they are.  MVLOSS_CPU_BF16_GEMM unset: when this CPU packs bf16
// for the micro-kernel (cpublas::could_pack); 0: never (upcast chunks to fp32); 1: always (where the CPU does not
// pack, brgemm runs ATen's cpublas::gemm: right on any CPU, fast only where oneDNN has a bf16 GEMM); unpacked: always,
// and never packed (tests that path on any CPU).
bool bf16_gemm_enabled();
// "packed", "unpacked" (the micro-kernel on row-major B) or "upcast" (fp32 GEMMs): what bf16 operands get now.
std::string cpu_bf16_gemm();

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < rows, j < cols, in cache-sized tiles.
void transpose_bf16(const at::BFloat16* src, int64_t rows, int64_t cols, int64_t ld_src, at::BFloat16* dst,
                    int64_t ld_dst);

// Columns [n0, n0 + nn) of a (K x N) bf16 matrix (element (k, n) at b[k * s0 + n * s1]) in the layout cpublas::pack
// writes, VNNI-2: the first k_even rows in pairs, out[(k / 2) * block_n * 2 + j * 2 + k % 2], columns nn..block_n
// zero.  Reads B or its transpose in place (the transposed weight chunk of the cosine GEMM would otherwise cost an ATen
// transposed copy, slow for bf16, before cpublas::pack); PackedB checks it against cpublas::pack once.
void pack_block_vnni2(const at::BFloat16* b, int64_t s0, int64_t s1, int64_t k_even, int64_t n0, int64_t nn,
                      int64_t block_n, at::BFloat16* out);

// The B operand (K x N, bf16) of C = A @ B, in column blocks of kBlockN: VNNI-packed when the CPU packs (each block
// zero-padded to kBlockN columns and cut to an even K; an odd K's last row is added by a rank-1 update), else
// row-major.  Holds a view of b: b must outlive it.
class PackedB {
 public:
  static constexpr int64_t kBlockN = 64;
  explicit PackedB(const at::Tensor& b);  // b: (K, N) bf16, any strides; packed on ATen's thread pool

  int64_t K() const { return k_; }
  int64_t N() const { return n_; }

  // C[0:M, 0:N] (fp32, row stride ldc) = (add_c ? C : 0) + A[0:M, 0:K] (bf16, row stride lda) @ B, on this thread.
  void gemm(int64_t M, const at::BFloat16* a, int64_t lda, float* c, int64_t ldc, bool add_c) const;
  // The same with the rows of A and C split across ATen's thread pool.
  void gemm_parallel(int64_t M, const at::BFloat16* a, int64_t lda, float* c, int64_t ldc, bool add_c) const;

 private:
  int64_t k_, n_, k_even_;
  bool vnni_;
  at::Tensor rows_;    // (K, N): the source (row-major when not packed), and the odd K's last row
  at::Tensor packed_;  // blocks of (k_even_ x kBlockN), VNNI
};

}  // namespace cpu
}  // namespace mvloss
