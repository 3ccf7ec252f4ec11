"""mvloss: fused margin-softmax heads (ArcFace, CosFace, SphereFace, MV-/SV-Softmax, ...) for face recognition."""
from . import backends as _backends  # noqa: F401  (registers the pure-PyTorch backends)
from . import functional, nn
from .config import LossConfig
from .dispatch import backends
from .label_check import check_pending_labels, get_label_check, set_label_check
from .margins import SphereFaceLambda

__version__ = "0.1.0"
__all__ = ["functional", "nn", "backends", "LossConfig", "SphereFaceLambda", "set_label_check", "get_label_check",
           "check_pending_labels", "__version__"]
