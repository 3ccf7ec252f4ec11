// C++ test of the CPU backend's bf16 GEMMs (csrc/cpu/bf16_gemm.h): the VNNI-2 packer against its definition (and
// against cpublas::pack where this CPU packs), the tiled transpose, and PackedB::gemm against an fp32 ATen GEMM of
// the same bf16 values (exact products, so only summation order differs) on odd shapes.  ctest runs it as it is
// (packed where the CPU packs) and with MVLOSS_CPU_BF16_GEMM=unpacked.
#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <cstdio>
#include <cstdlib>

#include "bf16_gemm.h"

static int failures = 0;

static void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL %s\n", what);
    ++failures;
  }
}

static at::Tensor random_bf16(int64_t rows, int64_t cols) {
  return at::randn({rows, cols}, at::TensorOptions().dtype(at::kFloat)).to(at::kBFloat16);
}

// VNNI-2 by its definition: out[(k / 2) * block_n * 2 + j * 2 + k % 2] = b[k, n0 + j], zero past nn.
static at::Tensor vnni2_by_definition(const at::Tensor& b, int64_t k_even, int64_t n0, int64_t nn, int64_t block_n) {
  at::Tensor block = at::zeros({k_even, block_n}, b.options());
  block.narrow(1, 0, nn).copy_(b.narrow(0, 0, k_even).narrow(1, n0, nn));
  return block.view({k_even / 2, 2, block_n}).transpose(1, 2).contiguous().view({-1});
}

static void test_packer() {
  using mvloss::cpu::pack_block_vnni2;
  const int64_t block_n = mvloss::cpu::PackedB::kBlockN;
  for (int64_t K : {2, 7, 64}) {
    for (int64_t N : {5, 64, 100}) {
      const at::Tensor b = random_bf16(K, N);
      const at::Tensor bt = b.t().contiguous();  // B^T row-major: B read through strides (1, K)
      const int64_t k_even = K / 2 * 2;
      for (int64_t n0 = 0; n0 < N; n0 += block_n) {
        const int64_t nn = std::min(block_n, N - n0);
        const at::Tensor want = vnni2_by_definition(b, k_even, n0, nn, block_n);
        at::Tensor rows = at::full_like(want, 7.0), cols = at::full_like(want, 7.0);
        pack_block_vnni2(b.data_ptr<at::BFloat16>(), N, 1, k_even, n0, nn, block_n, rows.data_ptr<at::BFloat16>());
        pack_block_vnni2(bt.data_ptr<at::BFloat16>(), 1, K, k_even, n0, nn, block_n, cols.data_ptr<at::BFloat16>());
        expect(at::equal(rows, want), "pack_block_vnni2 (B row-major) equals VNNI-2 by definition");
        expect(at::equal(cols, want), "pack_block_vnni2 (B^T row-major) equals VNNI-2 by definition");
        if (at::native::cpublas::could_pack(at::kBFloat16) && nn == block_n) {
          at::Tensor theirs = at::zeros_like(want);
          at::Tensor src = b.narrow(0, 0, k_even).narrow(1, n0, nn).contiguous();
          at::native::cpublas::pack(k_even, block_n, block_n, block_n, at::kBFloat16, at::kBFloat16,
                                    src.data_ptr<at::BFloat16>(), theirs.data_ptr<at::BFloat16>());
          expect(at::equal(theirs, want), "cpublas::pack writes VNNI-2");
        }
      }
    }
  }
}

static void test_transpose() {
  const at::Tensor src = random_bf16(45, 70);
  at::Tensor dst = at::zeros({70, 50}, src.options());
  mvloss::cpu::transpose_bf16(src.data_ptr<at::BFloat16>(), 45, 70, 70, dst.data_ptr<at::BFloat16>(), 50);
  expect(at::equal(dst.narrow(1, 0, 45), src.t()), "transpose_bf16");
  expect(at::equal(dst.narrow(1, 45, 5), at::zeros({70, 5}, src.options())), "transpose_bf16 stays in its columns");
}

static void test_gemm() {
  struct Shape {
    int64_t M, K, N;
  };
  for (const Shape s : {Shape{1, 1, 1}, Shape{37, 77, 128}, Shape{70, 128, 1003}, Shape{130, 1, 65},
                        Shape{5, 256, 64}, Shape{64, 33, 7}}) {
    const at::Tensor a = random_bf16(s.M, s.K + 3).narrow(1, 0, s.K);  // lda = K + 3
    for (bool transposed : {false, true}) {
      // B as a row-major (K x N) matrix, or as the transpose of a row-major (N x K) one (the cosine GEMM's wc^T)
      const at::Tensor b = transposed ? random_bf16(s.N, s.K).t() : random_bf16(s.K, s.N);
      const mvloss::cpu::PackedB packed(b);
      const at::Tensor want = at::mm(a.to(at::kFloat), b.to(at::kFloat));
      for (bool add_c : {false, true}) {
        at::Tensor c = at::full({s.M, s.N + 2}, add_c ? 1.5f : 9.0f, at::TensorOptions().dtype(at::kFloat));
        at::Tensor out = c.narrow(1, 0, s.N);  // ldc = N + 2
        if (s.M % 2 == 0) {
          packed.gemm_parallel(s.M, a.data_ptr<at::BFloat16>(), s.K + 3, c.data_ptr<float>(), s.N + 2, add_c);
        } else {
          packed.gemm(s.M, a.data_ptr<at::BFloat16>(), s.K + 3, c.data_ptr<float>(), s.N + 2, add_c);
        }
        const at::Tensor expected = add_c ? want + 1.5f : want;
        const double err = (out - expected).abs().max().item<double>();
        const double tol = 1e-5 * (at::mm(a.to(at::kFloat).abs(), b.to(at::kFloat).abs()).max().item<double>() + 1);
        if (!(err <= tol)) {
          std::fprintf(stderr, "FAIL gemm M=%lld K=%lld N=%lld transposed=%d add_c=%d: error %.3e > %.3e\n",
                       (long long)s.M, (long long)s.K, (long long)s.N, (int)transposed, (int)add_c, err, tol);
          ++failures;
        }
        expect(at::equal(c.narrow(1, s.N, 2), at::full({s.M, 2}, add_c ? 1.5f : 9.0f, c.options())),
               "gemm writes only its N columns");
      }
    }
  }
}

int main() {
  at::manual_seed(0);
  std::printf("bf16 GEMMs: %s\n", mvloss::cpu::cpu_bf16_gemm().c_str());
  test_packer();
  test_transpose();
  test_gemm();
  if (failures == 0) std::printf("test_bf16_gemm: all passed\n");
  return failures == 0 ? 0 : 1;
}
