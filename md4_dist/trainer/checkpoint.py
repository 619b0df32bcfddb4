"""Checkpoints through Ray Train: each rank writes its share into a local directory, and
`ray.train.report` merges the ranks' directories into one under `<run_dir>/checkpoints/` and
registers it once every rank has reported. Ray keeps the last `checkpoint.keep`, hands the latest
registered one to restarted workers (`ray.train.get_checkpoint()`), and restores its record from
the run directory when the same command runs again, so a checkpoint is either whole or unknown.
Each attempt (a start or restart of the worker group) writes under names of its own, so files of
an attempt that died mid-save never mix into a later checkpoint of the same step; `discard_after`
removes them. What a checkpoint holds, and its names, are md4_dist/checkpoint_format.py's: the
use side reads the same format without this module.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch
import torch.distributed as dist

from md4_dist.checkpoint_format import (CHECKPOINTS, FORMAT_VERSION, STATE, TAG, CheckpointError,
                                        deepspeed_reading, dir_name, load_file, rank_file, step_of_dir,
                                        to_universal, version_problem)


def save(engine, step: int, state: dict, rank_state: dict, metrics: dict, rank: int,
         attempt: int) -> dict:
    """Every rank calls this at the same step (it is a barrier). Returns what it cost: the
    checkpoint's bytes (all ranks), seconds writing this rank's files, seconds committing them
    (Ray moving them into the run directory, and registering the checkpoint)."""
    import ray.train

    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    # The universal conversion of a resize refuses ZeRO-1/2 shards that lack this record (it
    # names the tensor-parallel layouts of Megatron-style clients); ours has none, so it is empty.
    # DeepSpeed writes the module's attribute into the checkpoint.
    setattr(engine.module, UNIVERSAL_CHECKPOINT_INFO, {})
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="md4-ckpt-") as d:
        engine.save_checkpoint(d, tag=TAG, save_latest=False)
        torch.save(rank_state, os.path.join(d, rank_file(rank)))
        if rank == 0:
            with open(os.path.join(d, STATE), "w") as f:
                json.dump({"format_version": FORMAT_VERSION, "step": step, **state}, f, indent=1)
        size = torch.tensor([sum(os.path.getsize(os.path.join(r, n))
                                 for r, _, names in os.walk(d) for n in names)],
                            dtype=torch.float64, device=engine.device)
        dist.all_reduce(size)
        written = time.perf_counter()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=dir_name(step, attempt))
    return {"bytes": size.item(), "write_s": written - began, "commit_s": time.perf_counter() - written}


def discard_after(run_dir: str, storage, step: int) -> list[str]:
    """Delete checkpoint directories past `step`, that of the latest registered checkpoint (0:
    none). Ray would resume from any of them had it been registered: they are what attempts that
    died while writing left behind. Returns their names."""
    from md4_dist.data.storage import explain, filesystem, join, list_dir

    root = join(run_dir, CHECKPOINTS)
    stale = [n for n in list_dir(root, storage) if n.startswith("checkpoint-") and step_of_dir(n) > step]
    for name in stale:
        try:
            fs, path = filesystem(join(root, name), storage)
            fs.rm(path, recursive=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the URL named
            raise explain(join(root, name), e) from e
    return stale


def registered():
    """The latest checkpoint Ray has registered for this run, or None."""
    import ray.train

    return ray.train.get_checkpoint()


def step_of(checkpoint) -> int:
    """The step a checkpoint was written after; 0 for None."""
    return 0 if checkpoint is None else step_of_dir(_name(checkpoint))


def choose(newest, rank: int, world: int, device: torch.device) -> tuple[object, dict] | None:
    """(the checkpoint to resume from, its state.json), or None when the run has none yet. Read
    before DeepSpeed starts: a checkpoint of another world size changes its config.

    `newest`, unless a file of it cannot be read (a truncated shard, a disk fault): then the one
    before, with a warning naming what was wrong. Every rank reads its share of the files and all
    agree, so no rank starts loading what another found broken."""
    if newest is None:
        return None
    skipped = []
    for checkpoint in _newest_first(newest):
        state, problem = _inspect(checkpoint, rank, world)
        if problem is not None:  # said by the rank that found it
            print(f"warning: checkpoint {checkpoint.path} cannot be loaded: {problem}", flush=True)
        bad = torch.tensor([0 if problem is None else 1], device=device)  # NCCL: on the GPU
        dist.all_reduce(bad)
        if not bad.item():
            if skipped and rank == 0:
                print(f"warning: resuming from {checkpoint.path} instead of the newer "
                      f"{', '.join(skipped)}", flush=True)
            return checkpoint, state
        skipped.append(_name(checkpoint))
    raise CheckpointError(f"no checkpoint of this run can be loaded (tried {', '.join(skipped)}; "
                          "the warnings above say why)")


def _newest_first(newest) -> list:
    """The registered checkpoint Ray resumes from, then the older ones beside it by step."""
    import pyarrow.fs
    import ray.train

    parent = os.path.dirname(newest.path.rstrip("/"))
    infos = newest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    older = sorted((i for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith("checkpoint-") and step_of_dir(i.base_name) < step_of(newest)),
                   key=lambda i: -step_of_dir(i.base_name))
    older = [i.path for i in older]
    return [newest] + [ray.train.Checkpoint(path=p, filesystem=newest.filesystem) for p in older]


def _name(checkpoint) -> str:
    return os.path.basename(checkpoint.path.rstrip("/"))


def _inspect(checkpoint, rank: int, world: int) -> tuple[dict | None, str | None]:
    """(state.json, None) when this rank's share of the checkpoint's files reads back whole,
    else (None, what is wrong)."""
    with checkpoint.as_directory() as d:
        try:
            with open(os.path.join(d, STATE)) as f:
                state = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            return None, f"unreadable state.json ({e})"
        problem = version_problem(state)
        if problem is not None:
            return None, problem
        files = sorted(os.path.relpath(os.path.join(root, n), d)
                       for root, _, names in os.walk(d) for n in names if n.endswith(".pt"))
        expected = state["world_size"]
        if any(rank_file(r) not in files for r in range(expected)):
            return None, f"it should hold rank-*.pt for {expected} ranks"
        for name in files[rank::world]:  # each rank reads its share: together, every file once
            try:  # weights only: a file crafted to run code is refused, and named
                load_file(os.path.join(d, name), shown=name)
            except CheckpointError as e:
                return None, str(e)
    return state, None


def converts(state: dict, world: int, zero_stage: int) -> bool:
    """Whether resuming from a checkpoint with `state` at `world` goes through the universal
    conversion (the engine must then be started with `load_universal`): the world size changed
    and the shards are partitioned; stage 0's one file loads at any size."""
    return state["world_size"] != world and zero_stage > 0


