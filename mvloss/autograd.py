"""The autograd glue shared by every fused backend: inverse norms, the negatives pass, the normalisation backward."""
from __future__ import annotations

import functools
import importlib
import os

import torch

from . import dispatch
from .negatives import CPU_ROW_BLOCK_ELEMS, compute_dtype, inverse_norms


def triton_glue(t: torch.Tensor) -> bool:
    """Whether small Triton kernels replace chains of PyTorch ops around the negatives pass: for eager CUDA tensors
    (not fp64, not under torch.compile, which fuses the PyTorch ops itself).  On a GPU each op is a launch, a few
    microseconds of host time, and at C ~ 100k an eager step is bound by them (bench/results/*/NOTES.md)."""
    return t.is_cuda and t.dtype != torch.float64 and not torch.compiler.is_compiling()


def _inv_norms(t: torch.Tensor, normalize: bool, eps: float, dtype: torch.dtype) -> torch.Tensor:
    if normalize:
        return inverse_norms(t, eps).to(dtype)
    return torch.ones(t.shape[0], dtype=dtype, device=t.device)


def inv_norms_pair(x, w, normalize_x: bool, normalize_w: bool, eps: float, dtype: torch.dtype):
    """(x_inv, w_inv): 1 / max(||row||, eps) where normalised, else ones, in ``dtype``; with ``triton_glue`` and both
    normalised, one Triton kernel for both (eight PyTorch ops otherwise)."""
    if normalize_x and normalize_w and dtype == torch.float32 and triton_glue(x):
        inv_norm = triton_part("inv_norm")
        if inv_norm is not None:
            return inv_norm.inverse_norms_pair(x, w, eps)
    return _inv_norms(x, normalize_x, eps, dtype), _inv_norms(w, normalize_w, eps, dtype)


def triton_part(name: str):
    """The module mvloss.triton.<name> (it imports Triton), or None when Triton is missing or broken: the caller
    then takes its PyTorch path."""
    try:
        return importlib.import_module(f"{__package__}.triton.{name}")
    except Exception:
        return None


# Elements per block of the normalisation backward: its fp32 temporaries stay bounded whatever C is (a few MB on
# CPU; on a GPU larger blocks keep the launch count low).
NORM_BLOCK_ELEMS = {"cpu": CPU_ROW_BLOCK_ELEMS}
NORM_BLOCK_ELEMS_DEFAULT = 1 << 24


