"""Rank 0's record of a run: metrics.jsonl and TensorBoard scalars under the same names.

A local run directory is written in place. On object storage (s3://, gs://), which cannot append,
both are written to a local staging directory and uploaded after every record; an upload that
fails is logged and retried with the next record, and `close()` raises if the last one fails.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

from torch.utils.tensorboard import SummaryWriter

from md4_dist.data.storage import StorageConfig, explain, filesystem, protocol

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, run_dir: str, storage: StorageConfig | None = None):
        self.run_dir, self.storage = run_dir, storage
        self.remote = protocol(run_dir) != "file"
        self.local_dir = tempfile.mkdtemp(prefix="md4_dist-run-") if self.remote else run_dir
        os.makedirs(self.local_dir, exist_ok=True)
        self.path = os.path.join(self.local_dir, "metrics.jsonl")
        self.tb = SummaryWriter(os.path.join(self.local_dir, "tensorboard"))

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
        if self.remote:
            try:
                self._upload()
            except Exception as e:  # noqa: BLE001 - a storage hiccup must not end the run
                log.warning("metrics upload failed, retried with the next record: %s",
                            explain(self.run_dir, e))

    def _upload(self) -> None:
        fs, path = filesystem(self.run_dir, self.storage)
        for root, _, files in os.walk(self.local_dir):
            for name in files:
                local = os.path.join(root, name)
                fs.put_file(local, path.rstrip("/") + "/" + os.path.relpath(local, self.local_dir))

    def close(self) -> None:
        self.tb.close()
        if self.remote:
            try:
                self._upload()
            except Exception as e:  # noqa: BLE001 - re-raised with the URL named
                raise explain(self.run_dir, e) from e
