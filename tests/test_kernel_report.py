"""cpu tier: every kernel compiles ahead of time for sm_90 (and sm_80) without spills, and the GEMM
kernels use tensor-core instructions. Runs the report in a subprocess without TRITON_INTERPRET
(the interpreter replaces kernels with Python functions)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.cpu, pytest.mark.kernels]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fasthydra.kernel_report", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1800)
    records = json.loads(out.read_text())
    return proc, records


def test_report_covers_every_kernel_and_arch(report):
    _, records = report
    kernels = {r["kernel"] for r in records}
    assert kernels == {"_hydra_kl_fwd_kernel", "_hydra_kl_grad_kernel", "_hydra_kl_grad_cols_kernel",
                       "_hydra_kl_topk_fwd_kernel", "_uncertainty_fwd_kernel", "_uncertainty_bwd_kernel",
                       "_gaussian_heads_kl_fwd_kernel", "_small_heads_kl_kernel", "_small_heads_grad_kernel",
                       "_flag_rows_kernel", "_ensemble_log_mean_kernel", "_scale_unless_one_kernel",
                       "_neg_dots_over_kernel", "_head_entropy_kernel", "_mixture_kernel", "_topk_log_mean_kernel",
                       "_flag_topk_kernel"}
    assert {r["arch"] for r in records} == {80, 90}


def test_every_kernel_compiles_without_spills_in_loops(report):
    from fasthydra.kernel_report import ENTRY_SLOT_BYTES

    proc, records = report
    failures = [r for r in records
                if r["error"] or r["spill_bytes"] > ENTRY_SLOT_BYTES or r["spill_ops_in_loops"] != 0]
    assert not failures, "\n".join(f"{r['kernel']} sm_{r['arch']} {r['dtype']}: {r['error'] or r['spill_bytes']}"
                                   for r in failures)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


# cuobjdump -sass lines as Triton 3.6 writes them for a kernel that saves a predicate mask at entry
# (STL) and reads it back after its loop (LDL), with a second, inner loop
_SASS = """
        /*0130*/                   P2R R2, PR, RZ, 0x40 ;                       /* 0x000fe40000000000 */
        /*0160*/                   STL [R1], R2 ;                               /* 0x0003e20000100800 */
        /*0d10*/                   FADD R8, R27, R8 ;                           /* 0x000fe20000000000 */
        /*0d20*/                   LDG.E R9, desc[UR4][R2.64] ;                 /* 0x000ea2000c1e1900 */
        /*0e00*/               @P3 BRA 0xd20 ;                                  /* 0x000fec000383ffff */
        /*35e0*/               @P4 BRA 0xd10 ;                                  /* 0x000fec000383ffff */
        /*35f0*/                   LDL.LU R20, [R1] ;                           /* 0x002ea20000300800 */
        /*3600*/                   BRA 0x3700 ;                                 /* 0x000fec000383ffff */
        /*3700*/                   EXIT ;                                       /* 0x000fea0003800000 */
        /*3710*/                   BRA 0x3710;                                  /* 0x000fc0000383ffff */
"""


@pytest.mark.parametrize("line, in_loop", [("", 0), ("        /*0d30*/      STL [R1+0x4], R3 ;\n", 1),
                                           ("        /*3000*/      LDL R3, [R1+0x4] ;\n", 1),
                                           ("        /*3650*/      STL.64 [R1+0x8], R4 ;\n", 0)])
def test_sass_spill_ops_tell_loop_traffic_from_an_entry_slot(line, in_loop):
    from fasthydra.kernel_report import sass_spill_ops

    lines = _SASS.splitlines(keepends=True)
    at = next(i for i, text in enumerate(lines) if text.strip() and int(text.split("*")[1], 16) > int(
        line.split("*")[1], 16)) if line else 0
    sass = "".join(lines[:at] + [line] + lines[at:])
    assert sass_spill_ops(sass) == (2 + bool(line), in_loop)


def test_sass_ops_in_loops_count_barriers_inside_loops_only():
    """A barrier (an exchange between warps) counts where it sits between a backward branch's target and the
    branch: the two inside the listing's loops, not the one after them."""
    import re

    from fasthydra.kernel_report import sass_ops_in_loops

    bar = "BAR.SYNC.DEFER_BLOCKING 0x0 ;"
    lines = _SASS.splitlines(keepends=True)
    lines.insert(4, f"        /*0d28*/                   {bar}\n")  # in the inner loop (0xd20 to 0xe00)
    lines.insert(6, f"        /*0e10*/                   {bar}\n")  # in the outer one (0xd10 to 0x35e0)
    lines.insert(9, f"        /*35f8*/                   {bar}\n")  # after both
    assert sass_ops_in_loops("".join(lines), re.compile(r"\bBAR\.")) == 2


