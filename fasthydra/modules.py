"""nn.Modules: they hold the parameters and call the functional API."""

from __future__ import annotations

import math

import torch
from torch import nn

from fasthydra import functional as F_h
from fasthydra.reference import TopKTeacher


def _init_heads_(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """nn.Linear's default initialisation, applied to each head on its own (fan-in = last dim)."""
    for m in range(weight.shape[0]):
        nn.init.kaiming_uniform_(weight[m], a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[2]
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)


class HydraHead(nn.Module):
    """M light heads over a shared body output, trained to imitate M ensemble members.

    Linear heads: ``z[:, m] = x @ weight[m].T + bias[m]``; all heads are one GEMM over the stacked
    (M*C, D) weight. MLP heads (``hidden_features=H``): ``z[:, m] = relu(x @ hidden_weight[m].T +
    hidden_bias[m]) @ weight[m].T + bias[m]``, the first layer one GEMM, the second a grouped GEMM.

    Args:
        in_features: D, width of the body's output.
        num_classes: C.
        num_heads: M.
        hidden_features: H for two-layer heads, None for linear heads.
        bias: learn biases.
        impl: "auto" | "triton" | "torch" (see :func:`fasthydra.functional.resolve_impl`).
    Shapes: x (*, D) -> logits (*, M, C). Parameters: weight (M, C, D or H), bias (M, C),
        hidden_weight (M, H, D), hidden_bias (M, H).

    Example:
        >>> head = HydraHead(64, 10, num_heads=8)
        >>> loss = head.distill_loss(torch.randn(32, 64), torch.randn(32, 8, 10), temperature=2.0)
    """

    def __init__(self, in_features: int, num_classes: int, num_heads: int, hidden_features: int | None = None,
                 bias: bool = True, impl: str = "auto", device=None, dtype=None):
        super().__init__()
        in_features = F_h._check_int("in_features", in_features, 1)
        num_classes = F_h._check_int("num_classes", num_classes, 1)
        num_heads = F_h._check_int("num_heads", num_heads, 1)
        if hidden_features is not None:
            hidden_features = F_h._check_int("hidden_features", hidden_features, 1)
        if impl not in F_h.IMPLS:
            raise ValueError(f"impl must be one of {F_h.IMPLS}, got {impl!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.hidden_features = hidden_features
        self.impl = impl
        if hidden_features is not None:
            self.hidden_weight = nn.Parameter(torch.empty(num_heads, hidden_features, in_features, **factory))
            if bias:
                self.hidden_bias = nn.Parameter(torch.empty(num_heads, hidden_features, **factory))
            else:
                self.register_parameter("hidden_bias", None)
        last_in = in_features if hidden_features is None else hidden_features
        self.weight = nn.Parameter(torch.empty(num_heads, num_classes, last_in, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_heads, num_classes, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def _new_like(self, num_heads: int) -> "HydraHead":
        ref = self.weight
        return HydraHead(self.in_features, self.num_classes, num_heads, self.hidden_features,
                         bias=self.bias is not None, impl=self.impl, device=ref.device, dtype=ref.dtype)

    @property
    def is_mlp(self) -> bool:
        return self.hidden_features is not None

    def reset_parameters(self) -> None:
        if self.is_mlp:
            _init_heads_(self.hidden_weight, self.hidden_bias)
        _init_heads_(self.weight, self.bias)

    def extra_repr(self) -> str:
        hidden = f", hidden_features={self.hidden_features}" if self.is_mlp else ""
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, num_heads={self.num_heads}"
                f"{hidden}, bias={self.bias is not None}, impl={self.impl!r}")

    def _flatten_input(self, x: torch.Tensor) -> torch.Tensor:
        F_h._check_tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (*, {self.in_features}), got {tuple(x.shape)}")
        return x if x.dim() == 2 else x.reshape(-1, self.in_features)  # (a no-op reshape still costs a view)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (*, D) -> logits (*, M, C)."""
        x2 = self._flatten_input(x)  # (checked first: a nested x has no shape to read)
        lead = x.shape[:-1]
        if self.is_mlp:
            u = F_h.mlp_hidden(x2, self.hidden_weight, self.hidden_bias, impl=self.impl)
            z = F_h.grouped_heads(u, self.weight, self.bias, impl=self.impl)
        else:
            z = F_h.linear_heads(x2, self.weight, self.bias, impl=self.impl)
        return z.reshape(*lead, self.num_heads, self.num_classes)

    def distill_loss(self, x: torch.Tensor, teacher_logits: torch.Tensor, temperature: float | torch.Tensor = 1.0,
                     reduction: str = "mean", *, row_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fused heads + Hydra loss; same value and gradients as ``hydra_kl_loss(self(x), t, T)``.

        Args:
            x: (*, D) body features.
            teacher_logits: (*, M, C), member m's logits for head m.
            temperature: T > 0, a number or a one-element tensor (updated in place for an annealed T under
                torch.compile or in a CUDA graph; one that requires grad is learned; see ``hydra_kl_loss``).
            reduction: "mean" or "sum" run fused; "none" -> (*, M) goes through the unfused path.
            row_mask: optional (*) bool (or integer, nonzero = kept), x's leading shape: the rows that count,
                e.g. a sequence batch's attention mask. The others add nothing and get zero gradients; "mean"
                averages over the kept rows (0 if none), "none" is 0 on the others. No host sync.
        Returns: the loss in x's dtype.
        Raises: ValueError for bad teacher values as ``hydra_kl_loss`` does (on CUDA without a host
            sync: NaN loss now, the error on a later call; FASTHYDRA_STRICT=1 raises at once).

        Example:
            >>> head = HydraHead(16, 10, 4)
            >>> head.distill_loss(torch.randn(8, 16), torch.randn(8, 4, 10), temperature=2.0).backward()
        """
        x2 = self._flatten_input(x)  # (checked first: a nested x has no shape to read)
        lead = x.shape[:-1]
        if isinstance(teacher_logits, TopKTeacher):  # (*, M, k) values and indices
            def context():
                return f" for x {tuple(x.shape)} and this head (M={self.num_heads})"
            t2 = TopKTeacher(*F_h._check_topk(teacher_logits, (*lead, self.num_heads), self.num_classes, {"x": x},
                                              context=context))
        else:
            F_h._check_tensor("teacher_logits", teacher_logits)
            want = (*lead, self.num_heads, self.num_classes)
            if tuple(teacher_logits.shape) != want:
                raise ValueError(f"teacher_logits must have shape {want} for x {tuple(x.shape)} and this head "
                                 f"(M={self.num_heads}, C={self.num_classes}); got {tuple(teacher_logits.shape)}")
            t2 = teacher_logits if teacher_logits.dim() == 3 else teacher_logits.reshape(-1, self.num_heads,
                                                                                          self.num_classes)
        row_mask = F_h._check_row_mask(row_mask, lead, "x", x)
        with F_h.caller_lead(lead):  # (value errors name teacher_logits' shape as passed, not its rows)
            if reduction == "none":  # (rows left out: x set to 0 first, as the fused path does)
                loss = F_h.hydra_kl_loss(self(F_h._kept_input(x2, row_mask)), t2, temperature, reduction="none",
                                         impl=self.impl, row_mask=row_mask)
                return loss.reshape(*lead, self.num_heads)
            if self.is_mlp:
                return F_h.mlp_hydra_kl_loss(x2, self.hidden_weight, self.hidden_bias, self.weight, self.bias, t2,
                                             temperature, reduction, impl=self.impl, row_mask=row_mask)
            return F_h.linear_hydra_kl_loss(x2, self.weight, self.bias, t2, temperature, reduction, impl=self.impl,
                                            row_mask=row_mask)

    def __prepare_scriptable__(self):
        """torch.jit.script asks this of every module it compiles (a model's submodules too). Its compiler cannot
        read the functional layer's Python (the dispatch to Triton, the checks), and failed there on a type
        annotation of functional.py, a message that named neither the head nor a way out."""
        raise RuntimeError(
            f"torch.jit.script cannot compile {type(self).__name__} (its forward dispatches to Triton kernels from "
            "Python); torch.export.export(model, args) or torch.jit.trace(model, args) record the heads' forward as "
            "plain torch ops (torch recommends torch.export and torch.compile over torch.jit.script)")

    @classmethod
    @torch.no_grad()
    def from_linear(cls, layer: nn.Module, num_heads: int = 1, noise_std: float = 0.0,
                    generator: torch.Generator | None = None, impl: str = "auto") -> "HydraHead":
        """Heads that start as copies of a trained classifier head: an ``nn.Linear``, or an
        ``nn.Sequential(nn.Linear, nn.ReLU(), nn.Linear)`` for two-layer heads (e.g. the student of a plain KD
        run, stage 1 of Hydra, trained with its own layers), each copy perturbed as ``expand`` does.

        Args:
            layer: the classifier; its parameters are copied (on its device, in its dtype), not shared.
            num_heads: M; noise_std, generator: as in ``expand``. impl: as in ``HydraHead``.
        Returns: a HydraHead whose every head computes ``layer(x)`` (up to the noise).

        Example:
            >>> fc = nn.Linear(64, 10)
            >>> head = HydraHead.from_linear(fc, num_heads=8, noise_std=1e-3)
            >>> head(torch.randn(4, 64)).shape
            torch.Size([4, 8, 10])
        """
        if cls is not HydraHead:
            raise TypeError(f"from_linear builds a HydraHead (classification heads), not a {cls.__name__}")
        layers = list(layer) if isinstance(layer, nn.Sequential) else [layer]
        if len(layers) == 1 and type(layers[0]) is nn.Linear:
            first, last = None, layers[0]
        elif (len(layers) == 3 and type(layers[0]) is nn.Linear and type(layers[1]) is nn.ReLU
              and type(layers[2]) is nn.Linear):
            first, last = layers[0], layers[2]
            if (first.bias is None) != (last.bias is None):
                raise ValueError("layer: both Linear layers need a bias, or neither (HydraHead's bias covers both)")
            if first.out_features != last.in_features:
                raise ValueError(f"layer: the first Linear gives {first.out_features} features, the second takes "
                                 f"{last.in_features}")
        else:
            raise TypeError("layer must be an nn.Linear or an nn.Sequential(nn.Linear, nn.ReLU(), nn.Linear), got "
                            + (f"nn.Sequential of {[type(m).__name__ for m in layers]}"
                               if isinstance(layer, nn.Sequential) else type(layer).__name__))
        source = first if first is not None else last
        one = cls(source.in_features, last.out_features, 1, None if first is None else first.out_features,
                  bias=last.bias is not None, impl=impl, device=last.weight.device, dtype=last.weight.dtype)
        pairs = [(one.weight, last.weight), (one.bias, last.bias)]
        if first is not None:
            pairs += [(one.hidden_weight, first.weight), (one.hidden_bias, first.bias)]
        for mine, theirs in pairs:
            if mine is not None:
                mine[0].copy_(theirs)
        return one if num_heads == 1 and noise_std == 0.0 else one.expand(num_heads, noise_std, generator)

    @torch.no_grad()
    def expand(self, num_heads: int, noise_std: float = 0.0, generator: torch.Generator | None = None) -> "HydraHead":
        """M copies of a one-head head (stage 2 of Hydra), each perturbed by N(0, noise_std^2) noise.

        Returns a new module on the same device and dtype, with the same impl; self is unchanged.
        """
        if self.num_heads != 1:
            raise ValueError(f"expand() starts from a one-head HydraHead, this one has num_heads={self.num_heads}")
        num_heads = F_h._check_int("num_heads", num_heads, 1)
        noise_std = F_h._check_number("noise_std", noise_std)
        new = self._new_like(num_heads)
        for name, param in new.named_parameters():
            src = getattr(self, name)
            param.copy_(src.expand_as(param))
            if noise_std > 0:
                noise = torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32)
                param.add_(noise.to(param.dtype), alpha=noise_std)
        return new


class GaussianHydraHead(HydraHead):
    """M Gaussian regression heads: head m predicts a mean and a variance per output.

    ``z[:, m] = x @ weight[m].T + bias[m]`` with weight (M, 2K, D): the first K rows give the means,
    the last K the raw variances, ``var = softplus(raw) + min_var`` (always positive).

    Args:
        in_features: D. out_features: K. num_heads: M. bias, impl, device, dtype: as HydraHead.
        min_var: the variance floor.
    Shapes: x (*, D) -> (mean, var), each (*, M, K).

    Example:
        >>> head = GaussianHydraHead(16, 1, num_heads=8)
        >>> mean, var = head(torch.randn(4, 16))
    """

    def __init__(self, in_features: int, out_features: int, num_heads: int, bias: bool = True,
                 min_var: float = 1e-6, impl: str = "auto", device=None, dtype=None):
        out_features = F_h._check_int("out_features", out_features, 1)
        min_var = F_h._check_number("min_var", min_var, positive=True)
        super().__init__(in_features, 2 * out_features, num_heads, bias=bias, impl=impl, device=device,
                         dtype=dtype)
        self.out_features = out_features
        self.min_var = float(min_var)

    def _new_like(self, num_heads: int) -> "GaussianHydraHead":
        ref = self.weight
        return GaussianHydraHead(self.in_features, self.out_features, num_heads, bias=self.bias is not None,
                                 min_var=self.min_var, impl=self.impl, device=ref.device, dtype=ref.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_heads={self.num_heads}, "
                f"bias={self.bias is not None}, min_var={self.min_var}, impl={self.impl!r}")

    def forward(self, x: torch.Tensor):  # type: ignore[override]
        """x (*, D) -> (mean, var), each (*, M, K)."""
        from fasthydra.ops.gaussian_kl import split_gaussian

        return split_gaussian(super().forward(x), self.min_var)

    def distill_loss(self, x, teacher_mean, teacher_var, reduction: str = "mean", *,  # type: ignore[override]
                     row_mask=None):
        """Fused heads + Gaussian KL against member m's (mean, var) for head m; mean over (rows, M, K).

        Same value and gradients as ``gaussian_kl_loss(*self(x), teacher_mean, teacher_var)``. row_mask:
        optional (*) bool, x's leading shape, the rows that count (as ``HydraHead.distill_loss``'s).
        """
        x2 = self._flatten_input(x)  # (checked first: a nested x has no shape to read)
        lead = x.shape[:-1]
        want = (*lead, self.num_heads, self.out_features)
        for name, value in (("teacher_mean", teacher_mean), ("teacher_var", teacher_var)):
            F_h._check_tensor(name, value)
            if tuple(value.shape) != want:
                raise ValueError(f"{name} must have shape {want} for x {tuple(x.shape)}, got {tuple(value.shape)}")
        tm = teacher_mean.reshape(-1, self.num_heads, self.out_features)
        tv = teacher_var.reshape(-1, self.num_heads, self.out_features)
        row_mask = F_h._check_row_mask(row_mask, lead, "x", x)
        with F_h.caller_lead(lead):
            if reduction == "none":
                mean, var = self(F_h._kept_input(x2, row_mask))
                return F_h.gaussian_kl_loss(mean, var, tm, tv, "none", row_mask=row_mask).reshape(*want)
            return F_h.gaussian_heads_kl_loss(x2, self.weight, self.bias, tm, tv, self.min_var, reduction,
                                              impl=self.impl, row_mask=row_mask)
