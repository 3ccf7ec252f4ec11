"""Timings of the Triton backend on a CUDA GPU: forward ms, forward+backward ms, TFLOP/s, peak extra MB.

    python bench/triton_gpu_timings.py                      # the DESIGN.md grid, bf16
    python bench/triton_gpu_timings.py --dtype fp16 --B 1024 --C 100000 --D 512 --out timings.json
    python bench/triton_gpu_timings.py --smoke              # check the script itself on a CPU (interpreter)

Per shape it times, at the same dtype:
  triton      the full loss (mvloss.functional.arcface_loss with MV adaptive) on the Triton backend, the host's
              time to issue its step (host_issue_ms: an eager step bound by its launches takes about that long),
              and steady_ms, the time per step run back to back as a training loop runs them (every other
              timing waits for the GPU after each step);
  triton_deferred_check  the same step with the label check deferred (mvloss.set_label_check("deferred")): no
              host sync, so back to back the host can issue a step while the GPU runs the one before;
  triton_graphed  the same step captured in a CUDA graph and replayed (GPU only): its GPU time without host overhead;
  triton_tiles  with --tiles: the same step (eager, and graphed on a GPU) with each candidate's tiles
                (MVLOSS_TRITON_TILES), one record each, in order; triton_again: the table's step timed again
                after them (the run's spread);
  triton_candidates  the same step with the candidate kernels (CANDIDATES: MVLOSS_TRITON_FORWARD=ws,
              MVLOSS_TRITON_DLOGITS=ws; before, flat and persistent, timed and dropped), to decide whether they
              become the default;
  triton_compiled  the same training step under torch.compile(fullgraph=True) (GPU only; TIMINGS_COMPILE=0 skips);
  triton_compiled_traced  with TIMINGS_TRACED=1, the same with every op traced (MVLOSS_TRITON_OPAQUE=off: the
              half-precision forward then runs without its register cap, mvloss/triton/README.md);
  triton_ops  the bare ops (mvloss::triton_neg_forward / _backward): what the kernels themselves cost;
  cuda        the C++/CUDA backend (same loss), when the extension is built with CUDA;
  chunked     the pure-PyTorch chunked backend (same loss);
  gemms       the three bare cuBLAS GEMMs the loss must do (x W^T, dZ W, dZ^T x) at the input dtype: the floor;
  eager       the head users have: F.linear on normalised inputs + margin + cross_entropy (materialises B x C),
              the same MV-Arc loss (mvloss.bench.methods.eager_head_loss, the bench grid's eager_head);
  eager_compiled  the same head under torch.compile(fullgraph=True) (GPU only; TIMINGS_COMPILE=0 skips).
TFLOP/s counts 2 B C D for a forward and 8 B C D for forward+backward (one forward, one recompute, dX and dW), the
same count for every row so the numbers compare.  Peak MB is torch.cuda.max_memory_allocated() above what was
allocated before the step.  The device name is in every record.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the candidate loop forms timed beside the defaults (mvloss/triton/README.md); flat and persistent were timed on an
# H100 and dropped (bench/results/nvidia-h100-80gb-hbm3/NOTES.md, runs 5-6)
CANDIDATES = {"MVLOSS_TRITON_FORWARD": "ws", "MVLOSS_TRITON_DLOGITS": "ws"}


@contextlib.contextmanager
def env(**values):
    """Environment variables set for the enclosed code, then put back as they were (e.g. a candidate kernel)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# The loss every GPU script times: MV-Arc (ArcFace margin, adaptive mis-classified-vector weighting).
MV_ARC = dict(scale=32.0, margin=0.5, mv="adaptive", t=0.2)


