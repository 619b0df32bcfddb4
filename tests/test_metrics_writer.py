"""Rank 0's metrics writer on object storage (a moto S3 server on 127.0.0.1): uploads run off the
training loop's thread, a failed one is logged and made good by the next, and the last one's
failure is an error that names the run directory."""

import json
import os
import logging
import time

import boto3
import pytest

from md4_dist.data.storage import StorageError, read_bytes
from md4_dist.trainer.metrics import MetricsWriter


def steps_in(url):
    return [json.loads(line)["step"] for line in read_bytes(url).decode().splitlines()]


def test_a_failed_upload_is_logged_and_made_good_by_the_next(s3_bucket, s3_endpoint, caplog):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = s3_bucket.removeprefix("s3://")
    writer = MetricsWriter(f"{s3_bucket}/run")
    s3.delete_bucket(Bucket=bucket)  # storage gone: this record's upload fails, in the background
    with caplog.at_level(logging.WARNING, logger="md4_dist.trainer.metrics"):
        writer.write({"step": 1, "loss": 2.0})  # does not raise
        deadline = time.monotonic() + 60
        while "metrics upload failed" not in caplog.text:
            assert time.monotonic() < deadline, "no warning for the failed upload"
            time.sleep(0.1)
    failed = [r for r in caplog.records if "metrics upload failed" in r.getMessage()]
    assert {r.threadName for r in failed} == {"md4_dist-metrics-upload"}, "not off the loop's thread"
    s3.create_bucket(Bucket=bucket)
    writer.write({"step": 2, "loss": 1.5})
    writer.close()  # waits for the uploads and makes the last one
    assert steps_in(f"{s3_bucket}/run/metrics.jsonl") == [1, 2]


def test_the_last_upload_failing_is_an_error_naming_the_run(s3_bucket, s3_endpoint):
    writer = MetricsWriter(f"{s3_bucket}/run")
    writer.write({"step": 1, "loss": 2.0})
    bucket = boto3.resource("s3", endpoint_url=s3_endpoint, region_name="us-east-1").Bucket(
        s3_bucket.removeprefix("s3://"))
    bucket.objects.all().delete()  # the run's storage gone before the end
    bucket.delete()
    writer.write({"step": 2, "loss": 1.5})  # something left to upload: its upload fails
    with pytest.raises(StorageError, match=f"{s3_bucket}/run"):
        writer.close()


def test_uploads_send_only_what_changed(s3_bucket):
    """Unchanged files are not sent again; on S3 a grown file past 5 MiB is extended by its tail
    (S3 copies the rest), a smaller one is sent whole; the object always equals the file."""
    from md4_dist.trainer.metrics import APPEND_MIN_BYTES, StagedFiles

    files = StagedFiles(f"{s3_bucket}/run", None)
    big, small = files.path("samples/rank-0.jsonl"), files.path("metrics.jsonl")
    line = b'{"step": 1, "ids": [' + b"1234567, " * 100 + b"0]}\n"
    with open(big, "wb") as f:
        f.write(line * (APPEND_MIN_BYTES // len(line) + 1))
    with open(small, "wb") as f:
        f.write(line)
    files.upload()
    first = os.path.getsize(big) + len(line)
    assert files.bytes_sent == first
    files.upload()
    assert files.bytes_sent == first, "nothing changed, nothing sent"
    for path in (big, small):
        with open(path, "ab") as f:
            f.write(line)
    files.upload()
    assert files.bytes_sent == first + len(line) + 2 * len(line), "the big file's tail, the small one whole"
    for path, name in ((big, "samples/rank-0.jsonl"), (small, "metrics.jsonl")):
        assert read_bytes(f"{s3_bucket}/run/{name}") == open(path, "rb").read(), name


def test_tensorboard_reads_the_run_on_s3(s3_bucket, s3_endpoint, monkeypatch):
    """`tensorboard --logdir s3://...` (README): TensorBoard's own S3 reader finds the scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(f"{s3_bucket}/run")
    for step in (1, 2, 3):
        writer.write({"step": step, "loss": 1.0 / step})
    writer.close()
    monkeypatch.setenv("S3_ENDPOINT", s3_endpoint)  # what TensorBoard's S3 reader reads
    acc = EventAccumulator(f"{s3_bucket}/run/tensorboard")
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]


def test_custom_scalars_layout_puts_training_first(tmp_path):
    """TensorBoard orders tag groups by name (data/ first); the Custom Scalars tab shows the layout
    every writer records, read back here with TensorBoard's own reader and layout proto."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    w = MetricsWriter(str(tmp_path / "run"))
    w.write({"step": 1, "loss": 2.0, "nelbo_bits_per_token": 3.0, "tokens_per_s": 10.0})
    w.close()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("custom_scalars__config__")
    got = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    assert [c.title for c in got.category] == ["train", "val", "perf", "schedule", "data"]
    train = got.category[0].chart
    assert [c.title for c in train[:2]] == ["loss", "nelbo_bits_per_token"]
    assert list(train[0].multiline.tag) == ["train/loss"]
    assert list(train[1].multiline.tag) == ["train/nelbo_bits_per_token", "val/nelbo_bits_per_token"]
    assert sorted(acc.Tags()["scalars"]) == ["perf/tokens_per_s", "train/loss", "train/nelbo_bits_per_token"]
