"""The label-range check: labels in [0, C) or ignore_index, else an IndexError naming the first bad one.

Two modes (``set_label_check``; the environment variable ``MVLOSS_LABEL_CHECK`` sets the first one):

* ``"sync"`` (default): checked before any kernel runs.  On a GPU that is one host sync per call, and the sync waits
  for everything queued before it (the previous step's backward and optimizer step), so the host cannot run ahead
  of the GPU: an eager step then takes the host's issue time plus the GPU's tail instead of the larger of the two.
* ``"deferred"``: no host sync.  Labels outside the range are replaced on the device by ``ignore_index`` (those rows
  contribute nothing, as ignored rows do), and a two-number summary (how many, the first) is copied to pinned host
  memory without waiting.  The IndexError is raised by the next loss call in this thread (whatever its mode), or by
  ``check_pending_labels()``: one call late, after that call's loss and gradients were computed without the bad
  rows.  On eager CUDA tensors the replacement and the summary are one small Triton kernel.

Neither mode checks under ``torch.compile`` or while a CUDA graph is captured (no host code runs at replay): check
the labels of a compiled or graphed step yourself.
"""
from __future__ import annotations

import os
import threading

import torch

MODES = ("sync", "deferred")
_mode = [os.environ.get("MVLOSS_LABEL_CHECK", "sync")]
_pending = threading.local()  # .checks: [(summary on the host, CUDA event or None, num_classes, ignore_index)]


def _checked_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"label check must be one of {MODES}, got {mode!r} (MVLOSS_LABEL_CHECK or "
                         "mvloss.set_label_check)")
    return mode


def set_label_check(mode: str) -> str:
    """Sets how labels are checked ("sync" or "deferred", see the module docstring); returns the previous mode."""
    old = get_label_check()
    _mode[0] = _checked_mode(mode)
    return old


def get_label_check() -> str:
    """The current mode ("sync" or "deferred")."""
    return _checked_mode(_mode[0])


def _skipped(labels: torch.Tensor) -> bool:
    return labels.numel() == 0 or torch.compiler.is_compiling() or (
        labels.is_cuda and torch.cuda.is_current_stream_capturing())


def check_label_range(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """The labels to compute with: ``labels`` itself after a sync check, or (deferred) a copy with every label
    outside the range replaced by ignore_index, its check pending (``check_pending_labels``)."""
    if _skipped(labels):
        return labels
    check_pending_labels()
    if get_label_check() == "sync":
        _check_now(labels, num_classes, ignore_index)
        return labels
    safe, summary = _replace_bad(labels, num_classes, ignore_index)
    event = None
    if summary.is_cuda:
        host = torch.empty(summary.shape, dtype=summary.dtype, pin_memory=True)
        host.copy_(summary, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(summary.device))  # the copy's stream: the labels' device's
        summary = host
    _checks().append((summary, event, num_classes, ignore_index))
    return safe


def check_pending_labels() -> None:
    """Waits for this thread's deferred label checks and raises the IndexError of the first that found a bad label
    (each is reported once).  The loss calls run it first; call it after the last step of a loop too."""
    checks = _checks()
    if not checks:
        return
    done = list(checks)
    checks.clear()
    for summary, event, num_classes, ignore_index in done:
        if event is not None:
            event.synchronize()  # recorded a call ago: the GPU has almost always passed it
        count, first = summary.tolist()
        if count:
            raise IndexError(f"label {first} is out of range [0, {num_classes}) and is not ignore_index="
                             f"{ignore_index}: {count} such label(s) in the batch of an earlier call, whose rows "
                             "were ignored (the label check is deferred: mvloss.set_label_check / "
                             "MVLOSS_LABEL_CHECK)")


def _checks() -> list:
    if not hasattr(_pending, "checks"):
        _pending.checks = []
    return _pending.checks


def _bad(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Where a label is outside [0, num_classes) and is not ignore_index."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))


def _check_now(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    # one host sync, the price of never reaching a device-side assert; when every label is a class (the common case)
    # it costs four small launches, and only a batch with labels outside [0, C) (ignore_index rows) pays for more
    low, high = torch.aminmax(labels)
    if bool((low >= 0) & (high < num_classes)):
        return
    bad = _bad(labels, num_classes, ignore_index)
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise IndexError(f"label {first} is out of range [0, {num_classes}) and is not ignore_index={ignore_index}")


def _replace_bad(labels: torch.Tensor, num_classes: int, ignore_index: int):
    """(labels as int64 with the bad ones replaced by ignore_index, int64 (count of bad labels, the first of them or
    anything when there is none)), without a host sync."""
    from .autograd import triton_glue, triton_part

    if triton_glue(labels):
        part = triton_part("label_check")
        if part is not None:
            return part.replace_bad_labels(labels, num_classes, ignore_index)
    bad = _bad(labels, num_classes, ignore_index)
    safe = labels.long().masked_fill(bad, ignore_index)
    at = bad.to(torch.int32).argmax().reshape(1)  # argmax gives the first of equal maxima
    first = labels.index_select(0, at).long()  # (indexing with a 0-d tensor would read it on the host)
    return safe, torch.cat((bad.sum().reshape(1), first))
