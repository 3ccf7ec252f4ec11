"""The Triton backend's custom ops (the contract functions that call them are in ``mvloss.triton``).

``mvloss::triton_neg_forward``, ``mvloss::triton_neg_backward`` and ``mvloss::triton_neg_backward_w`` (the backward
with the weight gradient finished per class chunk) are ``torch.library.triton_op`` ops: their
implementation (plain PyTorch plus ``wrap_triton`` kernel launches) doubles as the fake implementation, so
``torch.compile`` traces through them and Inductor sees the kernels.  Autograd is not registered here: the
``torch.autograd.Function`` in ``mvloss.autograd`` calls the backend's ``forward``/``backward`` for every backend.

Each has an opaque twin, ``mvloss::<name>_opaque`` (``torch.library.custom_op`` over the same implementation, with
a hand-written fake): ``torch.compile`` calls it as one extern op and our own launcher runs the kernels at run time.
``mvloss.triton`` calls a twin under torch.compile where tracing would lose something: a launch's register cap
(Inductor's user-kernel path, torch 2.11 to 2.14, passes no ``maxnreg`` to Triton) and, under the interpreter, the
whole launch (fake tensors cannot reach it), so a compiled step runs on the CPU too.

Importing this module imports Triton; ``mvloss.triton`` imports it lazily (when the backend is first chosen).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import custom_op, triton_op

from . import _config, backward_dw, backward_dx, backward_gemm
from . import forward_lse as _forward


def _operands(x: torch.Tensor, w: torch.Tensor):
    """x and W share one dtype for tl.dot: mixed inputs are promoted (fp16 x bf16 or half x fp32 -> fp32)."""
    if x.dtype != w.dtype:
        x, w = x.float(), w.float()
    return x, w


def _vec(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _empty_batch_grads(D: int, C: int, need_dbias: bool, device):
    """(dxhat, dscale, dbias) of a backward over zero rows: nothing flows anywhere."""
    return (torch.zeros((0, D), dtype=torch.float32, device=device),
            torch.zeros((0,), dtype=torch.float32, device=device),
            torch.zeros((C,) if need_dbias else (0,), dtype=torch.float32, device=device))


def _backward_args(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum):
    """The backward launchers' leading arguments: int64 labels, contiguous fp32 per-row vectors (g_sum None: 0),
    lse in fp64 (the forward's lse_wide; an fp32 lse is taken as it is)."""
    return (x, w, _vec(x_inv), _vec(w_inv), labels.to(torch.int64).contiguous(), _vec(thr), _vec(scale),
            None if bias is None else bias.contiguous(), lse.to(torch.float64).contiguous(), _vec(g_lse),
            None if g_sum is None else _vec(g_sum))


def _neg_forward(x: torch.Tensor, w: torch.Tensor, x_inv: torch.Tensor, w_inv: torch.Tensor,
                 labels: torch.Tensor, thr: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                 treatment: int, param: float, clamp: bool, need_zsum: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, zsum, lse_wide) of the negatives contract (see mvloss.negatives), (B,): lse and zsum fp32 (zsum 0 unless
    ``need_zsum``), lse_wide the same lse in fp64, formed from the row's max and sum-exp without rounding it to fp32:
    the lse the backward takes."""
    x, w = _operands(x, w)
    B = x.shape[0]
    if B == 0:
        empty = torch.empty(0, dtype=torch.float32, device=x.device)
        return empty, empty.clone(), torch.empty(0, dtype=torch.float64, device=x.device)
    return _forward.launch(x, w, _vec(x_inv), _vec(w_inv), labels.to(torch.int64).contiguous(), _vec(thr),
                           _vec(scale), None if bias is None else bias.contiguous(), treatment, param, clamp,
                           need_zsum)


def _neg_backward(x: torch.Tensor, w: torch.Tensor, x_inv: torch.Tensor, w_inv: torch.Tensor,
                  labels: torch.Tensor, thr: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                  lse: torch.Tensor, g_lse: torch.Tensor, g_sum: Optional[torch.Tensor], treatment: int,
                  param: float, clamp: bool, need_dscale: bool, need_dbias: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dxhat (B, D), dwhat (C, D), dscale (B,) or (0,), dbias (C,) or (0,)), all fp32; g_sum None is 0; lse: the
    forward's lse_wide."""
    x, w = _operands(x, w)
    B, D = x.shape
    C = w.shape[0]
    args = _backward_args(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum)
    need_dbias = need_dbias and bias is not None
    if B == 0:
        dxhat, dscale, dbias = _empty_batch_grads(D, C, need_dbias, x.device)
        return dxhat, torch.zeros((C, D), dtype=torch.float32, device=x.device), dscale, dbias
    if _config.backward_mode() == "recompute":
        dxhat, dscale = backward_dx.launch(*args, treatment, param, clamp, need_dscale)
        dwhat, dbias = backward_dw.launch(*args, treatment, param, clamp, need_dbias)
        return dxhat, dwhat, dscale, dbias
    return backward_gemm.launch(*args, treatment, param, clamp, need_dscale, need_dbias)


def _neg_backward_w(x: torch.Tensor, w: torch.Tensor, x_inv: torch.Tensor, w_inv: torch.Tensor,
                    labels: torch.Tensor, thr: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                    lse: torch.Tensor, g_lse: torch.Tensor, g_sum: Optional[torch.Tensor], g_cos: torch.Tensor,
                    treatment: int, param: float, clamp: bool, need_dscale: bool, need_dbias: bool,
                    normalize_w: bool, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of a training step, target column included: (dxhat fp32 (B, D), dW (C, D) in W's dtype and
    layout, dscale (B,) or (0,), dbias (C,) or (0,)).  g_cos (B,) is the upstream gradient of the raw target cosine
    x-hat_i . w-hat_{labels_i} (none where the label is -1); dxhat and dW include it, and dW is through the
    normalisation backward."""
    w_out = torch.empty_like(w)
    x, w = _operands(x, w)
    B, D = x.shape
    C = w.shape[0]
    args = _backward_args(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum)
    need_dbias = need_dbias and bias is not None
    finish = (_vec(g_cos), w_out, bool(normalize_w), float(eps))
    if B == 0:
        dxhat, dscale, dbias = _empty_batch_grads(D, C, need_dbias, x.device)
        return dxhat, w_out.zero_(), dscale, dbias
    return backward_gemm.launch(*args, treatment, param, clamp, need_dscale, need_dbias, finish_w=finish)


triton_neg_forward = triton_op("mvloss::triton_neg_forward", mutates_args=())(_neg_forward)
triton_neg_backward = triton_op("mvloss::triton_neg_backward", mutates_args=())(_neg_backward)
triton_neg_backward_w = triton_op("mvloss::triton_neg_backward_w", mutates_args=())(_neg_backward_w)

triton_neg_forward_opaque = custom_op("mvloss::triton_neg_forward_opaque", mutates_args=())(_neg_forward)
triton_neg_backward_opaque = custom_op("mvloss::triton_neg_backward_opaque", mutates_args=())(_neg_backward)
triton_neg_backward_w_opaque = custom_op("mvloss::triton_neg_backward_w_opaque", mutates_args=())(_neg_backward_w)


def _fp32(*shape, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(shape, dtype=torch.float32)


@triton_neg_forward_opaque.register_fake
def _(x, w, x_inv, w_inv, labels, thr, scale, bias, treatment, param, clamp, need_zsum=True):
    return _fp32(x.shape[0], like=x), _fp32(x.shape[0], like=x), x.new_empty((x.shape[0],), dtype=torch.float64)


@triton_neg_backward_opaque.register_fake
def _(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, treatment, param, clamp, need_dscale,
      need_dbias):
    (B, D), C = x.shape, w.shape[0]
    return (_fp32(B, D, like=x), _fp32(C, D, like=x), _fp32(B if need_dscale else 0, like=x),
            _fp32(C if need_dbias and bias is not None else 0, like=x))


@triton_neg_backward_w_opaque.register_fake
def _(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, g_cos, treatment, param, clamp, need_dscale,
      need_dbias, normalize_w, eps):
    (B, D), C = x.shape, w.shape[0]
    return (_fp32(B, D, like=x), torch.empty_like(w), _fp32(B if need_dscale else 0, like=x),
            _fp32(C if need_dbias and bias is not None else 0, like=x))
