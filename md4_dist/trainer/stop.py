"""Saving before the end without losing work: a SIGTERM to the driver, or Ray preempting a node.

- SIGTERM to the driver (`ray job stop`, a scheduler ending the job, `kill`, `timeout`, or to its
  whole process group): every worker saves a checkpoint after the step it is in, and the run
  stops. The same command resumes it. A second SIGTERM (`SAME_REQUEST_S` or more later) aborts
  at once. The embedded Ray instance lives in a session of its own, so that a signal to the
  driver's group reaches the driver only (trainer/embedded_ray.py).
- Ray draining a node for preemption (a spot reclaim announced with a deadline): every worker
  saves a checkpoint and training goes on; when the node goes, Ray restarts the group from it.

Only the driver sees its signals, so it records the request in a small actor. Rank 0 polls that
actor without waiting, and broadcasts a verdict to every rank after every step: all ranks save at
the same step or none does. Ray's preemption notice is itself a collective call (every rank, the
same number of times); the verdict also says when to make it, every `PREEMPTION_POLL_S` seconds
on rank 0's clock, so the steps between pay one small broadcast only.
"""

from __future__ import annotations

import signal
import sys
import time
from datetime import timedelta

import ray
import torch
import torch.distributed as dist

PREEMPTION_POLL_S = 5.0  # as often as Ray Train's own watcher reads the drain state
# One request can arrive as two SIGTERMs a moment apart: `timeout` signals its child, then its
# whole process group, which holds the child too. Only a later one asks to exit at once.
SAME_REQUEST_S = 2.0


@ray.remote(num_cpus=0)
class StopRequest:
    """Holds why the driver wants the run to stop ("" while it does not)."""

    def __init__(self):
        self._reason = ""

    def set(self, reason: str) -> None:
        self._reason = self._reason or reason

    def get(self) -> str:
        return self._reason


def on_sigterm(request) -> callable:
    """Make SIGTERM ask the workers to checkpoint and stop; a second SIGTERM exits at once.
    Call from the driver's main thread after `ray.init` (which sets a handler of its own).
    Returns a function that restores the handler before."""
    received = []  # when the first SIGTERM came (time.monotonic)

    def handler(signum, frame):
        if received and time.monotonic() - received[0] < SAME_REQUEST_S:
            return
        if received:
            print("a second SIGTERM: exiting without waiting for the checkpoint", flush=True)
            sys.exit(128 + signum)
        received.append(time.monotonic())
        request.set.remote("SIGTERM")
        print("SIGTERM: every worker saves a checkpoint after its current step, then the run "
              "stops (SIGTERM again to exit at once)", flush=True)

    before = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, before)


class StopWatch:
    """On every worker: after each step, `check()` gives every rank the same answer."""

    def __init__(self, request, rank: int, timeout_s: float):
        self.request, self.rank = request, rank
        self.pending = request.get.remote() if rank == 0 else None
        # The verdict travels on the CPU: a GPU tensor would make every step wait for the GPU.
        self.group = None if dist.get_backend() == "gloo" else \
            dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.stop_reason = ""
        self.last_poll = time.monotonic()
        self.notice = None  # the preempted nodes already saved for

    def check(self) -> tuple[str, bool]:
        """(why to save now, or ""; whether to stop after saving). Every rank, every step."""
        verdict = torch.zeros(2, dtype=torch.int32)
        if self.rank == 0:
            if self.pending is not None and ray.wait([self.pending], timeout=0)[0]:
                self.stop_reason = ray.get(self.pending)
                self.pending = None if self.stop_reason else self.request.get.remote()
            verdict[0] = bool(self.stop_reason)
            verdict[1] = time.monotonic() - self.last_poll >= PREEMPTION_POLL_S
        dist.broadcast(verdict, 0, group=self.group)
        if verdict[0]:
            return "a SIGTERM to the driver", True
        if verdict[1]:
            self.last_poll = time.monotonic()
            info = ray.train.get_preemption_info()  # the same answer on every rank
            nodes = tuple(info.preempted_node_ids) if info is not None else None
            if nodes and nodes != self.notice:
                self.notice = nodes
                left = "" if not info.deadline_ms else \
                    f", {info.deadline_ms / 1000 - time.time():.0f} s before its deadline"
                return f"Ray is preempting node {', '.join(n[:12] for n in nodes)}{left}", False
        return "", False
