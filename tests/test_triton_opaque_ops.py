"""The Triton ops' opaque twins (``mvloss/triton/ops.py``): what a step under torch.compile calls where tracing the
launches would lose something.  On the CPU the interpreter's steps compile through them (fake tensors never reach
the interpreter), so the compiled Triton path is tested here without a GPU; on a GPU the half-precision forward goes
through its twin so that its register cap holds (test_triton.py's compile tests check the values there)."""
import importlib.util

import pytest
import torch

from mvloss import functional as F
from helpers import bwd_args, make_inputs, op_args

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, C, D = 9, 150, 40
GRAD_NAMES = ("loss", "dx", "dW", "dscale", "dbias")


def _step(fn, x, w, y, w_grad, learnable):
    xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(w_grad)
    scale = torch.tensor(24.0, device=x.device, requires_grad=learnable)
    bias = torch.linspace(-0.3, 0.3, w.shape[0], device=x.device).requires_grad_(True) if learnable else None
    loss = fn(xb, wb, y, scale, bias)
    loss.backward()
    return [loss.detach(), xb.grad, wb.grad, scale.grad, None if bias is None else bias.grad]


def _arc_mv(x, w, y, scale, bias):
    return F.arcface_loss(x, w, y, scale=scale, backend="triton", mv="adaptive", t=0.2, label_smoothing=0.1)


def _l2_bias(x, w, y, scale, bias):
    return F.l2_softmax_loss(x, w, y, alpha=scale, bias=bias, backend="triton", label_smoothing=0.05, m3=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mv_arc_step", "frozen_weight", "learnable_scale_and_bias"])
def test_compiled_triton_step_equals_eager(case):
    """torch.compile(fullgraph=True) of a Triton training step against the same step eager: the fused weight
    gradient op (mv_arc_step), the plain backward op (a frozen W), and dscale / dbias."""
    torch._dynamo.reset()
    x, w, y = make_inputs(B, C, D, ignore=(2,), device=DEVICE)
    fn = _l2_bias if case == "learnable_scale_and_bias" else _arc_mv
    w_grad, learnable = case != "frozen_weight", case == "learnable_scale_and_bias"
    if DEVICE == "cuda":
        x, w = x.bfloat16(), w.bfloat16()
    compiled = _step(torch.compile(fn, fullgraph=True), x, w, y, w_grad, learnable)
    eager = _step(fn, x, w, y, w_grad, learnable)
    for name, got, want in zip(GRAD_NAMES, compiled, eager):
        assert (got is None) == (want is None), name
        if want is not None:
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2 if DEVICE == "cuda" else 1e-5,
                                       atol=1e-3 * want.abs().max().item(), msg=name)
    assert (compiled[2] is None) == (not w_grad) and (compiled[3] is not None) == learnable


