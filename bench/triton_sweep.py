"""Time the Triton kernels under a few launch configurations, one shape, to pick the fixed table in
mvloss/triton/_config.py (a quick alternative to MVLOSS_AUTOTUNE=1's full search).  The forward table also sets the
tiles of nothing else; the backward's recompute kernel (backward_gemm) has its own table (dlogits_config).

    python bench/triton_sweep.py --B 1024 --C 100000 --D 512 --dtype bf16 --out sweep.json
    python bench/triton_sweep.py --smoke        # check the script on the CPU (interpreter, tiny shape)
    python bench/triton_sweep.py --best sweep.json > tiles.json   # its fastest tiles, for MVLOSS_TRITON_TILES

Each configuration replaces the table's choice for one kernel (forward, dx or dW) and is timed on the bare kernel
(CUDA events, median).  The first row of each kernel and loop form is the table's own choice, and its last row
times that choice again (``repeat``: the run's spread).  The forward and the
recompute kernel are timed in each of their loop forms (MVLOSS_TRITON_FORWARD = tiles / flat / tma / ws,
MVLOSS_TRITON_DLOGITS = tiles / persistent / tma / ws: the ``mode`` field; ``--modes`` picks them, "alt" standing
for every form but tiles), each form with its own candidates.  Every run's outputs are compared with the table's in the
tiles form (``max_rel_err``); one further off than ``TOLERANCE`` gets an ``error`` and is never the fastest.
The backward is timed as a training step runs it, the fused weight gradient's whole op (per class chunk the
recompute kernel with the target column, two GEMMs, the normalisation backward); sweeps before the eleventh
session's timed the plain op (no target column, dW left unnormalised in fp32), so their backward rows are not
comparable with later ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

# Besides the table's own choice (always the first row): tiles that let two or more programs share an SM, so one
# program's epilogue can overlap another's tensor-core work (the table's tiles fit one each at bf16, B = 1024,
# D = 512).  Registers and programs per SM of each: python bench/triton_occupancy.py.
FORWARD = [dict(BLOCK_B=64, BLOCK_C=128, num_warps=4, num_stages=3),   # 2 programs per SM
           dict(BLOCK_B=64, BLOCK_C=128, num_warps=4, num_stages=4),   # 2
           dict(BLOCK_B=128, BLOCK_C=64, num_warps=4, num_stages=3),   # 2
           dict(BLOCK_B=64, BLOCK_C=64, num_warps=4, num_stages=4),    # 3 (shared memory bounds it)
           dict(BLOCK_B=256, BLOCK_C=128, num_warps=8, num_stages=3),  # 6% faster at 100k (run 3); spills on 3.8
           dict(BLOCK_B=256, BLOCK_C=64, num_warps=8, num_stages=3),   # 1, no spill; W read once per 256 rows
           # the table's without its register cap (the table until the fifteenth session): 1 program per SM
           dict(BLOCK_B=128, BLOCK_C=128, num_warps=8, num_stages=3)]
# the warp-specialised form (its table row: 128 x 128, 4 warps a consumer group, 3 stages): 4 warps a group (Triton
# leaves an 8-warp loop as it is) and 128 rows or more (Triton splits them between its two consumer groups; 64 rows it
# cannot split, and both groups would do all the work)
FORWARD_WS = [dict(BLOCK_B=128, BLOCK_C=64, num_warps=4, num_stages=4),
              dict(BLOCK_B=128, BLOCK_C=128, num_warps=4, num_stages=2),
              dict(BLOCK_B=128, BLOCK_C=128, num_warps=4, num_stages=4),
              dict(BLOCK_B=256, BLOCK_C=64, num_warps=4, num_stages=3),
              dict(BLOCK_B=256, BLOCK_C=128, num_warps=4, num_stages=2)]  # 12 L2 bytes an element; 32-48 spilled
FORWARD_BY_MODE = {"tiles": FORWARD, "flat": FORWARD, "tma": FORWARD[:3] + FORWARD[-1:], "ws": FORWARD_WS}
# (programs per SM with a training step's flags, triton 3.8 / 3.6, none spilling: python bench/triton_occupancy.py
# --step, as of the eleventh session's shorter recompute epilogue)
DLOGITS = [dict(BLOCK_B=128, BLOCK_C=128, num_warps=8, num_stages=3),   # 2 / 1
           dict(BLOCK_B=32, BLOCK_C=128, num_warps=4, num_stages=3),   # 4
           dict(BLOCK_B=64, BLOCK_C=128, num_warps=8, num_stages=4),   # 2
           dict(BLOCK_B=64, BLOCK_C=64, num_warps=4, num_stages=3),    # 4
           dict(BLOCK_B=64, BLOCK_C=64, num_warps=4, num_stages=4),    # 3 (shared memory bounds it)
           dict(BLOCK_B=64, BLOCK_C=128, num_warps=4, num_stages=3),   # 3
           dict(BLOCK_B=64, BLOCK_C=128, num_warps=8, num_stages=3, maxnreg=128),  # the table's, capped: 2
           dict(BLOCK_B=128, BLOCK_C=64, num_warps=8, num_stages=3),   # the table's transposed: 2
           # 128 x 128 capped: 2, half the L2 traffic of W tiles a chunk; spills 4 / 0 bytes (3.8 / 3.6), with every
           # optional output ~500 / ~860 (sixteenth session)
           dict(BLOCK_B=128, BLOCK_C=128, num_warps=8, num_stages=3, maxnreg=128)]
BACKWARD = [dict(BLOCK_B=64, BLOCK_C=64, BLOCK_DO=128, num_warps=8, num_stages=3),
            dict(BLOCK_B=64, BLOCK_C=64, BLOCK_DO=256, num_warps=8, num_stages=2),
            dict(BLOCK_B=128, BLOCK_C=64, BLOCK_DO=128, num_warps=8, num_stages=2),
            dict(BLOCK_B=64, BLOCK_C=128, BLOCK_DO=128, num_warps=8, num_stages=2)]
# the warp-specialised recompute kernel (its table row: 128 x 64, 4 warps a group, 3 stages); 128 x 128 spills 1.4 KB
DLOGITS_WS = [dict(BLOCK_B=128, BLOCK_C=64, num_warps=4, num_stages=4),
              dict(BLOCK_B=128, BLOCK_C=64, num_warps=4, num_stages=2)]
DLOGITS_BY_MODE = {"tiles": DLOGITS, "persistent": DLOGITS,
                   "tma": [DLOGITS[3], DLOGITS[6], DLOGITS[7], DLOGITS[8]],
                   "ws": DLOGITS_WS}
TOLERANCE = 1e-4  # largest relative difference from the table's outputs (same sums, same order: ~0 expected)


# the kernels whose tiles MVLOSS_TRITON_TILES sets, by the sweep's name for them
TILE_KINDS = {"forward": "forward", "backward_gemm": "dlogits"}


def best_tiles(records) -> dict:
    """The fastest configuration and loop form of the forward and of the default backward among the sweep's records
    without an error, in MVLOSS_TRITON_TILES's form: {"forward": {..., "mode": ...}, "dlogits": {...}} (BLOCK_K is
    left out: the forward and the backward share it; "mode" only where it is not the default form)."""
    from mvloss.triton._config import TILE_KEYS

    best = {}
    for kernel, kind in TILE_KINDS.items():
        rows = [r for r in records if r.get("kernel") == kernel and "ms" in r and "error" not in r]
        if rows:
            fastest = min(rows, key=lambda r: r["ms"])
            best[kind] = {k: fastest[k] for k in TILE_KEYS if k in fastest and (k, fastest[k]) != ("mode", "tiles")}
    return best


def max_rel_err(out, ref) -> float:
    """Largest |out - ref| over the largest |ref|, across the tensors of two outputs (None and empty ones skipped)."""
    worst = 0.0
    for o, r in zip(out, ref):
        if isinstance(r, torch.Tensor) and r.numel():
            worst = max(worst, ((o.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30)).item())
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--B", type=int, default=1024)
    p.add_argument("--C", type=int, default=100_000)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--modes", nargs="+", default=["tiles", "alt"],
                   choices=("tiles", "alt", "flat", "tma", "ws", "persistent"),
                   help="loop forms to sweep: tiles (the default one), alt (all the others), or named ones")
    p.add_argument("--best", metavar="SWEEP.json", help="print the fastest tiles of a sweep's records as JSON")
    a = p.parse_args(argv)
    if a.best:
        with open(a.best) as f:
            print(json.dumps(best_tiles(json.load(f))))
        return 0
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        a.B, a.C, a.D, a.dtype = 5, 300, 24, "fp32"
    sys.path.insert(0, os.path.dirname(__file__))
    from triton_gpu_timings import DTYPES, _time, env, step_inputs

    from mvloss.negatives import inverse_norms
    from mvloss.triton import _config, backward_dw, backward_dx, backward_gemm, forward_lse

    device = torch.device("cpu" if a.smoke else "cuda")
    dtype = DTYPES[a.dtype]
    B, C, D = a.B, a.C, a.D
    x, w, y = step_inputs(B, C, D, dtype, device)
    args = (x, w, inverse_norms(x, 1e-12), inverse_norms(w, 1e-12), y, torch.zeros(B, device=device),
            torch.full((B,), 32.0, device=device), None, 2, 0.2, False)
    # a training step's flags without label smoothing: no logit sum, no gradient of it
    _, _, lse = forward_lse.launch(*args, need_zsum=False)
    kargs = args[:8] + (lse, torch.ones(B, device=device) / B, None, 2, 0.2, False, False)
    g_cos = torch.randn(B, generator=torch.Generator().manual_seed(1)).to(device) / B

    def backward_step():
        """The backward as a training step runs it: the fused weight gradient (the target column's gradient in the
        recompute kernel's tile, dW finished per chunk), into a fresh dW each call so each run's output is its own."""
        return backward_gemm.launch(*kargs, False, finish_w=(g_cos, torch.empty_like(w), True, 1e-12))
    warmup, iters = (0, 1) if a.smoke else (2, 7)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    table_fwd, table_bwd = _config.forward_config, _config.backward_config
    bk = _config.k_block(dtype)
    flops = 2.0 * B * C * D
    records = []

    def record(kernel, cfg, fn, ref):
        try:
            ms = _time(fn, device, warmup, iters)
            rec = dict(device=name, kernel=kernel, B=B, C=C, D=D, dtype=a.dtype, ms=ms, tflops=flops / ms / 1e9,
                       **{k: v for k, v in cfg.items()})
            if ref is not None:
                rec["max_rel_err"] = max_rel_err(fn(), ref)
                if not rec["max_rel_err"] <= TOLERANCE:
                    rec["error"] = f"outputs differ from the table's by {rec['max_rel_err']:.3g} (relative)"
        except Exception as exc:  # a configuration out of resources on this device, or one that does not compile
            rec = dict(device=name, kernel=kernel, error=f"{type(exc).__name__}: {str(exc)[:200]}", **cfg)
        records.append(rec)
        print(json.dumps(rec), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(records, f, indent=1)

    def wanted(mode):
        return mode in a.modes or ("tiles" if mode == "tiles" else "alt") in a.modes

    def sweep(kernel, table_name, by_mode, mode_var, fn):
        """Each loop form --modes asks for, with the table's configuration and then its candidates, each run's
        outputs checked against the table's in the tiles form; the table restored afterwards."""
        table = getattr(_config, table_name)
        with env(**{mode_var: "tiles"}):
            ref = fn()
        try:
            for mode, configs in by_mode.items():
                if not wanted(mode):
                    continue
                with env(**{mode_var: mode}):
                    # the table's configuration first and again last: on an H100 the first record of a form
                    # came out 1.5-2x slower than the same code timed later (sweep_run8.json), so the repeat gives
                    # the run's spread
                    for i, cfg in enumerate([None] + configs + [None]):
                        setattr(_config, table_name,
                                table if cfg is None else (lambda *_, c=cfg: dict(c, BLOCK_K=bk)))
                        shown = dict(cfg or dict(table(B, D, dtype), table=True), mode=mode)
                        if cfg is None and i:
                            shown["repeat"] = True
                        record(kernel, shown, fn, ref)
        finally:
            setattr(_config, table_name, table)

    try:
        # the warp-specialised forms last: new compiler paths, so a fault or a hang there (the stage's timeout)
        # costs none of the other records
        for ws in (False, True):
            sweep("forward", "forward_config", {m: c for m, c in FORWARD_BY_MODE.items() if (m == "ws") == ws},
                  "MVLOSS_TRITON_FORWARD", lambda: forward_lse.launch(*args, need_zsum=False))
            sweep("backward_gemm", "dlogits_config", {m: c for m, c in DLOGITS_BY_MODE.items() if (m == "ws") == ws},
                  "MVLOSS_TRITON_DLOGITS", backward_step)
        if os.environ.get("SWEEP_RECOMPUTE") == "1":
            for kernel, mod in (("dx", backward_dx), ("dw", backward_dw)):
                for cfg in [None] + BACKWARD:
                    if cfg is not None:
                        _config.backward_config = lambda *_, c=cfg: dict(c, BLOCK_K=bk)
                    record(kernel, cfg or dict(table_bwd(kernel, B, D, dtype), table=True),
                           lambda: mod.launch(*kargs), None)
                    _config.backward_config = table_bwd
    finally:
        _config.forward_config, _config.backward_config = table_fwd, table_bwd
    return 0


if __name__ == "__main__":
    sys.exit(main())
