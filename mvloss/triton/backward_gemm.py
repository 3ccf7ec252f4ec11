"""The backward through a bounded workspace (the default, ``MVLOSS_TRITON_BACKWARD=gemm``).

Per class chunk [c0, c1): one Triton kernel recomputes the cosine tiles (the forward's K order, so exp(z - lse)
matches the forward's lse), forms dc, the gradient w.r.t. the cosines, on chip (see ``mvloss.negatives``) and writes
one B x chunk workspace in the input dtype, G = dc * w_inv.  Two GEMMs (cuBLAS through ATen, fp32 output) then give

    dxhat        += G @ W[c0:c1]          (= sum_k dc_ik w-hat_k)
    w_inv dwhat   = G^T @ X-hat            (= w_inv_k sum_i dc_ik x-hat_i;  X-hat = x * x_inv, B x D, made once)

W is read raw (no normalised copy) and dc is rounded to the GEMM dtype once.  The second product is dwhat scaled by
w_inv, which is exactly what the normalisation backward of W needs: d/dw of w / |w| applied to dwhat is the
projection of w_inv dwhat off w-hat (``norm_backward`` with ``prescaled``); the plain contract's dwhat divides it
back out.

That is one recompute in total (the 8 B C D count: forward, recompute, dX, dW).  The workspace holds
``MVLOSS_TRITON_WORKSPACE_ELEMS`` elements whatever C is; nothing uses atomics and chunks run in order, so the result
is bitwise reproducible.  With ``finish_w`` (the fused weight gradient, what a training step runs) the target
column's entry of dc is the upstream gradient of cos_y, so the same two GEMMs carry the target side's gradient,
and each chunk goes through the normalisation backward into dW[c0:c1] in the weight's dtype: no C x D fp32 buffer,
and four launches per chunk (the kernel, two GEMMs, the normalisation backward); three with
MVLOSS_TRITON_DW_GEMM=fused, whose one kernel (dw_fused.py) is the dW GEMM and the normalisation backward.
fp16 inputs: G's row i is divided by a bound of that row's |dc| (the target column's included) and X-hat's row i is
multiplied by that bound over the largest one (|G|, |X-hat| <= 1: no fp16 overflow or underflow), the products
multiplied back.
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from ..autograd import normalization_backward
from . import _config, dw_fused, norm_backward, tma
from .backward_dw import dc_bounds_by_row
from ._tiles import (cast_for, column_vectors, cos_tile, cos_tile_tma, dot_slice, flat_step, fp16_safe_inv,
                     gradient_tile, row_grads, row_vectors, span_mask, tma_row_tile, where_ne)


@triton.jit
def store_target_entries(rows, rmask, lab, g_cos_ptr, w_inv_ptr, g_rows, c0, c1, tile, UPCAST: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """Over the tile just stored: G's entry at each row's target column, if it lies in the tile, = g_cos_i w_inv_y
    (the upstream gradient of cos_y, so both GEMMs carry the target side too).  The barrier orders these stores
    after the tile's, which other threads made."""
    t0 = c0 + tile * BLOCK_C
    lab32 = lab.to(tl.int32)
    hit = rmask & (lab32 >= t0) & (lab32 < tl.minimum(t0 + BLOCK_C, c1))
    gt = tl.load(g_cos_ptr + rows, mask=hit, other=0.0) * tl.load(w_inv_ptr + lab32, mask=hit, other=0.0)
    tl.debug_barrier()
    tl.store(g_rows + (lab32 - c0), cast_for(gt, g_rows, UPCAST), mask=hit)


