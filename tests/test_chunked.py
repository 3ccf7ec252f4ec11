"""The chunked backend equals the reference on loss, dx, dW, per dtype, on odd shapes, for every family member."""
import pytest
import torch

from mvloss import functional as F
from families import FAMILIES, needs_unit_features
from helpers import assert_matches_reference, make_inputs, run

B, C, D = 37, 1003, 77
CHUNK = 100  # does not divide C


def inputs(kw, dtype=torch.float32, **extra):
    x, w, y = make_inputs(B, C, D, torch.float32, ignore=(3, 11), **extra)
    if needs_unit_features(kw):
        x = 0.9 * x / x.norm(dim=1, keepdim=True)
    return x.to(dtype), w.to(dtype), y


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chunked_fp32_every_family(family):
    kw = FAMILIES[family]
    x, w, y = inputs(kw)
    assert_matches_reference(x, w, y, "chunked", chunk_size=CHUNK, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["arcface", "mv_arc_adaptive", "curricular", "insightface_filter",
                                    "facexzoo_mv_am", "label_smoothing"])
def test_chunked_half_precision(family, dtype):
    kw = FAMILIES[family]
    x, w, y = inputs(kw, dtype)
    assert_matches_reference(x, w, y, "chunked", chunk_size=CHUNK, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("family", ["mv_am_fixed", "hard_mining", "focal"])
def test_chunked_reductions(family, reduction):
    x, w, y = inputs(FAMILIES[family])
    assert_matches_reference(x, w, y, "chunked", chunk_size=CHUNK, reduction=reduction, **FAMILIES[family])


@pytest.mark.parametrize("chunk", [1, 7, 1003, None])
def test_chunk_sizes(chunk):
    x, w, y = make_inputs(9, 31, 12, ignore=(2,))
    assert_matches_reference(x, w, y, "chunked", chunk_size=chunk, m2=0.5, mv="adaptive", t=0.2)


def test_learnable_scale_and_bias_gradients():
    x, w, y = make_inputs(B, C, D, ignore=(5,))
    results = {}
    for backend in ("reference", "chunked"):
        scale = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
        bias = torch.linspace(-0.3, 0.3, C, dtype=torch.float64).requires_grad_(True)
        xd, wd = x.double().requires_grad_(True), w.double().requires_grad_(True)
        loss = F.l2_softmax_loss(xd, wd, y, alpha=scale, bias=bias, backend=backend, chunk_size=CHUNK,
                                 label_smoothing=0.05, m3=0.1)
        loss.backward()
        results[backend] = [loss, xd.grad, wd.grad, scale.grad, bias.grad]
    for name, r, c in zip(("loss", "dx", "dW", "dscale", "dbias"), results["reference"], results["chunked"]):
        torch.testing.assert_close(c, r, rtol=1e-10, atol=1e-12, msg=name)
    assert results["chunked"][3].abs() > 0 and results["chunked"][4].abs().sum() > 0


def test_softmax_with_bias_matches_cross_entropy():
    x, w, y = make_inputs(B, C, D)
    bias = torch.randn(C)
    got = F.softmax_loss(x, w, y, bias=bias, backend="chunked", chunk_size=CHUNK)
    want = torch.nn.functional.cross_entropy(x @ w.T + bias, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_single_class_and_single_row():
    x, w, y = make_inputs(1, 1, 5)
    for backend in ("reference", "chunked"):
        loss, dx, dw = run(x, w, y, backend, m2=0.5)
        assert loss.item() == pytest.approx(0.0, abs=1e-6)  # one class: p_y = 1
        assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
    x, w, y = make_inputs(1, 13, 5)
    assert_matches_reference(x, w, y, "chunked", chunk_size=4, m3=0.3, mv="fixed", t=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["arcface", "mv_arc_adaptive", "curricular", "insightface_filter",
                                    "facexzoo_mv_am", "label_smoothing"])
def test_chunked_on_gpu(family, dtype):
    kw = FAMILIES[family]
    x, w, y = inputs(kw, dtype)
    assert_matches_reference(x.cuda(), w.cuda(), y.cuda(), "chunked", chunk_size=CHUNK, **kw)


@pytest.mark.parametrize("family", ["mv_arc_adaptive", "label_smoothing", "facexzoo_mv_am", "curricular"])
def test_weight_gradient_by_class_chunks(monkeypatch, family):
    """A large W (here: any W, the byte budget set to a few hundred classes) makes a backend without its own fused
    dW (chunked; the C++ and Triton backends finish dW themselves) run its backward chunk by chunk and finish each
    chunk's dW at once; the result is the reference's."""
    backend = "chunked"
    monkeypatch.setenv("MVLOSS_W_GRAD_CHUNK_BYTES", str(4 * 77 * 300))  # 300 classes per chunk, C = 1003
    kw = FAMILIES[family]
    x, w, y = make_inputs(37, 1003, 77, ignore=(3, 11))
    if needs_unit_features(kw):
        x = 0.9 * x / x.norm(dim=1, keepdim=True)
    assert_matches_reference(x, w, y, backend, **kw)
    assert_matches_reference(x.bfloat16(), w.bfloat16(), y, backend, **kw)


def test_weight_gradient_by_class_chunks_bias_scale_and_layout(monkeypatch):
    """The chunked weight gradient with a learnable bias and scale, and W stored D x C (FaceX-Zoo), against one
    backward over all classes."""
    monkeypatch.setenv("MVLOSS_W_GRAD_CHUNK_BYTES", str(4 * 40 * 64))
    x, w, y = make_inputs(19, 300, 40, ignore=(2,))
    w_t = w.T.contiguous().T
    out = {}
    for budget in (str(4 * 40 * 64), str(1 << 40)):
        monkeypatch.setenv("MVLOSS_W_GRAD_CHUNK_BYTES", budget)
        scale = torch.tensor(20.0, requires_grad=True)
        bias = torch.linspace(-0.2, 0.2, 300).requires_grad_(True)
        xb, wb = x.clone().requires_grad_(True), w_t.clone().requires_grad_(True)
        loss = F.arcface_loss(xb, wb, y, scale=scale, bias=bias, backend="chunked", mv="adaptive", t=0.2,
                              label_smoothing=0.1)
        loss.backward()
        out[budget] = (loss.detach(), xb.grad, wb.grad, scale.grad, bias.grad)
    for name, a, b in zip(("loss", "dx", "dW", "dscale", "dbias"), *out.values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item(), msg=name)


def test_default_blocks_per_device(monkeypatch):
    """Without chunk_size: 4M-element blocks on a GPU (fewer launches), 256k on a CPU (blocks in cache);
    MVLOSS_CHUNK_ELEMS sets both."""
    from mvloss.backends.chunked import chunk_size_for

    monkeypatch.delenv("MVLOSS_CHUNK_ELEMS", raising=False)
    assert chunk_size_for(256, 10**6, device=torch.device("cpu")) == 1024
    assert chunk_size_for(256, 10**6, device=torch.device("cuda")) == 16384
    assert chunk_size_for(256, 500, device=torch.device("cpu")) == 500
    assert chunk_size_for(256, 10**6, chunk_size=7, device=torch.device("cuda")) == 7
    monkeypatch.setenv("MVLOSS_CHUNK_ELEMS", "2560")
    assert chunk_size_for(256, 10**6, device=torch.device("cpu")) == 10
    assert chunk_size_for(256, 10**6, device=torch.device("cuda")) == 10


def test_cpu_step_memory_stays_far_below_b_times_c():
    """A training step's peak extra resident memory, in its own process (mvloss.bench): 24 MB at B 128, C 200k, D 32
    where one B x C fp32 matrix is 98 MB (356 MB with the GPU's 4M-element blocks)."""
    from mvloss.bench import runner

    B_, C_, D_ = 128, 200_000, 32
    row = runner.measure_isolated(dict(method="mvloss:chunked", loss="mv_arc", dtype="fp32", B=B_, C=C_, D=D_,
                                       device="cpu", **{"pass": "fwd+bwd"}), budget_s=0.05)
    assert row["status"] == "ok", row
    assert row["peak_extra_mb"] < 0.5 * B_ * C_ * 4 / 2**20, row