def normalization_backward(dhat: torch.Tensor, t: torch.Tensor, inv: torch.Tensor, eps: float,
                           normalize: bool) -> torch.Tensor:
    """d/dt of t / max(||t||, eps), given the gradient w.r.t. the normalised rows (fp32 math, in row blocks)."""
    if not normalize:
        return dhat.to(t.dtype)
    fused = _one_pass_norm_backward(dhat, t, inv, eps)
    if fused is not None:
        return fused
    dt = dhat.dtype if dhat.dtype == torch.float64 else torch.float32
    out = _grad_out(dhat, t)
    block = NORM_BLOCK_ELEMS.get(t.device.type, NORM_BLOCK_ELEMS_DEFAULT)
    step = max(1, block // max(t.shape[1], 1))
    for r0 in range(0, t.shape[0], step):
        r1 = min(t.shape[0], r0 + step)
        d, rinv = dhat[r0:r1].to(dt), inv[r0:r1].to(dt)[:, None]
        that = t[r0:r1].to(dt) * rinv
        projected = d - (d * that).sum(1, keepdim=True) * that
        # Below eps the map is the linear t / eps: no projection.
        above = (1.0 / rinv) > eps
        out[r0:r1] = (torch.where(above, projected, d) * rinv).to(t.dtype)
    return out


def _one_pass_norm_backward(dhat, t, inv, eps):
    """With ``triton_glue``: the same map in one Triton kernel (one read of dhat and t, one write; the block loop
    above is about ten launches and passes per block).  None where it does not apply: no Triton, or very wide rows."""
    if not (triton_glue(dhat) and triton_glue(t)):
        return None
    return one_pass_norm_backward(dhat, t, inv, eps)


def one_pass_norm_backward(dhat, t, inv, eps):
    """The Triton one-pass normalisation backward (any device Triton runs on), or None without Triton or for rows
    wider than one program holds."""
    norm_backward = triton_part("norm_backward")
    if norm_backward is None or not norm_backward.supports(t.shape[1]):
        return None
    return norm_backward.launch(dhat, t, inv.to(torch.float32), eps, True, _grad_out(dhat, t))


def _grad_out(dhat, t):
    """Where the normalisation backward writes: over dhat when it can hold the result, else a tensor like t."""
    return dhat if (dhat.dtype == t.dtype and dhat.is_contiguous()) else torch.empty_like(t)


def w_grad_chunk_bytes() -> int:
    """Above this many bytes of fp32 weight gradient (C x D x 4), a backend without its own fused dW runs its backward
    class chunk by class chunk (``backward_w_by_chunks``); default 256 MB."""
    return int(os.environ.get("MVLOSS_W_GRAD_CHUNK_BYTES", 256 << 20))


def _chunk_w_grad(w: torch.Tensor) -> bool:
    return w.shape[0] * w.shape[1] * 4 > w_grad_chunk_bytes()


def backward_w_by_chunks(backend_backward, xhat, what_y, x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse,
                         g_sum, g_cos, treatment, param, clamp, need_dscale, need_dbias, normalize_w, eps, **kwargs):
    """Any backend's backward, class chunk by class chunk, each chunk's dwhat finished at once into dW (target rows,
    normalisation backward, W's dtype): the same result as one call, with fp32 buffers of one chunk, not C x D.
    With ``backend_backward`` and the forward's target rows (x-hat, w-hat_y) bound, the same signature and return as
    ``Backend.backward_fused_w``."""
    C, D = w.shape
    dt = x_inv.dtype
    step = max(1, w_grad_chunk_bytes() // (4 * max(D, 1)))
    safe, dxhat, rows = _target_grads(g_cos, labels, xhat, what_y, dt)
    target_chunk, target_local = target_rows_by_chunk(safe, step)
    w_out = torch.empty_like(w)
    dscale = None
    dbias = torch.empty(C, dtype=dt, device=w.device) if need_dbias else None
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        inside = (labels >= c0) & (labels < c1)
        local = torch.where(inside, labels - c0, -1)
        dxh, dwh, ds, db = backend_backward(
            x, w[c0:c1], x_inv, w_inv[c0:c1], local, thr, scale, None if bias is None else bias[c0:c1], lse, g_lse,
            g_sum, treatment, param, clamp, need_dscale, need_dbias, **kwargs)
        dxhat = dxhat + dxh.to(dt)
        if need_dscale:
            dscale = ds if dscale is None else dscale + ds
        if need_dbias:
            dbias[c0:c1] = db
        dwh = dwh.to(dt)
        add_target_rows(dwh, c0 // step, step, target_chunk, target_local, rows)
        w_out[c0:c1] = normalization_backward(dwh, w[c0:c1], w_inv[c0:c1], eps, normalize_w)
    return dxhat, w_out, dscale, dbias


def target_rows_by_chunk(target_idx, chunk: int):
    """(chunk number, offset in it) of each target row's class, for a backward that walks classes by ``chunk``:
    computed once per backward, not per chunk (launches cost host time)."""
    return torch.div(target_idx, chunk, rounding_mode="floor"), target_idx % chunk


def add_target_rows(dw_c, k: int, chunk: int, target_chunk, target_local, rows):
    """dw_c (the dwhat rows of class chunk k) += each target row whose class lies in that chunk."""
    # every row takes part (no data-dependent shapes under torch.compile); rows of other chunks add zeros, at an
    # index kept inside this chunk (the last chunk may be shorter than a full one)
    n = dw_c.shape[0]
    index = target_local if n == chunk else target_local.clamp(max=n - 1)
    dw_c.index_add_(0, index, rows * (target_chunk == k)[:, None])


def target_rows(x, w, safe_labels, normalize_x, normalize_w, eps, dt):
    """(x-hat, w-hat at each row's class safe_labels_i), in dtype ``dt`` (every label must be a class)."""
    xhat, what_y = x.to(dt), w[safe_labels].to(dt)
    # divide by the norm, as F.normalize and the reference do: near |cos_y| = 1 the margin's sqrt(1 - cos^2)
    # turns one ulp of cos_y into a visible difference
    if normalize_x:
        xhat = xhat / torch.linalg.vector_norm(xhat, dim=1, keepdim=True).clamp_min(eps)
    if normalize_w:
        what_y = what_y / torch.linalg.vector_norm(what_y, dim=1, keepdim=True).clamp_min(eps)
    return xhat, what_y


def _target_grads(g_cos, labels, xhat, what_y, dt):
    """The target column's part of the gradients, from the upstream gradient of cos_y: (each row's class, with -1
    replaced by 0; the dxhat rows g_cos_i w-hat_{y_i}; the dwhat rows g_cos_i x-hat_i to add at those classes), in
    ``dt``, zero where the label is -1."""
    has = labels >= 0
    g = g_cos.to(dt) * has
    return torch.where(has, labels, 0), g[:, None] * what_y, g[:, None] * xhat


class NegativesFunction(torch.autograd.Function):
    """(lse_neg, zsum_neg, cos_y) of the negatives contract, differentiable in x, w, scale and bias.

    cos_y = x-hat_i . w-hat_{y_i} (0 where the label is -1) rides along so the target column's gradient is added into
    the backend's dW in place (or carried by its own GEMMs) instead of a second dense C x D gradient for W.  The
    caller hands in the target rows its pre-pass computed without a graph (x-hat, w-hat_y and that cos_y), so they
    are not gathered and normalised a second time.
    """

    @staticmethod
    def forward(ctx, x, w, scale, bias, labels, thr, xhat, what_y, cos_y, backend, treatment, param, clamp,
                normalize_x, normalize_w, eps, chunk_size, need_zsum):
        # fp32 inside whatever autocast says: backends see the input dtypes and choose their own GEMM precision
        with torch.autocast(x.device.type, enabled=False):
            return NegativesFunction._forward(ctx, x, w, scale, bias, labels, thr, xhat, what_y, cos_y, backend,
                                              treatment, param, clamp, normalize_x, normalize_w, eps, chunk_size,
                                              need_zsum)

    @staticmethod
    def _forward(ctx, x, w, scale, bias, labels, thr, xhat, what_y, cos_y, backend, treatment, param, clamp,
                 normalize_x, normalize_w, eps, chunk_size, need_zsum):
        vec_dtype = compute_dtype(x)
        x_inv, w_inv = inv_norms_pair(x, w, normalize_x, normalize_w, eps, vec_dtype)
        scale = scale.to(vec_dtype)
        kwargs = {"chunk_size": chunk_size} if chunk_size is not None else {}
        out = backend.forward(x, w, x_inv, w_inv, labels, thr, scale, bias, int(treatment), float(param),
                              bool(clamp), need_zsum=bool(need_zsum), **kwargs)
        lse, zsum, lse_backward = out[0], out[1], dispatch.lse_for_backward(out)
        # an unused output's gradient stays None instead of a tensor of zeros: with need_zsum off, the backward's
        # g_sum is None and the backends skip it
        ctx.set_materialize_grads(False)
        cos_y = cos_y.clone()  # an output of its own, not the caller's tensor
        # the target rows ride to the backward (2 x B x D) for backends without a fused weight gradient; the lse the
        # backend's backward takes may be a wider copy (Triton's fp64 one: NOTES.md, nineteenth session)
        ctx.save_for_backward(x, w, x_inv, w_inv, labels, thr, scale, bias, lse_backward, xhat, what_y)
        ctx.cfg = (backend, int(treatment), float(param), bool(clamp), normalize_x, normalize_w, eps, kwargs)
        return lse, zsum, cos_y

    @staticmethod
    def backward(ctx, g_lse, g_sum, g_cos):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return NegativesFunction._backward(ctx, g_lse, g_sum, g_cos)

    @staticmethod
    def _backward(ctx, g_lse, g_sum, g_cos):
        x, w, x_inv, w_inv, labels, thr, scale, bias, lse, xhat, what_y = ctx.saved_tensors
        backend, treatment, param, clamp, normalize_x, normalize_w, eps, kwargs = ctx.cfg
        g_lse = torch.zeros_like(x_inv) if g_lse is None else g_lse.to(x_inv.dtype)
        g_sum = None if g_sum is None else g_sum.to(x_inv.dtype)  # None: zero, which the backends skip
        need_dscale = ctx.needs_input_grad[2]
        need_dbias = bias is not None and ctx.needs_input_grad[3]
        if ctx.needs_input_grad[1] and (backend.backward_fused_w is not None or _chunk_w_grad(w)):
            return NegativesFunction._backward_fused_w(ctx, g_lse, g_sum, g_cos, need_dscale, need_dbias)
        dxhat, dwhat, dscale, dbias = backend.backward(
            x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum,
            treatment, param, clamp, need_dscale, need_dbias, **kwargs)
        if g_cos is not None:  # the target column: O(B*D), in place
            dt = x_inv.dtype
            dxhat, dwhat = dxhat.to(dt), dwhat.to(dt)
            safe, dx_rows, dw_rows = _target_grads(g_cos, labels, xhat, what_y, dt)
            dxhat = dxhat + dx_rows
            dwhat.index_add_(0, safe, dw_rows)
        dx = normalization_backward(dxhat, x, x_inv, eps, normalize_x) if ctx.needs_input_grad[0] else None
        dw = normalization_backward(dwhat, w, w_inv, eps, normalize_w) if ctx.needs_input_grad[1] else None
        dbias = dbias.to(bias.dtype) if need_dbias else None
        return (dx, dw, dscale, dbias) + (None,) * 14

    @staticmethod
    def _backward_fused_w(ctx, g_lse, g_sum, g_cos, need_dscale, need_dbias):
        """Same gradients, with dW finished per class chunk: by the backend itself (Backend.backward_fused_w) or, for
        a large W, by ``backward_w_by_chunks``.  Both take the target column's gradient g_cos and return dxhat and
        dW with it included, dW through the normalisation backward in W's dtype."""
        x, w, x_inv, w_inv, labels, thr, scale, bias, lse, xhat, what_y = ctx.saved_tensors
        backend, treatment, param, clamp, normalize_x, normalize_w, eps, kwargs = ctx.cfg
        dt = x_inv.dtype
        g = torch.zeros_like(x_inv) if g_cos is None else g_cos.to(x_inv.dtype)
        fused = backend.backward_fused_w or functools.partial(backward_w_by_chunks, backend.backward, xhat, what_y)
        dxhat, dw, dscale, dbias = fused(
            x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, g,
            treatment, param, clamp, need_dscale, need_dbias, normalize_w, eps, **kwargs)
        dx = normalization_backward(dxhat.to(dt), x, x_inv, eps, normalize_x) if ctx.needs_input_grad[0] else None
        dbias = dbias.to(bias.dtype) if need_dbias else None
        return (dx, dw, dscale, dbias) + (None,) * 14
