"""Shared @triton.jit helpers of the kernels: the cosine tile, the negative treatment h and h', the logit tile.
Logits inside the kernels are in log2 units (z log2 e, the factor carried by the row scale), so each exp is a bare
exp2; the forward's partials leave in natural units.

Every helper works on fp32 tiles; loads of fp16/bf16 operands go straight to ``tl.dot`` (fp32 accumulation), or are
upcast first when ``UPCAST`` is set (the interpreter's ``tl.dot`` is wrong on half operands).
"""
import triton
import triton.language as tl

from . import _config

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
FP16_INV_CAP = tl.constexpr(_config.FP16_INV_NORM_CAP)


@triton.jit
def fp16_safe_inv(inv, FP16: tl.constexpr):
    """An inverse norm as an fp16 gradient tile may carry it: capped at _config.FP16_INV_NORM_CAP (see there)."""
    if FP16:
        out = tl.minimum(inv, FP16_INV_CAP)
    else:
        out = inv
    return out


@triton.jit
def span_mask(idx, end, FULL: tl.constexpr):
    """idx < end; all true, with no compare, where the caller knows the span is whole (FULL): the loads and selects
    it guards then carry no predicate (a tile of a 1024-row batch, a class tile before the range's last)."""
    if FULL:
        m = tl.full(idx.shape, 1, tl.int1)
    else:
        m = idx < end
    return m


@triton.jit
def tma_row_tile(pid_b, BLOCK_B: tl.constexpr):
    """(r0, rows) of the TMA kernels' row tile: r0 the x copies' row coordinate, rows the row indices, made from the
    program id and not from r0.  When Triton (3.6 and 3.8) warp-specialises a loop and splits the rows between its
    two consumer groups, it rewrites every use of r0 in the second group to r0 + BLOCK_B / 2 and also starts that
    group's index range at BLOCK_B / 2: rows = r0 + tl.arange(0, BLOCK_B) would then be shifted twice (that group's
    loads and stores a half tile too far, seen on an H100).  Formed in int64 so that no int32 product is shared with
    r0, then narrowed: int64 rows cost the tma forward 7 registers under 3.6, its second program per SM."""
    return pid_b * BLOCK_B, (pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int32)


@triton.jit
def dot_slice(x_ptr, w_ptr, rows64, rmask, cols64, cmask, k0, D, sxb, sxd, swc, swd, acc,
              BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr):
    """acc + x[rows, k0:k0+BLOCK_K] . w[cols, k0:k0+BLOCK_K]^T (fp32 accumulation): one step of the cosine tile.
    EVEN_K: BLOCK_K divides D (no feature mask)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    kmask = span_mask(ks, D, EVEN_K)
    ks64 = ks.to(tl.int64)
    xt = tl.load(x_ptr + rows64[:, None] * sxb + ks64[None, :] * sxd,
                 mask=rmask[:, None] & kmask[None, :], other=0.0)
    wt = tl.load(w_ptr + cols64[None, :] * swc + ks64[:, None] * swd,
                 mask=kmask[:, None] & cmask[None, :], other=0.0)
    if UPCAST:
        xt = xt.to(tl.float32)
        wt = wt.to(tl.float32)
    return tl.dot(xt, wt, acc, input_precision=PRECISION)


@triton.jit
def flat_step(it, n_k, first, stride, BLOCK_K: tl.constexpr):
    """Step ``it`` of a loop flattened over (class tile, K slice) pairs, the tiles first, first + stride, ...:
    (tile, k0, whether this slice finishes the tile)."""
    step = it // n_k
    k0 = (it - step * n_k) * BLOCK_K
    return first + step * stride, k0, it - step * n_k == n_k - 1


@triton.jit
def cos_tile(x_ptr, w_ptr, rows64, rmask, cols64, cmask, D, sxb, sxd, swc, swd,
             BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
             UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr):
    """x[rows] . w[cols]^T over the whole feature dimension, fp32 accumulation (BLOCK_B x BLOCK_C)."""
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        acc = dot_slice(x_ptr, w_ptr, rows64, rmask, cols64, cmask, k0, D, sxb, sxd, swc, swd, acc,
                        BLOCK_K, UPCAST, PRECISION, EVEN_K)
    return acc


@triton.jit
def cos_tile_tma(x_desc, w_desc, r0, c0, D, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``cos_tile`` with x and W tiles moved by TMA copies (descriptors made in the kernel, tma.py): rows r0.. of x,
    c0.. of W, zero-filled past either matrix; the same K order, so the same sums."""
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        xt = x_desc.load([r0, k0])
        wt = w_desc.load([c0, k0])
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt.T, acc, input_precision=PRECISION)
    return acc


