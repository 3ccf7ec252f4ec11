"""The benchmark command: a grid of cases, results as CSV/JSON/markdown/plots, and --compare against a baseline."""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import re
import sys
import time

import torch

from . import methods, runner
from .metrics import compare, load_rows

FULL_GRID = dict(B=[256, 1024], D=[128, 512], C=[10_000, 100_000, 1_000_000, 10_000_000], dtype=["fp32", "bf16"],
                 loss=["normface", "arcface", "mv_arc"], passes=["fwd", "fwd+bwd"])
CPU_GRID = dict(B=[256], D=[128], C=[10_000, 100_000], dtype=["fp32"], loss=["mv_arc"], passes=["fwd", "fwd+bwd"])
QUICK_GRID = dict(B=[32], D=[16], C=[500, 2000], dtype=["fp32"], loss=["mv_arc"], passes=["fwd+bwd"])
CPU_METHODS = ["mvloss:cpu", "mvloss:cpu+compile", "mvloss:chunked", "reference", "reference_compiled", "eager_head",
               "eager_head_compiled", "gemm_floor"]
GPU_METHODS = ["mvloss:triton", "mvloss:triton+compile", "mvloss:cuda", "mvloss:chunked", "reference",
               "reference_compiled", "eager_head", "eager_head_compiled", "gemm_floor", "cce", "liger"]
FIELDS = ["method", "loss", "dtype", "B", "C", "D", "pass", "ms", "steady_ms", "tflops", "floor_ratio",
          "peak_extra_mb", "status", "device"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU {platform.machine()} ({os.cpu_count()} cores)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m mvloss.bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny grid, about a minute")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--B", type=int, nargs="+")
    p.add_argument("--D", type=int, nargs="+")
    p.add_argument("--C", type=int, nargs="+")
    p.add_argument("--dtype", nargs="+", choices=sorted(runner.DTYPES))
    p.add_argument("--loss", nargs="+", choices=sorted(methods.LOSSES))
    p.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"])
    p.add_argument("--methods", nargs="+", choices=list(methods.METHODS))
    p.add_argument("--budget", type=float, default=2.0, help="seconds of repetitions per case")
    p.add_argument("--out", default=None, help="results folder (default bench/results/<device>)")
    p.add_argument("--compare", default=None, help="baseline JSON: exit 1 when a case is >10%% slower")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--largest-c", action="store_true", help="search the largest C that fits at B=1024, D=512")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--label-check", default=None, choices=("sync", "deferred"),
                   help="mvloss.set_label_check for the mvloss methods (default: the environment's, sync)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one case (child process)
    return p.parse_args(argv)


def grid_for(args, device: torch.device) -> dict:
    base = QUICK_GRID if args.quick else (FULL_GRID if device.type == "cuda" else CPU_GRID)
    grid = {k: list(v) for k, v in base.items()}
    for key, value in (("B", args.B), ("D", args.D), ("C", args.C), ("dtype", args.dtype), ("loss", args.loss),
                       ("passes", args.passes)):
        if value:
            grid[key] = value
    return grid


def cases(grid: dict, method_list: list, device: torch.device):
    for loss, dtype, B, D, C, pas, method in itertools.product(grid["loss"], grid["dtype"], grid["B"], grid["D"],
                                                               grid["C"], grid["passes"], method_list):
        yield dict(method=method, loss=loss, dtype=dtype, B=B, C=C, D=D, device=str(device), **{"pass": pas})


def memory_guard(case: dict, device: torch.device) -> str | None:
    """Materialising methods at huge B x C: say so instead of letting the machine swap or die."""
    need = runner.estimated_bytes(case["method"], case["B"], case["C"], runner.DTYPES[case["dtype"]].itemsize)
    need += 2 * case["C"] * case["D"] * 4
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[0]
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if need > 0.8 * have:
        return f"skipped: needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB free"
    return None


