"""What rank 0 writes into the run directory as it goes: metrics.jsonl and TensorBoard scalars,
and the mirrors of those (Weights & Biases, Ray's metrics: trainer/wandb_log.py,
trainer/ray_metrics.py). `StagedFiles` also carries each rank's sample ledger
(trainer/ledger.py) and the profiler's traces (trainer/profiling.py).

metrics.jsonl keeps each value under its flat name ("loss", "tokens_per_s"); TensorBoard and the
mirrors show it under a tag grouped by purpose ("train/loss", "perf/tokens_per_s"): `TAGS` below
is the one list of both.

A local run directory is written in place. Object storage (s3://, gs://) cannot append, so the
files are kept in a local staging directory (seeded with what the run directory already holds)
and uploaded: the metrics after every record, from a thread of their own, where an upload that
fails is logged and retried with the next one; the ledger at every checkpoint, before the
checkpoint is reported. `MetricsWriter.close()` raises if the last upload fails.

An upload sends only what changed: a file whose size is what was last sent is skipped (these
files only grow, by appending: metrics.jsonl, TensorBoard's event files, the ledger), and on S3 a
file that has grown past S3's smallest multipart part (5 MiB) is extended in place: a multipart
upload whose first part is the object itself, copied by S3 (UploadPartCopy), and whose last part
is the new tail. So the bytes sent per record stay flat as the run grows. Smaller files, and
other stores, are sent whole.

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

from md4_dist.config import Config
from md4_dist.data.storage import StorageConfig, explain, filesystem, protocol

log = logging.getLogger(__name__)

# Each record name (metrics.jsonl's keys; also the histograms' and the texts') and its tag in
# TensorBoard, W&B and Ray's metrics, grouped by purpose. A name missing here is an error.
TAGS = {
    # train/: the objective and the optimizer
    "loss": "train/loss",  # the surrogate loss that is minimised
    "nelbo_bits_per_token": "train/nelbo_bits_per_token",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    # val/: validation (eval.every), on the same sequences and noise each time
    "val_nelbo_bits_per_token": "val/nelbo_bits_per_token",
    "val_nelbo_se": "val/nelbo_se",
    "val_sequences": "val/sequences",
    # schedule/: GenMD4's learnable schedule, its per-token exponents
    "exponent_min": "schedule/exponent_min",
    "exponent_mean": "schedule/exponent_mean",
    "exponent_max": "schedule/exponent_max",
    "exponents": "schedule/exponents",  # a histogram
    # perf/: speed and memory
    "tokens_per_s": "perf/tokens_per_s",
    "step_time_s": "perf/step_time_s",
    "mfu": "perf/mfu",
    "peak_memory_gib": "perf/peak_memory_gib",
    "data_wait_share": "perf/data_wait_share",
    # data/: where the run stands in its data
    "samples_seen": "data/samples_seen",
    "epoch": "data/epoch",
    "skipped_sequences": "data/skipped_sequences",
    # samples drawn during training (logging.sample_every), TensorBoard's text tab
    "samples": "samples",
}


# TensorBoard orders tag groups by name (data/ first); its Custom Scalars tab shows this layout,
# the groups in the order a user reads them, training's loss and NELBO first.
GROUP_ORDER = ("train", "val", "perf", "schedule", "data")
NOT_SCALARS = ("exponents", "samples")


def layout() -> dict:
    """{group: {chart: ["Multiline", [tags]]}}, for SummaryWriter.add_custom_scalars: one chart
    per scalar in TAGS order, and the training and validation NELBO together."""
    charts = {group: {} for group in GROUP_ORDER}
    for name, t in TAGS.items():
        if name not in NOT_SCALARS:
            group, title = t.split("/", 1)
            charts[group][title] = ["Multiline", [t]]
    charts["train"]["nelbo_bits_per_token"][1].append(TAGS["val_nelbo_bits_per_token"])
    return charts


def tag(name: str) -> str:
    """The grouped tag of a record name (TAGS)."""
    try:
        return TAGS[name]
    except KeyError:
        raise KeyError(f"the record name {name!r} has no tag: add it to TAGS in "
                       "md4_dist/trainer/metrics.py") from None


class StagedFiles:
    """Files under a run directory, written through local paths."""

    def __init__(self, run_dir: str, storage: StorageConfig | None, fetch: tuple[str, ...] = ()):
        self.run_dir, self.storage = run_dir, storage
        self.remote = protocol(run_dir) != "file"
        self.root = tempfile.mkdtemp(prefix="md4_dist-run-") if self.remote else run_dir
        self.sent: dict[str, int] = {}  # bytes of each file the run directory holds (relative name)
        self.bytes_sent = 0  # by all uploads, whole files and tails
        for name in fetch if self.remote else ():  # continue what an earlier attempt wrote
            try:
                fs, path = filesystem(run_dir, storage)
                if fs.exists(f"{path}/{name}"):
                    os.makedirs(os.path.dirname(self.path(name)), exist_ok=True)
                    fs.get_file(f"{path}/{name}", self.path(name))
                    self.sent[name] = os.path.getsize(self.path(name))
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
                    if os.path.islink(local):
                        continue  # another name of a file sent under its own (W&B's debug.log)
                    rel = os.path.relpath(local, self.root)
                    size, sent = os.path.getsize(local), self.sent.get(rel)
                    if size == sent:
                        continue  # unchanged since the last upload
                    if sent is not None and APPEND_MIN_BYTES <= sent < size and \
                            protocol(self.run_dir) in ("s3", "s3a"):
                        self.bytes_sent += _append_s3(fs, f"{path}/{rel}", local, sent, size)
                    else:
                        with open(local, "rb") as f:  # its first `size` bytes: a writer may be
                            fs.pipe_file(f"{path}/{rel}", f.read(size))  # appending meanwhile
                        self.bytes_sent += size
                    self.sent[rel] = size
        except Exception as e:  # noqa: BLE001 - re-raised with the URL named
            raise explain(self.run_dir, e) from e


APPEND_MIN_BYTES = 5 * 2**20  # S3's smallest part of a multipart upload (all but the last)


def _append_s3(fs, url: str, local: str, sent: int, size: int) -> int:
    """Extend the S3 object `url`, which holds the first `sent` bytes of `local`, to its first
    `size`: S3 copies what it holds itself, the tail travels. Returns the bytes sent."""
    bucket, key, _ = fs.split_path(url)
    where = {"Bucket": bucket, "Key": key}
    upload = fs.call_s3("create_multipart_upload", **where)["UploadId"]
    try:
        head = fs.call_s3("upload_part_copy", **where, UploadId=upload, PartNumber=1,
                          CopySource=where, CopySourceRange=f"bytes=0-{sent - 1}")
        with open(local, "rb") as f:
            f.seek(sent)
            tail = f.read(size - sent)
        last = fs.call_s3("upload_part", **where, UploadId=upload, PartNumber=2, Body=tail)
        fs.call_s3("complete_multipart_upload", **where, UploadId=upload, MultipartUpload={"Parts": [
            {"PartNumber": 1, "ETag": head["CopyPartResult"]["ETag"]},
            {"PartNumber": 2, "ETag": last["ETag"]}]})
    except BaseException:
        fs.call_s3("abort_multipart_upload", **where, UploadId=upload)
        raise
    fs.invalidate_cache(url)
    return len(tail)


class MetricsWriter:
    """Records from `start_step` on: later records of an earlier attempt are dropped from
    metrics.jsonl and purged from TensorBoard's view, since the steps are trained again.

    `mirrors` get every record too, by tag: each has `write(step, scalars, histograms, texts)`,
    {tag: value} dicts, and `close()`, called before the last upload (a mirror may write under
    `files.root`, W&B's offline files)."""

    def __init__(self, run_dir: str, storage: StorageConfig | None = None, start_step: int = 1):
        self.mirrors: list = []
        self.files = StagedFiles(run_dir, storage, fetch=("metrics.jsonl",))
        self.path = self.files.path("metrics.jsonl")
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line)["step"] < start_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        self.tb = SummaryWriter(self.files.path("tensorboard"), purge_step=start_step)
        self.tb.add_custom_scalars(layout())
        self.uploads = BackgroundUploads(self.files) if self.files.remote else None

    def write(self, record: dict, histograms: dict | None = None, texts: dict | None = None) -> None:
        """record: {"step", name: value, ...}, one line of metrics.jsonl (when it holds more than
        the step) and scalars under their tags (TAGS); histograms and texts (Markdown) go to
        TensorBoard and the mirrors only."""
        step = record["step"]
        if len(record) > 1:
            strict = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                      for k, v in record.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(strict, allow_nan=False) + "\n")
        scalars = {tag(name): value for name, value in record.items() if name != "step"}
        histograms = {tag(name): values for name, values in (histograms or {}).items()}
        texts = {tag(name): text for name, text in (texts or {}).items()}
        for name, value in scalars.items():
            self.tb.add_scalar(name, value, step)
        for name, values in histograms.items():
            self.tb.add_histogram(name, values, step)
        for name, text in texts.items():
            self.tb.add_text(name, text, step)
        self.tb.flush()
        for mirror in self.mirrors:
            mirror.write(step, scalars, histograms, texts)
        if self.uploads is not None:
            self.uploads.request()

    def close(self) -> None:
        self.tb.close()
        for mirror in self.mirrors:
            mirror.close()
        if self.uploads is not None:
            self.uploads.close()


def for_run(cfg: Config, start_step: int) -> MetricsWriter:
    """Rank 0's writer of a training run: the run directory's files, mirrored to Ray's metrics
    (trainer/ray_metrics.py) and, with logging.wandb.enabled, to W&B (trainer/wandb_log.py)."""
    from md4_dist.trainer.ray_metrics import RayGauges
    from md4_dist.trainer.wandb_log import WandbMirror

    writer = MetricsWriter(cfg.train.run_dir, cfg.storage, start_step=start_step)
    writer.mirrors.append(RayGauges(cfg.train.name))
    if cfg.logging.wandb.enabled:
        writer.mirrors.append(WandbMirror(cfg, writer.files))
    return writer


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
