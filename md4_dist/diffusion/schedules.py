"""Masking schedules: alpha(t), the probability that a token is kept at time t, and its weight.

`weight(t)` is alpha'(t) / (1 - alpha(t)) (the official `dgamma_times_alpha`), negative, so that
the continuous-time NELBO is a positively weighted sum of cross-entropies.

MD4 schedules use the official eps parameterisation alpha(t) = (1 - 2 eps) a(t) + eps, scalar per t.
GenMD4's learnable polynomial is state dependent: one exponent w_j = softplus(phi_j) per token,
alpha_t(j) = 1 - (1 - eps) t^{w_j}, and alpha, weight return [..., V].

    sched = build("cosine")
    sched = build("learnable_poly", vocab_size=50257, power_init=1.0)
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-4


class MaskingSchedule(nn.Module):
    """Base class. Subclasses define `alpha`, `weight` and `keep_prob`.

    `vocab_size` is V, which is also the mask id; MD4 schedules carry it only when built with it.
    """

    eps: float
    vocab_size: int | None = None
    state_dependent: bool = False

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def keep_prob(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """alpha_t(x_n) per position: t [B], x [B, L] -> [B, L], without a [B, L, V] tensor."""
        raise NotImplementedError


class MD4Schedule(MaskingSchedule):
    """alpha(t) = (1 - 2 eps) a(t) + eps for a(t) in {1 - t, 1 - cos(pi/2 (1 - t)), 1 - t^k}."""

    def __init__(self, kind: str, power: float = 1.0, eps: float = EPS, vocab_size: int | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        if kind not in ("linear", "cosine", "poly"):
            raise ValueError(f"unknown MD4 schedule kind {kind!r}")
        if kind == "poly" and not power > 0:
            raise ValueError(f"poly exponent must be > 0, got {power}")
        self.kind, self.power, self.eps = kind, float(power), eps

    def extra_repr(self) -> str:
        return f"kind={self.kind}, power={self.power}, eps={self.eps}, vocab_size={self.vocab_size}"

    def _a(self, t):
        if self.kind == "linear":
            return 1.0 - t
        if self.kind == "cosine":
            return 1.0 - torch.cos(math.pi / 2 * (1.0 - t))
        return 1.0 - t ** self.power

    def _da(self, t):
        if self.kind == "linear":
            return -torch.ones_like(t)
        if self.kind == "cosine":
            return -math.pi / 2 * torch.sin(math.pi / 2 * (1.0 - t))
        return -self.power * t ** (self.power - 1.0)

    def alpha(self, t):
        """t [...] -> [...]"""
        return (1.0 - 2 * self.eps) * self._a(t) + self.eps

    def weight(self, t):
        """alpha'(t) / (1 - alpha(t)): t [...] -> [...]"""
        return (1.0 - 2 * self.eps) * self._da(t) / (1.0 - self.alpha(t))

    def log_snr(self, t):
        """gamma(t) = log(alpha / (1 - alpha)), used by the discrete-time loss: t [...] -> [...]"""
        a = self.alpha(t)
        return torch.log(a) - torch.log1p(-a)

    def keep_prob(self, t, x):
        return self.alpha(t)[:, None].expand(x.shape)


class LearnablePolySchedule(MaskingSchedule):
    """GenMD4: alpha_t(j) = 1 - (1 - eps) t^{w_j}, w = softplus(phi), one phi per token."""

    state_dependent = True

    def __init__(self, vocab_size: int, power_init: float = 1.0, eps: float = EPS):
        super().__init__()
        if not power_init > 0:
            raise ValueError(f"power_init must be > 0, got {power_init}")
        self.eps, self.vocab_size = eps, vocab_size
        # Inverse softplus, so that the exponents start exactly at power_init.
        phi0 = power_init + math.log(-math.expm1(-power_init))
        self.phi = nn.Parameter(torch.full((vocab_size,), phi0))

    def exponents(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """w = softplus(phi): [V]"""
        # At least float32 even when DeepSpeed holds phi in bf16; float64 stays float64.
        w = F.softplus(self.phi.to(torch.promote_types(self.phi.dtype, torch.float32)))
        return w if dtype is None else w.to(dtype)

    def alpha(self, t):
        """t [...] -> [..., V]"""
        w = self.exponents(t.dtype)
        return 1.0 - (1.0 - self.eps) * t[..., None] ** w

    def weight(self, t):
        """alpha'(t) / (1 - alpha(t)) = -w / t exactly: t [...] -> [..., V]"""
        return -self.exponents(t.dtype) / t[..., None]

    def keep_prob(self, t, x):
        w_x = self.exponents(t.dtype)[x]  # [B, L]
        return 1.0 - (1.0 - self.eps) * torch.exp(w_x * torch.log(t)[:, None])


def parse(name: str) -> tuple[str, float] | None:
    """The one reading of a schedule's name: "linear", "cosine", "learnable_poly" -> (name, 1.0),
    "polyK" (e.g. "poly3", "poly0.5") -> ("poly", K); None when the name is none of these."""
    if name in ("linear", "cosine", "learnable_poly"):
        return name, 1.0
    m = re.fullmatch(r"poly(\d+(?:\.\d+)?)", name)
    return ("poly", float(m.group(1))) if m else None


def build(name: str, vocab_size: int | None = None, **kwargs) -> MaskingSchedule:
    """A schedule by name: "linear", "cosine", "polyK" (e.g. "poly3", "poly0.5"), "learnable_poly"."""
    parsed = parse(name)
    if parsed is None:
        raise ValueError(f"unknown schedule {name!r}; allowed: linear, cosine, polyK (e.g. poly3), "
                         "learnable_poly")
    kind, power = parsed
    if kind == "learnable_poly":
        if vocab_size is None:
            raise ValueError("schedule 'learnable_poly' needs vocab_size (one exponent per token)")
        return LearnablePolySchedule(vocab_size, **kwargs)
    return MD4Schedule(kind, power=power, vocab_size=vocab_size, **kwargs)
