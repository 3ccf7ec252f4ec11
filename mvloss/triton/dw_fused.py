"""A class chunk's weight gradient in one kernel: the dW GEMM G^T X-hat with W's normalisation backward in its
epilogue (MVLOSS_TRITON_DW_GEMM=fused, a candidate; the default is cuBLAS's GEMM, then ``norm_backward``).

Program i owns rows [i BLOCK_M, (i + 1) BLOCK_M) of the chunk and all D columns.  Pass 1 walks the column tiles in one
loop over (column tile, K slice) pairs (so the software pipeline runs across tiles) and stores each finished tile,
d = w_inv dwhat (what G^T X-hat gives, G carrying w_inv), in the output's dtype.  Two passes over the row block,
just written and still in L2, then sum each row's d . w-hat and subtract the projection, d - (d . w-hat) w-hat, on
rows whose norm is above eps (below it the map is linear): ``norm_backward``'s map.  So the chunk never leaves the
GEMM for a separate pass through DRAM, and the bandwidth-bound normalisation backward (~1 ms a step at C = 1M,
B 1024, D 512 on an H100; NOTES.md, fifteenth session) goes, against the cost of a Triton GEMM instead of cuBLAS's.

The same map on the same rounded chunk as the default (cuBLAS's bf16 chunk, one rounding of the fp32 sums); only
the GEMM's summation order differs.  Deterministic: no atomics, fixed order.
"""
import torch
import triton
import triton.language as tl

from . import _config, tma
from ._tiles import cast_for, flat_step, span_mask

MAX_D = 8192  # as norm_backward: wider rows take the default path
EPI_N = 32  # columns a step of the passes over the row block: few registers (formed in pass 1 from the 128 x 128
# accumulator instead, the row dots took the kernel to ~250 registers on sm_90, one program an SM)