@triton.jit
def running_start(BLOCK_B: tl.constexpr):
    """The rows' running (max, sum-exp, sum of z) before any class tile: (-inf, 0, 0)."""
    return (tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32), tl.zeros((BLOCK_B,), dtype=tl.float32),
            tl.zeros((BLOCK_B,), dtype=tl.float32))


@triton.jit
def treat(c, param, TREATMENT: tl.constexpr):
    """h(c) of mvloss.negatives.Treatment (0 NONE, 1 FIXED, 2 ADAPTIVE, 3 CURRICULAR, 4 FILTER)."""
    if TREATMENT == 1:
        h = c + param
    elif TREATMENT == 2:
        h = (param + 1.0) * c + param
    elif TREATMENT == 3:
        h = c * (param + c)
    elif TREATMENT == 4:
        h = tl.zeros_like(c)
    else:
        h = c
    return h


@triton.jit
def dc_factor(c, thr, scale, param, TREATMENT: tl.constexpr, EXACT: tl.constexpr):
    """dc / dz = s h'(c) on hard entries (c > thr), s elsewhere (the row scales times h' of mvloss.negatives); where
    h' is a constant the product is formed per row, so an entry costs one select."""
    s = scale[:, None]
    if TREATMENT == 2:
        f = where_gt(c, thr[:, None], s * (param + 1.0), s, EXACT)
    elif TREATMENT == 3:
        f = where_gt(c, thr[:, None], s * (param + 2.0 * c), s, EXACT)
    elif TREATMENT == 4:
        f = where_gt(c, thr[:, None], 0.0, s, EXACT)
    else:
        f = s
    return f


@triton.jit
def row_vectors(x_inv_ptr, thr_ptr, scale_ptr, labels_ptr, rows, rmask):
    """The row tile's inverse norms, mask thresholds, scales and labels (-1 outside the batch: matches no class)."""
    xinv = tl.load(x_inv_ptr + rows, mask=rmask, other=0.0)
    thr = tl.load(thr_ptr + rows, mask=rmask, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=rmask, other=0.0)
    lab = tl.load(labels_ptr + rows, mask=rmask, other=-1)
    return xinv, thr, scale, lab


@triton.jit
def row_grads(lse_ptr, g_lse_ptr, g_sum_ptr, rows, rmask, GSUM: tl.constexpr):
    """The row tile's (lse2, g_lse, g_sum): the forward's fp64 lse as lse2, lse log2 e rounded to fp32, with what the
    rounding dropped, lo = lse log2 e - lse2, folded into g_lse as the factor 2^-lo, so p = 2^(z2 - lse2) g_lse is
    relative to the row's exact lse, not to its fp32 rounding (an error of ~ulp(|lse|) in every p of the row,
    NOTES.md, nineteenth session); without GSUM the logit sum has no gradient (0, nothing read).  lse = -inf (no
    negatives): lse2 = 0."""
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0).to(tl.float64)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    lse2_64 = lse * LOG2E  # an fp64 multiply by fp64's log2 e (the constant is kept in fp64)
    lse2 = lse2_64.to(tl.float32)
    lo = lse2_64 - lse2.to(tl.float64)
    lo = tl.where(lo == lo, lo, 0.0).to(tl.float32)  # 0 for a NaN or infinite lse (the tile's p carries it)
    g_lse = tl.load(g_lse_ptr + rows, mask=rmask, other=0.0) * (1.0 - lo * LN2)  # 2^-lo, |lo| <= ulp(lse2) / 2
    if GSUM:
        g_sum = tl.load(g_sum_ptr + rows, mask=rmask, other=0.0)
    else:
        g_sum = tl.zeros_like(g_lse)
    return lse2, g_lse, g_sum


