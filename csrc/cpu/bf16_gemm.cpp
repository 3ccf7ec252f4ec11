#include "bf16_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdlib>
#include <string>

namespace mvloss {
namespace cpu {
namespace {

namespace cpublas = at::native::cpublas;

constexpr int64_t kBlockM = 64;  // rows of A per micro-kernel call

// MVLOSS_CPU_BF16_GEMM: "" (unset), "0", "1" or "unpacked"; anything else is an error, not a silent default.
std::string bf16_gemm_setting() {
  const char* v = std::getenv("MVLOSS_CPU_BF16_GEMM");
  const std::string setting = v != nullptr ? v : "";
  TORCH_CHECK(setting.empty() || setting == "0" || setting == "1" || setting == "unpacked",
              "mvloss: MVLOSS_CPU_BF16_GEMM must be 0, 1 or unpacked (or unset), got '", setting, "'");
  return setting;
}

bool cpu_packs_bf16() {
  static const bool packs = cpublas::could_pack(at::kBFloat16);
  return packs && bf16_gemm_setting() != "unpacked";
}

}  // namespace

bool bf16_gemm_enabled() {
  const std::string v = bf16_gemm_setting();
  if (!v.empty()) return v != "0";
  return cpu_packs_bf16();
}

std::string cpu_bf16_gemm() {
  if (!bf16_gemm_enabled()) return "upcast";
  return cpu_packs_bf16() ? "packed" : "unpacked";
}

void transpose_bf16(const at::BFloat16* src, int64_t rows, int64_t cols, int64_t ld_src, at::BFloat16* dst,
                    int64_t ld_dst) {
  constexpr int64_t kTile = 32;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const int64_t i1 = std::min(rows, i0 + kTile);
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t j1 = std::min(cols, j0 + kTile);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) dst[j * ld_dst + i] = src[i * ld_src + j];
      }
    }
  }
}

void pack_block_vnni2(const at::BFloat16* b, int64_t s0, int64_t s1, int64_t k_even, int64_t n0, int64_t nn,
                      int64_t block_n, at::BFloat16* out) {
  const at::BFloat16 zero(0.0f);
  if (s1 == 1) {  // rows contiguous along N
    for (int64_t kk = 0; kk < k_even / 2; ++kk) {
      const at::BFloat16* r0 = b + (2 * kk) * s0 + n0;
      const at::BFloat16* r1 = r0 + s0;
      at::BFloat16* o = out + kk * block_n * 2;
      for (int64_t j = 0; j < nn; ++j) {
        o[2 * j] = r0[j];
        o[2 * j + 1] = r1[j];
      }
      for (int64_t j = nn; j < block_n; ++j) o[2 * j] = o[2 * j + 1] = zero;
    }
    return;
  }
  for (int64_t j = 0; j < block_n; ++j) {  // columns contiguous along K (B^T row-major): one column at a time
    at::BFloat16* o = out + 2 * j;
    if (j >= nn) {
      for (int64_t kk = 0; kk < k_even / 2; ++kk) o[kk * block_n * 2] = o[kk * block_n * 2 + 1] = zero;
      continue;
    }
    const at::BFloat16* col = b + (n0 + j) * s1;
    for (int64_t kk = 0; kk < k_even / 2; ++kk) {
      o[kk * block_n * 2] = col[(2 * kk) * s0];
      o[kk * block_n * 2 + 1] = col[(2 * kk + 1) * s0];
    }
  }
}

namespace {

// Whether pack_block_vnni2 writes what cpublas::pack writes on this CPU and torch (checked once, both layouts).
bool own_packer_matches() {
  static const bool same = [] {
    const int64_t K = 6, N = PackedB::kBlockN;
    at::Tensor b = at::arange(K * N, at::TensorOptions().dtype(at::kFloat)).remainder(251).to(at::kBFloat16)
                       .view({K, N});
    at::Tensor theirs = at::zeros({K * N}, b.options());
    cpublas::pack(K, N, N, N, at::kBFloat16, at::kBFloat16, b.data_ptr<at::BFloat16>(),
                  theirs.data_ptr<at::BFloat16>());
    at::Tensor mine = at::zeros_like(theirs), mine_t = at::zeros_like(theirs);
    pack_block_vnni2(b.data_ptr<at::BFloat16>(), N, 1, K, 0, N, N, mine.data_ptr<at::BFloat16>());
    const at::Tensor bt = b.t().contiguous();  // (N, K): read as B through strides (1, K)
    pack_block_vnni2(bt.data_ptr<at::BFloat16>(), 1, K, K, 0, N, N, mine_t.data_ptr<at::BFloat16>());
    return at::equal(mine, theirs) && at::equal(mine_t, theirs);
  }();
  return same;
}

}  // namespace

