// C++ test of the CPU kernels of mvloss::neg_forward / neg_backward / neg_backward_w against a naive ATen evaluation
// of the contract
// (mvloss/negatives.py), in fp64 and fp32, through the dispatcher (as Python calls them).  Run by ctest.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <tuple>

static int failures = 0;

static void expect_close(const char* what, const at::Tensor& got, const at::Tensor& want, double tol) {
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  const double scale = want.to(at::kDouble).abs().max().item<double>() + 1e-30;
  if (!(err <= tol * scale)) {
    std::fprintf(stderr, "FAIL %s: max error %.3e (relative to %.3e, tol %.1e)\n", what, err, scale, tol);
    ++failures;
  }
}

// h(c) and h'(c), written out independently of epilogue.h
static at::Tensor h(const at::Tensor& c, int t, double p) {
  switch (t) {
    case 1: return c + p;
    case 2: return (p + 1) * c + p;
    case 3: return c * (p + c);
    case 4: return at::zeros_like(c);
    default: return c;
  }
}
static at::Tensor dh(const at::Tensor& c, int t, double p) {
  switch (t) {
    case 2: return at::full_like(c, p + 1);
    case 3: return p + 2 * c;
    case 4: return at::zeros_like(c);
    default: return at::ones_like(c);
  }
}

int main() {
  using Fwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                                                 double, bool, int64_t);
  using Bwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, int64_t, double, bool, bool, bool, int64_t);
  auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow("mvloss::neg_forward", "").typed<Fwd>();
  auto bwd = c10::Dispatcher::singleton().findSchemaOrThrow("mvloss::neg_backward", "").typed<Bwd>();
  using BwdW = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, int64_t, double, bool, bool, bool, bool, double, int64_t);
  auto bwd_w = c10::Dispatcher::singleton().findSchemaOrThrow("mvloss::neg_backward_w", "").typed<BwdW>();

  at::manual_seed(0);
  const int64_t B = 13, C = 157, D = 19;
  for (auto dtype : {at::kDouble, at::kFloat}) {
    const double tol = dtype == at::kDouble ? 1e-10 : 2e-5;
    auto x = at::randn({B, D}, at::kDouble);
    auto w = at::randn({C, D}, at::kDouble);
    auto labels = at::randint(0, C, {B}, at::kLong);
    labels[2] = -1;
    auto x_inv = 1.0 / x.norm(2, {1});
    auto w_inv = 1.0 / w.norm(2, {1});
    auto thr = at::rand({B}, at::kDouble) * 0.4 - 0.1;
    thr[0] = INFINITY;
    auto scale = at::full({B}, 16.0, at::kDouble);
    auto bias = at::linspace(-0.5, 0.5, C, at::kDouble);
    auto g_lse = at::rand({B}, at::kDouble);
    auto g_sum = at::rand({B}, at::kDouble) / C;
    auto g_cos = at::randn({B}, at::kDouble) * (labels >= 0);
    auto onehot = at::zeros({B, C}, at::kBool);
    for (int64_t i = 0; i < B; ++i) {
      const int64_t y = labels[i].item<int64_t>();
      if (y >= 0) onehot[i][y] = true;
    }
    for (int t = 0; t <= 4; ++t) {
      for (bool clamp : {false, true}) {
        for (int64_t chunk : {0, 10, 64}) {
          // naive B x C evaluation of the contract in fp64
          auto raw = at::mm(x * x_inv.unsqueeze(1), (w * w_inv.unsqueeze(1)).t());
          auto c = clamp ? raw.clamp(-1, 1) : raw;
          auto hard = c > thr.unsqueeze(1);
          auto u = at::where(hard, h(c, t, 0.2), c);
          auto z = scale.unsqueeze(1) * u + bias.unsqueeze(0);
          auto zm = z.masked_fill(onehot, -INFINITY);
          auto lse = at::logsumexp(zm, {1});
          auto zsum = z.masked_fill(onehot, 0).sum(1);
          auto dz = (g_lse.unsqueeze(1) * at::exp(zm - lse.unsqueeze(1)) + g_sum.unsqueeze(1)).masked_fill(onehot, 0);
          auto dc = dz * scale.unsqueeze(1) * at::where(hard, dh(c, t, 0.2), at::ones_like(c));
          if (clamp) dc = dc * ((raw >= -1) & (raw <= 1));
          auto dxhat = at::mm(dc, w * w_inv.unsqueeze(1));
          auto dwhat = at::mm(dc.t(), x * x_inv.unsqueeze(1));
          auto dscale = (dz * u).sum(1);
          auto dbias = dz.sum(0);

          auto X = x.to(dtype), W = w.to(dtype);
          auto vec = [&](const at::Tensor& v) { return v.to(dtype == at::kDouble ? at::kDouble : at::kFloat); };
          auto out = fwd.call(X, W, vec(x_inv), vec(w_inv), labels, vec(thr), vec(scale), vec(bias), t, 0.2, clamp,
                              chunk);
          expect_close("lse", std::get<0>(out), lse, tol);
          expect_close("zsum", std::get<1>(out), zsum, tol);
          auto grads = bwd.call(X, W, vec(x_inv), vec(w_inv), labels, vec(thr), vec(scale), vec(bias),
                                vec(lse), vec(g_lse), vec(g_sum), t, 0.2, clamp, true, true, chunk);
          expect_close("dxhat", std::get<0>(grads), dxhat, tol);
          expect_close("dwhat", std::get<1>(grads), dwhat, tol);
          expect_close("dscale", std::get<2>(grads), dscale, tol);
          expect_close("dbias", std::get<3>(grads), dbias, tol);

          // the training step's backward: the target column's gradient g_cos in dc, then the normalisation
          // backward of each weight row, d/dw of w / |w| = (dwhat - (dwhat . w-hat) w-hat) / |w|
          auto dc_t = dc + onehot * g_cos.unsqueeze(1);
          auto what = w * w_inv.unsqueeze(1);
          auto dwhat_t = at::mm(dc_t.t(), x * x_inv.unsqueeze(1));
          auto dw = (dwhat_t - (dwhat_t * what).sum(1, true) * what) * w_inv.unsqueeze(1);
          for (auto wdtype : {dtype, at::kBFloat16}) {
            auto Wt = w.to(wdtype);
            auto gw = bwd_w.call(X, Wt, vec(x_inv), vec(1.0 / Wt.to(at::kDouble).norm(2, {1})), labels, vec(thr),
                                 vec(scale), vec(bias), vec(lse), vec(g_lse), vec(g_sum), vec(g_cos), t, 0.2, clamp,
                                 true, true, true, 1e-12, chunk);
            if (wdtype != dtype) {  // bf16 W: its gradient in bf16, the rest as with the exact W
              if (std::get<1>(gw).scalar_type() != at::kBFloat16) {
                std::fprintf(stderr, "FAIL dW dtype: W's gradient must be in W's dtype\n");
                ++failures;
              }
              continue;
            }
            expect_close("dxhat (fused dW)", std::get<0>(gw), at::mm(dc_t, what), tol);
            expect_close("dW (fused)", std::get<1>(gw), dw, tol);
            expect_close("dscale (fused dW)", std::get<2>(gw), dscale, tol);
            expect_close("dbias (fused dW)", std::get<3>(gw), dbias, tol);
          }
        }
      }
    }
  }
  if (failures) {
    std::fprintf(stderr, "%d comparison(s) failed\n", failures);
    return 1;
  }
  std::printf("mvloss ops (CPU): all comparisons passed\n");
  return 0;
}
