"""Ahead-of-time kernel report: compile every kernel for sm_80 and sm_90 without a GPU.

    python -m fasthydra.kernel_report [--json FILE] [--arch 80 90 [100 ...]] [--jobs N]

For every kernel, with the block configurations the launchers really pick at the benchmark shapes
(the same config functions of ``fasthydra.ops._common``), this prints registers per thread, spills
(LOCAL/STACK bytes, and how many local loads/stores sit inside a loop in the SASS), barriers inside loops
(an exchange between warps per iteration), shared memory and whether the PTX holds tensor-core instructions
(mma, wgmma; tcgen05 on sm_100). It needs Triton's compiler and the cuobjdump that ships in Triton's wheel,
not a GPU. It must not run under TRITON_INTERPRET=1 (the interpreter replaces the kernels with Python functions).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

from fasthydra.ops import _common as cfgs
from fasthydra.ops._common import cdiv

# The shapes the benchmarks run (B, D, M, C): small C, mid, large C, the big GPU case, the GPU small case.
SHAPES = [(4096, 512, 8, 10), (1024, 512, 8, 1000), (256, 256, 4, 32000), (4096, 2048, 8, 32000),
          (512, 512, 10, 10)]
# Row lengths where the loss kernel's configuration changes (a whole row of up to 16384 classes in
# registers, longer rows in tiles): checked too, at (B, D, M) = (64, 64, 8).
EXTRA_ROW_LENGTHS = [5000, 16000, 50257]
HIDDEN = 256  # hidden width used for the MLP-head GEMM configurations
L2_HINT_ROWS = 4096 * 8  # the loss kernel's rows at gpu-large: where its L2 priorities are compiled (and at C = 50257)
# Where the kernels that take a temperature are also compiled reading it from memory (T_PTR: a tensor
# temperature; bf16 and fp32 with TF32 dots): the big and the small GPU cases, and the longest row kept in
# registers (16-bit rows of 16000 classes, the configuration closest to spilling). Elsewhere only with T folded
# into the scalars.
TENSOR_TEMPERATURE_SHAPES = {(4096, 2048, 8, 32000), (512, 512, 10, 10), (64, 64, 8, 16000)}
# dtype tag -> (Triton pointer type, tl.dot precision): fp32 as torch runs it with
# set_float32_matmul_precision("high") (tf32 tensor cores) and at the default "highest" (IEEE, FMA).
DTYPES = {"bf16": ("bf16", "tf32"), "fp32/tf32": ("fp32", "tf32"), "fp32/ieee": ("fp32", "ieee")}
GEMM_KERNELS = {"_gaussian_heads_kl_fwd_kernel", "_small_heads_kl_kernel", "_small_heads_grad_kernel"}
# GEMM kernels whose tiles are below wgmma's 64 rows (16-row programs, 16-class tiles): mma.sync on sm_90.
MMA_SYNC_KERNELS = {"_small_heads_kl_kernel", "_small_heads_grad_kernel"}


@dataclass
class KernelRecord:
    kernel: str
    arch: int
    dtype: str
    config: dict
    registers: int | None = None
    spill_bytes: int | None = None  # LOCAL + STACK from cuobjdump: above 0 means register spills
    spill_ops: int | None = None  # local loads/stores (LDL/STL) in the SASS
    spill_ops_in_loops: int | None = None  # of them, those inside a loop (the ones that cost time)
    barriers_in_loops: int | None = None  # BAR (a block-wide barrier: an exchange between warps) inside a loop;
    #                                       counted for the row walks of BARRIER_FREE_KERNELS only
    shuffles_in_loops: int | None = None  # SHFL (an exchange between lanes) inside a loop, for the same walks
    shared_bytes: int | None = None
    l2_policies: list | None = None  # the L2 eviction priorities the PTX creates (createpolicy ... L2::evict_*)
    mma: bool = False
    wgmma: bool = False
    error: str | None = None


def _uncertainty_specs(add, b: int, m: int, c: int, ty: str, tag: str) -> None:
    """`uncertainty`'s forward and backward kernels and the Hinton target's over (b, m, c) rows."""
    from fasthydra.kernels.uncertainty import (_ensemble_log_mean_kernel, _head_entropy_kernel, _mixture_kernel,
                                               _uncertainty_bwd_kernel, _uncertainty_fwd_kernel)

    args = {"z_ptr": f"*{ty}", "probs_ptr": f"*{ty}", "total_ptr": f"*{ty}", "aleatoric_ptr": f"*{ty}",
            "epistemic_ptr": f"*{ty}", "M": m, "C": c, "stride_zb": m * c, "stride_zm": c,
            "stride_pb": c, "inv_temp": 1.0}
    for rows in (b, None):  # these rows' warps, and a large batch's (4 warps: spread slices on unaligned rows)
        uc = cfgs.uncertainty_config(m, c, rows)
        add(_uncertainty_fwd_kernel, args, {"BLOCK_M": uc["BLOCK_M"], "BLOCK_C": uc["BLOCK_C"],
                                            "ROW_IN_REGISTERS": uc["ROW_IN_REGISTERS"],
                                            "VEC": min(uc["BLOCK_C"], 4 if ty == "fp32" else 8)},
            {"num_warps": uc["num_warps"]}, tag)
    if not cfgs.uncertainty_config(m, c)["ROW_IN_REGISTERS"]:  # long rows in two launches (UNCERTAINTY_SPLIT):
        #  one (batch, head) row a program, then the mixture over class blocks (one a row, or several: partials)
        sc = cfgs.uncertainty_split_config(m, c, b)
        add(_head_entropy_kernel, {"z_ptr": f"*{ty}", "stats_ptr": "*fp32", "R": b * m, "M": m, "C": c,
                                   "stride_zb": m * c, "stride_zm": c, "inv_temp": 1.0},
            {"BLOCK_R": 1, "BLOCK_C": sc["STATS_BLOCK_C"], "VEC": min(sc["STATS_BLOCK_C"], 4 if ty == "fp32" else 8)},
            {"num_warps": sc["STATS_WARPS"]}, tag)
        for single in (True, False):
            add(_mixture_kernel, {**{name: f"*{ty}" for name in ("z_ptr", "probs_ptr", "total_ptr", "aleatoric_ptr",
                                                                 "epistemic_ptr")},
                                  "stats_ptr": "*fp32", "part_ptr": "*fp32", "count_ptr": "*i32", "M": m, "C": c,
                                  "cols_per_prog": sc["cols_per_prog"], "stride_zb": m * c, "stride_zm": c,
                                  "stride_pb": c, "inv_temp": 1.0},
                {"BLOCK_M": sc["BLOCK_M"], "BLOCK_C": sc["BLOCK_C"], "SINGLE": single,
                 "BLOCK_P": cfgs.reduce_block(max(2, sc["col_blocks"]), sc["num_warps"])},
                {"num_warps": sc["num_warps"]}, tag)
    # its backward: every upstream, or the epistemic part's only
    ug = cfgs.uncertainty_grad_config(m, c, 4 if ty == "fp32" else 2)
    for has_g in (True, False):
        ptrs = {name: f"*{ty}" for name in ("z_ptr", "g_ptr", "gt_ptr", "ga_ptr", "ge_ptr", "dz_ptr")}
        add(_uncertainty_bwd_kernel, {**ptrs, "M": m, "C": c, "stride_zb": m * c, "stride_zm": c,
                                      "stride_gb": c, "stride_gt": 1, "stride_ga": 1,
                                      "stride_ge": 0 if not has_g else 1, "stride_db": m * c,
                                      "stride_dm": c, "inv_temp": 0.5, "scale": 0.1},
            {"HAS_G": has_g, "HAS_T": has_g, "HAS_A": has_g, "HAS_E": True, "BLOCK_M": ug["BLOCK_M"],
             "BLOCK_C": ug["BLOCK_C"], "ROW_IN_REGISTERS": ug["ROW_IN_REGISTERS"], "VEC": ug.get("VEC", 1)},
            {"num_warps": ug["num_warps"]}, tag)
    # the Hinton loss's target (the ensemble's mean in log space), same (M, C) row structure
    uc = cfgs.uncertainty_config(m, c, hinton_target=True, elem_size=4 if ty == "fp32" else 2)
    add(_ensemble_log_mean_kernel, {"t_ptr": f"*{ty}", "out_ptr": "*fp32", "err_ptr": "*i32", "M": m, "C": c,
                                    "stride_tb": m * c, "stride_tm": c, "stride_ob": c, "inv_temp": 0.5,
                                    "temp": 2.0, "log_m": 2.0},
        {"BLOCK_M": uc["BLOCK_M"], "BLOCK_C": uc["BLOCK_C"], "ROW_IN_REGISTERS": uc["ROW_IN_REGISTERS"],
         "VEC": uc.get("VEC", 1)},
        {"num_warps": uc["num_warps"]}, tag)


def _small_grads(add, kernel, cfgs, xs: dict, xty: str, gty: str, b: int, m: int, c: int, k: int, shared: bool,
                 prec: str, tag: str, row_mask: bool = True) -> None:
    """The small-step gradient kernel's configurations for inputs of type xty and a stash of type gty: from the
    backward (times the upstream gradient, outputs in the inputs' type) and in the forward (SMALL_DEFERRED off,
    outputs kept for a later scaling: fp32 for fp16 inputs); with row_mask, also from the backward of a masked
    step (the mask as uint8). Blocks as launch_small_grads picks them."""
    sc = cfgs.small_grads_config(b, m, c, k, 4 if xty == "fp32" else 2, 4 if gty == "fp32" else 2)
    if sc is None:
        return
    outers = sorted({cfgs.small_grads_outer(sc, prec), False})  # dW in outer products (default) and by tl.dot
    for scale_by_up, keep, outer in ((s, kp, o) for s, kp in ((True, False), (False, False),
                                                              (True, True) if row_mask else (True, False))
                                     for o in outers):
        oty = xty if scale_by_up or xty != "fp16" else "fp32"
        add(kernel, {**xs, "w_ptr": f"*{xty}", "g_ptr": f"*{gty}", "dx_ptr": f"*{oty}", "dw_ptr": f"*{oty}",
                     "db_ptr": f"*{oty}", "up_ptr": "*fp32", "keep_ptr": "*u8" if keep else f"*{gty}", "n_w": 80,
                     "n_kblocks_w": 8, "n_x": 300, "n_kblocks": 8},
            {"UPCAST_DOT": False, "PRECISION": prec, "BLOCK_C": sc["BLOCK_C"], "BLOCK_K": sc["BLOCK_K"],
             "SHARED": shared, "NEED_W": True, "NEED_B": True, "SCALE_BY_UP": scale_by_up, "HAS_KEEP": keep,
             "BLOCK_R": sc["BLOCK_R"], "OUTER": outer,
             "BLOCK_RW": cfgs.OUTER_ROWS if outer else sc["BLOCK_RW"], "BLOCK_KW": sc["BLOCK_KW"],
             "BLOCK_J": sc["BLOCK_J"]},
            {"num_warps": sc["num_warps"]}, tag)


def _specialize(fn, args: dict, consts: dict):
    """ASTSource for a launch, specialised the way Triton's runtime specialises it: integer
    arguments equal to 1 become constexprs, and pointers and integers divisible by 16 carry the
    divisibility hint (what lets loads along a unit stride vectorise)."""
    from triton.compiler import ASTSource

    sig, constexprs, attrs = {}, dict(consts), {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
            continue
        value = args[name]
        index = fn.arg_names.index(name)
        if isinstance(value, str):  # a pointer, e.g. "*bf16": torch allocations are 16-byte aligned
            sig[name] = value
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif value == 1:
            sig[name] = "constexpr"
            constexprs[name] = 1
        else:
            sig[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, sig, constexprs, attrs=attrs)


def _kernel_specs():
    """(jit function, runtime args, constexprs, launch options, dtype tag) for every launched configuration
    (each compiled for every architecture: no launcher picks a configuration by device)."""
    from fasthydra.kernels.gaussian_kl import _gaussian_heads_kl_fwd_kernel
    from fasthydra.kernels.checks import _flag_rows_kernel, _flag_topk_kernel
    from fasthydra.ops.checks import BAD_INDEX, REPEATED_INDEX, TOPK_CHECK_KERNEL_MAX_K
    from fasthydra.kernels.small_heads import _small_heads_grad_kernel, _small_heads_kl_kernel
    from fasthydra.kernels.softmax_kl import (_hydra_kl_fwd_kernel, _hydra_kl_grad_cols_kernel, _hydra_kl_grad_kernel,
                                              _hydra_kl_topk_fwd_kernel)
    from fasthydra.kernels.uncertainty import _topk_log_mean_kernel
    from fasthydra.ops.hydra_kl import topk_config

    specs, seen = [], set()
    state = {"tensor_temperature": False}

    def add(fn, args, consts, opts, dtype):
        if "T_PTR" in fn.arg_names and "T_PTR" not in consts:  # a temperature: a number, and maybe a tensor
            add(fn, {**args, "temp_ptr": 1.0}, {**consts, "T_PTR": False}, opts, dtype)
            if state["tensor_temperature"]:
                add(fn, {**args, "temp_ptr": "*fp32"}, {**consts, "T_PTR": True}, opts, dtype)
            return
        if "L2_HINTS" in fn.arg_names and "L2_HINTS" not in consts:  # long rows: with and without the L2 eviction
            #  priorities of _common.KL_L2_HINTS (the PTX createpolicy they add, and the registers), the latter at
            #  the rows the knob is timed on (gpu-large's) and at rows no 16-byte load aligns (spread slices) only:
            #  every long-row configuration took 238 more compiles an architecture, a sixth of the report's CI time
            add(fn, args, {**consts, "L2_HINTS": False}, opts, dtype)
            if not consts["ROW_IN_REGISTERS"] and (args["R"] == L2_HINT_ROWS or args["C"] % 16):
                add(fn, args, {**consts, "L2_HINTS": True}, opts, dtype)
            return
        if "SPREAD" in fn.arg_names and "SPREAD" not in consts:  # long rows' slices as the launchers choose them
            #  (every row stride here is a multiple of C, every pointer aligned)
            consts = {**consts, "SPREAD": cfgs.spread_slices({**consts, **opts}, consts["VEC"], args["C"])}
        ints = {k: v for k, v in args.items() if isinstance(v, int) and not isinstance(v, bool)}
        unit = tuple(sorted(k for k, v in ints.items() if v == 1))
        # what _specialize makes of the integers: 1, and divisible by 16 or not (an odd C does not vectorise)
        aligned = tuple(sorted(k for k, v in ints.items() if v % 16 == 0))
        # fp32 under "highest" and under "high" differ only in the dots' input precision: a kernel without a
        # PRECISION argument compiles the same code for both, so its "fp32/ieee" copy is the "fp32/tf32" one (a
        # fifth of the report's compiles)
        tag = "fp32/tf32" if dtype == "fp32/ieee" and "PRECISION" not in fn.arg_names else dtype
        key = (fn.__name__, tag, tuple(sorted(consts.items())), tuple(sorted(opts.items())), unit, aligned)
        if key not in seen:
            seen.add(key)
            specs.append((fn, args, consts, opts, dtype))

    from fasthydra.kernels.scale import _scale_unless_one_kernel
    from fasthydra.ops.checks import FLAG_BLOCK
    from fasthydra.ops.hydra_kl import SCALE_BLOCK, SCALE_PROGRAMS

    for ty in ("fp32", "bf16"):  # the heads ops' backward on CUDA: dx, dW (gpu-large: 2^29 elements), db
        add(_scale_unless_one_kernel, {"g_ptr": "*fp32", "a_ptr": f"*{ty}", "n_a": 4096 * 2048, "b_ptr": f"*{ty}",
                                       "n_b": 8 * 32000 * 2048, "c_ptr": f"*{ty}", "n_c": 8 * 32000},
            {"BLOCK": SCALE_BLOCK}, {"num_warps": 4}, ty)

    from fasthydra.kernels.reduce import _neg_dots_over_kernel

    for ty, gty, sty in (("fp32", "fp32", "fp32"), ("bf16", "bf16", "fp32"), ("fp16", "fp32", "fp64")):
        # a learned temperature's backward (functional._LearnedT): x and dx, the bias, the teacher (gpu-large)
        n = 4096 * 2048
        add(_neg_dots_over_kernel, {"t_ptr": f"*{sty}", "a_ptr": f"*{gty}", "b_ptr": f"*{ty}", "n_a": n,
                                    "c_ptr": f"*{gty}", "d_ptr": f"*{ty}", "n_c": 8 * 32000,
                                    "e_ptr": f"*{gty}", "f_ptr": f"*{ty}", "n_e": 4096 * 8 * 32000,
                                    "part_ptr": "*fp32", "out_ptr": f"*{sty}", "count_ptr": "*i32"},
            {"BLOCK": SCALE_BLOCK, "BLOCK_P": cfgs.reduce_block(SCALE_PROGRAMS, 4)}, {"num_warps": 4}, ty)
    for ty in ("fp32", "bf16"):  # the torch path's teacher check on CUDA (one value per row)
        add(_flag_rows_kernel, {"v_ptr": f"*{ty}", "n": 4096 * 8, "err_ptr": "*i32"}, {"BLOCK": FLAG_BLOCK},
            {"num_warps": 4}, ty)
        # a top-k teacher's checks on CUDA (ids, and the values where no loss kernel reads them), at the narrowest
        # and widest k that one launch takes, ids int64 and int32
        for k, ity, values_too in ((1, "*i64", True), (32, "*i64", False), (32, "*i32", True),
                                   (TOPK_CHECK_KERNEL_MAX_K, "*i64", True)):
            tc = cfgs.topk_check_config(k)
            add(_flag_topk_kernel, {"v_ptr": f"*{ty}", "i_ptr": ity, "err_ptr": "*i32", "R": 4096 * 8, "M": 8, "K": k,
                                    "C": 32000, "stride_vb": 8 * k, "stride_vm": k, "stride_ib": 8 * k, "stride_im": k},
                {"BAD_INDEX": BAD_INDEX, "REPEATED_INDEX": REPEATED_INDEX, "VALUES": values_too,
                 **{key: v for key, v in tc.items() if key != "num_warps"}}, {"num_warps": tc["num_warps"]}, ty)
    for b, d, m, c in SHAPES + [(64, 64, 8, c) for c in EXTRA_ROW_LENGTHS]:
        for tag, (ty, prec) in DTYPES.items():
            state["tensor_temperature"] = (b, d, m, c) in TENSOR_TEMPERATURE_SHAPES and prec != "ieee"
            args = {"z_ptr": f"*{ty}", "t_ptr": f"*{ty}", "loss_ptr": "*fp32", "grad_ptr": f"*{ty}",
                    "tgrad_ptr": f"*{ty}", "err_ptr": "*i32", "R": b * m, "R_INNER": m, "C": c,
                    "stride_zo": m * c, "stride_zi": c, "stride_to": m * c, "stride_ti": c, "stride_go": m * c,
                    "stride_gi": c, "stride_lo": m, "stride_li": 1, "stride_ho": m * c, "stride_hi": c,
                    "inv_temp": 0.5, "loss_scale": 4.0, "grad_scale": 0.1,
                    "part_ptr": "*fp32", "out_ptr": "*fp32", "count_ptr": "*i32", "out_scale": 0.01,
                    "keep_ptr": "*fp32", "stride_ko": 0, "stride_ki": 0,  # (no row mask: placeholders)
                    "nkept_ptr": "*fp32", "batch_rows": 0.0}
            # (teacher gradient, student bias, gradient written, normalisers written, loss reduced): a frozen
            # teacher and one that requires grad, each with and without a bias (MLP heads' second layer); and
            # hydra_kl_loss's forward that writes the normalisers only (its backward: the grad kernel), or the
            # gradient with a teacher that requires grad, both reducing the loss in their last program; the
            # heads' cuBLAS path reducing in the launch where one launch covers every row: with the gradient
            # or the loss alone, with and without the MLP heads' bias, or the normalisers (split bias pass)
            for tgrad, bias, grad, norms, reduce in ((False, False, True, False, False),
                                                     (True, False, True, False, False),
                                                     (False, True, True, False, False),
                                                     (True, True, True, False, False),
                                                     (False, False, False, True, True),
                                                     (True, False, True, False, True),
                                                     (False, False, True, False, True),
                                                     (False, True, True, False, True),
                                                     (False, False, False, False, True),
                                                     (False, True, False, False, True),
                                                     (False, True, False, True, True)):
                kl = cfgs.kl_rows_config(c, 4 if ty == "fp32" else 2, tgrad or bias)
                if reduce and not cfgs.kl_rows_reduces_in_launch(kl, grad):
                    continue  # the launcher reduces with torch there
                # a row mask on the heads' cuBLAS path (the gradient written, a teacher frozen or trainable): a
                # shared input's (rows, heads) layout, the MLP heads' (heads, rows) one with their bias; "mean"
                # over the kept rows (their count read by the kernel; "sum" compiles a subset of that code);
                # and the split bias pass's first launch (the normalisers; rows too long for registers)
                masks = [False] + ([True] if grad or (norms and not kl["ROW_IN_REGISTERS"]) else [])
                for keep in masks:
                    keep_args = {} if not keep else {"keep_ptr": "*u8", "stride_ko": 0 if bias else 1,
                                                     "stride_ki": 1 if bias else 0, "nkept_ptr": "*i64",
                                                     "batch_rows": float(b)}
                    add(_hydra_kl_fwd_kernel, {**args, "bias_ptr": f"*{ty}", "stride_bo": c, "stride_bi": 0,
                                               "norm_ptr": "*fp32", **keep_args},
                        {"BLOCK_R": kl["BLOCK_R"], "BLOCK_C": kl["BLOCK_C"], "WRITE_GRAD": grad, "WRITE_TGRAD": tgrad,
                         "ROW_IN_REGISTERS": kl["ROW_IN_REGISTERS"], "HAS_BIAS": bias,
                         "VEC": min(kl["BLOCK_C"], 4 if ty == "fp32" else 8), "WRITE_NORMS": norms, "REDUCE": reduce,
                         "HAS_KEEP": keep, "MEAN_KEPT": keep,
                         "BLOCK_P": cfgs.reduce_block(cdiv(b * m, kl["BLOCK_R"]), kl["num_warps"])},
                        {"num_warps": kl["num_warps"]}, tag)
            if ty == "bf16":  # hydra_kl_loss on fp16 logits with a teacher that requires grad: both gradients
                #             written in fp32 (stored_grad_dtype), for the backward to scale
                for reduce in (True, False):
                    kl = cfgs.kl_rows_config(c, 2, True)
                    if reduce and not cfgs.kl_rows_reduces_in_launch(kl, True):
                        continue
                    add(_hydra_kl_fwd_kernel, {**args, "z_ptr": "*fp16", "t_ptr": "*fp16", "grad_ptr": "*fp32",
                                               "tgrad_ptr": "*fp32", "bias_ptr": "*fp16", "stride_bo": c,
                                               "stride_bi": 0, "norm_ptr": "*fp32"},
                        {"BLOCK_R": kl["BLOCK_R"], "BLOCK_C": kl["BLOCK_C"], "WRITE_GRAD": True, "WRITE_TGRAD": True,
                         "ROW_IN_REGISTERS": kl["ROW_IN_REGISTERS"], "HAS_BIAS": False, "VEC": min(kl["BLOCK_C"], 8),
                         "WRITE_NORMS": False, "REDUCE": reduce, "HAS_KEEP": False, "MEAN_KEPT": False,
                         "BLOCK_P": cfgs.reduce_block(cdiv(b * m, kl["BLOCK_R"]), kl["num_warps"])},
                        {"num_warps": kl["num_warps"]}, "fp16")
            gk = cfgs.kl_grad_config(b * m, c)
            for keep in (False, True):  # a batch row mask (B,) read over (B, M) rows: strides (1, 0)
                add(_hydra_kl_grad_kernel,
                    {"z_ptr": f"*{ty}", "t_ptr": f"*{ty}", "norm_ptr": "*fp32", "up_ptr": "*fp32",
                     "grad_ptr": f"*{ty}", "keep_ptr": "*u8" if keep else "*fp32",
                     "nkept_ptr": "*i64" if keep else "*fp32", "R": b * m, "R_INNER": m, "C": c,
                     "cols_per_prog": gk["cols_per_prog"], "stride_zo": m * c, "stride_zi": c, "stride_to": m * c,
                     "stride_ti": c, "stride_uo": 0, "stride_ui": 0, "stride_go": m * c, "stride_gi": c,
                     "stride_ko": 1 if keep else 0, "stride_ki": 0, "inv_temp": 0.5, "grad_scale": 0.1,
                     "batch_rows": float(b) if keep else 0.0},
                    {"BLOCK_R": gk["BLOCK_R"], "BLOCK_C": gk["BLOCK_C"], "HAS_KEEP": keep, "MEAN_KEPT": keep},
                    {"num_warps": gk["num_warps"]}, tag)
            # heads with a bias, rows too long for registers: dz and its column sums over a head-major
            # (M, B, C) view of (B, M, C) logits (linear heads) or over per-head logits with the bias added
            # on the loads (MLP heads); each with a row mask and "mean" over the kept rows too
            cc = cfgs.kl_grad_cols_config(m, b, c)
            for (bias, (so, si)), keep in itertools.product(((False, (c, m * c)), (True, (b * c, c))), (False, True)):
                if cfgs.kl_rows_config(c, 4 if ty == "fp32" else 2, bias)["ROW_IN_REGISTERS"]:
                    continue
                add(_hydra_kl_grad_cols_kernel,
                    {"z_ptr": f"*{ty}", "t_ptr": f"*{ty}", "bias_ptr": f"*{ty}", "norm_ptr": "*fp32",
                     "grad_ptr": f"*{ty}", "part_ptr": "*fp32", "keep_ptr": "*u8" if keep else "*fp32",
                     "nkept_ptr": "*i64" if keep else "*fp32", "I": b, "C": c, "n_groups": cc["n_groups"],
                     "rows_per_prog": cc["rows_per_prog"], "stride_zo": so, "stride_zi": si, "stride_to": c,
                     "stride_ti": m * c, "stride_bo": c, "stride_go": so, "stride_gi": si,
                     "inv_temp": 0.5, "grad_scale": 0.1, "batch_rows": float(b) if keep else 0.0},
                    {"BLOCK_R": cc["BLOCK_R"], "BLOCK_C": cc["BLOCK_C"], "HAS_BIAS": bias, "HAS_KEEP": keep,
                     "MEAN_KEPT": keep},
                    {"num_warps": cc["num_warps"]}, tag)
            if (b, d, m, c) not in SHAPES:  # an extra row length: the row kernels only, and `uncertainty`'s
                #                           where its long rows are not 16-byte aligned (spread slices)
                if c % 16:
                    _uncertainty_specs(add, b, m, c, ty, tag)
                continue
            # top-k teachers: the sizes a cache keeps, or the whole row where it is shorter (C = 10: 16 rows a
            # program, the tiles 3-D, where a row mask's select once failed to compile on the GPU alone)
            for k in sorted({min(kk, c) for kk in (32, 128)}):
                tk = topk_config(c, k)
                targs = {"z_ptr": f"*{ty}", "v_ptr": f"*{ty}", "idx_ptr": "*i32", "loss_ptr": "*fp32",
                         "grad_ptr": f"*{ty}", "vgrad_ptr": f"*{ty}", "err_ptr": "*i32", "R": b * m, "R_INNER": m,
                         "C": c, "K": k, "stride_zo": m * c, "stride_zi": c, "stride_vo": m * k, "stride_vi": k,
                         "stride_xo": m * k, "stride_xi": k, "stride_go": m * c, "stride_gi": c, "stride_lo": m,
                         "stride_li": 1, "stride_ho": m * k, "stride_hi": k, "keep_ptr": "*fp32", "stride_ko": 0,
                         "stride_ki": 0, "nkept_ptr": "*fp32", "part_ptr": "*fp32", "out_ptr": "*fp32",
                         "count_ptr": "*i32", "inv_temp": 0.5, "loss_scale": 4.0, "grad_scale": 0.1,
                         "out_scale": 0.01, "batch_rows": 0.0}
                # (and hydra_kl_loss on fp16 logits: its gradients written in fp32, for the backward to scale; and
                # a row mask on the heads' cuBLAS path: a shared input's (rows, heads) layout, per-head inputs'
                # (heads, rows) one; the loss summed by the last program, or left in rows (head groups))
                vtags = (tag, "fp16") if ty == "bf16" else (tag,)
                for tgrad, vtag, keep, reduce in itertools.product((False, True), vtags, (None, (1, 0), (0, 1)),
                                                                   (True, False)):
                    if keep is not None and vtag != tag or not reduce and (keep is not None or vtag != tag):
                        continue
                    wide = {"z_ptr": "*fp16", "v_ptr": "*fp16", "grad_ptr": "*fp32", "vgrad_ptr": "*fp32"}
                    keep_args = {} if keep is None else {"keep_ptr": "*u8", "stride_ko": keep[0], "stride_ki": keep[1],
                                                         "nkept_ptr": "*i64", "batch_rows": float(b)}
                    add(_hydra_kl_topk_fwd_kernel, {**targs, **(wide if vtag == "fp16" else {}), **keep_args},
                        {"BLOCK_R": tk["BLOCK_R"], "BLOCK_C": tk["BLOCK_C"], "BLOCK_K": tk["BLOCK_K"],
                         "WRITE_GRAD": True, "WRITE_TGRAD": tgrad, "VEC": min(tk["BLOCK_C"], 4 if ty == "fp32" else 8),
                         "HAS_KEEP": keep is not None, "MEAN_KEPT": keep is not None, "REDUCE": reduce,
                         "BLOCK_P": cfgs.reduce_block(cdiv(b * m, tk["BLOCK_R"]), tk["num_warps"])},
                        {"num_warps": tk["num_warps"]}, vtag)
                # the Hinton loss's target from a top-k teacher of several members (ids as torch.topk gives
                # them, int64, and as a cache may keep them, int32)
                for ity in ("*i64", "*i32"):
                    tt = cfgs.topk_target_config(k, c)
                    add(_topk_log_mean_kernel, {"v_ptr": f"*{ty}", "i_ptr": ity, "out_ptr": "*fp32",
                                                "err_ptr": "*i32", "M": m, "K": k, "C": c, "stride_vb": m * k,
                                                "stride_vm": k, "stride_ib": m * k, "stride_im": k, "stride_ob": c,
                                                "inv_temp": 0.5, "temp": 2.0, "log_m": 2.0},
                        {key: v for key, v in tt.items() if key != "num_warps"}, {"num_warps": tt["num_warps"]}, tag)

            # Small problems: the two-launch small-step kernels (linear heads and MLP heads' second layer), and
            # the Gaussian heads' kernel with its second launch. fp16 inputs (beside bf16) keep their stash of
            # dL/dz in fp32 (stored_grad_dtype), which launch 2 reads with fp32's blocks; its outputs are fp16
            # from the backward (times the upstream gradient), fp32 in the forward (kept for a later scaling).
            for xty, gty, vtag in ((ty, ty, tag),) + ((("fp16", "fp32", "fp16"),) if ty == "bf16" else ()):
                for k, shared in ((d, True), (HIDDEN, False)):
                    sc = cfgs.small_heads_config(b, m, c, k, 4 if xty == "fp32" else 2)
                    if sc is None:
                        continue
                    xs = {"x_ptr": f"*{xty}", "B": b, "M": m, "C": c, "K": k, "stride_xb": k if shared else m * k,
                          "stride_xm": 0 if shared else k}
                    dots = {"UPCAST_DOT": False, "PRECISION": prec, "BLOCK_C": sc["BLOCK_C"], "BLOCK_K": sc["BLOCK_K"]}
                    # the loss reduced by the last program, or loss rows; a row mask (uint8) with the reduced loss;
                    # the teacher's gradient too (a teacher that requires grad, a learned T), with and without a mask
                    # fp32 IEEE products as outer products (the default where they fit) and by tl.dot (knob)
                    outers = sorted({cfgs.small_outer_fma(sc, prec), False})
                    flags = ((True, False, False), (False, False, False), (True, True, False), (True, False, True),
                             (True, True, True))
                    for reduce, keep, tgrad, outer in ((r, kp, tg, o) for r, kp, tg in flags for o in outers):
                        add(_small_heads_kl_kernel, {**xs, "w_ptr": f"*{xty}", "bias_ptr": f"*{xty}",
                                                     "t_ptr": f"*{xty}", "loss_ptr": "*fp32", "part_ptr": "*fp32",
                                                     "g_ptr": f"*{gty}", "h_ptr": f"*{gty}" if tgrad else "*fp32",
                                                     "err_ptr": "*i32", "out_ptr": "*fp32",
                                                     "count_ptr": "*i32", "keep_ptr": "*u8" if keep else "*fp32",
                                                     "nkept_ptr": "*i64" if keep else "*fp32",
                                                     "heads_per_program": sc["HEADS"],
                                                     "stride_wm": c * k, "stride_wc": k, "stride_biasm": c,
                                                     "stride_tb": m * c, "stride_tm": c, "inv_temp": 0.5,
                                                     "loss_scale": 4.0, "grad_scale": 0.1, "out_scale": 0.01},
                            {**dots, "HAS_BIAS": True, "WRITE_GRAD": True, "WRITE_TGRAD": tgrad, "REDUCE": reduce,
                             "HAS_KEEP": keep, "MEAN_KEPT": keep, "OUTER": outer,
                             "BLOCK_B": sc["BLOCK_B"],
                             "BLOCK_P": cfgs.reduce_block(cdiv(b, sc["BLOCK_B"]) * cdiv(m, sc["HEADS"]),
                                                          sc["num_warps"])},
                            {"num_warps": sc["num_warps"]}, vtag)
                    _small_grads(add, _small_heads_grad_kernel, cfgs, xs, xty, gty, b, m, c, k, shared, prec, vtag)

                from fasthydra.ops.gaussian_kl import gaussian_config

                for k_out in (1, 8):  # Gaussian regression heads: K outputs (padded to 16 in the tile)
                    gc = gaussian_config(k_out, d, 4 if xty == "fp32" else 2)
                    args = {"x_ptr": f"*{xty}", "w_ptr": f"*{xty}", "bias_ptr": f"*{xty}", "tmean_ptr": f"*{xty}",
                            "tvar_ptr": f"*{xty}", "loss_ptr": "*fp32", "part_ptr": "*fp32", "g_ptr": f"*{gty}",
                            "err_ptr": "*i32", "out_ptr": "*fp32", "count_ptr": "*i32", "B": b, "K": k_out, "D": d,
                            "stride_xb": d, "min_var": 1e-6, "grad_scale": 0.1}
                    consts = {"HAS_BIAS": True, "WRITE_GRAD": True, "UPCAST_DOT": False, "PRECISION": prec,
                              "BLOCK_B": gc["BLOCK_B"], "BLOCK_K": gc["BLOCK_K"], "BLOCK_D": gc["BLOCK_D"],
                              "BLOCK_P": cfgs.reduce_block(cdiv(b, gc["BLOCK_B"]) * m, gc["num_warps"])}
                    add(_gaussian_heads_kl_fwd_kernel, args, consts, {"num_warps": gc["num_warps"]}, vtag)
                    # its second launch: the small-step gradient kernel at C = 2K (while the batch allows)
                    _small_grads(add, _small_heads_grad_kernel, cfgs, {"x_ptr": f"*{xty}", "B": b, "M": m,
                                                                       "C": 2 * k_out, "K": d, "stride_xb": d,
                                                                       "stride_xm": 0},
                                 xty, gty, b, m, 2 * k_out, d, True, prec, vtag, row_mask=False)

            _uncertainty_specs(add, b, m, c, ty, tag)
    return specs


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _cuobjdump_of(cubin: bytes, flag: str) -> str:
    """What Triton's cuobjdump prints for a cubin with `flag` (--dump-resource-usage, -sass)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([_cuobjdump(), flag, path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def _resource_usage(cubin: bytes) -> dict:
    out = _cuobjdump_of(cubin, "--dump-resource-usage")
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


