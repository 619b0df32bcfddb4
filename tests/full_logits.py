"""The plain path through logits [B, L, V], for the tests and benchmarks/gpu_check.py to compare
with (md4_dist itself reads only the masked rows, `model.Denoiser.masked_stats`):

    den = FullLogits(lambda zt, t: model(zt, t))  # any logits function, as a denoiser for objective()
    loss = md4_diffusion_loss(logits, x, zt, t, schedule)  # the loss terms of docs/math.md from logits
"""

from __future__ import annotations

import torch

from md4_dist.diffusion import checks, losses
from md4_dist.diffusion.schedules import LearnablePolySchedule


def stats(logits, x, t, w=None):
    """log p(x_n | z_t) and (given exponents w [V]) sum_j w_j p_j(. | z_t) at every position, [B, L]
    each, in the promoted dtype of logits, t and float32 (as md4_dist.diffusion.losses computes)."""
    dtype = torch.promote_types(torch.promote_types(logits.dtype, t.dtype), torch.float32)
    log_p = torch.log_softmax(logits.to(dtype), dim=-1)  # [B, L, V]
    log_p_x = log_p.gather(-1, x[..., None]).squeeze(-1)
    return log_p_x, (None if w is None else log_p.exp() @ w.to(dtype))


class FullLogits:
    """A denoiser for the objectives made of any logits function (z_t [B, L], t [B]) -> [B, L, V]:
    `masked_stats` read from the whole logits (at every position; the losses read the masked)."""

    def __init__(self, logits_fn):
        self.logits_fn = logits_fn

    def masked_stats(self, zt, t, x, w=None):
        return stats(self.logits_fn(zt, t), x, t, w)


def _check(logits, x, zt, t, schedule):
    V = logits.shape[-1]
    if schedule.vocab_size is not None and schedule.vocab_size != V:
        raise ValueError(f"logits have V = {V} but the schedule was built for vocab_size = "
                         f"{schedule.vocab_size}")
    checks.tokens("x", x, None, V - 1)
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.dim() != 3 or logits.shape[:2] != x.shape:
        raise ValueError(f"logits must have shape ({x.shape[0]}, {x.shape[1]}, V), got {tuple(logits.shape)}")
    checks.masked_copy("zt", zt, x, V)
    checks.times("t", t, x.shape[0])


def md4_diffusion_loss(logits, x, zt, t, schedule, timesteps=None):
    """`losses.md4_diffusion_loss_at` from logits [B, L, V]: [B]."""
    _check(logits, x, zt, t, schedule)
    log_p_x, _ = stats(logits, x, t)
    return losses.md4_diffusion_loss_at(log_p_x, zt == logits.shape[-1], t, schedule, timesteps)


def genmd4_diffusion_loss(logits, x, zt, t, schedule):
    """`losses.genmd4_diffusion_loss_at` from logits [B, L, V]: [B]."""
    _check(logits, x, zt, t, schedule)
    # any other schedule has no exponents: genmd4_diffusion_loss_at names the error
    w = schedule.exponents() if isinstance(schedule, LearnablePolySchedule) else None
    log_p_x, expected_w = stats(logits, x, t, w)
    return losses.genmd4_diffusion_loss_at(log_p_x, expected_w, x, zt == logits.shape[-1], t, schedule)
