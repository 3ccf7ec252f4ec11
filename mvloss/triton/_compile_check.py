"""Compile the kernels for a CUDA architecture without a GPU and report shared memory, registers and spills.

    python -m mvloss.triton._compile_check [--arch 90] [--dtype bf16 fp32] [--B 1 64 1024] [--D 64 128 512]

The interpreter checks what the kernels compute; this checks that the GPU path compiles (tl.dot shapes, dtypes,
constexpr branches) with the configurations ``_config`` picks, that each fits shared memory, how many bytes ptxas
spills (Triton's bundled ptxas; no driver needed), and whether the loads are software-pipelined (asynchronous
copies into shared memory) and the dots run on Hopper's warp-group MMA.  The arguments are specialised as Triton's
launcher does for contiguous inputs (unit feature strides become constants; pointers and sizes that are multiples
of 16 are marked so): without that the loads cannot be vectorised and are never pipelined.
Must run without TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch

_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHARED_LIMIT = 227 * 1024  # sm_90 / sm_100 per-block opt-in maximum


# Feature strides of contiguous x and W: Triton's launcher turns an integer argument equal to 1 into a constant.
_UNIT_STRIDES = ("sxd", "swd")


# Constants of the kernels that commit 08a5d0e's lack (the logit sum and its gradient optional, the mask-free tiles)
# and 26395a4's (KEEP_MASKS, TARGET_AFTER).
_LATER_FLAGS = ("ZSUM", "GSUM", "EVEN_B", "EVEN_K", "FULL", "KEEP_MASKS", "TARGET_AFTER")


def _sizes(batch: int, dim: int) -> dict:
    """Example values of the integer arguments, for the divisibility-by-16 marks the launcher would give them: the
    class ranges and workspace strides of the benchmark's C = 100k (a split of 3072 classes, a chunk of 32768)."""
    return dict(B=batch, D=dim, sxb=dim, swc=dim, R=batch, sab=dim, sbb=dim, C=100000, chunk=3072, c0=32768,
                c1=65536, ldg=32768)


