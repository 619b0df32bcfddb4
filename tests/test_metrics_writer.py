"""Rank 0's metrics writer on object storage (a moto S3 server on 127.0.0.1): uploads run off the
training loop's thread, a failed one is logged and made good by the next, and the last one's
failure is an error that names the run directory."""

import json
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
    with pytest.raises(StorageError, match=f"{s3_bucket}/run"):
        writer.close()
