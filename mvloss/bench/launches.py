"""How many device kernels one training step of a loss launches: the host-overhead measure of an eager step.

On a GPU an eager step of a fused head is bound by its launches when C is ~100k (each costs a few microseconds of
Python and driver time; see bench/results/*/NOTES.md), so their count is tracked like a speed: on any machine,
without a GPU, by running the step on the CPU and counting

* every ATen op that launches a kernel on a CUDA device (views, ``empty`` and other metadata-only ops excluded),
  including the ops inside mvloss's own custom ops; and
* every Triton kernel launch (under ``TRITON_INTERPRET=1`` on the CPU).

``cuda_paths=True`` makes the CPU run take the branches an eager CUDA run takes where they differ (the small Triton
kernels of ``mvloss.autograd.triton_glue``; a half-precision GEMM with fp32 output is one op, not two casts and a
GEMM), so the count is the one a GPU step would have.

    python -m mvloss.bench.launches --backend triton --B 64 --C 3000 --D 32 --chunks 4
    python -m mvloss.bench.launches --host-time --B 8 --C 256 --D 8     # host microseconds per step, launches stubbed
    python -m mvloss.bench.launches --host-time --jit-launch-path ...   # and with Triton's own launch path
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that never launch a device kernel: views, allocation without a fill, metadata; and scalar_tensor, the
# host-side 0-d tensor a Python number becomes (torch.where(c, t, 0.0)).
_NO_KERNEL = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view", "reshape",
    "as_strided", "slice", "select", "unsqueeze", "squeeze", "expand", "t", "transpose", "permute", "detach",
    "alias", "lift_fresh", "_reshape_alias", "unbind", "split", "split_with_sizes", "narrow", "view_as",
    "expand_as", "resize_", "set_", "is_same_size", "_has_compatible_shallow_copy_type", "size", "stride",
    "sym_size", "sym_stride", "sym_numel", "numel", "dim", "is_contiguous", "unsqueeze_", "squeeze_",
    "as_strided_", "diagonal", "movedim", "values", "indices", "result_type", "_conj", "conj", "_neg_view",
    "resolve_conj", "resolve_neg", "numpy_T", "scalar_tensor", "_fw_primal", "_make_dual", "_unpack_dual", "real",
    "imag",
}
# Composite ops that reach the mode inside a custom op's body: a kernel only when they copy.
_MAYBE_ALIAS = {"to", "contiguous", "reshape", "flatten", "type_as"}
# Ops that make the host wait for the device (each a stall of the launch queue on a GPU).
_SYNC = {"_local_scalar_dense", "item", "nonzero", "equal"}


class LaunchCounter(TorchDispatchMode):
    """Counts kernel-launching ATen ops, and host syncs, by name; mvloss's custom ops are entered and their insides
    counted (the op itself launches nothing)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()
        self.sites: collections.Counter = collections.Counter()  # (op, innermost mvloss line) -> count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        ns, _, short = name.partition("::")
        if ns == "mvloss":
            impl = _python_impl(name)
            if impl is not None:
                with self:
                    return impl(*args, **kwargs)
        out = func(*args, **kwargs)
        if short in _SYNC:
            self.syncs[short] += 1
            self.sites[(short + " (sync)", _caller())] += 1
        elif short not in _NO_KERNEL and not (short in _MAYBE_ALIAS and _aliases(out, args[0])) and \
                not _empty(out):
            self.ops[short] += 1
            self.sites[(short, _caller())] += 1
        return out


def _caller(depth: int = 2) -> str:
    """file:line of the innermost frame in mvloss outside this module."""
    import sys

    frame = sys._getframe(depth)
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        if "/mvloss/" in path and not path.endswith("/bench/launches.py"):
            return f"{path.rsplit('/mvloss/', 1)[1]}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _empty(out) -> bool:
    """An op whose tensor outputs are all empty launches nothing."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    tensors = [o for o in outs if isinstance(o, torch.Tensor)]
    return bool(tensors) and all(o.numel() == 0 for o in tensors)


def _aliases(out, inp) -> bool:
    return (isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor)
            and out.untyped_storage().data_ptr() == inp.untyped_storage().data_ptr())


def _python_impl(name: str) -> Callable | None:
    """The Python body of a ``torch.library.triton_op`` / ``custom_op`` (None for a C++ op)."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(name)
    return None if opdef is None else opdef._init_fn


