"""Measuring one case: time (median), throughput, peak extra memory; OOM and unavailable methods become rows too.

On CUDA a case runs in-process (CUDA events, ``torch.cuda.max_memory_allocated``); on CPU each case runs in a child
process so its peak RSS is its own and an out-of-memory kill cannot take the whole benchmark down.
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from . import methods
from .metrics import tflops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(B, C, D, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(C, D, generator=g) * 0.01).to(device=device, dtype=dtype) if C * D <= 50_000_000 else \
        torch.empty(C, D, device=device, dtype=dtype).normal_(0, 0.01)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    return x, w, y


def gemm_floor_step(x, w, backward):
    """The bare cuBLAS/ATen GEMMs a fused head must do: x W^T (forward); plus dX = G W and dW = G^T x."""
    z = x @ w.T
    if backward:
        z @ w
        z.T @ x


def proc_status_kb(field: str) -> int:
    """A KiB field of /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) through Linux clear_refs; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_start() -> int:
    """Reset the process's peak RSS and return the RSS now, in KiB; the high-water mark of ru_maxrss would
    otherwise still hold the transients of creating the inputs."""
    if reset_peak_rss():
        return proc_status_kb("VmRSS")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def release_free_heap() -> None:
    """Collect garbage and hand glibc's free heap pages back to the system (malloc_trim), so memory the warm-up
    step freed but malloc kept cannot hide the measured step's allocations from its RSS."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_start(device: torch.device) -> int:
    """Start a peak-memory window: bytes allocated now (CUDA) or KiB resident now (CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    release_free_heap()
    return cpu_peak_start()


def peak_mb(device: torch.device, base: int) -> float:
    """MiB above ``base`` at the window's high-water mark."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return (cpu_peak_kb() - base) / 1024


def cpu_peak_kb() -> int:
    try:
        return proc_status_kb("VmHWM")
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _timer(device):
    if device.type == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def timed(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return timed


def measure(case: dict, budget_s: float = 2.0, max_reps: int = 50) -> dict:
    """Run one case in this process and return its row."""
    method, loss, B, C, D = case["method"], case["loss"], case["B"], case["C"], case["D"]
    device, dtype, backward = torch.device(case["device"]), DTYPES[case["dtype"]], case["pass"] == "fwd+bwd"
    row = dict(case, ms=None, tflops=None, peak_extra_mb=None, status="ok")
    if method != "gemm_floor":
        why = methods.unavailable(method, loss, device, dtype, B, C, D)
        if why is not None:
            return dict(row, status=f"unavailable: {why}")
    x, w, y = make_inputs(B, C, D, dtype, device)
    if backward:
        x.requires_grad_(True)
        w.requires_grad_(True)
    if method == "gemm_floor":
        def step():
            gemm_floor_step(x.detach(), w.detach(), backward)
    else:
        fn = methods.make(method, loss)

        def step():
            out = fn(x, w, y)
            if backward:
                out.backward()
                x.grad = w.grad = None
            return out
    timed = _timer(device)
    try:
        timed(step)  # warm-up: compiles, autotunes, pages in code; its memory is not the step's
        # The peak is a second step's: the compiler's own memory and one-time code paging (~20-30 MB of RSS on a
        # CPU) stay out of it.  A step's gradients are its output, not extra.
        base = peak_start(device)
        timed(step)  # not timed with the rest: it runs on freshly trimmed memory
        grads_mb = (x.numel() + w.numel()) * x.element_size() / 2**20 if backward else 0.0
        peak = peak_mb(device, base) - grads_mb
        times = []
        deadline = time.perf_counter() + budget_s
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < max_reps):
            times.append(timed(step))
        ms = statistics.median(times)
        steady = back_to_back_ms(step, min(len(times), 10)) if device.type == "cuda" else None
    except torch.cuda.OutOfMemoryError:
        return dict(row, status="oom")
    except MemoryError:
        return dict(row, status="oom")
    return dict(row, ms=ms, tflops=tflops(B, C, D, backward, ms), peak_extra_mb=max(peak, 0.0), steady_ms=steady)


def back_to_back_ms(step, reps: int) -> float:
    """Milliseconds per step with ``reps`` steps issued back to back, as a training loop issues them (``ms`` waits
    for the GPU after each step): the host may run ahead unless the step itself syncs.  GPU only (on a CPU the two
    are the same)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def measure_isolated(case: dict, budget_s: float = 2.0, timeout_s: float = 600.0) -> dict:
    """Run one case in a child process (CPU): its own peak RSS; a kill or a crash becomes the row's status."""
    cmd = [sys.executable, "-m", "mvloss.bench", "--one", json.dumps(case), "--budget", str(budget_s)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return dict(case, ms=None, tflops=None, peak_extra_mb=None, status=f"timeout after {timeout_s:.0f} s")
    if proc.returncode != 0:
        status = "oom (killed)" if proc.returncode in (-9, 137) else f"error: {proc.stderr.strip()[-300:]}"
        return dict(case, ms=None, tflops=None, peak_extra_mb=None, status=status)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def estimated_bytes(method: str, B: int, C: int, dtype_bytes: int) -> int:
    """Rough memory a B x C-materialising method needs (several fp32 B x C temporaries); fused ones need none."""
    if method.startswith("mvloss:") or method in ("cce", "liger"):
        return 0
    return 6 * B * C * 4 if method != "gemm_floor" else B * C * dtype_bytes