def test_barriers_in_a_row_walk_fail_the_report():
    """A streaming row kernel with a barrier inside a loop (its tiles reduced across warps, as `uncertainty`'s
    backward and the Hinton target were: 8 and 18 a tile, 9x and 14x their bytes' time on the H200) fails the
    report, as does the loss kernel's teacher-gradient walk with the 16 barriers a tile it held until the
    fifty-first session; a GEMM kernel's barriers (tl.dot's staging), `uncertainty`'s forward in 32 warps (few
    rows) and the Hinton target's one layout conversion a tile (two barriers, for its fp32 store from 16-bit
    members) do not."""
    from fasthydra.kernel_report import KernelRecord, problems

    def rec(kernel, config, bars, arch=90):
        return KernelRecord(kernel, arch, "bf16", config, registers=64, spill_bytes=0, spill_ops=0,
                            spill_ops_in_loops=0, barriers_in_loops=bars, shared_bytes=0, mma=True)

    bad = [rec("_uncertainty_bwd_kernel", {"num_warps": 8}, 8),
           rec("_ensemble_log_mean_kernel", {"num_warps": 32}, 18),
           rec("_hydra_kl_fwd_kernel", {"WRITE_TGRAD": False, "num_warps": 8}, 2),
           rec("_hydra_kl_fwd_kernel", {"WRITE_TGRAD": True, "num_warps": 8}, 16),
           rec("_uncertainty_fwd_kernel", {"num_warps": 4}, 1),
           rec("_ensemble_log_mean_kernel", {"num_warps": 4}, 4)]
    fine = [rec("_uncertainty_bwd_kernel", {"num_warps": 4}, 0),
            rec("_small_heads_kl_kernel", {"PRECISION": "tf32"}, 22),
            rec("_uncertainty_fwd_kernel", {"num_warps": 32}, 10), rec("_uncertainty_bwd_kernel", {}, 8, arch=100),
            rec("_ensemble_log_mean_kernel", {"num_warps": 4}, 2)]
    found = problems(bad + fine)
    assert len(found) == len(bad) and all("barriers inside loops" in line for line in found), found


def test_long_row_walks_keep_their_tiles_inside_warps(report):
    """What the rule above holds the real kernels to, at the configurations the launchers pick: `uncertainty`'s
    backward and the Hinton target's kernel walk long rows (C = 32000, 4 and 8 heads) without a barrier in a loop,
    and so does the loss kernel, with a frozen teacher and with one that requires grad."""
    _, records = report
    walks = [r for r in records if r["kernel"] in ("_uncertainty_bwd_kernel", "_ensemble_log_mean_kernel")
             and not r["config"]["ROW_IN_REGISTERS"]]
    assert len({r["kernel"] for r in walks}) == 2
    # (the target's fp32 store from 16-bit members: one layout conversion a tile, two barriers, no reduction)
    assert all(r["barriers_in_loops"] <= (2 if r["kernel"] == "_ensemble_log_mean_kernel" and r["dtype"] != "fp32/tf32"
                                          and r["dtype"] != "fp32/ieee" else 0) for r in walks), \
        [(r["kernel"], r["dtype"], r["config"], r["barriers_in_loops"]) for r in walks]
    walks = [r for r in records if r["kernel"] == "_hydra_kl_fwd_kernel" and not r["config"]["ROW_IN_REGISTERS"]]
    assert any(r["config"]["WRITE_TGRAD"] for r in walks) and not all(r["config"]["WRITE_TGRAD"] for r in walks)
    # (fp16 logits with a teacher that requires grad: both gradients stored as fp32, a layout conversion each)
    assert all(r["barriers_in_loops"] <= (4 if r["dtype"] == "fp16" and r["config"]["WRITE_TGRAD"] else 0)
               for r in walks), [(r["dtype"], r["config"]) for r in walks if r["barriers_in_loops"]]


