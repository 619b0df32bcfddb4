"""An exponential moving average of the parameters, kept where ZeRO-3 keeps them: each rank holds
the average of its own partition only, so the model is never gathered for it.

    ema = PartitionedEMA(engine.module, decay=0.9999)
    engine.step(); ema.update()          # after every optimizer step
    with ema.swapped():                  # evaluate with the averaged weights
        ...                              # ZeRO-3 gathers them from the partitions as usual

Under ZeRO-3 a parameter's local share is `p.ds_tensor`, the slice of it that the optimizer step
writes (`p.data` is empty between forwards). Small parameters that ZeRO-3 keeps whole on every
rank (below `stage3_param_persistence_threshold`) are partitioned too and gathered again after
each step: `swapped()` does the same with them. Below stage 3 every rank holds whole parameters,
and so does the average. The average is kept in fp32 whatever the training precision. A
checkpoint holds every rank's `state_dict()`; `checkpoint_format.whole_average` joins them whole.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def _zero3(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


def local_share(p: nn.Parameter) -> torch.Tensor:
    """The part of p that this rank stores and the optimizer step writes."""
    return p.ds_tensor if _zero3(p) else p.data


class PartitionedEMA:
    def __init__(self, module: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.params = list(module.parameters())
        self.shadow = [local_share(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        current = [local_share(p).float() for p in self.params]  # no copy for fp32 parameters
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    @torch.no_grad()
    def _write(self, values: list[torch.Tensor]) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # ZeRO-3 parameters held whole right now (the persistent ones, external ones): their
        # whole copy would shadow the partition, so drop it and gather it again from the new one.
        whole = [p for p in self.params if _zero3(p) and p.ds_status == ZeroParamStatus.AVAILABLE]
        if whole:
            whole[0].partition(param_list=whole)
        for p, v in zip(self.params, values):
            local_share(p).copy_(v)
        if whole:
            whole[0].all_gather(param_list=whole)

    @contextmanager
    def swapped(self):
        """The averaged weights in place of the trained ones, restored bit for bit on exit.
        Under ZeRO-3 every rank must enter it (it may gather)."""
        saved = [local_share(p).detach().clone() for p in self.params]
        self._write(self.shadow)
        try:
            yield
        finally:
            self._write(saved)

    def state_dict(self) -> dict:
        """This rank's share: load it back at the same world size and ZeRO stage."""
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    @torch.no_grad()
    def load_resharded(self, shares: list[dict], rank: int, world: int) -> None:
        """This rank's share at world size `world`, from every rank's state_dict of a run at
        another world size (ZeRO-3 pads each parameter to world x share before splitting it)."""
        for i, (p, s) in enumerate(zip(self.params, self.shadow)):
            if not _zero3(p):  # whole on every rank
                s.copy_(shares[0]["shadow"][i])
                continue
            whole = torch.cat([share["shadow"][i].flatten() for share in shares])[:p.ds_numel]
            mine = whole[rank * s.numel():(rank + 1) * s.numel()]
            s.zero_()
            s[:mine.numel()].copy_(mine)

    def load_state_dict(self, state: dict) -> None:
        shapes = [tuple(s.shape) for s in self.shadow]
        if [tuple(s.shape) for s in state["shadow"]] != shapes:
            raise ValueError("EMA state does not match this rank's partition (another world size "
                             "or ZeRO stage?)")
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
