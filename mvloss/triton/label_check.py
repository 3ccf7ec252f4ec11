"""The deferred label check's device side in one launch (``mvloss.label_check``, mode "deferred"): labels outside
[0, C) that are not ignore_index replaced by ignore_index, and (how many there were, the first of them).  The
PyTorch path does the same in about ten ops; the tests check the two against each other.  One program walks the
batch in blocks (a batch is at most a few hundred thousand labels)."""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def replace_bad_labels_kernel(labels_ptr, safe_ptr, summary_ptr, B, C, ignore_index, BLOCK: tl.constexpr):
    count = tl.zeros((BLOCK,), dtype=tl.int64)
    first = tl.full((BLOCK,), B, dtype=tl.int64)
    for start in range(0, B, BLOCK):
        rows = start + tl.arange(0, BLOCK).to(tl.int64)
        inside = rows < B
        lab = tl.load(labels_ptr + rows, mask=inside, other=0).to(tl.int64)
        bad = inside & (lab != ignore_index) & ((lab < 0) | (lab >= C))
        tl.store(safe_ptr + rows, tl.where(bad, ignore_index, lab), mask=inside)
        count += bad.to(tl.int64)
        first = tl.minimum(first, tl.where(bad, rows, B))
    n_bad = tl.sum(count, axis=0)
    at = tl.min(first, axis=0)
    value = tl.load(labels_ptr + tl.minimum(at, B - 1)).to(tl.int64)
    tl.store(summary_ptr, n_bad)
    tl.store(summary_ptr + 1, value)


def replace_bad_labels(labels: torch.Tensor, num_classes: int, ignore_index: int):
    """(int64 labels with the bad ones replaced by ignore_index, int64 (count, first bad label)), one launch."""
    labels = labels.contiguous()
    B = labels.shape[0]
    safe = torch.empty(B, dtype=torch.int64, device=labels.device)
    summary = torch.empty(2, dtype=torch.int64, device=labels.device)
    replace_bad_labels_kernel[(1,)](labels, safe, summary, B, int(num_classes), int(ignore_index), BLOCK=BLOCK)
    return safe, summary
