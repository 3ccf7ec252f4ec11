"""Backward kernel 2 of 2: dwhat (C x D) and dbias (C,), one program per (class block, D slice).

Each program walks every row block, recomputes the cosine tile, forms dz and dc on chip and accumulates
dwhat[cols, d-slice] += (dc * x_inv)^T @ x[rows, d-slice] in fp32 registers, then stores it once: no atomics,
deterministic.
"""
import torch
import triton
import triton.language as tl

from ..negatives import treatment_derivative_bound
from . import _config
from ._tiles import column_vectors, cos_tile, fp16_safe_inv, gradient_tile, row_grads, row_vectors


@triton.jit
def neg_dw_kernel(x_ptr, w_ptr, x_inv_ptr, w_inv_ptr, labels_ptr, thr_ptr, scale_ptr, bias_ptr,
                  lse_ptr, g_lse_ptr, g_sum_ptr, dw_ptr, dbias_ptr, nrm_ptr,
                  B, C, D, sxb, sxd, swc, swd, param, B_BUCKET,
                  TREATMENT: tl.constexpr, CLAMP: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_DBIAS: tl.constexpr,
                  GSUM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, SCALE_DC: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    param = tl.cast(param, tl.float32)  # Inductor passes Python floats as fp64
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    cols64 = cols.to(tl.int64)
    winv, bias = column_vectors(w_inv_ptr, bias_ptr, cols, cmask, HAS_BIAS)
    dcols = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dmask = dcols < D
    dcols64 = dcols.to(tl.int64)

    if SCALE_DC:
        # one normaliser for all rows (a bound of every |dc|, computed by the launcher): dW_k sums over rows
        nrm = tl.load(nrm_ptr)
        rnrm = 1.0 / nrm
    dw = tl.zeros((BLOCK_C, BLOCK_DO), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        rows64 = rows.to(tl.int64)
        xinv, thr, scale, lab = row_vectors(x_inv_ptr, thr_ptr, scale_ptr, labels_ptr, rows, rmask)
        lse2, g_lse, g_sum = row_grads(lse_ptr, g_lse_ptr, g_sum_ptr, rows, rmask, GSUM)
        xt = tl.load(x_ptr + rows64[:, None] * sxb + dcols64[None, :] * sxd,
                     mask=rmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
        acc = cos_tile(x_ptr, w_ptr, rows64, rmask, cols64, cmask, D, sxb, sxd, swc, swd,
                       BLOCK_B, BLOCK_C, BLOCK_K, UPCAST, PRECISION, False)
        u, dz, dc = gradient_tile(acc, xinv, winv, thr, scale, bias, param, rmask, cmask, cols, lab, lse2, g_lse, g_sum,
                                  TREATMENT, CLAMP, HAS_BIAS, GSUM, NEED_DBIAS or GSUM, True, UPCAST)
        if NEED_DBIAS:
            db += tl.sum(dz, axis=0)
        dcx = dc * fp16_safe_inv(xinv, x_ptr.dtype.element_ty == tl.float16)[:, None]
        if SCALE_DC:
            dcx = dcx * rnrm  # |dc / N| <= 1 before it is rounded to fp16/bf16
        dw = tl.dot(tl.trans(dcx.to(xt.dtype)), xt, dw, input_precision=PRECISION)

    if SCALE_DC:
        dw = dw * nrm
    tl.store(dw_ptr + cols64[:, None] * D + dcols64[None, :], dw, mask=cmask[:, None] & dmask[None, :])
    if NEED_DBIAS:
        tl.store(dbias_ptr + cols64, db, mask=cmask & (pid_d == 0))




def dc_bounds_by_row(g_lse, g_sum, scale, treatment: int, param: float) -> torch.Tensor:
    """Per row, a bound of |dc_ik| over k (see _tiles.dc_scale): (|g_lse| + |g_sum|) |s| max|h'| (g_sum None: 0)."""
    g = g_lse.abs() if g_sum is None else g_lse.abs() + g_sum.abs()
    return g * scale.abs() * treatment_derivative_bound(treatment, param)


def dc_bound(g_lse, g_sum, scale, treatment: int, param: float) -> torch.Tensor:
    """max_i of the per-row bound of |dc|, a 1-element fp32 tensor (1 when it is 0); no host sync."""
    n = dc_bounds_by_row(g_lse, g_sum, scale, treatment, param).amax().reshape(1)
    return torch.where(n > 0, n, torch.ones_like(n)).to(torch.float32)


def launch(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, treatment: int, param: float,
           clamp: bool, need_dbias: bool):
    """Returns (dwhat fp32 (C, D), dbias fp32 (C,) or an empty tensor).  ``g_sum`` None: zero."""
    B, D = x.shape
    C = w.shape[0]
    cfg = _config.backward_config("dw", B, D, x.dtype)
    dw = torch.empty((C, D), dtype=torch.float32, device=x.device)
    dbias = torch.empty((C,) if need_dbias else (0,), dtype=torch.float32, device=x.device)
    scale_dc = _config.scale_dc(x.dtype)
    nrm = dc_bound(g_lse, g_sum, scale, treatment, param) if scale_dc else dw
    kernel, fixed = _config.kernel_for(neg_dw_kernel, "backward")
    meta = dict(TREATMENT=int(treatment), CLAMP=bool(clamp), HAS_BIAS=bias is not None,
                NEED_DBIAS=bool(need_dbias), GSUM=g_sum is not None, UPCAST=_config.interpreting(),
                PRECISION=_config.input_precision(x.dtype), SCALE_DC=scale_dc)
    if fixed:
        meta.update(cfg)
    else:
        meta["BLOCK_K"] = cfg["BLOCK_K"]

    def grid(m):
        return (_config.cdiv(C, m["BLOCK_C"]), _config.cdiv(D, m["BLOCK_DO"]))

    _config.launcher(kernel)[grid](
        x, w, x_inv, w_inv, labels, thr, scale, bias if bias is not None else w_inv,
        lse, g_lse, g_lse if g_sum is None else g_sum, dw, dbias if need_dbias else dw, nrm,
        B, C, D, x.stride(0), x.stride(1), w.stride(0), w.stride(1), float(param),
        _config.batch_bucket(B), **meta)
    return dw, dbias
