"""Regularisers, schedules and the info command."""
import subprocess
import sys

import pytest
import torch

from mvloss import functional as F


def test_ring_loss_value_and_gradient():
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]], requires_grad=True)
    radius = torch.tensor(4.0, requires_grad=True)
    loss = F.ring_loss(x, radius, weight=0.5)
    assert loss.item() == pytest.approx(0.5 * 0.5 * ((5 - 4) ** 2 + (2 - 4) ** 2) / 2)
    loss.backward()
    assert radius.grad.item() == pytest.approx(0.5 * ((4 - 5) + (4 - 2)) / 2)


def test_up_loss_pulls_novel_norms_to_base_mean():
    w = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 0.0]], requires_grad=True)
    loss = F.up_loss(w, torch.tensor([2]))
    alpha = (1.0 + 9.0) / 2
    assert loss.item() == pytest.approx((4.0 - alpha) ** 2)
    loss.backward()
    assert w.grad[0].abs().sum() == 0 and w.grad[2, 0] < 0
    with pytest.raises(ValueError):
        F.up_loss(w, torch.tensor([0, 1, 2]))


def test_heated_up_schedule():
    assert F.heated_up_scale(0, start=64, end=16, heat_at=10) == 64
    assert F.heated_up_scale(10, start=64, end=16, heat_at=10) == 16
    assert F.heated_up_scale(15, start=64, end=16, heat_at=10, heat_steps=10) == pytest.approx(40)


def test_info_command_lists_backends():
    out = subprocess.run([sys.executable, "-m", "mvloss", "info"], capture_output=True, text=True, check=True).stdout
    for name in ("reference", "chunked", "triton", "cpu", "cuda"):
        assert name in out
    assert "torch" in out
    assert "triton settings: forward tiles, recompute kernel tiles, backward gemm, fp32 products" in out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_negatives_nll_is_exact_to_rounding(dtype):
    """-log p_y = softplus(lse_neg - z_y) (mvloss.loss.negatives_nll) against log(1 + e^d) in a stable fp64 form,
    across softplus's linear threshold (PyTorch's default of 20 is 2e-9 off in fp64), and 0 without negatives."""
    from mvloss.loss import negatives_nll

    d = torch.tensor([-200.0, -30.0, -5.0, 0.0, 1e-3, 5.0, 19.5, 20.5, 30.0, 39.5, 40.5, 200.0], dtype=torch.float64)
    exact = torch.where(d > 0, d + torch.log1p(torch.exp(-d.abs())), torch.log1p(torch.exp(-d.abs())))
    z_y = torch.full_like(d, 3.0, dtype=dtype)
    got = negatives_nll((d + 3.0).to(dtype), z_y)
    tol = torch.finfo(dtype).eps * 4
    torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol)
    assert negatives_nll(torch.tensor([float("-inf")], dtype=dtype), torch.tensor([1.0], dtype=dtype)).item() == 0.0
