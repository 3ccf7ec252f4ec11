"""Input checks, in one place, before any kernel runs: bad input is a clear Python exception, never a wrong loss
(the label range: ``mvloss.label_check``, where it may be deferred by choice)."""
from __future__ import annotations

from typing import Optional

import torch

from .label_check import check_label_range

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Raises on bad input; returns the labels to compute with (``mvloss.label_check``: with the deferred check, a
    copy in which labels outside the range are ignore_index)."""
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
    return check_label_range(labels, weight.shape[0], ignore_index)