@triton.jit
def dw_fused_kernel(g_ptr, xh_ptr, w_ptr, w_inv_ptr, out_ptr, B, n, D, c0, ldg, sxb, swc, sor, eps,
                    NORMALIZE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN_M: tl.constexpr,
                    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, EPI_N: tl.constexpr, TMA: tl.constexpr, ACC_DOT: tl.constexpr):
    """out[c0 + r] = the normalisation backward of (G^T X-hat)[r] for chunk rows r of this program; G is B x n
    (row stride ldg), X-hat B x D, W and out C x D (row strides swc, sor; unit feature strides).  EVEN_M / EVEN_N /
    EVEN_K: BLOCK_M divides n, BLOCK_N and EPI_N divide D, BLOCK_K divides B (no masks there).  TMA: the GEMM's
    G and X-hat tiles come through descriptors the program makes (tma.py; zero-filled past the matrices).  ACC_DOT:
    each row's d . w-hat summed in pass 1 from the fp32 accumulator (W's tile read there), so one pass over the rows
    follows, not two (a 128 x 64 tile keeps it at 128 registers; 128 x 128 takes 248 on sm_90)."""
    if TMA:
        g_desc = tl.make_tensor_descriptor(g_ptr, shape=[B, n], strides=[ldg, 1], block_shape=[BLOCK_K, BLOCK_M])
        x_desc = tl.make_tensor_descriptor(xh_ptr, shape=[B, D], strides=[sxb, 1], block_shape=[BLOCK_K, BLOCK_N])
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = span_mask(local, n, EVEN_M)
    local64 = local.to(tl.int64)
    crow64 = local64 + c0
    n_k = tl.cdiv(B, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dot = tl.zeros((BLOCK_M,), dtype=tl.float32)  # each row's sum of d w (ACC_DOT; pass 2 otherwise)
    for it in range(0, tl.cdiv(D, BLOCK_N) * n_k):
        nt, k0, last = flat_step(it, n_k, 0, 1, BLOCK_K)
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = span_mask(ks, B, EVEN_K)
        ks64 = ks.to(tl.int64)
        ds = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        dmask = span_mask(ds, D, EVEN_N)
        if TMA:
            a = g_desc.load([k0, tl.program_id(0) * BLOCK_M])
            b = x_desc.load([k0, nt * BLOCK_N])
        else:
            a = tl.load(g_ptr + ks64[:, None] * ldg + local64[None, :], mask=kmask[:, None] & mmask[None, :],
                        other=0.0)
            b = tl.load(xh_ptr + ks64[:, None] * sxb + ds[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
        if last:
            m = mmask[:, None] & dmask[None, :]
            if NORMALIZE and ACC_DOT:
                dot += tl.sum(acc * tl.load(w_ptr + crow64[:, None] * swc + ds[None, :], mask=m, other=0.0), axis=1)
            tl.store(out_ptr + crow64[:, None] * sor + ds[None, :], cast_for(acc, out_ptr, UPCAST), mask=m)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if NORMALIZE:
        inv = tl.load(w_inv_ptr + crow64, mask=mmask, other=1.0)
        tl.debug_barrier()  # pass 1's stores, made by other threads of the program, before they are read back
        if ACC_DOT:
            dot = dot * inv
        else:
            for n0 in range(0, D, EPI_N):
                d, that, m, offs = _rows_slice(out_ptr, w_ptr, crow64, mmask, inv, n0, D, sor, swc, EVEN_N, EPI_N)
                dot += tl.sum(d * that, axis=1)
        above = (1.0 / inv) > eps
        for n0 in range(0, D, EPI_N):
            d, that, m, offs = _rows_slice(out_ptr, w_ptr, crow64, mmask, inv, n0, D, sor, swc, EVEN_N, EPI_N)
            d = tl.where(above[:, None], d - dot[:, None] * that, d)
            tl.store(out_ptr + offs, cast_for(d, out_ptr, UPCAST), mask=m)


@triton.jit
def _rows_slice(out_ptr, w_ptr, crow64, mmask, inv, n0, D, sor, swc, EVEN_N: tl.constexpr, EPI_N: tl.constexpr):
    """Columns [n0, n0 + EPI_N) of the program's rows: d (out's, fp32), w-hat, the mask and out's offsets."""
    ds = n0 + tl.arange(0, EPI_N)
    m = mmask[:, None] & span_mask(ds, D, EVEN_N)[None, :]
    offs = crow64[:, None] * sor + ds[None, :]
    d = tl.load(out_ptr + offs, mask=m, other=0.0).to(tl.float32)
    that = tl.load(w_ptr + crow64[:, None] * swc + ds[None, :], mask=m, other=0.0).to(tl.float32) * inv[:, None]
    return d, that, m, offs


def usable(g: torch.Tensor, xhat: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the fused kernel takes this chunk: bf16 or fp32 (fp16's rescaled chunk keeps the default path), rows
    of at most MAX_D features, unit feature strides (G's too: it is read by columns of rows), one dtype."""
    return (w.dtype in (torch.bfloat16, torch.float32) and g.dtype == xhat.dtype == w.dtype == out.dtype
            and w.shape[1] <= MAX_D and all(t.stride(1) == 1 for t in (g, xhat, w, out)))


def launch(work: torch.Tensor, n: int, xhat: torch.Tensor, w: torch.Tensor, w_inv: torch.Tensor, eps: float,
           normalize: bool, out: torch.Tensor, c0: int) -> torch.Tensor:
    """Write rows [c0, c0 + n) of ``out`` (C x D, W's dtype): the normalisation backward (``normalize``) of
    (G^T X-hat)[:n], G = ``work[:, :n]`` (B x n of the workspace, which carries w_inv), X-hat ``xhat`` (B x D).
    Whole tensors and offsets, no slices, as ``norm_backward.launch``."""
    B, D = xhat.shape
    use_tma = _config.dw_gemm_mode() == "fused_tma" and tma.usable(work, xhat)
    if use_tma:
        tma.ensure_allocator()
    cfg = _config.dw_fused_config(D, w.dtype)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (_config.cdiv(n, bm),)
    even = not _config.masks_kept()
    _config.launcher(dw_fused_kernel, work, xhat, w, w_inv, out)[grid](
        work, xhat, w, w_inv, out, B, n, D, int(c0), work.stride(0), xhat.stride(0), w.stride(0), out.stride(0),
        float(eps), NORMALIZE=bool(normalize), UPCAST=_config.interpreting(),
        PRECISION=_config.input_precision(w.dtype), EVEN_M=even and n % bm == 0,
        EVEN_N=even and D % bn == 0 and D % EPI_N == 0, EVEN_K=even and B % bk == 0, EPI_N=EPI_N,
        TMA=use_tma, **_config.traceable(cfg))
    return out
