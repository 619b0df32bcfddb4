"""The loop's own state, beside DeepSpeed's: what a step depends on that is not in the engine.

    state = TrainState(device)                        # a new run
    state.load(ranks, same_world, rank)               # a resumed one (checkpoint.load's shares)
    state.sums.add(out, rows)                         # every micro-batch
    loss, bits, rows = state.sums.pooled()            # at a record: every rank, at the same steps
    checkpoint.save(..., rank_state=state.rank_state() | {...})

`Every` says when something periodic is due (records, evaluation, samples, checkpoints): every
`every` steps and at the last step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Every:
    every: int  # 0: never
    last: int  # the run's last step, always due when `every` > 0

    def __call__(self, step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == self.last)


class MetricSums:
    """Sums since the last record: the surrogate loss x rows, the NELBO in bits per token x rows,
    and the rows, so that every row counts once at any world size. One float64 tensor [3], for
    one all-reduce; saved with each rank's share of a checkpoint."""

    def __init__(self, device: torch.device):
        self.values = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, out: dict, rows: int) -> None:
        one = torch.ones((), dtype=torch.float64, device=self.values.device)
        self.values += torch.stack([out["loss"].detach().double(), out["bits_per_token"].double(), one]) * rows

    def pooled(self) -> tuple[float, float, float]:
        """(mean loss, mean bits per token, rows) over every rank since the last record; then zero."""
        dist.all_reduce(self.values)
        loss, bits, rows = self.values.tolist()
        self.values.zero_()
        if not rows:  # no rows since the last record (not in training, whose batches are full)
            return float("nan"), float("nan"), rows
        return loss / rows, bits / rows, rows


class TrainState:
    """Steps done, where the data stream stands after them, the metric sums since the last
    record, and this attempt's name. The step and the reader position are shared by every rank
    (the checkpoint's state); the sums and the CPU RNG are each rank's own. The attempt (rank 0's
    clock when this group started, the same on every rank) is new at every (re)start: it tells
    the ledger's entries and a checkpoint's writers apart."""

    def __init__(self, device: torch.device):
        self.step = 0
        self.reader: dict | None = None  # the reader's state after `step` steps (None: the start)
        self.sums = MetricSums(device)
        attempt = torch.tensor([time.time_ns()], device=device)
        dist.broadcast(attempt, 0)
        self.attempt = int(attempt.item())

    def load(self, state: dict, ranks: list[dict], world: int, rank: int) -> None:
        """From a checkpoint: its shared `state` and the rank shares `checkpoint.load` returned
        (this rank's own at the same world size, every rank's after a resize)."""
        self.step, self.reader = state["step"], state["reader"]
        if state["world_size"] == world:
            self.sums.values.copy_(ranks[0]["sums"])
            torch.set_rng_state(ranks[0]["rng"])
        elif rank == 0:  # resized: the partial sums pooled on rank 0
            self.sums.values.copy_(sum(r["sums"] for r in ranks))

    def rank_state(self) -> dict:
        return {"sums": self.sums.values.cpu(), "rng": torch.get_rng_state()}
