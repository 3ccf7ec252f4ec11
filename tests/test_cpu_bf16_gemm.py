"""The CPU backend's bf16 GEMMs (csrc/cpu/bf16_gemm.h): bf16 operands on oneDNN's brgemm micro-kernel, VNNI-packed
where the CPU packs them, row-major (ATen's cpublas::gemm underneath) where it does not, or upcast to fp32
(MVLOSS_CPU_BF16_GEMM = 1 / unpacked / 0).  Every mode on every CPU, against the reference on odd shapes (odd B and D:
odd GEMM depths; chunks of 128 classes: partial 64-column blocks)."""
import importlib.util

import pytest
import torch

from families import FAMILIES
from helpers import REL_FLOOR, assert_matches_reference, make_inputs
from mvloss.negatives import Treatment, inverse_norms

HAS_EXT = importlib.util.find_spec("mvloss._C") is not None
pytestmark = pytest.mark.skipif(not HAS_EXT, reason="mvloss._C was not built (pure-Python install)")

MODES = ["1", "unpacked", "0"]
B, C, D, CHUNK = 37, 1003, 77, 128


def _inputs(b=B, c=C, d=D, seed=0):
    x, w, y = make_inputs(b, c, d, torch.float32, ignore=(3, 11), seed=seed)
    return x.bfloat16(), w.bfloat16(), y


@pytest.mark.parametrize("mode", MODES)
def test_mode_is_reported(mode, monkeypatch):
    from mvloss.backends import cpp

    monkeypatch.setenv("MVLOSS_CPU_BF16_GEMM", mode)
    kernels = cpp.cpu_kernels()
    want = {"0": ["upcast"], "unpacked": ["unpacked"], "1": ["packed", "unpacked"]}[mode]
    assert kernels.split("bf16 GEMMs ")[1] in want, kernels


@pytest.mark.parametrize("bad", ["false", "yes", "packed"])
def test_misspelt_mode_is_an_error(bad, monkeypatch):
    """An unknown MVLOSS_CPU_BF16_GEMM is a clear error before any GEMM, not a silent default ("false" is not 0)."""
    from mvloss import functional as F
    from mvloss.backends import cpp

    monkeypatch.setenv("MVLOSS_CPU_BF16_GEMM", bad)
    x, w, y = _inputs()
    with pytest.raises(RuntimeError, match="MVLOSS_CPU_BF16_GEMM must be 0, 1 or unpacked"):
        F.margin_softmax_loss(x, w, y, backend="cpu", m2=0.5)
    assert "error" in cpp.cpu_kernels()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["arcface", "mv_arc_adaptive", "facexzoo_mv_am", "curricular", "label_smoothing",
                                    "unnormalized_x"])
def test_modes_match_reference(mode, family, monkeypatch):
    monkeypatch.setenv("MVLOSS_CPU_BF16_GEMM", mode)
    x, w, y = _inputs()
    if family == "unnormalized_x":
        x = (x.float() * 0.9 / x.float().norm(dim=1, keepdim=True)).bfloat16()
    assert_matches_reference(x, w, y, "cpu", chunk_size=CHUNK, **FAMILIES[family])


@pytest.mark.parametrize("mode", MODES)
def test_modes_with_bias_and_default_chunks(mode, monkeypatch):
    """A bias (its gradient from the epilogue's dz) and the default workspace: one chunk of all 1003 classes."""
    from mvloss import functional as F

    monkeypatch.setenv("MVLOSS_CPU_BF16_GEMM", mode)
    x, w, y = _inputs(b=64, d=64)
    bias = torch.linspace(-1, 1, C)

    def grads(backend, dtype):
        xs, ws, bs = (t.to(dtype).clone().requires_grad_(True) for t in (x, w, bias))
        F.softmax_loss(xs / 4, ws, y, bias=bs, backend=backend).backward()
        return xs.grad.double(), ws.grad.double(), bs.grad.double()

    truth = grads("reference", torch.float64)
    ref, got = grads("reference", torch.bfloat16), grads("cpu", torch.bfloat16)
    for name, t, r, g in zip(("dx", "dW", "dbias"), truth, ref, got):
        allowed = 2 * (r - t).abs().max() + REL_FLOOR[torch.bfloat16] * t.abs().max()
        assert (g - t).abs().max() <= allowed, name


def test_bf16_forward_products_are_exact(monkeypatch):
    """With bf16 GEMMs the forward rounds xhat to bf16 and nothing else before fp32 sums: its lse equals an fp64
    evaluation on the rounded xhat to fp32 summation error, far inside the reference tolerance (the upcast path,
    which does not round xhat, is ~10x further from it)."""
    from mvloss.backends import cpp

    monkeypatch.setenv("MVLOSS_CPU_BF16_GEMM", "1")
    x, w, y = _inputs()
    y = torch.where(y < 0, torch.full_like(y, -1), y)
    x_inv, w_inv = inverse_norms(x, 1e-12), inverse_norms(w, 1e-12)
    thr = torch.linspace(-0.2, 0.4, B)
    scale = torch.full((B,), 32.0)
    args = (y, thr, scale, None, int(Treatment.ADAPTIVE), 0.2, True)
    lse = cpp.forward(x, w, x_inv, w_inv, *args, chunk_size=CHUNK)[0]
    xhat = (x.float() * x_inv[:, None]).bfloat16().double()
    want = cpp.forward(xhat, w.double(), torch.ones(B, dtype=torch.float64), w_inv.double(),
                       y, thr.double(), scale.double(), None, *args[4:], chunk_size=CHUNK)[0]
    err = (lse.double() - want).abs().max().item()
    assert err < 2e-5 * want.abs().max().item(), err
    monkeypatch.setenv("MVLOSS_CPU_BF16_GEMM", "0")
    upcast = cpp.forward(x, w, x_inv, w_inv, *args, chunk_size=CHUNK)[0]
    assert (upcast.double() - want).abs().max().item() > 10 * err  # the check above sees xhat's rounding
