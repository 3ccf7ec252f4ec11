"""The C++ backends: "cpu" (ATen GEMMs + a fused C++ epilogue) and "cuda" (cuBLAS GEMMs + fused CUDA kernels).

Both run the negatives contract of ``mvloss.negatives`` through custom ops of the compiled extension ``mvloss._C``:
``torch.ops.mvloss.neg_forward``, ``torch.ops.mvloss.neg_backward`` and, for a training step's backward,
``torch.ops.mvloss.neg_backward_w`` (W's gradient finished per class chunk; schemas in csrc/ops.cpp, kernels in
csrc/cpu and csrc/cuda).  Their fake (meta) implementations are registered here, so torch.compile and
``torch.library.opcheck`` can trace them.  When the extension is missing (pure-Python install, no compiler at build
time) both backends register anyway and say why they are unavailable.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch
from ..negatives import compute_dtype

_C = None
_IMPORT_ERROR: Optional[str] = None
try:
    from .. import _C  # noqa: F811  (registers torch.ops.mvloss.*)
except Exception as exc:  # pragma: no cover - depends on how the package was built
    _IMPORT_ERROR = (f"the compiled extension mvloss._C is not available ({type(exc).__name__}: {exc}); "
                     "reinstall with `pip install --no-build-isolation -e .` with torch and a C++ compiler present")


def built_with_cuda() -> bool:
    return _C is not None and bool(_C.built_with_cuda())


def cpu_kernels() -> Optional[str]:
    """The CPU backend's kernels on this machine, e.g. "epilogue avx512, bf16 GEMMs packed" (None without the
    extension).  bf16 GEMMs: packed / unpacked (oneDNN's brgemm micro-kernel) or upcast (fp32 GEMMs on upcast chunks);
    MVLOSS_CPU_ISA and MVLOSS_CPU_BF16_GEMM set them."""
    if _C is None:
        return None
    try:
        bf16 = _C.cpu_bf16_gemm()
    except RuntimeError as exc:  # a misspelt MVLOSS_CPU_BF16_GEMM: say so instead
        bf16 = f"(error: {exc})"
    return f"epilogue {_C.cpu_isa()}, bf16 GEMMs {bf16}"


if _C is not None:
    @torch.library.register_fake("mvloss::neg_forward")
    def _neg_forward_fake(x, w, x_inv, w_inv, labels, thr, scale, bias, treatment, param, clamp, chunk=0):
        acc = compute_dtype(x)
        b = x.shape[0]
        return x.new_empty((b,), dtype=acc), x.new_empty((b,), dtype=acc)

    @torch.library.register_fake("mvloss::neg_backward")
    def _neg_backward_fake(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, treatment, param,
                           clamp, need_dscale, need_dbias, chunk=0):
        acc = compute_dtype(x)
        b, d, c = x.shape[0], x.shape[1], w.shape[0]
        return (x.new_empty((b, d), dtype=acc), x.new_empty((c, d), dtype=acc),
                x.new_empty((b if need_dscale else 0,), dtype=acc), x.new_empty((c if need_dbias else 0,), dtype=acc))

    @torch.library.register_fake("mvloss::neg_backward_w")
    def _neg_backward_w_fake(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, g_cos, treatment,
                             param, clamp, need_dscale, need_dbias, normalize_w, eps, chunk=0):
        acc = compute_dtype(x)
        b, d, c = x.shape[0], x.shape[1], w.shape[0]
        return (x.new_empty((b, d), dtype=acc), torch.empty((c, d), dtype=w.dtype, device=w.device),
                x.new_empty((b if need_dscale else 0,), dtype=acc), x.new_empty((c if need_dbias else 0,), dtype=acc))


def _op_inputs(x, w, x_inv, w_inv, labels, thr, scale, bias, *row_vectors):
    """The ops' leading tensor arguments as their schemas take them: the per-row and per-class vectors (and any
    further per-row vectors) in the compute dtype, labels int64."""
    acc = compute_dtype(x)
    return (x, w, x_inv.to(acc), w_inv.to(acc), labels.long(), thr.to(acc), scale.to(acc),
            None if bias is None else bias.to(acc), *(v.to(acc) for v in row_vectors))


def forward(x, w, x_inv, w_inv, labels, thr, scale, bias, treatment, param, clamp, chunk_size=None, **kw):
    """(lse, zsum) of the negatives contract, via torch.ops.mvloss.neg_forward."""
    return torch.ops.mvloss.neg_forward(*_op_inputs(x, w, x_inv, w_inv, labels, thr, scale, bias), int(treatment),
                                        float(param), bool(clamp), int(chunk_size or 0))


def backward(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, treatment, param, clamp,
             need_dscale=False, need_dbias=False, chunk_size=None, **kw):
    """(dxhat, dwhat, dscale | None, dbias | None), via torch.ops.mvloss.neg_backward."""
    g_sum = torch.zeros_like(g_lse) if g_sum is None else g_sum
    dxhat, dwhat, dscale, dbias = torch.ops.mvloss.neg_backward(
        *_op_inputs(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum), int(treatment), float(param),
        bool(clamp), bool(need_dscale), bool(need_dbias), int(chunk_size or 0))
    return dxhat, dwhat, (dscale if need_dscale else None), (dbias if need_dbias else None)


def backward_fused_w(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, g_cos, treatment, param, clamp,
                     need_dscale, need_dbias, normalize_w, eps, chunk_size=None, **kw):
    """The backward of a training step, via torch.ops.mvloss.neg_backward_w: (dxhat, dW in W's dtype, dscale | None,
    dbias | None), the target column's gradient g_cos in both, dW through the normalisation backward one class chunk
    at a time (no C x D fp32 buffer)."""
    g_sum = torch.zeros_like(g_lse) if g_sum is None else g_sum
    dxhat, dw, dscale, dbias = torch.ops.mvloss.neg_backward_w(
        *_op_inputs(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, g_cos), int(treatment),
        float(param), bool(clamp), bool(need_dscale), bool(need_dbias), bool(normalize_w), float(eps),
        int(chunk_size or 0))
    return dxhat, dw, (dscale if need_dscale else None), (dbias if need_dbias else None)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _cpu_unavailable() -> Optional[str]:
    return _IMPORT_ERROR


def _device_check(device_type: str):
    """cannot_run of the backend named after ``device_type``: its device, and the dtypes both backends take."""
    def cannot_run(spec: dispatch.CallSpec) -> Optional[str]:
        if spec.device.type != device_type:
            return f"the {device_type} backend runs {device_type.upper()} tensors, got device {spec.device}"
        if spec.dtype not in _DTYPES:
            return f"the {device_type} backend supports fp32/fp16/bf16/fp64, got {spec.dtype}"
        return None
    return cannot_run


def _cuda_unavailable() -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not built_with_cuda():
        return ("mvloss._C was built without CUDA (no CUDA toolkit at build time, or MVLOSS_SKIP_CUDA_BUILD=1); "
                "rebuild with CUDA_HOME set")
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


dispatch.register(dispatch.Backend(name="cuda", priority=20, forward=forward, backward=backward,
                                   unavailable=_cuda_unavailable, cannot_run=_device_check("cuda"),
                                   backward_fused_w=backward_fused_w))
dispatch.register(dispatch.Backend(name="cpu", priority=30, forward=forward, backward=backward,
                                   unavailable=_cpu_unavailable, cannot_run=_device_check("cpu"),
                                   backward_fused_w=backward_fused_w))
