"""The label-range check's two modes (mvloss.label_check): "sync" raises before any kernel runs; "deferred" computes
without a host sync, ignores the bad rows and raises in the next call."""
import os
import subprocess
import sys
import threading

import pytest
import torch

import mvloss
from mvloss import functional as F
from mvloss import label_check
from mvloss.bench.launches import count_step
from helpers import make_inputs

AVAILABLE = {b["name"] for b in mvloss.backends() if b["available"]}
BACKENDS = ["reference", "chunked", "cpu", "triton"]
B, C, D = 9, 17, 8
KW = dict(scale=16.0, margin=0.3, mv="adaptive", t=0.2)


@pytest.fixture(autouse=True)
def sync_mode_after():
    yield
    mvloss.set_label_check("sync")
    label_check._checks().clear()


def _needs(backend):
    if backend not in AVAILABLE:
        pytest.skip(f"backend {backend} is not available here")


def _bad_labels():
    x, w, y = make_inputs(B, C, D, seed=3)
    y[1], y[4], y[6], y[7] = C + 5, -3, -100, C  # two bad before the ignored row, one after
    return x, w, y


def _loss_and_grads(x, w, y, backend):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    loss = F.arcface_loss(x, w, y, backend=backend, **KW)
    loss.backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_deferred_ignores_bad_rows_and_raises_in_the_next_call(backend):
    _needs(backend)
    x, w, y = _bad_labels()
    as_ignored = torch.where((y < 0) | (y >= C), -100, y)
    want = _loss_and_grads(x, w, as_ignored, backend)
    mvloss.set_label_check("deferred")
    got = _loss_and_grads(x, w, y, backend)  # no exception in this call
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, rtol=0, atol=0)
    with pytest.raises(IndexError, match=rf"label {C + 5} is out of range \[0, {C}\).*3 such label"):
        F.arcface_loss(x, w, as_ignored, backend=backend, **KW)
    F.arcface_loss(x, w, as_ignored, backend=backend, **KW)  # reported once
    mvloss.check_pending_labels()


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_sync_raises_before_computing(backend):
    x, w, y = _bad_labels()
    with pytest.raises(IndexError, match=rf"label {C + 5} is out of range"):
        F.arcface_loss(x, w, y, backend=backend, **KW)
    assert not label_check._checks()


def test_check_pending_labels_raises_and_good_batches_leave_nothing():
    x, w, y = _bad_labels()
    mvloss.set_label_check("deferred")
    good = torch.where((y < 0) | (y >= C), 0, y)
    F.arcface_loss(x, w, good, backend="chunked", **KW)
    mvloss.check_pending_labels()  # a good batch: nothing to raise
    F.arcface_loss(x, w, y, backend="chunked", **KW)
    with pytest.raises(IndexError, match="deferred"):
        mvloss.check_pending_labels()
    mvloss.check_pending_labels()


def test_a_pending_error_is_raised_in_its_own_thread():
    x, w, y = _bad_labels()
    mvloss.set_label_check("deferred")
    F.arcface_loss(x, w, y, backend="chunked", **KW)
    seen = []

    def other():
        try:
            mvloss.check_pending_labels()
            seen.append("clean")
        except IndexError:
            seen.append("raised")

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == ["clean"]
    with pytest.raises(IndexError):
        mvloss.check_pending_labels()


