"""Backend registry and selection.

Every backend says why it cannot run (globally: ``unavailable()``; per call: ``cannot_run(spec)``), and
``backend="auto"`` takes the first one, in priority order, that can.  ``MVLOSS_BACKEND`` overrides "auto".
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Callable, Optional

import torch


@dataclasses.dataclass(frozen=True)
class CallSpec:
    """What a backend needs to know about one call to decide whether it can run it."""

    device: torch.device
    dtype: torch.dtype
    batch: Optional[int]          # None under torch.compile (the sizes may be symbolic there)
    num_classes: Optional[int]
    dim: Optional[int]
    has_bias: bool
    scale_requires_grad: bool
    bias_requires_grad: bool


@dataclasses.dataclass
class Backend:
    name: str
    priority: int                                   # lower runs first under "auto"
    # the negatives contract (mvloss.negatives): forward -> (lse, zsum), or (lse, zsum, lse_for_backward) where the
    # backend's backward takes a wider copy of lse (Triton: fp64); backward -> (dxhat, dwhat, dscale, dbias)
    forward: Optional[Callable] = None
    backward: Optional[Callable] = None
    unavailable: Callable[[], Optional[str]] = lambda: None
    cannot_run: Callable[[CallSpec], Optional[str]] = lambda spec: None
    fused: bool = True                              # False for "reference": it materialises B x C itself
    # Optional: the backward with the target column's gradient (g_cos) and the weight gradient finished inside
    # (normalisation backward, W's dtype), so no C x D fp32 gradient exists; see mvloss.autograd and
    # mvloss.triton.backward_fused_w.
    backward_fused_w: Optional[Callable] = None

    def reason(self, spec: Optional[CallSpec] = None) -> Optional[str]:
        why = self.unavailable()
        if why is None and spec is not None:
            why = self.cannot_run(spec)
        return why


_REGISTRY: dict[str, Backend] = {}
# Modules that register a backend on import; a failed import becomes that backend's reason.
_OPTIONAL_MODULES = {"triton": "mvloss.triton", "cpu": "mvloss.backends.cpp", "cuda": "mvloss.backends.cpp"}
_import_errors: dict[str, str] = {}
_loaded = False


def lse_for_backward(forward_out: tuple):
    """The lse a backend's backward takes, from its forward's outputs: the wider copy where it returns one."""
    return forward_out[2] if len(forward_out) > 2 else forward_out[0]


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def _load_optional() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name, module in _OPTIONAL_MODULES.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # an optional backend must never break import of mvloss
            _import_errors[name] = f"{module} failed to import: {type(exc).__name__}: {exc}"


def get(name: str) -> Backend:
    _load_optional()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _import_errors or name in _OPTIONAL_MODULES:
        why = _import_errors.get(name, f"backend {name!r} did not register")
        return Backend(name=name, priority=99, unavailable=lambda why=why: why)
    raise ValueError(f"unknown backend {name!r}; known: {sorted(set(_REGISTRY) | set(_OPTIONAL_MODULES))}")


def all_backends() -> list[Backend]:
    _load_optional()
    names = sorted(set(_REGISTRY) | set(_OPTIONAL_MODULES), key=lambda n: (get(n).priority, n))
    return [get(n) for n in names]


def backends() -> list[dict]:
    """Every backend with whether it can run on this machine and, if not, why."""
    return [{"name": b.name, "available": b.reason() is None, "reason": b.reason()} for b in all_backends()]


def select(requested: str, spec: CallSpec) -> Backend:
    """The backend that runs this call; a clear error when an explicitly requested one cannot."""
    # Field by field: dataclasses.astuple deep-copies, which dynamo (torch 2.11) cannot trace on a torch.device.
    # Under torch.compile the sizes may be symbolic (dynamic shapes after a recompile) and cannot feed a constant
    # choice: there a backend sees None for batch / num_classes / dim (no built-in backend decides on sizes).
    compiling = torch.compiler.is_compiling()
    fields = [None if compiling and f.name in _SIZE_FIELDS else getattr(spec, f.name)
              for f in dataclasses.fields(spec)]
    return _REGISTRY[_select_name(requested, *fields)]


_SIZE_FIELDS = ("batch", "num_classes", "dim")


@torch.compiler.assume_constant_result
def _select_name(requested: str, *spec_fields) -> str:
    # Evaluated eagerly while torch.compile traces: a choice of backend is a constant of the graph.  The spec
    # travels as plain fields (dynamo hands a dataclass to such a function without its attributes).
    return _select(requested, CallSpec(*spec_fields)).name


def _select(requested: str, spec: CallSpec) -> Backend:
    if requested == "auto":
        requested = os.environ.get("MVLOSS_BACKEND", "auto") or "auto"
    if requested != "auto":
        backend = get(requested)
        why = backend.reason(spec)
        if why is not None:
            raise RuntimeError(f"mvloss backend {requested!r} cannot run this call: {why}")
        return backend
    for backend in all_backends():
        if backend.name == "reference":
            continue  # auto never picks the B x C backend: chunked always can
        if backend.name == "triton" and spec.device.type == "cpu":
            continue  # Triton on CPU is its interpreter: for tests, asked for by name, never chosen by auto
        if backend.reason(spec) is None:
            return backend
    return get("reference")
