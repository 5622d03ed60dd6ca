"""cpu tier: every kernel compiles ahead of time for sm_90 (and sm_80) without spills, and the GEMM
kernels use tensor-core instructions. Runs the report in a subprocess without TRITON_INTERPRET
(the interpreter replaces kernels with Python functions)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fasthydra.kernel_report", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    records = json.loads(out.read_text())
    return proc, records


def test_report_covers_every_kernel_and_arch(report):
    _, records = report
    kernels = {r["kernel"] for r in records}
    assert kernels == {"_hydra_kl_fwd_kernel", "_hydra_kl_grad_kernel", "_hydra_kl_grad_cols_kernel", "_hydra_kl_topk_fwd_kernel", "_uncertainty_fwd_kernel",
                       "_gaussian_heads_kl_fwd_kernel", "_small_heads_kl_kernel", "_small_heads_grad_kernel",
                       "_flag_rows_kernel", "_ensemble_log_mean_kernel", "_scale_unless_one_kernel"}
    assert {r["arch"] for r in records} == {80, 90}


def test_every_kernel_compiles_without_spills(report):
    proc, records = report
    failures = [r for r in records if r["error"] or r["spill_bytes"] != 0]
    assert not failures, "\n".join(f"{r['kernel']} sm_{r['arch']} {r['dtype']}: {r['error'] or r['spill_bytes']}"
                                   for r in failures)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_gemm_kernels_use_tensor_cores(report):
    _, records = report
    from fasthydra.kernel_report import GEMM_KERNELS, MMA_SYNC_KERNELS

    gemms = [r for r in records if r["kernel"] in GEMM_KERNELS and r["config"]["PRECISION"] != "ieee"]
    assert gemms
    assert all(r["mma"] for r in gemms)
    # Hopper's warp-group MMA, except where the tiles are below its 64 rows (mma.sync there)
    assert all(r["wgmma"] for r in gemms if r["arch"] == 90 and r["kernel"] not in MMA_SYNC_KERNELS)


def test_report_table_is_printed(report):
    proc, _ = report
    assert "_small_heads_kl_kernel" in proc.stdout and "spill" in proc.stdout.splitlines()[0]
