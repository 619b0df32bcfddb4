"""Checkpoints through Ray Train: each rank writes its share into a local directory, and
`ray.train.report` merges the ranks' directories into one under `<run_dir>/checkpoints/` and
registers it once every rank has reported. Ray keeps the last `checkpoint.keep`, hands the latest
registered one to restarted workers (`ray.train.get_checkpoint()`), and restores its record from
the run directory when the same command runs again, so a checkpoint is either whole or unknown.

    checkpoint-00000100/
      state.json                   step, samples seen, reader state, world size, config (rank 0)
      rank-00000.pt ...            each rank's EMA share, metric sums, RNG states
      step/                        DeepSpeed's own: ZeRO shards, model states, LR schedule
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

FORMAT_VERSION = 1
TAG = "step"  # DeepSpeed's subdirectory; the checkpoint's own directory name carries the step


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded here; the message says why and where."""


def save(engine, step: int, state: dict, rank_state: dict, metrics: dict, rank: int) -> None:
    """Every rank calls this at the same step (it is a barrier)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="md4-ckpt-") as d:
        engine.save_checkpoint(d, tag=TAG, save_latest=False)
        torch.save(rank_state, os.path.join(d, f"rank-{rank:05d}.pt"))
        if rank == 0:
            with open(os.path.join(d, "state.json"), "w") as f:
                json.dump({"format_version": FORMAT_VERSION, "step": step, **state}, f, indent=1)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint-{step:08d}")


def load(engine, rank: int, world: int) -> tuple[dict, dict] | None:
    """(state, this rank's rank_state) from the latest registered checkpoint, loaded into the
    engine; None when the run has none yet."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        try:
            with open(os.path.join(d, "state.json")) as f:
                state = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint {checkpoint.path}: unreadable state.json ({e})") from e
        if state.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {checkpoint.path} has format version "
                                  f"{state.get('format_version')}; this code reads {FORMAT_VERSION}")
        if state["world_size"] != world:
            raise CheckpointError(f"checkpoint {checkpoint.path} was written by {state['world_size']} "
                                  f"workers and this run has {world}: resizing is not supported yet")
        path, _ = engine.load_checkpoint(d, tag=TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"checkpoint {checkpoint.path}: DeepSpeed found no checkpoint in it")
        rank_state = torch.load(os.path.join(d, f"rank-{rank:05d}.pt"), weights_only=False)
    return state, rank_state
