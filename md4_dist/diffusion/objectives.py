"""Training objectives: a denoiser and a batch of clean tokens in, the surrogate loss and NELBO out.

    cfg = DiffusionConfig(kind="genmd4", schedule="learnable_poly")
    schedule = build_schedule(cfg, vocab_size=V)
    out = objective(cfg, denoiser, schedule, x, generator=g)  # or noise=Noise(t, u), drawn up front
    out.loss.backward()           # the training surrogate (scalar)
    out.nelbo                     # [B] nats per sequence, detached
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from md4_dist.diffusion import checks, losses
from md4_dist.diffusion.forward import Noise, discretize_time, draw_noise, forward_sample
from md4_dist.diffusion.schedules import (LearnablePolySchedule, MaskingSchedule, MD4Schedule, build,
                                          parse)


class MaskedStatsDenoiser(Protocol):
    """What the objectives need of a denoiser (`model.Denoiser` is one): at the masked positions of
    z_t, log p(x_n | z_t) and, given GenMD4's exponents w [V], sum_j w_j p_j(. | z_t); [B, L] each.
    Only these reach the losses, so the output layer can skip the unmasked rows."""

    def masked_stats(self, zt: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
                     w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass
class DiffusionConfig:
    """Which diffusion model and how its loss is estimated."""

    kind: Literal["md4", "genmd4"] = "md4"
    schedule: str = "linear"  # md4: linear | cosine | polyK; genmd4: learnable_poly
    timesteps: int = 0  # md4 only: 0 is continuous time, T > 0 the T-step discrete-time loss
    antithetic: bool = True  # evenly spread t over the batch
    power_init: float = 1.0  # genmd4: initial exponent of every token
    t1: float = 1e-3  # genmd4: t is drawn in [t1, 1]

    def __post_init__(self):
        parsed = parse(self.schedule)
        if self.kind == "md4" and (parsed is None or parsed[0] == "learnable_poly"):
            raise ValueError(f"schedule {self.schedule!r} is not an MD4 schedule; allowed: linear, "
                             "cosine, polyK (e.g. poly3)")
        if self.kind == "genmd4" and self.schedule != "learnable_poly":
            raise ValueError(f"genmd4 needs schedule 'learnable_poly', got {self.schedule!r}")
        if self.timesteps < 0 or (self.kind == "genmd4" and self.timesteps):
            raise ValueError(f"timesteps must be 0 (continuous) or positive for md4, and 0 for "
                             f"genmd4; got {self.timesteps} for {self.kind}")
        if not 0 < self.t1 < 1:
            raise ValueError(f"t1 must lie in (0, 1), got {self.t1}")
        if not self.power_init > 0:
            raise ValueError(f"power_init must be > 0, got {self.power_init}")


def build_schedule(cfg: DiffusionConfig, vocab_size: int) -> MaskingSchedule:
    if cfg.kind == "genmd4":
        return build(cfg.schedule, vocab_size=vocab_size, power_init=cfg.power_init)
    return build(cfg.schedule, vocab_size=vocab_size)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar: the surrogate to differentiate
    nelbo: torch.Tensor  # [B] nats per sequence, detached
    bits_per_token: torch.Tensor  # scalar, detached: mean NELBO / (L ln 2)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging


def _check_batch(x: torch.Tensor, schedule: MaskingSchedule) -> None:
    if schedule.vocab_size is None:
        raise ValueError("the schedule has no vocab_size: build it with build_schedule(cfg, V)")
    checks.tokens("x", x, None, schedule.vocab_size - 1)


def _noise(noise: Noise | None, masks: int, x: torch.Tensor, generator, antithetic: bool) -> Noise:
    B, L = x.shape
    if noise is None:
        return draw_noise(B, L, masks, generator, x.device, antithetic)
    noise.check(masks, B, L)
    return noise


def md4_objective(denoiser: MaskedStatsDenoiser, schedule: MD4Schedule, x: torch.Tensor, *,
                  generator: torch.Generator | None = None, noise: Noise | None = None,
                  timesteps: int = 0, antithetic: bool = True) -> ObjectiveOutput:
    """MD4: one z_t per sequence; the surrogate is the NELBO itself. x [B, L]. The randomness is
    `noise` (one mask) when given, else drawn from `generator`."""
    _check_batch(x, schedule)
    B, L = x.shape
    V = schedule.vocab_size
    noise = _noise(noise, 1, x, generator, antithetic)
    t = discretize_time(noise.t, timesteps) if timesteps else noise.t
    zt = forward_sample(x, t, schedule, u=noise.u[0])
    log_p_x, _ = denoiser.masked_stats(zt, t, x)
    diffusion = losses.md4_diffusion_loss_at(log_p_x, zt == V, t, schedule, timesteps or None)
    recon = losses.md4_recon_loss(schedule, L, V)
    nelbo = diffusion + recon
    loss = nelbo.mean()
    return ObjectiveOutput(
        loss=loss, nelbo=nelbo.detach(), bits_per_token=loss.detach() / (L * math.log(2)),
        stats={"loss_diffusion": diffusion.detach().mean(), "loss_recon": recon.detach()})


def genmd4_objective(denoiser: MaskedStatsDenoiser, schedule: LearnablePolySchedule, x: torch.Tensor, *,
                     generator: torch.Generator | None = None, noise: Noise | None = None,
                     t1: float = 1e-3, antithetic: bool = True) -> ObjectiveOutput:
    """GenMD4: two masks per (x, t), run through the denoiser as one batch of 2B, and the RLOO
    surrogate that carries the exponents' gradient through the discrete masking. x [B, L]. The
    randomness is `noise` (two masks) when given, else drawn from `generator`."""
    _check_batch(x, schedule)
    B, L = x.shape
    noise = _noise(noise, 2, x, generator, antithetic)
    t = t1 + (1.0 - t1) * noise.t  # [B] in (t1, 1]
    x2, t2 = torch.cat([x, x]), torch.cat([t, t])
    zt2 = forward_sample(x2, t2, schedule, u=noise.u.reshape(2 * B, L))  # two masks: [2B, L]
    log_p_x, expected_w = denoiser.masked_stats(zt2, t2, x2, schedule.exponents())
    masked = zt2 == schedule.vocab_size
    per_sample = losses.genmd4_diffusion_loss_at(log_p_x, expected_w, x2, masked, t2, schedule)  # [2B]
    loss1, loss2 = per_sample[:B], per_sample[B:]
    zt1, zt2 = zt2[:B], zt2[B:]
    rloo = losses.genmd4_rloo_term(x, zt1, zt2, t, schedule, loss1, loss2)
    recon = losses.genmd4_recon_loss(x, schedule, t1)  # [B]
    diffusion = 0.5 * (loss1 + loss2)
    nelbo = diffusion + recon
    loss = (nelbo + rloo).mean()
    w = schedule.exponents().detach()
    return ObjectiveOutput(
        loss=loss, nelbo=nelbo.detach(),
        bits_per_token=nelbo.detach().mean() / (L * math.log(2)),
        stats={"loss_diffusion": diffusion.detach().mean(), "loss_recon": recon.detach().mean(),
               "exponent_min": w.min(), "exponent_mean": w.mean(), "exponent_max": w.max()})


def masks_per_sequence(cfg: DiffusionConfig) -> int:
    """How many masks the objective draws per sequence: the M of its Noise."""
    return 2 if cfg.kind == "genmd4" else 1


def objective(cfg: DiffusionConfig, denoiser: MaskedStatsDenoiser, schedule: MaskingSchedule,
              x: torch.Tensor, generator: torch.Generator | None = None,
              noise: Noise | None = None) -> ObjectiveOutput:
    """The objective that `cfg.kind` names."""
    if cfg.kind == "genmd4":
        return genmd4_objective(denoiser, schedule, x, generator=generator, noise=noise, t1=cfg.t1,
                                antithetic=cfg.antithetic)
    return md4_objective(denoiser, schedule, x, generator=generator, noise=noise,
                         timesteps=cfg.timesteps, antithetic=cfg.antithetic)
