"""Launches per eager training step (``mvloss.bench.launches``): at C ~ 100k a GPU step is bound by them, so their
count is held like a speed.  Counted on the CPU with the branches a CUDA step takes (Triton under the interpreter)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mvloss.bench.launches import count_step

B, C, D = 64, 3000, 32
# Measured (python -m mvloss.bench.launches --backend NAME): triton 37, cpu 21, chunked 88 (83, 66, 136 before the
# target side's kernels, mvloss/triton/target_loss.py; 38 and 91 before the logit sum became optional); the budgets
# leave a few launches for differences between torch versions in what autograd launches.
BUDGET = {"triton": 41, "cpu": 25, "chunked": 92}


def _count(backend, chunks=4, loss="mv_arc"):
    """The CLI's count, in a fresh process: it runs the step on CPU tensors with Triton in its interpreter, which has
    to be chosen before Triton is imported (a GPU machine's test run has not).  (The lent GPU image's triton 3.6
    interpreter fails on its numpy 2.5; bench/gpu_session.sh does not run this file.)"""
    cmd = [sys.executable, "-m", "mvloss.bench.launches", "--backend", backend, "--B", str(B), "--C", str(C),
           "--D", str(D), "--chunks", str(chunks), "--loss", loss, "--json"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_counter_counts_kernels_not_views():
    a, b = torch.randn(4, 3), torch.randn(4, 3)

    def step():
        c = a + b                          # 1
        c.view(12).t().reshape(3, 4)       # views: 0
        torch.where(c > 0, c, 0.0)         # 2 (gt, where); the 0.0 is a host scalar
        torch.empty(5)                     # 0
        torch.zeros(0)                     # empty output: 0
        c.to(torch.float32)                # same dtype: 0
        c.to(torch.float64)                # 1
        bool((c > 100).any())              # 2 and one sync

    got = count_step(step, cuda_paths=False)
    assert (got["aten"], got["triton"], got["syncs"]) == (6, 0, 1), got


@pytest.mark.parametrize("backend", sorted(BUDGET))
def test_launches_per_step_within_budget(backend):
    if backend == "cpu":
        from mvloss import dispatch
        if dispatch.get("cpu").reason() is not None:
            pytest.fail(f"the C++ extension is not built: {dispatch.get('cpu').reason()}")
    got = _count(backend)
    assert got["total"] <= BUDGET[backend], (got["total"], got["by_op"])
    assert got["syncs"] <= 1, got  # the label-range check; nothing else waits for the device


def test_triton_backward_launches_four_per_class_chunk():
    """Per class chunk: the dlogits kernel, two GEMMs, the normalisation backward -- no other glue."""
    four, eight = _count("triton", 4), _count("triton", 8)
    assert eight["total"] - four["total"] == 4 * 4, (four["by_op"], eight["by_op"])
    assert eight["by_op"]["triton:neg_dlogits_kernel"] == 8


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_host_time_per_step(backend):
    """--host-time: the host's microseconds per eager step with the Triton launches stubbed, a real number (tiny
    shapes; the bound only catches a broken measurement, not a slow host)."""
    cmd = [sys.executable, "-m", "mvloss.bench.launches", "--backend", backend, "--B", "8", "--C", "256", "--D", "8",
           "--host-time", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    us = json.loads(proc.stdout.strip().splitlines()[-1])["host_us_per_step"]
    assert 10 < us < 200_000, us


def test_host_time_with_backward_gemms_stubbed():
    """--stub-gemms leaves out the CPU's own computing of the per-chunk GEMMs (a GPU host only launches them): at 16
    class chunks the step's host time drops well below the unstubbed one, and the launch count is unchanged."""
    def host_us(*extra):
        cmd = [sys.executable, "-m", "mvloss.bench.launches", "--backend", "triton", "--B", "8", "--C", "4000",
               "--D", "8", "--chunks", "16", "--host-time", "--json", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "TRITON_INTERPRET": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])["host_us_per_step"]

    real, stubbed = host_us(), host_us("--stub-gemms")
    assert 10 < stubbed < 0.9 * real, (stubbed, real)


@pytest.mark.parametrize("label_check", ["sync", "deferred"])
def test_host_time_with_triton_launch_path(label_check):
    """--jit-launch-path: every Triton launch of the step goes through Triton's own launch path (kernels compiled for
    sm_90 under a stand-in driver; only the C launch is a no-op): as many launches as the count, each costing the
    host a real number of microseconds, and none through torch's higher-order op, whose eager dispatch is ~0.3 ms of
    host time (mvloss.triton._config.launcher launches plain eager tensors directly)."""
    cmd = [sys.executable, "-m", "mvloss.bench.launches", "--backend", "triton", "--B", "8", "--C", "3000", "--D",
           "8", "--chunks", "4", "--host-time", "--stub-gemms", "--jit-launch-path", "--label-check", label_check,
           "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    counted = _count("triton") if label_check == "sync" else None
    if counted is not None:
        assert out["triton_launches"] == counted["triton"], (out["by_kernel"], counted["by_op"])
    assert out["by_kernel"]["neg_dlogits_kernel"] == 4 and out["higher_order_op_launches"] == {}, out
    assert 10 < out["stubbed_us_per_step"] < out["host_us_per_step"] < 200_000, out


def test_launcher_skips_the_higher_order_op_only_for_plain_eager_tensors():
    """mvloss.triton._config.launcher gives the kernel itself for plain tensors with nothing tracing, and torch's
    traceable wrapper without operands, under a dispatch mode (what make_fx and torch.compile trace with) or for
    tensor subclasses; run with compiled kernels (--jit-launch-path's stand-in driver), where the two differ."""
    code = """
import torch
from mvloss.bench.launches import install_jit_launch_driver
install_jit_launch_driver()
from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from mvloss.triton import _config
from mvloss.triton.norm_backward import norm_backward_kernel as k

class Passing(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))

t = torch.ones(2, 3)
assert _config.launcher(k, t, t) is k and _config.launcher(k, torch.nn.Parameter(t)) is k
assert isinstance(_config.launcher(k), TraceableTritonKernelWrapper)
with Passing():
    assert isinstance(_config.launcher(k, t), TraceableTritonKernelWrapper)
with FakeTensorMode() as mode:
    fake = mode.from_tensor(t)
assert isinstance(_config.launcher(k, fake, t), TraceableTritonKernelWrapper)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_jit_launch_path_needs_host_time():
    """--jit-launch-path measures host time only: without --host-time the CLI stops with a usage error."""
    cmd = [sys.executable, "-m", "mvloss.bench.launches", "--jit-launch-path"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 2 and "--jit-launch-path goes with --host-time" in proc.stderr, proc.stderr[-3000:]
