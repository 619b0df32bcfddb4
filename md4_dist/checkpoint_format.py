"""A training checkpoint on disk: what training writes (trainer/checkpoint.py, through Ray Train)
and what the use side reads whole (inference/consolidate.py). Its names and version live here
alone, so the two sides cannot drift apart.

    <run_dir>/checkpoints/             Ray Train's, with its record of them (SNAPSHOT)
      checkpoint-00000100-<attempt>/   dir_name(step, attempt)
        state.json                     step, samples seen, reader state, world size, config, the
                                       data's tokenizer record and EOS id (rank 0)
        rank-00000.pt ...              rank_file(r): each rank's EMA share, metric sums, RNG states
        step/                          TAG, DeepSpeed's own: ZeRO shards, model states, LR schedule
        damaged.txt                    DAMAGED: only in one a resume found it cannot load and set
                                       aside; it says why. Nothing loads it again

A change that older code cannot read goes with a new FORMAT_VERSION, which state.json records;
both sides refuse a version they do not know (`version_problem`).

Its .pt files are pickles, and unpickling can run any code the file names. Both sides read them
inside `weights_only_loads()` alone: tensors, plain containers and the few DeepSpeed classes
its files hold (`_DEEPSPEED_CLASSES`), also where DeepSpeed's own code reads them.
"""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from typing import Callable

import torch

FORMAT_VERSION = 3  # 2: a block's weights in one tensor, `blocks.N.params` (model.Block); 3: the
# time MLP's and the output adaLN's too, `time.params` (model.TimeConditioning)
CHECKPOINTS = "checkpoints"  # the run directory's folder Ray Train keeps them in
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints
STATE = "state.json"
DAMAGED = "damaged.txt"  # the note in a checkpoint set aside as damaged (trainer/checkpoint.py)
TAG = "step"  # DeepSpeed's subdirectory; the checkpoint's own directory name carries the step


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded here; the message says why and where."""


def _deepspeed_classes() -> list[type]:
    """What DeepSpeed pickles into its checkpoint files besides tensors, numbers, strings and
    containers, which torch's weights-only unpickler allows of itself: those found in the files
    of each ZeRO stage (0 to 3) and precision (bf16, fp32) md4_dist runs, and of their universal
    conversion (tests/test_checkpoint.py resumes and consolidates each)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        LossScaler,  # the ZeRO optimizers' loss scaler (static in bf16 and fp32 runs), in their
                     # *_optim_states.pt and the universal conversion's zero/optimizer_state.pt
        ZeroStageEnum,  # the stage those optimizer states were written at, beside it
        fragment_address,  # bf16 ZeRO-1/2 (BF16_Optimizer) shards: where each parameter's slice
                           # lies in its flat group
    ]


# torch.load reads with weights_only=True wherever this is set, even where the caller passes
# weights_only=False, as DeepSpeed's engine.load_checkpoint, its universal conversion and
# zero_to_fp32 all do; torch reads it at each call.
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


@contextmanager
def weights_only_loads(deepspeed: bool = True):
    """Every torch.load inside, md4_dist's and DeepSpeed's, unpickles nothing but tensors, plain
    data and (`deepspeed`) `_deepspeed_classes()`: a file that names anything else (os.system, a
    class of its own) is refused with pickle.UnpicklingError instead of running it. Without
    `deepspeed`, DeepSpeed is not imported (its import prints to stdout, the CLIs' output)."""
    before = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_classes() if deepspeed else []):
            yield
    finally:
        if before is None:
            del os.environ[_FORCE_WEIGHTS_ONLY]
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = before


def load_file(path: str, shown: str | None = None, deepspeed: bool = True):
    """torch.load of a checkpoint's file at `path`, on the CPU, inside `weights_only_loads()`
    (`deepspeed`: a file DeepSpeed wrote, which may hold its classes). A file that cannot be read
    is a CheckpointError that names it (`shown`, e.g. its URL, else `path`) and says whether it
    was refused or is damaged (`unreadable`)."""
    try:
        with weights_only_loads(deepspeed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the reader's error, the file is named
        raise CheckpointError(unreadable(shown or path, e)) from None


@contextmanager
def deepspeed_reading(name: str, directory: str):
    """DeepSpeed's code reading the checkpoint files under `directory` (engine.load_checkpoint,
    the universal conversion, zero_to_fp32), inside `weights_only_loads()`. A file it refuses is
    a CheckpointError naming it: `name` (the checkpoint as the user gave it) and the files there
    whose pickles name what the unpickler does not allow."""
    try:
        with weights_only_loads():
            yield
    except pickle.UnpicklingError as e:
        culprits = ", ".join(_refused_files(directory)) or "a file of it"
        raise CheckpointError(unreadable(f"{name}: {culprits}", e)) from None


def _refused_files(directory: str) -> list[str]:
    """The .pt files under `directory` (relative paths) whose pickles name functions or classes
    that `weights_only_loads()` refuses; torch reads their pickles only, not their tensors."""
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in _deepspeed_classes()}
    found = []
    for root, _, names in os.walk(directory):
        for n in sorted(names):
            if not n.endswith(".pt"):
                continue
            path = os.path.join(root, n)
            try:
                unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            except Exception:  # noqa: BLE001 - not torch's zip format: not one this can name
                continue
            if unsafe - allowed:
                found.append(os.path.relpath(path, directory))
    return sorted(found)


def unreadable(name: str, e: Exception) -> str:
    """What to say of a file (or a checkpoint) `name` that torch.load, inside
    `weights_only_loads()`, could not read: `e` is its error."""
    refused = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
    if isinstance(e, pickle.UnpicklingError) and refused:  # it names code: a function or a class
        return (f"{name} is refused: it holds an object no md4_dist checkpoint holds, whose loading "
                f"would run code ({refused[0]}); it was made to run code, or by other software")
    return f"{name} is damaged ({type(e).__name__}: {e})"


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
