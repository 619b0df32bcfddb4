"""Object storage through the real S3 protocol: a moto server on 127.0.0.1 reached via s3fs."""

import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from md4_dist.data import ManifestError, TokenStream, load_manifest, make_loader
from md4_dist.data.storage import StorageConfig, StorageError, read_bytes

ARGS = ["--vocab-size", "11", "--seq-len", "6", "--num-sequences", "120", "--seed", "4",
        "--sequences-per-shard", "25", "--val-fraction", "0.1"]


def cli(*args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def test_synthetic_on_s3_reads_like_local(s3_bucket, tmp_path):
    url = f"{s3_bucket}/markov"
    r = cli("-m", "data_tools.synthetic", "--out", url, *ARGS)
    assert r.returncode == 0, r.stderr
    assert cli("-m", "data_tools.synthetic", "--out", str(tmp_path / "local"), *ARGS).returncode == 0
    remote, local = load_manifest(url), load_manifest(str(tmp_path / "local"))
    assert remote.sha256 == local.sha256, "same arguments, same bytes, on S3 too"
    for split in ("train", "val"):
        got = list(make_loader(TokenStream(remote, split, 8, world_size=2, rank=1, loop=False), 2))
        want = list(TokenStream(local, split, 8, world_size=2, rank=1, loop=False))
        assert len(got) == len(want) > 0
        for a, b in zip(got, want):
            assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["tokens"], b["tokens"])
    # an existing dataset is not overwritten without --overwrite, and nothing is lost
    r = cli("-m", "data_tools.synthetic", "--out", url, *ARGS)
    assert r.returncode == 2 and f"{url} is not empty" in r.stderr and "--overwrite" in r.stderr
    assert load_manifest(url).sha256 == remote.sha256


def test_missing_dataset_on_s3_names_the_url(s3_bucket):
    with pytest.raises(ManifestError, match=f"{s3_bucket}/nothing/manifest.json does not exist"):
        load_manifest(f"{s3_bucket}/nothing")


def test_missing_credentials_fail_fast_naming_the_url(s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    t = time.monotonic()
    with pytest.raises(StorageError, match=f"no S3 credentials for {s3_bucket}/x/manifest.json"):
        read_bytes(f"{s3_bucket}/x/manifest.json")
    assert time.monotonic() - t < 30


def test_unreachable_endpoints_fail_within_30s_naming_the_url(s3_bucket, monkeypatch):
    # refused: nothing listens on the port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    t = time.monotonic()
    with pytest.raises(StorageError, match=r"cannot reach the storage endpoint for s3://b/m.json"):
        read_bytes("s3://b/m.json", StorageConfig(endpoint_url=f"http://127.0.0.1:{closed}"))
    assert time.monotonic() - t < 30
    # silent: a server that accepts connections and never answers
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(srv.accept()) for _ in range(16)], daemon=True).start()
    t = time.monotonic()
    with pytest.raises(StorageError, match=r"cannot reach the storage endpoint for s3://b/m.json"):
        read_bytes("s3://b/m.json", StorageConfig(endpoint_url=f"http://127.0.0.1:{srv.getsockname()[1]}"))
    elapsed = time.monotonic() - t
    print(f"silent endpoint gave up after {elapsed:.1f} s")
    assert elapsed < 30
    srv.close()


def test_manifest_hint_only_where_the_storage_answered(s3_bucket, monkeypatch):
    """A reachable bucket without a manifest gets the "interrupted write" hint; an endpoint that
    cannot be reached (a closed port: refused at once) gets only what is true."""
    with pytest.raises(ManifestError) as found:
        load_manifest(f"{s3_bucket}/unfinished")
    assert "does not exist" in str(found.value) and "interrupted or unfinished write" in str(found.value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{closed}")
    with pytest.raises(ManifestError) as unreachable:
        load_manifest(f"{s3_bucket}/unfinished")
    text = str(unreachable.value)
    assert f"cannot reach the storage endpoint for {s3_bucket}/unfinished/manifest.json" in text
    assert "manifest" in text and "interrupted" not in text and "does not exist" not in text