def run_grid(args, device: torch.device) -> list[dict]:
    method_list = args.methods or (GPU_METHODS if device.type == "cuda" else CPU_METHODS)
    todo = list(cases(grid_for(args, device), method_list, device))
    try:
        from tqdm import tqdm
        progress = tqdm(todo, desc="bench", unit="case", file=sys.stderr)
    except ImportError:
        progress = todo
    rows = []
    for case in progress:
        skip = memory_guard(case, device)
        if skip:
            row = dict(case, ms=None, tflops=None, peak_extra_mb=None, status=skip)
        elif device.type == "cuda":
            row = runner.measure(case, args.budget)
            torch.cuda.empty_cache()
        else:
            row = runner.measure_isolated(case, args.budget)
        rows.append(row)
        # one line per case as it is measured: a run stopped by a time limit still leaves its numbers in the log
        print("row " + json.dumps({k: row.get(k) for k in ("method", "loss", "dtype", "B", "C", "D", "pass", "ms",
                                                           "steady_ms", "tflops", "peak_extra_mb", "status")}),
              flush=True)
    add_floor_ratios(rows)
    return rows


def add_floor_ratios(rows: list[dict]) -> None:
    floors = {(r["loss"], r["dtype"], r["B"], r["C"], r["D"], r["pass"]): r["ms"]
              for r in rows if r["method"] == "gemm_floor" and r["ms"]}
    for r in rows:
        floor = floors.get((r["loss"], r["dtype"], r["B"], r["C"], r["D"], r["pass"]))
        r["floor_ratio"] = r["ms"] / floor if (floor and r["ms"]) else None


def largest_c(method: str, device: torch.device, loss="mv_arc", dtype="bf16", B=1024, D=512,
              start=100_000, cap=200_000_000) -> dict:
    """Largest C (doubling, then bisection to ~10%) for which forward+backward runs without OOM."""
    def fits(C):
        row = runner.measure(dict(method=method, loss=loss, dtype=dtype, B=B, C=C, D=D, device=str(device),
                                  **{"pass": "fwd+bwd"}), budget_s=0.0, max_reps=1)
        torch.cuda.empty_cache()
        return row["status"] == "ok", row["status"]
    ok, status = fits(start)
    if not ok:
        return dict(method=method, largest_c=None, status=status)
    lo, hi = start, None
    while hi is None and lo < cap:
        ok, _ = fits(min(2 * lo, cap))
        if ok:
            lo = min(2 * lo, cap)
        else:
            hi = min(2 * lo, cap)
    while hi is not None and hi - lo > lo // 10:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid)[0] else (lo, mid)
    return dict(method=method, largest_c=lo, status="ok" if hi is not None else f"reached cap {cap}")


def write_results(rows, extra, out_dir, device_label, command):
    os.makedirs(out_dir, exist_ok=True)
    from ..label_check import get_label_check

    meta = dict(device=device_label, torch=torch.__version__, python=platform.python_version(),
                command=command, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), label_check=get_label_check())
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:
        pass
    from ..backends import cpp
    cpu_kernels = cpp.cpu_kernels()
    if cpu_kernels is not None:
        meta["cpu_backend"] = cpu_kernels
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows, largest_c=extra), f, indent=1)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(rows, extra, meta))
    return meta


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def summary_markdown(rows, extra, meta) -> str:
    lines = [f"# mvloss benchmark on {meta['device']}", "",
             f"torch {meta['torch']}" + (f", triton {meta['triton']}" if "triton" in meta else "") +
             f", {meta['date']}" + (f"; mvloss cpu backend: {meta['cpu_backend']}" if "cpu_backend" in meta else ""),
             "", f"Command: `{meta['command']}`", "",
             "ms: median of steps each timed alone (the GPU idle at its start and waited for at its end); back to "
             "back: per step with ten issued in a row, as a training loop runs them (GPU only; mvloss label check: "
             f"{meta.get('label_check', 'sync')}, `mvloss.set_label_check`). Peak extra MB: the high-water mark of "
             "a step after a warm-up step (so no compiler memory), beyond inputs and gradients (GPU: allocated "
             "memory; CPU: resident memory, each case in its own process).", "",
             "| method | loss | dtype | B | C | D | pass | ms | back to back ms | TFLOP/s | × GEMM floor "
             "| peak extra MB | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['loss']} | {r['dtype']} | {r['B']} | {r['C']} | {r['D']} | {r['pass']} "
                     f"| {_fmt(r['ms'], '.3f')} | {_fmt(r.get('steady_ms'), '.3f')} | {_fmt(r['tflops'], '.3f')} "
                     f"| {_fmt(r.get('floor_ratio'), '.2f')} | {_fmt(r['peak_extra_mb'], '.1f')} | {r['status']} |")
    if extra:
        lines += ["", "Largest C that fits (B = 1024, D = 512, bf16, MV-Arc, forward+backward):", "",
                  "| method | largest C | status |", "|---|---|---|"]
        lines += [f"| {e['method']} | {e['largest_c']} | {e['status']} |" for e in extra]
    return "\n".join(lines) + "\n"


