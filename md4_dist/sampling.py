"""Ancestral samplers for MD4 and GenMD4, with top-p and conditioning on given tokens.

    tokens = sample(denoiser, schedule, num_samples=8, seq_len=1024, steps=256,
                    generator=torch.Generator().manual_seed(0))
    # prefix / infilling: positions where `fixed` is True keep the tokens of `given`
    tokens = sample(denoiser, schedule, 8, 1024, 256, given=prompt, fixed=prompt_mask)

From t to s < t each masked position n becomes token j with probability
p_theta(j | z_t) (alpha_s(j) - alpha_t(j)) / (1 - alpha_t(j)) and stays masked otherwise. For the
scalar MD4 schedules the fraction does not depend on j; for GenMD4's learnable schedule it does
(the state-dependent rule). Unmasked positions never change, so given tokens are kept. After the
last step any mask left is filled with the denoiser's most likely token.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from md4_dist.diffusion import checks
from md4_dist.diffusion.schedules import MaskingSchedule

# (z_t [B, L], t [B]) -> logits [B, L, V]: what the sampler draws from, e.g. a model.Denoiser
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(steps: int, grid: Literal["uniform", "cosine"], device=None) -> torch.Tensor:
    """The times t_0 = 1 > t_1 > ... > t_steps = 0 (float64), [steps + 1].

    Cosine: t <- cos(pi/2 (1 - t)), which takes smaller steps near t = 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = 1.0 - torch.arange(steps + 1, device=device, dtype=torch.float64) / steps
    if grid == "cosine":
        t = torch.cos(math.pi / 2 * (1.0 - t))
        t[-1] = 0.0  # cos(pi/2) is 6e-17, not 0
    elif grid != "uniform":
        raise ValueError(f"grid must be 'uniform' or 'cosine', got {grid!r}")
    return t


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose mass reaches top_p, renormalised: [..., V] -> [..., V]."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens
    keep_sorted = mass_before < top_p  # always keeps the most likely token
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


def _alpha(schedule: MaskingSchedule, t: float, batch: int, device, dtype) -> torch.Tensor:
    """alpha at one time, shaped [B, 1, 1] (MD4) or [B, 1, V] (state dependent)."""
    a = schedule.alpha(torch.full((batch,), t, device=device, dtype=dtype))
    return a[:, None, None] if a.dim() == 1 else a[:, None, :]


@torch.no_grad()
def sample(denoiser: LogitsFn, schedule: MaskingSchedule, num_samples: int, seq_len: int,
           steps: int, *, sampler: Literal["ancestral", "topp"] = "ancestral", top_p: float = 0.98,
           grid: Literal["uniform", "cosine"] = "cosine", given: torch.Tensor | None = None,
           fixed: torch.Tensor | None = None, generator: torch.Generator | None = None,
           device=None) -> torch.Tensor:
    """Draw [num_samples, seq_len] int64 tokens in [0, V): no mask id remains.

    given [N, L] int64 and fixed [N, L] bool: positions where fixed is True start (and stay) as
    given's tokens; the rest are generated. Deterministic for a seeded generator.
    """
    V = schedule.vocab_size
    if V is None:
        raise ValueError("the schedule has no vocab_size: build it with vocab_size=V")
    if sampler not in ("ancestral", "topp"):
        raise ValueError(f"sampler must be 'ancestral' or 'topp', got {sampler!r}")
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"num_samples and seq_len must be >= 1, got {num_samples}, {seq_len}")
    shape = (num_samples, seq_len)
    z = torch.full(shape, V, dtype=torch.int64, device=device)
    if (given is None) != (fixed is None):
        raise ValueError("given and fixed come together: tokens and the mask of positions to keep")
    if given is not None:
        checks.tokens("given", given.to(z.device), shape, V - 1)
        if fixed.dtype != torch.bool or tuple(fixed.shape) != shape:
            raise ValueError(f"fixed must be a bool tensor of shape {shape}, got {fixed.dtype} "
                             f"{tuple(fixed.shape)}")
        z = torch.where(fixed.to(z.device), given.to(z.device), z)
    times = time_grid(steps, grid)
    dtype = torch.float32
    for i in range(steps):
        t, s = float(times[i]), float(times[i + 1])
        a_t = _alpha(schedule, t, num_samples, z.device, dtype)
        a_s = _alpha(schedule, s, num_samples, z.device, dtype)
        logits = denoiser(z, torch.full((num_samples,), t, device=z.device))  # [N, L, V]
        probs = torch.softmax(logits.to(dtype), dim=-1)
        if sampler == "topp":
            probs = top_p_filter(probs, top_p)
        to_token = probs * ((a_s - a_t) / (1.0 - a_t))  # [N, L, V]: unmask as token j
        stay = (1.0 - to_token.sum(-1, keepdim=True)).clamp_(min=0.0)  # [N, L, 1]
        choice = torch.multinomial(torch.cat([to_token, stay], -1).flatten(0, 1), 1,
                                   generator=generator).view(shape)  # V means: stays masked
        z = torch.where(z == V, choice, z)
    # Always, not only when a mask is left: a data-dependent branch would cost a host sync, and
    # under ZeRO-3 every rank must run the same forwards.
    logits = denoiser(z, torch.zeros(num_samples, device=z.device))
    return torch.where(z == V, logits.argmax(-1), z)
