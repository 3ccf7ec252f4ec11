"""The benchmark must not rot: its metric code, result files and --compare, and a tiny CPU run."""
import json

import pytest
import torch

from mvloss.bench import cli, runner
from mvloss.bench.metrics import compare, flops, tflops


def test_flop_counts():
    assert flops(2, 3, 5, backward=False) == 2 * 2 * 3 * 5
    assert flops(2, 3, 5, backward=True) == 8 * 2 * 3 * 5
    assert tflops(1024, 100_000, 512, True, 1000.0) == pytest.approx(8 * 1024 * 100_000 * 512 / 1e12)
    assert tflops(1, 1, 1, True, 0.0) != tflops(1, 1, 1, True, 0.0)  # nan for a missing time


def _row(ms, method="mvloss:cpu", C=10):
    return dict(method=method, loss="mv_arc", dtype="fp32", B=2, C=C, D=3, ms=ms, **{"pass": "fwd+bwd"})


def test_compare_flags_only_real_regressions():
    base = [_row(10.0), _row(10.0, C=20), _row(None, C=30)]
    assert compare([_row(10.9), _row(9.0, C=20), _row(50.0, C=30)], base) == []
    slower = compare([_row(11.5), _row(10.0, C=20)], base)
    assert len(slower) == 1 and "mvloss:cpu" in slower[0] and "+15%" in slower[0]


def test_measure_in_process_and_floor_ratio():
    rows = []
    for method in ("mvloss:chunked", "reference", "eager_head", "gemm_floor", "cce"):
        rows.append(runner.measure(dict(method=method, loss="mv_arc", dtype="fp32", B=8, C=300, D=16, device="cpu",
                                        **{"pass": "fwd+bwd"}), budget_s=0.05))
    cli.add_floor_ratios(rows)
    by = {r["method"]: r for r in rows}
    for m in ("mvloss:chunked", "reference", "eager_head", "gemm_floor"):
        assert by[m]["status"] == "ok" and by[m]["ms"] > 0 and by[m]["tflops"] > 0
    assert by["gemm_floor"]["floor_ratio"] == 1.0
    assert by["cce"]["status"].startswith("unavailable")


def test_eager_head_equals_mvloss():
    from mvloss import functional as F
    from mvloss.bench.methods import LOSSES, eager_head_loss

    x, w, y = runner.make_inputs(8, 50, 16, torch.float32, torch.device("cpu"))
    for loss in LOSSES:
        torch.testing.assert_close(eager_head_loss(x, w, y, loss),
                                   F.margin_softmax_loss(x, w, y, backend="reference", **LOSSES[loss]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cli_quick_run_writes_results_and_compare_fails_on_regression(tmp_path):
    out = tmp_path / "res"
    args = ["--quick", "--C", "300", "--methods", "mvloss:chunked", "gemm_floor", "--budget", "0.05",
            "--out", str(out)]
    assert cli.main(args) == 0
    for name in ("results.json", "results.csv", "summary.md", "time_vs_C.png", "memory_vs_C.png"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["device"].startswith("CPU") and len(data["rows"]) == 2
    fast = [dict(r, ms=r["ms"] / 100) for r in data["rows"]]
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"rows": fast}))
    assert cli.main(args + ["--compare", str(baseline), "--no-plots"]) == 1
