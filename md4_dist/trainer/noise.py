"""The diffusion noise of a sequence keyed by its stream position, not by the rank that reads it.

Positions [k G, (k + 1) G) form block k (G: the global batch, so in training block k is step
k + 1). A block's Noise (antithetic times over all G sequences, and the mask uniforms) comes from a
generator seeded by (seed, purpose, k), and each rank takes the rows of the positions it holds.
So the t and masks a sequence gets are the same at any world size, micro-batch size or after a
resume, and a 1-worker run follows a 2-worker one up to float rounding.
"""

from __future__ import annotations

import numpy as np
import torch

from md4_dist.diffusion.forward import Noise, draw_noise

TRAIN, EVAL = 0, 1  # purposes: evaluation sees the same noise at every evaluation


class NoiseByPosition:
    def __init__(self, seed: int, purpose: int, block: int, seq_len: int, masks: int,
                 antithetic: bool, device: torch.device):
        self.seed, self.purpose, self.block, self.seq_len = seed, purpose, block, seq_len
        self.masks, self.antithetic, self.device = masks, antithetic, device
        self._cached: tuple[int, Noise] | None = None

    def _block(self, k: int) -> Noise:
        if self._cached is None or self._cached[0] != k:
            seed = int(np.random.SeedSequence([self.seed, self.purpose, k]).generate_state(1)[0])
            g = torch.Generator(device=self.device).manual_seed(seed)
            self._cached = (k, draw_noise(self.block, self.seq_len, self.masks, g, self.device,
                                          self.antithetic))
        return self._cached[1]

    def __call__(self, positions: torch.Tensor) -> Noise:
        """The Noise rows of these stream positions [b], a CPU tensor (the loader's)."""
        blocks = positions // self.block
        rows = positions % self.block
        if self.device.type == "cuda":  # from pinned memory the copy does not make the host wait
            rows = rows.pin_memory()
        rows = rows.to(self.device, non_blocking=True)
        if bool((blocks == blocks[0]).all()):
            return self._block(int(blocks[0])).rows(rows)
        # A micro-batch that spans two blocks: only when a run starts mid-block (a reader state
        # from another global batch size).
        t = torch.empty(len(positions), device=self.device)
        u = torch.empty((self.masks, len(positions), self.seq_len), device=self.device)
        for k in blocks.unique().tolist():
            mine = (blocks == k).to(self.device)
            part = self._block(k).rows(rows[mine])
            t[mine], u[:, mine] = part.t, part.u
        return Noise(t, u)
