"""A trained model's NELBO on sequences, in bits per token: each sequence's estimate over
antithetic diffusion times, and their mean with its standard error (`python -m md4_dist.evaluate`
reads them out)."""

from __future__ import annotations

import math
from typing import Iterator

import torch

from md4_dist.diffusion.forward import sample_times
from md4_dist.diffusion.objectives import masks_per_sequence
from md4_dist.diffusion_model import DiffusionModel


@torch.no_grad()
def sequence_nelbos(model: DiffusionModel, batches: Iterator[torch.Tensor], t_samples: int,
                    generator: torch.Generator, device: torch.device, progress=None) -> torch.Tensor:
    """Bits per token of each sequence, [n] float64: the mean NELBO over `t_samples` antithetic
    times. `batches` yields [b, L] int64 token rows; the noise comes from the CPU `generator`, so
    a seed gives the same figures on any device."""
    masks = masks_per_sequence(model.diffusion_cfg)
    bits = []
    for x in batches:
        b, L = x.shape
        t = torch.cat([sample_times(t_samples, generator) for _ in range(b)])  # [b K], per row
        u = torch.rand((masks, b * t_samples, L), generator=generator)
        out = model(x.repeat_interleave(t_samples, 0).to(device), t.to(device), u.to(device))
        nats = out["nelbo"].double().view(b, t_samples).mean(1)
        bits.append(nats.cpu() / (L * math.log(2)))
        if progress is not None:
            progress.update(b)
    return torch.cat(bits)


def summary(bits: torch.Tensor) -> dict:
    n = len(bits)
    mean = bits.mean().item()
    se = (bits.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else None
    return {"nelbo_bits_per_token": mean, "stderr_bits_per_token": se, "ppl_bound": 2.0 ** mean,
            "sequences": n}
