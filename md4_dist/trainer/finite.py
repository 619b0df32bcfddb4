"""Training that went NaN or infinite stops the run with an error, instead of going on for days
and writing checkpoints of weights that can no longer train.

DeepSpeed does not stop it: at ZeRO-3, and in fp32, it applies an optimizer step whose gradient
is not finite; in bf16 at ZeRO-1 and 2 its overflow check would skip the step and say nothing,
at the price of a host wait every step, and md4_dist turns that check off (trainer/ds_config.py):
the NaN reaches the weights and the checks here see it. Two checks, neither of which costs the
step a host wait:
- at each record, the pooled loss (already read on the host for the record): the record is
  written, with its loss null, and the run stops;
- before each checkpoint, every rank's share of the weights and its loss sums since the last
  record: no checkpoint is written of weights a record has not yet seen go wrong.
A restart resumes from the last checkpoint and repeats the same steps on the same data (the
reader's and the noise's states are saved), so it would fail again: the error is one of
trainer/fatal.py's, which end the run at once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from md4_dist.trainer.ema import local_share

ADVICE = ("A restart would repeat the same steps on the same data, so the run is not retried; a "
          "new run with a lower optim.lr, a longer optim.warmup_steps or a smaller optim.grad_clip "
          "may train where this one did not")


class NonFiniteTraining(RuntimeError):
    """The loss or the weights went NaN or infinite."""


def loss_error(loss: float, step: int, saved: int) -> NonFiniteTraining:
    return NonFiniteTraining(
        f"the training loss is {loss} at the record of step {step} (the mean over every worker "
        f"since the record before): the run stops, its records and checkpoints ({_latest(saved)}) "
        f"kept. {ADVICE}")


def check_before_checkpoint(module: nn.Module, sums: torch.Tensor, step: int, saved: int) -> None:
    """Raise on every rank alike when any rank's share of the weights, or its loss sums since the
    last record (`sums`), hold a value that is not finite."""
    named = list(module.named_parameters())
    names = [n for (n, _), bad in zip(named, _non_finite([local_share(p) for _, p in named])) if bad]
    flag = torch.tensor([float(bool(names) or not torch.isfinite(sums).all())], device=sums.device)
    dist.all_reduce(flag, dist.ReduceOp.MAX)
    if flag.item():
        where = f"this worker's share of {', '.join(names[:3])}" if names else "another worker's weights or loss"
        raise NonFiniteTraining(
            f"NaN or infinite values after step {step} ({where}): the run stops without writing "
            f"its checkpoint; its records and checkpoints ({_latest(saved)}) kept. {ADVICE}")


def _non_finite(tensors: list[torch.Tensor]) -> list[bool]:
    """Which tensors hold a NaN or an infinity: one read of the device for all of them."""
    if not tensors:
        return []
    return torch.stack([~torch.isfinite(t).all() for t in tensors]).tolist()


def _latest(saved: int) -> str:
    return f"the latest after step {saved}" if saved else "none written yet"
