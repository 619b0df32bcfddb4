"""A torch.profiler trace of the steps `logging.profile_steps` = [first, last] names, written into
the run directory as a Chrome trace (chrome://tracing, https://ui.perfetto.dev):

    <run_dir>/profile/steps-<first>-<last>-rank-<rank>.json

by rank 0, or by every rank with `logging.profile_all_ranks`. CPU activity, and CUDA kernels on
GPU workers; each step is one range named "step <n>" (the micro-batches, the optimizer step, the
EMA). The trace is written when step `last` (or the run's last step) is done, and uploaded like
the other run files when the run directory is on object storage. A run resumed past `first`
profiles the steps of the range it still trains; a run stopped inside the range writes none.

    profiler = StepProfiler(cfg, rank)
    with profiler(step):
        ...one step...
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext

import torch

from md4_dist.config import Config
from md4_dist.data.storage import join
from md4_dist.trainer.metrics import StagedFiles

log = logging.getLogger(__name__)


class StepProfiler:
    def __init__(self, cfg: Config, rank: int):
        steps = cfg.logging.profile_steps
        on = bool(steps) and (rank == 0 or cfg.logging.profile_all_ranks)
        self.first, self.last = (steps[0], min(steps[1], cfg.train.steps)) if on else (0, -1)
        self.cfg, self.rank, self.profile = cfg, rank, None
        self.name = f"profile/steps-{steps[0]}-{steps[1]}-rank-{rank}.json" if on else ""

    def __call__(self, step: int):
        if not self.first <= step <= self.last:
            return nullcontext()
        return self._profiled(step)

    @contextmanager
    def _profiled(self, step: int):
        if self.profile is None:  # the range's first step, or the first this attempt trains
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cfg.cluster.use_gpu:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.start()
        with torch.profiler.record_function(f"step {step}"):
            yield
        if step == self.last:
            self._write()

    def _write(self) -> None:
        self.profile.stop()
        files = StagedFiles(self.cfg.train.run_dir, self.cfg.storage)
        self.profile.export_chrome_trace(files.path(self.name))
        self.profile = None
        try:
            files.upload()
        except Exception as e:  # noqa: BLE001 - a trace is not worth the run
            log.warning("the profiler's trace %s was not uploaded (it stays at %s): %s",
                        join(self.cfg.train.run_dir, self.name), files.path(self.name), e)
            return
        if self.rank == 0:
            print(f"profiled steps {self.first}-{self.last}: {join(self.cfg.train.run_dir, self.name)}",
                  flush=True)