def _attrs(fn, sig: dict, sizes: dict) -> dict:
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if sig[name].startswith("*") or (name in sizes and sizes[name] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _signature(fn, dtype, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("x_ptr", "w_ptr", "a_ptr", "b_ptr", "g_ptr"):
            sig[name] = "*" + _DT[dtype]
        elif name == "labels_ptr":
            sig[name] = "*i64"
        elif name == "lse_ptr":  # the forward's fp64 lse
            sig[name] = "*fp64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in ("param", "eps"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def sass_instructions(cubin: bytes) -> int:
    """Static count of the kernel's SASS instructions (Triton's bundled nvdisasm; -1 without it): the epilogue's
    per-element work shows up here, since the class-tile loop body is most of the kernel."""
    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(nvdisasm):
        return -1
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True)
    if out.returncode != 0:
        return -1
    return len(re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s+\S", out.stdout, flags=re.M))


def tma_boxes_match(ttgir: str, element_size: int) -> bool:
    """Whether every TMA copy moves exactly what its shared-memory buffer holds: each copy's descriptor block is its
    destination's shape, and each box of the descriptors the kernel makes (``tensormap_create``, [inner, rows]) has
    a copy's rows and its inner extent, or a 128-byte slice of it (a row wider than the 128-byte swizzle is copied
    in such slices).  (Triton 3.6 warp-specialising a kernel with host-side descriptors copied 128-row boxes into
    64-row buffers.)  True where there is no copy."""
    copies = re.findall(r"async_tma_copy_global_to_local [^\n]*tensordesc<(?:tensor<)?(\d+)x(\d+)x[^\n]*"
                        r"-> !ttg\.memdesc<(\d+)x(\d+)x", ttgir)
    if any((a, b) != (c, d) for a, b, c, d in copies):
        return False
    dst = {(int(c), int(d)) for _, _, c, d in copies}
    boxes = {(int(k), int(r))
             for k, r in re.findall(r"tensormap_create %\w+, %\w+, \[%c(\d+)_i32, %c(\d+)_i32\]", ttgir)}
    return all(any(rows == r and (inner == k or (inner * element_size == 128 and k % inner == 0)) for r, k in dst)
               for inner, rows in boxes)


def rows_shifted_twice(ttgir: str) -> bool:
    """Whether a warp-specialised kernel's group offsets its row indices twice: within one partition, an index range
    that starts at N > 0 (the group's half of the row tile) and a broadcast of a value made as ``v + N``.  Triton
    makes the second consumer group's copy coordinate r0 + N and rewrites the group's other uses of r0 to it, so
    rows built from r0 would be shifted twice (``_tiles.tma_row_tile`` builds them from the program id)."""
    for body in re.split(r"\bpartition\d+\(", ttgir)[1:]:
        consts = dict(re.findall(r"(%\w+) = arith\.constant (?:\{[^}]*\} )?(\d+) : i32", body))
        starts = {int(n) for n in re.findall(r"tt\.make_range \{[^}]*start = (\d+) : i32", body)} - {0}
        shifted = {v for v, c in re.findall(r"(%\w+) = arith\.addi %\w+, (%\w+)", body)
                   if c in consts and int(consts[c]) in starts}
        if any(v in shifted for v in re.findall(r"tt\.splat (%\w+)", body)):
            return True
    return False


def _ptxas_info(ptx: str, arch: int) -> dict:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", path, "-o", os.devnull],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {out.stderr[-2000:]}")
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", out.stderr)]
    return dict(registers=int(regs.group(1)) if regs else -1, spill_bytes=max(spill) if spill else 0)


_LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")  # compiler options in a configuration, not constexprs


def programs_per_sm(registers: int, num_warps: int, shared: int, regs_per_sm: int = 65536,
                    shared_per_sm: int = 228 * 1024) -> int:
    """How many programs of a kernel fit on one SM (Hopper limits): registers are allocated per warp in units of
    256 (8 a thread), and each program's shared memory carries a 1 KB reservation."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = regs_per_sm // max(per_warp * num_warps, 1)
    by_shared = shared_per_sm // (shared + 1024)
    return max(0, min(by_regs, by_shared))


def compile_kernel(kernel: str, dtype: torch.dtype, batch: int, dim: int, arch: int = 90, treatment: int = 2,
                   clamp: bool = True, has_bias: bool = True, config: dict | None = None,
                   training_step: bool = False, whole_tiles: bool = True) -> dict:
    """Compile one kernel ("fwd", "fwd_flat" -- MVLOSS_TRITON_FORWARD=flat --, "fwd_tma" / "fwd_ws" -- the TMA
    kernel, MVLOSS_TRITON_FORWARD=tma / ws --, "dlogits" -- the default backward's
    recompute kernel --, "dlogits_persistent" / "dlogits_tma" / "dlogits_ws" -- MVLOSS_TRITON_DLOGITS=persistent /
    tma / ws --, or the recompute design's
    "dx", "dw") with the configuration _config picks for (batch, dim, dtype), or with ``config`` (tile sizes, warps
    and stages; BLOCK_K is always _config's, so the summation order stays the forward's).  ``training_step``: the
    flags a training step of a fixed-scale loss without bias or label smoothing launches with (no bias, no dscale /
    dbias partials, no logit sum) instead of every optional output.  ``whole_tiles``: FULL, a class count of whole
    tiles (the forward without its partial-tile copy, the recompute kernel of every chunk but a partial last one)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("run without TRITON_INTERPRET=1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _config
    from .backward_gemm import neg_dlogits_kernel, neg_dlogits_tma_kernel
    from .backward_dw import neg_dw_kernel
    from .backward_dx import neg_dx_kernel
    from .forward_lse import neg_lse_kernel
    from .forward_tma import neg_lse_tma_kernel

    fn = {"fwd": neg_lse_kernel, "fwd_flat": neg_lse_kernel, "fwd_tma": neg_lse_tma_kernel,
          "fwd_ws": neg_lse_tma_kernel, "dlogits": neg_dlogits_kernel, "dlogits_tma": neg_dlogits_tma_kernel,
          "dlogits_ws": neg_dlogits_tma_kernel,
          "dlogits_persistent": neg_dlogits_kernel, "dx": neg_dx_kernel, "dw": neg_dw_kernel}[kernel]
    form = kernel.partition("_")[2] or "tiles"  # "fwd_ws" -> "ws"
    if kernel.startswith("fwd"):
        cfg = _config.forward_config(batch, dim, dtype, mode=form)
    elif kernel.startswith("dlogits"):
        cfg = _config.dlogits_config(batch, dim, dtype, mode=form)
    else:
        cfg = _config.backward_config(kernel, batch, dim, dtype)
    if config is not None:
        cfg = dict(config, BLOCK_K=cfg["BLOCK_K"])
    has_bias = has_bias and not training_step
    consts = dict(TREATMENT=treatment, CLAMP=clamp, HAS_BIAS=has_bias, UPCAST=False,
                  PRECISION=_config.input_precision(dtype))
    if kernel.startswith("fwd"):
        consts["ZSUM"] = not training_step
    if kernel in ("fwd", "fwd_flat"):
        consts["FLAT"] = kernel == "fwd_flat"
        # FULL: a class count that is whole tiles, so the count is the class-tile loop's, without the tail's copy
        consts.update(_config.even_flags(batch, dim, cfg), FULL=whole_tiles)
    if kernel in ("fwd_tma", "fwd_ws"):
        consts["WARP_SPECIALIZE"] = form == "ws" and _config.warp_specializing_ok(dtype, batch)
        consts.update(EVEN_B=_config.even_flags(batch, dim, cfg)["EVEN_B"], FULL=whole_tiles)
    if kernel.startswith("fwd"):
        consts["KEEP_MASKS"] = False
    if not kernel.startswith("fwd"):
        consts["GSUM"] = not training_step
    if kernel in ("dx", "dw"):
        consts["SCALE_DC"] = _config.scale_dc(dtype)
    if kernel.startswith("dlogits"):
        consts.update(NEED_DSCALE=not training_step, NEED_DBIAS=not training_step, SCALE_G=dtype == torch.float16,
                      TARGET=dtype != torch.float16)
        if kernel in ("dlogits_tma", "dlogits_ws"):
            # ws: without a learnable bias (its per-column partial sums over the split rows cannot be formed)
            consts["WARP_SPECIALIZE"] = form == "ws" and _config.warp_specializing_ok(dtype, batch)
            consts["NEED_DBIAS"] = consts["NEED_DBIAS"] and not consts["WARP_SPECIALIZE"]
            consts["LOOP"] = form == "ws"
            consts["EVEN_B"] = _config.even_flags(batch, dim, cfg)["EVEN_B"]
        else:
            consts["PERSISTENT"] = kernel == "dlogits_persistent"
            consts.update(_config.even_flags(batch, dim, cfg))
        consts["FULL"] = whole_tiles  # every chunk but the last is a whole number of class tiles
        consts["TARGET_AFTER"] = _config.target_after(
            consts["TARGET"], not training_step, consts.get("PERSISTENT", False) or consts.get("LOOP", False),
            consts["SCALE_G"])
    if kernel == "dx":
        consts["NEED_DSCALE"] = True
    if kernel == "dw":
        consts["NEED_DBIAS"] = True
    consts.update({k: v for k, v in cfg.items() if k not in _LAUNCH_OPTIONS})
    consts.update({name: 1 for name in _UNIT_STRIDES if name in fn.arg_names})
    # flags an earlier commit's kernels lack: dropped there, so this file also measures those kernels
    consts = {k: v for k, v in consts.items() if k not in _LATER_FLAGS or k in fn.arg_names}
    sig = _signature(fn, dtype, consts)
    src = ASTSource(fn, sig, constexprs=consts, attrs=_attrs(fn, sig, _sizes(batch, dim)))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={k: v for k, v in cfg.items() if k in _LAUNCH_OPTIONS})
    return _kernel_info(compiled, kernel, dtype, batch, dim, cfg, arch)


def _kernel_info(compiled, kernel: str, dtype: torch.dtype, batch: int, dim: int, cfg: dict, arch: int) -> dict:
    """What ``compile_kernel`` reports of a compiled B x C kernel (and ``compile_dw_fused`` of the dW GEMM)."""
    ptx = compiled.asm["ptx"]
    info = dict(kernel=kernel, dtype=_DT[dtype], B=batch, D=dim, config=cfg, shared=compiled.metadata.shared,
                async_copies=len(re.findall(r"cp\.async\.(?:ca|cg)|cp\.async\.bulk\.tensor", ptx)),
                warp_specialized="setmaxnreg" in ptx,
                # TMA copies in the kernel: a warp-specialised forward whose row tile is split between its two
                # consumer groups copies x in two halves (3 with W's); one that is not split copies it once and both
                # groups then do all the work
                tma_copies=compiled.asm["ttgir"].count("async_tma_copy_global_to_local"),
                tma_boxes_match=tma_boxes_match(compiled.asm["ttgir"], dtype.itemsize),
                rows_shifted_twice=rows_shifted_twice(compiled.asm["ttgir"]),
                # a warp-specialised kernel's partitions re-size their registers: the producer down, consumers up
                partition_registers=sorted({int(v) for v in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)",
                                                                         ptx)}),
                wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                # the logits' products rounded on their own (_tiles.mul_rn): no FMA joins them to what follows
                rounded_products=len(re.findall(r"\bmul\.rn\.f32", ptx)))
    info.update(_ptxas_info(ptx, arch))
    # a warp-specialised kernel launches more warps than num_warps (its producer and consumer groups)
    info["warps"] = compiled.metadata.num_warps
    info["programs_per_sm"] = programs_per_sm(info["registers"], info["warps"], info["shared"])
    info["sass_instructions"] = sass_instructions(compiled.asm["cubin"])
    return info


