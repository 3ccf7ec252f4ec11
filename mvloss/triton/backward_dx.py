"""Backward kernel 1 of 2: dxhat (B x D) and dscale (B,), one program per (row block, D slice, class split).

Each program recomputes the cosine tiles of its rows against its classes, forms dz and dc on chip (see
``mvloss.negatives``) and accumulates dxhat[rows, d-slice] += (dc * w_inv) @ w[cols, d-slice] in fp32 registers.
Splits of the class dimension (for small batches) write separate partial rows that the launcher sums in a fixed
order: no atomics, so the result is deterministic (bitwise reproducible run to run on one device and config).
"""
import torch
import triton
import triton.language as tl

from . import _config
from ._tiles import column_vectors, cos_tile, dc_scale, fp16_safe_inv, gradient_tile, row_grads, row_vectors


@triton.jit
def neg_dx_kernel(x_ptr, w_ptr, x_inv_ptr, w_inv_ptr, labels_ptr, thr_ptr, scale_ptr, bias_ptr,
                  lse_ptr, g_lse_ptr, g_sum_ptr, dx_ptr, dscale_ptr,
                  B, C, D, chunk, sxb, sxd, swc, swd, param, B_BUCKET,
                  TREATMENT: tl.constexpr, CLAMP: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_DSCALE: tl.constexpr,
                  GSUM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, SCALE_DC: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    param = tl.cast(param, tl.float32)  # Inductor passes Python floats as fp64
    pid_s = tl.program_id(2)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    xinv, thr, scale, lab = row_vectors(x_inv_ptr, thr_ptr, scale_ptr, labels_ptr, rows, rmask)
    lse2, g_lse, g_sum = row_grads(lse_ptr, g_lse_ptr, g_sum_ptr, rows, rmask, GSUM)
    dcols = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dmask = dcols < D
    dcols64 = dcols.to(tl.int64)

    if SCALE_DC:
        nrm = dc_scale(g_lse, g_sum, scale, param, TREATMENT)
        rnrm = 1.0 / nrm
    dx = tl.zeros((BLOCK_B, BLOCK_DO), dtype=tl.float32)
    ds = tl.zeros((BLOCK_B,), dtype=tl.float32)
    c_start = pid_s * chunk
    c_end = tl.minimum(c_start + chunk, C)
    for c0 in range(c_start, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < c_end
        cols64 = cols.to(tl.int64)
        wt = tl.load(w_ptr + cols64[:, None] * swc + dcols64[None, :] * swd,
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            wt = wt.to(tl.float32)
        acc = cos_tile(x_ptr, w_ptr, rows64, rmask, cols64, cmask, D, sxb, sxd, swc, swd,
                       BLOCK_B, BLOCK_C, BLOCK_K, UPCAST, PRECISION, False)
        winv, bias = column_vectors(w_inv_ptr, bias_ptr, cols, cmask, HAS_BIAS)
        u, dz, dc = gradient_tile(acc, xinv, winv, thr, scale, bias, param, rmask, cmask, cols, lab, lse2, g_lse, g_sum,
                                  TREATMENT, CLAMP, HAS_BIAS, GSUM, NEED_DSCALE or GSUM, True, UPCAST)
        if NEED_DSCALE:
            ds += tl.sum(dz * u, axis=1)  # dz is 0 off the negatives
        dcw = dc * fp16_safe_inv(winv, w_ptr.dtype.element_ty == tl.float16)[None, :]
        if SCALE_DC:
            dcw = dcw * rnrm[:, None]  # |dc / n_i| <= 1 before it is rounded to fp16/bf16
        dx = tl.dot(dcw.to(wt.dtype), wt, dx, input_precision=PRECISION)

    if SCALE_DC:
        dx = dx * nrm[:, None]

    base = pid_s.to(tl.int64) * B
    tl.store(dx_ptr + (base + rows64)[:, None] * D + dcols64[None, :], dx, mask=rmask[:, None] & dmask[None, :])
    if NEED_DSCALE:
        tl.store(dscale_ptr + base + rows64, ds, mask=rmask & (pid_d == 0))




def launch(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, treatment: int, param: float,
           clamp: bool, need_dscale: bool):
    """Returns (dxhat fp32 (B, D), dscale fp32 (B,) or an empty tensor).  ``g_sum`` None: zero."""
    B, D = x.shape
    C = w.shape[0]
    cfg = _config.backward_config("dx", B, D, x.dtype)
    splits, chunk = _config.class_split(B, cfg["BLOCK_B"], C, x.device)
    # One split writes the outputs directly; several write partial rows summed below (fixed order).
    lead = () if splits == 1 else (splits,)
    dx = torch.empty(lead + (B, D), dtype=torch.float32, device=x.device)
    dscale = torch.empty(lead + (B,) if need_dscale else (0,), dtype=torch.float32, device=x.device)
    kernel, fixed = _config.kernel_for(neg_dx_kernel, "backward")
    meta = dict(TREATMENT=int(treatment), CLAMP=bool(clamp), HAS_BIAS=bias is not None,
                NEED_DSCALE=bool(need_dscale), GSUM=g_sum is not None, UPCAST=_config.interpreting(),
                PRECISION=_config.input_precision(x.dtype), SCALE_DC=_config.scale_dc(x.dtype))
    if fixed:
        meta.update(cfg)
    else:
        meta["BLOCK_K"] = cfg["BLOCK_K"]

    def grid(m):
        return (_config.cdiv(B, m["BLOCK_B"]), _config.cdiv(D, m["BLOCK_DO"]), splits)

    _config.launcher(kernel)[grid](
        x, w, x_inv, w_inv, labels, thr, scale, bias if bias is not None else w_inv,
        lse, g_lse, g_lse if g_sum is None else g_sum, dx, dscale if need_dscale else dx,
        B, C, D, chunk, x.stride(0), x.stride(1), w.stride(0), w.stride(1), float(param),
        _config.batch_bucket(B), **meta)
    if splits > 1:
        dx = dx.sum(0)
        if need_dscale:
            dscale = dscale.sum(0)
    return dx, dscale
