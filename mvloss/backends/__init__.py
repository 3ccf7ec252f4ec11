"""Backends that need nothing but PyTorch register here; the Triton and C++ ones register from their modules."""
from .. import dispatch
from . import chunked

dispatch.register(dispatch.Backend(name="reference", priority=100, fused=False))
dispatch.register(dispatch.Backend(name="chunked", priority=90, forward=chunked.forward, backward=chunked.backward))