@triton.jit
def column_vectors(w_inv_ptr, bias_ptr, cols, cmask, HAS_BIAS: tl.constexpr):
    """The class tile's inverse norms and bias (the inverse norms stand in for an absent bias)."""
    winv = tl.load(w_inv_ptr + cols, mask=cmask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        bias = winv
    return winv, bias


@triton.jit
def exp2_ftz(v, EXACT: tl.constexpr):
    """2**v of the sum-exp and the softmax tiles, whose logits are kept in log2 units (z log2 e: the scale carries
    the factor, so no multiply an element).  On a GPU ``ex2.approx.ftz``: the approximation tl.exp uses too, with
    results below 2**-126 flushed to zero (they cannot move an fp32 sum that holds a 1); without ftz ptxas spends
    three more instructions an element on them.  ``EXACT`` (the kernels' UPCAST flag: the interpreter, which cannot
    run PTX) takes tl.exp2."""
    if EXACT:
        out = tl.exp2(v)
    else:
        out = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [v], dtype=tl.float32, is_pure=True,
                                        pack=1)
    return out


@triton.jit
def mul_rn(a, b, EXACT: tl.constexpr):
    """a * b rounded to fp32 on its own: on a GPU ``mul.rn.f32``, which neither LLVM nor ptxas fuses into a later add
    (an FMA skips the product's rounding).  EXACT (the interpreter, where every op rounds): a * b."""
    if EXACT:
        out = a * b
    else:
        out = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True,
                                        pack=1)
    return out


@triton.jit
def add_rn(a, b, EXACT: tl.constexpr):
    """a + b rounded on its own (``add.rn.f32``: no FMA absorbs it); EXACT: a + b."""
    if EXACT:
        out = a + b
    else:
        out = tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True,
                                        pack=1)
    return out


@triton.jit
def cast_for(x, ptr, INTERPRETED: tl.constexpr):
    """fp32 ``x`` in ``ptr``'s element type, rounded to nearest even, for a store.  A GPU's conversion rounds so; the
    interpreter's to bf16 truncates (triton 3.6 and 3.8), so there (INTERPRETED) it is rounded first on its bits and
    the truncation then exact: the interpreter's bf16 outputs are a GPU's."""
    if INTERPRETED and ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        up = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x == x, up.to(tl.float32, bitcast=True), x)  # NaN kept as it is
    return x.to(ptr.dtype.element_ty)


@triton.jit
def where_gt(a, b, x, y, EXACT: tl.constexpr):
    """x where a > b, else y.  On a GPU one PTX block an element: LLVM then cannot vectorise the compares, which it
    does for a tile's tl.where (a <32 x i1> mask), and a vector of compare bits costs ~3 instructions an element on
    sm_90 (packed into an integer, each bit unpacked before its select).  EXACT (the interpreter): tl.where."""
    if EXACT:
        out = tl.where(a > b, x, y)
    else:
        out = tl.inline_asm_elementwise("{ .reg .pred p; setp.gt.f32 p, $1, $2; selp.f32 $0, $3, $4, p; }",
                                        "=r,r,r,r,r", [a, b, x, y], dtype=tl.float32, is_pure=True, pack=1)
    return out


@triton.jit
def where_within_one(a, x, EXACT: tl.constexpr):
    """x where |a| <= 1, else -inf (as where_gt: the compare in a PTX block on a GPU)."""
    if EXACT:
        out = tl.where(tl.abs(a) <= 1.0, x, float("-inf"))
    else:
        out = tl.inline_asm_elementwise("{ .reg .pred p; .reg .f32 t; abs.f32 t, $1; setp.le.f32 p, t, 0f3F800000; "
                                        "selp.f32 $0, $2, 0fFF800000, p; }",
                                        "=r,r,r", [a, x], dtype=tl.float32, is_pure=True, pack=1)
    return out


@triton.jit
def where_ne(a, b, x, y, EXACT: tl.constexpr):
    """x where the int32 a != b, else y (as where_gt: the compare in a PTX block on a GPU)."""
    if EXACT:
        out = tl.where(a != b, x, y)
    else:
        out = tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.s32 p, $1, $2; selp.f32 $0, $3, $4, p; }",
                                        "=r,r,r,r,r", [a, b, x, y], dtype=tl.float32, is_pure=True, pack=1)
    return out


