"""Forward kernel: per-row log-sum-exp (and sum) of the negatives' logits, one streaming pass over W.

Grid (row blocks, class splits).  Program (i, s) owns BLOCK_B rows and the classes [s * chunk, (s + 1) * chunk);
it walks them BLOCK_C at a time: the cosine tile (tl.dot, fp32 accumulation, times both inverse norms), clamp,
mask and treatment h, scale and bias, then folds the tile into a running (max, sum-exp) and the running sum of z,
skipping each row's target column.  It writes one partial (max, sumexp, zsum) per row and split; ``merge`` combines
the splits (O(B x splits) workspace).  Nothing of size B x C exists.
"""
import torch
import triton
import triton.language as tl

from . import _config, forward_tma, tma
from ._ieee_math import exp_neg, split_log
from ._tiles import (LN2, cos_tile, dot_slice, flat_step, fold_tile, row_vectors, running_end, running_start,
                     span_mask)


@triton.jit
def fold_class_tile(x_ptr, w_ptr, rows64, rmask, c0, c_end, xinv, thr, scale, lab, w_inv_ptr, bias_ptr, param,
                    run_m, run_s, run_z, D, sxb, sxd, swc, swd,
                    TREATMENT: tl.constexpr, CLAMP: tl.constexpr, HAS_BIAS: tl.constexpr, ZSUM: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr, FULL: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """The class tile at c0 (FULL: all of it before c_end, so no column masks) into the running sums."""
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = span_mask(cols, c_end, FULL)
    acc = cos_tile(x_ptr, w_ptr, rows64, rmask, cols.to(tl.int64), cmask, D, sxb, sxd, swc, swd,
                   BLOCK_B, BLOCK_C, BLOCK_K, UPCAST, PRECISION, EVEN_K)
    return fold_tile(acc, cols, cmask, xinv, thr, scale, lab, rmask, w_inv_ptr, bias_ptr, param, run_m, run_s, run_z,
                     TREATMENT, CLAMP, HAS_BIAS, ZSUM, UPCAST)


@triton.jit
def neg_lse_kernel(x_ptr, w_ptr, x_inv_ptr, w_inv_ptr, labels_ptr, thr_ptr, scale_ptr, bias_ptr,
                   part_m_ptr, part_s_ptr, part_z_ptr,
                   B, C, D, chunk, sxb, sxd, swc, swd, param, B_BUCKET,
                   TREATMENT: tl.constexpr, CLAMP: tl.constexpr, HAS_BIAS: tl.constexpr, ZSUM: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr, FLAT: tl.constexpr,
                   EVEN_B: tl.constexpr, EVEN_K: tl.constexpr, FULL: tl.constexpr, KEEP_MASKS: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """EVEN_B: BLOCK_B divides B, EVEN_K: BLOCK_K divides D (no row or feature masks); FULL: BLOCK_C divides C and
    the split's chunk, so every split's range is whole class tiles and no tail tile exists.  The whole class tiles
    carry no column masks unless KEEP_MASKS (MVLOSS_TRITON_MASKED=1)."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    param = tl.cast(param, tl.float32)  # Inductor passes Python floats as fp64
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = span_mask(rows, B, EVEN_B)
    rows64 = rows.to(tl.int64)
    xinv, thr, scale, lab = row_vectors(x_inv_ptr, thr_ptr, scale_ptr, labels_ptr, rows, rmask)

    run_m, run_s, run_z = running_start(BLOCK_B)
    c_start = pid_s * chunk
    c_end = tl.minimum(c_start + chunk, C)
    if FLAT:
        # one loop over (class tile, K slice) pairs, the tile folded after its last slice: the software pipeline
        # then runs across class tiles (the next tile's loads overlap this one's epilogue)
        n_k = tl.cdiv(D, BLOCK_K)
        acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
        for it in range(0, tl.cdiv(c_end - c_start, BLOCK_C) * n_k):
            tile, k0, last = flat_step(it, n_k, 0, 1, BLOCK_K)
            cols = c_start + tile * BLOCK_C + tl.arange(0, BLOCK_C)
            cmask = cols < c_end
            acc = dot_slice(x_ptr, w_ptr, rows64, rmask, cols.to(tl.int64), cmask, k0, D, sxb, sxd, swc, swd, acc,
                            BLOCK_K, UPCAST, PRECISION, EVEN_K)
            if last:
                run_m, run_s, run_z = fold_tile(acc, cols, cmask, xinv, thr, scale, lab, rmask, w_inv_ptr, bias_ptr,
                                                param, run_m, run_s, run_z, TREATMENT, CLAMP, HAS_BIAS, ZSUM, UPCAST)
                acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    else:
        # the whole class tiles without column masks, then the range's last, partial one (same tiles, same order)
        c_full = c_start + (c_end - c_start) // BLOCK_C * BLOCK_C
        for c0 in range(c_start, c_full, BLOCK_C):
            run_m, run_s, run_z = fold_class_tile(
                x_ptr, w_ptr, rows64, rmask, c0, c_end, xinv, thr, scale, lab, w_inv_ptr, bias_ptr, param,
                run_m, run_s, run_z, D, sxb, sxd, swc, swd, TREATMENT, CLAMP, HAS_BIAS, ZSUM, UPCAST, PRECISION,
                EVEN_K, not KEEP_MASKS, BLOCK_B, BLOCK_C, BLOCK_K)
        if not FULL and c_full < c_end:
            run_m, run_s, run_z = fold_class_tile(
                x_ptr, w_ptr, rows64, rmask, c_full, c_end, xinv, thr, scale, lab, w_inv_ptr, bias_ptr, param,
                run_m, run_s, run_z, D, sxb, sxd, swc, swd, TREATMENT, CLAMP, HAS_BIAS, ZSUM, UPCAST, PRECISION,
                EVEN_K, False, BLOCK_B, BLOCK_C, BLOCK_K)

    out = pid_s.to(tl.int64) * B + rows64
    run_m, run_s, run_z = running_end(run_m, run_s, run_z)
    tl.store(part_m_ptr + out, run_m, mask=rmask)
    tl.store(part_s_ptr + out, run_s, mask=rmask)
    tl.store(part_z_ptr + out, run_z, mask=rmask)


@triton.jit
def merge_kernel(part_m_ptr, part_s_ptr, part_z_ptr, lse_ptr, lse_wide_ptr, zsum_ptr, B, S, BLOCK: tl.constexpr):
    """lse_i = log sum_s part_s[s, i] 2^part_m[s, i] (part_m in log2 units; -inf when every split is empty) in fp64
    (lse_wide) and rounded to fp32 (lse), zsum_i = sum_s part_z.  The sum is fp32 (each split's term
    2^(part_m - max) by exp without the GPU's approximations, ``_ieee_math``); lse = max ln 2 + ln(sum) is formed in
    fp64, so the backward's probabilities take it unrounded (``_tiles.row_grads``)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < B
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for s in range(0, S):
        m = tl.maximum(m, tl.load(part_m_ptr + s * B + rows, mask=rmask, other=float("-inf")))
    safe = tl.where((m > float("-inf")) & (m < float("inf")), m, 0.0)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, S):
        pm = tl.load(part_m_ptr + s * B + rows, mask=rmask, other=float("-inf"))
        total += tl.load(part_s_ptr + s * B + rows, mask=rmask, other=0.0) * exp_neg((safe - pm) * LN2)
        zsum += tl.load(part_z_ptr + s * B + rows, mask=rmask, other=0.0)
    # total >= 1 where the row has a negative (its max's own term): total = 2^k f, f in [1/sqrt 2, sqrt 2)
    ok = total > 0
    k, lnf = split_log(tl.where(ok, total, 1.0))
    lse = (safe.to(tl.float64) + k.to(tl.float64)) * LN2 + lnf.to(tl.float64)  # fp64 ln 2: exact products
    lse = tl.where(ok, lse, float("-inf"))
    lse = tl.where(m < float("inf"), lse, m.to(tl.float64))  # +inf and NaN as they are
    tl.store(lse_wide_ptr + rows, lse, mask=rmask)
    tl.store(lse_ptr + rows, lse.to(tl.float32), mask=rmask)
    tl.store(zsum_ptr + rows, zsum, mask=rmask)


def merge(part_m: torch.Tensor, part_s: torch.Tensor, part_z: torch.Tensor):
    """Combine the per-split partials (splits, B) into (lse fp32, zsum fp32, lse_wide fp64) (B,): one launch,
    whatever the split count."""
    splits, B = part_m.shape
    lse = torch.empty(B, dtype=torch.float32, device=part_m.device)
    lse_wide = torch.empty(B, dtype=torch.float64, device=part_m.device)
    zsum = torch.empty(B, dtype=torch.float32, device=part_m.device)
    block = 128 if _config.interpreting() else 256
    _config.launcher(merge_kernel)[(_config.cdiv(B, block),)](part_m, part_s, part_z, lse, lse_wide, zsum, B,
                                                              splits, BLOCK=block)
    return lse, zsum, lse_wide


def launch(x, w, x_inv, w_inv, labels, thr, scale, bias, treatment: int, param: float, clamp: bool,
           need_zsum: bool = True):
    """Run the forward kernel; returns (lse, zsum, lse_wide) (B,): lse and zsum fp32, zsum 0 unless ``need_zsum``,
    lse_wide the same lse in fp64 (the backward's).  Callers pass contiguous fp32 per-row vectors."""
    B, D = x.shape
    C = w.shape[0]
    mode = _config.forward_mode()
    kernel, fixed = _config.kernel_for(neg_lse_kernel, "forward")
    use_tma = mode in ("tma", "ws") and fixed and tma.usable(x, w)
    cfg = _config.forward_config(B, D, x.dtype, use_tma)
    splits, chunk = _config.class_split(B, cfg["BLOCK_B"], C, x.device)
    part_m = torch.empty((splits, B), dtype=torch.float32, device=x.device)
    part_s = torch.empty((splits, B), dtype=torch.float32, device=x.device)
    part_z = torch.empty((splits, B), dtype=torch.float32, device=x.device)
    meta = dict(TREATMENT=int(treatment), CLAMP=bool(clamp), HAS_BIAS=bias is not None, ZSUM=bool(need_zsum),
                UPCAST=_config.interpreting(), PRECISION=_config.input_precision(x.dtype),
                KEEP_MASKS=_config.masks_kept())
    if fixed:
        meta.update(_config.traceable(cfg))
    else:
        meta["BLOCK_K"] = cfg["BLOCK_K"]

    def grid(m):
        return (_config.cdiv(B, m["BLOCK_B"]), splits)

    vectors = (x_inv, w_inv, labels, thr, scale, bias if bias is not None else w_inv, part_m, part_s, part_z)
    if use_tma:
        meta["WARP_SPECIALIZE"] = mode == "ws" and _config.warp_specializing_ok(x.dtype, B)
        meta.update(EVEN_B=_config.even_flags(B, D, cfg)["EVEN_B"], FULL=_config.whole_tiles(cfg["BLOCK_C"], C, chunk))
        tma.ensure_allocator()
        _config.launcher(forward_tma.neg_lse_tma_kernel)[grid](
            x, w, *vectors, B, C, D, chunk, x.stride(0), w.stride(0), float(param), _config.batch_bucket(B), **meta)
    else:
        meta["FLAT"] = mode == "flat"
        meta.update(_config.even_flags(B, D, cfg, fixed), FULL=fixed and _config.whole_tiles(cfg["BLOCK_C"], C, chunk))
        _config.launcher(kernel)[grid](
            x, w, *vectors, B, C, D, chunk, x.stride(0), x.stride(1), w.stride(0), w.stride(1), float(param),
            _config.batch_bucket(B), **meta)
    return merge(part_m, part_s, part_z)
