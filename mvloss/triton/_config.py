"""Launch configurations for the Triton kernels (no Triton import here: this module is imported by the registry).

A small fixed table keyed on (D, dtype, batch bucket) picks the tile sizes; ``MVLOSS_AUTOTUNE=1`` swaps in a
``triton.autotune`` search over a larger set (keyed on D, the batch bucket and the input dtypes).  Under
``TRITON_INTERPRET=1`` one small configuration is used so the CPU interpreter stays fast.

The bf16 tiles were compared on an H100 at C = 100k (bench/triton_sweep.py; bench/results/nvidia-h100-80gb-hbm3/
sweep_run*.json); the rest is chosen by the sm_90 compile check alone.  See README.md in this folder.
"""
from __future__ import annotations

import functools
import json
import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

# Every BLOCK_C used by any configuration divides this, so a class split of a multiple of it suits all of them.
SPLIT_ALIGN = 256


def cdiv(a, b):
    """ceil(a / b) of host integers (SymInts under torch.compile too).  triton.cdiv is a constexpr_function: ~2 us a
    host call (triton 3.6 and 3.8), a dozen calls a step."""
    return -(-a // b)


@functools.lru_cache(maxsize=1)
def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter: read once, as Triton itself decides it when the kernels are
    defined (a dozen host calls a step otherwise read the environment)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    return os.environ.get("MVLOSS_AUTOTUNE", "0") == "1" and not interpreting()


def _choice(var: str, choices: tuple, default: str) -> str:
    """The value of environment variable ``var``, one of ``choices`` (case-insensitive), or a ValueError naming it."""
    value = os.environ.get(var, default).lower()
    if value not in choices:
        raise ValueError(f"{var}={value!r} is not one of {choices}")
    return value


FP32_PRECISIONS = ("ieee", "tf32x3", "tf32")
BACKWARD_MODES = ("gemm", "recompute")
FORWARD_MODES = ("tiles", "flat", "tma", "ws")
DLOGITS_MODES = ("tiles", "persistent", "tma", "ws")
DW_GEMM_MODES = ("cublas", "fused", "fused_tma")


def fp32_precision() -> str:
    """tl.dot precision for fp32 inputs: MVLOSS_TRITON_FP32_PRECISION = ieee (exact fp32 products, CUDA cores),
    tf32x3 (three TF32 tensor-core products, close to fp32) or tf32 (fastest, ~1e-3 relative error).  Unset, it
    follows PyTorch's own setting for fp32 GEMMs, as the cuBLAS GEMMs of the other backends do:
    ``torch.set_float32_matmul_precision("high")`` (or "medium") gives tf32, the default "highest" gives ieee."""
    default = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return _choice("MVLOSS_TRITON_FP32_PRECISION", FP32_PRECISIONS, default)


def backward_mode() -> str:
    """MVLOSS_TRITON_BACKWARD = gemm (default: one recompute kernel writing a bounded workspace, then two GEMMs per
    class chunk) or recompute (two pure-Triton kernels, dx and dW, each recomputing the cosines; no workspace)."""
    return _choice("MVLOSS_TRITON_BACKWARD", BACKWARD_MODES, "gemm")


def forward_mode() -> str:
    """MVLOSS_TRITON_FORWARD = tiles (default: a loop over class tiles, each a K loop), flat (one loop over (class
    tile, K slice) pairs, so the software pipeline spans class tiles; timed on an H100: no faster in a training
    step), tma (the tiles loop with TMA-descriptor loads, forward_tma.py) or ws (tma, the class-tile loop
    warp-specialised).  Same sums in the same order; tma and ws are candidates (timed on an H100: NOTES.md,
    thirteenth session).  MVLOSS_TRITON_TILES's forward "mode", where given, wins."""
    return tile_override("forward").get("mode") or _choice("MVLOSS_TRITON_FORWARD", FORWARD_MODES, "tiles")


def dlogits_mode() -> str:
    """MVLOSS_TRITON_DLOGITS = tiles (default: the default backward's recompute kernel takes one class tile per
    program), persistent (about one program per SM, each looping over class tiles x K slices so its loads overlap
    the epilogue; timed on an H100: 4% slower at C = 1M, bench/results/nvidia-h100-80gb-hbm3/NOTES.md), tma (the
    default form with TMA-descriptor loads) or ws (tma, each program looping over class tiles, warp-specialised as
    the forward's ws form).  tma and ws are candidates (NOTES.md, thirteenth session).  Same values whichever.
    MVLOSS_TRITON_TILES's dlogits "mode", where given, wins."""
    return tile_override("dlogits").get("mode") or _choice("MVLOSS_TRITON_DLOGITS", DLOGITS_MODES, "tiles")


def dw_side_stream() -> bool:
    """MVLOSS_TRITON_DW_STREAM=1: the default backward runs each class chunk's normalisation backward of dW (bandwidth-
    bound) on a second stream, so it can overlap the next chunk's recompute kernel (latency-bound); eager and
    graph-captured CUDA steps, not traced ones.  The same values.  A candidate (NOTES.md, sixteenth session)."""
    return os.environ.get("MVLOSS_TRITON_DW_STREAM", "0") == "1"


def dw_gemm_mode() -> str:
    """MVLOSS_TRITON_DW_GEMM = cublas (default: each class chunk's weight gradient is a cuBLAS GEMM, then the one-pass
    normalisation backward, ``norm_backward``) or fused (one Triton kernel, the normalisation backward in the GEMM's
    epilogue: ``dw_fused.py``; bf16 and fp32 with the fused weight gradient) or fused_tma (fused, its GEMM's tiles
    through TMA descriptors where they can be made, ``tma.usable``).  Candidates (NOTES.md, seventeenth session).
    MVLOSS_TRITON_TILES's dw "mode", where given, wins."""
    return tile_override("dw").get("mode") or _choice("MVLOSS_TRITON_DW_GEMM", DW_GEMM_MODES, "cublas")


def dlogits_class_programs(row_tiles: int, class_tiles: int, device: torch.device) -> int:
    """Class programs of the persistent recompute kernel: row tiles x this ~ one per SM (its tiles hold ~255
    registers a thread: one program per SM), at most one per class tile."""
    want = max(1, target_programs(device) // 2 // max(row_tiles, 1))
    return max(1, min(class_tiles, want))


def masks_kept() -> bool:
    """MVLOSS_TRITON_MASKED=1: the kernels keep every row, feature and class mask even where the shapes make them
    all true (the EVEN_B / EVEN_K / FULL specialisations off): the same values, for tests and comparisons."""
    return os.environ.get("MVLOSS_TRITON_MASKED", "0") == "1"


def even_flags(batch: int, dim: int, cfg: dict, fixed: bool = True) -> dict:
    """The kernels' EVEN_B (the row tile divides the batch: no row masks; known only for a fixed configuration,
    autotuned ones vary) and EVEN_K (BLOCK_K divides D: no feature masks)."""
    if masks_kept():
        return dict(EVEN_B=False, EVEN_K=False)
    return dict(EVEN_B=bool(fixed) and batch % cfg["BLOCK_B"] == 0, EVEN_K=dim % cfg["BLOCK_K"] == 0)


def whole_tiles(block: int, *spans: int) -> bool:
    """FULL of the kernels: ``block`` (BLOCK_C) divides every class range a program walks, so no class tile is
    partial and none needs a column mask."""
    return not masks_kept() and all(span % block == 0 for span in spans)


def target_after(target: bool, needs_dz: bool, loops: bool, fp16: bool) -> bool:
    """TARGET_AFTER of the recompute kernel: the target column's workspace entries stored over the finished tile,
    with no label compare or select an entry, where it forms dc alone (nothing reads dz) and a program has one class
    tile (in the persistent / ws loops over class tiles the store's barrier stops Triton's software pipelining,
    and would hold a ws producer group).  Not for an fp16 workspace: the value the tile first holds at the target
    column, exp(z_y - lse) times the factors, can pass fp16's range there.  Off with MVLOSS_TRITON_MASKED=1."""
    return target and not needs_dz and not loops and not fp16 and not masks_kept()


def input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "ieee" if interpreting() else fp32_precision()
    return "tf32"  # not used by tl.dot for fp16/bf16 operands


# fp16 gradient tiles hold dc / (a bound of its row) <= 1 times an inverse norm; a row of norm below 2^-15 (every
# fp16 entry subnormal; a zero row's inverse norm is 1/eps) would take them past fp16's range (inf, then inf * 0 = NaN
# in every row of the GEMM), so the inverse norm a tile carries is capped there and the launcher rescales what it can
FP16_INV_NORM_CAP = 32768.0


def scale_dc(dtype: torch.dtype) -> bool:
    """fp16/bf16 inputs: the backward normalises dc per row before rounding it for tl.dot (see _tiles.dc_scale)."""
    return dtype in (torch.float16, torch.bfloat16)


def batch_bucket(batch: int) -> int:
    """Power-of-two bucket of the batch (16 .. 4096), part of the autotune key."""
    b = 16
    while b < batch and b < 4096:
        b *= 2
    return b


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs we want in flight: two per SM on a GPU, a handful under the interpreter."""
    if interpreting() or device.type != "cuda":
        return 4
    env = os.environ.get("MVLOSS_TRITON_PROGRAMS")
    if env:
        return max(1, int(env))
    return 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def class_split(num_rows: int, block_rows: int, num_classes: int, device: torch.device) -> tuple[int, int]:
    """(splits, classes per split) so that row blocks x splits fills the device; the per-split chunk is a multiple
    of SPLIT_ALIGN.  ``MVLOSS_TRITON_SPLITS`` forces the number of splits (for testing and measuring)."""
    row_blocks = max(1, -(-num_rows // block_rows))
    env = os.environ.get("MVLOSS_TRITON_SPLITS")
    if env:
        want = max(1, int(env))
    else:
        want = max(1, -(-target_programs(device) // row_blocks))
    max_splits = max(1, -(-num_classes // SPLIT_ALIGN))
    splits = min(want, max_splits)
    per = -(-num_classes // splits)
    chunk = -(-per // SPLIT_ALIGN) * SPLIT_ALIGN
    splits = -(-num_classes // chunk)
    return splits, chunk


def k_block(dtype: torch.dtype) -> int:
    """BLOCK_K, the D slice of one tl.dot step, shared by the forward and both backward kernels: the backward then
    recomputes each cosine with the same summation order as the forward, so exp(z - lse) is consistent with lse
    (a different order costs a few fp32 ulps of z, times the scale, in every gradient entry)."""
    if interpreting():
        return 32
    return 16 if dtype == torch.float32 else 64


TILE_KINDS = ("forward", "dlogits", "dw")
TILE_KEYS = ("BLOCK_B", "BLOCK_C", "num_warps", "num_stages", "maxnreg", "mode")
# the fused weight-gradient GEMM's tiles: rows (classes), columns (features) and the K slice (the batch), which no
# other kernel shares
DW_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "ACC_DOT", "num_warps", "num_stages", "maxnreg", "mode")
MODES = {"forward": FORWARD_MODES, "dlogits": DLOGITS_MODES, "dw": DW_GEMM_MODES}


def tile_override(kind: str) -> dict:
    """MVLOSS_TRITON_TILES: tiles that replace the table's for the forward kernel ("forward") and the default
    backward's recompute kernel ("dlogits"), as JSON or the path of a JSON file, e.g.
    ``{"forward": {"BLOCK_B": 64, "BLOCK_C": 128, "num_warps": 4, "num_stages": 3}}``; "mode" sets the kernel's
    loop form (``forward_mode`` / ``dlogits_mode``) with them.  For timing candidate tiles in a whole training step
    (``bench/triton_gpu_timings.py --tiles``, bench/gpu_session.sh's tune stage); BLOCK_K is not among them, since
    the forward and the backward must share it.  "dw" sets the fused weight-gradient GEMM's tiles (DW_TILE_KEYS,
    ``dw_fused_config``) and, with "mode", ``dw_gemm_mode``."""
    raw = os.environ.get("MVLOSS_TRITON_TILES", "").strip()
    return dict(_parse_tiles(raw).get(kind, {})) if raw else {}


@functools.lru_cache(maxsize=4)
def _parse_tiles(raw: str) -> dict:
    if raw.startswith("{"):
        text = raw
    else:
        with open(raw) as f:
            text = f.read()
    tiles = json.loads(text)
    for kind, cfg in tiles.items():
        if kind not in TILE_KINDS:
            raise ValueError(f"MVLOSS_TRITON_TILES: {kind!r} is not one of {TILE_KINDS}")
        keys = DW_TILE_KEYS if kind == "dw" else TILE_KEYS
        unknown = sorted(set(cfg) - set(keys))
        if unknown:
            raise ValueError(f"MVLOSS_TRITON_TILES[{kind!r}]: {unknown} are not among {keys}")
        if cfg.get("mode", MODES[kind][0]) not in MODES[kind]:
            raise ValueError(f"MVLOSS_TRITON_TILES[{kind!r}]: mode {cfg['mode']!r} is not one of {MODES[kind]}")
        if kind != "dw" and SPLIT_ALIGN % cfg.get("BLOCK_C", 1):
            raise ValueError(f"MVLOSS_TRITON_TILES[{kind!r}]: BLOCK_C must divide {SPLIT_ALIGN} (class splits)")
    return tiles


def _tiles_of(kind: str) -> dict:
    return {k: v for k, v in tile_override(kind).items() if k != "mode"}


WS_FORWARD_TILES = dict(BLOCK_B=128, BLOCK_C=128, num_warps=4, num_stages=3)


def forward_config(batch: int, dim: int, dtype: torch.dtype, tma_runs: bool = True, mode: str | None = None) -> dict:
    """The forward kernel's tiles: the table's (``_forward_table``), or MVLOSS_TRITON_TILES's where it sets them.
    The warp-specialised form has its own default, the table's 128 x 128 with 4 warps a consumer group: Triton
    warp-specialises a sm_90 loop only with 4 warps, and splits the rows between its two groups only from 128
    rows up.  The table's register cap applies to the tiles and tma forms only (CAPPED_FORMS).  ``tma_runs``:
    False where the launcher falls back to the pointer kernel (the table's tiles then); ``mode``: the loop form,
    ``forward_mode()`` unless given."""
    cfg = _forward_table(batch, dim, dtype)
    form = mode or forward_mode()
    if not tma_runs and form in ("tma", "ws"):
        form = "tiles"  # the pointer kernel's tiles loop
    if form == "ws" and warp_specializing_ok(dtype, batch):
        cfg.update(WS_FORWARD_TILES)
    if form not in CAPPED_FORMS:
        cfg.pop("maxnreg", None)
    return {**cfg, **_tiles_of("forward")}


# the loop forms the forward table's register cap was timed with (H100, NOTES.md, fifteenth session); flat and ws
# spill more under it (3.6: 140 and 228 bytes) and were not timed capped
CAPPED_FORMS = ("tiles", "tma")


def traceable(cfg: dict) -> dict:
    """A kernel's launch options as torch.compile can take them: its traced launch (torch 2.11 to 2.14) treats
    ``maxnreg`` as a kernel argument, not a launch option, so a traced launch runs without the register cap.  A
    step through ``mvloss.triton`` keeps it: it calls the op's opaque twin where the cap applies
    (``opaque_when_compiled``); this is for the ops traced as they are (called directly, MVLOSS_TRITON_OPAQUE=off)."""
    if torch.compiler.is_compiling():
        return {k: v for k, v in cfg.items() if k != "maxnreg"}
    return cfg


def opaque_when_compiled(kind: str, dtype: torch.dtype) -> bool:
    """Whether a step under torch.compile calls the op's opaque twin (``ops.py``) for ``kind`` ("forward" or
    "backward"): under the interpreter always (fake tensors cannot reach it); on a GPU where the kind's launch for
    large batches carries a register cap, which Inductor's traced launch would drop (``traceable``).  False
    outside torch.compile."""
    return torch.compiler.is_compiling() and _opaque_kind(kind, dtype)


OPAQUE_MODES = ("auto", "off", "on")


def opaque_mode() -> str:
    """MVLOSS_TRITON_OPAQUE = auto (default: ``opaque_when_compiled``'s rule), off (every op traced under
    torch.compile: the forward's register cap is dropped, and under the interpreter a compiled step fails) or on
    (every op opaque under torch.compile).  For comparing the two in a compiled step."""
    return _choice("MVLOSS_TRITON_OPAQUE", OPAQUE_MODES, "auto")


# Dynamo calls it and keeps the result (no tracing of the environment reads and lru caches below); it depends on
# the dtype and the environment only, so a small batch under a cap-carrying table is opaque too (the same launches)
@torch.compiler.assume_constant_result
def _opaque_kind(kind: str, dtype: torch.dtype) -> bool:
    mode = opaque_mode()
    if mode != "auto":
        return mode == "on"
    if interpreting():
        return True
    if autotuning():  # the autotuned launch passes no table options
        return False
    large, dim = 1 << 20, 512  # the tables' last rows; D only sets BLOCK_K (k_block)
    if kind == "forward":
        return forward_config(large, dim, dtype).get("maxnreg") is not None
    return backward_mode() == "gemm" and dlogits_config(large, dim, dtype).get("maxnreg") is not None


def warp_specializing_ok(dtype: torch.dtype, batch: int) -> bool:
    """Whether a ws form may warp-specialise: on a GPU, with tensor-core operands and more than 64 rows (fp32's exact
    products take the CUDA cores, where there is nothing to overlap, and a small batch cannot fill two consumer
    groups: both run as the tma form)."""
    return not interpreting() and dtype != torch.float32 and batch > 64


WS_DLOGITS_TILES = dict(BLOCK_B=128, BLOCK_C=64, num_warps=4, num_stages=3)


def dlogits_config(batch: int, dim: int, dtype: torch.dtype, tma_runs: bool = True, mode: str | None = None) -> dict:
    """The recompute kernel's tiles: the table's (``_dlogits_table``), or MVLOSS_TRITON_TILES's where it sets them.
    The warp-specialised form's default is 128 x 64, 4 warps a consumer group: each group's 64 x 64 half of the
    epilogue fits its registers (128 x 128 spills 1.4 KB).  ``tma_runs``, ``mode`` as in ``forward_config``
    (``mode``: ``dlogits_mode()`` unless given)."""
    cfg = _dlogits_table(batch, dim, dtype)
    if tma_runs and (mode or dlogits_mode()) == "ws" and warp_specializing_ok(dtype, batch):
        cfg.update(WS_DLOGITS_TILES)
    return {**cfg, **_tiles_of("dlogits")}


def _forward_table(batch: int, dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options of the forward (LSE) kernel.

    Each compiles for sm_90 without (or with < 64 bytes of) register spills and fits shared memory
    (``python -m mvloss.triton._compile_check``), but for the half-precision 128 x 128 tile: capped at 128 registers
    it spills 80-88 bytes and is faster in a step (below).  fp32 uses exact fp32 products (FMA path), which needs
    small K slices."""
    bk = k_block(dtype)
    if interpreting():
        return dict(BLOCK_B=32, BLOCK_C=64, BLOCK_K=bk, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        if batch <= 16:
            return dict(BLOCK_B=16, BLOCK_C=128, BLOCK_K=bk, num_warps=4, num_stages=3)
        return dict(BLOCK_B=64, BLOCK_C=128, BLOCK_K=bk, num_warps=8, num_stages=3)
    if batch <= 16:
        return dict(BLOCK_B=16, BLOCK_C=128, BLOCK_K=bk, num_warps=4, num_stages=4)
    if batch <= 64:
        return dict(BLOCK_B=64, BLOCK_C=128, BLOCK_K=bk, num_warps=4, num_stages=4)
    # capped at 128 registers: two programs an SM, so one's epilogue overlaps the other's products (80-88 bytes of
    # spills); 1M-class step on an H100 11.43 -> 10.65 ms graphed (bench/results/nvidia-h100-80gb-hbm3, run 11)
    return dict(BLOCK_B=128, BLOCK_C=128, BLOCK_K=bk, num_warps=8, num_stages=3, maxnreg=128)


def _dlogits_table(batch: int, dim: int, dtype: torch.dtype) -> dict:
    """Tiles of the default backward's recompute kernel (backward_gemm).  Its epilogue keeps more B x C tiles alive
    than the forward's, so the forward's 128 x 128 tile spills (1.3 KB at bf16, sm_90); these compile spill-free
    (fp16: 40 bytes).  BLOCK_K is the forward's, so the cosines are summed in the same order."""
    bk = k_block(dtype)
    if interpreting():
        return dict(BLOCK_B=32, BLOCK_C=64, BLOCK_K=bk, num_warps=4, num_stages=1)
    if dtype == torch.float32 or batch <= 16:
        return dict(BLOCK_B=16, BLOCK_C=128, BLOCK_K=bk, num_warps=4, num_stages=4)
    return dict(BLOCK_B=64, BLOCK_C=128, BLOCK_K=bk, num_warps=8, num_stages=3)


def dw_fused_config(dim: int, dtype: torch.dtype) -> dict:
    """Tiles of the fused weight-gradient GEMM (``dw_fused``), or MVLOSS_TRITON_TILES's "dw" where it sets them.
    bf16: 128 x 128 with K slices of 64, as a Hopper GEMM's tile; fp32's exact products (CUDA cores) take smaller
    ones.  ACC_DOT (the row dots from the GEMM's accumulator, ``dw_fused_kernel``) takes registers the 128 x 128
    tile lacks.  Chosen by the sm_90 compile check (``python -m mvloss.triton._compile_check``); not yet timed."""
    if interpreting():
        cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, ACC_DOT=False, num_warps=4, num_stages=1)
    elif dtype == torch.float32:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, ACC_DOT=False, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, ACC_DOT=False, num_warps=8, num_stages=3)
    return {**cfg, **_tiles_of("dw")}


def backward_config(kernel: str, batch: int, dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes of the backward kernels ("dx" or "dw").

    BLOCK_DO is the slice of D one program accumulates (the gradient tile lives in registers: BLOCK_B x BLOCK_DO for
    dx, BLOCK_C x BLOCK_DO for dW); every extra slice costs one more recompute of the cosine tile, so up to D = 512
    one slice covers D (the accumulated block is kept at 16-64 rows to fit registers).  Same caveat as
    forward_config: every configuration compiles spill-free on sm_90; none is timed."""
    bk = k_block(dtype)
    d_pad = _pow2_at_least(dim, 16, 1 << 30)
    small = batch <= 16
    if interpreting():
        # Small tiles; D <= 64 is one D slice, larger D several slices: both paths get tested.
        return dict(BLOCK_B=32, BLOCK_C=64, BLOCK_K=bk, BLOCK_DO=min(d_pad, 64), num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # 32 x 32 blocks and 8 warps keep a 512-wide fp32 accumulator spill-free: one D slice up to D = 512.
        return dict(BLOCK_B=16 if small else 32, BLOCK_C=32, BLOCK_K=bk, BLOCK_DO=min(d_pad, 512), num_warps=8,
                    num_stages=2)
    # (accumulated block, streamed block): rows x classes for dx, classes x rows for dW.  Beyond D = 512 the
    # feature dimension is cut into 512-wide slices (one more cosine recompute per slice).
    acc, stream = (32, 32) if d_pad >= 512 else (64, 64)
    if kernel == "dx":
        block_b, block_c = (16 if small else acc), stream
    else:
        block_b, block_c = (16 if small else stream), acc
    return dict(BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_K=bk, BLOCK_DO=min(d_pad, 512), num_warps=8, num_stages=2)


def autotune_configs(kind: str):
    """The larger search used with MVLOSS_AUTOTUNE=1 (imports triton).  BLOCK_K is not searched: it is passed at
    launch (``k_block``) so the forward and backward keep one summation order.  Configurations that do not fit a
    device are skipped by the autotuner (out of resources)."""
    import triton

    out = []
    if kind == "forward":
        for bb in (16, 64, 128):
            for bc in (64, 128, 256):
                for w in (4, 8):
                    for st in (3, 4):
                        out.append(triton.Config(dict(BLOCK_B=bb, BLOCK_C=bc), num_warps=w, num_stages=st))
    else:
        for bb in (16, 32, 64):
            for bc in (32, 64, 128):
                for bdo in (64, 128, 256, 512):
                    if bdo == 512 and max(bb, bc) > 32:
                        continue
                    for w in (4, 8):
                        out.append(triton.Config(dict(BLOCK_B=bb, BLOCK_C=bc, BLOCK_DO=bdo), num_warps=w,
                                                 num_stages=2))
    return out


def launcher(kernel, *operands):
    """``torch.library.wrap_triton(kernel)``, so the launch traces under torch.compile.  torch <= 2.11 rejects the
    interpreter's kernel objects (TRITON_INTERPRET=1); there the kernel launches eagerly, which is all the interpreter
    can do anyway.  (Made at each launch, not cached: the wrapper holds its kernel's index in torch's kernel side
    table, which torch._dynamo.reset() empties.)

    With ``operands`` (the launch's tensors) that are plain tensors and nothing tracing, the kernel itself: outside
    a ``triton_op`` the wrapper launches through torch's higher-order op, whose eager dispatch cost the host ~0.3 ms
    a launch (``python -m mvloss.bench.launches --host-time --jit-launch-path``).  Inside one, torch already skips
    it."""
    if operands and _plain_eager(operands):
        return kernel
    from torch.library import wrap_triton

    try:
        return wrap_triton(kernel)
    except RuntimeError:
        if interpreting():
            return kernel
        raise


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(tensors) -> bool:
    """Whether ``tensors`` are plain tensors and nothing traces them (no dispatch mode, not compiling): a raw launch
    is then what the wrapper would do, minus its dispatch."""
    return (all(type(t) in _PLAIN_TENSOR_TYPES for t in tensors) and _get_current_dispatch_mode() is None
            and not torch.compiler.is_compiling())


_autotuned: dict = {}


def kernel_for(kernel, kind: str):
    """(the kernel to launch, whether the fixed table's tile sizes must be passed): the plain kernel, or with
    MVLOSS_AUTOTUNE=1 its ``triton.autotune`` wrapper (made once per kernel) over ``autotune_configs(kind)``."""
    if not autotuning():
        return kernel, True
    if kernel not in _autotuned:
        import triton

        _autotuned[kernel] = triton.autotune(configs=autotune_configs(kind), key=["D", "B_BUCKET"])(kernel)
    return _autotuned[kernel], False