@triton.jit
def negatives_only(x, other, rmask, cmask, cols, lab, LABELS: tl.constexpr, EXACT: tl.constexpr):
    """x on the in-bounds entries that are not the row's target column, ``other`` elsewhere (a label of -1 matches
    none); without LABELS on every in-bounds entry (the caller handles the target columns).  ``cols``: the int32
    class indices; the label compare is in int32 (one instruction an element instead of three for int64)."""
    x = tl.where(rmask[:, None] & cmask[None, :], x, other)
    if LABELS:
        x = where_ne(cols[None, :], lab.to(tl.int32)[:, None], x, other, EXACT)
    return x


@triton.jit
def logit_tile(acc, xinv, winv, thr, scale, bias, param, TREATMENT: tl.constexpr, CLAMP: tl.constexpr,
               HAS_BIAS: tl.constexpr, EXACT: tl.constexpr):
    """From the raw dot tile: (raw cos, cos, treated u, logits in log2 units z log2 e); h applies where c > thr."""
    raw = acc * xinv[:, None] * winv[None, :]
    if CLAMP:
        c = tl.minimum(tl.maximum(raw, -1.0), 1.0)
    else:
        c = raw
    if TREATMENT == 0:
        u = c
    else:
        u = where_gt(c, thr[:, None], treat(c, param, TREATMENT), c, EXACT)
    # z2 rounded once, alike in every kernel: the forward folds it after a select, the backward subtracts lse from
    # it, and an FMA of the product into that subtraction (Triton's LLVM contracts mul + sub; ptxas may too) gave the
    # backward a z the forward's lse never saw, ~ulp(z) of every logit (fp32 on a GPU, NOTES.md, sixteenth session)
    z2 = mul_rn((scale * LOG2E)[:, None], u, EXACT)
    if HAS_BIAS:
        z2 = add_rn(z2, (bias * LOG2E)[None, :], EXACT)
    return raw, c, u, z2


@triton.jit
def dlogit_tile(raw, c, z2, rmask, cmask, cols, lab, thr, lse2, g_lse, g_sum, scale, param, TREATMENT: tl.constexpr,
                CLAMP: tl.constexpr, GSUM: tl.constexpr, LABELS: tl.constexpr, UPCAST: tl.constexpr):
    """(dz, dc) of the contract: dz = g_lse exp(z - lse) + g_sum on negatives (0 elsewhere), dc = dz s (h' if hard)
    (0 where the clamp cut the cosine).  ``z2``: the logits in log2 units (logit_tile); lse2 and g_lse: row_grads'."""
    p = exp2_ftz(negatives_only(z2 - lse2[:, None], float("-inf"), rmask, cmask, cols, lab, LABELS, UPCAST), UPCAST)
    dz = g_lse[:, None] * p  # 0 off the negatives
    if GSUM:
        dz = negatives_only(dz + g_sum[:, None], 0.0, rmask, cmask, cols, lab, LABELS, UPCAST)
    dc = dz * dc_factor(c, thr, scale, param, TREATMENT, UPCAST)
    if CLAMP:  # c == raw exactly where raw is in [-1, 1]
        dc = tl.where(c == raw, dc, 0.0)
    return dz, dc


@triton.jit
def dc_tile(acc, xinv, winv, thr, scale, bias, param, rmask, cmask, cols, lab, lse2, g_lse, TREATMENT: tl.constexpr,
            CLAMP: tl.constexpr, HAS_BIAS: tl.constexpr, LABELS: tl.constexpr, UPCAST: tl.constexpr):
    """dc of dlogit_tile, from the raw dot tile, where nothing else is wanted (no logit-sum gradient, no dz partials:
    a training step's flags), in fewer instructions an entry:
    - g_lse is folded into the row factor: dc = p (g_lse s h');
    - the clamp is not applied: its zeros come from p = 0 where |raw| > 1, in the select that already removes the
      entries negatives_only excludes, and everywhere else the clamped cosine is raw itself (dz would be 0 at the cut
      entries, which is why dz's readers take the full form)."""
    raw, c, u, z2 = logit_tile(acc, xinv, winv, thr, scale, bias, param, TREATMENT, False, HAS_BIAS, UPCAST)
    arg = negatives_only(z2 - lse2[:, None], float("-inf"), rmask, cmask, cols, lab, LABELS, UPCAST)
    if CLAMP:
        arg = where_within_one(raw, arg, UPCAST)
    return exp2_ftz(arg, UPCAST) * dc_factor(raw, thr, g_lse * scale, param, TREATMENT, UPCAST)


