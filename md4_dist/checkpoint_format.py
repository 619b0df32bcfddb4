"""A training checkpoint on disk: what training writes (trainer/checkpoint.py, through Ray Train)
and what the use side reads whole (inference/consolidate.py). Its names and version live here
alone, so the two sides cannot drift apart.

    <run_dir>/checkpoints/             Ray Train's, with its record of them (SNAPSHOT)
      checkpoint-00000100-<attempt>/   dir_name(step, attempt)
        state.json                     step, samples seen, reader state, world size, config, the
                                       data's tokenizer record and EOS id (rank 0)
        rank-00000.pt ...              rank_file(r): each rank's EMA share, metric sums, RNG states
        step/                          TAG, DeepSpeed's own: ZeRO shards, model states, LR schedule

A change that older code cannot read goes with a new FORMAT_VERSION, which state.json records;
both sides refuse a version they do not know (`version_problem`).
"""

from __future__ import annotations

from typing import Callable

import torch

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"  # the run directory's folder Ray Train keeps them in
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints
STATE = "state.json"
TAG = "step"  # DeepSpeed's subdirectory; the checkpoint's own directory name carries the step


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded here; the message says why and where."""


def dir_name(step: int, attempt: int) -> str:
    """The checkpoint's directory: each attempt (a start or restart of the worker group) writes
    under names of its own."""
    return f"checkpoint-{step:08d}-{attempt}"


def step_of_dir(name: str) -> int:
    """The step of a checkpoint directory named by `dir_name`."""
    return int(name.split("-")[1])


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def version_problem(state: dict) -> str | None:
    """Why this code cannot read a checkpoint with `state` (its state.json), or None."""
    if state.get("format_version") != FORMAT_VERSION:
        return f"format version {state.get('format_version')}; this code reads {FORMAT_VERSION}"
    return None


def ema_shares(load: Callable[[str], dict], world_size: int) -> list[list[torch.Tensor]]:
    """Every rank's EMA share (`PartitionedEMA.state_dict()["shadow"]`), in rank order, of a
    checkpoint written by `world_size` ranks; `load(name)` reads its file `name`."""
    return [load(rank_file(r))["ema"]["shadow"] for r in range(world_size)]


def whole_average(shares: list[list[torch.Tensor]], shapes: list[torch.Size], zero3: bool) -> list[torch.Tensor]:
    """The whole averaged parameters, in fp32, from every rank's `state_dict()["shadow"]` (rank
    order): under ZeRO-3 each rank holds a flat slice of every parameter, the last one padded;
    below it every rank holds the whole parameter."""
    if not zero3:
        return [s.float() for s in shares[0]]
    return [torch.cat([share[i].flatten() for share in shares])[:shape.numel()].view(shape).float()
            for i, shape in enumerate(shapes)]


def to_universal(src: str, dst: str) -> None:
    """DeepSpeed's universal conversion of the ZeRO shards in `src` (a checkpoint's TAG directory)
    into whole per-parameter tensors (weights and Adam moments) under `dst`."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=src, output_folder=dst, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    ds_to_universal.main(args)
