"""Grouped head GEMMs on the GPU path (torch's GEMMs: cuBLAS): over strided 3-D views, the forward and
backward of the heads' logits (linear heads, and both layers of MLP heads); the autograd wiring is
the custom op ``fasthydra::grouped_linear`` in library.py.

Inputs are either shared by all heads, x of shape (B, K), so that all heads are one GEMM over the
stacked (M*N, K) weight, or per head, u of shape (B, M, K), so that head m multiplies u[:, m] by
W[m]: one batched GEMM over the heads.
"""

from __future__ import annotations

import torch



def mm_into(a, b, out, bias=None, relu: bool = False):
    """out = act(a @ b + bias) for 2-D views a (M, K), b (K, N) and a contiguous out (M, N), bias (N,) or None,
    with torch's GEMMs (cuBLAS on a GPU): bias + ReLU in cuBLASLt's epilogue, a bias alone in addmm's."""
    if out.numel() == 0:
        return out
    if a.shape[1] == 0:  # empty contraction: the product is zero
        out.zero_()
        if bias is not None:
            out += bias
        if relu:
            out.clamp_(min=0)
        return out
    if bias is not None and relu:
        return torch._addmm_activation(bias, a, b, out=out)
    if bias is not None:
        torch.addmm(bias, a, b, out=out)
    else:
        torch.mm(a, b, out=out)
    if relu:
        out.clamp_(min=0)
    return out


def grouped_mm(a3, b3, out3, bias2=None, relu: bool = False):
    """out3[g] = act(a3[g] @ b3[g] + bias2[g]) for strided views a3 (G, M, K), b3 (G, K, N), out3 (G, M, N),
    with torch's GEMMs (cuBLAS on a GPU, fp32 accumulation inside for 16-bit operands). One group with a
    contiguous output is ``mm_into``; several, one batched GEMM."""
    if out3.numel() == 0:
        return out3
    if out3.shape[0] == 1 and out3[0].is_contiguous():
        mm_into(a3[0], b3[0], out3[0], None if bias2 is None else bias2[0], relu)
        return out3
    if a3.shape[2] == 0:  # empty contraction: the product is zero
        out3.zero_()
        if bias2 is not None:
            out3 += bias2[:, None, :]
    else:
        out3.copy_(torch.bmm(a3, b3) if bias2 is None else torch.baddbmm(bias2.unsqueeze(1), a3, b3))
    if relu:
        out3.clamp_(min=0)
    return out3


def heads_backward(grad_out, inp, weight, shared: bool, need_input: bool, need_weight: bool):
    """Input and weight gradients of the heads' GEMM, from the logits gradient grad_out (B, M, N), in
    the input's and the weight's dtype. Returns (grad_input or None, grad_weight or None)."""
    b = grad_out.shape[0]
    m, n, k = weight.shape
    grad_in = None
    if need_input:
        if shared:  # (2-D views straight to the GEMM: fewer view calls than the 3-D form)
            grad_in = torch.empty(b, k, dtype=inp.dtype, device=inp.device)
            mm_into(grad_out.reshape(b, m * n), weight.reshape(m * n, k), grad_in)
        else:
            grad_in = torch.empty(b, m, k, dtype=inp.dtype, device=inp.device)
            grouped_mm(grad_out.permute(1, 0, 2), weight, grad_in.permute(1, 0, 2))
    grad_w = None
    if need_weight:
        grad_w = weight.new_empty(weight.shape)  # contiguous whatever weight's layout (viewed as (M*N, K) below)
        if shared:
            mm_into(grad_out.reshape(b, m * n).t(), inp, grad_w.view(m * n, k))
        else:
            grouped_mm(grad_out.permute(1, 2, 0), inp.permute(1, 0, 2), grad_w)
    return grad_in, grad_w


def grouped_linear_forward(inp, weight, bias, shared: bool, relu: bool):
    """Logits (or hidden activations) of M heads: out[:, m] = act(inp_m @ W[m]^T + bias[m]).

    Shapes: inp (B, K) when shared else (B, M, K); weight (M, N, K); bias (M, N) or None;
    returns (B, M, N). act is relu when relu=True, else the identity.
    """
    m, n, k = weight.shape
    b = inp.shape[0]
    inp = inp.contiguous()
    out = torch.empty(b, m, n, dtype=inp.dtype, device=inp.device)
    if shared:  # one GEMM over the stacked (M*N, K) weight, in 2-D views
        mm_into(inp, weight.reshape(m * n, k).t(), out.view(b, m * n), None if bias is None else bias.reshape(m * n),
                relu)
        return out
    # per head: M groups, (B, K) of the input against W[m]^T (K, N)
    grouped_mm(inp.permute(1, 0, 2), weight.transpose(1, 2), out.permute(1, 0, 2), bias, relu=relu)
    return out


def grouped_linear_backward(grad_out, inp, weight, relu_out, shared: bool, need_in: bool, need_w: bool,
                            need_b: bool):
    """Gradients of ``grouped_linear_forward`` (relu_out: its output when relu was applied, else None).
    Returns (grad_in, grad_weight, grad_bias in fp32), None where not asked for."""
    inp = inp.contiguous()
    if relu_out is not None:  # ReLU's backward in one kernel: 0 where the output is <= 0
        grad_out = torch.ops.aten.threshold_backward(grad_out, relu_out, 0.0)
    grad_in, grad_w = heads_backward(grad_out, inp, weight, shared, need_in, need_w)
    grad_b = grad_out.sum(0, dtype=torch.float32) if need_b else None
    return grad_in, grad_w, grad_b


def grouped_linear_backward_graph(grad_out, inp, weight, relu_out, shared: bool, need_in: bool, need_w: bool,
                                  need_b: bool):
    """``grouped_linear_backward`` from differentiable torch ops, for a backward that records a graph
    (create_graph=True: a gradient penalty, a Hessian-vector product) or that runs over a batch of upstream
    gradients (is_grads_batched=True): the GEMMs above write into preallocated outputs (``out=``), which autograd
    cannot differentiate and vmap cannot batch. relu_out is detached: ReLU's mask
    is piecewise constant. Returns (grad_in, grad_weight, grad_bias in the weight's dtype), None where not
    asked for."""
    if relu_out is not None:
        grad_out = torch.ops.aten.threshold_backward(grad_out, relu_out.detach(), 0.0)
    b = grad_out.shape[0]
    m, n, k = weight.shape
    grad_in = grad_w = grad_b = None
    if shared:  # inp (B, K); all heads one (M*N, K) weight
        g2 = grad_out.reshape(b, m * n)
        if need_in:
            grad_in = g2 @ weight.reshape(m * n, k)
        if need_w:
            grad_w = (g2.t() @ inp).view(m, n, k)
    else:  # inp (B, M, K): head m's input against W[m], batched over the heads (matmul: also under vmap)
        if need_in:
            grad_in = torch.matmul(grad_out.transpose(0, 1), weight).transpose(0, 1)
        if need_w:
            grad_w = torch.matmul(grad_out.permute(1, 2, 0), inp.transpose(0, 1))
    if need_b:
        grad_b = grad_out.sum(0, dtype=torch.float32).to(weight.dtype)
    return grad_in, grad_w, grad_b
