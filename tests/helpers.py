"""Shared test helpers: run a backend and the reference, compare both against an fp64 truth; find a bench script."""
import os

import torch

from mvloss import functional as F
from mvloss.negatives import Treatment, inverse_norms

# Floor on the allowed error, relative to the largest |truth| entry, per input dtype.
REL_FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def make_inputs(B, C, D, dtype=torch.float32, ignore=(), seed=0, device="cpu", ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    w = torch.randn(C, D, generator=g)
    # plant some rows close to their class so margins, masks and fallbacks all see traffic
    y = torch.randint(0, C, (B,), generator=g)
    x[: B // 2] += 2.0 * w[y[: B // 2]]
    for i in ignore:
        y[i] = ignore_index
    return x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype), y.to(device)


def run(x, w, y, backend, fn=F.margin_softmax_loss, **kw):
    """loss and gradients (fp64 copies) of one backend on leaf copies of x and w."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = fn(x, w, y, backend=backend, **kw)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    (loss * upstream).sum().backward()
    return [loss.detach().double(), x.grad.double(), w.grad.double()]


def allowed_error(truth, ref, dtype, factor=2.0) -> float:
    """The tests' rule: ``factor`` x the reference's own error against the fp64 truth at ``dtype``, plus a floor
    relative to the largest |truth| entry."""
    return factor * (ref - truth).abs().max().item() + REL_FLOOR[dtype] * max(truth.abs().max().item(), 1e-30)


def assert_matches_reference(x, w, y, backend, fn=F.margin_softmax_loss, factor=2.0, **kw):
    """The backend's error against an fp64 truth is within ``factor`` x the reference's own error at this dtype."""
    truth = run(x.double(), w.double(), y, "reference", fn, **kw)
    ref = run(x, w, y, "reference", fn, **kw)
    got = run(x, w, y, backend, fn, **kw)
    for name, t, r, g in zip(("loss", "dx", "dW"), truth, ref, got):
        assert torch.isfinite(g).all(), f"{name}: non-finite values from {backend}"
        scale = t.abs().max().item()
        err_ref = (r - t).abs().max().item()
        err_got = (g - t).abs().max().item()
        allowed = allowed_error(t, r, x.dtype, factor)
        assert err_got <= allowed, (f"{name}: {backend} error {err_got:.3e} > allowed {allowed:.3e} "
                                    f"(reference error {err_ref:.3e}, |truth| {scale:.3e}, options {kw})")
    return truth, got


def bench_script(name: str) -> str:
    """The path of bench/<name> in this checkout."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", name)


def env_without_interpreter() -> dict:
    """This process's environment minus TRITON_INTERPRET, for a child that compiles for the GPU or picks itself."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def op_args(x, w, y, bias=None, treatment=Treatment.ADAPTIVE, param=0.2, clamp=True):
    """The Triton forward op's arguments (``torch.ops.mvloss.triton_neg_forward``) for inputs from make_inputs."""
    x_inv, w_inv = inverse_norms(x, 1e-12), inverse_norms(w, 1e-12)
    labels = torch.where(y == -100, torch.full_like(y, -1), y)
    b = x.shape[0]
    thr = torch.linspace(-0.2, 0.4, b, device=x.device)
    scale = torch.full((b,), 32.0, device=x.device)
    return (x, w, x_inv, w_inv, labels, thr, scale, bias, int(treatment), float(param), bool(clamp))


def bwd_args(fwd_args, lse):
    """The Triton backward op's arguments after op_args's forward: upstream gradients of lse and the logit sum,
    no dscale, dbias where there is a bias."""
    x, w, x_inv, w_inv, labels, thr, scale, bias, treatment, param, clamp = fwd_args
    g_lse = torch.linspace(0.5, 1.0, x.shape[0], device=x.device)
    g_sum = torch.full_like(g_lse, 1e-3)
    return (x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, treatment, param, clamp,
            False, bias is not None)
