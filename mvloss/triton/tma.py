"""What the TMA kernels (the tma / ws loop forms, forward_tma.py and backward_gemm's) need on the host.

The kernels make their descriptors of x and W themselves (``tl.make_tensor_descriptor``): a descriptor covers a
2-D tensor with a unit feature stride and a 16-byte aligned base and row stride, and one bulk copy then moves a
whole tile into shared memory, zero-filled past the matrix.  Where an operand does not qualify, or while
torch.compile traces (fake or functional tensors, which have no address), the launchers take the pointer kernels.
The descriptors live in a small global scratch buffer that Triton's launcher asks an allocator for.
"""
import torch


def _describable(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the TMA kernels can run on these operands."""
    real = type(x) is torch.Tensor and type(w) is torch.Tensor
    return real and _describable(x) and _describable(w)


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Give Triton's launcher an allocator for the descriptors' scratch (PyTorch's caching allocator, so it is
    stream-ordered and capturable in a CUDA graph), unless the program has set one of its own."""
    import triton
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)
