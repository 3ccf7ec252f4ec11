"""torch.compile(fullgraph=True) traces the loss (validation, dispatch, pre-pass, negatives pass) without breaks."""
import pytest
import torch

from mvloss import functional as F
from helpers import make_inputs


@pytest.mark.slow
def test_compile_fullgraph_training_step_chunked():
    x, w, y = make_inputs(8, 50, 16, ignore=(2,))
    y = y.clone()

    def loss_fn(x, w, y):
        return F.arcface_loss(x, w, y, backend="chunked", mv="adaptive", t=0.2, label_smoothing=0.1)

    compiled = torch.compile(loss_fn, fullgraph=True)
    grads = []
    for fn in (compiled, loss_fn):
        xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fn(xb, wb, y)
        loss.backward()
        grads.append((loss.detach(), xb.grad, wb.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compile_fullgraph_with_a_backend_that_reads_the_spec():
    from mvloss import dispatch
    from mvloss.backends import chunked

    seen = []

    def cannot_run(spec):
        seen.append((torch.device(spec.device).type, spec.dtype, spec.batch, spec.num_classes, spec.dim))
        return None if spec.dtype == torch.float32 else "fp32 only"

    dispatch.register(dispatch.Backend(name="spec_reader", priority=95, forward=chunked.forward,
                                       backward=chunked.backward, cannot_run=cannot_run))
    try:
        x, w, y = make_inputs(6, 20, 8)
        fn = torch.compile(lambda x, w, y: F.cosface_loss(x, w, y, backend="spec_reader"), fullgraph=True)
        torch.testing.assert_close(fn(x, w, y), F.cosface_loss(x, w, y, backend="reference"))
        assert ("cpu", torch.float32, None, None, None) in seen  # sizes may be symbolic under compile: None
    finally:
        dispatch._REGISTRY.pop("spec_reader")


@pytest.mark.slow
def test_compile_recompiles_for_new_sizes():
    """Calling a compiled loss with other sizes (dynamo goes to dynamic shapes on the second) still traces the
    backend choice and gives the reference's numbers."""
    fn = torch.compile(lambda x, w, y: F.arcface_loss(x, w, y, backend="chunked", mv="adaptive", t=0.2),
                       fullgraph=True)
    for c in (50, 70, 90):
        x, w, y = make_inputs(8, c, 16, ignore=(1,), seed=c)
        torch.testing.assert_close(fn(x, w, y), F.arcface_loss(x, w, y, backend="reference", mv="adaptive", t=0.2),
                                   rtol=1e-5, atol=1e-5)
