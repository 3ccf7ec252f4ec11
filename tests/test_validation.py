"""Bad input is a clear Python exception before any kernel runs; edge inputs have defined results."""
import pytest
import torch

import mvloss
from mvloss import functional as F
from helpers import make_inputs

BACKENDS = ["reference", "chunked"]


def good():
    return make_inputs(6, 10, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,exc,match", [
    ("label_high", IndexError, "out of range"),
    ("label_negative", IndexError, "out of range"),
    ("float_labels", TypeError, "integer"),
    ("bool_labels", TypeError, "integer"),
    ("labels_2d", ValueError, "1-D"),
    ("labels_length", ValueError, "entries"),
    ("x_1d", ValueError, "2-D"),
    ("w_3d", ValueError, "2-D"),
    ("dim_mismatch", ValueError, "feature dims"),
    ("int_x", TypeError, "floating"),
    ("int_w", TypeError, "floating"),
    ("empty_w", ValueError, "empty"),
    ("bias_shape", ValueError, "bias"),
    ("x_not_tensor", TypeError, "torch.Tensor"),
])
def test_bad_tensors_raise(case, exc, match, backend):
    x, w, y = good()
    kw = {}
    if case == "label_high":
        y[2] = 10
    elif case == "label_negative":
        y[2] = -5
    elif case == "float_labels":
        y = y.float()
    elif case == "bool_labels":
        y = y > 3
    elif case == "labels_2d":
        y = y.view(-1, 1)
    elif case == "labels_length":
        y = y[:-1]
    elif case == "x_1d":
        x = x[0]
    elif case == "w_3d":
        w = w[None]
    elif case == "dim_mismatch":
        w = w[:, :3]
    elif case == "int_x":
        x = x.long()
    elif case == "int_w":
        w = w.int()
    elif case == "empty_w":
        w, y = w[:0], torch.full_like(y, -100)
    elif case == "bias_shape":
        kw["bias"] = torch.zeros(3)
    elif case == "x_not_tensor":
        x = x.tolist()
    with pytest.raises(exc, match=match):
        F.margin_softmax_loss(x, w, y, backend=backend, **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(mv="hard"), "mv="), (dict(reduction="avg"), "reduction="), (dict(arc_fallback="clip"), "arc_fallback="),
    (dict(scale=0.0), "scale"), (dict(scale=-3.0), "scale"), (dict(scale=float("nan")), "scale"),
    (dict(scale=torch.tensor(-1.0)), "scale"), (dict(mv="fixed", t=-0.1), "t must be"),
    (dict(label_smoothing=1.5), "label_smoothing"), (dict(hard_ratio=0.0), "hard_ratio"),
    (dict(focal_gamma=-1.0), "focal_gamma"), (dict(m2=-0.1), "margins"), (dict(m1=0.0), "m1"),
    (dict(preset="arcface"), "preset="), (dict(mv="fixed", interclass_filtering_threshold=0.2), "choose one"),
    (dict(chunk_size=0), "chunk_size"), (dict(backend="fastest"), "unknown backend"),
])
def test_bad_options_raise_value_error(kw, match):
    x, w, y = good()
    with pytest.raises(ValueError, match=match):
        F.margin_softmax_loss(x, w, y, **kw)


def test_mixed_devices_raise():
    x, w, y = good()
    meta = torch.empty(10, 4, device="meta")
    with pytest.raises(ValueError, match="one device"):
        F.margin_softmax_loss(x, meta, y)


def test_unavailable_backend_says_why():
    x, w, y = good()
    with pytest.raises(RuntimeError, match="cannot run"):
        F.margin_softmax_loss(x, w, y, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_loss_and_zero_grads(reduction, backend):
    x, w, y = good()
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = torch.full_like(y, -100)
    loss = F.arcface_loss(x, w, y, reduction=reduction, backend=backend, mv="adaptive", t=0.2)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_embedding_and_zero_class_vector_give_finite_loss(backend):
    x, w, y = good()
    x[1] = 0.0
    w[y[2]] = 0.0
    x.requires_grad_(True)
    w.requires_grad_(True)
    loss = F.arcface_loss(x, w, y, backend=backend, mv="fixed", t=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_with_scale_64_do_not_overflow(dtype, backend):
    x, w, y = make_inputs(16, 40, 8, dtype=dtype)
    x.requires_grad_(True)
    loss = F.cosface_loss(x, w, y, scale=64.0, margin=0.35, backend=backend, reduction="sum")
    loss.backward()
    assert loss.dtype == torch.float32  # fp32 inside, fp32 out
    assert torch.isfinite(loss) and loss.item() > 100  # large, but no fp16 overflow to inf
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


def test_backends_listing_and_env_override(monkeypatch):
    listing = {b["name"]: b for b in mvloss.backends()}
    assert listing["reference"]["available"] and listing["chunked"]["available"]
    for name in ("triton", "cpu", "cuda"):
        assert name in listing
        assert listing[name]["available"] or listing[name]["reason"]
    x, w, y = good()
    monkeypatch.setenv("MVLOSS_BACKEND", "reference")
    from mvloss import dispatch
    spec = dispatch.CallSpec(x.device, x.dtype, 6, 10, 4, False, False, False)
    assert dispatch.select("auto", spec).name == "reference"
    monkeypatch.setenv("MVLOSS_BACKEND", "chunked")
    assert dispatch.select("auto", spec).name == "chunked"