@contextlib.contextmanager
def _triton_runs_replaced(replace: Callable):
    """Every Triton kernel launch (the interpreter's and the compiled launcher alike) runs ``replace(original)``
    instead of its class's ``run`` for the enclosed code; nothing changes where Triton cannot be imported."""
    try:
        from triton.runtime import interpreter, jit
    except Exception:
        yield
        return
    saved = [(cls, cls.run) for cls in (interpreter.InterpretedFunction, jit.JITFunction)]
    for cls, original in saved:
        cls.run = replace(original)
    try:
        yield
    finally:
        for cls, original in saved:
            cls.run = original


def _counting_triton(counts: collections.Counter):
    """Counts each Triton kernel launch by kernel name."""
    def counting(original):
        def run(self, *args, **kwargs):
            fn = getattr(self, "fn", None)
            counts[getattr(fn, "__name__", "triton_kernel")] += 1
            with _uncounted():  # the interpreter's own tensor copies are not launches
                return original(self, *args, **kwargs)
        return run

    return _triton_runs_replaced(counting)


@contextlib.contextmanager
def _cuda_paths(on: bool = True):
    """The CPU run takes the eager-CUDA branches: ``mvloss.autograd.triton_glue`` holds for CPU tensors too, and each
    GEMM of the Triton backward counts as the one op it is on a GPU (fp32 output, accumulation into dxhat); the
    CPU has no half GEMM with fp32 output, so there it is computed uncounted and counted once.  ``on`` False: the
    CPU's own branches, nothing changed."""
    if not on:
        yield
        return
    from .. import autograd
    from ..triton import backward_gemm

    old = autograd.triton_glue, backward_gemm._mm32, backward_gemm._addmm32_

    def glue(t):
        return t.dtype != torch.float64 and not torch.compiler.is_compiling()

    def one_gemm(name, fn):
        def run(*args):
            with _uncounted() as counter:
                out = fn(*args)
            if counter is not None:
                counter.ops[name] += 1
                counter.sites[(name, _caller(1))] += 1
            return out
        return run

    autograd.triton_glue = glue
    backward_gemm._mm32, backward_gemm._addmm32_ = one_gemm("mm", old[1]), one_gemm("addmm", old[2])
    try:
        yield
    finally:
        autograd.triton_glue, backward_gemm._mm32, backward_gemm._addmm32_ = old


@contextlib.contextmanager
def _uncounted():
    """Suspends the LaunchCounter on top of the mode stack (if any) for the enclosed code."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode_temporarily

    mode = _get_current_dispatch_mode()
    if isinstance(mode, LaunchCounter):
        with _pop_mode_temporarily():
            yield mode
    else:
        yield None


def count_step(step: Callable[[], None], cuda_paths: bool = True) -> dict:
    """Runs ``step`` (forward and backward) once uncounted, to warm what a step does once per process, then once
    counted, and returns {"aten": n, "triton": n, "total": n, "syncs": n, "by_op": {...}}."""
    counter = LaunchCounter()
    triton_counts: collections.Counter = collections.Counter()
    with _cuda_paths(cuda_paths):
        step()
        with _counting_triton(triton_counts), counter:
            step()
    by_op = dict(counter.ops)
    by_op.update({f"triton:{k}": v for k, v in triton_counts.items()})
    aten, trit = sum(counter.ops.values()), sum(triton_counts.values())
    sites = {f"{op} @ {where}": n for (op, where), n in counter.sites.items()}
    return {"aten": aten, "triton": trit, "total": aten + trit, "syncs": sum(counter.syncs.values()),
            "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "by_site": dict(sorted(sites.items(), key=lambda kv: kv[0].split(" @ ")[1]))}


def _label_check_stand_in(labels, safe, summary, *rest, **kwargs):
    """The deferred label check's kernel, for good labels: the host reads its summary a call later."""
    safe.copy_(labels)
    summary.zero_()


# Kernels whose outputs the host reads (so a stub must write them), and what writes them when launches are stubbed.
_STAND_INS = {"replace_bad_labels_kernel": _label_check_stand_in}