def load(engine, checkpoint, state: dict, rank: int, world: int) -> list[dict]:
    """Load the checkpoint into the engine; returns the rank states of the ranks that wrote it
    (all of them when the world size changed, else this rank's alone).

    At another world size the ZeRO shards no longer fit: DeepSpeed's universal checkpoint
    conversion turns them into whole per-parameter tensors (weights and Adam moments), which the
    engine, started with `load_universal`, splits for the new world size. Each rank converts its
    own copy, so no rank waits on a shared file system."""
    resized = state["world_size"] != world
    with checkpoint.as_directory() as d, tempfile.TemporaryDirectory(prefix="md4-universal-") as u:
        load_dir = d
        # DeepSpeed's own reads (it passes weights_only=False) go through the same allow-list
        with deepspeed_reading(checkpoint.path, d):
            if converts(state, world, engine.zero_optimization_stage()):
                began = time.perf_counter()
                to_universal(os.path.join(d, TAG), os.path.join(u, TAG))
                print(f"rank {rank}: converted to a universal checkpoint in "
                      f"{time.perf_counter() - began:.1f} s", flush=True)
                load_dir = u
            path, _ = engine.load_checkpoint(load_dir, tag=TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"checkpoint {checkpoint.path}: DeepSpeed found no checkpoint in it")
        ranks = range(state["world_size"]) if resized else [rank]
        return [load_file(os.path.join(d, rank_file(r)), shown=f"{checkpoint.path}/{rank_file(r)}")
                for r in ranks]
