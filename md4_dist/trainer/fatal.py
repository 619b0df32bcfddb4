"""Errors no restart can cure (a damaged shard, a manifest that disagrees with its data, training
that went NaN: trainer/finite.py) end the run at once instead of being retried
`checkpoint.max_failures` times.

Ray Train V2 retries every failure of the worker group alike (its DefaultFailurePolicy has no
list of errors to give up on), so the decision is made here: the worker that meets such an error
records it in a small actor of the driver's before raising; the restarted group finds the record
and returns at once, so `fit` ends; the driver then raises the recorded error.

    record = FatalRecord.remote()                      # driver, passed in train_loop_config
    if earlier_failure(record): return                 # worker, first thing
    with recorded_as_fatal(record, rank): ...          # worker, around the whole run
    raise_if_recorded(record)                          # driver, after fit (also when fit raised)
"""

from __future__ import annotations

from contextlib import contextmanager

import ray

from md4_dist.data.manifest import ManifestError
from md4_dist.data.reader import CorruptShardError
from md4_dist.trainer.finite import NonFiniteTraining

# A restart reads the same bytes and repeats the same steps: these fail the same way every time.
UNCURABLE = (CorruptShardError, ManifestError, NonFiniteTraining)
ACTOR_TIMEOUT_S = 60  # the actor lives on the driver's node; a wait longer than this is a lost driver


class UncurableError(RuntimeError):
    """Raised by the driver: a worker met an error that a restart cannot cure; names the culprit."""


@ray.remote(num_cpus=0)
class FatalRecord:
    """The first uncurable error a worker met ("" while none)."""

    def __init__(self):
        self._message = ""

    def set(self, message: str) -> None:
        self._message = self._message or message

    def get(self) -> str:
        return self._message


def earlier_failure(record) -> str:
    """The error an earlier attempt of this run recorded, or ""."""
    return ray.get(record.get.remote(), timeout=ACTOR_TIMEOUT_S)


@contextmanager
def recorded_as_fatal(record, rank: int):
    """Record an uncurable error for the driver, then let it propagate (Ray restarts the group,
    which returns at once on finding the record)."""
    try:
        yield
    except UNCURABLE as e:
        ray.get(record.set.remote(f"rank {rank}: {original_message(e)}"), timeout=ACTOR_TIMEOUT_S)
        raise


def original_message(e: BaseException) -> str:
    """The error's own message. An error raised in a DataLoader worker process comes back as the
    same type whose message is "Caught X in DataLoader worker process k" and the traceback; its
    last line is the original "X: message"."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.strip().splitlines()[-1]  # "md4_dist.data.reader.CorruptShardError: ..."
        head, _, rest = last.partition(": ")
        return rest if head.endswith(type(e).__name__) else last
    return text


def raise_if_recorded(record) -> None:
    message = earlier_failure(record)
    if message:
        raise UncurableError(f"{message} (a restart cannot cure this: the run stops)")
