"""cpu tier: the CPU-side parts of bench/gpu_check.py (refusal without CUDA, ratios, table, targets)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import common as C  # noqa: E402
import gpu_check  # noqa: E402
import predictions as P  # noqa: E402

pytestmark = pytest.mark.cpu


def test_refuses_cleanly_without_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr
    assert not out.exists()


def _cpu_rows():
    """Real measurements of a tiny linear case on this CPU, shaped like gpu_check's rows."""
    case = C.Case("linear_fwdbwd", "gpu-small", 64, 32, 3, 10, torch.float32, "cpu")
    rows = []
    for provider in ("eager", "fasthydra"):
        step = C.make_callable(case, provider, C.make_inputs(case))
        rows.append({"op": case.op, "shape": case.name, "dtype": "float32", "provider": provider,
                     "B": case.B, "D": case.D, "M": case.M, "C": case.C,
                     "seconds": C.median_seconds(step, rounds=5), "peak_memory_bytes": 2**20 * (4 - len(rows)),
                     "compile_seconds": None})
    floor = C.median_seconds(C.gemm_floor_callable(case), rounds=5)
    return gpu_check.add_ratios(rows, {(case.op, case.name): floor}), floor


def test_ratios_and_table_on_cpu_data():
    rows, floor = _cpu_rows()
    eager, fast = rows
    assert fast["speedup_vs_eager"] == pytest.approx(eager["seconds"] / fast["seconds"])
    assert eager["speedup_vs_eager"] == pytest.approx(1.0)
    assert fast["over_gemm_floor"] == pytest.approx(fast["seconds"] / floor)
    assert fast["memory_vs_eager"] == pytest.approx(3 / 4)
    assert fast["speedup_vs_compile"] is None  # no compile row in this case
    table = gpu_check.format_table(rows, "cpu (test)")
    lines = table.splitlines()
    assert len(lines) == 4 and "x eager" in lines[0] and "/floor" in lines[0]
    assert "fasthydra" in lines[3] and "TFLOP/s" in lines[3] and "MiB" in lines[3]


def test_target_verdicts():
    rows = [{"op": "linear_fwdbwd", "shape": "gpu-small", "provider": "fasthydra", "speedup_vs_eager": 12.0},
            {"op": "linear_fwdbwd", "shape": "gpu-large", "provider": "fasthydra", "over_gemm_floor": 1.5,
             "speedup_vs_compile": 1.7, "speedup_vs_eager": None, "memory_vs_eager": 0.05},
            {"op": "kl_fwdbwd", "shape": "gpu-large", "provider": "fasthydra", "of_copy_bandwidth": 0.5},
            {"op": "linear_fwdbwd", "shape": "gpu-small", "provider": "eager", "speedup_vs_eager": 1.0}]
    verdicts = {label: verdict for label, verdict, _ in gpu_check.check_targets(rows)}
    assert verdicts["linear_fwdbwd gpu-small: speedup_vs_eager >= 10.0"] == "PASS"
    assert verdicts["linear_fwdbwd gpu-large: over_gemm_floor <= 1.15"] == "FAIL"
    assert verdicts["linear_fwdbwd gpu-large: speedup_vs_compile >= 1.6"] == "PASS"
    assert verdicts["linear_fwdbwd gpu-large: speedup_vs_eager >= 3.0"] == "MISSING"
    assert verdicts["linear_fwdbwd gpu-large: memory_vs_eager <= 0.08"] == "PASS"
    assert verdicts["kl_fwdbwd gpu-large: of_copy_bandwidth >= 0.75"] == "FAIL"
    assert verdicts["mlp_fwdbwd mid: over_gemm_floor <= 1.3"] == "MISSING"


def test_every_gemm_bound_case_has_a_floor_target_and_every_target_a_case():
    keys = {(c.op, c.name) for c in C.cases("cuda")}
    for op, shape, _, _ in gpu_check.TARGETS + gpu_check.LATENCY_TARGETS:
        assert (op, shape) in keys, (op, shape)
    for op, shape in gpu_check.VARIANT_CASES:
        assert (op, shape) in keys, (op, shape)
    labels = {(op, shape, key) for op, shape, key, _ in gpu_check.TARGETS}
    for op in ("linear_fwd", "linear_fwdbwd", "mlp_fwdbwd"):
        for shape in ("mid", "large-C", "gpu-large", "gpu-large-fp16", "large-C-tf32"):
            assert (op, shape, "over_gemm_floor") in labels


def test_summarize_table_and_chart(tmp_path):
    import json

    import summarize

    rows = []
    for prov, ms, mem in (("eager", 10.0, 100), ("compile", 5.0, 80), ("fasthydra", 4.0, 50)):
        rows.append({"op": "linear_fwdbwd", "shape": "mid", "B": 4, "D": 3, "M": 2, "C": 5, "provider": prov,
                     "median_ms": ms, "rate": 1.0, "rate_unit": "GFLOP/s", "speedup_vs_eager": 10.0 / ms,
                     "over_gemm_floor": ms / 2.0, "peak_memory_bytes": mem * 2**20, "memory_vs_eager": mem / 100,
                     "compile_seconds": 3.0 if prov == "compile" else None})
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": [{"extra_info": r} for r in rows]}))
    table = summarize.markdown(rows)
    assert table.count("\n") == 4 and "| fasthydra | 4.00 |" in table and "| 2.50 |" in table
    png = tmp_path / "chart.png"
    assert summarize.main([str(path), "--plot", str(png)]) == 0
    assert png.stat().st_size > 10_000


