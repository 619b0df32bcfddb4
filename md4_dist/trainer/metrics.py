"""Rank 0's record of a run: metrics.jsonl and TensorBoard scalars under the same names."""

from __future__ import annotations

import json
import os

from torch.utils.tensorboard import SummaryWriter


class MetricsWriter:
    def __init__(self, run_dir: str):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, record: dict, histograms: dict | None = None) -> None:
        step = record["step"]
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name != "step":
                self.tb.add_scalar(name, value, step)
        for name, values in (histograms or {}).items():
            self.tb.add_histogram(name, values, step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()