def _stubbed_triton():
    """Every Triton launch returns at once (a few write their outputs with a stand-in, ``_STAND_INS``): what a step
    still costs is the host's own work around its kernels."""
    def stub(original):
        def run(self, *args, **kwargs):
            stand_in = _STAND_INS.get(getattr(getattr(self, "fn", None), "__name__", ""))
            if stand_in is not None:
                stand_in(*args, **kwargs)
        return run

    return _triton_runs_replaced(stub)


@contextlib.contextmanager
def _stubbed_gemms():
    """The Triton backward's per-chunk GEMMs return uninitialised outputs at once: on a GPU they are cuBLAS launches,
    on the CPU they compute (in fp32, after converting half inputs), which a GPU host never does."""
    from ..triton import backward_gemm

    old = backward_gemm._mm32, backward_gemm._addmm32_, backward_gemm._mm_same

    def product(dtype):
        def mm(a, b, out=None):
            if out is not None:
                return out
            return torch.empty((a.shape[0], b.shape[1]), dtype=dtype or a.dtype, device=a.device)
        return mm

    backward_gemm._mm32, backward_gemm._mm_same = product(torch.float32), product(None)
    backward_gemm._addmm32_ = lambda acc, a, b: None
    try:
        yield
    finally:
        backward_gemm._mm32, backward_gemm._addmm32_, backward_gemm._mm_same = old


def host_time_us(step: Callable[[], None], reps: int = 200, repeats: int = 5, cuda_paths: bool = True,
                 stub_gemms: bool = False, stub_triton: bool = True) -> float:
    """Host microseconds per call of ``step`` (best of ``repeats`` means over ``reps`` calls) with the eager-CUDA
    branches and every Triton launch stubbed: the Python and dispatcher time of an eager step on this host, which a
    GPU step adds to its kernels wherever they wait for their launches.  Use tiny shapes: the ATen ops still compute
    on the CPU (``stub_gemms``: not the Triton backward's per-chunk GEMMs).  ``stub_triton=False`` keeps Triton's
    launch path (for use with ``install_jit_launch_driver``)."""
    import time

    with _cuda_paths(cuda_paths):
        step()  # warm, with the real kernels
        with (_stubbed_triton() if stub_triton else contextlib.nullcontext()), \
                (_stubbed_gemms() if stub_gemms else contextlib.nullcontext()):
            for _ in range(20):
                step()
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(reps):
                    step()
                best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e6


def install_jit_launch_driver() -> collections.Counter:
    """Lets Triton's own launch path run on a CPU: a stand-in driver reports an sm_90 device, so every kernel compiles
    for it as on an H100 and each launch goes through torch's wrapper, Triton's binder, its cache lookup and its
    launcher object; only the final C launch (the CUDA driver call) does nothing but count itself by kernel name in
    the returned Counter (and run ``_STAND_INS``, whose outputs the host reads).  Call it before mvloss's Triton
    kernels are imported, in a process without TRITON_INTERPRET=1: it imports them as compiled kernels, then sets
    TRITON_INTERPRET=1 so that mvloss's own checks let the triton backend take CPU tensors."""
    import importlib
    import pkgutil

    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    launched: collections.Counter = collections.Counter()

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            return 1, 1, 64, 0, 1024  # module, function, registers, spills, max threads: any loaded kernel

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    class StandInDriver:
        utils = Utils()

        def is_active(self):
            return True

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_device_interface(self):
            return torch.cuda

        def launcher_cls(self, src, metadata):
            name = getattr(getattr(src, "fn", None), "__name__", "triton_kernel")
            stand_in = _STAND_INS.get(name)

            def launch(*args):  # grid (3), stream, function, metadata, launch metadata, two hooks, the arguments
                launched[name] += 1
                if stand_in is not None:
                    stand_in(*args[9:])
            return launch

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("install_jit_launch_driver needs a process without TRITON_INTERPRET=1")
    driver.set_active(StandInDriver())
    from .. import triton as kernels

    for module in pkgutil.iter_modules(kernels.__path__):
        importlib.import_module(f"{kernels.__name__}.{module.name}")
    os.environ["TRITON_INTERPRET"] = "1"
    return launched


