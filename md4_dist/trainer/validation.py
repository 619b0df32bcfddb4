"""Validation NELBO in bits per token, with its standard error, as every rank's share of one
fixed set of sequences.

The first `eval.sequences` sequences of the val split's seeded order (all of them when 0), the
same noise at every evaluation (keyed by stream position, so the same at any world size), and
times drawn i.i.d. rather than antithetically, so that the per-sequence NELBOs are independent
and the standard error sd / sqrt(n) is valid.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
import torch.distributed as dist

from md4_dist.config import Config
from md4_dist.data import TokenStream, make_loader
from md4_dist.data.manifest import Manifest
from md4_dist.diffusion.objectives import masks_per_sequence
from md4_dist.trainer.inputs import model_inputs
from md4_dist.trainer.noise import EVAL, NoiseByPosition


class Validation:
    """`validation(engine)` -> the record's val_nelbo_bits_per_token, val_nelbo_se, val_sequences."""

    def __init__(self, cfg: Config, manifest: Manifest, rank: int, world: int, device: torch.device,
                 exclude: Collection[str] = ()):
        self.cfg, self.manifest, self.rank, self.world, self.device = cfg, manifest, rank, world, device
        # exclude: the val shards left out under data.on_corrupt = "skip" (data/reader.py)
        self.stream = TokenStream(manifest, "val", cfg.train.micro_batch, rank=rank, world_size=world,
                                  seed=cfg.train.seed, loop=False, exclude=exclude, storage=cfg.storage)
        available = self.stream.sequences
        self.sequences = min(cfg.eval.sequences or available, available)
        # every rank runs the same number of forwards: ZeRO-3 gathers parameters in each of them
        self.forwards = math.ceil(self.sequences / (cfg.train.micro_batch * world))
        self.noise = NoiseByPosition(cfg.train.seed, EVAL, cfg.train.global_batch, cfg.data.seq_len,
                                     masks_per_sequence(cfg.diffusion), antithetic=False, device=device)

    @torch.no_grad()
    def __call__(self, engine) -> dict:
        cfg = self.cfg
        batches = iter(make_loader(self.stream, num_workers=0))
        moments = torch.zeros(3, dtype=torch.float64, device=self.device)  # sum, sum of squares, count
        empty = {"tokens": torch.empty((0, cfg.data.seq_len), dtype=torch.int64),
                 "positions": torch.empty(0, dtype=torch.int64)}
        for _ in range(self.forwards):
            batch = next(batches, empty)  # a rank may run out one forward before the others
            keep = batch["positions"] < self.sequences
            batch = {"tokens": batch["tokens"][keep], "positions": batch["positions"][keep]}
            inputs, rows = model_inputs(batch, self.noise, self.device)
            bits = engine(*inputs)["nelbo"][:rows].double() / (cfg.data.seq_len * math.log(2))  # [rows]
            moments[0] += bits.sum()
            moments[1] += (bits ** 2).sum()
            moments[2] += rows
        dist.all_reduce(moments)
        total, squares, n = moments.tolist()
        mean = total / n
        var = max(squares / n - mean ** 2, 0.0) * n / max(n - 1, 1)
        return {"val_nelbo_bits_per_token": mean, "val_nelbo_se": math.sqrt(var / n),
                "val_sequences": int(n)}
