"""Samples during training, for TensorBoard's text tab (`logging.sample_every`).

Every rank draws the same samples from the same seed, since under ZeRO-3 each forward gathers
the parameters from all ranks; rank 0 decodes and writes them. The learnable schedule's
parameters are read outside any module's forward, so they are gathered for the whole draw.
"""

from __future__ import annotations

import torch

from md4_dist.config import Config
from md4_dist.sampling import sample
from md4_dist.trainer.engine import schedule_parameters
from md4_dist.tokenizer import decode


@torch.no_grad()
def draw(module, cfg: Config, step: int, device: torch.device) -> list[list[int]]:
    """cfg.logging.samples token sequences of the training length from `module` (the
    DiffusionModel DeepSpeed wraps), seeded by the run's seed and the step."""
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + step)
    with schedule_parameters(module):
        tokens = sample(module.denoiser, module.schedule, cfg.logging.samples, cfg.data.seq_len,
                        cfg.logging.sample_steps, generator=generator, device=device)
    return tokens.cpu().tolist()


def as_markdown(samples: list[list[int]], tokenizer, eos_id: int | None) -> str:
    """TensorBoard renders text as Markdown: each sample becomes an indented (verbatim) block."""
    blocks = []
    for i, tokens in enumerate(samples):
        text = decode(tokens, tokenizer, eos_id)
        blocks.append(f"**sample {i}**\n\n" + "\n".join("    " + line for line in text.splitlines()))
    return "\n\n".join(blocks)