def workspace_for_chunks(B: int, C: int, D: int, dtype: torch.dtype, chunks: int) -> int:
    """MVLOSS_TRITON_WORKSPACE_ELEMS that makes the Triton backward walk C classes in ``chunks`` chunks (at most;
    a chunk is a whole number of the kernel's class tiles)."""
    from ..triton import _config

    tile = _config.dlogits_config(B, D, dtype)["BLOCK_C"]
    per_chunk = -(-C // chunks)
    return B * (-(-per_chunk // tile) * tile)


def training_step(backend: str, B: int, C: int, D: int, dtype=torch.bfloat16, loss: str = "mv_arc", seed: int = 0):
    """A forward + backward of the benchmark's loss on fresh CPU inputs, as a closure."""
    from .methods import make
    from .runner import make_inputs

    x, w, y = make_inputs(B, C, D, dtype, torch.device("cpu"), seed=seed)
    x.requires_grad_(True)
    w.requires_grad_(True)
    fn = make(f"mvloss:{backend}", loss)

    def step():
        fn(x, w, y).backward()

    return step


# (backend, C, class chunks of the Triton backward, label check): 4 chunks is C = 100k at B = 1024 (32768 classes a
# chunk), 31 is C = 1M; the glue per step does not depend on C otherwise.
TABLE_CASES = (("triton", 3000, 4, "sync"), ("triton", 31000, 31, "sync"), ("triton", 3000, 4, "deferred"),
               ("cpu", 3000, 4, "sync"), ("chunked", 3000, 4, "sync"))


def count_case(backend: str, B: int, C: int, D: int, dtype, loss: str, chunks: int, label_check: str = "sync") -> dict:
    from ..label_check import set_label_check

    os.environ["MVLOSS_TRITON_WORKSPACE_ELEMS"] = str(workspace_for_chunks(B, C, D, dtype, chunks))
    step = training_step(backend, B, C, D, dtype, loss)
    old = set_label_check(label_check)
    try:
        return count_step(step)  # which warms the step first
    finally:
        set_label_check(old)


def write_table(path: str, B: int, D: int, dtype, loss: str) -> int:
    import datetime

    lines = ["# Launches per eager training step", "",
             f"Command: `python -m mvloss.bench.launches --table {path}`  ",
             f"torch {torch.__version__}, {loss}, {str(dtype).replace('torch.', '')}, B={B} D={D}, counted on the "
             f"CPU with the eager-CUDA branches (Triton under the interpreter); "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             "| backend | Triton backward chunks | label check | launches | ATen | Triton | host syncs |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for backend, C, chunks, check in TABLE_CASES:
        r = count_case(backend, B, C, D, dtype, loss, chunks, check)
        lines.append(f"| {backend} | {chunks if backend == 'triton' else '-'} | {check} | {r['total']} | "
                     f"{r['aten']} | {r['triton']} | {r['syncs']} |")
        print(lines[-1], flush=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="triton")
    p.add_argument("--loss", default="mv_arc")
    p.add_argument("--B", type=int, default=64)
    p.add_argument("--C", type=int, default=3000)
    p.add_argument("--D", type=int, default=32)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--chunks", type=int, default=4, help="class chunks of the Triton backward (4 = C 100k, B 1024)")
    p.add_argument("--label-check", default="sync", choices=("sync", "deferred"),
                   help="mvloss.set_label_check for the step (deferred: no host sync)")
    p.add_argument("--no-cuda-paths", action="store_true")
    p.add_argument("--sites", action="store_true", help="count by source line instead of by op")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--host-time", action="store_true", help="host microseconds per step (one thread, Triton "
                   "launches stubbed) instead of the launch count")
    p.add_argument("--stub-gemms", action="store_true", help="with --host-time: the Triton backward's per-chunk "
                   "GEMMs return at once too (the CPU computes them; a GPU host only launches them)")
    p.add_argument("--jit-launch-path", action="store_true", help="with --host-time: also time the step with "
                   "Triton's own launch path (kernels compiled for sm_90 under a stand-in driver; only the final C "
                   "launch is a no-op) and report its cost per Triton launch")
    p.add_argument("--table", metavar="PATH.md", help="write the standard table (triton at 4 and 31 class chunks, "
                   "the shapes of C = 100k and 1M at B = 1024; cpu; chunked) to a Markdown file")
    args = p.parse_args(argv)
    launched = None
    if args.jit_launch_path:
        if not args.host_time:
            p.error("--jit-launch-path goes with --host-time")
        if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels must import compiled, not interpreted
            import sys

            os.environ.pop("TRITON_INTERPRET")
            os.execv(sys.executable, [sys.executable, "-m", "mvloss.bench.launches", *(argv or sys.argv[1:])])
        launched = install_jit_launch_driver()
    if os.environ.get("TRITON_INTERPRET") != "1":
        # the counts run on the CPU, Triton in its interpreter: that must be chosen before Triton is first imported
        # (importing mvloss already does), so start again with it set
        import sys

        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "mvloss.bench.launches", *(argv or sys.argv[1:])])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.table:
        return write_table(args.table, args.B, args.D, dtype, args.loss)
    os.environ["MVLOSS_TRITON_WORKSPACE_ELEMS"] = str(workspace_for_chunks(args.B, args.C, args.D, dtype,
                                                                           args.chunks))
    step = training_step(args.backend, args.B, args.C, args.D, dtype, args.loss)
    from ..label_check import set_label_check

    set_label_check(args.label_check)
    if args.host_time:
        torch.set_num_threads(1)
        us = host_time_us(step, cuda_paths=not args.no_cuda_paths, stub_gemms=args.stub_gemms)
        if launched is not None:
            return _print_jit_launch_path(args, step, us, launched)
        if args.json:
            import json

            print(json.dumps({"host_us_per_step": us}))
        else:
            print(f"{args.backend} {args.loss} B={args.B} C={args.C} D={args.D} {args.dtype} chunks={args.chunks} "
                  f"label check {args.label_check}: {us:.0f} us of host time per step (Triton launches "
                  f"{'and backward GEMMs ' if args.stub_gemms else ''}stubbed, one thread)")
        return 0
    result = count_step(step, cuda_paths=not args.no_cuda_paths)  # which warms the step first
    if args.json:
        import json

        print(json.dumps(result))
        return 0
    print(f"{args.backend} {args.loss} B={args.B} C={args.C} D={args.D} {args.dtype} chunks={args.chunks} "
          f"label check {args.label_check}: {result['total']} launches ({result['aten']} ATen, "
          f"{result['triton']} Triton), {result['syncs']} syncs")
    for name, n in result["by_site" if args.sites else "by_op"].items():
        print(f"  {n:4d}  {name}")
    return 0


@contextlib.contextmanager
def _counting_hop_launches(counts: collections.Counter):
    """Counts the launches that go through torch's higher-order op (``wrap_triton`` outside a ``triton_op`` in eager
    mode: a dispatch of its own, ~0.3 ms of host time each on the CPU VM)."""
    from unittest import mock

    from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper
    from torch._library.triton import is_wrap_triton_enabled

    saved = TraceableTritonKernelWrapper.__call__

    def call(self, *args, **kwargs):
        if is_wrap_triton_enabled():
            counts[getattr(getattr(self.kernel, "fn", None), "__name__", "triton_kernel")] += 1
        return saved(self, *args, **kwargs)

    with mock.patch.object(TraceableTritonKernelWrapper, "__call__", call):
        yield


def _print_jit_launch_path(args, step, stubbed_us: float, launched: collections.Counter) -> int:
    """--jit-launch-path: the step's host time with Triton's launch path against ``stubbed_us`` (launches stubbed),
    the difference per Triton launch, and how many launches went through torch's higher-order op."""
    real_us = host_time_us(step, cuda_paths=not args.no_cuda_paths, stub_gemms=args.stub_gemms, stub_triton=False)
    launched.clear()
    hop: collections.Counter = collections.Counter()
    with _cuda_paths(not args.no_cuda_paths), _counting_hop_launches(hop):
        step()
    n = sum(launched.values())
    per_launch = (real_us - stubbed_us) / max(n, 1)
    if args.json:
        import json

        print(json.dumps({"host_us_per_step": real_us, "stubbed_us_per_step": stubbed_us, "triton_launches": n,
                          "us_per_triton_launch": per_launch, "by_kernel": dict(launched),
                          "higher_order_op_launches": dict(hop)}))
    else:
        print(f"{args.backend} {args.loss} B={args.B} C={args.C} D={args.D} {args.dtype} chunks={args.chunks} "
              f"label check {args.label_check}: {real_us:.0f} us of host time per step with Triton's launch path "
              f"(kernels compiled for sm_90, the C launch a no-op), {stubbed_us:.0f} us with the launches stubbed: "
              f"{per_launch:.1f} us a Triton launch ({n} a step, {sum(hop.values())} through torch's higher-order "
              f"op; one thread{', backward GEMMs stubbed' if args.stub_gemms else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