def test_summarize_reads_a_gpu_check_record(tmp_path, capsys):
    import json

    import summarize

    record = json.loads((BENCH / "h200-82867bd-gpu_check.json").read_text())
    row = next(r for r in record["rows"] if (r["op"], r["shape"], r["provider"]) ==
               ("linear_fwdbwd", "gpu-large", "fasthydra"))
    failed = {"op": "kl_fwdbwd", "shape": "mid", "dtype": "float32", "provider": "fasthydra/kl-stored",
              "error": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    record["bounds"] = gpu_check.design_bounds(record["rows"], {(c.op, c.name): c for c in C.cases("cuda")},
                                               record["copy_bytes_per_s"])
    record["rows"].append(failed)
    record["host_breakdown"] = {"case": "linear_fwdbwd/gpu-small/float32/cuda", "launch1_us": 123.45}
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(record))
    png = tmp_path / "chart.png"
    assert summarize.main([str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len([ln for ln in lines if ln.startswith("| linear_fwdbwd | gpu-large (")]) == \
        len([r for r in record["rows"] if (r["op"], r["shape"]) == ("linear_fwdbwd", "gpu-large")])
    flops = 6 * row["B"] * row["D"] * row["M"] * row["C"]  # three GEMMs of 2*B*D*M*C each
    line = next(ln for ln in lines if ln.startswith("| linear_fwdbwd | gpu-large (") and "| fasthydra |" in ln)
    assert f"| {row['seconds'] * 1e3:.2f} | {flops / row['seconds'] / 1e12:.1f} TFLOP/s |" in line
    assert f"| {row['over_gemm_floor']:.2f} |" in line
    assert record["commit"] in out and record["torch"] in out
    assert ("host time of the small step's pieces (us per call): case linear_fwdbwd/gpu-small/float32/cuda, "
            "launch1_us 123.5") in lines
    for r in record["latency"]:
        assert f"| {r['op']} | {r['shape']} | {r['provider']} | {r['gpu_us']:.0f} | {r['host_us']:.0f} |" in lines
    for label, verdict, value in record["targets"]:
        assert f"| {label} | {verdict} | {value:.3f} |" in lines
    bound = next(b for b in record["bounds"] if (b["op"], b["shape"]) == ("linear_fwdbwd", "gpu-large"))
    assert f"| linear_fwdbwd | gpu-large | {row['gemm_floor_seconds'] * 1e3:.3f} | 10.49 | " \
           f"{bound['bound_over_floor']:.2f} | {row['over_gemm_floor']:.2f} |" in lines
    assert f"| kl_fwdbwd | mid | fasthydra/kl-stored | {failed['error']} |" in lines
    assert not any(ln.startswith("| kl_fwdbwd | mid (") and "kl-stored" in ln for ln in lines)
    assert png.stat().st_size > 10_000
    neither = tmp_path / "other.json"
    neither.write_text(json.dumps({"cases": []}))
    with pytest.raises(SystemExit, match="neither a pytest-benchmark JSON"):
        summarize.main([str(neither)])


def test_design_bounds_count_the_loss_pass_bytes_at_copy_speed():
    """The least time over the floor of the cuBLAS-logits design: a long row is read twice (fwd+bwd), a short one
    once; the forward reads z and t; the ops on logits have no such bound."""
    by_key = {(c.op, c.name): c for c in C.cases("cuda")}
    copy, floor = 4.0e12, 0.01
    rows = [{"op": op, "shape": shape, "provider": "fasthydra", "seconds": 0.02, "gemm_floor_seconds": floor}
            for op, shape in (("linear_fwdbwd", "gpu-large"), ("linear_fwdbwd", "mid"), ("linear_fwd", "gpu-large"),
                              ("mlp_fwdbwd", "gpu-large"), ("kl_fwdbwd", "gpu-large"))]
    rows.append({**rows[0], "provider": "eager"})
    bounds = {(b["op"], b["shape"]): b for b in gpu_check.design_bounds(rows, by_key, copy)}
    assert set(bounds) == {("linear_fwdbwd", "gpu-large"), ("linear_fwdbwd", "mid"), ("linear_fwd", "gpu-large"),
                           ("mlp_fwdbwd", "gpu-large")}
    large = 4096 * 8 * 32000 * 2  # (B, M, C) bf16
    mid = 1024 * 8 * 1000 * 4  # fp32
    expect = {("linear_fwdbwd", "gpu-large"): 5 * large, ("mlp_fwdbwd", "gpu-large"): 5 * large,
              ("linear_fwdbwd", "mid"): 3 * mid, ("linear_fwd", "gpu-large"): 2 * large}
    for key, nbytes in expect.items():
        assert bounds[key]["loss_pass_bytes"] == nbytes, key
        assert bounds[key]["bound_over_floor"] == pytest.approx(1 + nbytes / copy / floor)
        assert bounds[key]["measured_over_floor"] == pytest.approx(2.0)


def _turns_and_back(variant: str, flag: str, default: bool) -> None:
    """A knob that switches one of fasthydra.ops._common's boolean defaults over for the calls inside."""
    from fasthydra.ops import _common

    assert getattr(_common, flag) is default
    with gpu_check.with_variant(variant):
        assert getattr(_common, flag) is (not default)
    assert getattr(_common, flag) is default


def test_variants_set_their_settings_and_restore_them(monkeypatch):
    monkeypatch.setenv("FASTHYDRA_SMALL_STEP", "auto")
    with gpu_check.with_variant("fasthydra/cublas"):
        assert os.environ["FASTHYDRA_SMALL_STEP"] == "0"
    assert os.environ["FASTHYDRA_SMALL_STEP"] == "auto"
    monkeypatch.delenv("FASTHYDRA_SMALL_STEP")
    with gpu_check.with_variant("fasthydra"):
        assert "FASTHYDRA_SMALL_STEP" not in os.environ
    from fasthydra.ops import _common

    default = _common.SMALL_BLOCK_B
    with gpu_check.with_variant("fasthydra/small-32-rows"):
        assert _common.SMALL_BLOCK_B == 32 and _common.small_heads_config(512, 10, 10, 512, 4)["BLOCK_B"] == 32
    assert _common.SMALL_BLOCK_B == default
    _turns_and_back("fasthydra/small-grads-in-forward", "SMALL_DEFERRED", True)
    # small shapes compare all three heads paths; large ones the two GEMM backends
    assert gpu_check.variants_for("linear_fwdbwd", "gpu-small") == ["fasthydra/cublas", "fasthydra/torch-path"]
    monkeypatch.delenv("FASTHYDRA_IMPL", raising=False)
    with gpu_check.with_variant("fasthydra/torch-path"):
        assert os.environ["FASTHYDRA_IMPL"] == "torch"
    assert "FASTHYDRA_IMPL" not in os.environ
    assert gpu_check.variants_for("linear_fwdbwd", "gpu-large") == [
        "fasthydra/groups-512MiB", "fasthydra/kl-tile-4096", "fasthydra/kl-tile-8192", "fasthydra/kl-l2-hints",
        "fasthydra/bias-split-pass", "fasthydra/groups-512MiB-split", "fasthydra/dx-add"]
    _turns_and_back("fasthydra/bias-split-pass", "SPLIT_BIAS_PASS", False)
    import fasthydra.ops.linear_hydra_kl as lk

    group = lk.CUBLAS_GROUP_ELEMENTS
    with gpu_check.with_variant("fasthydra/groups-512MiB"):
        assert lk.CUBLAS_GROUP_ELEMENTS == 1 << 28 and lk._head_groups(4096, 8, 32000) == (2, 4096)
    assert lk.CUBLAS_GROUP_ELEMENTS == group and lk._head_groups(4096, 8, 32000) == (1, 4096)
    with gpu_check.with_variant("fasthydra/groups-512MiB-split"):
        assert _common.SPLIT_BIAS_PASS and lk._head_groups(4096, 8, 32000) == (2, 4096)
    assert not _common.SPLIT_BIAS_PASS
    assert gpu_check.variants_for("kl_fwdbwd", "gpu-large") == [
        "fasthydra/kl-tile-1024", "fasthydra/kl-tile-4096", "fasthydra/kl-tile-8192", "fasthydra/kl-l2-hints",
        "fasthydra/kl-l2-hints-tile-4096", "fasthydra/kl-l2-hints-tile-8192", "fasthydra/kl-deferred"]
    _turns_and_back("fasthydra/kl-deferred", "DEFER_KL_GRAD", False)
    _turns_and_back("fasthydra/kl-l2-hints", "KL_L2_HINTS", False)
    with gpu_check.with_variant("fasthydra/kl-l2-hints-tile-4096"):
        assert _common.KL_L2_HINTS and _common.kl_rows_config(32000, 2)["BLOCK_C"] == 4096
    assert not _common.KL_L2_HINTS and _common.kl_rows_config(32000, 2)["BLOCK_C"] == 2048
    with gpu_check.with_variant("fasthydra/kl-tile-8192"):
        config = _common.kl_rows_config(32000, 2)
        assert config["BLOCK_C"] == 8192 and config["num_warps"] == 32
    assert _common.kl_rows_config(32000, 2)["BLOCK_C"] == 2048
    assert gpu_check.variants_for("kl_fwdbwd", "mid") == []
    assert gpu_check.variants_for("uncertainty", "gpu-large") == ["fasthydra/unc-tile-16384",
                                                                   "fasthydra/unc-tile-16384-8-warps",
                                                                   "fasthydra/unc-split"]
    assert gpu_check.variants_for("uncertainty", "large-C") == ["fasthydra/unc-split"]
    _turns_and_back("fasthydra/unc-split", "UNCERTAINTY_SPLIT", False)
    with gpu_check.with_variant("fasthydra/unc-tile-16384-8-warps"):
        config = _common.uncertainty_config(8, 32000, 4096)
        assert (config["BLOCK_C"], config["num_warps"]) == (2048, 8)
    assert _common.uncertainty_config(8, 32000, 4096)["num_warps"] == 4
    with gpu_check.with_variant("fasthydra/unc-tile-16384"):
        assert _common.uncertainty_config(8, 32000)["BLOCK_C"] == 2048
    assert _common.uncertainty_config(8, 32000)["BLOCK_C"] == 1024


def test_profiles_run_under_their_knob():
    """A profile case with a knob runs its measurement under the knob's settings, keyed by op, shape and knob."""
    from fasthydra.ops import _common

    seen = []
    knob = "fasthydra/bias-split-pass"
    out = gpu_check._profiles([("mlp_fwdbwd", "gpu-large"), ("mlp_fwdbwd", "gpu-large", knob)],
                              {("mlp_fwdbwd", "gpu-large"): "case"},
                              lambda case: seen.append((case, _common.SPLIT_BIAS_PASS)) or [{"x": 1}], "profile {}",
                              str)
    assert seen == [("case", False), ("case", True)] and not _common.SPLIT_BIAS_PASS
    assert list(out) == ["mlp_fwdbwd gpu-large", f"mlp_fwdbwd gpu-large {knob}"]
    assert ("mlp_fwdbwd", "gpu-large", knob) in gpu_check.PROFILE_CASES


def test_variant_ratios_against_the_default():
    rows = [{"op": "linear_fwdbwd", "shape": "gpu-small", "provider": "fasthydra", "seconds": 2.0,
             "peak_memory_bytes": 100},
            {"op": "linear_fwdbwd", "shape": "gpu-small", "provider": "fasthydra/cublas", "seconds": 3.0,
             "peak_memory_bytes": 150},
            {"op": "linear_fwdbwd", "shape": "gpu-small", "provider": "eager", "seconds": 9.0,
             "peak_memory_bytes": 400},
            {"op": "linear_fwdbwd", "shape": "gpu-large", "provider": "fasthydra/groups-512MiB", "seconds": 1.0,
             "peak_memory_bytes": None}]
    (only,) = gpu_check.variant_ratios(rows)  # eager is no variant; gpu-large has no default row
    assert only["provider"] == "fasthydra/cublas"
    assert only["time_vs_default"] == pytest.approx(1.5) and only["memory_vs_default"] == pytest.approx(1.5)


def _stub_device(monkeypatch):
    """Every device-only measurement of gpu_check.main replaced by a stand-in (CPU cases named as the GPU ones);
    returns the settings each latency row ran under and the ncu calls."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200 (stand-in)")  # (the predictions' model)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(gpu_check, "run_gpu_tests",
                        lambda timeout, workers, log_path: {"returncode": 0, "summary": "1 passed"})
    monkeypatch.setattr(gpu_check, "copy_bandwidth", lambda: 4e12)
    monkeypatch.setattr(gpu_check, "host_facts", lambda device: {"cpu": "stand-in", "cpus": 1, "cuda_empty_us": 9.5})
    monkeypatch.setattr(gpu_check, "host_breakdown", lambda case: {"case": case.key, "launch1_us": 50.0})
    monkeypatch.setattr(gpu_check, "topk_rows", lambda bps: [{"teacher": "dense", "seconds": 1e-3,
                                                              "teacher_bytes": 10, "bytes_moved": 30,
                                                              "of_copy_bandwidth": 0.5}])
    monkeypatch.setattr(gpu_check, "masked_rows", lambda: [{"mask": "none", "seconds": 1e-3, "vs_no_mask": 1.0}])
    seen_settings = []

    def latency(case, provider, masked=False, tensor_t=False, learned_t=False, graphed=False):
        seen_settings.append((provider, os.environ.get("FASTHYDRA_SMALL_STEP")))
        return {"op": case.op, "shape": case.name, "provider": provider,
                "host_us": 120.0 if masked else 110.0 if tensor_t else 130.0 if learned_t else 30.0 if graphed
                else 100.0, "stream_us": 50.0, "gpu_us": None if graphed else 40.0,
                "replay_host_us": None if graphed else 8.0}

    monkeypatch.setattr(gpu_check, "latency", latency)
    monkeypatch.setattr(gpu_check, "PROFILE_CASES", [("linear_fwdbwd", "gpu-small")])
    monkeypatch.setattr(gpu_check, "HOST_PROFILE_CASES", [("linear_fwdbwd", "gpu-small")])
    monkeypatch.setattr(gpu_check, "host_profile", lambda case: [{"function": "f", "own_us_per_step": 5.0,
                                                                  "cum_us_per_step": 9.0, "calls_per_step": 1.0}])
    monkeypatch.setattr(gpu_check, "profile_step", lambda case: [{"kernel": "k", "ms_per_step": 0.5,
                                                                  "calls_per_step": 2.0}])
    monkeypatch.setattr(gpu_check, "_do_bench", lambda fn: 1e-3)
    monkeypatch.setattr(C, "gemm_floor_callable", lambda case: None)
    cpu_cases = [C.Case("linear_fwdbwd", "gpu-small", 64, 32, 3, 10, torch.float32, "cuda"),
                 C.Case("linear_fwdbwd", "small-C", 64, 32, 3, 10, torch.float32, "cuda"),
                 C.Case("mlp_fwdbwd", "gpu-small", 64, 32, 3, 10, torch.float32, "cuda"),
                 C.Case("linear_fwd", "small-C", 64, 32, 3, 10, torch.float32, "cuda"),
                 C.Case("kl_fwdbwd", "gpu-large", 64, 32, 3, 10, torch.bfloat16, "cuda"),
                 C.Case("linear_fwdbwd", "mid", 64, 32, 3, 100, torch.float32, "cuda")]  # (past the small step)
    monkeypatch.setattr(C, "cases", lambda device: cpu_cases)
    monkeypatch.setattr(C, "provider_available", lambda p, d: None if p in ("eager", "fasthydra") else "absent")

    def stand_in_bench_case(case, provider):
        seconds = {"eager": 4e-3, "fasthydra": 1e-3, gpu_check.LEARNED_T: 1.6e-3}[provider] * (
            1.5 if os.environ.get("FASTHYDRA_SMALL_STEP") else 1)
        return {"op": case.op, "shape": case.name, "dtype": str(case.dtype).replace("torch.", ""),
                "provider": provider, "B": case.B, "D": case.D, "M": case.M, "C": case.C, "seconds": seconds,
                "peak_memory_bytes": 2**20, "compile_seconds": None}

    monkeypatch.setattr(gpu_check, "bench_case", stand_in_bench_case)
    ncu_calls = []

    def ncu_profile(cases, timeout, workdir):
        ncu_calls.append((list(cases), timeout, workdir))
        return {"cases": ["linear_fwdbwd small-C"], "seconds": 1.0,
                "kernels": [{"kernel": "_small_heads_kl_kernel", "grid": "(4, 1, 1)", "block": "(128, 1, 1)",
                             "metrics": {"Duration": "31.5 us", "SM Frequency": "1.98 Ghz"}}]}

    monkeypatch.setattr(gpu_check, "ncu_profile", ncu_profile)
    return seen_settings, ncu_calls


def test_a_short_run_times_only_the_cases_named(tmp_path, monkeypatch, capsys):
    """--cases: the gpu tests, then those cases alone (their knobs too), no latency rows, profiles or ncu, no
    torch.compile; a case that does not exist is refused before anything is timed."""
    import json

    _stub_device(monkeypatch)
    out = tmp_path / "gpu.json"
    gpu_check.main(["--out", str(out), "--cases", "kl_fwdbwd:gpu-large"])
    record = json.loads(out.read_text())
    assert {(r["op"], r["shape"]) for r in record["rows"]} == {("kl_fwdbwd", "gpu-large")}
    providers = {r["provider"] for r in record["rows"]}
    assert "fasthydra/kl-deferred" in providers and "compile" not in providers and "eager" in providers
    assert record["latency"] == [] and record["profiles"] == {} and record["ncu"] == {"skipped": "--cases"}
    assert "host_breakdown" not in record
    assert gpu_check.main(["--out", str(out), "--cases", "kl_fwdbwd:nowhere"]) == 2
    assert "kl_fwdbwd:nowhere" in capsys.readouterr().err


def test_main_runs_end_to_end_with_the_device_parts_stubbed(tmp_path, monkeypatch, capsys):
    """The orchestration of a lent-GPU run (latency rows, variants and knobs, the case loop, the
    analysis, the JSON) on this CPU: every device-only measurement is replaced by a stand-in, so a
    slip in the script's own code shows here rather than after minutes of an H200."""
    import json

    seen_settings, ncu_calls = _stub_device(monkeypatch)
    out = tmp_path / "gpu.json"
    code = gpu_check.main(["--out", str(out)])
    record = json.loads(out.read_text())
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 1 and "Traceback" not in captured.err, printed  # 1: a target fails in the stand-in figures
    # the variants ran with their switch set (the default without), and it was undone afterwards
    assert ("fasthydra", "0") in seen_settings and ("fasthydra", None) in seen_settings
    assert "FASTHYDRA_SMALL_STEP" not in os.environ
    providers = {(r["shape"], r["provider"]) for r in record["rows"]}
    assert ("gpu-small", "fasthydra/cublas") in providers and ("small-C", "fasthydra/cublas") in providers
    cublas = next(v for v in record["variants"] if v["provider"] == "fasthydra/cublas")
    assert cublas["time_vs_default"] == pytest.approx(1.5)
    # the learned temperature beside the default at the large cases (of the stand-in cases: the loss on logits)
    (learned,) = [v for v in record["variants"] if v["provider"] == gpu_check.LEARNED_T]
    assert (learned["op"], learned["shape"], learned["time_vs_default"]) == ("kl_fwdbwd", "gpu-large",
                                                                             pytest.approx(1.6))
    # a host-bound mid-size case gets its CUDA-graph row, for fasthydra alone
    masked = {(r["op"], r["shape"]): r["host_us"] for r in record["latency"] if r["provider"] == gpu_check.MASKED}
    assert masked == {("linear_fwdbwd", "gpu-small"): 120.0, ("mlp_fwdbwd", "gpu-small"): 120.0}
    tensor_t = {(r["op"], r["shape"]): r["host_us"] for r in record["latency"] if r["provider"] == gpu_check.TENSOR_T}
    assert tensor_t == {("linear_fwdbwd", "gpu-small"): 110.0, ("mlp_fwdbwd", "gpu-small"): 110.0}
    learned = {(r["op"], r["shape"]): r["host_us"] for r in record["latency"] if r["provider"] == gpu_check.LEARNED_T}
    assert learned == {("linear_fwdbwd", "gpu-small"): 130.0, ("mlp_fwdbwd", "gpu-small"): 130.0}
    # the heads graphed by make_graphed_callables, at every latency target's step, printed without a graph's figures
    graphed = {(r["op"], r["shape"]): r["host_us"] for r in record["latency"] if r["provider"] == gpu_check.GRAPHED}
    assert graphed == {(op, shape): 30.0 for op, shape, _, _ in gpu_check.LATENCY_TARGETS}
    assert re.search(r"fasthydra-graphed-heads +host +30\.0 stream +50\.0 gpu None replay host None", printed)
    assert "replay host 8.0" in printed
    assert {r["provider"] for r in record["latency"] if r["shape"] == "mid"} == {"fasthydra"}
    assert record["profiles"]["linear_fwdbwd gpu-small"][0]["kernel"] == "k"
    assert record["host_profiles"]["linear_fwdbwd gpu-small"][0]["function"] == "f"
    assert record["host"] == {"cpu": "stand-in", "cpus": 1, "cuda_empty_us": 9.5}
    # the small step's host time by pieces, of the case BREAKDOWN_CASE names
    assert record["host_breakdown"] == {"case": "linear_fwdbwd/gpu-small/float32/cuda", "launch1_us": 50.0}
    assert "host time of its pieces (us per call): case linear_fwdbwd/gpu-small/float32/cuda, launch1_us 50.0" \
        in printed
    verdicts = {label: verdict for label, verdict, _ in record["targets"]}
    assert verdicts["linear_fwdbwd gpu-small: gpu_us <= 60.0"] == "PASS"
    assert verdicts["linear_fwdbwd gpu-small: speedup_vs_eager >= 10.0"] == "FAIL"  # 4x in the stand-in
    values = {label: value for label, _, value in record["targets"]}
    moved = 3 * 64 * 3 * 10 * 2  # one read of z and t, one write of dz, bf16
    assert values["kl_fwdbwd gpu-large: of_copy_bandwidth >= 0.75"] == pytest.approx(moved / 1e-3 / 4e12)
    assert "variant linear_fwdbwd" in printed and record["commit"]
    # the default design's bound beside each heads case's measured ratio (floor + loss pass bytes at copy speed)
    # (none where the small step takes the case: its logits never reach memory)
    (bound,) = record["bounds"]
    assert (bound["op"], bound["shape"], bound["loss_pass_bytes"]) == ("linear_fwdbwd", "mid", 3 * 64 * 3 * 100 * 4)
    assert bound["bound_over_floor"] == pytest.approx(1 + 3 * 64 * 3 * 100 * 4 / 4e12 / 1e-3)
    assert "at least x" in printed
    # ncu last, within the deadline, its rows in the record and the log; the clocks sampled per phase
    (cases, timeout, workdir), = ncu_calls
    assert cases == gpu_check.NCU_CASES and 0 < timeout <= 150 and workdir == str(tmp_path)
    assert record["ncu"]["kernels"][0]["metrics"]["Duration"] == "31.5 us"
    assert "_small_heads_kl_kernel" in printed and "SM Frequency 1.98 Ghz" in printed
    assert set(record["clocks"]) == {"latency", "profiles", "cases"}
    assert record["masked"][0]["mask"] == "none" and "row mask none" in printed
    # every prediction held against the run, printed and kept (the stand-in copy: 4000 GB/s, below the range)
    assert [r["id"] for r in record["predictions"]] == [p["id"] for p in P.load()["predictions"]]
    copy = next(r for r in record["predictions"] if r["id"] == "copy bandwidth")
    assert copy["measured"] == pytest.approx(4000.0) and copy["verdict"] == "below"
    assert "predictions (" in printed and "below   copy bandwidth" in printed
    assert "inside  " not in printed and "  missing: " in printed  # the log: only what fell outside, in full


def test_a_run_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    """A run stopped part-way (here an interrupt in the third case, as the lent machine's timeout would stop it)
    leaves on disk the record of every phase and case before it, and the hang watchdog is armed for the run
    only."""
    import json

    _stub_device(monkeypatch)
    watchdog = []
    monkeypatch.setattr(gpu_check.faulthandler, "dump_traceback_later",
                        lambda seconds, exit=False, file=None: watchdog.append((seconds, exit)))
    monkeypatch.setattr(gpu_check.faulthandler, "cancel_dump_traceback_later", lambda: watchdog.append("cancel"))
    measure, started = gpu_check.bench_case, []

    def bench_case(case, provider):
        started.extend([case.key] * (case.key not in started))
        if len(started) == 3:
            raise KeyboardInterrupt
        return measure(case, provider)

    monkeypatch.setattr(gpu_check, "bench_case", bench_case)
    out = tmp_path / "gpu.json"
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--out", str(out), "--hard-deadline-s", "99"])
    assert watchdog == [(99.0, True), "cancel"]
    record = json.loads(out.read_text())
    assert record["phase"] == f"case {started[1]}" and "targets" not in record
    assert {f"{r['op']}/{r['shape']}" for r in record["rows"]} == {k.rsplit("/", 2)[0] for k in started[:2]}
    assert len(record["floors"]) == 2 and record["tests"]["summary"] == "1 passed"
    assert record["latency"] and record["profiles"] and record["copy_bytes_per_s"] == 4e12
    assert not (tmp_path / "gpu.json.part").exists()
    watchdog.clear()
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--out", str(out), "--budget-s", "900"])
    assert watchdog == [(920.0, True), "cancel"]  # by default 20 s past the run's own limits


def test_the_row_mask_rows_time_both_steps(monkeypatch):
    """masked_rows on CPU tensors at a tiny shape (the timer a single call): for the heads and the loss on
    logits (dense and top-k teachers) a step without and one with the mask, each run, the ratio against the
    same op's step without."""
    calls = []

    def bench(fn):
        fn()
        calls.append(1)
        return 1e-3 * len(calls)

    monkeypatch.setattr(gpu_check, "_do_bench", bench)
    rows = gpu_check.masked_rows(b=8, d=4, m=2, c=5, device="cpu")
    assert [r["mask"] for r in rows] == ["none", "75% of rows kept"] * 3 and len(calls) == 6
    assert [r["op"] for r in rows[::2]] == ["linear heads", "loss on logits, dense", "loss on logits, top-32"]
    assert [r["vs_no_mask"] for r in rows] == [1.0, 2.0, 1.0, 4 / 3, 1.0, 6 / 5]


def test_gpu_test_output_is_summarized_whole_and_cut_short():
    out = ("tests/test_gpu.py::test_a[x] PASSED     [ 10%]\n"
           "tests/test_gpu.py::test_b FAILED     [ 20%]\n"
           "tests/test_gpu.py::test_c PASSED     [ 30%]\n")
    cut = gpu_check.summarize_test_output(out, None, "timed out after 200s", 200.0)
    assert cut["passed"] == 2 and cut["failures"] == ["tests/test_gpu.py::test_b"]
    assert "2 passed, 1 failed before the cut" in cut["summary"] and cut["returncode"] is None
    whole = gpu_check.summarize_test_output(out + "FAILED tests/test_gpu.py::test_b - AssertionError\n"
                                            "==== 1 failed, 2 passed in 3.0s ====\n", 1, "==== 1 failed ====", 3.0)
    assert whole["returncode"] == 1 and whole["passed"] == 2 and whole["failures"] == ["tests/test_gpu.py::test_b"]


def test_clock_samples_summarised():
    lines = ["1980, 3201, 512.31, 97", "345, 3201, 80.00, 3", "1755, 3201, [N/A], 60", "garbage", ""]
    s = gpu_check.summarize_clock_samples(lines)
    assert s["samples"] == 3 and s["sm_mhz"] == [345.0, 1755.0, 1980.0] and s["mem_mhz"] == 3201.0
    assert s["power_w"] == [pytest.approx(296.155), 512.31] and s["util_pct"] == 60.0
    assert gpu_check.summarize_clock_samples(["[N/A], [N/A], [N/A], [N/A]"]) is None


def test_ncu_details_grouped_per_launch():
    """ncu's details CSV (a preamble, one row per metric, rule rows without a metric) read back per launch,
    in launch order (IDs compared as numbers: 10 after 2)."""
    head = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
            '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value","Rule Name"')

    def row(i, kernel, grid, section, name, unit, value, rule=""):
        return (f'"{i}","7","python3","h","{kernel}","1","7","(128, 1, 1)","{grid}","0","9.0","{section}",'
                f'"{name}","{unit}","{value}","{rule}"')

    text = "\n".join(["==PROF== Connected to process 7", head,
                      row(10, "_small_heads_grad_kernel", "(1281, 1, 1)", "GPU Speed Of Light Throughput", "Duration",
                          "us", "24.1"),
                      row(2, "_small_heads_kl_kernel", "(256, 4, 1)", "GPU Speed Of Light Throughput", "Duration",
                          "us", "31.5"),
                      row(2, "_small_heads_kl_kernel", "(256, 4, 1)", "GPU Speed Of Light Throughput", "SM Frequency",
                          "Ghz", "1.98"),
                      row(2, "_small_heads_kl_kernel", "(256, 4, 1)", "Launch Statistics", "Registers Per Thread",
                          "register/thread", "1,024"),
                      row(2, "_small_heads_kl_kernel", "(256, 4, 1)", "Occupancy", "", "", "",
                          rule="AchievedOccupancy")])
    kernels = gpu_check.parse_ncu_details(text)
    assert [k["kernel"] for k in kernels] == ["_small_heads_kl_kernel", "_small_heads_grad_kernel"]
    assert kernels[0]["grid"] == "(256, 4, 1)" and kernels[0]["metrics"] == {
        "Duration": "31.5 us", "SM Frequency": "1.98 Ghz", "Registers Per Thread": "1,024 register/thread"}
    assert kernels[1]["metrics"] == {"Duration": "24.1 us"}
    assert gpu_check.parse_ncu_details("==PROF== nothing profiled\n") == []


def test_ncu_profile_runs_ncu_and_reads_its_report(tmp_path, monkeypatch):
    """The plumbing around Nsight Compute with a stand-in `ncu` (a script): clocks left alone, only the
    step between cudaProfilerStart/Stop, our kernels, the cases handed to the child; then the report
    imported as CSV. A failing ncu (as on gVisor) gives an error entry, not an exception."""
    log = tmp_path / "args.txt"
    fake = tmp_path / "ncu"
    fake.write_text(f'''#!{sys.executable}
import sys
args = sys.argv[1:]
if "--import" in args:
    print('"ID","Kernel Name","Block Size","Grid Size","Section Name","Metric Name","Metric Unit","Metric Value"')
    print('"0","_small_heads_kl_kernel","(128, 1, 1)","(4, 1, 1)","SOL","Duration","us","30.0"')
    sys.exit(0)
open({str(log)!r}, "w").write(" ".join(args))
if "FAIL" in open({str(log)!r}).read():
    print("==ERROR== Failed to initialize the profiler"); sys.exit(1)
open(args[args.index("-o") + 1] + ".ncu-rep", "w").write("report")
''')
    fake.chmod(0o755)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: str(fake) if name == "ncu" else None)
    result = gpu_check.ncu_profile([("linear_fwdbwd", "small-C"),
                                    ("mlp_fwdbwd", "gpu-large", "fasthydra/bias-split-pass")], 60, str(tmp_path))
    args = log.read_text()
    assert "--clock-control none" in args and "--profile-from-start off" in args
    assert f"-k {gpu_check.NCU_KERNELS}" in args and "--section SpeedOfLight" in args
    assert args.endswith("--ncu-child linear_fwdbwd:small-C,mlp_fwdbwd:gpu-large:fasthydra/bias-split-pass")
    assert result["cases"] == ["linear_fwdbwd small-C", "mlp_fwdbwd gpu-large fasthydra/bias-split-pass"]
    assert result["kernels"] == [{"kernel": "_small_heads_kl_kernel", "grid": "(4, 1, 1)", "block": "(128, 1, 1)",
                                  "metrics": {"Duration": "30.0 us"}}]
    failed = gpu_check.ncu_profile([("linear_fwdbwd", "FAIL")], 60, str(tmp_path))
    assert "exit 1" in failed["error"] and "Failed to initialize" in failed["error"]
    assert "no time left" in gpu_check.ncu_profile([("linear_fwdbwd", "small-C")], 5, str(tmp_path))["error"]


