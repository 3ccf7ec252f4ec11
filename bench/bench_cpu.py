"""CPU benchmark of the "cpu" (C++) backend against "reference" and "chunked": forward+backward time and the
extra peak resident memory of one training step, each backend in its own subprocess.

    python bench/bench_cpu.py                      # B=256, D=128, C=100k fp32, MV-Arc (m2=0.5, adaptive t=0.2)
    python bench/bench_cpu.py --dtype bfloat16 --classes 10000 --out bench/results/cpu/other.json

Extra peak memory = peak RSS during the step (VmHWM, reset through /proc/self/clear_refs after the inputs exist)
minus the RSS just before it.  Writes a JSON file and a Markdown table next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "cpu", "cpu_backend.json")
BACKENDS = ("reference", "chunked", "cpu")


def cpu_kernels():
    from mvloss.backends import cpp

    return cpp.cpu_kernels()


def worker(args) -> dict:
    import torch

    import mvloss
    from mvloss import functional as F
    from mvloss.bench.runner import proc_status_kb, reset_peak_rss

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.batch, args.dim).to(dtype)
    w = torch.randn(args.classes, args.dim).to(dtype)
    y = torch.randint(0, args.classes, (args.batch,))
    kw = dict(m2=0.5, mv="adaptive", t=0.2, scale=32.0)

    def step():
        xb = x.detach().requires_grad_(True)
        wb = w.detach().requires_grad_(True)
        loss = F.margin_softmax_loss(xb, wb, y, backend=args.backend, **kw)
        loss.backward()
        return loss.item(), xb.grad, wb.grad

    # a tiny warm-up (imports, thread pools) that does not touch the big shapes' peak
    F.margin_softmax_loss(x[:2].detach().requires_grad_(True), w[:3].detach(), y[:2] % 3, backend=args.backend,
                          **kw).backward()
    import gc
    gc.collect()
    rss_before = proc_status_kb("VmRSS")
    reset_ok = reset_peak_rss()
    t0 = time.perf_counter()
    loss, gx, gw = step()
    first = time.perf_counter() - t0
    peak = proc_status_kb("VmHWM")
    extra_mb = (peak - rss_before) / 1024 if reset_ok else float("nan")
    del gx, gw
    # the negatives pass alone (the backend's own forward + backward, without the shared autograd glue)
    op_extra_mb = float("nan")
    chosen = mvloss.dispatch.get(args.backend)
    if chosen.fused:
        from mvloss.negatives import inverse_norms
        x_inv, w_inv = inverse_norms(x, 1e-12), inverse_norms(w, 1e-12)
        thr = torch.full((args.batch,), 0.3)
        scale = torch.full((args.batch,), 32.0)
        g = torch.full((args.batch,), 1.0 / args.batch)
        gc.collect()
        rss0 = proc_status_kb("VmRSS")
        if reset_peak_rss():
            lse = mvloss.dispatch.lse_for_backward(
                chosen.forward(x, w, x_inv, w_inv, y, thr, scale, None, 2, 0.2, False))
            held = [chosen.backward(x, w, x_inv, w_inv, y, thr, scale, None, lse, g, torch.zeros_like(g), 2, 0.2,
                                    False, False, False)]  # alive until the peak is read
            op_extra_mb = (proc_status_kb("VmHWM") - rss0) / 1024
            held.clear()
            del lse
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"backend": args.backend, "loss": loss, "first_step_s": first, "median_s": statistics.median(times),
            "min_s": min(times), "times_s": times, "extra_peak_rss_mb": extra_mb,
            "negatives_pass_extra_peak_rss_mb": op_extra_mb,
            "grad_w_mb": grad_w_mb(args), "threads": torch.get_num_threads(),
            "available": {b["name"]: b["available"] for b in mvloss.backends()}}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def grad_w_mb(args) -> float:
    """W's gradient, in W's dtype: an output every backend must allocate."""
    return args.classes * args.dim * (4 if args.dtype == "float32" else 2) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0: torch's default)")
    p.add_argument("--worker", dest="backend", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.backend is not None:
        print(json.dumps(worker(args)))
        return
    import torch

    results = {}
    for backend in args.backends.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", backend, "--batch", str(args.batch),
               "--dim", str(args.dim), "--classes", str(args.classes), "--dtype", args.dtype,
               "--iters", str(args.iters), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            results[backend] = {"backend": backend, "error": proc.stderr.strip().splitlines()[-1:]}
            print(f"{backend}: failed: {proc.stderr.strip()[-500:]}", file=sys.stderr)
            continue
        results[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[backend]
        print(f"{backend:>10}: {1000 * r['median_s']:9.1f} ms fwd+bwd (median of {args.iters}), "
              f"extra peak RSS {r['extra_peak_rss_mb']:8.1f} MB, loss {r['loss']:.6f}", file=sys.stderr)
    summary = {}
    if "cpu" in results and "median_s" in results["cpu"]:
        for other in ("reference", "chunked"):
            if other in results and "median_s" in results[other]:
                summary[f"speedup_vs_{other}"] = results[other]["median_s"] / results["cpu"]["median_s"]
                summary[f"memory_ratio_vs_{other}"] = (results[other]["extra_peak_rss_mb"]
                                                       / max(results["cpu"]["extra_peak_rss_mb"], 1e-9))
                # beyond the gradients every backend must return (dW and dx), the memory the method itself adds
                grads = results["cpu"]["grad_w_mb"] * (1 + args.batch / args.classes)
                summary[f"memory_ratio_vs_{other}_beyond_grads"] = (
                    (results[other]["extra_peak_rss_mb"] - grads) / max(results["cpu"]["extra_peak_rss_mb"] - grads,
                                                                        1.0))  # RSS is not exact below ~1 MB
    command = "python bench/bench_cpu.py " + " ".join(sys.argv[1:])
    meta = {"command": command.strip(), "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": args.threads or torch.get_num_threads(),
            "shape": {"B": args.batch, "D": args.dim, "C": args.classes},
            "dtype": args.dtype, "loss": "MV-Arc: m2=0.5, mv=adaptive, t=0.2, scale=32",
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "loadavg": " ".join(open("/proc/loadavg").read().split()[:3]),
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MVLOSS_CPU_ISA",
                                               "MVLOSS_CPU_BF16_GEMM") if k in os.environ},
            "cpu_backend": cpu_kernels()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "summary": summary, "results": results}, fh, indent=2)
    lines = ["# CPU backend benchmark", "", f"Command: `{meta['command']}`  ",
             f"Machine: {meta['cpu']}, {meta['cores']} cores ({meta['threads']} torch threads), "
             f"torch {meta['torch']}; mvloss cpu backend: {meta['cpu_backend']}  ",
             f"Shape: B={args.batch}, D={args.dim}, C={args.classes}, {args.dtype}; {meta['loss']}; "
             f"forward+backward, median of {args.iters} steps; {meta['date_utc']} UTC", "",
             "| backend | fwd+bwd ms (median) | min ms | extra peak RSS MB, whole step | "
             "extra peak RSS MB, negatives pass only |", "|---|---:|---:|---:|---:|"]
    for backend, r in results.items():
        if "median_s" in r:
            lines.append(f"| {backend} | {1000 * r['median_s']:.1f} | {1000 * r['min_s']:.1f} | "
                         f"{r['extra_peak_rss_mb']:.1f} | {r['negatives_pass_extra_peak_rss_mb']:.1f} |")
        else:
            lines.append(f"| {backend} | failed | |")
    lines.append("")
    lines.append(f"Load average while running: {meta['loadavg']}; dW alone ({args.dtype}) is "
                 f"{grad_w_mb(args):.1f} MB (an output every backend must allocate).")
    lines.append("")
    for k, v in summary.items():
        lines.append(f"- {k}: {v:.2f}x")
    with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(json.dumps(summary), file=sys.stderr)


if __name__ == "__main__":
    main()
