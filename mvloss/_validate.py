"""Input checks, in one place, before any kernel runs: bad input is a clear Python exception, never a wrong loss."""
from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                 bias: Optional[torch.Tensor] = None) -> None:
    for name, t in (("x", x), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (batch, dim), got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (num_classes, dim), got shape {tuple(weight.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be a floating tensor (fp16/bf16/fp32/fp64), got {weight.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.dim() == 2 and labels.shape[1] == 1:
        raise ValueError("labels must be 1-D (batch,); got shape (batch, 1): call labels.view(-1) first")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (batch,), got shape {tuple(labels.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight is empty: at least one class is needed")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"feature dims differ: x has {x.shape[1]}, weight has {weight.shape[1]} "
                         "(weight is (num_classes, dim); transpose a (dim, num_classes) matrix)")
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but x has {x.shape[0]} rows")
    devices = {x.device, weight.device, labels.device}
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be a 1-D tensor of num_classes={weight.shape[0]} entries")
        devices.add(bias.device)
    if len(devices) > 1:
        raise ValueError(f"x, weight, labels (and bias) must be on one device, got {sorted(map(str, devices))}")
    check_label_range(labels, weight.shape[0], ignore_index)


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_label_range(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Labels in [0, num_classes) or ignore_index, else an IndexError naming the first bad one.  Needs one host sync,
    so it is skipped where there can be none: under torch.compile and while a CUDA graph is being captured (a graph
    replays the kernels only; check the labels of a graphed step yourself)."""
    if labels.numel() == 0 or torch.compiler.is_compiling() or _capturing(labels):
        return
    # one host sync, the price of never reaching a device-side assert; when every label is a class (the common case)
    # it costs four small launches, and only a batch with labels outside [0, C) (ignore_index rows) pays for more
    low, high = torch.aminmax(labels)
    if bool((low >= 0) & (high < num_classes)):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise IndexError(f"label {first} is out of range [0, {num_classes}) and is not ignore_index={ignore_index}")