PackedB::PackedB(const at::Tensor& b)
    : k_(b.size(0)), n_(b.size(1)), k_even_(b.size(0) / 2 * 2), vnni_(cpu_packs_bf16()) {
  TORCH_CHECK(b.dim() == 2 && b.scalar_type() == at::kBFloat16, "mvloss: PackedB takes a 2-D bf16 matrix");
  // row-major B for the unpacked micro-kernel and the odd K's last row; a packed transposed B is never copied
  rows_ = (vnni_ && own_packer_matches()) || b.stride(1) == 1 ? b : b.contiguous();
  if (!vnni_ || k_even_ == 0 || n_ == 0) return;
  const int64_t blocks = (n_ + kBlockN - 1) / kBlockN;
  packed_ = at::empty({blocks * k_even_ * kBlockN}, b.options());
  at::BFloat16* dst = packed_.data_ptr<at::BFloat16>();
  if (own_packer_matches()) {
    const at::BFloat16* src = b.data_ptr<at::BFloat16>();
    at::parallel_for(0, blocks, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        pack_block_vnni2(src, b.stride(0), b.stride(1), k_even_, j * kBlockN, std::min(kBlockN, n_ - j * kBlockN),
                         kBlockN, dst + j * k_even_ * kBlockN);
      }
    });
    return;
  }
  const at::Tensor contiguous = rows_.contiguous();  // rows_ already is, unless b is row-major but strided
  const at::BFloat16* src = contiguous.data_ptr<at::BFloat16>();
  at::parallel_for(0, blocks, 1, [&](int64_t j0, int64_t j1) {
    at::Tensor pad;  // a last block narrower than kBlockN, zero-padded: the packer takes whole blocks only
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n0 = j * kBlockN, nn = std::min(kBlockN, n_ - n0);
      const at::BFloat16* from = src + n0;
      int64_t ld = n_;
      if (nn < kBlockN) {
        pad = at::zeros({k_even_, kBlockN}, b.options());
        pad.narrow(1, 0, nn).copy_(contiguous.narrow(0, 0, k_even_).narrow(1, n0, nn));
        from = pad.data_ptr<at::BFloat16>();
        ld = kBlockN;
      }
      cpublas::pack(k_even_, kBlockN, ld, kBlockN, at::kBFloat16, at::kBFloat16, from, dst + j * k_even_ * kBlockN);
    }
  });
}

void PackedB::gemm(int64_t M, const at::BFloat16* a, int64_t lda, float* c, int64_t ldc, bool add_c) const {
  if (M <= 0 || n_ <= 0) return;
  const at::BFloat16* src = rows_.data_ptr<at::BFloat16>();
  const int64_t s0 = rows_.stride(0), s1 = rows_.stride(1);
  const auto clear_c = [&] {  // C = 0 unless add_c, where no micro-kernel call writes C (no even depth)
    if (!add_c) {
      for (int64_t i = 0; i < M; ++i) std::fill(c + i * ldc, c + i * ldc + n_, 0.0f);
    }
  };
  if (k_ == 0) {
    clear_c();
    return;
  }
  if (!vnni_) {  // row-major B: cpublas::gemm underneath
    for (int64_t m0 = 0; m0 < M; m0 += kBlockM) {
      cpublas::brgemm(std::min(kBlockM, M - m0), n_, k_, lda, s0, ldc, add_c, a + m0 * lda, src, c + m0 * ldc,
                      false);
    }
    return;
  }
  if (k_even_ > 0) {
    const at::BFloat16* packed = packed_.data_ptr<at::BFloat16>();
    for (int64_t n0 = 0; n0 < n_; n0 += kBlockN) {
      const int64_t nn = std::min(kBlockN, n_ - n0);
      const at::BFloat16* bj = packed + (n0 / kBlockN) * k_even_ * kBlockN;
      for (int64_t m0 = 0; m0 < M; m0 += kBlockM) {
        cpublas::brgemm(std::min(kBlockM, M - m0), nn, k_even_, lda, kBlockN, ldc, add_c, a + m0 * lda, bj,
                        c + m0 * ldc + n0, true);
      }
    }
    cpublas::brgemm_release(true);
  } else {
    clear_c();
  }
  if (k_even_ < k_) {  // an odd K: C += A[:, K-1] (x) B[K-1, :]
    const at::BFloat16* last = src + (k_ - 1) * s0;
    for (int64_t i = 0; i < M; ++i) {
      const float ai = static_cast<float>(a[i * lda + k_ - 1]);
      float* ci = c + i * ldc;
      for (int64_t j = 0; j < n_; ++j) ci[j] += ai * static_cast<float>(last[j * s1]);
    }
  }
}

void PackedB::gemm_parallel(int64_t M, const at::BFloat16* a, int64_t lda, float* c, int64_t ldc,
                            bool add_c) const {
  at::parallel_for(0, M, kBlockM, [&](int64_t r0, int64_t r1) {
    gemm(r1 - r0, a + r0 * lda, lda, c + r0 * ldc, ldc, add_c);
  });
}

}  // namespace cpu
}  // namespace mvloss
