"""The module DeepSpeed wraps: the denoiser and the schedule (GenMD4's learnable exponents), whose
forward is the training objective."""

from __future__ import annotations

import torch
from torch import nn

from md4_dist.diffusion.forward import Noise
from md4_dist.diffusion.objectives import DiffusionConfig, ObjectiveOutput, build_schedule, objective
from md4_dist.model import Denoiser, ModelConfig


class DiffusionModel(nn.Module):
    def __init__(self, model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig):
        super().__init__()
        self.diffusion_cfg = diffusion_cfg
        self.denoiser = Denoiser(model_cfg)
        self.schedule = build_schedule(diffusion_cfg, model_cfg.vocab_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [B, L] clean tokens and their noise (t [B], u [M, B, L], see diffusion.forward.Noise)
        -> {"loss", "nelbo" [B], "bits_per_token", and the objective's stats}: a dict of tensors,
        which ZeRO-3's hooks can walk to gather parameters again for the backward pass."""
        out: ObjectiveOutput = objective(self.diffusion_cfg, self.denoiser, self.schedule, x,
                                         noise=Noise(t, u))
        return {"loss": out.loss, "nelbo": out.nelbo, "bits_per_token": out.bits_per_token, **out.stats}


def model_inputs(batch: dict, noise, device: torch.device) -> tuple[tuple[torch.Tensor, ...], int]:
    """(x, t, u) for DiffusionModel from a reader batch and a NoiseByPosition, and the row count.

    A micro-batch whose every row fell in a skipped corrupt shard has no rows, yet under ZeRO-3
    every rank must run each forward and backward (they gather parameters together): it becomes
    one placeholder row, which the caller weights by the row count, 0.
    """
    tokens, positions = batch["tokens"], batch["positions"]
    rows = len(tokens)
    if rows == 0:
        tokens = torch.zeros((1, tokens.shape[1]), dtype=torch.int64)
        positions = torch.zeros(1, dtype=torch.int64)
    n = noise(positions)
    return (tokens.to(device, non_blocking=True), n.t, n.u), rows