def test_long_row_walks_exchange_nothing_between_lanes(report):
    """The loss kernel's long-row walks and the Hinton target's, and `uncertainty`'s forward in up to 8 warps, hold
    no shuffle inside a loop: rows of 50257 and 5000 classes (not 16-byte aligned) among them, in spread slices
    (ops/_common.spread_slices). In the contiguous slices those rows loaded one class a lane and summed each
    thread's classes by shuffles: 120 a tile in the loss kernel's first pass on sm_90, 576 in the target's."""
    _, records = report
    walks = [r for r in records if r["kernel"] in ("_hydra_kl_fwd_kernel", "_ensemble_log_mean_kernel",
                                                   "_uncertainty_fwd_kernel")
             and not r["config"]["ROW_IN_REGISTERS"] and r["config"]["num_warps"] <= 8]
    spread = {r["kernel"] for r in walks if r["config"]["SPREAD"]}
    assert spread == {"_hydra_kl_fwd_kernel", "_ensemble_log_mean_kernel", "_uncertainty_fwd_kernel"}, spread
    assert all(r["shuffles_in_loops"] == 0 for r in walks), \
        [(r["kernel"], r["arch"], r["dtype"], r["config"], r["shuffles_in_loops"]) for r in walks
         if r["shuffles_in_loops"]]


def test_l2_hints_reach_the_ptx(report):
    """_common.KL_L2_HINTS's priorities (the loss kernel's L2_HINTS) as the PTX sets them, on every long-row
    configuration compiled with them: evict_last for the walks read again and evict_first for the last one where
    the launch walks a row twice (a gradient written), evict_first alone where it walks once; and no policy at
    all without them, nor in any other kernel (a Triton that dropped the hints, or one that set them unasked)."""
    _, records = report
    hinted = [r for r in records if r["config"].get("L2_HINTS")]
    assert hinted and {r["kernel"] for r in hinted} == {"_hydra_kl_fwd_kernel"}
    assert any(r["config"]["WRITE_GRAD"] for r in hinted) and not all(r["config"]["WRITE_GRAD"] for r in hinted)
    for r in hinted:
        twice = r["config"]["WRITE_GRAD"] or r["config"]["WRITE_TGRAD"]
        assert r["l2_policies"] == (["evict_first", "evict_last"] if twice else ["evict_first"]), \
            (r["arch"], r["dtype"], r["config"], r["l2_policies"])
    plain = [r for r in records if not r["config"].get("L2_HINTS") and r["error"] is None]
    assert all(r["l2_policies"] == [] for r in plain), \
        [(r["kernel"], r["config"], r["l2_policies"]) for r in plain if r["l2_policies"]]


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


def test_untuned_architectures_must_compile_but_may_spill():
    """--arch 100 (Blackwell, untuned): a compile error fails the report there as anywhere, spills and the
    tensor-core rule do not; on sm_80/sm_90 they do. (Triton 3.6 once failed to compile the Gaussian heads
    kernel for sm_100, which this keeps failing CI.)"""
    from fasthydra.kernel_report import KernelRecord, problems

    def rec(arch, **kw):
        base = dict(registers=64, spill_bytes=0, spill_ops=0, spill_ops_in_loops=0, shared_bytes=0, mma=True)
        return KernelRecord("_small_heads_kl_kernel", arch, "bf16", {"PRECISION": "tf32"}, **{**base, **kw})

    spill = dict(spill_bytes=24, spill_ops=4, spill_ops_in_loops=2)
    assert problems([rec(100, **spill), rec(100, mma=False)]) == []
    assert len(problems([rec(90, **spill), rec(80, mma=False)])) == 2
    assert len(problems([rec(100, error="RuntimeError: PassManager::run failed")])) == 1


def test_records_come_back_in_spec_order(report):
    """The compiles run in worker processes (one per CPU): the records still come in the order of the specs,
    each architecture after the other, as one process would write them."""
    from fasthydra.kernel_report import _kernel_specs

    _, records = report
    expected = [(fn.__name__, arch, dtype, {**consts, **opts}) for fn, _, consts, opts, dtype in _kernel_specs()
                for arch in (80, 90)]
    assert [(r["kernel"], r["arch"], r["dtype"], r["config"]) for r in records] == expected


@pytest.mark.parametrize("jobs", [0, -2])
def test_report_refuses_fewer_than_one_job(jobs):
    from fasthydra.kernel_report import build_report

    with pytest.raises(ValueError, match="jobs"):
        build_report(jobs=jobs)
