"""Checkpoints through Ray Train: each rank writes its share into a local directory, and
`ray.train.report` merges the ranks' directories into one under `<run_dir>/checkpoints/` and
registers it once every rank has reported. Ray keeps the last `checkpoint.keep`, hands the latest
registered one to restarted workers (`ray.train.get_checkpoint()`), and restores its record from
the run directory when the same command runs again, so a checkpoint is either whole or unknown.
Each attempt (a start or restart of the worker group) writes under names of its own, so files of
an attempt that died mid-save never mix into a later checkpoint of the same step; `discard_after`
removes them. What a checkpoint holds, and its names, are md4_dist/checkpoint_format.py's: the
use side reads the same format without this module.

A registered checkpoint that cannot be loaded (a truncated shard, a refused file) is passed over
for the newest one before it that can (`choose`), and set aside so that it never takes a good
one's place: Ray keeps the last `checkpoint.keep` it registered, damaged or not, so the good one
is registered again (a copy under a new name) and the damaged one, marked with a note, goes
first when Ray drops checkpoints (`_set_aside`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch
import torch.distributed as dist

from md4_dist.checkpoint_format import (CHECKPOINTS, DAMAGED, FORMAT_VERSION, STATE, TAG, CheckpointError,
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
    died while writing left behind. Returns their names. Those set aside as damaged stay: Ray
    still lists them, and deletes them itself when it drops them (`_set_aside`)."""
    from md4_dist.data.storage import explain, filesystem, join, list_dir

    root = join(run_dir, CHECKPOINTS)
    stale = []
    for name in list_dir(root, storage):
        if not name.startswith("checkpoint-") or step_of_dir(name) <= step:
            continue
        try:
            fs, path = filesystem(join(root, name), storage)
            if fs.exists(f"{path}/{DAMAGED}"):
                continue
            fs.rm(path, recursive=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the URL named
            raise explain(join(root, name), e) from e
        stale.append(name)
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

    `newest`, unless a file of it cannot be read (a truncated shard, a disk fault, a file that
    would run code): then the one before, with a warning naming what was wrong, and the ones
    passed over are set aside (`_set_aside`; the checkpoint returned is then the good one's
    copy). Every rank reads its share of the files and all agree, so no rank starts loading what
    another found broken, and all set aside the same ones."""
    if newest is None:
        return None
    skipped, problems = [], {}
    for checkpoint in _newest_first(newest):
        state, problem = _inspect(checkpoint, rank, world)
        if problem is not None:  # said by the rank that found it
            print(f"warning: checkpoint {checkpoint.path} cannot be loaded: {problem}", flush=True)
            problems[_name(checkpoint)] = problem
        bad = torch.tensor([0 if problem is None else 1], device=device)  # NCCL: on the GPU
        dist.all_reduce(bad)
        if not bad.item():
            if skipped:
                if rank == 0:
                    print(f"warning: resuming from {checkpoint.path} instead of the newer "
                          f"{', '.join(_name(c) for c in skipped)}", flush=True)
                checkpoint = _set_aside(skipped, problems, checkpoint, rank, device)
            return checkpoint, state
        skipped.append(checkpoint)
    raise CheckpointError(f"no checkpoint of this run can be loaded (tried "
                          f"{', '.join(_name(c) for c in skipped)}; the warnings above say why)")


def _set_aside(damaged: list, problems: dict[str, str], good, rank: int, device: torch.device):
    """Keep the damaged checkpoints from taking the good one's place; returns the good one's copy
    to resume from. Every rank calls this with the same checkpoints.

    Ray keeps the last `checkpoint.keep` checkpoints it registered, damaged or not, and deletes
    the oldest first: left so, the next checkpoint would push `good` out and keep the damaged
    one. So rank 0 marks each damaged one with a note (DAMAGED: this module and the use side
    pass it by, and `discard_after` leaves it for Ray, which still lists it) and copies `good`
    under a name of its own, which every rank then reports to Ray (a barrier). Registered after
    the damaged ones, the copy outlives them: Ray drops the original (which nothing reads from
    then on) and the damaged ones before it, and hands the copy to a restarted group."""
    import ray.train
    from ray.train import CheckpointUploadMode

    stamp = torch.tensor([time.time_ns()], device=device)  # rank 0's: one name for all ranks
    dist.broadcast(stamp, 0)
    parent = os.path.dirname(good.path.rstrip("/"))
    copy = ray.train.Checkpoint(path=f"{parent}/{dir_name(step_of(good), int(stamp.item()))}",
                                filesystem=good.filesystem)
    if rank == 0:
        fs = good.filesystem
        for checkpoint in damaged:
            why = problems.get(_name(checkpoint), "a file another rank read (the run's log names it)")
            with fs.open_output_stream(f"{checkpoint.path}/{DAMAGED}") as f:
                f.write(f"{_name(checkpoint)} cannot be loaded: {why}\nThe run resumed from {_name(good)} "
                        f"instead, registered again as {_name(copy)}. Ray Train deletes this directory "
                        "when it drops it from the checkpoints it keeps.\n".encode())
        _copy(fs, good.path, copy.path)
        print(f"set aside {', '.join(_name(c) for c in damaged)} (each holds {DAMAGED}); "
              f"{_name(good)} registered again as {_name(copy)}", flush=True)
    ray.train.report({"step": step_of(good)}, checkpoint=copy if rank == 0 else None,
                     checkpoint_dir_name=_name(copy), checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
    return copy


def _copy(fs, src: str, dst: str) -> None:
    """Copy the checkpoint directory `src` to `dst` on the pyarrow filesystem `fs` (on object
    storage, copies within the store); state.json last, so that a copy cut short reads as
    damaged, never as whole."""
    import pyarrow.fs

    files = [i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(src, recursive=True))
             if i.type == pyarrow.fs.FileType.File]
    for path in sorted(files, key=lambda p: os.path.basename(p) == STATE):
        target = f"{dst}/{os.path.relpath(path, src)}"
        fs.create_dir(os.path.dirname(target))
        fs.copy_file(path, target)


def _newest_first(newest) -> list:
    """The registered checkpoint Ray resumes from, then the older ones beside it by step."""
    import pyarrow.fs
    import ray.train

    parent = os.path.dirname(newest.path.rstrip("/"))
    infos = newest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    older = sorted((i for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith("checkpoint-") and step_of_dir(i.base_name) < step_of(newest)),
                   key=lambda i: (-step_of_dir(i.base_name), i.base_name))
    older = [i.path for i in older if not _marked(newest.filesystem, i.path)]
    return [newest] + [ray.train.Checkpoint(path=p, filesystem=newest.filesystem) for p in older]


def _marked(fs, path: str) -> bool:
    """Whether the checkpoint directory `path` was set aside as damaged."""
    import pyarrow.fs

    return fs.get_file_info(f"{path}/{DAMAGED}").type != pyarrow.fs.FileType.NotFound


def _name(checkpoint) -> str:
    return os.path.basename(checkpoint.path.rstrip("/"))


def _inspect(checkpoint, rank: int, world: int) -> tuple[dict | None, str | None]:
    """(state.json, None) when this rank's share of the checkpoint's files reads back whole,
    else (None, what is wrong)."""
    with checkpoint.as_directory() as d:
        if os.path.exists(os.path.join(d, DAMAGED)):
            with open(os.path.join(d, DAMAGED)) as f:
                return None, f"it was set aside: {f.readline().strip()}"
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
