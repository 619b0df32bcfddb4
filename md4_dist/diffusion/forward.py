"""The forward (masking) process and the sampling of diffusion times."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from md4_dist.diffusion import checks
from md4_dist.diffusion.schedules import MaskingSchedule


def forward_sample(x: torch.Tensor, t: torch.Tensor, schedule: MaskingSchedule,
                   generator: torch.Generator | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
    """z_t ~ q(z_t | x): keep x_n with probability alpha_t(x_n), else the mask id V.

    x [B, L] int64 in [0, V), t [B] in (0, 1] -> z_t [B, L] int64. The schedule's vocab_size is V.
    u [B, L] uniform on [0, 1), when given, decides the masks instead of fresh draws.
    """
    V = schedule.vocab_size
    if V is None:
        raise ValueError("the schedule has no vocab_size (the mask id): build it with vocab_size=V")
    checks.tokens("x", x, None, V - 1)
    checks.times("t", t, x.shape[0])
    if u is None:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=t.dtype)
    elif u.shape != x.shape:
        raise ValueError(f"u has shape {tuple(u.shape)}, x has {tuple(x.shape)}")
    return torch.where(u < schedule.keep_prob(t, x), x, torch.full_like(x, V))


def sample_times(batch: int, generator: torch.Generator | None = None, device=None,
                 antithetic: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """t [B] uniform on (0, 1].

    Antithetic: t_i = 1 - ((u + i / B) mod 1), u ~ U[0, 1): the B times are evenly spread, which
    lowers the variance of the batch mean. The reflection 1 - (.) puts t in (0, 1] rather than
    [0, 1), so the weight alpha'/(1 - alpha) is always evaluated inside the validated range.
    """
    if antithetic:
        u = torch.rand((), generator=generator, device=device, dtype=torch.float64)
        grid = torch.arange(batch, device=device, dtype=torch.float64) / batch
        t = 1.0 - torch.remainder(u + grid, 1.0)
    else:
        t = 1.0 - torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    return t.to(dtype).clamp_(min=torch.finfo(dtype).tiny)


def discretize_time(t: torch.Tensor, timesteps: int) -> torch.Tensor:
    """Round t in (0, 1] up to the grid {1/T, ..., 1}: the discrete-time MD4 loss uses these t."""
    return torch.ceil(t * timesteps).clamp_(1, timesteps) / timesteps


@dataclass
class Noise:
    """All the randomness of one objective evaluation, drawn up front: times t [B] in (0, 1] and
    uniforms u [M, B, L] that decide which tokens are masked, one set per mask (MD4 draws one
    mask per sequence, GenMD4 two). Drawn for a whole global batch and handed out by row, it
    makes a training step independent of how the batch is split over ranks and micro-batches."""

    t: torch.Tensor  # [B]
    u: torch.Tensor  # [M, B, L]

    def rows(self, index: torch.Tensor) -> Noise:
        return Noise(self.t[index], self.u[:, index])

    def check(self, masks: int, batch: int, seq_len: int) -> None:
        if self.t.shape != (batch,) or self.u.shape != (masks, batch, seq_len):
            raise ValueError(f"noise has t {tuple(self.t.shape)} and u {tuple(self.u.shape)}; this "
                             f"objective needs t ({batch},) and u ({masks}, {batch}, {seq_len})")


def draw_noise(batch: int, seq_len: int, masks: int, generator: torch.Generator | None = None,
               device=None, antithetic: bool = True) -> Noise:
    t = sample_times(batch, generator, device, antithetic)
    return Noise(t, torch.rand((masks, batch, seq_len), generator=generator, device=device))