@triton.jit
def store_dlogits(acc, tile, rows, rows64, rmask, xinv, thr, scale, lab, lse2, g_lse, g_sum, w_inv_ptr, bias_ptr,
                  g_cos_ptr, g_ptr, ds_ptr, db_ptr, rn_ptr, pid_b, B, c0, c1, ldg, param,
                  TREATMENT: tl.constexpr, CLAMP: tl.constexpr, HAS_BIAS: tl.constexpr,
                  NEED_DSCALE: tl.constexpr, NEED_DBIAS: tl.constexpr, SCALE_G: tl.constexpr, TARGET: tl.constexpr,
                  GSUM: tl.constexpr, UPCAST: tl.constexpr, FULL: tl.constexpr, TARGET_AFTER: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """From the finished cosine tile number ``tile`` of the chunk: dc, then the workspace tile G = dc w_inv (each row
    divided by its bound with SCALE_G) and the dscale / dbias partials.  FULL: the tile ends by c1 (no column
    masks).  TARGET_AFTER (with TARGET and dc alone): the target column's entries are not told apart in the tile
    (no label compare or select an entry) but stored over it afterwards, one entry a row whose label is in the
    tile."""
    cols = c0 + tile * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = span_mask(cols, c1, FULL)
    winv, bias = column_vectors(w_inv_ptr, bias_ptr, cols, cmask, HAS_BIAS)
    # with TARGET_AFTER (dc alone only) the target column's entries are overwritten below, so in-bounds is all the
    # tile's entries need
    u, dz, dc = gradient_tile(acc, xinv, winv, thr, scale, bias, param, rmask, cmask, cols, lab, lse2, g_lse, g_sum,
                              TREATMENT, CLAMP, HAS_BIAS, GSUM, NEED_DSCALE or NEED_DBIAS or GSUM, not TARGET_AFTER,
                              UPCAST)
    if TARGET and not TARGET_AFTER:  # the target column's dc is the upstream gradient of cos_y: both GEMMs carry it
        g_cos = tl.load(g_cos_ptr + rows, mask=rmask, other=0.0)
        dc = where_ne(cols[None, :], lab.to(tl.int32)[:, None], dc, g_cos[:, None], UPCAST)
    g = dc * fp16_safe_inv(winv, SCALE_G)[None, :]
    if SCALE_G:  # |dc| / row bound <= 1 before it is rounded to fp16
        g = g * tl.load(rn_ptr + rows, mask=rmask, other=0.0)[:, None]
    local = cols - c0
    g_rows = g_ptr + rows64 * ldg  # a pointer a row, an int32 offset an entry
    tl.store(g_rows[:, None] + local[None, :], cast_for(g, g_ptr, UPCAST), mask=rmask[:, None] & cmask[None, :])
    if TARGET_AFTER:
        tl.static_assert(not SCALE_G, "TARGET_AFTER is not taken with an fp16 workspace (_config.target_after)")
        store_target_entries(rows, rmask, lab, g_cos_ptr, w_inv_ptr, g_rows, c0, c1, tile, UPCAST, BLOCK_C)
    if NEED_DSCALE:  # one partial per class tile, summed in order by the launcher (dz is 0 off the negatives)
        tl.store(ds_ptr + tl.cast(tile, tl.int64) * B + rows64, tl.sum(dz * u, axis=1), mask=rmask)
    if NEED_DBIAS:  # one partial per row tile
        tl.store(db_ptr + tl.cast(pid_b, tl.int64) * ldg + local, tl.sum(dz, axis=0), mask=cmask)


@triton.jit
def neg_dlogits_kernel(x_ptr, w_ptr, x_inv_ptr, w_inv_ptr, labels_ptr, thr_ptr, scale_ptr, bias_ptr,
                       lse_ptr, g_lse_ptr, g_sum_ptr, g_cos_ptr, g_ptr, ds_ptr, db_ptr, rn_ptr,
                       B, c0, c1, D, ldg, sxb, sxd, swc, swd, param,
                       TREATMENT: tl.constexpr, CLAMP: tl.constexpr, HAS_BIAS: tl.constexpr,
                       NEED_DSCALE: tl.constexpr, NEED_DBIAS: tl.constexpr, GSUM: tl.constexpr, UPCAST: tl.constexpr,
                       PRECISION: tl.constexpr, SCALE_G: tl.constexpr, TARGET: tl.constexpr,
                       PERSISTENT: tl.constexpr, EVEN_B: tl.constexpr, EVEN_K: tl.constexpr, FULL: tl.constexpr,
                       TARGET_AFTER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """Grid (row tiles, class programs).  Default: one class tile per program.  PERSISTENT: each program takes every
    P-th class tile of the chunk (P = the grid's class programs) in one loop over (tile, K slice) pairs, so the
    software pipeline runs across its tiles (the next tile's loads overlap this one's epilogue and stores).
    EVEN_B: BLOCK_B divides B, EVEN_K: BLOCK_K divides D, FULL: BLOCK_C divides the chunk (no row, feature or class
    masks; every chunk but the last is a whole number of class tiles).  TARGET_AFTER: see store_dlogits (not with
    PERSISTENT, _config.target_after)."""
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    param = tl.cast(param, tl.float32)  # Inductor passes Python floats as fp64
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = span_mask(rows, B, EVEN_B)
    rows64 = rows.to(tl.int64)
    xinv, thr, scale, lab = row_vectors(x_inv_ptr, thr_ptr, scale_ptr, labels_ptr, rows, rmask)
    lse2, g_lse, g_sum = row_grads(lse_ptr, g_lse_ptr, g_sum_ptr, rows, rmask, GSUM)
    if PERSISTENT:
        n_prog = tl.num_programs(1)
        n_k = tl.cdiv(D, BLOCK_K)
        mine = tl.cdiv(tl.cdiv(c1 - c0, BLOCK_C) - pid_c, n_prog)
        acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
        for it in range(0, mine * n_k):
            tile, k0, last = flat_step(it, n_k, pid_c, n_prog, BLOCK_K)
            cols64 = (c0 + tile * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
            acc = dot_slice(x_ptr, w_ptr, rows64, rmask, cols64, span_mask(cols64, c1, FULL), k0, D, sxb, sxd, swc,
                            swd, acc, BLOCK_K, UPCAST, PRECISION, EVEN_K)
            if last:
                store_dlogits(acc, tile, rows, rows64, rmask, xinv, thr, scale, lab, lse2, g_lse, g_sum, w_inv_ptr,
                              bias_ptr, g_cos_ptr, g_ptr, ds_ptr, db_ptr, rn_ptr, pid_b, B, c0, c1, ldg, param,
                              TREATMENT, CLAMP, HAS_BIAS, NEED_DSCALE, NEED_DBIAS, SCALE_G, TARGET, GSUM, UPCAST,
                              FULL, TARGET_AFTER, BLOCK_C)
                acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    else:
        cols64 = (c0 + pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        acc = cos_tile(x_ptr, w_ptr, rows64, rmask, cols64, span_mask(cols64, c1, FULL), D, sxb, sxd, swc, swd,
                       BLOCK_B, BLOCK_C, BLOCK_K, UPCAST, PRECISION, EVEN_K)
        store_dlogits(acc, pid_c, rows, rows64, rmask, xinv, thr, scale, lab, lse2, g_lse, g_sum, w_inv_ptr, bias_ptr,
                      g_cos_ptr, g_ptr, ds_ptr, db_ptr, rn_ptr, pid_b, B, c0, c1, ldg, param,
                      TREATMENT, CLAMP, HAS_BIAS, NEED_DSCALE, NEED_DBIAS, SCALE_G, TARGET, GSUM, UPCAST, FULL,
                      TARGET_AFTER, BLOCK_C)


@triton.jit
def neg_dlogits_tma_kernel(x_ptr, w_ptr, x_inv_ptr, w_inv_ptr, labels_ptr, thr_ptr, scale_ptr, bias_ptr,
                           lse_ptr, g_lse_ptr, g_sum_ptr, g_cos_ptr, g_ptr, ds_ptr, db_ptr, rn_ptr,
                           B, c0, c1, D, ldg, sxb, swc, param,
                           TREATMENT: tl.constexpr, CLAMP: tl.constexpr, HAS_BIAS: tl.constexpr,
                           NEED_DSCALE: tl.constexpr, NEED_DBIAS: tl.constexpr, GSUM: tl.constexpr,
                           UPCAST: tl.constexpr, PRECISION: tl.constexpr, SCALE_G: tl.constexpr, TARGET: tl.constexpr,
                           LOOP: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, EVEN_B: tl.constexpr, FULL: tl.constexpr,
                           TARGET_AFTER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """MVLOSS_TRITON_DLOGITS = tma / ws: x and W tiles through TMA descriptors the program makes (tma.py): one bulk
    copy a tile, no address registers; W's rows past c1 are zero.  tma: one class tile a program.  ws (LOOP):
    program (i, j) takes class tiles j, j + P, ... of the chunk (P = the grid's class programs), a loop Triton
    warp-specialises where it can (WARP_SPECIALIZE), as in the forward (forward_tma.py): a producer group and two
    consumer groups, each half the row tile.  (A loop of one tile costs the tma form ~90 registers: not used there.)
    EVEN_B, FULL and TARGET_AFTER as in neg_dlogits_kernel (the copies need no masks whatever they are; TARGET_AFTER
    only without LOOP, _config.target_after)."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[B, D], strides=[sxb, 1], block_shape=[BLOCK_B, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[c1, D], strides=[swc, 1], block_shape=[BLOCK_C, BLOCK_K])
    pid_b = tl.program_id(0)
    param = tl.cast(param, tl.float32)
    r0, rows = tma_row_tile(pid_b, BLOCK_B)
    rmask = span_mask(rows, B, EVEN_B)
    xinv, thr, scale, lab = row_vectors(x_inv_ptr, thr_ptr, scale_ptr, labels_ptr, rows, rmask)
    lse2, g_lse, g_sum = row_grads(lse_ptr, g_lse_ptr, g_sum_ptr, rows, rmask, GSUM)
    if LOOP:
        for tile in tl.range(tl.program_id(1), tl.cdiv(c1 - c0, BLOCK_C), tl.num_programs(1),
                             warp_specialize=WARP_SPECIALIZE):
            acc = cos_tile_tma(x_desc, w_desc, r0, c0 + tile * BLOCK_C, D, BLOCK_B, BLOCK_C, BLOCK_K, UPCAST,
                               PRECISION)
            store_dlogits(acc, tile, rows, rows.to(tl.int64), rmask, xinv, thr, scale, lab, lse2, g_lse, g_sum,
                          w_inv_ptr, bias_ptr, g_cos_ptr, g_ptr, ds_ptr, db_ptr, rn_ptr, pid_b, B, c0, c1, ldg,
                          param, TREATMENT, CLAMP, HAS_BIAS, NEED_DSCALE, NEED_DBIAS, SCALE_G, TARGET, GSUM, UPCAST,
                          FULL, TARGET_AFTER, BLOCK_C)
    else:
        tile = tl.program_id(1)
        acc = cos_tile_tma(x_desc, w_desc, r0, c0 + tile * BLOCK_C, D, BLOCK_B, BLOCK_C, BLOCK_K, UPCAST, PRECISION)
        store_dlogits(acc, tile, rows, rows.to(tl.int64), rmask, xinv, thr, scale, lab, lse2, g_lse, g_sum,
                      w_inv_ptr, bias_ptr, g_cos_ptr, g_ptr, ds_ptr, db_ptr, rn_ptr, pid_b, B, c0, c1, ldg, param,
                      TREATMENT, CLAMP, HAS_BIAS, NEED_DSCALE, NEED_DBIAS, SCALE_G, TARGET, GSUM, UPCAST, FULL,
                      TARGET_AFTER, BLOCK_C)


def dc_row_bound(g_lse, g_sum, scale, treatment: int, param: float) -> torch.Tensor:
    """Per row, backward_dw.dc_bounds_by_row, with 1 where it is 0."""
    n = dc_bounds_by_row(g_lse, g_sum, scale, treatment, param)
    return torch.where(n > 0, n, torch.ones_like(n)).to(torch.float32)


def workspace_elems() -> int:
    """Elements of the B x chunk workspace (default 32M: 64 MB in bf16; at B = 1024 a chunk of 32768 classes).
    Fewer, larger chunks keep the per-chunk launches (four) below the chunk's GPU time."""
    return max(1, int(os.environ.get("MVLOSS_TRITON_WORKSPACE_ELEMS", 32 * 1024 * 1024)))


def _chunk(B: int, C: int, block_c: int) -> int:
    per = max(block_c, (workspace_elems() // max(B, 1)) // block_c * block_c)
    return min(per, _config.cdiv(C, block_c) * block_c)


def _mm32(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b with fp32 output (half inputs: tensor cores, fp32 accumulation and result), into ``out`` if given."""
    if a.dtype == torch.float32:
        return a @ b if out is None else torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    r = a.float() @ b.float()  # the interpreter's tests: no half-to-fp32 GEMM on the CPU
    return r if out is None else out.copy_(r)


def _mm_same(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b in the inputs' dtype (fp32 accumulation, one rounding), into ``out`` if given."""
    return torch.mm(a, b, out=out)


_addmm_fp32_out = True  # cleared if this torch rejects addmm(fp32 acc, half, half, out_dtype=fp32)


def _addmm32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b: one GEMM with beta = 1 on an eager GPU.  Traced (torch.compile, fake tensors) it is a GEMM
    and an add, which Inductor fuses: torch 2.11's fake addmm with out_dtype is broken (its decomposition takes the
    dtype for beta)."""
    global _addmm_fp32_out
    if a.is_cuda and _addmm_fp32_out and not (torch.compiler.is_compiling() or is_fake(acc)):
        try:
            if a.dtype == torch.float32:
                torch.addmm(acc, a, b, out=acc)
            else:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except RuntimeError:  # argument checks run before any launch: nothing was written
            _addmm_fp32_out = False
    acc += _mm32(a, b)


def launch(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, treatment: int, param: float,
           clamp: bool, need_dscale: bool, need_dbias: bool, finish_w=None):
    """Returns (dxhat fp32 (B, D), dwhat fp32 (C, D), dscale fp32 (B,) or empty, dbias fp32 (C,) or empty).
    ``g_sum`` None: zero (the logit sum was not asked for).

    With ``finish_w`` = (g_cos, w_out, normalize_w, eps) -- the fused weight gradient -- the target column's
    gradient g_cos_i (at class labels_i, none where it is -1) is included in dxhat and in the weight gradient, which
    is finished per chunk (normalisation backward, W's dtype) into w_out and returned in place of dwhat."""
    B, D = x.shape
    C = w.shape[0]
    dev = x.device
    mode = _config.dlogits_mode()
    use_tma = mode in ("tma", "ws") and tma.usable(x, w)
    cfg = _config.dlogits_config(B, D, x.dtype, use_tma)
    bb, bc = cfg["BLOCK_B"], cfg["BLOCK_C"]
    chunk = _chunk(B, C, bc)
    gdt = x.dtype
    g_cos = finish_w[0] if finish_w is not None else None
    work = torch.empty((B, chunk), dtype=gdt, device=dev)
    # fp16: G's row i is divided by a bound of that row's |dc| (target column included), and x-hat's row i is
    # multiplied by it over the largest (so |G|, |x-hat-s| <= 1); dW's chunk is multiplied back by the largest
    scale_g = gdt == torch.float16
    row_scale = None
    if scale_g:
        row_n = dc_row_bound(g_lse, g_sum, scale, treatment, param)
        if g_cos is not None:
            row_n = torch.maximum(row_n, g_cos.abs())
        big_n = row_n.amax().reshape(1)
        rn, row_scale = 1.0 / row_n, row_n / big_n
        # G carries the capped inverse norms (_config.FP16_INV_NORM_CAP): each chunk of G^T x-hat is multiplied back
        # by big_n and to w_inv dwhat (the fused weight gradient's input) or dwhat
        g_inv = w_inv.clamp_max(_config.FP16_INV_NORM_CAP)
        dw_rescale = (w_inv / g_inv if finish_w is not None else 1.0 / g_inv) * big_n
    xhat = _scaled_rows(x, x_inv, row_scale, gdt)
    dxhat = None  # the first chunk's GEMM makes it, the others add into it
    dwhat = torch.empty((C, D) if finish_w is None else (0, D), dtype=torch.float32, device=dev)
    w_norm = 1.0 / w_inv if finish_w is None and not scale_g else None  # dwhat: G carries w_inv, taken off again
    dscale = torch.zeros((B,) if need_dscale else (0,), dtype=torch.float32, device=dev)
    dbias = torch.empty((C,) if need_dbias else (0,), dtype=torch.float32, device=dev)
    n_ct = _config.cdiv(chunk, bc)
    ds_part = torch.empty((n_ct, B) if need_dscale else (0,), dtype=torch.float32, device=dev)
    db_part = torch.empty((_config.cdiv(B, bb), chunk) if need_dbias else (0,), dtype=torch.float32, device=dev)
    # ws: the rows are split between two consumer groups, so a per-column sum over them (dbias) cannot be formed
    warp_spec = use_tma and mode == "ws" and _config.warp_specializing_ok(x.dtype, B) and not need_dbias
    persistent = mode == "persistent" or (use_tma and mode == "ws")  # ws: each program loops over class tiles
    grid_rows = _config.cdiv(B, bb)
    meta = dict(TREATMENT=int(treatment), CLAMP=bool(clamp), HAS_BIAS=bias is not None,
                NEED_DSCALE=bool(need_dscale), NEED_DBIAS=bool(need_dbias), GSUM=g_sum is not None,
                UPCAST=_config.interpreting(),
                PRECISION=_config.input_precision(x.dtype), SCALE_G=scale_g, TARGET=g_cos is not None,
                TARGET_AFTER=_config.target_after(g_cos is not None, need_dscale or need_dbias or g_sum is not None,
                                                  persistent, scale_g), **_config.traceable(cfg))
    if use_tma:
        tma.ensure_allocator()
        kernel = _config.launcher(neg_dlogits_tma_kernel)
        meta.update(LOOP=persistent, WARP_SPECIALIZE=warp_spec, EVEN_B=_config.even_flags(B, D, cfg)["EVEN_B"])
        strides = (x.stride(0), w.stride(0))
    else:
        kernel = _config.launcher(neg_dlogits_kernel)
        meta["PERSISTENT"] = persistent
        meta.update(_config.even_flags(B, D, cfg))
        strides = (x.stride(0), x.stride(1), w.stride(0), w.stride(1))
    # bf16: the fused dW's chunk leaves the GEMM in bf16 (fp32 accumulation, one rounding) for the one-pass
    # normalisation backward, not in fp32: half the bytes written and read again (2 of 6 GB a step at C = 1M).
    # fp16 keeps fp32 (its range), and so does the PyTorch normalisation backward of rows wider than the kernel's.
    bf16_chunk = gdt == torch.bfloat16 and finish_w is not None and norm_backward.supports(D)
    # MVLOSS_TRITON_DW_GEMM=fused: one kernel a chunk for the GEMM and the normalisation backward (no chunk buffer)
    fused_dw = (finish_w is not None and not scale_g and _config.dw_gemm_mode() != "cublas"
                and dw_fused.usable(work, xhat, w, finish_w[1]))
    side = (_dw_stream(dev) if finish_w is not None and not fused_dw and norm_backward.supports(D)
            and _side_stream_ok(x) else None)
    if side is not None:
        # two chunk buffers, reused in turn: a buffer's GEMM waits (on the GPU) for the side stream's read of it two
        # chunks before, so the host running ahead cannot make the allocator hold a buffer a chunk
        main = torch.cuda.current_stream(dev)
        dw_bufs = [torch.empty((chunk, D), dtype=gdt if bf16_chunk else torch.float32, device=dev) for _ in range(2)]
        read = [None, None]
    for k, c0 in enumerate(range(0, C, chunk)):
        c1 = min(C, c0 + chunk)
        n_tiles = _config.cdiv(c1 - c0, bc)
        class_programs = _config.dlogits_class_programs(grid_rows, n_tiles, dev) if persistent else n_tiles
        kernel[(grid_rows, class_programs)](
            x, w, x_inv, w_inv, labels, thr, scale, bias if bias is not None else w_inv,
            lse, g_lse, g_lse if g_sum is None else g_sum, g_cos if g_cos is not None else g_lse, work,
            ds_part if need_dscale else work, db_part if need_dbias else work, rn if scale_g else w_inv,
            B, c0, c1, D, chunk, *strides, float(param), FULL=_config.whole_tiles(bc, c1 - c0), **meta)
        g = work[:, : c1 - c0]
        if dxhat is None:
            dxhat = _mm32(g, w[c0:c1])
        else:
            _addmm32_(dxhat, g, w[c0:c1])
        if fused_dw:
            dw_fused.launch(work, c1 - c0, xhat, w, w_inv, finish_w[3], finish_w[2], finish_w[1], c0)
        else:
            buf = None
            if side is not None:
                if read[k % 2] is not None:
                    main.wait_event(read[k % 2])
                buf = dw_bufs[k % 2][: c1 - c0]
            # = w_inv_k dwhat_k (fp16: its capped w_inv_k, over big_n)
            dw_c = _mm_same(g.T, xhat, buf) if bf16_chunk else _mm32(g.T, xhat, buf)
            if scale_g:
                dw_c *= dw_rescale[c0:c1, None]
            if finish_w is None:
                dwhat[c0:c1] = dw_c if scale_g else dw_c * w_norm[c0:c1, None]
            elif side is not None:
                side.wait_stream(main)  # after the chunk's dW GEMM; the next chunk's kernel goes on beside it
                with torch.cuda.stream(side):
                    _finish_chunk(dw_c, c0, c1, w, w_inv, *finish_w[1:])
                read[k % 2] = torch.cuda.Event()
                read[k % 2].record(side)
            else:
                _finish_chunk(dw_c, c0, c1, w, w_inv, *finish_w[1:])
            del dw_c  # before the next chunk's GEMM allocates its own: one chunk buffer alive at a time
        if need_dscale:
            dscale += ds_part[:n_tiles].sum(0)
        if need_dbias:
            dbias[c0:c1] = db_part[:, : c1 - c0].sum(0)
    if side is not None:
        main.wait_stream(side)  # dW is whole before anything after the op
    if scale_g:
        dxhat *= row_n[:, None]
    return dxhat, (dwhat if finish_w is None else finish_w[1]), dscale, dbias


_dw_streams: dict = {}


def _side_stream_ok(x: torch.Tensor) -> bool:
    """MVLOSS_TRITON_DW_STREAM on a real CUDA tensor, nothing tracing (a traced op keeps one stream)."""
    return _config.dw_side_stream() and x.is_cuda and not (torch.compiler.is_compiling() or is_fake(x))


def _dw_stream(device: torch.device):
    """The second stream of ``device`` for the per-chunk normalisation backward (made once)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _dw_streams:
        _dw_streams[key] = torch.cuda.Stream(device=key)
    return _dw_streams[key]


def _scaled_rows(x, x_inv, row_scale, dtype):
    """x-hat = x x_inv (times row_scale when given), in the GEMM dtype: dW's chunk is G^T x-hat."""
    s = x_inv if row_scale is None else x_inv * row_scale
    # one kernel: the product is formed in fp32 (type promotion) and rounded once into the GEMM dtype
    return torch.mul(x, s.to(torch.float32)[:, None], out=torch.empty(x.shape, dtype=dtype, device=x.device))


def _finish_chunk(dw_c, c0, c1, w, w_inv, w_out, normalize_w, eps):
    """A class chunk's w_inv-scaled dwhat (w_inv_k dwhat_k, what G^T x-hat gives) through the normalisation backward
    into w_out[c0:c1], in W's dtype: d/dw of w / max(|w|, eps) applied to dwhat is exactly the projection of
    w_inv dwhat off w-hat, so the scaled chunk needs no rescaling."""
    if norm_backward.supports(dw_c.shape[1]):
        norm_backward.launch(dw_c, w, w_inv, eps, normalize_w, w_out, prescaled=True, row0=c0)
    else:
        dw_c /= w_inv[c0:c1, None]
        w_out[c0:c1] = normalization_backward(dw_c, w[c0:c1], w_inv[c0:c1], eps, normalize_w)
