"""Under AMP autocast the fused backends still compute in fp32 inside (autocast must not turn their GEMMs bf16)."""
import pytest
import torch

import mvloss
from mvloss import functional as F
from helpers import make_inputs, run

AVAILABLE = {b["name"] for b in mvloss.backends() if b["available"]}


@pytest.mark.parametrize("backend", [b for b in ("chunked", "cpu") if b in AVAILABLE])
def test_cpu_autocast_keeps_fp32_inside(backend):
    x, w, y = make_inputs(16, 500, 32, ignore=(3,))
    plain = run(x, w, y, backend, F.arcface_loss, mv="adaptive", t=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = run(x, w, y, backend, F.arcface_loss, mv="adaptive", t=0.2)
    for name, a, b in zip(("loss", "dx", "dW"), amp, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
