"""Device code: the chain rule for gradients a fused op computed in its forward.

The heads ops (linear, MLP and Gaussian heads fused with their loss) form their input, weight and bias
gradients in the forward pass, so the backward has only to multiply them by the upstream gradient g of
the loss. Mostly g is exactly 1 (``loss.backward()``, or a sum of losses), which the host cannot see
without a synchronisation: this kernel reads g on the device and leaves the tensors untouched when it
is 1 (one load per program), else multiplies them in place, in fp32 (fp64 for fp64 tensors).
"""

import triton
import triton.language as tl


@triton.jit
def _scale_range(x_ptr, n, g, pid, n_progs, BLOCK: tl.constexpr):
    """x[:n] *= g, program pid of n_progs walking BLOCK-element blocks with a grid stride."""
    for start in range(pid * BLOCK, n, n_progs * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        if x_ptr.dtype.element_ty == tl.float64:
            y = x * g.to(tl.float64)
        else:
            y = x.to(tl.float32) * g.to(tl.float32)
        tl.store(x_ptr + offs, y.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_unless_one_kernel(
    g_ptr,  # the upstream gradient: one value
    a_ptr,  # up to three contiguous tensors scaled in place (n_* = 0: not there)
    n_a,
    b_ptr,
    n_b,
    c_ptr,
    n_c,
    BLOCK: tl.constexpr,
):
    g = tl.load(g_ptr)
    if g != 1.0:  # a NaN g scales too (NaN != 1): the gradients carry it, as the chain rule says
        pid = tl.program_id(0)
        n_progs = tl.num_programs(0)
        _scale_range(a_ptr, n_a, g, pid, n_progs, BLOCK)
        _scale_range(b_ptr, n_b, g, pid, n_progs, BLOCK)
        _scale_range(c_ptr, n_c, g, pid, n_progs, BLOCK)