def plot_groups(rows) -> list[tuple[str, list[dict]]]:
    """The panels the plots draw: one per (loss, dtype) at the grid's largest B and D, forward+backward when measured
    (each panel's rows span C)."""
    measured = [r for r in rows if r["ms"] is not None and r["pass"] == "fwd+bwd"] or \
        [r for r in rows if r["ms"] is not None]
    if not measured:
        return []
    B, D = max(r["B"] for r in measured), max(r["D"] for r in measured)
    at_shape = [r for r in measured if r["B"] == B and r["D"] == D]
    keys = list(dict.fromkeys((r["loss"], r["dtype"], r["pass"]) for r in at_shape))
    return [(f"{loss} {dtype} B={B} D={D} {pas}",
             [r for r in at_shape if (r["loss"], r["dtype"], r["pass"]) == (loss, dtype, pas)])
            for loss, dtype, pas in keys]


def plot(rows, out_dir) -> list[str]:
    import math

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = plot_groups(rows)
    if not groups:
        return written
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    for metric, ylabel, fname in (("ms", "time (ms)", "time_vs_C.png"),
                                  ("peak_extra_mb", "peak extra memory (MB)", "memory_vs_C.png"),
                                  ("tflops", "TFLOP/s", "tflops_vs_C.png")):
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows), squeeze=False)
        for ax in axes.flat[len(groups):]:
            ax.set_visible(False)
        for ax, (title, group) in zip(axes.flat, groups):
            for method in sorted({r["method"] for r in group}):
                pts = sorted((r["C"], r[metric]) for r in group if r["method"] == method and r[metric] is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=method)
            ax.set_xscale("log")
            if metric == "ms":
                ax.set_yscale("log")
            ax.set_xlabel("classes C")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    args = parse(argv)
    if args.label_check:  # in this process and in the children that measure CPU cases
        from ..label_check import set_label_check

        set_label_check(args.label_check)
        os.environ["MVLOSS_LABEL_CHECK"] = args.label_check
    if args.one is not None:  # child process: one case, one JSON line on stdout
        print(json.dumps(runner.measure(json.loads(args.one), args.budget)))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    label = device_name(device)
    out_dir = args.out or os.path.join("bench", "results", slug(label))
    command = "python -m mvloss.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = run_grid(args, device)
    extra = []
    if args.largest_c:
        if device.type == "cuda":
            for m in args.methods or GPU_METHODS:
                searchable = m != "gemm_floor" and not m.endswith(methods.COMPILE)  # compiled: one shape only
                if searchable and methods.unavailable(m, "mv_arc", device, torch.bfloat16, 1024, 100_000,
                                                      512) is None:
                    extra.append(largest_c(m, device))
                    print("largest " + json.dumps(extra[-1]), flush=True)
        else:
            print("--largest-c searches GPU memory; skipped on CPU", file=sys.stderr)
    meta = write_results(rows, extra, out_dir, label, command)
    if not args.no_plots:
        plot(rows, out_dir)
    print(summary_markdown(rows, extra, meta))
    print(f"results written to {out_dir}/")
    if args.compare:
        slower = compare(rows, load_rows(args.compare), args.tolerance)
        for msg in slower:
            print(f"SLOWER: {msg}", file=sys.stderr)
        if slower:
            return 1
    return 0
