"""The samplers' arithmetic at one step (md4_dist/sampling.py runs the steps): the time grid,
the schedule's masked fraction and its inverse, the uniforms (one stream per row or one for the
batch), inverse-CDF draws, top-p and the ordered samplers' scores."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from md4_dist.diffusion.schedules import MaskingSchedule


def time_grid(steps: int, grid: Literal["uniform", "cosine"], device=None) -> torch.Tensor:
    """The times t_0 = 1 > t_1 > ... > t_steps = 0 (float64), [steps + 1].

    Cosine: t <- cos(pi/2 (1 - t)), which takes small steps near t = 1 (the first, mostly masked
    steps) and its largest near t = 0.
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


def row_seeds(seed: int, first_row: int, n: int) -> list[int]:
    """Seeds for rows first_row .. first_row + n - 1 of a run seeded by `seed`: a row's seed does
    not depend on how the rows are batched. (SeedSequence mixes (seed, row), so different pairs
    do not collide the way seed * K + row would.)"""
    if first_row < 0 or n < 0:
        raise ValueError(f"first_row and n must be >= 0, got {first_row}, {n}")
    return [int(np.random.SeedSequence([seed, r]).generate_state(1, np.uint64)[0] >> np.uint64(1))
            for r in range(first_row, first_row + n)]


def alpha_at(schedule: MaskingSchedule, t: float, batch: int, device, dtype) -> torch.Tensor:
    """alpha at one time, shaped [B, 1, 1] (MD4) or [B, 1, V] (state dependent)."""
    a = schedule.alpha(torch.full((batch,), t, device=device, dtype=dtype))
    return a[:, None, None] if a.dim() == 1 else a[:, None, :]


def masked_fraction(schedule: MaskingSchedule, t: torch.Tensor) -> torch.Tensor:
    """The expected fraction of the generated positions still masked at t [...] (float64): 1 at
    t = 1. GenMD4's alpha_t(j) is averaged over the tokens j."""
    def mean_alpha(t):
        a = schedule.alpha(t)
        return a.mean(-1) if schedule.state_dependent else a
    one = torch.ones((), dtype=torch.float64, device=t.device)
    return (1.0 - mean_alpha(t)) / (1.0 - mean_alpha(one))


def time_at_fraction(schedule: MaskingSchedule, fraction: torch.Tensor) -> torch.Tensor:
    """The time t [N] whose expected masked fraction is `fraction` [N] (bisection; the fraction
    grows with t). Below the fraction at t = 0 (the schedule's eps), 0."""
    lo = torch.zeros_like(fraction, dtype=torch.float64)
    hi = torch.ones_like(lo)
    for _ in range(40):  # 2^-40: far below a float32 time's resolution
        mid = (lo + hi) / 2
        below = masked_fraction(schedule, mid) < fraction
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return hi


class Uniforms:
    """One uniform in [0, 1) per position per call, [N, L]: from each row's own generator
    (`seeds`), from one shared generator, or from the global RNG."""

    def __init__(self, n: int, seq_len: int, device, generator, seeds):
        self.shape, self.device, self.generator, self.rows = (n, seq_len), device, generator, None
        self.seeds = seeds
        if seeds is not None:
            self.rows = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def restart(self, key: int) -> None:
        """Each row's stream anew from (its seed, key): a row's draws in a block then do not
        depend on how many calls the batch made before it (a row finished early, or with nothing
        to do in a block, still draws while others work)."""
        if self.rows is not None:
            for g, s in zip(self.rows, self.seeds):
                g.manual_seed(row_seeds(int(s), key, 1)[0])

    def __call__(self) -> torch.Tensor:
        if self.rows is None:
            return torch.rand(self.shape, generator=self.generator, device=self.device)
        return torch.stack([torch.rand(self.shape[1], generator=g, device=self.device)
                            for g in self.rows])


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per position: probs [..., K] (mass may sum to less than 1), u [...] ->
    the index of the category u falls in, K where u lies past the mass. Row by row, so a row's
    draw does not depend on the others."""
    cdf = probs.cumsum(-1)  # [..., K]
    return torch.searchsorted(cdf, u[..., None].to(cdf.dtype), right=True).squeeze(-1)


def scores(probs: torch.Tensor, candidate: torch.Tensor, order: str) -> torch.Tensor:
    """How sure the denoiser is at each position, probs [..., V] -> [...]: higher is surer."""
    if order == "confidence":
        return probs.gather(-1, candidate[..., None]).squeeze(-1)
    if order == "margin":
        if probs.shape[-1] < 2:
            return probs[..., 0]
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    return torch.special.xlogy(probs, probs).sum(-1)  # minus the entropy
