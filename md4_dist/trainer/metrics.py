"""What rank 0 writes into the run directory as it goes: metrics.jsonl and TensorBoard scalars
(under the same names). `StagedFiles` also carries each rank's sample ledger (trainer/ledger.py).

A local run directory is written in place. Object storage (s3://, gs://) cannot append, so the
files are kept in a local staging directory (seeded with what the run directory already holds)
and uploaded: the metrics after every record, from a thread of their own, where an upload that
fails is logged and retried with the next one; the ledger at every checkpoint, before the
checkpoint is reported. `MetricsWriter.close()` raises if the last upload fails.

metrics.jsonl is strict JSON: a value that is not a finite number (a NaN loss, an infinite norm)
is written as null, since JSON has no NaN; TensorBoard gets the value itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading

from torch.utils.tensorboard import SummaryWriter

from md4_dist.data.storage import StorageConfig, explain, filesystem, protocol

log = logging.getLogger(__name__)


class StagedFiles:
    """Files under a run directory, written through local paths."""

    def __init__(self, run_dir: str, storage: StorageConfig | None, fetch: tuple[str, ...] = ()):
        self.run_dir, self.storage = run_dir, storage
        self.remote = protocol(run_dir) != "file"
        self.root = tempfile.mkdtemp(prefix="md4_dist-run-") if self.remote else run_dir
        self.written: set[str] = set()
        for name in fetch if self.remote else ():  # continue what an earlier attempt wrote
            try:
                fs, path = filesystem(run_dir, storage)
                if fs.exists(f"{path}/{name}"):
                    os.makedirs(os.path.dirname(self.path(name)), exist_ok=True)
                    fs.get_file(f"{path}/{name}", self.path(name))
            except Exception as e:  # noqa: BLE001 - re-raised with the URL named
                raise explain(f"{run_dir}/{name}", e) from e

    def path(self, name: str) -> str:
        local = os.path.join(self.root, name)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        return local

    def upload(self) -> None:
        if not self.remote:
            return
        try:
            fs, path = filesystem(self.run_dir, self.storage)
            for d, _, files in os.walk(self.root):
                for name in files:
                    local = os.path.join(d, name)
                    fs.put_file(local, f"{path}/{os.path.relpath(local, self.root)}")
        except Exception as e:  # noqa: BLE001 - re-raised with the URL named
            raise explain(self.run_dir, e) from e


class MetricsWriter:
    """Records from `start_step` on: later records of an earlier attempt are dropped from
    metrics.jsonl and purged from TensorBoard's view, since the steps are trained again."""

    def __init__(self, run_dir: str, storage: StorageConfig | None = None, start_step: int = 1):
        self.files = StagedFiles(run_dir, storage, fetch=("metrics.jsonl",))
        self.path = self.files.path("metrics.jsonl")
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line)["step"] < start_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        self.tb = SummaryWriter(self.files.path("tensorboard"), purge_step=start_step)
        self.uploads = BackgroundUploads(self.files) if self.files.remote else None

    def write(self, record: dict, histograms: dict | None = None, texts: dict | None = None) -> None:
        """record: {"step", name: value, ...}, one line of metrics.jsonl (when it holds more than
        the step) and TensorBoard scalars; histograms and texts (Markdown) go to TensorBoard only."""
        step = record["step"]
        if len(record) > 1:
            strict = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                      for k, v in record.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(strict, allow_nan=False) + "\n")
        for name, value in record.items():
            if name != "step":
                self.tb.add_scalar(name, value, step)
        for name, values in (histograms or {}).items():
            self.tb.add_histogram(name, values, step)
        for name, text in (texts or {}).items():
            self.tb.add_text(name, text, step)
        self.tb.flush()
        if self.uploads is not None:
            self.uploads.request()

    def close(self) -> None:
        self.tb.close()
        if self.uploads is not None:
            self.uploads.close()


class BackgroundUploads:
    """Uploads staged files from a thread of its own, so that the training loop never waits for
    object storage at a record: a request during an upload makes one more after it (of the newest
    files); a failed upload is logged and retried at the next request; close() waits for the one
    under way, uploads a last time and raises if that fails."""

    def __init__(self, files: StagedFiles):
        self.files, self.closing = files, False
        self.wanted = threading.Event()
        self.thread = threading.Thread(target=self._run, name="md4_dist-metrics-upload", daemon=True)
        self.thread.start()

    def request(self) -> None:
        self.wanted.set()

    def _run(self) -> None:
        while True:
            self.wanted.wait()
            self.wanted.clear()
            if self.closing:
                return
            try:
                self.files.upload()
            except Exception as e:  # noqa: BLE001 - a storage hiccup must not end the run
                log.warning("metrics upload failed, retried with the next record: %s", e)

    def close(self) -> None:
        self.closing = True
        self.wanted.set()
        self.thread.join()
        self.files.upload()
