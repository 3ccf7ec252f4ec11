"""The methods a benchmark compares: every mvloss backend (eager, and ``mvloss:<backend>+compile`` under
torch.compile, fullgraph), the reference (eager and compiled), the eager head users write today (F.linear + margin +
cross_entropy, eager and compiled), the bare GEMM floor, and Cut Cross-Entropy / Liger on NormFace."""
from __future__ import annotations

import importlib.util
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as TF

from .. import dispatch
from .. import functional as F

LOSSES = {
    "normface": dict(scale=64.0),
    "arcface": dict(m2=0.5, scale=64.0),
    "mv_arc": dict(m2=0.5, mv="adaptive", t=0.2, scale=32.0),
}
FUSED_BACKENDS = ("triton", "cuda", "cpu", "chunked")
OTHER_METHODS = ("reference", "reference_compiled", "eager_head", "eager_head_compiled", "gemm_floor", "cce",
                 "liger")
COMPILE = "+compile"  # suffix of an mvloss method: the loss under torch.compile(fullgraph=True)
METHODS = (tuple(f"mvloss:{b}" for b in FUSED_BACKENDS) + tuple(f"mvloss:{b}{COMPILE}" for b in FUSED_BACKENDS)
           + OTHER_METHODS)


def _mvloss_backend(method: str) -> tuple[str, bool]:
    """'mvloss:triton+compile' -> ('triton', True)."""
    name = method.split(":", 1)[1]
    return (name[: -len(COMPILE)], True) if name.endswith(COMPILE) else (name, False)


def eager_head_loss(x, w, y, loss: str):
    """The head as insightface / FaceX-Zoo write it: a B x C cosine matrix, margin edits, cross_entropy."""
    opts = LOSSES[loss]
    cos = TF.linear(TF.normalize(x), TF.normalize(w)).float().clamp(-1, 1)
    rows = torch.arange(x.shape[0], device=x.device)
    target = cos[rows, y]
    if "m2" in opts:
        m = opts["m2"]
        sin = torch.sqrt((1.0 - target * target).clamp_min(0))
        ctm = target * math.cos(m) - sin * math.sin(m)
        final = torch.where(target > math.cos(math.pi - m), ctm, target - math.sin(math.pi - m) * m)
    else:
        final = target
    if opts.get("mv") == "adaptive":
        t = opts["t"]
        hard = cos > final.detach()[:, None]
        cos = torch.where(hard, (t + 1.0) * cos + t, cos)
    onehot = TF.one_hot(y, cos.shape[1]).bool()
    logits = torch.where(onehot, final[:, None], cos) * opts["scale"]
    return TF.cross_entropy(logits, y)


def _fused(backend: str, loss: str):
    def run(x, w, y):
        return F.margin_softmax_loss(x, w, y, backend=backend, **LOSSES[loss])
    return run


def unavailable(method: str, loss: str, device: torch.device, dtype: torch.dtype, B: int, C: int, D: int
                ) -> Optional[str]:
    """Why a method cannot run this case (None when it can)."""
    if method.startswith("mvloss:"):
        backend, compiled = _mvloss_backend(method)
        if compiled and backend == "triton" and device.type == "cpu":
            return "torch.compile of the Triton backend needs a GPU (the interpreter cannot be traced)"
        spec = dispatch.CallSpec(device, dtype, B, C, D, False, False, False)
        why = dispatch.get(backend).reason(spec)
        if why is not None or not compiled:
            return why
    if method in ("cce", "liger"):
        if loss != "normface":
            return "only NormFace (no margin) is expressible"
        if device.type != "cuda":
            return "needs a CUDA device"
        module = "cut_cross_entropy" if method == "cce" else "liger_kernel"
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed (pip install '.[bench]')"
    if (method.endswith("_compiled") or method.endswith(COMPILE)) and device.type == "cpu" and C * B > 50_000_000:
        return "torch.compile on CPU at this size takes too long"
    return None


def make(method: str, loss: str) -> Callable:
    """A callable (x, w, y) -> loss for the method."""
    if method.startswith("mvloss:"):
        backend, compiled = _mvloss_backend(method)
        return torch.compile(_fused(backend, loss), fullgraph=True) if compiled else _fused(backend, loss)
    if method == "reference":
        return _fused("reference", loss)
    if method == "reference_compiled":
        return torch.compile(_fused("reference", loss))
    if method == "eager_head":
        return lambda x, w, y: eager_head_loss(x, w, y, loss)
    if method == "eager_head_compiled":
        return torch.compile(lambda x, w, y: eager_head_loss(x, w, y, loss))
    if method == "gemm_floor":
        raise ValueError("gemm_floor is timed by mvloss.bench.runner.gemm_floor_step, not as a loss")
    if method == "cce":
        from cut_cross_entropy import linear_cross_entropy

        scale = LOSSES[loss]["scale"]
        return lambda x, w, y: linear_cross_entropy(TF.normalize(x) * scale, TF.normalize(w), y)
    if method == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fn, scale = LigerFusedLinearCrossEntropyLoss(), LOSSES[loss]["scale"]
        return lambda x, w, y: fn(TF.normalize(w), TF.normalize(x) * scale, y)
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")
