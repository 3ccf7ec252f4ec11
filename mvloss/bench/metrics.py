"""Benchmark arithmetic: FLOP counts, throughput, ratios, and the regression check against a baseline."""
from __future__ import annotations

import json
from typing import Iterable


def flops(batch: int, num_classes: int, dim: int, backward: bool) -> int:
    """2·B·C·D for the forward GEMM; 8·B·C·D for forward + backward with recompute (fwd, recompute, dX, dW)."""
    return (8 if backward else 2) * batch * num_classes * dim


def tflops(batch: int, num_classes: int, dim: int, backward: bool, ms: float) -> float:
    if ms is None or ms <= 0:
        return float("nan")
    return flops(batch, num_classes, dim, backward) / (ms * 1e-3) / 1e12


def case_key(row: dict) -> str:
    return "|".join(str(row[k]) for k in ("method", "loss", "dtype", "B", "C", "D", "pass"))


def compare(rows: Iterable[dict], baseline_rows: Iterable[dict], tolerance: float = 0.10) -> list[str]:
    """Cases more than ``tolerance`` slower than the baseline (both measured); one message per regression."""
    base = {case_key(r): r for r in baseline_rows if r.get("ms") is not None}
    slower = []
    for row in rows:
        old = base.get(case_key(row))
        if old is None or row.get("ms") is None:
            continue
        if row["ms"] > old["ms"] * (1.0 + tolerance):
            slower.append(f"{case_key(row)}: {row['ms']:.3f} ms vs baseline {old['ms']:.3f} ms "
                          f"(+{100 * (row['ms'] / old['ms'] - 1):.0f}%)")
    return slower


def load_rows(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    return data["rows"] if isinstance(data, dict) else data