def test_compiled_step_calls_the_opaque_ops():
    """The code Inductor writes for the step calls the twins: under the interpreter all three kinds (forward, fused
    weight gradient), on a GPU the half-precision forward (its table carries a register cap)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    x, w, y = make_inputs(B, C, D, ignore=(2,), device=DEVICE)
    if DEVICE == "cuda":
        x, w = x.bfloat16(), w.bfloat16()
    xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def step(x, w, y):
        loss = _arc_mv(x, w, y, 24.0, None)
        loss.backward()
        return loss.detach()

    _, codes = run_and_get_code(torch.compile(step), xb, wb, y)
    code = "\n".join(codes)
    assert "triton_neg_forward_opaque" in code
    if DEVICE == "cpu":
        assert "triton_neg_backward_w_opaque" in code


@pytest.mark.parametrize("bias", [False, True])
def test_opaque_ops_opcheck(bias):
    """torch.library.opcheck of each twin (schema, fake against real outputs, dynamic shapes), with and without the
    logit sum's gradient and a learnable bias, and the twin equals its triton_op."""
    ops = torch.ops.mvloss
    x, w, y = make_inputs(B, C, D, torch.bfloat16 if DEVICE == "cuda" else torch.float32, ignore=(3,), device=DEVICE)
    fwd = op_args(x, w, y, torch.linspace(-0.5, 0.5, C, device=DEVICE) if bias else None)
    g_cos = torch.linspace(-1.0, 1.0, B, device=DEVICE)
    _, _, lse = ops.triton_neg_forward(*fwd)
    with_sum = bwd_args(fwd, lse)[:-2] + (True, bias)  # dscale asked for too
    for need_zsum in (True, False):
        torch.library.opcheck(ops.triton_neg_forward_opaque.default, fwd + (need_zsum,))
        for got, want in zip(ops.triton_neg_forward_opaque(*fwd, need_zsum), ops.triton_neg_forward(*fwd, need_zsum)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    for bwd in (with_sum, with_sum[:10] + (None,) + with_sum[11:]):  # and without the logit sum's gradient
        bwd_w = bwd[:11] + (g_cos,) + bwd[11:] + (True, 1e-12)
        for name, args in (("triton_neg_backward", bwd), ("triton_neg_backward_w", bwd_w)):
            torch.library.opcheck(getattr(ops, name + "_opaque").default, args)
            got, want = getattr(ops, name + "_opaque")(*args), getattr(ops, name)(*args)
            assert [t.shape for t in got] == [t.shape for t in want] and got[3].numel() == (C if bias else 0)
            for g, e in zip(got, want):
                torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_opaque_choice(monkeypatch):
    """Which kinds take a twin under torch.compile: none outside it; under the interpreter all; on a GPU the
    half-precision forward (its table's register cap), not fp32, not the warp-specialised form (uncapped), and the
    backward only where MVLOSS_TRITON_TILES gives the recompute kernel a cap; MVLOSS_TRITON_OPAQUE overrides."""
    from mvloss.triton import _config

    assert not _config.opaque_when_compiled("forward", torch.bfloat16)  # not compiling
    kind = _config._opaque_kind
    monkeypatch.setattr(_config, "interpreting", lambda: True)
    monkeypatch.setenv("MVLOSS_TRITON_OPAQUE", "off")
    assert not kind("forward", torch.float32) and not kind("backward", torch.float32)
    monkeypatch.setenv("MVLOSS_TRITON_OPAQUE", "bogus")
    with pytest.raises(ValueError, match="MVLOSS_TRITON_OPAQUE"):
        kind("forward", torch.float32)
    monkeypatch.setenv("MVLOSS_TRITON_OPAQUE", "auto")
    assert kind("forward", torch.float32) and kind("backward", torch.float32)
    monkeypatch.setattr(_config, "interpreting", lambda: False)
    monkeypatch.delenv("MVLOSS_TRITON_TILES", raising=False)
    monkeypatch.delenv("MVLOSS_AUTOTUNE", raising=False)
    monkeypatch.delenv("MVLOSS_TRITON_FORWARD", raising=False)
    assert kind("forward", torch.bfloat16) and kind("forward", torch.float16)
    assert not kind("forward", torch.float32) and not kind("backward", torch.bfloat16)
    monkeypatch.setenv("MVLOSS_TRITON_FORWARD", "ws")
    assert not kind("forward", torch.bfloat16)
    monkeypatch.setenv("MVLOSS_TRITON_FORWARD", "tma")
    assert kind("forward", torch.bfloat16)
    monkeypatch.setenv("MVLOSS_TRITON_TILES", '{"dlogits": {"maxnreg": 96}, "forward": {"maxnreg": null}}')
    assert kind("backward", torch.bfloat16) and not kind("forward", torch.bfloat16)
    monkeypatch.setenv("MVLOSS_AUTOTUNE", "1")
    assert not kind("forward", torch.bfloat16)
    monkeypatch.setenv("MVLOSS_TRITON_OPAQUE", "on")
    assert kind("forward", torch.float32) and kind("backward", torch.bfloat16)