@pytest.mark.parametrize("labels_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("ignore_index", [-100, 3])
@pytest.mark.parametrize("n", [1, 5, 3000])
def test_triton_replacement_matches_pytorch(n, ignore_index, labels_dtype):
    """The one-launch kernel (on a GPU, or in the interpreter) against the PyTorch path; 3000 labels take three of
    its blocks."""
    pytest.importorskip("triton")
    from mvloss.triton.label_check import replace_bad_labels

    g = torch.Generator().manual_seed(n)
    y = torch.randint(-6, C + 6, (n,), generator=g).to(labels_dtype)
    if n > 3:
        y[n // 2] = ignore_index
    bad = (y != ignore_index) & ((y < 0) | (y >= C))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    safe, summary = replace_bad_labels(y.to(device), C, ignore_index)
    torch_safe, torch_summary = label_check._replace_bad(y, C, ignore_index)  # CPU tensors: the PyTorch path
    assert safe.dtype == torch_safe.dtype == torch.int64
    assert torch.equal(safe.cpu(), torch_safe)
    assert torch.equal(torch_safe, y.long().masked_fill(bad, ignore_index))
    count = int(bad.sum())
    assert int(summary[0]) == int(torch_summary[0]) == count
    if count:
        assert int(summary[1]) == int(torch_summary[1]) == int(y[bad][0])


def test_pytorch_replacement_summary():
    y = torch.tensor([2, C, -100, -1, 5])
    safe, summary = label_check._replace_bad(y, C, -100)
    assert safe.tolist() == [2, -100, -100, -100, 5]
    assert summary.tolist() == [2, C]


def test_deferred_step_has_no_host_sync():
    """The counted eager step (the launches tool): one sync with the sync check, none deferred."""
    x, w, y = make_inputs(B, C, D, seed=1)
    x.requires_grad_(True)
    w.requires_grad_(True)

    def step():
        F.arcface_loss(x, w, y, backend="chunked", **KW).backward()

    step()
    assert count_step(step)["syncs"] == 1
    mvloss.set_label_check("deferred")
    step()
    assert count_step(step)["syncs"] == 0


def test_pytorch_replacement_has_no_host_sync():
    y = torch.tensor([2, C, -100, -1, 5])
    counted = count_step(lambda: label_check._replace_bad(y, C, -100), cuda_paths=False)
    assert counted["syncs"] == 0 and counted["triton"] == 0 and counted["aten"] > 0
    y0 = torch.tensor([2, 3])
    _, summary = label_check._replace_bad(y0, C, -100)
    assert int(summary[0]) == 0


def test_mode_names_and_environment():
    with pytest.raises(ValueError, match="label check must be one of"):
        mvloss.set_label_check("lazy")
    assert mvloss.set_label_check("deferred") == "sync"
    assert mvloss.get_label_check() == "deferred"
    code = "import mvloss; print(mvloss.get_label_check())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MVLOSS_LABEL_CHECK": "deferred"})
    assert out.stdout.strip() == "deferred"


def test_distributed_head_defers_too():
    from mvloss.distributed import ClassParallelHead

    head = ClassParallelHead(D, C, backend="chunked")
    x, _, y = _bad_labels()
    mvloss.set_label_check("deferred")
    head(x, y).backward()
    with pytest.raises(IndexError, match="out of range"):
        mvloss.check_pending_labels()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "chunked"])
def test_cuda_deferred_step_never_syncs(backend):
    """On a GPU: a deferred step runs with torch's sync debug mode set to error (a sync check step raises there), its
    pending check is an event a call old, and a bad batch is reported by the next call."""
    _needs(backend)
    x, w, y = (t.cuda() for t in _bad_labels())
    good = torch.where((y < 0) | (y >= C), 0, y)
    mvloss.set_label_check("deferred")
    try:
        torch.cuda.set_sync_debug_mode("error")
        for labels in (good, good, y):
            _loss_and_grads(x, w, labels, backend)
        torch.cuda.set_sync_debug_mode("default")
        with pytest.raises(IndexError, match=rf"label {C + 5} is out of range"):
            mvloss.check_pending_labels()
        mvloss.set_label_check("sync")
        torch.cuda.set_sync_debug_mode("error")
        with pytest.raises(RuntimeError, match="synchroniz"):
            _loss_and_grads(x, w, good, backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["tiles", "tma"])
def test_cuda_deferred_multi_chunk_bf16_step_never_syncs(form, monkeypatch):
    """On a GPU, a training step as the benchmarks run it (bf16, the backward in twelve class chunks, the pointer and
    the TMA kernels) issues no host sync under the deferred check: the chunk loop is host code a sync would stall."""
    _needs("triton")
    monkeypatch.setenv("MVLOSS_TRITON_WORKSPACE_ELEMS", str(64 * 256))  # B = 64: 256 classes a chunk
    monkeypatch.setenv("MVLOSS_TRITON_DLOGITS", form)
    monkeypatch.setenv("MVLOSS_TRITON_FORWARD", form)
    x, w, y = (t.cuda() for t in make_inputs(64, 3000, 64, torch.bfloat16, seed=4))
    mvloss.set_label_check("deferred")
    try:
        _loss_and_grads(x, w, y, "triton")  # compiles the kernels (their first launch may sync)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(2):
            loss, gx, gw = _loss_and_grads(x, w, y, "triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gw).all()


def test_deferred_mode_compiles_fullgraph_and_leaves_nothing_pending():
    """Under torch.compile neither mode checks (no host code at run time): the deferred mode traces without a break
    and gives the eager loss of good labels."""
    x, w, y = make_inputs(B, C, D, seed=5)
    mvloss.set_label_check("deferred")
    eager = F.arcface_loss(x, w, y, backend="chunked", **KW)
    mvloss.check_pending_labels()
    compiled = torch.compile(lambda x, w, y: F.arcface_loss(x, w, y, backend="chunked", **KW), fullgraph=True)
    torch.testing.assert_close(compiled(x, w, y), eager, rtol=1e-5, atol=1e-6)
    assert not label_check._checks()