def compile_dw_fused(dtype: torch.dtype, batch: int, dim: int, arch: int = 90, config: dict | None = None,
                     use_tma: bool = False) -> dict:
    """Compile the fused weight-gradient GEMM (``dw_fused``, MVLOSS_TRITON_DW_GEMM=fused, or fused_tma with
    ``use_tma``) with ``_config``'s tiles for ``dim`` and ``dtype`` (or ``config``), specialised as its launch of a
    chunk of the benchmark's (a batch of ``batch`` rows, whole tiles): what ``compile_kernel`` reports."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("run without TRITON_INTERPRET=1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _config
    from .dw_fused import EPI_N, dw_fused_kernel

    cfg = {**_config.dw_fused_config(dim, dtype), **(config or {})}  # a config without ACC_DOT: the table's
    consts = dict(NORMALIZE=True, UPCAST=False, PRECISION=_config.input_precision(dtype), EPI_N=EPI_N, TMA=use_tma,
                  EVEN_M=True, EVEN_N=dim % cfg["BLOCK_N"] == 0 and dim % EPI_N == 0,
                  EVEN_K=batch % cfg["BLOCK_K"] == 0,
                  **{k: v for k, v in cfg.items() if k not in _LAUNCH_OPTIONS})
    sig = {}
    for name in dw_fused_kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name == "w_inv_ptr":
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + _DT[dtype]
        else:
            sig[name] = "fp32" if name == "eps" else "i32"
    sizes = dict(B=batch, n=32768, D=dim, c0=32768, ldg=32768, sxb=dim, swc=dim, sor=dim)
    src = ASTSource(dw_fused_kernel, sig, constexprs=consts, attrs=_attrs(dw_fused_kernel, sig, sizes))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={k: v for k, v in cfg.items() if k in _LAUNCH_OPTIONS})
    return _kernel_info(compiled, "dw_fused_tma" if use_tma else "dw_fused", dtype, batch, dim, cfg, arch)


def approximate_ops(ptx: str) -> list:
    """The PTX instructions of a kernel that round worse than IEEE (``ex2.approx``, ``div.full``, ...): none in the
    O(B) kernels, whose s-sized arguments would carry their error into the loss and gradients (NOTES.md, fifteenth
    session); the B x C epilogues use ``ex2.approx.ftz`` on purpose, their arguments already in log2 units."""
    return sorted(set(re.findall(r"\b(?:ex2|lg2|rcp|sqrt|rsqrt|sin|cos|tanh)\.approx[\w.]*|\bdiv\.full[\w.]*", ptx)))


def _compile_small(kernel, sig: dict, constexprs: dict, arch: int, options: dict | None = None) -> dict:
    """Compile one of the O(B) kernels for ``arch``: shared memory, its approximate instructions, registers, spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(kernel, sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    ptx = compiled.asm["ptx"]
    return dict(shared=compiled.metadata.shared, approximate=approximate_ops(ptx), **_ptxas_info(ptx, arch))


def compile_target_rows(dtype: torch.dtype, dim: int, arch: int = 90) -> dict:
    """Compile the pre-pass's glue kernel (``target_rows``) as its launcher would for rows of ``dim`` features:
    registers and spills (it holds two whole rows in registers)."""
    from .target_rows import target_rows_kernel, target_rows_launch_options

    block_d, options = target_rows_launch_options(dim)
    sig = {name: "i32" for name in target_rows_kernel.arg_names}
    sig.update(x_ptr="*" + _DT[dtype], w_ptr="*" + _DT[dtype], labels_ptr="*i64", has_ptr="*i1", xhat_ptr="*fp32",
               what_ptr="*fp32", cos_ptr="*fp32", eps="fp32", NORMALIZE_X="constexpr", NORMALIZE_W="constexpr",
               BLOCK_D="constexpr")
    consts = dict(NORMALIZE_X=True, NORMALIZE_W=True, BLOCK_D=block_d)
    return dict(kernel="target_rows", dtype=_DT[dtype], D=dim,
                **_compile_small(target_rows_kernel, sig, consts, arch, options))


def compile_label_check(labels_dtype: str = "i64", arch: int = 90) -> dict:
    """Compile the deferred label check's kernel (``label_check``) as its launcher would: registers and spills."""
    from .label_check import BLOCK, replace_bad_labels_kernel

    sig = dict(labels_ptr="*" + labels_dtype, safe_ptr="*i64", summary_ptr="*i64", B="i32", C="i32",
               ignore_index="i32", BLOCK="constexpr")
    return dict(kernel="label_check", labels=labels_dtype,
                **_compile_small(replace_bad_labels_kernel, sig, dict(BLOCK=BLOCK), arch))


def compile_lse_merge(arch: int = 90) -> dict:
    """Compile the forward's merge of its class splits (``forward_lse.merge_kernel``) as ``merge`` launches it:
    registers, spills, and its approximate instructions (none: lse enters every probability of its row)."""
    from .forward_lse import merge_kernel

    sig = dict(part_m_ptr="*fp32", part_s_ptr="*fp32", part_z_ptr="*fp32", lse_ptr="*fp32", lse_wide_ptr="*fp64",
               zsum_ptr="*fp32", B="i32", S="i32", BLOCK="constexpr")
    return dict(kernel="merge", **_compile_small(merge_kernel, sig, dict(BLOCK=256), arch))


def compile_target_loss(arch: int = 90) -> list:
    """Compile the target side's three kernels (``target_loss``) for the most general configuration (ArcFace with
    the insightface fallback, m3, clamp, mean): registers and spills of each."""
    from . import target_loss as tl_mod

    out = []
    meta = dict(CLAMP=True, CLAMP_AT_BOUNDS=False, ARC=True, FALLBACK=1, HAS_M3=True, M3_POSITIVE=True,
                BLOCK=tl_mod.BLOCK)
    for kernel, extra in ((tl_mod.thresholds_kernel, {}), (tl_mod.loss_kernel, dict(REDUCTION=2)),
                          (tl_mod.loss_backward_kernel, dict(REDUCTION=2, STRAIGHT=False))):
        consts = {**meta, **extra}
        sig = {}
        for name in kernel.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = {"labels_ptr": "*i64", "count_ptr": "*i32"}.get(name, "*fp32")
            elif name in ("B", "ignore_index"):
                sig[name] = "i32"
            else:
                sig[name] = "fp32"
        out.append(dict(kernel=kernel.fn.__name__, **_compile_small(kernel, sig, consts, arch)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mvloss.triton._compile_check")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", nargs="*", default=["bf16", "fp32"], choices=sorted(_NAMES))
    p.add_argument("--B", type=int, nargs="*", default=[1, 64, 1024])
    p.add_argument("--D", type=int, nargs="*", default=[64, 128, 512])
    a = p.parse_args(argv)
    worst = 0
    for dt in a.dtype:
        for b in a.B:
            for d in a.D:
                for kernel in ("fwd", "fwd_flat", "fwd_tma", "fwd_ws", "dlogits", "dlogits_persistent", "dlogits_tma",
                               "dlogits_ws", "dx", "dw", "dw_fused", "dw_fused_tma"):
                    if kernel.startswith("dw_fused"):
                        r = compile_dw_fused(_NAMES[dt], b, d, a.arch, use_tma=kernel == "dw_fused_tma")
                    else:
                        r = compile_kernel(kernel, _NAMES[dt], b, d, a.arch)
                    worst = max(worst, r["spill_bytes"])
                    print(f"{kernel:18} {dt} B={b:<5} D={d:<5} shared={r['shared']:>6} regs={r['registers']:>3} "
                          f"spill={r['spill_bytes']:>4} per_sm={r['programs_per_sm']} async={r['async_copies']:>3} "
                          f"wgmma={r['wgmma']:>2}  "
                          f"{r['config']}", flush=True)
    print(f"worst spill: {worst} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
