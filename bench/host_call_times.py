"""Where an eager training step's host issue time goes: wall-clock time of each host call of the Triton backend.

Wraps, with timers, the calls of ``mvloss``'s Triton backend that issue device work: every module's ``launch``, each
Triton kernel launch (by kernel name, through ``_config.launcher``), and the default backward's per-chunk GEMM and
finishing helpers.  Runs eager steps of bf16 MV-Arc, each with the device idle at its start, and prints per call its
count a step and its host microseconds (mean, largest, total a step), inclusive of the calls inside it.  A call well
above the launches' ~10-30 us waits on the device (a sync, a full launch queue, an allocation that frees memory).

    python bench/host_call_times.py --B 1024 --C 1000000 --D 512 --json host_calls.json
    MVLOSS_TRITON_WORKSPACE_ELEMS=8388608 python bench/host_call_times.py ...   # smaller class chunks, more of them
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (module, function): the backward's per-chunk helpers besides every module's launch
_HELPERS = (("backward_gemm", "_mm32"), ("backward_gemm", "_addmm32_"), ("backward_gemm", "_mm_same"),
            ("backward_gemm", "_finish_chunk"), ("backward_gemm", "_scaled_rows"))
_MODULES = ("backward_gemm", "forward_lse", "norm_backward", "dw_fused", "inv_norm", "target_rows", "target_loss",
            "label_check")


class CallTimes:
    """Inclusive wall-clock microseconds of each named call, kept per call."""

    def __init__(self):
        self.us: dict[str, list[float]] = collections.defaultdict(list)

    def timed(self, name, fn):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.us[name].append((time.perf_counter() - t) * 1e6)
        return run

    def table(self, steps: int) -> list[dict]:
        rows = [dict(call=name, per_step=len(v) / steps, mean_us=sum(v) / len(v), max_us=max(v),
                     total_us_per_step=sum(v) / steps) for name, v in self.us.items()]
        return sorted(rows, key=lambda r: -r["total_us_per_step"])


class _TimedKernel:
    """A launcher's kernel whose ``kernel[grid](...)`` is timed under the kernel's name."""

    def __init__(self, kernel, times: CallTimes):
        self.kernel, self.times = kernel, times

    def __getitem__(self, grid):
        fn = getattr(self.kernel, "fn", self.kernel)
        return self.times.timed(f"kernel {getattr(fn, '__name__', type(fn).__name__)}", self.kernel[grid])


@contextlib.contextmanager
def timers(times: CallTimes):
    """The backend's host calls wrapped with ``times``' timers; the originals restored on exit."""
    from mvloss.triton import _config

    saved = []

    def wrap(mod, attr, name):
        saved.append((mod, attr, getattr(mod, attr)))
        setattr(mod, attr, times.timed(name, getattr(mod, attr)))

    mods = {m: importlib.import_module(f"mvloss.triton.{m}") for m in _MODULES}
    for m, mod in mods.items():
        for attr in [a for a in vars(mod) if a == "launch" or a.startswith("launch_")]:
            if callable(getattr(mod, attr)):
                wrap(mod, attr, f"{m}.{attr}")
    for m, attr in _HELPERS:
        wrap(mods[m], attr, f"{m}.{attr}")
    launcher = _config.launcher
    saved.append((_config, "launcher", launcher))
    _config.launcher = lambda kernel, *operands: _TimedKernel(launcher(kernel, *operands), times)
    try:
        yield
    finally:
        for mod, attr, orig in reversed(saved):
            setattr(mod, attr, orig)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(B: int, C: int, D: int, steps: int, warmup: int, device: torch.device, dtype=torch.bfloat16,
            loss: str = "mv_arc") -> dict:
    from mvloss.bench.methods import make
    from mvloss.bench.runner import make_inputs

    x, w, y = make_inputs(B, C, D, dtype, device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    fn = make("mvloss:triton", loss)
    for _ in range(warmup):
        fn(x, w, y).backward()
    _sync(device)
    times = CallTimes()
    with timers(times):
        for _ in range(steps):
            x.grad = w.grad = None
            _sync(device)
            t0 = time.perf_counter()
            out = fn(x, w, y)
            t1 = time.perf_counter()
            out.backward()
            t2 = time.perf_counter()
            _sync(device)
            times.us["step forward (issue)"].append((t1 - t0) * 1e6)
            times.us["step backward (issue)"].append((t2 - t1) * 1e6)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(device=name, B=B, C=C, D=D, dtype=str(dtype).removeprefix("torch."), loss=loss, steps=steps,
                workspace_elems=os.environ.get("MVLOSS_TRITON_WORKSPACE_ELEMS", "default"),
                torch=torch.__version__, calls=times.table(steps))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=1024)
    p.add_argument("--C", type=int, default=1_000_000)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    res = measure(a.B, a.C, a.D, a.steps, a.warmup, device)
    print(f"{res['device']} B={a.B} C={a.C} D={a.D} {res['dtype']} {res['loss']}, workspace "
          f"{res['workspace_elems']}: host microseconds a step, by call (inclusive)")
    print(f"{'call':44s} {'a step':>7s} {'mean':>9s} {'max':>9s} {'total':>10s}")
    for r in res["calls"]:
        print(f"{r['call']:44s} {r['per_step']:7.1f} {r['mean_us']:9.1f} {r['max_us']:9.1f} "
              f"{r['total_us_per_step']:10.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
