"""What the trainer feeds the DiffusionModel DeepSpeed wraps (md4_dist/diffusion_model.py): a
reader batch and its noise, as the forward's arguments."""

from __future__ import annotations

import torch


def model_inputs(batch: dict, noise, device: torch.device) -> tuple[tuple[torch.Tensor, ...], int]:
    """(x, t, u) for DiffusionModel from a reader batch and a NoiseByPosition, and the row count.

    Validation's last micro-batch on a rank can have no rows (a rank's share of the val sequences
    may end one forward before another's), yet under ZeRO-3 every rank must run each forward (they
    gather parameters together): it becomes one placeholder row, which the caller weights by the
    row count, 0. (Training batches are always full: data/reader.py.)
    """
    tokens, positions = batch["tokens"], batch["positions"]
    rows = len(tokens)
    if rows == 0:
        tokens = torch.zeros((1, tokens.shape[1]), dtype=torch.int64)
        positions = torch.zeros(1, dtype=torch.int64)
    n = noise(positions)
    return (tokens.to(device, non_blocking=True), n.t, n.u), rows
