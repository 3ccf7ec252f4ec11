"""The benchmark must not rot: its metric code, result files and --compare, and a tiny CPU run."""
import json
import os

import pytest
import torch

from mvloss.bench import cli, runner
from mvloss.bench.metrics import compare, flops, tflops
from helpers import bench_script, env_without_interpreter


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


def test_peak_memory_is_a_steps_not_the_compilers():
    """CPU peak extra memory, each case in its own process: the reference holds several B x C fp32 matrices, the fused
    C++ op none, and a compiled step's peak leaves out the compiler's own memory (about 90 MB at this shape when the
    warm-up step was measured)."""
    B, C, D = 128, 50_000, 32
    bxc_mb = B * C * 4 / 2**20
    peak = {}
    for method in ("reference", "mvloss:cpu", "mvloss:cpu+compile"):
        row = runner.measure_isolated(dict(method=method, loss="mv_arc", dtype="fp32", B=B, C=C, D=D, device="cpu",
                                           **{"pass": "fwd+bwd"}), budget_s=0.05)
        assert row["status"] == "ok", row
        peak[method] = row["peak_extra_mb"]
    assert peak["reference"] > 5 * bxc_mb, peak
    assert peak["mvloss:cpu"] < 0.75 * bxc_mb, peak
    assert peak["mvloss:cpu+compile"] < 0.75 * bxc_mb, peak


def test_plot_panels_cover_every_loss_and_dtype_at_the_largest_shape():
    def row(loss, dtype, B, C, ms=1.0, pas="fwd+bwd"):
        return dict(method="mvloss:cpu", loss=loss, dtype=dtype, B=B, C=C, D=8, ms=ms, **{"pass": pas})

    rows = [row(loss, dtype, B, C) for loss in ("normface", "mv_arc") for dtype in ("fp32", "bf16")
            for B in (4, 16) for C in (10, 100)] + [row("arcface", "fp32", 16, 10, pas="fwd"),
                                                    row("arcface", "bf16", 16, 10, ms=None)]
    groups = cli.plot_groups(rows)
    assert [title for title, _ in groups] == [f"{loss} {dtype} B=16 D=8 fwd+bwd" for loss in ("normface", "mv_arc")
                                              for dtype in ("fp32", "bf16")]
    assert all(sorted(r["C"] for r in g) == [10, 100] and {r["B"] for r in g} == {16} for _, g in groups)
    assert [t for t, _ in cli.plot_groups([row("arcface", "fp32", 4, 10, pas="fwd")])] == \
        ["arcface fp32 B=4 D=8 fwd"]  # no forward+backward measured: the forward rows
    assert cli.plot_groups([row("arcface", "fp32", 4, 10, ms=None)]) == []


def test_summary_has_back_to_back_column_and_label_check():
    """The grid's rows carry steady_ms (None on a CPU, where it is ms itself); the summary prints it and the run's
    label-check mode; --label-check sets the mode for the run."""
    import mvloss

    row = runner.measure(dict(method="mvloss:chunked", loss="mv_arc", dtype="fp32", B=8, C=300, D=16, device="cpu",
                              **{"pass": "fwd+bwd"}), budget_s=0.05)
    assert "steady_ms" in row and row["steady_ms"] is None
    text = cli.summary_markdown([dict(row, steady_ms=1.25)], [], dict(device="d", torch="t", date="x", command="c",
                                                                      label_check="deferred"))
    assert "| back to back ms |" in text and "| 1.250 |" in text and "label check: deferred" in text
    old, old_env = mvloss.get_label_check(), os.environ.get("MVLOSS_LABEL_CHECK")
    try:
        case = dict(row, method="mvloss:chunked")
        assert cli.main(["--label-check", "deferred", "--one", json.dumps(case), "--budget", "0.01"]) == 0
        assert mvloss.get_label_check() == "deferred" and os.environ["MVLOSS_LABEL_CHECK"] == "deferred"
    finally:
        mvloss.set_label_check(old)
        if old_env is None:
            os.environ.pop("MVLOSS_LABEL_CHECK", None)
        else:
            os.environ["MVLOSS_LABEL_CHECK"] = old_env


