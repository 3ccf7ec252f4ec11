"""The forward kernel with tensor-memory-accelerator loads (MVLOSS_TRITON_FORWARD = tma or ws): a candidate.

Same program, sums and summation order as ``forward_lse.neg_lse_kernel``; x and W tiles come through TMA
descriptors the program makes itself (``tl.make_tensor_descriptor``, ``tma.py``): one bulk copy per tile,
zero-filled past the matrix, no address arithmetic or masks in the load path.  ``ws`` also asks Triton to
warp-specialise the class-tile loop (``tl.range(..., warp_specialize=True)``): on Hopper a producer warp group
issues the copies and two consumer warp groups each own half the row tile's rows, their dots and their epilogue,
so one group's epilogue can run while the other's tensor-core work does.  That needs ``num_warps=4`` (4 warps a
consumer group; with 8 Triton leaves the loop as it is) and a row tile of 128 or more: the compiler splits the
rows between the groups and re-makes x's descriptor for half the rows, which it can do for an in-kernel
descriptor only (a host-side one fails to compile under triton 3.8 and is mis-compiled under 3.6, its 128-row box
copied into 64-row buffers); with 64 rows it cannot split and both groups do all the work.  Each group's rows come
from the program id, not from r0 (``_tiles.tma_row_tile``: Triton shifts the second group's r0).

The launcher falls back to the pointer kernel where descriptors cannot describe the operands (``tma.usable``: a
feature stride other than 1, rows or bases not 16-byte aligned), under MVLOSS_AUTOTUNE=1 and while torch.compile
traces (fake tensors; the descriptors live in a global scratch buffer Triton's launcher allocates).
"""
import triton
import triton.language as tl

from ._tiles import cos_tile_tma, fold_tile, row_vectors, running_end, running_start, span_mask, tma_row_tile


@triton.jit
def fold_class_tile_tma(x_desc, w_desc, r0, c0, c_end, xinv, thr, scale, lab, rmask, w_inv_ptr, bias_ptr, param,
                        run_m, run_s, run_z, D, TREATMENT: tl.constexpr, CLAMP: tl.constexpr, HAS_BIAS: tl.constexpr,
                        ZSUM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, WHOLE: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """The class tile at c0 into the running sums.  The copy of W past c_end (the next split's classes, or zeros)
    is masked out here, unless the tile is WHOLE (all of it before c_end)."""
    acc = cos_tile_tma(x_desc, w_desc, r0, c0, D, BLOCK_B, BLOCK_C, BLOCK_K, UPCAST, PRECISION)
    cols = c0 + tl.arange(0, BLOCK_C)
    return fold_tile(acc, cols, span_mask(cols, c_end, WHOLE), xinv, thr, scale, lab, rmask, w_inv_ptr, bias_ptr,
                     param, run_m, run_s, run_z, TREATMENT, CLAMP, HAS_BIAS, ZSUM, UPCAST)


@triton.jit
def neg_lse_tma_kernel(x_ptr, w_ptr, x_inv_ptr, w_inv_ptr, labels_ptr, thr_ptr, scale_ptr, bias_ptr,
                       part_m_ptr, part_s_ptr, part_z_ptr,
                       B, C, D, chunk, sxb, swc, param, B_BUCKET,
                       TREATMENT: tl.constexpr, CLAMP: tl.constexpr, HAS_BIAS: tl.constexpr, ZSUM: tl.constexpr,
                       UPCAST: tl.constexpr,
                       PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, EVEN_B: tl.constexpr,
                       FULL: tl.constexpr, KEEP_MASKS: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """EVEN_B, FULL and KEEP_MASKS as in forward_lse.neg_lse_kernel.  The tma form walks a split's whole class tiles
    without column masks and its partial last tile after them; the ws form keeps one masked loop (the one loop
    Triton's partitioner is given)."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    param = tl.cast(param, tl.float32)
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[B, D], strides=[sxb, 1], block_shape=[BLOCK_B, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[C, D], strides=[swc, 1], block_shape=[BLOCK_C, BLOCK_K])
    r0, rows = tma_row_tile(pid_b, BLOCK_B)
    rmask = span_mask(rows, B, EVEN_B)  # EVEN_B: BLOCK_B divides B (no row masks)
    xinv, thr, scale, lab = row_vectors(x_inv_ptr, thr_ptr, scale_ptr, labels_ptr, rows, rmask)

    run_m, run_s, run_z = running_start(BLOCK_B)
    c_start = pid_s * chunk
    c_end = tl.minimum(c_start + chunk, C)
    if WARP_SPECIALIZE:
        for c0 in tl.range(c_start, c_end, BLOCK_C, warp_specialize=True):
            run_m, run_s, run_z = fold_class_tile_tma(
                x_desc, w_desc, r0, c0, c_end, xinv, thr, scale, lab, rmask, w_inv_ptr, bias_ptr, param, run_m,
                run_s, run_z, D, TREATMENT, CLAMP, HAS_BIAS, ZSUM, UPCAST, PRECISION, False, BLOCK_B, BLOCK_C, BLOCK_K)
    else:
        c_full = c_start + (c_end - c_start) // BLOCK_C * BLOCK_C
        for c0 in range(c_start, c_full, BLOCK_C):
            run_m, run_s, run_z = fold_class_tile_tma(
                x_desc, w_desc, r0, c0, c_end, xinv, thr, scale, lab, rmask, w_inv_ptr, bias_ptr, param, run_m,
                run_s, run_z, D, TREATMENT, CLAMP, HAS_BIAS, ZSUM, UPCAST, PRECISION, not KEEP_MASKS,
                BLOCK_B, BLOCK_C, BLOCK_K)
        if not FULL and c_full < c_end:
            run_m, run_s, run_z = fold_class_tile_tma(
                x_desc, w_desc, r0, c_full, c_end, xinv, thr, scale, lab, rmask, w_inv_ptr, bias_ptr, param, run_m,
                run_s, run_z, D, TREATMENT, CLAMP, HAS_BIAS, ZSUM, UPCAST, PRECISION, False, BLOCK_B, BLOCK_C, BLOCK_K)

    out = pid_s.to(tl.int64) * B + rows.to(tl.int64)
    run_m, run_s, run_z = running_end(run_m, run_s, run_z)
    tl.store(part_m_ptr + out, run_m, mask=rmask)
    tl.store(part_s_ptr + out, run_s, mask=rmask)
    tl.store(part_z_ptr + out, run_z, mask=rmask)