# A stack slot saved once at entry and read back once after the main loop (ptxas does this with a
# predicate mask or a pointer under some Triton versions) costs one store and one load per thread: such
# spills up to this size are reported, not failed. Any local load or store inside a loop fails.
ENTRY_SLOT_BYTES = 16
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH = re.compile(r"\bBRA(?:\.[A-Z.]+)?\s+(0x[0-9a-f]+)")
_LOCAL_OP = re.compile(r"\b(?:LDL|STL)\b")
_BARRIER = re.compile(r"\bBAR\.")
_SHUFFLE = re.compile(r"\bSHFL\.")


def _ops_and_loops(sass: str, op: re.Pattern) -> tuple[list[int], list[tuple[int, int]]]:
    """The addresses of the instructions matching op in a ``cuobjdump -sass`` listing, and its loops: a loop is
    the address range from a backward branch's target to the branch."""
    ops, loops = [], []
    for addr, text in _SASS_LINE.findall(sass):
        at = int(addr, 16)
        if op.search(text):
            ops.append(at)
        branch = _BRANCH.search(text)
        if branch and int(branch.group(1), 16) <= at:
            loops.append((int(branch.group(1), 16), at))
    return ops, loops


def sass_ops_in_loops(sass: str, op: re.Pattern) -> int:
    """How many instructions matching op sit inside a loop."""
    ops, loops = _ops_and_loops(sass, op)
    return sum(any(lo <= at <= hi for lo, hi in loops) for at in ops)