def test_ncu_child_steps_under_the_knob(monkeypatch):
    """The step ncu profiles runs under its case's knob (the split bias pass on), the other cases without."""
    from types import SimpleNamespace

    from fasthydra.ops import _common

    seen = []
    cases = [SimpleNamespace(op="mlp_fwdbwd", name="gpu-large"), SimpleNamespace(op="linear_fwdbwd", name="small-C")]
    monkeypatch.setattr(gpu_check.C, "cases", lambda device: cases)
    monkeypatch.setattr(gpu_check.C, "make_inputs", lambda case: None)
    monkeypatch.setattr(gpu_check.C, "make_callable",
                        lambda case, provider, inputs: lambda: seen.append((case.op, _common.SPLIT_BIAS_PASS)))
    monkeypatch.setattr(gpu_check, "warm_clocks", lambda: None)
    for name in ("start", "stop"):
        monkeypatch.setattr(torch.cuda.profiler, name, lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    assert gpu_check.ncu_child("mlp_fwdbwd:gpu-large:fasthydra/bias-split-pass,linear_fwdbwd:small-C") == 0
    assert seen == [("mlp_fwdbwd", True)] * 4 + [("linear_fwdbwd", False)] * 4 and not _common.SPLIT_BIAS_PASS


def test_host_facts_on_cpu():
    """The host record: the CPU model and count, and per-call costs of small torch calls (positive, and
    an allocation of 16 elements far below a millisecond on any machine that runs the suite)."""
    facts = gpu_check.host_facts("cpu", calls=200)
    assert facts["cpus"] == os.cpu_count() and isinstance(facts["cpu"], str) and facts["cpu"]
    for key in ("cpu_empty_us", "cpu_add_us"):
        assert 0 < facts[key] < 1000, (key, facts[key])
    assert "cuda_empty_us" not in facts


@pytest.mark.parametrize("op", ["kl_fwdbwd", "linear_fwdbwd"])
def test_the_learned_temperature_provider_learns_it(monkeypatch, op):
    """The benchmarks' learned-T provider: fasthydra's step with the temperature a tensor that requires grad (the
    plain provider's a number), the gradients those of the plain provider's step."""
    import fasthydra.functional as F

    seen = []
    real = F._learned_temperature
    monkeypatch.setattr(F, "_learned_temperature", lambda t: seen.append(real(t)) or seen[-1])
    case = C.Case(op, "tiny", 16, 8, 3, 10, torch.float32, "cpu")
    grads = {}
    for provider in ("fasthydra", C.LEARNED_T):
        torch.manual_seed(0)  # (the head's initial weights)
        inputs = C.make_inputs(case)
        C.make_callable(case, provider, inputs)()
        grads[provider] = inputs.z[0].grad if op == "kl_fwdbwd" else inputs.head.weight.grad
    assert seen[0] is False and True in seen[1:]
    torch.testing.assert_close(grads[C.LEARNED_T], grads["fasthydra"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("op", [op for op in C.OPS if op.endswith("fwdbwd")])
def test_every_benchmark_step_times_one_computation_with_each_provider(op):
    """The eager and fasthydra steps of each benchmark op with a backward form the same gradients (of the student's
    logits for the ops on given logits, of the head's weight for the others): the suite compares like with like."""
    case = C.Case(op, "tiny", 12, 8, 3, 10, torch.float64 if op in C.LOGITS_OPS else torch.float32, "cpu")
    grads = {}
    for provider in ("eager", "fasthydra"):
        torch.manual_seed(0)  # (the head's initial weights)
        inputs = C.make_inputs(case)
        C.make_callable(case, provider, inputs)()
        grads[provider] = inputs.z[0].grad if op in C.LOGITS_OPS else inputs.head.weight.grad
    assert grads["eager"] is not None and grads["eager"].abs().sum() > 0
    torch.testing.assert_close(grads["fasthydra"], grads["eager"], rtol=1e-5, atol=1e-7)


def test_the_acceptance_tests_run_first():
    """The gpu tests the issues name go first, in the order given, parametrisations together; the rest keep their
    collection order; every name given is a test function of the gpu tier (a rename must not drop it silently)."""
    ids = ["tests/test_a.py::test_x[1]", "tests/test_gpu.py::test_late", "tests/test_gpu.py::test_b[2]",
           "tests/test_a.py::test_y", "tests/test_gpu.py::test_a", "tests/test_gpu.py::test_b[1]"]
    assert gpu_check.first_tests_first(ids, first=("test_b", "test_a")) == [
        "tests/test_gpu.py::test_b[2]", "tests/test_gpu.py::test_b[1]", "tests/test_gpu.py::test_a",
        "tests/test_a.py::test_x[1]", "tests/test_gpu.py::test_late", "tests/test_a.py::test_y"]
    source = "".join(f.read_text() for f in pathlib.Path(__file__).parent.glob("test_*.py"))
    for name in gpu_check.FIRST_GPU_TESTS:
        assert f"\ndef {name}(" in source, name


def test_gpu_tier_runs_in_processes_side_by_side_and_is_cut_at_the_timeout(tmp_path):
    """run_gpu_tests on a stand-in tier (real pytest processes): the tests dealt out over two processes (two
    process ids seen), passes, a failure and a setup error counted from both; then a test that outlasts the
    timeout: its process is killed, the run reported cut short (return code None) with what passed before."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    stand: the stand-in tier\n")
    pids = tmp_path / "pids"
    (tmp_path / "test_tier.py").write_text(
        "import os, time, pytest\n"
        f"PIDS = {str(pids)!r}\n"
        "def _seen():\n"
        "    with open(PIDS, 'a') as f:\n"
        "        f.write(f'{os.getpid()}\\n')\n"
        "@pytest.fixture\n"
        "def broken():\n"
        "    raise RuntimeError('setup')\n"
        "@pytest.mark.stand\n"
        "@pytest.mark.parametrize('i', range(4))\n"
        "def test_passes(i):\n"
        "    _seen()\n"
        "@pytest.mark.stand\n"
        "def test_fails():\n"
        "    assert False\n"
        "@pytest.mark.stand\n"
        "def test_errors(broken):\n"
        "    pass\n"
        "@pytest.mark.stand\n"
        "def test_slow():\n"
        "    time.sleep(float(os.environ.get('STAND_SLEEP', '0')))\n"
        "def test_not_in_the_tier():\n"
        "    assert False\n")
    log = tmp_path / "tests.log"
    whole = gpu_check.run_gpu_tests(60.0, workers=2, marker="stand", tests="test_tier.py", root=str(tmp_path),
                                    log_path=str(log))
    assert whole["returncode"] == 1 and whole["passed"] == 5 and whole["failed"] == 2
    # the reasons stay readable after the run (the record holds the names only): both processes' tracebacks
    assert "def test_fails" in log.read_text() and log.read_text().count("short test summary info") == 2
    assert sorted(whole["failures"]) == ["test_tier.py::test_errors", "test_tier.py::test_fails"]
    assert len(whole["processes"]) == 2 and "over 2 processes" in whole["summary"]
    assert len(set(pids.read_text().split())) == 2

    os.environ["STAND_SLEEP"] = "60"
    try:
        cut = gpu_check.run_gpu_tests(20.0, workers=2, marker="stand", tests="test_tier.py", root=str(tmp_path))
    finally:
        del os.environ["STAND_SLEEP"]
    # (test_slow's process runs two passing tests before it; the other may or may not have ended on a busy host)
    assert cut["returncode"] is None and "cut short" in cut["summary"] and cut["seconds"] < 50
    assert cut["passed"] >= 2 and "test_tier.py::test_slow" not in cut["failures"]
    one = gpu_check.run_gpu_tests(60.0, workers=1, marker="stand", tests="test_tier.py", root=str(tmp_path))
    assert one["returncode"] == 1 and one["passed"] == 5 and one["failed"] == 2 and "processes" not in one


# ----------------------------------------------------------------------------------------------
# bench/predictions.json: the figures predicted for the next GPU run, and their comparison with a run
# ----------------------------------------------------------------------------------------------

def _leaves(what):
    for combine in ("ratio", "difference"):
        if combine in what:
            for part in what[combine]:
                yield from _leaves(part)
            return
    yield what


def test_every_prediction_names_a_figure_gpu_check_records(monkeypatch):
    """Each prediction's figure is one gpu_check writes: a row of a case it runs with that provider (a knob only
    at its own cases, compile only where a target names it), a latency row of its latency plan, a row-mask or
    top-k row of the names those functions give, a profile it takes, a host fact it measures. A misspelt
    provider or case would only ever read "missing" on the GPU."""
    import inspect

    data = P.load()
    assert len(data["predictions"]) >= 40 and data["written"] and data["basis"]
    keys = {(c.op, c.name) for c in C.cases("cuda")}
    lat = {(op, shape, p) for op, shape, providers in gpu_check.latency_sets(keys) for p in providers}
    monkeypatch.setattr(gpu_check, "_do_bench", lambda fn: fn() or 1e-3)  # (the real timer wants a GPU)
    masked_names = {(r["op"], r["mask"]) for r in gpu_check.masked_rows(b=8, d=4, m=2, c=5, device="cpu")}
    teachers = {"dense"} | {f"top-{k}" for k in inspect.signature(gpu_check.topk_rows).parameters["ks"].default}
    profiles = {" ".join(case) for case in gpu_check.PROFILE_CASES}
    host = set(gpu_check.host_facts("cpu", calls=10))
    host |= {k.replace("cpu_", "cuda_") for k in host}
    timeline_keys = gpu_check.timeline_row([], steps=1, wall_s=0.0)

    def row_ok(op, shape, provider, variant_only=False):
        if (op, shape) not in keys:
            return False
        if provider in gpu_check.variants_for(op, shape):
            return True
        if provider == gpu_check.LEARNED_T:
            return (op, shape) in gpu_check.LEARNED_T_CASES
        if variant_only:
            return False
        return provider in ("eager", "fasthydra") or (provider == "compile" and (op, shape) in gpu_check.COMPILE_CASES)

    for p in data["predictions"]:
        for leaf in _leaves(p["what"]):
            where, src, key = leaf.get("where", {}), leaf["in"], leaf.get("key")
            if src in ("rows", "variants"):
                assert row_ok(where["op"], where["shape"], where["provider"], src == "variants"), p["id"]
                assert key in (("seconds", "over_gemm_floor", "speedup_vs_eager", "speedup_vs_compile",
                                "of_copy_bandwidth", "memory_vs_eager", "peak_memory_bytes") if src == "rows"
                               else ("time_vs_default", "memory_vs_default")), p["id"]
            elif src == "latency":
                assert (where["op"], where["shape"], where["provider"]) in lat, p["id"]
                assert key in ("gpu_us", "host_us", "stream_us", "replay_host_us"), p["id"]
            elif src == "masked":
                assert (where["op"], where["mask"]) in masked_names and key == "vs_no_mask", p["id"]
            elif src == "topk":
                assert where["teacher"] in teachers and key in ("seconds", "of_copy_bandwidth"), p["id"]
            elif src.startswith("profiles/"):
                timeline = leaf.get("match") == {"kernel": r"^\(timeline\)$"}  # (timeline_row's figures)
                assert src.split("/", 1)[1] in profiles and leaf.get("match"), p["id"]
                assert key == "ms_per_step" or timeline and isinstance(timeline_keys.get(key), float), p["id"]
            elif src == "host":
                assert key in host, p["id"]
            elif src == "host_breakdown":
                assert key in gpu_check.BREAKDOWN_KEYS, p["id"]
            elif src == "tests":
                assert key in ("seconds", "failures", "passed"), p["id"]
            else:
                assert src == "copy_bytes_per_s" and key is None, p["id"]


def test_prediction_verdicts_on_a_stand_in_record():
    """inside / below / above / missing, ratios and differences, sums over matching rows, counts, scales; error
    rows and figures held twice read as missing."""
    record = {
        "rows": [{"op": "a", "shape": "s", "provider": "fasthydra", "seconds": 2e-3},
                 {"op": "a", "shape": "s", "provider": "eager", "seconds": 8e-3},
                 {"op": "b", "shape": "s", "provider": "fasthydra", "error": "boom"},
                 {"op": "c", "shape": "s", "provider": "fasthydra", "seconds": 1.0},
                 {"op": "c", "shape": "s", "provider": "fasthydra", "seconds": 2.0}],
        "profiles": {"a s": [{"kernel": "_k_one", "ms_per_step": 0.5}, {"kernel": "_k_two", "ms_per_step": 0.25},
                             {"kernel": "gemm", "ms_per_step": 4.0}]},
        "tests": {"seconds": 90.0, "failures": ["t1", "t2"]}, "copy_bytes_per_s": 4.2e12}

    def ms(op, provider="fasthydra"):
        return {"in": "rows", "where": {"op": op, "shape": "s", "provider": provider}, "key": "seconds", "scale": 1e3}

    figures = [
        ("fast", ms("a"), 1.5, 2.5, "inside", 2.0),
        ("too slow", ms("a"), 1.0, 1.5, "above", 2.0),
        ("too fast", ms("a"), 2.5, 3.0, "below", 2.0),
        ("error row", ms("b"), 0, 9, "missing", None),
        ("twice", ms("c"), 0, 9, "missing", None),
        ("absent", ms("z"), 0, 9, "missing", None),
        ("x eager", {"ratio": [ms("a", "eager"), ms("a")]}, 3.5, 4.5, "inside", 4.0),
        ("gap", {"difference": [ms("a", "eager"), ms("a")]}, 6.5, 7.0, "below", 6.0),
        ("half missing", {"ratio": [ms("a"), ms("z")]}, 0, 9, "missing", None),
        ("our kernels", {"in": "profiles/a s", "match": {"kernel": "^_k"}, "key": "ms_per_step", "sum": True},
         0.7, 0.8, "inside", 0.75),
        ("failures", {"in": "tests", "key": "failures", "count": True}, 0, 0, "above", 2.0),
        ("copy", {"in": "copy_bytes_per_s", "scale": 1e-9}, 4100, 4400, "inside", 4200.0),
        ("no profile", {"in": "profiles/b s", "match": {"kernel": "x"}, "key": "ms_per_step"}, 0, 9, "missing", None),
    ]
    data = {"predictions": [{"id": i, "what": w, "low": lo, "high": hi, "unit": "u", "why": "-"}
                            for i, w, lo, hi, _, _ in figures]}
    results = P.compare(record, data)
    for (name, _, _, _, verdict, value), r in zip(figures, results):
        assert r["id"] == name and r["verdict"] == verdict, r
        assert r["measured"] == (None if value is None else pytest.approx(value)), r
    text = P.format_comparison(results, data)
    assert text.splitlines()[-1].strip() == "4 inside, 2 below, 2 above, 5 missing"
    assert len(text.splitlines()) == 2 + len(figures)
    brief = P.format_comparison(results, data, brief=True).splitlines()
    assert [line.split()[1] for line in brief[1:5]] == ["too", "too", "gap", "failures"]
    assert brief[5] == "  missing: error row; twice; absent; half missing; no profile" and len(brief) == 7


def test_a_run_on_another_gpu_model_holds_only_its_ratios_against_the_ranges():
    """Predictions written for an H200, a run on an H100 (the other kind the device tool lends): its times and
    rates read "other device" (an H100's copy and GEMMs are slower, so they would all read "above" and hide the
    ratios that did miss), its ratios and counts are judged as on the H200; a run on the same model, whatever
    the rest of its name, is judged in full."""
    assert [P.device_model(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB",
                                        "NVIDIA H200 (torch 2.11, Triton 3.6)", "Some GPU", None)] == \
        ["h100", "h200", "a100", "h200", "some gpu", ""]
    rows = [{"op": "a", "shape": "s", "provider": "fasthydra", "seconds": 2e-3},
            {"op": "a", "shape": "s", "provider": "eager", "seconds": 8e-3}]
    ms = {"in": "rows", "where": {"op": "a", "shape": "s", "provider": "fasthydra"}, "key": "seconds", "scale": 1e3}
    eager = {**ms, "where": {**ms["where"], "provider": "eager"}}
    data = {"device": "NVIDIA H200 (torch 2.11, Triton 3.6)", "predictions": [
        {"id": "time", "what": ms, "low": 1.0, "high": 1.5, "unit": "ms", "why": "-"},
        {"id": "rate", "what": {"in": "copy_bytes_per_s", "scale": 1e-9}, "low": 4100, "high": 4400, "unit": "GB/s",
         "why": "-"},
        {"id": "x eager", "what": {"ratio": [eager, ms]}, "low": 4.5, "high": 5.0, "unit": "x", "why": "-"},
        {"id": "absent", "what": {**ms, "where": {**ms["where"], "op": "z"}}, "low": 0, "high": 9, "unit": "ms",
         "why": "-"}]}
    h100 = {"device": "NVIDIA H100 80GB HBM3", "rows": rows, "copy_bytes_per_s": 3.0e12}
    results = P.compare(h100, data)
    assert [r["verdict"] for r in results] == ["other device", "other device", "below", "missing"]
    assert results[0]["measured"] == pytest.approx(2.0) and results[1]["measured"] == pytest.approx(3000.0)
    text = P.format_comparison(results, data, brief=True, device=h100["device"]).splitlines()
    assert "this run on NVIDIA H100 80GB HBM3" in text[1] and "not held against them" in text[1]
    assert [line.split()[:2] for line in text[2:3]] == [["below", "x"]] and text[3] == "  missing: absent"
    assert text[-1] == "  0 inside, 1 below, 0 above, 1 missing, 2 other device"
    same = P.compare({**h100, "device": "NVIDIA H200"}, data)
    assert [r["verdict"] for r in same] == ["above", "below", "below", "missing"]
    assert P.format_comparison(same, data).splitlines()[-1] == "  0 inside, 2 below, 1 above, 1 missing"
    unnamed = P.compare({"rows": rows, "copy_bytes_per_s": 3.0e12}, data)  # (a record without a device: judged)
    assert [r["verdict"] for r in unnamed] == ["above", "below", "below", "missing"]


def test_predictions_file_errors_name_the_entry(tmp_path):
    good = {"id": "x", "what": {"in": "tests", "key": "seconds"}, "low": 1, "high": 2, "unit": "s", "why": "-"}
    for bad, words in (({**good, "low": 3}, "low 3 above high 2"), ({k: v for k, v in good.items() if k != "why"},
                                                                    "lacks why"),
                       ({**good, "what": {"in": "tests", "keys": "seconds"}}, "unknown keys"),
                       ({**good, "what": {"ratio": [good["what"]]}}, "ratio takes two figures")):
        path = tmp_path / "p.json"
        path.write_text(__import__("json").dumps({"predictions": [bad]}))
        with pytest.raises(ValueError, match=words):
            P.load(str(path))
    path.write_text(__import__("json").dumps({"predictions": [good, good]}))
    with pytest.raises(ValueError, match="ids repeat"):
        P.load(str(path))


def test_predictions_against_the_recorded_h200_run(tmp_path):
    """The command on a real record (the H200's second run, 2026-11-28): the figures that run measured are read
    from it (gpu-large linear heads 24.55 ms, above the range predicted for today's library; its 88 s gpu tier
    without failures inside), those it did not run read as missing; a bad record path exits with 2."""
    import json

    out = tmp_path / "cmp.json"
    proc = subprocess.run([sys.executable, str(BENCH / "predictions.py"), str(BENCH / "h200-82867bd-gpu_check.json"),
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = {r["id"]: r for r in json.loads(out.read_text())}
    big = results["linear fwd+bwd gpu-large bf16"]
    assert big["measured"] == pytest.approx(24.55, abs=0.01) and big["verdict"] == "above"
    assert results["gpu tier: failures"]["verdict"] == "inside"
    assert results["gpu tier: seconds"]["measured"] == pytest.approx(88.3, abs=0.1)
    assert results["knob kl-deferred, loss on logits gpu-large"]["verdict"] == "missing"  # no such knob then
    assert "NVIDIA H200" in proc.stdout and proc.stdout.rstrip().endswith("missing")
    proc = subprocess.run([sys.executable, str(BENCH / "predictions.py"), str(tmp_path / "none.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "none.json" in proc.stderr
    # without a record: the predictions themselves, one line each
    proc = subprocess.run([sys.executable, str(BENCH / "predictions.py")], capture_output=True, text=True,
                          timeout=120)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 1 + len(results)
    assert "linear fwd+bwd gpu-large bf16: 21.8 to 22.6 ms (" in proc.stdout


@pytest.mark.interpret
def test_host_breakdown_times_the_small_steps_pieces_on_cpu():
    """The small step's host time by pieces (host_breakdown), run here on CPU tensors with the kernels under the
    interpreter: both launches of the small step and the two empty kernels ran (their times present and positive),
    autograd's floor too, and bench/host_overhead.py's stubbed mode in a child process timed the same step's Python
    (no error from it). The error word's CUDA queries are absent on the CPU."""
    case = C.Case("linear_fwdbwd", "gpu-small", 32, 16, 2, 10, torch.float32, "cpu")
    out = gpu_check.host_breakdown(case, calls=2, python_steps=2)
    assert out["case"] == case.key and "python_error" not in out, out
    for key in gpu_check.BREAKDOWN_KEYS[:-2]:
        assert 0 < out[key] < 1e7, (key, out[key])
    assert set(out) == {"case", *gpu_check.BREAKDOWN_KEYS[:-2]}  # (the error word's queries: CUDA only)


def test_timeline_row_busy_idle_and_gaps():
    """The profiled steps' timeline: overlapping intervals count once, idle gaps between them are summed and the
    longest named by the kernels around them; a prediction's kernel pattern never picks the row up."""
    spans = [(0.0, 100.0, "_hydra_kl_fwd_kernel"), (50.0, 120.0, "memset"), (120.0, 130.0, "touching"),
             (430.0, 500.0, "nvjet_gemm"), (510.0, 600.0, "_hydra_kl_grad_cols_kernel"),
             (600.0, 650.0, "inside")]
    row = gpu_check.timeline_row(list(reversed(spans)), steps=2, wall_s=1e-3, top=1)
    assert row["kernel"] == "(timeline)" and row["ms_per_step"] == 0.0  # (no kernel time for a sum to count)
    assert row["busy_ms_per_step"] == pytest.approx((130 + 70 + 140) / 1e3 / 2)
    assert row["idle_ms_per_step"] == pytest.approx((300 + 10) / 1e3 / 2) and row["gaps_per_step"] == 1.0
    assert row["longest_gaps"] == [{"ms": pytest.approx(0.3), "after": "touching", "before": "nvjet_gemm"}]
    assert row["wall_ms_per_step"] == pytest.approx(0.5)
    assert "idle 0.155 ms in 1 gaps" in gpu_check._profile_line(row)
    empty = gpu_check.timeline_row([], steps=3, wall_s=0.0)
    assert empty["busy_ms_per_step"] == 0.0 and empty["longest_gaps"] == []
    kernels = [{"kernel": "_hydra_kl_fwd_kernel", "ms_per_step": 1.0, "calls_per_step": 1.0}, row]
    for pattern in ("_hydra_kl", "."):
        what = {"in": "profiles/a s", "match": {"kernel": pattern}, "key": "ms_per_step", "sum": True}
        assert P.value_of({"profiles": {"a s": kernels}}, what) == 1.0


def test_profiled_intervals_from_a_real_profile():
    """The intervals read off torch.profiler's events as the installed torch records them (CPU events here:
    the same fields a CUDA kernel's event has), in the order and nesting they ran."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    a = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("a_user_range"):
            a @ a
        torch.relu(a)
    spans = gpu_check.profiled_intervals(prof, DeviceType.CPU)
    names = [name for _, _, name in spans]
    assert any("mm" in n for n in names) and "aten::relu" in names, names
    if any(hasattr(e, "is_user_annotation") for e in prof.events()):  # (torch versions that mark them)
        assert "a_user_range" not in names and any(e.name == "a_user_range" for e in prof.events())
    assert all(0 <= start <= end for start, end, _ in spans)
    mm = min(start for start, _, n in spans if "mm" in n)
    assert mm < min(start for start, _, n in spans if n == "aten::relu")
    assert gpu_check.profiled_intervals(prof, DeviceType.CUDA) == []