@pytest.mark.gpu
def test_back_to_back_timing_on_gpu():
    row = runner.measure(dict(method="mvloss:triton", loss="mv_arc", dtype="bf16", B=64, C=3000, D=64,
                              device="cuda", **{"pass": "fwd+bwd"}), budget_s=0.1)
    assert row["status"] == "ok" and 0 < row["steady_ms"] < 10 * row["ms"] + 1.0, row


def test_compiled_mvloss_method():
    """mvloss:<backend>+compile times the loss under torch.compile; the Triton one says why it cannot run on a CPU."""
    from mvloss import dispatch
    from mvloss.bench import methods

    backend = "cpu" if dispatch.get("cpu").reason() is None else "chunked"
    case = dict(loss="mv_arc", dtype="fp32", B=8, C=300, D=16, device="cpu", **{"pass": "fwd+bwd"})
    row = runner.measure(dict(case, method=f"mvloss:{backend}+compile"), budget_s=0.05)
    assert row["status"] == "ok" and row["ms"] > 0, row
    assert "needs a GPU" in runner.measure(dict(case, method="mvloss:triton+compile"), budget_s=0.05)["status"]
    assert f"mvloss:{backend}+compile" in methods.METHODS
    x, w, y = runner.make_inputs(8, 300, 16, torch.float32, torch.device("cpu"))
    eager, compiled = methods.make(f"mvloss:{backend}", "mv_arc"), methods.make(f"mvloss:{backend}+compile", "mv_arc")
    torch.testing.assert_close(compiled(x, w, y), eager(x, w, y), rtol=1e-5, atol=1e-6)


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


def test_compiled_step_check_script_on_cpu_backends():
    """bench/compiled_step_check.py (compiled against eager step) runs and passes on the C++ CPU backend and fails
    on an impossible tolerance (the check can fail)."""
    import subprocess
    import sys

    from mvloss import dispatch

    backend = "cpu" if dispatch.get("cpu").reason() is None else "chunked"
    script = bench_script("compiled_step_check.py")
    args = [sys.executable, script, "--backend", backend, "--device", "cpu", "--dtype", "fp32", "--B", "8", "--C",
            "300", "--D", "16"]
    env = env_without_interpreter()
    ok = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr[-2000:]
    rec = json.loads(ok.stdout.strip().splitlines()[-1])
    assert rec["ok"] and rec["pass"] and rec["dx_err"] < 1e-4 and rec["dw_err"] < 1e-4, rec
    strict = subprocess.run(args + ["--tol", "-1"], capture_output=True, text=True, timeout=600, env=env)
    assert strict.returncode == 1, strict.stdout


def test_host_call_times_script(tmp_path, monkeypatch):
    """bench/host_call_times.py times each host call of an eager Triton step (here on the CPU, interpreted, in three
    class chunks): the backward's per-chunk calls once a chunk, every wrapped function restored afterwards."""
    import importlib.util as iu

    from mvloss.triton import _config, backward_gemm, norm_backward

    spec = iu.spec_from_file_location("host_call_times", bench_script("host_call_times.py"))
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    originals = (_config.launcher, backward_gemm.launch, backward_gemm._mm32, norm_backward.launch)
    monkeypatch.setenv("MVLOSS_TRITON_WORKSPACE_ELEMS", str(8 * 64))  # 64 classes a chunk at B = 8
    out = tmp_path / "calls.json"
    assert mod.main(["--B", "8", "--C", "150", "--D", "8", "--steps", "2", "--warmup", "1", "--json", str(out)]) == 0
    calls = {r["call"]: r for r in json.loads(out.read_text())["calls"]}
    assert calls["backward_gemm.launch"]["per_step"] == 1 and calls["kernel neg_dlogits_kernel"]["per_step"] == 3
    # dW's bf16 GEMM a chunk; dX's: the first chunk's, then one accumulating GEMM a further chunk
    assert calls["backward_gemm._mm_same"]["per_step"] == 3 and calls["backward_gemm._addmm32_"]["per_step"] == 2
    assert calls["norm_backward.launch"]["per_step"] == 3 and calls["forward_lse.launch"]["per_step"] == 1
    assert calls["step backward (issue)"]["mean_us"] >= calls["backward_gemm.launch"]["mean_us"] > 0
    assert (_config.launcher, backward_gemm.launch, backward_gemm._mm32, norm_backward.launch) == originals


