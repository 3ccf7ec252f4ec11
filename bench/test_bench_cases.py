"""pytest-benchmark suite for the same cases as ``python -m mvloss.bench`` (pip install '.[bench]' pytest-benchmark).

Run: ``python -m pytest bench/ --benchmark-only`` (add ``--benchmark-json out.json`` to keep the numbers).
"""
import pytest
import torch

from mvloss.bench import methods, runner

pytest.importorskip("pytest_benchmark")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(1024, 100_000, 512)] if DEVICE.type == "cuda" else [(256, 100_000, 128)]
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
METHOD_LIST = ["mvloss:triton", "mvloss:cuda", "mvloss:cpu", "mvloss:chunked", "reference", "eager_head"]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-C{s[1]}-D{s[2]}")
@pytest.mark.parametrize("method", METHOD_LIST)
@pytest.mark.parametrize("loss", ["mv_arc", "normface"])
def test_forward_backward(benchmark, method, loss, shape):
    B, C, D = shape
    why = methods.unavailable(method, loss, DEVICE, DTYPE, B, C, D)
    if why:
        pytest.skip(why)
    x, w, y = runner.make_inputs(B, C, D, DTYPE, DEVICE)
    x.requires_grad_(True)
    w.requires_grad_(True)
    fn = methods.make(method, loss)

    def step():
        fn(x, w, y).backward()
        x.grad = w.grad = None
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, warmup_rounds=1, rounds=5)
