"""Writing token sequences as WebDataset shards plus the manifest, for every dataset writer.

    out = prepare_output(url, overwrite=False)        # refuses a non-empty output
    with SplitWriter(url, "train", seq_len, "uint16", per_shard=10000) as w:
        w.write(tokens)                                # [L] integer array
    save_manifest(Manifest(..., splits={"train": w.split}), url)   # last: marks the dataset complete

A shard is a WebDataset tar written with the standard library's tarfile, member for member what
webdataset's ShardWriter writes (tests/test_data_tools.py compares the bytes): importing
webdataset imports torch, seconds that every sharding or corpus-making command paid before its
first document.
"""

from __future__ import annotations

import io
import re
import tarfile

import numpy as np

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
        self._url = self._file = self._tar = None  # the open shard: none until a sequence comes
        self._in_shard = 0

    def _next_shard(self) -> None:
        self._finish_shard()
        self._url = join(self.out_url, f"{self.split_name}-{len(self.shards):06d}.tar")
        self._file = open_url(self._url, "wb", self.storage)
        # "w|": a stream, as webdataset writes (blocks of tarfile.RECORDSIZE, no seeking back)
        self._tar = tarfile.open(fileobj=self._file, mode="w|")

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()  # tar's two zero blocks, padded to its record size
        size = self._file.tell()
        try:
            self._file.close()  # for object storage, the upload completes here
        except Exception as e:  # noqa: BLE001 - re-raised with the URL named
            raise explain(self._url, e) from e
        self.shards.append(Shard(name=self._url.rsplit("/", 1)[-1], sequences=self._in_shard, bytes=size))
        self._url = self._file = self._tar = None
        self._in_shard = 0

    def write(self, tokens: np.ndarray) -> None:
        if tokens.shape != (self.seq_len,):
            raise ValueError(f"a sequence must have shape ({self.seq_len},), got {tokens.shape}")
        if self._tar is None or self._in_shard == self.per_shard:
            self._next_shard()
        data = npy_bytes(tokens.astype(self.dtype, copy=False))
        member = tarfile.TarInfo(f"{self.split_name}-{self.sequences:09d}.{TOKENS_EXT}")
        # webdataset's fields; an int mtime (a float adds a PAX header per member) and fixed owner:
        # the same input gives the same bytes, every record the same size (data/ranges.py)
        member.size, member.mtime, member.mode = len(data), 0, 0o444
        member.uname = member.gname = "bigdata"
        self._tar.addfile(member, io.BytesIO(data))
        self._in_shard += 1
        self.sequences += 1

    def close(self) -> None:
        self._finish_shard()

    @property
    def split(self) -> Split:
        return Split(shards=list(self.shards), sequences=self.sequences,
                     tokens=self.sequences * self.seq_len)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        elif self._file is not None:  # leave the partial shard unfinished; no manifest will point at it
            self._file.close()