def test_fp32_error_seeds_script(tmp_path):
    """bench/fp32_error_seeds.py: the tests' error rule over twelve seeds of the tiny edge shape, each option set
    with the target side's kernels and its PyTorch ops.  Here (the CPU, interpreted) no seed breaks the rule; on an
    H100 three of twelve did (bench/results/nvidia-h100-80gb-hbm3/NOTES.md, fifteenth session)."""
    import importlib.util as iu

    spec = iu.spec_from_file_location("fp32_error_seeds", bench_script("fp32_error_seeds.py"))
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, before = tmp_path / "seeds.json", os.environ.get("MVLOSS_TARGET_KERNELS")
    assert mod.main(["--seeds", "12", "--shape", "1", "5", "3", "--options", "test", "s1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["options"], r["target_side"]) for r in rows] == [("test", "kernels"), ("test", "pytorch"),
                                                                ("s1", "kernels"), ("s1", "pytorch")]
    for r in rows:
        for name in ("loss", "dx", "dW"):
            assert r[name]["over_test_bound"] == 0 and r[name]["rel_max"] < 1e-5, (r["options"], name, r[name])
    assert os.environ.get("MVLOSS_TARGET_KERNELS") == before  # restored


def test_fp32_error_seeds_emulated_ex2(tmp_path):
    """--emulate-ex2 perturbs the interpreter's exp2 (a stand-in for a GPU's approximate one): a large perturbation
    breaks the error rule that the exact interpreter keeps, so the stand-in reaches the kernels' exponentials.  In a
    fresh process: it changes Triton's interpreter class."""
    import subprocess
    import sys

    out = {}
    for rel in ("0", "1e-3"):
        path = tmp_path / f"seeds_{rel}.json"
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")  # the interpreter, on a GPU host too
        proc = subprocess.run([sys.executable, bench_script("fp32_error_seeds.py"), "--seeds", "3", "--shape", "1", "5",
                               "3", "--options", "s1", "--emulate-ex2", rel, "--json", str(path)],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        data = json.loads(path.read_text())
        assert data["emulate_ex2"] == float(rel)
        out[rel] = data["rows"][0]["dx"]
    assert out["0"]["over_test_bound"] == 0 and out["1e-3"]["over_test_bound"] == 3, out


def test_fp32_fma_emulation_script(capsys):
    """bench/fp32_fma_emulation.py reproduces the GPU-only fp32 error on the CPU: with the backward's z - lse fused
    (the logit's product unrounded, as a GPU's FMA left it) seeds of the tiny shape break the tests' rule, as three
    of twelve did on an H100; as written none does, and at logit scale 1 neither copy does."""
    import importlib.util as iu
    import re

    spec = iu.spec_from_file_location("fp32_fma_emulation", bench_script("fp32_fma_emulation.py"))
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--seeds", "12"]) == 0
    text = capsys.readouterr().out
    written, fused = text.split("the backward's z - lse with the product fused")
    # dx's seeds over the bound, per option set in order: test, plain, s1
    counts = [[int(n) for n in re.findall(r"over the test bound (\d+) of 12", part)] for part in (written, fused)]
    assert counts[0] == [0, 0, 0] and counts[1][0] >= 3 and counts[1][2] == 0, text


def test_ieee_math_ulps_script(capsys):
    """bench/ieee_math_ulps.py prints the four functions' worst errors, each within the bound the tests assert."""
    import importlib.util as iu
    import re

    spec = iu.spec_from_file_location("ieee_math_ulps", bench_script("ieee_math_ulps.py"))
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main() == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["softplus", "sigmoid", "exp(-|t|)", "log"]
    for ln, bound in zip(lines, (6, 6, 6, 4)):
        assert float(re.search(r"mvloss ([0-9.]+)", ln).group(1)) <= bound, ln


def test_fuzz_backends_script(capsys):
    """bench/fuzz_backends.py: random option combinations, each backend against the fp64 reference under the tests'
    rule.  A run of cases that keep it exits 0 with a summary line per backend; the known case where the Triton
    backend's fp32 dW breaks it (case 1025: one row, one dominant negative class, NOTES.md's eighteenth session;
    2.51x the rule then, 1.77x since its lse is fp64; the rest is its dominant fp32 cosine's rounding, which the
    reference happens to round better on that row, twentieth session) exits 1 and names it."""
    import importlib.util as iu

    spec = iu.spec_from_file_location("fuzz_backends", bench_script("fuzz_backends.py"))
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--backends", "triton", "chunked", "cpu", "--cases", "6", "--seed", "9000"]) == 0
    out = capsys.readouterr().out
    for backend in ("triton", "chunked", "cpu"):
        assert f"  {backend:8s} broke the rule in 0, could not run 0; worst " in out
    if os.environ.get("TRITON_INTERPRET") == "1":
        # under the interpreter the kernels' dots run on numpy's BLAS, so how far case 1025 lands from the rule
        # depends on the CPU: 1.77x allowed on the AVX-512 Xeon, 0.69x on an AVX2 EPYC (2026-11-29); at factor 0.25
        # it breaks on both (1.61x on the EPYC), which is what this checks: the report of a broken case
        assert mod.main(["--backends", "triton", "--cases", "1", "--seed", "1025", "--factor", "0.25"]) == 1
        line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("case 1025 triton: dW error"))
        # the worst entry's row (the zero weight row, 9) with its relative error and the reference's
        assert "; row 9: |truth| 22.9, relative error " in line and ", the reference's " in line, line


def test_lse_rounding_script(capsys):
    """bench/lse_rounding.py: per row of a fuzz case, each backend's lse error in ulps and its dominant class's
    gradient error against fp64 (the one-fp32-lse rounding of NOTES.md's eighteenth session): a line per row with
    every backend and PyTorch's softmax, each relative error under 1e-5, Triton's under 2.5e-7 since its backward
    takes an fp64 lse (1.6e-6 with its fp32 lse, 3.3e-8 now under the interpreter; chunked's fp32 lse: 8.4e-7)."""
    import importlib.util as iu
    import re

    spec = iu.spec_from_file_location("lse_rounding", bench_script("lse_rounding.py"))
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--seed", "1025"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("row ")]
    assert len(rows) == 1
    errors = [float(v) for v in re.findall(r"(?:gradient|softmax:) ([0-9.e+-]+)", rows[0])]
    assert "triton: lse" in rows[0] and "chunked: lse" in rows[0] and len(errors) == 3
    assert all(0 <= e < 1e-5 for e in errors) and errors[0] < 2.5e-7, rows[0]
    # the lse of the row's fp32 cosines summed exactly: within a few ulp of fp64, as rounded by this machine's product
    # (its dominant cosine's rounding: 3 ulp with the AVX-512 Xeon's MKL, 0 with an AVX2 EPYC's; a GPU sums in
    # another order)
    cos_ulps = float(re.search(r"fp32 cosines summed exactly: lse ([0-9.+-]+) ulp", rows[0]).group(1))
    assert abs(cos_ulps) < 10.0, rows[0]


def test_chunked_blocks_script(capsys, monkeypatch):
    """bench/chunked_blocks.py: a table row per shape and block size, each block size reaching the case's process
    (at B 32, C 4000: one chunk with 128k-element blocks, 32 chunks of 125 classes with 4000-element ones)."""
    import importlib.util as iu

    monkeypatch.setenv("MVLOSS_CHUNK_ELEMS", "262144")  # the script sets it per case; undone after the test
    spec = iu.spec_from_file_location("chunked_blocks", bench_script("chunked_blocks.py"))
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--shapes", "mv_arc:fp32:32:4000:16", "--blocks", "4000", "131072", "--budget", "0.01"]) == 0
    rows = [ln.split("|")[1:-1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("| mv_arc")]
    assert [r[5].strip() for r in rows] == ["4000", "131072"]
    for r in rows:
        assert all(float(v) > 0 for v in (r[6], r[8])), r  # times; memory may round to 0 at this size
