"""Writing token sequences as WebDataset shards plus the manifest, for every dataset writer.

    out = prepare_output(url, overwrite=False)        # refuses a non-empty output
    with SplitWriter(url, "train", seq_len, "uint16", per_shard=10000) as w:
        w.write(tokens)                                # [L] integer array
    save_manifest(Manifest(..., splits={"train": w.split}), url)   # last: marks the dataset complete
"""

from __future__ import annotations

import io
import re

import numpy as np
import webdataset as wds

from md4_dist.data.manifest import MANIFEST_NAME, TOKENS_EXT, Shard, Split
from md4_dist.data.storage import StorageConfig, explain, filesystem, join, list_dir, open_url

SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")


def prepare_output(url: str, overwrite: bool, storage: StorageConfig | None = None) -> None:
    """Refuse a non-empty output unless overwrite; with overwrite, remove the old manifest first
    (so a half-rewritten dataset never looks complete), then the old shards. Other files stay."""
    names = list_dir(url, storage)
    if not names:
        return
    if not overwrite:
        raise FileExistsError(f"output {url} is not empty ({len(names)} entries, e.g. {names[0]}); "
                              "pass --overwrite to replace the dataset there")
    fs, path = filesystem(url, storage)
    try:
        if MANIFEST_NAME in names:
            fs.rm_file(join(path, MANIFEST_NAME))
        for name in names:
            if SHARD_RE.match(name):
                fs.rm_file(join(path, name))
    except Exception as e:  # noqa: BLE001 - re-raised with the URL named
        raise explain(url, e) from e


def npy_bytes(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    return buf.getvalue()


class SplitWriter:
    """One split's sequences as shards `<split>-000000.tar`, ... under out_url."""

    def __init__(self, out_url: str, split: str, seq_len: int, dtype: str, per_shard: int,
                 storage: StorageConfig | None = None):
        if per_shard < 1:
            raise ValueError(f"sequences per shard must be >= 1, got {per_shard}")
        self.out_url, self.split_name, self.seq_len = out_url, split, seq_len
        self.dtype, self.per_shard, self.storage = np.dtype(dtype), per_shard, storage
        self.shards: list[Shard] = []
        self.sequences = 0
        self._writer = None  # opened at the first sequence: an empty split writes no file
        self._open_files = {}
        self._in_shard = 0

    def _open(self, url):
        f = open_url(url, "wb", self.storage)
        self._open_files[url] = f
        return f

    def _finished(self, url):
        f = self._open_files.pop(url)
        size = f.tell()
        try:
            f.close()  # for object storage, the upload completes here
        except Exception as e:  # noqa: BLE001 - re-raised with the URL named
            raise explain(url, e) from e
        self.shards.append(Shard(name=url.rsplit("/", 1)[-1], sequences=self._in_shard, bytes=size))
        self._in_shard = 0

    def write(self, tokens: np.ndarray) -> None:
        if tokens.shape != (self.seq_len,):
            raise ValueError(f"a sequence must have shape ({self.seq_len},), got {tokens.shape}")
        if self._writer is None:
            pattern = join(self.out_url, f"{self.split_name}-%06d.tar")
            # Fixed mtime and owner: the same input gives the same bytes.
            self._writer = wds.ShardWriter(pattern, maxcount=self.per_shard, maxsize=float("inf"),
                                           post=self._finished, opener=self._open, verbose=0,
                                           encoder=False, mtime=0)  # int: a float adds a PAX header per member
        key = f"{self.split_name}-{self.sequences:09d}"
        self._writer.write({"__key__": key, TOKENS_EXT: npy_bytes(tokens.astype(self.dtype, copy=False))})
        self._in_shard += 1
        self.sequences += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    @property
    def split(self) -> Split:
        return Split(shards=list(self.shards), sequences=self.sequences,
                     tokens=self.sequences * self.seq_len)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:  # leave the partial shard unfinished; no manifest will point at it
            for f in self._open_files.values():
                f.close()