def step_inputs(B: int, C: int, D: int, dtype: torch.dtype, device, requires_grad: bool = False):
    """The benchmark problem (seed 0): embeddings x (B, D), weights w (C, D) at 0.05 scale, labels y (B,)."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, D, device=device, generator=g).to(dtype).requires_grad_(requires_grad)
    w = (0.05 * torch.randn(C, D, device=device, generator=g)).to(dtype).requires_grad_(requires_grad)
    y = torch.randint(0, C, (B,), device=device, generator=g)
    return x, w, y


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median(times: list) -> float:
    """The upper middle value (this script's median since its first run; statistics.median averages the two)."""
    return sorted(times)[len(times) // 2]


def _time(fn, device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of fn: CUDA events on a GPU, wall clock otherwise (--smoke)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return _median(times)


def _host_issue_ms(fn, device: torch.device, iters: int) -> float:
    """Median wall milliseconds until fn returns, the device idle at each start: the host's time to issue one step
    (on a GPU the step's own time cannot be shorter than this while kernels wait for their launches)."""
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    _sync(device)
    return _median(times)


def _host_issue_split_ms(loss_fn, device: torch.device, iters: int) -> dict:
    """Median wall milliseconds until the forward returns and until its backward returns, the device idle at the start
    of each: which half of a step makes its host wait (a half whose issue time is near its GPU time waits on the
    device somewhere inside)."""
    fwd, bwd = [], []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        loss = loss_fn()
        fwd.append(1e3 * (time.perf_counter() - t0))
        _sync(device)
        t0 = time.perf_counter()
        loss.backward()
        bwd.append(1e3 * (time.perf_counter() - t0))
    _sync(device)
    return dict(host_issue_fwd_ms=_median(fwd), host_issue_bwd_ms=_median(bwd))


def _steady_ms(fn, device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Milliseconds per call of fn run back to back, as a training loop runs its steps: the host may issue the next
    call while the GPU still works on this one (the per-call timings above wait for the GPU after each call)."""
    from mvloss.bench.runner import back_to_back_ms

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        return back_to_back_ms(fn, iters)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return 1e3 * (time.perf_counter() - t0) / iters


def _peak_mb(fn, device: torch.device) -> float:
    if device.type != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _tiles_parts(rec) -> list:
    """['tiles 1: a ms (graphed b)', ..., 'table again c ms (graphed d)'] of --tiles's records, [] without."""
    def ms(r):
        return f"{r['fwd_bwd_ms']:.2f} ms (graphed {r.get('graphed_ms', float('nan')):.2f})"
    if "triton_tiles" not in rec:
        return []
    return [f"tiles {i}: {ms(r)}" for i, r in enumerate(rec["triton_tiles"], 1)] + \
        [f"table again {ms(rec['triton_again'])}"]


def bench_shape(B, C, D, dtype, device="cuda", warmup=3, iters=10, skip_eager_above=2**34, tiles=None,
                step_only=False):
    """The records of one shape; ``step_only``: only the Triton step, eager and graphed (and with ``tiles``)."""
    import mvloss.triton.ops  # noqa: F401  (registers the ops)
    from mvloss import functional as F
    from mvloss.negatives import inverse_norms

    device = torch.device(device)
    x, w, y = step_inputs(B, C, D, dtype, device, requires_grad=True)
    kw = MV_ARC
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    rec = dict(device=name, B=B, C=C, D=D, dtype=str(dtype).replace("torch.", ""))
    fwd_flops, step_flops = 2.0 * B * C * D, 8.0 * B * C * D

    def timed(fn):
        return _time(fn, device, warmup, iters)

    def peak(fn):
        return _peak_mb(fn, device)

    def steady(fn):
        return _steady_ms(fn, device, warmup, iters)

    def loss_with_grad(backend):
        def fwd():
            x.grad = None
            w.grad = None
            return F.arcface_loss(x, w, y, backend=backend, **kw)
        return fwd

    def loss_step(backend):
        def step():
            loss_with_grad(backend)().backward()
        return step

    def loss_fwd(backend):
        def fwd():
            with torch.no_grad():
                F.arcface_loss(x, w, y, backend=backend, **kw)
        return fwd

    import mvloss

    available = {b["name"] for b in mvloss.backends() if b["available"]}
    backends = [b for b in ("triton", "cuda", "chunked") if b == "triton" or (b in available and not step_only)]
    for backend in backends:
        ms_f = timed(loss_fwd(backend))
        ms_s = timed(loss_step(backend))
        rec[backend] = dict(fwd_ms=ms_f, fwd_bwd_ms=ms_s, fwd_tflops=fwd_flops / ms_f / 1e9,
                            fwd_bwd_tflops=step_flops / ms_s / 1e9, peak_mb=peak(loss_step(backend)),
                            host_issue_ms=_host_issue_ms(loss_step(backend), device, iters),
                            **_host_issue_split_ms(loss_with_grad(backend), device, iters),
                            steady_ms=steady(loss_step(backend)))

    # the eager step without its one host sync (the label check deferred, mvloss.label_check), back to back and
    # timed alone: what the sync costs a training loop
    import mvloss.label_check as label_check

    old_check = label_check.set_label_check("deferred")
    try:
        rec["triton_deferred_check"] = dict(fwd_bwd_ms=timed(loss_step("triton")),
                                            steady_ms=steady(loss_step("triton")),
                                            host_issue_ms=_host_issue_ms(loss_step("triton"), device, iters),
                                            **_host_issue_split_ms(loss_with_grad("triton"), device, iters))
    finally:
        label_check.set_label_check(old_check)

    # the candidate kernels in the same full step
    if not step_only:
        with env(**CANDIDATES):
            ms_s = timed(loss_step("triton"))
        rec["triton_candidates"] = dict(fwd_bwd_ms=ms_s, fwd_bwd_tflops=step_flops / ms_s / 1e9, env=CANDIDATES)

    def graphed_ms():
        """The eager step captured in a CUDA graph and replayed: its GPU time alone, none of the host's launch
        overhead."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                loss_step("triton")()
        torch.cuda.current_stream().wait_stream(side)
        x.grad = w.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            F.arcface_loss(x, w, y, backend="triton", **kw).backward()
        ms = timed(graph.replay)
        del graph
        x.grad = w.grad = None
        return ms

    if device.type == "cuda":
        ms_g = graphed_ms()
        rec["triton_graphed"] = dict(fwd_bwd_ms=ms_g, fwd_bwd_tflops=step_flops / ms_g / 1e9)

    # candidate tiles (MVLOSS_TRITON_TILES, e.g. a sweep's fastest: bench/triton_sweep.py --best) in the same step,
    # eager and graphed, beside the table's: whether they become the table's
    from mvloss.triton import _config

    def tiles_in_use():
        return dict(forward=dict(_config.forward_config(B, D, dtype), mode=_config.forward_mode()),
                    dlogits=dict(_config.dlogits_config(B, D, dtype), mode=_config.dlogits_mode()),
                    dw=dict(_config.dw_fused_config(D, dtype), mode=_config.dw_gemm_mode()))

    def step_record():
        ms_s = timed(loss_step("triton"))
        r = dict(fwd_bwd_ms=ms_s, fwd_bwd_tflops=step_flops / ms_s / 1e9, tiles=tiles_in_use())
        if device.type == "cuda":
            ms_g = graphed_ms()
            r.update(graphed_ms=ms_g, graphed_tflops=step_flops / ms_g / 1e9)
        return r

    rec["tiles"] = tiles_in_use()
    if tiles:
        rec["triton_tiles"] = []
        for candidate in tiles:  # each alone, so each change's effect is its own
            with env(MVLOSS_TRITON_TILES=candidate):
                rec["triton_tiles"].append(step_record())
        rec["triton_again"] = step_record()
    if step_only:
        return rec

    # the same step under torch.compile (fullgraph): Inductor fuses the O(B) glue around the kernels, which eager
    # mode pays for in host time
    # (TIMINGS_TRACED=1: also with every op traced, MVLOSS_TRITON_OPAQUE=off, so the forward runs without its
    # register cap: the opaque twin's effect, measured in the same run)
    variants = []
    if device.type == "cuda" and os.environ.get("TIMINGS_COMPILE", "1") == "1":
        variants.append(("triton_compiled", "auto"))
        if os.environ.get("TIMINGS_TRACED", "0") == "1":
            variants.append(("triton_compiled_traced", "off"))
    for name, opaque in variants:
        with env(MVLOSS_TRITON_OPAQUE=opaque):
            torch._dynamo.reset()  # the choice of ops is made while tracing
            compiled = torch.compile(lambda x, w, y: F.arcface_loss(x, w, y, backend="triton", **kw),
                                     fullgraph=True)

            def compiled_step():
                x.grad = None
                w.grad = None
                compiled(x, w, y).backward()

            ms_c = timed(compiled_step)
            rec[name] = dict(fwd_bwd_ms=ms_c, fwd_bwd_tflops=step_flops / ms_c / 1e9, peak_mb=peak(compiled_step),
                             steady_ms=steady(compiled_step))

    # the bare ops (no normalisation backward, no target side)
    xd, wd = x.detach(), w.detach()
    # with a training step's flags without label smoothing: no logit sum (need_zsum False), no gradient of it
    args = (xd, wd, inverse_norms(xd, 1e-12), inverse_norms(wd, 1e-12), y, torch.zeros(B, device=device),
            torch.full((B,), 32.0, device=device), None, 2, 0.2, False, False)
    _, _, lse = torch.ops.mvloss.triton_neg_forward(*args)
    bargs = args[:8] + (lse, torch.ones(B, device=device) / B, None, 2, 0.2, False, False, False)
    ms_f = timed(lambda: torch.ops.mvloss.triton_neg_forward(*args))
    with env(MVLOSS_TRITON_FORWARD=CANDIDATES["MVLOSS_TRITON_FORWARD"]):  # the candidate forward (triton/README.md)
        ms_cand = timed(lambda: torch.ops.mvloss.triton_neg_forward(*args))
    ms_b = timed(lambda: torch.ops.mvloss.triton_neg_backward(*bargs))
    rec["triton_ops"] = dict(fwd_ms=ms_f, fwd_candidate_ms=ms_cand, bwd_ms=ms_b, fwd_tflops=fwd_flops / ms_f / 1e9,
                             fwd_candidate_tflops=fwd_flops / ms_cand / 1e9,
                             fwd_bwd_tflops=step_flops / (ms_f + ms_b) / 1e9,
                             fwd_peak_mb=peak(lambda: torch.ops.mvloss.triton_neg_forward(*args)),
                             bwd_peak_mb=peak(lambda: torch.ops.mvloss.triton_neg_backward(*bargs)))
    # the two backward kernels on their own (dx then dW), to see which one to tune
    from mvloss.triton import backward_dw, backward_dx

    kargs = args[:8] + (lse, bargs[9], bargs[10], 2, 0.2, False, False)
    # the backward with dW finished per chunk (what a training step runs), and the two-kernel recompute design
    wargs = bargs[:11] + (torch.ones(B, device=device),) + bargs[11:] + (True, 1e-12)
    rec["triton_ops"]["bwd_w_ms"] = timed(lambda: torch.ops.mvloss.triton_neg_backward_w(*wargs))
    rec["triton_ops"]["bwd_w_peak_mb"] = peak(lambda: torch.ops.mvloss.triton_neg_backward_w(*wargs))
    with env(MVLOSS_TRITON_DLOGITS=CANDIDATES["MVLOSS_TRITON_DLOGITS"]):  # the candidate recompute kernel
        rec["triton_ops"]["bwd_w_candidate_ms"] = timed(lambda: torch.ops.mvloss.triton_neg_backward_w(*wargs))
    rec["triton_ops"]["recompute_dx_ms"] = timed(lambda: backward_dx.launch(*kargs))
    rec["triton_ops"]["recompute_dw_ms"] = timed(lambda: backward_dw.launch(*kargs))

    # the floor: three GEMMs at the input dtype, in class chunks of at most 64k so B x chunk fits
    chunk = min(C, 65536)
    dz = torch.randn(B, chunk, device=device).to(dtype)

    def gemms():
        dx = torch.zeros(B, D, device=device, dtype=dtype)
        for c0 in range(0, C, chunk):
            wc = wd[c0:c0 + chunk]
            d = dz[:, : wc.shape[0]]
            _ = xd @ wc.T
            dx += d @ wc
            _ = d.T @ xd

    ms_g = timed(gemms)
    rec["gemms"] = dict(fwd_bwd_ms=ms_g, tflops=6.0 * B * C * D / ms_g / 1e9,
                        triton_over_gemms=rec["triton"]["fwd_bwd_ms"] / ms_g)

    if B * C * 4 * 3 <= skip_eager_above:
        from mvloss.bench.methods import LOSSES, eager_head_loss

        # the MV-Arc head as insightface / FaceX-Zoo write it, the step's own loss (before, a plain ArcFace head)
        assert LOSSES["mv_arc"] == dict(m2=MV_ARC["margin"], mv=MV_ARC["mv"], t=MV_ARC["t"], scale=MV_ARC["scale"])

        def eager_loss(x, w, y):
            return eager_head_loss(x, w, y, "mv_arc")

        def head_step(loss_fn):
            def step():
                x.grad = None
                w.grad = None
                loss_fn(x, w, y).backward()
            return step

        eager = head_step(eager_loss)
        rec["eager"] = dict(fwd_bwd_ms=timed(eager), peak_mb=peak(eager), steady_ms=steady(eager))
        # the same head under torch.compile: the issue's second comparator, timed per step and back to back
        if device.type == "cuda" and os.environ.get("TIMINGS_COMPILE", "1") == "1":
            compiled_head = head_step(torch.compile(eager_loss, fullgraph=True))
            rec["eager_compiled"] = dict(fwd_bwd_ms=timed(compiled_head), steady_ms=steady(compiled_head),
                                         peak_mb=peak(compiled_head))
    return rec


def profile_step(B, C, D, dtype, path, device="cuda"):
    """torch.profiler tables of three Triton-backend training steps (host time and device time per op), then a
    cProfile of three more (host Python by function) -> path."""
    from torch.profiler import ProfilerActivity, profile

    from mvloss import functional as F

    x, w, y = step_inputs(B, C, D, dtype, device, requires_grad=True)

    def step():
        x.grad = None
        w.grad = None
        F.arcface_loss(x, w, y, backend="triton", **MV_ARC).backward()

    for _ in range(3):
        step()
    _sync(torch.device(device))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    # the stacks only on a GPU: under the interpreter every kernel is thousands of profiled ops, too slow to parse
    with profile(activities=acts, with_stack=device == "cuda") as prof:
        for _ in range(3):
            step()
        _sync(torch.device(device))
    avg = prof.key_averages()
    with open(path, "w") as f:
        f.write(f"B={B} C={C} D={D} {dtype}, 3 steps\n\n")
        f.write(avg.table(sort_by="self_cpu_time_total", row_limit=45))
        if device == "cuda":
            f.write("\n\n")
            f.write(avg.table(sort_by="self_cuda_time_total", row_limit=30))
            f.write("\n\n" + blocking_calls_text(prof.key_averages(group_by_stack_n=12)))
        f.write("\n\n" + python_profile_text(step, torch.device(device)))


def python_profile_text(step, device: torch.device, steps: int = 3) -> str:
    """cProfile of ``steps`` eager steps, the device synced after them: the host's Python time by function (Triton's
    launcher, mvloss's glue, the dispatcher's Python), which torch.profiler books as its ops' self time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    _sync(device)
    prof.disable()
    out = io.StringIO()
    out.write(f"cProfile of {steps} steps (host Python by function; cProfile's own overhead included):\n")
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(30)
    return out.getvalue()


# CUDA runtime / driver calls that can hold the host until the device catches up (a sync, a pageable copy, an
# allocation that frees or maps memory).
BLOCKING_CALL_WORDS = ("Synchronize", "Memcpy", "Malloc", "Free", "cuMem", "EventQuery")


def blocking_calls_text(averages) -> str:
    """The profiled host calls that may wait on the device, by the Python stack that made them, slowest first."""
    rows = [a for a in averages if any(word in a.key for word in BLOCKING_CALL_WORDS)]
    rows.sort(key=lambda a: -a.self_cpu_time_total)
    lines = ["Host calls that can wait on the device (self CPU time over the profiled steps, by Python stack):"]
    for a in rows:
        lines.append(f"{a.key}: {a.count} calls, {a.self_cpu_time_total / 1e3:.3f} ms")
        lines += [f"    {frame}" for frame in (a.stack or [])]
    if not rows:
        lines.append("(none)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--B", type=int, nargs="*", default=[256, 1024])
    p.add_argument("--C", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--D", type=int, nargs="*", default=[128, 512])
    p.add_argument("--out", default=None, help="write the records as JSON here")
    p.add_argument("--profile", default=None, help="also write torch.profiler tables of the first shape's step here")
    p.add_argument("--tiles", nargs="+", default=None, metavar="JSON",
                   help="candidate tiles (each MVLOSS_TRITON_TILES's JSON or a file of it), each timed alone in the "
                        "step beside the table's, which is timed again after them: the triton_tiles records")
    p.add_argument("--step-only", action="store_true",
                   help="time only the Triton training step, eager and graphed (and with --tiles): a quick run")
    p.add_argument("--smoke", action="store_true",
                   help="check this script on the CPU: Triton interpreter, one tiny shape, meaningless timings")
    a = p.parse_args(argv)
    device, warmup, iters = "cuda", 3, 10
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
        device, warmup, iters = "cpu", 0, 1
        a.B, a.C, a.D, a.dtype = [5], [300], [24], "fp32"
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 1
    records = []
    if a.profile:
        profile_step(a.B[0], a.C[0], a.D[0], DTYPES[a.dtype], a.profile, device=device)
    for B in a.B:
        for C in a.C:
            for D in a.D:
                rec = bench_shape(B, C, D, DTYPES[a.dtype], device=device, warmup=warmup, iters=iters,
                                  tiles=a.tiles, step_only=a.step_only)
                records.append(rec)
                if a.out:  # after every shape, so a run stopped by a time limit keeps what it measured
                    with open(a.out, "w") as f:
                        json.dump(records, f, indent=1)
                if a.step_only:
                    t, g = rec["triton"], rec.get("triton_graphed", {})
                    print(f"{rec['device']} {a.dtype} B={B} C={C} D={D}: triton step {t['fwd_bwd_ms']:.2f} ms "
                          f"(graphed {g.get('fwd_bwd_ms', float('nan')):.2f}; host issue "
                          f"{t['host_issue_ms']:.2f}: forward {t['host_issue_fwd_ms']:.2f}, backward "
                          f"{t['host_issue_bwd_ms']:.2f})"
                          + "".join(f" | {part}" for part in _tiles_parts(rec)), flush=True)
                else:
                    _print_record(rec, a.dtype)
                if device == "cuda":
                    torch.cuda.empty_cache()
    return 0


def _print_record(rec, dtype_name):
    """One line of a shape's records (all rows)."""
    t, o, gm = rec["triton"], rec["triton_ops"], rec["gemms"]
    print(f"{rec['device']} {dtype_name} B={rec['B']} C={rec['C']} D={rec['D']}: triton fwd {t['fwd_ms']:.2f} ms, "
          f"fwd+bwd {t['fwd_bwd_ms']:.2f} ms ({t['fwd_bwd_tflops']:.1f} TFLOP/s, candidates "
          f"{rec['triton_candidates']['fwd_bwd_ms']:.2f} ms, peak {t['peak_mb']:.0f} MB) | ops fwd {o['fwd_ms']:.2f} "
          f"(candidate {o['fwd_candidate_ms']:.2f}) bwd {o['bwd_ms']:.2f} bwd_w {o['bwd_w_ms']:.2f} (candidate "
          f"{o['bwd_w_candidate_ms']:.2f}) ms (recompute design dx {o['recompute_dx_ms']:.2f} dw "
          f"{o['recompute_dw_ms']:.2f}) | back to back: {t['steady_ms']:.2f} ms, label check deferred "
          f"{rec['triton_deferred_check']['steady_ms']:.2f} ms | "
          + (f"graphed {rec['triton_graphed']['fwd_bwd_ms']:.2f} ms | " if "triton_graphed" in rec
             else "")
          + (f"compiled {rec['triton_compiled']['fwd_bwd_ms']:.2f} ms | " if "triton_compiled" in rec
             else "")
          + (f"compiled, ops traced {rec['triton_compiled_traced']['fwd_bwd_ms']:.2f} ms | "
             if "triton_compiled_traced" in rec else "")
          + "".join(f"{t} | " for t in _tiles_parts(rec))
          + (f"cuda {rec['cuda']['fwd_bwd_ms']:.2f} ms | " if "cuda" in rec else "")
          + f"chunked {rec['chunked']['fwd_bwd_ms']:.2f} ms | 3 GEMMs {gm['fwd_bwd_ms']:.2f} ms "
          f"(x{gm['triton_over_gemms']:.2f})"
          + (f" | eager {rec['eager']['fwd_bwd_ms']:.2f} ms" if "eager" in rec else "")
          + (f" | eager compiled {rec['eager_compiled']['fwd_bwd_ms']:.2f} ms (back to back "
             f"{rec['eager_compiled']['steady_ms']:.2f})" if "eager_compiled" in rec else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
