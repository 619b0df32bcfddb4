"""The module DeepSpeed wraps: the denoiser and the schedule (GenMD4's learnable exponents), whose
forward is the training objective."""

from __future__ import annotations

import torch
from torch import nn

from md4_dist.diffusion.objectives import DiffusionConfig, ObjectiveOutput, build_schedule, objective
from md4_dist.model import Denoiser, ModelConfig


class DiffusionModel(nn.Module):
    def __init__(self, model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig):
        super().__init__()
        self.diffusion_cfg = diffusion_cfg
        self.denoiser = Denoiser(model_cfg)
        self.schedule = build_schedule(diffusion_cfg, model_cfg.vocab_size)

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """{"loss", "nelbo", "bits_per_token", and the objective's stats}: a dict of tensors, which
        ZeRO-3's hooks can walk to gather parameters again for the backward pass."""
        out: ObjectiveOutput = objective(self.diffusion_cfg, self.denoiser, self.schedule, x, generator)
        return {"loss": out.loss, "nelbo": out.nelbo, "bits_per_token": out.bits_per_token, **out.stats}
