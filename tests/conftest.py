"""Test-suite set-up: Triton runs in its interpreter when there is no GPU; uninitialised memory is NaN."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def nan_poisoned_allocations():
    """Fill every fresh torch.empty with NaN so a kernel that forgets to write an output fails loudly."""
    import torch.utils.deterministic as det

    old_fill, old_det = det.fill_uninitialized_memory, torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    det.fill_uninitialized_memory = old_fill
    torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def pytest_runtest_logreport(report):
    """MVLOSS_FAILURE_LOG=path: append each failure as it happens (a GPU session stopped by its time limit keeps
    the failures it saw; pytest's own summary comes only at the end)."""
    path = os.environ.get("MVLOSS_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n")
