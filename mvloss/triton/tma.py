"""Host-side TMA descriptors of the kernels' two matrix operands (the tma / ws loop forms; see forward_tma.py).

A descriptor covers a 2-D tensor with a unit feature stride and a 16-byte aligned base and row stride; one bulk
copy then moves a whole tile into shared memory, zero-filled past the matrix.  Where an operand does not qualify, or
while torch.compile traces (fake or functional tensors, which have no address), the launchers take the pointer
kernels instead.
"""
import torch


def _describable(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the TMA kernels can run on these operands."""
    real = type(x) is torch.Tensor and type(w) is torch.Tensor
    return real and _describable(x) and _describable(w)


def descriptors(x: torch.Tensor, w: torch.Tensor, block_rows: int, block_cols: int, block_k: int):
    """Descriptors of x (block_rows x block_k tiles) and W (block_cols x block_k tiles)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return (TensorDescriptor.from_tensor(x, [block_rows, block_k]),
            TensorDescriptor.from_tensor(w, [block_cols, block_k]))
