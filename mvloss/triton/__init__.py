"""The "triton" backend: fused Triton kernels for the negatives contract (see ``mvloss.negatives``).

Importing this package never imports Triton and never raises when Triton is missing: the kernels and the custom ops
(``mvloss::triton_neg_forward`` / ``mvloss::triton_neg_backward``) load when the backend is first chosen.

When it runs (``unavailable`` / ``cannot_run``):

* Triton must be importable, and there must be a CUDA device, or ``TRITON_INTERPRET=1`` (Triton's CPU interpreter).
* Inputs must be fp32, fp16 or bf16 (fp64 goes to "chunked"/"reference"), on a CUDA device.
* CPU tensors are accepted only under ``TRITON_INTERPRET=1`` (the kernels then run in Triton's interpreter, orders of
  magnitude slower than "chunked").  ``backend="auto"`` never picks "triton" for CPU tensors (``mvloss.dispatch``
  skips it), so the test suite, which sets ``TRITON_INTERPRET=1`` on machines without a GPU, reaches the interpreter
  only where a test asks for ``backend="triton"`` by name.
* Learnable scale (dscale) and learnable bias (dbias) are supported.

Determinism: the default backward (``backward_gemm``) recomputes the cosines of one class chunk into a bounded
workspace and runs two GEMMs per chunk, chunks in order; the alternative (``MVLOSS_TRITON_BACKWARD=recompute``) is
two kernels (dx over row blocks looping over classes, dW over class blocks looping over rows).  Neither uses atomics
and partial sums are added in a fixed order, so results are bitwise reproducible for a given device, shape and
configuration.  (For fp16 inputs the target rows' index_add follows ``torch.use_deterministic_algorithms``.)
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from .. import dispatch
from . import _config

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_triton_error: Optional[str] = None


MAX_CLASSES = 2**31 - 1  # class indices are compared in int32 inside the kernels (one instruction, not three)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_missing() -> Optional[str]:
    global _triton_error
    if _triton_error is None:
        try:
            found = importlib.util.find_spec("triton") is not None
        except Exception as exc:  # a broken install must not break mvloss
            _triton_error = f"triton cannot be imported: {type(exc).__name__}: {exc}"
        else:
            _triton_error = "" if found else "triton is not installed (pip install triton)"
    return _triton_error or None


def unavailable() -> Optional[str]:
    why = _triton_missing()
    if why is not None:
        return why
    if not torch.cuda.is_available() and not _interpreting():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU, slowly)"
    return None


def cannot_run(spec: dispatch.CallSpec) -> Optional[str]:
    why = _triton_missing() or _cannot_run(spec)
    if why is None:
        _load_ops()
    return why


def _cannot_run(spec: dispatch.CallSpec) -> Optional[str]:
    if spec.dtype not in _SUPPORTED:
        return (f"dtype {spec.dtype} is not supported by the Triton kernels (fp32, fp16, bf16); "
                "use backend='chunked' or 'reference'")
    if spec.num_classes is not None and spec.num_classes > MAX_CLASSES:
        return (f"{spec.num_classes} classes: the Triton kernels compare class indices in int32 (at most "
                f"{MAX_CLASSES}); use backend='chunked'")
    device = torch.device(spec.device)
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if not _interpreting():
            return ("inputs are on the CPU: the Triton kernels need CUDA tensors (TRITON_INTERPRET=1 runs them on "
                    "the CPU, slowly)")
        return None
    return f"device {device.type!r} is not supported by the Triton kernels (CUDA only)"


_ops_loaded = False


def _load_ops() -> None:
    """Import Triton and register the custom ops (once).  Done eagerly by ``cannot_run`` when the backend is chosen,
    so that under torch.compile the traced ``forward``/``backward`` only look up ``torch.ops.mvloss``."""
    global _ops_loaded
    if not _ops_loaded:
        from . import ops  # noqa: F401

        _ops_loaded = True


def _op(name: str, kind: str, x, w):
    """``torch.ops.mvloss.<name>``, or its opaque twin where a compiled step needs it (``_config``'s
    ``opaque_when_compiled``; the twins are described in ``ops.py``)."""
    dtype = x.dtype if x.dtype == w.dtype else torch.float32  # ops._operands' promotion
    opaque = _config.opaque_when_compiled(kind, dtype)
    return getattr(torch.ops.mvloss, name + "_opaque" if opaque else name)


def forward(x, w, x_inv, w_inv, labels, thr, scale, bias, treatment, param, clamp, need_zsum=True, **kwargs):
    """The contract's forward -> (lse, zsum, lse_wide) (B,): lse and zsum fp32, zsum 0 unless ``need_zsum``, and
    lse_wide, the same lse in fp64, for the backward (``Backend.forward``'s optional third output).  ``chunk_size``
    and other backend keywords are ignored."""
    if not torch.compiler.is_compiling():
        _load_ops()
    return _op("triton_neg_forward", "forward", x, w)(x, w, x_inv, w_inv, labels, thr, scale, bias, int(treatment),
                                                      float(param), bool(clamp), bool(need_zsum))


def backward(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, treatment, param, clamp,
             need_dscale=False, need_dbias=False, **kwargs):
    """The contract's backward -> (dxhat, dwhat, dscale or None, dbias or None), fp32."""
    if not torch.compiler.is_compiling():
        _load_ops()
    need_dbias = bool(need_dbias) and bias is not None
    dxhat, dwhat, dscale, dbias = _op("triton_neg_backward", "backward", x, w)(
        x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, int(treatment), float(param),
        bool(clamp), bool(need_dscale), need_dbias)
    return dxhat, dwhat, (dscale if need_dscale else None), (dbias if need_dbias else None)


def backward_fused_w(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, g_cos, treatment, param,
                     clamp, need_dscale, need_dbias, normalize_w, eps, **kwargs):
    """The backward of a training step -> (dxhat fp32, dW in W's dtype and layout, dscale or None, dbias or None),
    both gradients including the target column's (g_cos_i at class labels_i), dW through the normalisation backward
    (``normalize_w``, ``eps``): the C x D fp32 dwhat of ``backward`` never exists."""
    if not torch.compiler.is_compiling():
        _load_ops()
    need_dbias = bool(need_dbias) and bias is not None
    dxhat, dw, dscale, dbias = _op("triton_neg_backward_w", "backward", x, w)(
        x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, g_cos, int(treatment), float(param),
        bool(clamp), bool(need_dscale), need_dbias, bool(normalize_w), float(eps))
    return dxhat, dw, (dscale if need_dscale else None), (dbias if need_dbias else None)


def inverse_norms_pair(a, b, eps):
    """Fused 1/max(||row||, eps) of both matrices (fp32); see ``mvloss.triton.inv_norm``."""
    from .inv_norm import inverse_norms_pair as impl

    return impl(a, b, eps)


dispatch.register(dispatch.Backend(name="triton", priority=10, forward=forward, backward=backward,
                                   unavailable=unavailable, cannot_run=cannot_run,
                                   backward_fused_w=backward_fused_w))