def sass_spill_ops(sass: str) -> tuple[int, int]:
    """(local loads and stores, of them inside a loop) in a ``cuobjdump -sass`` listing."""
    ops, _ = _ops_and_loops(sass, _LOCAL_OP)
    return len(ops), sass_ops_in_loops(sass, _LOCAL_OP)


def compile_one(fn, args, consts, opts, dtype, arch) -> KernelRecord:
    import triton
    from triton.backends.compiler import GPUTarget

    rec = KernelRecord(fn.__name__, arch, dtype, {**consts, **opts})
    try:
        src = _specialize(fn, args, consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        usage = _resource_usage(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        rec.registers = usage.get("REG")
        rec.spill_bytes = usage.get("LOCAL", 0) + usage.get("STACK", 0)
        # the SASS (about 0.3 s a disassembly) where it is read: spills, and the loops of a row walk
        walk = fn.__name__ in BARRIER_FREE_KERNELS and not consts.get("ROW_IN_REGISTERS", False)
        sass = _cuobjdump_of(compiled.asm["cubin"], "-sass") if rec.spill_bytes or walk else ""
        rec.spill_ops, rec.spill_ops_in_loops = sass_spill_ops(sass)
        rec.barriers_in_loops = sass_ops_in_loops(sass, _BARRIER) if walk else None
        rec.shuffles_in_loops = sass_ops_in_loops(sass, _SHUFFLE) if walk else None
        rec.shared_bytes = max(usage.get("SHARED", 0), int(compiled.metadata.shared))
        rec.wgmma = "wgmma" in ptx
        rec.l2_policies = sorted(set(re.findall(r"createpolicy\S*\.L2::(evict_\w+)", ptx)))
        # tensor-core instructions: mma.sync (sm_80 on), wgmma (sm_90), tcgen05.mma (sm_100)
        rec.mma = bool(re.search(r"\bmma\.sync|\btcgen05\.mma", ptx)) or rec.wgmma
    except Exception as exc:  # a kernel that does not compile is a finding, reported per row
        rec.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return rec


_WORKER_SPECS = None


def _compile_in_worker(job: tuple[int, int]) -> KernelRecord:
    """Compile spec number i for one architecture in a worker process (a JITFunction does not pickle:
    each worker builds the spec list once and the parent sends indices)."""
    global _WORKER_SPECS
    if _WORKER_SPECS is None:
        _WORKER_SPECS = _kernel_specs()
    return _compile_spec(_WORKER_SPECS, job)


def _compile_spec(specs: list, job: tuple[int, int]) -> KernelRecord:
    fn, args, consts, opts, dtype = specs[job[0]]
    return compile_one(fn, args, consts, opts, dtype, job[1])


def default_jobs() -> int:
    """Worker processes: one per CPU this process may run on (each compile is single-threaded: Triton's
    passes, then ptxas and cuobjdump as child processes), at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


def build_report(archs=(80, 90), progress: bool = True, jobs: int | None = None) -> list[KernelRecord]:
    """Every configuration compiled for every architecture in archs, in spec order. The compiles are
    independent, so they run in `jobs` processes (default: one per CPU); on a cold Triton cache the
    report is compile-bound (about 900 compiles for sm_80 and sm_90)."""
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the kernel report compiles real kernels: unset TRITON_INTERPRET")
    specs = _kernel_specs()
    work = [(i, arch) for i in range(len(specs)) for arch in archs]

    import contextlib
    import functools
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with contextlib.ExitStack() as stack:
        if jobs == 1:
            results = map(functools.partial(_compile_spec, specs), work)
        else:  # spawn, not fork: the parent has imported torch (thread pools) and Triton
            pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")))
            results = pool.map(_compile_in_worker, work, chunksize=4)
        records = []
        for k, ((i, arch), rec) in enumerate(zip(work, results)):
            if progress:
                print(f"[{k + 1}/{len(work)}] sm_{arch} {specs[i][0].__name__} {specs[i][4]}", file=sys.stderr,
                      flush=True)
            records.append(rec)
    return records


def _short_config(cfg: dict) -> str:
    keep = [k for k in cfg if k.startswith("BLOCK") or k in ("num_warps", "num_stages", "ACCUMULATE", "RELU")
            or (k in ("T_PTR", "SPREAD", "OUTER") and cfg[k])]
    names = {"num_warps": "w", "num_stages": "s", "ACCUMULATE": "acc", "RELU": "relu", "T_PTR": "T_ptr"}
    return " ".join(f"{names.get(k, k.replace('BLOCK_', ''))}={cfg[k]}" for k in keep)


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def format_table(records: list[KernelRecord]) -> str:
    head = (f"{'kernel':30} {'arch':6} {'dtype':9} {'config':44} {'regs':>4} {'spill':>5} {'loop':>4} {'bar':>3} "
            f"{'shfl':>4} {'smem':>6} mma wgmma")
    lines = [head, "-" * len(head)]
    for r in records:
        if r.error:
            lines.append(f"{r.kernel:30} sm_{r.arch:<3} {r.dtype:9} {_short_config(r.config):44} FAILED: {r.error}")
            continue
        lines.append(f"{r.kernel:30} sm_{r.arch:<3} {r.dtype:9} {_short_config(r.config):44} {r.registers:>4} "
                     f"{r.spill_bytes:>5} {r.spill_ops_in_loops:>4} {_or_dash(r.barriers_in_loops):>3} "
                     f"{_or_dash(r.shuffles_in_loops):>4} {r.shared_bytes:>6} {'yes' if r.mma else 'no':3} "
                     f"{'yes' if r.wgmma else 'no'}")
    return "\n".join(lines)


# Architectures whose configurations are tuned and held to the spill and tensor-core rules; on any other one
# asked for (--arch 100: Blackwell) a kernel must compile, and its spills are printed, not failed.
TUNED_ARCHS = (80, 90)


def _spills(r: KernelRecord) -> bool:
    """More than ENTRY_SLOT_BYTES of local memory, or any local load or store inside a loop."""
    return (r.spill_bytes or 0) > ENTRY_SLOT_BYTES or (r.spill_ops_in_loops or 0) > 0


# Streaming row kernels whose loops must exchange nothing between warps: a barrier inside a row walk's loop
# means a (heads or rows, classes) tile whose reductions cross warps on every tile, which took 5x to 13x the
# time of the per-thread form on the H200 (`uncertainty`'s forward in 32 warps; its backward and the Hinton
# target until the fifty-first session, and the loss kernel's teacher-gradient walk: bench/RESULTS.md). Exempt:
# `uncertainty`'s forward in more than 8 warps (few rows: the measured winner there) and the GEMM kernels (tl.dot
# stages its operands through shared memory). A tile of 16-bit values (8 a thread) stored as fp32 (4 a thread) is
# one layout conversion, a pair of barriers, per stored tile: the Hinton target's kernel from 16-bit members, and the
# loss kernel's teacher-gradient walk on fp16 logits (both gradients kept in fp32) may hold those.
BARRIER_FREE_KERNELS = {"_hydra_kl_fwd_kernel", "_hydra_kl_grad_kernel", "_hydra_kl_grad_cols_kernel",
                        "_uncertainty_fwd_kernel", "_uncertainty_bwd_kernel", "_ensemble_log_mean_kernel",
                        "_head_entropy_kernel", "_mixture_kernel"}


def _barriers_allowed(r: KernelRecord) -> int | None:
    """Barriers a kernel's loops may hold (None: not checked)."""
    if r.kernel not in BARRIER_FREE_KERNELS:
        return None
    if r.kernel == "_uncertainty_fwd_kernel" and r.config.get("num_warps", 4) > 8:
        return None
    if r.kernel == "_ensemble_log_mean_kernel" and r.dtype in ("bf16", "fp16"):
        return 2
    return 4 if r.kernel == "_hydra_kl_fwd_kernel" and r.dtype == "fp16" and r.config.get("WRITE_TGRAD") else 0


def problems(records: list[KernelRecord]) -> list[str]:
    """What fails the report: a compile error (any architecture); on TUNED_ARCHS also spills (any inside a
    loop, or more than ENTRY_SLOT_BYTES), a GEMM kernel without tensor-core instructions (IEEE fp32 is
    exempt: it runs on FMA units by definition) or a barrier inside a loop of a BARRIER_FREE_KERNELS row walk."""
    out = []
    for r in records:
        where = f"{r.kernel} sm_{r.arch} {r.dtype} {_short_config(r.config)}"
        if r.error:
            out.append(f"{where}: does not compile: {r.error}")
        elif r.arch not in TUNED_ARCHS:
            continue
        elif _spills(r):
            out.append(f"{where}: spills {r.spill_bytes} bytes, {r.spill_ops_in_loops} local loads/stores in loops")
        elif r.kernel in GEMM_KERNELS and r.config.get("PRECISION") != "ieee" and not r.mma:
            out.append(f"{where}: no mma/wgmma instructions")
        elif _barriers_allowed(r) is not None and (r.barriers_in_loops or 0) > _barriers_allowed(r):
            out.append(f"{where}: {r.barriers_in_loops} barriers inside loops (tiles reduced across warps)")
    return out


def main(argv=None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="also write the records as JSON")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    parser.add_argument("--jobs", type=int, default=None,
                        help="compiler processes (default: one per CPU, at most 16)")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    records = build_report(tuple(args.arch), jobs=args.jobs)
    print(format_table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in records], f, indent=1)
    bad = problems(records)
    for line in bad:
        print("PROBLEM:", line)
    for r in records:
        if r.arch not in TUNED_ARCHS and not r.error and _spills(r):
            print(f"note: {r.kernel} sm_{r.arch} {r.dtype} {_short_config(r.config)}: spills {r.spill_bytes} bytes, "
                  f"{r.spill_ops_in_loops} local loads/stores in loops (untuned architecture: not a failure)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
