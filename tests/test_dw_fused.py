"""MVLOSS_TRITON_DW_GEMM=fused: a class chunk's weight gradient in one Triton kernel, the dW GEMM with the
normalisation backward in its epilogue (mvloss/triton/dw_fused.py), against the PyTorch ops it replaces and, in a
whole loss, against the default backward and the reference."""
import importlib.util
import json

import pytest
import torch

import mvloss.functional as F
from helpers import assert_matches_reference, make_inputs
from mvloss.negatives import inverse_norms

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _chunk_inputs(dtype, B, n, D, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a workspace wider than the chunk, its rows 16-byte aligned (as the default backward's, for TMA descriptors)
    work = (torch.randn(B, (n + 11 + 7) // 8 * 8, generator=g) / B ** 0.5).to(DEVICE).to(dtype)
    xhat = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1).to(DEVICE).to(dtype)
    w = torch.randn(C, D, generator=g).to(DEVICE).to(dtype)
    return work, xhat, w


def _want(work, n, xhat, w, w_inv, eps, normalize, c0):
    """What the default path computes for the chunk: G^T X-hat (fp32), then the normalisation backward (fp32 math,
    as the kernel: a row below eps has inv = 1 / eps, and 1 / inv > eps is decided by fp32's rounding)."""
    from mvloss.autograd import normalization_backward

    d = (work[:, :n].double().T @ xhat.double()).float()  # = w_inv dwhat (G carries w_inv)
    rows = slice(c0, c0 + n)
    if not normalize:
        return d.double()
    return normalization_backward(d / w_inv[rows, None], w[rows].float(), w_inv[rows], eps, True).double()


@pytest.mark.parametrize("mode", ["fused", "fused_tma", "acc_dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(37, 45, 80), (64, 64, 64), (5, 3, 130)], ids=["odd", "whole", "narrow"])
def test_dw_fused_kernel_matches_gemm_then_norm_backward(monkeypatch, mode, dtype, normalize, shape):
    """Rows [c0, c0 + n) of the output get the normalisation backward of (G^T X-hat)[:n] and no other row is
    touched; partial row, column and K tiles (odd), whole ones (the mask-free specialisations) and a chunk of
    3 classes; a row whose norm is below eps gets no projection.  fused_tma: the GEMM's tiles through descriptors
    (a row of 130 features cannot be described: the pointer loads); acc_dot: the row dots from the accumulator."""
    from mvloss.triton import dw_fused, tma

    monkeypatch.setenv("MVLOSS_TRITON_DW_GEMM", "fused" if mode == "acc_dot" else mode)
    if mode == "acc_dot":
        monkeypatch.setenv("MVLOSS_TRITON_TILES", json.dumps({"dw": {"ACC_DOT": True}}))
    B, n, D = shape
    c0, C = 7, shape[1] + 20
    work, xhat, w = _chunk_inputs(dtype, B, n, D, C)
    assert tma.usable(work, xhat) == (D != 130)
    w[c0 + 1] *= 1e-6  # below eps: the linear branch
    eps = 1e-3
    w_inv = inverse_norms(w, eps) if normalize else torch.ones(C, device=DEVICE)
    out = torch.full((C, D), 7.0, dtype=dtype, device=DEVICE)
    got = dw_fused.launch(work, n, xhat, w, w_inv, eps, normalize, out, c0)
    assert got is out
    want = _want(work, n, xhat, w, w_inv, eps, normalize, c0)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(out[c0:c0 + n].double(), want, rtol=tol, atol=tol * want.abs().max().item())
    assert (out[:c0] == 7).all() and (out[c0 + n:] == 7).all()


def test_dw_fused_usable_rules():
    """fp16 (its rescaled chunk), a transposed weight or output (FaceX-Zoo's D x C layout) and mixed dtypes keep the
    default path."""
    from mvloss.triton import dw_fused

    work, xhat, w = _chunk_inputs(torch.float32, 8, 16, 32, 40)
    out = torch.empty_like(w)
    assert dw_fused.usable(work, xhat, w, out)
    assert not dw_fused.usable(work.half(), xhat.half(), w.half(), out.half())
    wt = w.T.contiguous().T
    assert not dw_fused.usable(work, xhat, wt, out) and not dw_fused.usable(work, xhat, w, wt)
    assert not dw_fused.usable(work.bfloat16(), xhat.bfloat16(), w, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dw_fused_in_a_step_matches_default_and_reference(monkeypatch, dtype):
    """A whole MV-Arc step with label smoothing and ignored rows over several class chunks (a partial last one):
    the weight gradient with the fused kernel equals the default path's to rounding and the reference's to the
    tests' rule; the fused kernel runs once a chunk and the other gradients are the same bits."""
    from mvloss.triton import dw_fused

    monkeypatch.setenv("MVLOSS_TRITON_WORKSPACE_ELEMS", str(40 * 128))  # 128 classes a chunk: 4 chunks of 450
    kw = dict(scale=32.0, margin=0.5, mv="adaptive", t=0.2, label_smoothing=0.1)
    x, w, y = make_inputs(40, 450, 48, dtype, ignore=(3,), device=DEVICE)
    calls = []
    real = dw_fused.launch

    def counted(*a, **k):
        calls.append(a[-1])
        return real(*a, **k)

    monkeypatch.setattr(dw_fused, "launch", counted)
    grads = {}
    for mode in ("cublas", "fused", "fused_tma"):
        monkeypatch.setenv("MVLOSS_TRITON_DW_GEMM", mode)
        xd, wd = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = F.arcface_loss(xd, wd, y, backend="triton", **kw)
        loss.backward()
        grads[mode] = (loss.detach(), xd.grad, wd.grad)
    assert calls == [0, 128, 256, 384] * 2
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    for mode in ("fused", "fused_tma"):
        for a, b in zip(grads["cublas"][:2], grads[mode][:2]):
            assert torch.equal(a, b)
        want, got = grads["cublas"][2].float(), grads[mode][2].float()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    # the pointer and descriptor loads feed the same sums in the same order
    assert torch.equal(grads["fused"][2], grads["fused_tma"][2])
    monkeypatch.setenv("MVLOSS_TRITON_DW_GEMM", "fused")
    assert_matches_reference(x, w, y, "triton", fn=F.arcface_loss, **kw)


def test_dw_fused_through_the_tiles_override(monkeypatch):
    """MVLOSS_TRITON_TILES's "dw" kind selects the fused kernel ("mode") and sets its tiles, which the launch takes;
    unknown keys and modes are ValueErrors naming them."""
    from mvloss.triton import _config

    monkeypatch.delenv("MVLOSS_TRITON_DW_GEMM", raising=False)
    assert _config.dw_gemm_mode() == "cublas"
    monkeypatch.setenv("MVLOSS_TRITON_TILES", json.dumps({"dw": {"mode": "fused", "BLOCK_M": 16, "BLOCK_N": 64}}))
    assert _config.dw_gemm_mode() == "fused"
    cfg = _config.dw_fused_config(48, torch.bfloat16)
    assert cfg["BLOCK_M"] == 16 and cfg["BLOCK_N"] == 64 and "mode" not in cfg
    x, w, y = make_inputs(20, 90, 48, torch.float32, device=DEVICE)
    assert_matches_reference(x, w, y, "triton", fn=F.arcface_loss, mv="adaptive", t=0.2)
    for bad, word in (('{"dw": {"BLOCK_B": 32}}', "BLOCK_B"), ('{"dw": {"mode": "tiles"}}', "mode")):
        monkeypatch.setenv("MVLOSS_TRITON_TILES", bad)
        with pytest.raises(ValueError, match=word):
            _config.dw_gemm_mode()
    monkeypatch.delenv("MVLOSS_TRITON_TILES")
    monkeypatch.setenv("MVLOSS_TRITON_DW_GEMM", "fast")
    with pytest.raises(ValueError, match="MVLOSS_TRITON_DW_GEMM"):
        _config.dw_gemm_mode()


def test_dw_fused_timing_script_smoke(tmp_path):
    """bench/dw_fused_timing.py runs end to end (CPU, interpreter, a tiny chunk) and writes its record: the default
    and the fused kernel with the table's tiles and a candidate's, the fused result within bf16 rounding of the
    default's."""
    import subprocess
    import sys

    from helpers import bench_script

    out = tmp_path / "dw.json"
    proc = subprocess.run([sys.executable, bench_script("dw_fused_timing.py"), "--smoke", "--tiles",
                           '{"dw": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}}', "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())[0]
    assert rec["gemm_ms"] > 0 and rec["default_ms"] > 0 and len(rec["fused"]) == 2
    assert rec["fused"][1]["config"]["BLOCK_M"] == 16
    assert all(0 < f["ms"] and f["max_rel_diff_vs_default"] < 2 ** -6 for f in rec["fused"]), rec["fused"]
