"""Reading chosen sequences of shards by byte ranges, as the writer lays the shards out.

`SplitWriter` (shard_writer.py) writes every sequence as one tar member of the same size: a
512-byte tar header, then the .npy bytes ([seq_len] of dtype behind a fixed .npy header), padded
to 512 bytes. Record i of a shard is bytes [i * stride, (i + 1) * stride), and the archive ends
with tar's two zero blocks, padded to tar's record size. So a reader fetches just the records it
trains on: sorted, runs of neighbours (or of records a few apart, `gap`) coalesced into one range,
all of a chunk's ranges in one `cat_ranges` call (concurrent requests on object storage) or one
open per shard (local disk). Each record's tar and .npy headers are checked, so a damaged shard is
still an error naming it.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from md4_dist.data.manifest import TOKENS_EXT
from md4_dist.data.storage import StorageConfig, explain, filesystem


class CorruptShardError(IOError):
    """A shard is missing, truncated or malformed; the message names its URL."""


def npy_header(seq_len: int, dtype: str) -> bytes:
    """The .npy header of a [seq_len] array of dtype, as np.save writes it."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(seq_len, dtype=dtype), allow_pickle=False)
    return buf.getvalue()[: -np.dtype(dtype).itemsize * seq_len]


@dataclass(frozen=True)
class Layout:
    """Where the writer puts a shard's records, for sequences of seq_len tokens of dtype."""

    seq_len: int
    dtype: str

    @cached_property
    def header(self) -> bytes:
        return npy_header(self.seq_len, self.dtype)

    @cached_property
    def member_size(self) -> int:  # the .npy file's bytes
        return len(self.header) + np.dtype(self.dtype).itemsize * self.seq_len

    @cached_property
    def stride(self) -> int:  # a record: tar header block + the member padded to 512
        return 512 + -(-self.member_size // 512) * 512

    def shard_bytes(self, sequences: int) -> int:
        """The size of a shard of `sequences` records: the records, tar's end, its padding."""
        return -(-(sequences * self.stride + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def fetch(wanted: dict[str, np.ndarray], layout: Layout, storage: StorageConfig | None = None,
          stats: dict | None = None, gap: int = 0) -> dict[str, np.ndarray]:
    """{url: [len(records), seq_len] of dtype} for {url: sorted distinct record indices}.
    Records at most `gap` apart share one range (the records between are read and dropped: fewer
    requests for some more bytes). `stats` (if given) adds up the "bytes" and "requests" fetched."""
    plan, covered = [], {}  # (url, first record, record count); the records each url's ranges hold
    for url, records in wanted.items():
        breaks = np.flatnonzero(np.diff(records) > gap + 1) + 1  # runs of neighbours: one range each
        runs = [(int(run[0]), int(run[-1]) + 1 - int(run[0])) for run in np.split(records, breaks)]
        plan += [(url, first, n) for first, n in runs]
        covered[url] = records if gap == 0 else np.concatenate([np.arange(a, a + n) for a, n in runs])
    stride = layout.stride
    data = _read_ranges([(u, i * stride, (i + n) * stride) for u, i, n in plan], storage)
    parts = {url: [] for url in wanted}
    for (url, first, n), raw in zip(plan, data):
        if isinstance(raw, BaseException):
            raise _explain_failure(url, first, n, layout, raw, storage) from None
        if len(raw) != n * stride:  # a read past the end of the file comes back short
            raise _truncated(url, first * stride + len(raw), first + len(raw) // stride, stride)
        parts[url].append(raw)
        if stats is not None:
            stats["bytes"] = stats.get("bytes", 0) + len(raw)
            stats["requests"] = stats.get("requests", 0) + 1
    out = {}
    for url, records in wanted.items():  # a shard's ranges, joined, are its covered records in order
        rows = _decode(b"".join(parts[url]), covered[url], layout, url)
        out[url] = rows if covered[url] is records else rows[np.searchsorted(covered[url], records)]
    return out


def _read_ranges(ranges: list[tuple[str, int, int]], storage: StorageConfig | None) -> list:
    """The bytes of each (url, start, end), or the exception that reading it raised."""
    if not ranges:
        return []
    fs, _ = filesystem(ranges[0][0], storage)
    path_of = {u: filesystem(u, storage)[1] for u in {u for u, _, _ in ranges}}  # one look-up per shard
    paths = [path_of[u] for u, _, _ in ranges]
    if getattr(fs, "async_impl", False):  # s3fs, gcsfs: the requests run concurrently
        return fs.cat_ranges(paths, [a for _, a, _ in ranges], [b for _, _, b in ranges], on_error="return")
    out, files = [], {}
    try:
        for path, (_, a, b) in zip(paths, ranges):
            try:
                if path not in files:
                    files[path] = fs.open(path, "rb")
                f = files[path]
                f.seek(a)
                out.append(f.read(b - a))
            except Exception as e:  # noqa: BLE001 - reported with the shard named by the caller
                out.append(e)
    finally:
        for f in files.values():
            f.close()
    return out


def _explain_failure(url: str, first: int, n: int, layout: Layout, exc: BaseException,
                     storage: StorageConfig | None) -> Exception:
    """A missing or truncated shard is a CorruptShardError naming it; anything else (a network
    failure) is the storage error, naming the URL."""
    if isinstance(exc, FileNotFoundError):
        return CorruptShardError(f"cannot read shard: {url} does not exist")
    end = (first + n) * layout.stride
    try:
        fs, path = filesystem(url, storage)
        size = fs.size(path)
    except FileNotFoundError:
        return CorruptShardError(f"cannot read shard: {url} does not exist")
    except Exception:  # noqa: BLE001 - the first failure is the one to report
        size = None
    if size is not None and size < end:  # object storage refuses a range past the end (416)
        return _truncated(url, size, max(first, size // layout.stride), layout.stride)
    return explain(url, exc)


def _truncated(url: str, size: int, record: int, stride: int) -> CorruptShardError:
    return CorruptShardError(f"{url}: truncated: {size} bytes, record {record} needs bytes up to "
                             f"{(record + 1) * stride}")


def _decode(raw: bytes, records: np.ndarray, layout: Layout, url: str) -> np.ndarray:
    """[n, seq_len] from the bytes of `records` (n of them) back to back, each record's headers
    checked: ustar magic, a regular file, the size field, a name ending in .tokens.npy, the .npy
    header."""
    n = len(records)
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(n, layout.stride)
    header, size = layout.header, layout.member_size
    ext = np.frombuffer(("." + TOKENS_EXT).encode(), np.uint8)
    names = blocks[:, :100]
    name_len = np.where((names == 0).any(1), (names == 0).argmax(1), 100)  # [n]
    tails = names[np.arange(n)[:, None], np.clip(name_len[:, None] - len(ext) + np.arange(len(ext)), 0, 99)]
    good = ((blocks[:, 257:263] == np.frombuffer(b"ustar\0", np.uint8)).all(1)
            & np.isin(blocks[:, 156], (ord("0"), 0))
            & (blocks[:, 124:135] == np.frombuffer(f"{size:011o}".encode(), np.uint8)).all(1)
            & (name_len > len(ext)) & (tails == ext).all(1)
            & (blocks[:, 512:512 + len(header)] == np.frombuffer(header, np.uint8)).all(1))
    if not good.all():
        bad = int(records[np.flatnonzero(~good)[0]])
        raise CorruptShardError(f"{url}: record {bad} (bytes {bad * layout.stride}..{(bad + 1) * layout.stride}) "
                                f"is not a {TOKENS_EXT} member of {layout.dtype}[{layout.seq_len}] where the "
                                "writer puts it: the shard is damaged, or not written by data_tools")
    return blocks[:, 512 + len(header):512 + size].copy().view(layout.dtype).reshape(n, layout.seq_len)
