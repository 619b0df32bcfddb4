"""The denoiser and the schedule (GenMD4's learnable exponents) in one module, whose forward is the
training objective: what DeepSpeed wraps in training (trainer/engine.py), and what a checkpoint's
or an export's weights load into for use (inference/)."""

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