@triton.jit
def gradient_tile(acc, xinv, winv, thr, scale, bias, param, rmask, cmask, cols, lab, lse2, g_lse, g_sum,
                  TREATMENT: tl.constexpr, CLAMP: tl.constexpr, HAS_BIAS: tl.constexpr, GSUM: tl.constexpr,
                  WANT_DZ: tl.constexpr, LABELS: tl.constexpr, UPCAST: tl.constexpr):
    """(u, dz, dc) of the raw dot tile, for the recompute kernels.  WANT_DZ (something reads dz or u: dscale, dbias,
    the logit-sum gradient): the full form, logit_tile then dlogit_tile; otherwise dc alone (dc_tile), whose u and
    dz are dc itself, stand-ins nothing reads.  LABELS: as in negatives_only."""
    if WANT_DZ:
        tl.static_assert(LABELS, "dz's readers need the target columns out of dz (TARGET_AFTER is dc alone's)")
        raw, c, u, z2 = logit_tile(acc, xinv, winv, thr, scale, bias, param, TREATMENT, CLAMP, HAS_BIAS, UPCAST)
        dz, dc = dlogit_tile(raw, c, z2, rmask, cmask, cols, lab, thr, lse2, g_lse, g_sum, scale, param, TREATMENT,
                             CLAMP, GSUM, LABELS, UPCAST)
    else:
        dc = dc_tile(acc, xinv, winv, thr, scale, bias, param, rmask, cmask, cols, lab, lse2, g_lse, TREATMENT, CLAMP,
                     HAS_BIAS, LABELS, UPCAST)
        u = dc
        dz = dc
    return u, dz, dc


@triton.jit
def dc_scale(g_lse, g_sum, scale, param, TREATMENT: tl.constexpr):
    """Per-row normaliser n_i of dc for the half-precision gradient GEMMs: (|g_lse| + |g_sum|) |s| max|h'| bounds
    |dc_ik| (p <= 1; for the curricular h' it assumes |c| <= 1), so dc / n lies in [-1, 1] whatever the reduction or
    the loss scale: no fp16 underflow or overflow when dc is rounded for tl.dot.  1 where the row has no gradient."""
    if TREATMENT == 2:
        hmax = tl.maximum(tl.abs(param + 1.0), 1.0)
    elif TREATMENT == 3:
        hmax = tl.maximum(tl.abs(param) + 2.0, 1.0)
    else:
        hmax = 1.0
    n = (tl.abs(g_lse) + tl.abs(g_sum)) * tl.abs(scale) * hmax
    return tl.where(n > 0, n, 1.0)


@triton.jit
def fold_tile(acc, cols, cmask, xinv, thr, scale, lab, rmask, w_inv_ptr, bias_ptr, param, run_m, run_s, run_z,
              TREATMENT: tl.constexpr, CLAMP: tl.constexpr, HAS_BIAS: tl.constexpr, ZSUM: tl.constexpr,
              UPCAST: tl.constexpr):
    """One finished cosine tile into the rows' running (max, sum-exp, sum of z), the target columns skipped, all in
    log2 units (running_end converts): run_m = max z log2 e, run_s = sum 2**(z log2 e - run_m), run_z = sum z log2 e
    (only with ZSUM: label smoothing is its one reader)."""
    winv, bias = column_vectors(w_inv_ptr, bias_ptr, cols, cmask, HAS_BIAS)
    raw, c, u, z2 = logit_tile(acc, xinv, winv, thr, scale, bias, param, TREATMENT, CLAMP, HAS_BIAS, UPCAST)
    if ZSUM:
        run_z += tl.sum(negatives_only(z2, 0.0, rmask, cmask, cols, lab, True, UPCAST), axis=1)
    zm = negatives_only(z2, float("-inf"), rmask, cmask, cols, lab, True, UPCAST)
    new_m = tl.maximum(run_m, tl.max(zm, axis=1))
    safe = tl.where(new_m == float("-inf"), 0.0, new_m)
    run_s = run_s * tl.exp2(run_m - safe) + tl.sum(exp2_ftz(zm - safe[:, None], UPCAST), axis=1)
    return new_m, run_s, run_z


@triton.jit
def running_end(run_m, run_s, run_z):
    """The running (max, sum-exp, sum of z) as the forward's partials: max z log2 e (log2 units still: the merge
    forms lse in fp64 from it), sum exp(z - max z), sum z."""
    return run_m, run_s, run_z * LN2
