"""Streaming token batches from WebDataset shards, in a global order fixed by (seed, epoch) alone.

    manifest = load_manifest("s3://bucket/owt")        # or a local path
    stream = TokenStream(manifest, "train", batch_size=16, rank=r, world_size=W, seed=0)
    for batch in make_loader(stream, num_workers=2):
        batch["tokens"]   # [b, L] int64
        batch["ids"]      # [b] int64: global sample ids (index in the manifest's order)
        batch["positions"]  # [b] int64: their positions in the stream (the trainer's noise key)
        batch["state"]    # the reader state after this batch: resume with TokenStream(..., state=...)

The global order of an epoch: shards permuted by (seed, epoch), each shard's sequences permuted by
(seed, epoch, shard), concatenated; epochs follow each other. Position P of this endless stream
belongs to rank P mod W, so the ranks together read every sequence exactly once per epoch, for any
world size. A rank's positions form micro-batches of `batch_size`; DataLoader worker k of K makes
batches k, k + K, ..., and the DataLoader's round-robin returns them in order, so the worker count
changes nothing either. The state is the global cursor after the batch; since every rank trains
the same number of batches, it is the same on every rank and resumes at any world size.

Damaged shards (data.on_corrupt = "skip") are decided before the stream starts, not found on the
way: `excluded_shards` compares every shard's size with the manifest (one listing per directory),
and the stream is built without them (`exclude`). An excluded shard keeps its place in the shard
permutation with no sequences in it, so the order is the full order with its sequences taken out:
the sequences after it move up, every batch is full, every rank agrees (rank 0 decides, the
trainer broadcasts), and each remaining sequence is read exactly once per epoch. The state names
the excluded shards; a resume with another set (a shard damaged since, or repaired) continues at
the same point of the full order, with the new set from there on. A shard whose size is right but
whose bytes are not is found only when read: that is a CorruptShardError naming it, whatever
on_corrupt says, since a rank cannot leave a shard out on its own without the ranks' batches
diverging. The trainer ends the run at once on it (no restart can cure it); repair the shard, or
delete it and run again, when under "skip" it is left out as a missing one.

Each worker reads a whole shard and keeps its share of it, so every reader reads every shard once
per epoch (W x K times the data in all): cheap at the consumption rate of a GPU, see
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Collection, Literal

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from md4_dist.data.manifest import TOKENS_EXT, Manifest, ManifestError, ShardProblem, check_shards
from md4_dist.data.storage import StorageConfig, StorageError, open_url

log = logging.getLogger(__name__)
STATE_VERSION = 2  # 2 names the excluded shards; a version-1 state (none excluded) is read as such


@dataclass
class SyntheticData:
    """A known-entropy Markov corpus (data_tools.synthetic) made at data.manifest when absent,
    with the model's vocab_size and data.seq_len."""

    num_sequences: int = 20000
    seed: int = 0
    val_fraction: float = 0.05


@dataclass
class DataConfig:
    manifest: str = ""  # dataset directory or manifest.json URL: local path, s3://, gs://
    seq_len: int = 1024  # must equal the manifest's
    loader_workers: int = 2  # DataLoader worker processes per rank
    # before the run: a shard missing or of the wrong size is an error ("raise"), or is left out of
    # the order and its sequences counted as skipped ("skip"); see the reader's docstring
    on_corrupt: Literal["raise", "skip"] = "raise"
    synthetic: SyntheticData | None = None  # generate this corpus when the manifest is absent
    record_sample_ids: bool = False  # each rank writes the ids it trains on to samples/rank-<r>.jsonl

    def __post_init__(self):
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.loader_workers < 0:
            raise ValueError(f"loader_workers must be >= 0, got {self.loader_workers}")


class CorruptShardError(IOError):
    """A shard is missing, truncated or malformed; the message names its URL."""


def excluded_shards(manifest: Manifest, on_corrupt: str,
                    storage: StorageConfig | None = None) -> dict[str, dict[str, str]]:
    """{split: {shard name: what is wrong}} for the shards to leave out of the order: the shards
    `check_shards` finds missing or of the wrong size. With on_corrupt = "raise" any such shard is
    a ManifestError naming them all."""
    problems = check_shards(manifest, storage)
    if problems and on_corrupt == "raise":
        raise ManifestError(f"{len(problems)} shard(s) disagree with {manifest.url}: "
                            f"{_listing(problems)}. Repair them (re-shard or re-upload), or set "
                            "data.on_corrupt=skip to train without them")
    out: dict[str, dict[str, str]] = {}
    for p in problems:
        out.setdefault(p.split, {})[p.name] = p.why
    return out


def describe_exclusion(manifest: Manifest, excluded: dict[str, dict[str, str]]) -> str:
    """One line for the log: what the run leaves out under data.on_corrupt = "skip"."""
    parts = []
    for split, shards in sorted(excluded.items()):
        sizes = {s.name: s.sequences for s in manifest.split(split).shards}
        parts.append(f"{len(shards)} {split} shard(s), {sum(sizes[n] for n in shards)} of "
                     f"{manifest.split(split).sequences} sequences: " + _listing(
                         [ShardProblem(split, n, manifest.shard_url(n), why) for n, why in sorted(shards.items())]))
    return "data.on_corrupt = skip: leaving out " + "; ".join(parts)


def _listing(problems: list[ShardProblem], most: int = 5) -> str:
    text = ", ".join(str(p) for p in problems[:most])
    return text + (f" and {len(problems) - most} more" if len(problems) > most else "")


def read_shard(url: str, sequences: int, seq_len: int, dtype: str,
               storage: StorageConfig | None = None) -> np.ndarray:
    """All sequences of one shard, in file order: [sequences, seq_len] of dtype."""
    try:
        with open_url(url, "rb", storage) as f:
            raw = f.read()
    except StorageError as e:
        raise CorruptShardError(f"cannot read shard: {e}") from None
    header = npy_header(seq_len, dtype)
    fast = _regular_members(raw, sequences, header, seq_len, dtype)
    return fast if fast is not None else _read_members(raw, url, sequences, header, seq_len, dtype)


def _regular_members(raw: bytes, n: int, header: bytes, seq_len: int, dtype: str) -> np.ndarray | None:
    """The shard as our writer lays it out, decoded without a Python loop, or None.

    Every member has the same size, so member i starts at i * stride. Each member's tar header
    is checked (ustar magic, regular file, size field, a name ending in .tokens.npy) together
    with its .npy header, and the archive must end right after the n-th member. Anything else
    (another writer's layout, a damaged or truncated file) goes to the general tar reader.
    """
    size = len(header) + np.dtype(dtype).itemsize * seq_len
    stride = 512 + -(-size // 512) * 512
    if len(raw) < n * stride + 1024 or any(raw[n * stride:n * stride + 1024]):
        return None
    blocks = np.frombuffer(raw, dtype=np.uint8, count=n * stride).reshape(n, stride)
    name_len = bytes(blocks[0, :100]).find(b"\0")
    ext = ("." + TOKENS_EXT).encode()
    checks = [
        (blocks[:, 257:263] == np.frombuffer(b"ustar\0", np.uint8)).all(),
        np.isin(blocks[:, 156], (ord("0"), 0)).all(),
        (blocks[:, 124:135] == np.frombuffer(f"{size:011o}".encode(), np.uint8)).all(),
        name_len > len(ext) and (blocks[:, name_len] == 0).all(),
        (blocks[:, name_len - len(ext):name_len] == np.frombuffer(ext, np.uint8)).all(),
        (blocks[:, 512:512 + len(header)] == np.frombuffer(header, np.uint8)).all(),
    ]
    if not all(checks):
        return None
    return blocks[:, 512 + len(header):512 + size].copy().view(dtype).reshape(n, seq_len)


def _read_members(raw: bytes, url: str, sequences: int, header: bytes, seq_len: int,
                  dtype: str) -> np.ndarray:
    """The general path: webdataset's tar iterator, with errors that say what is wrong."""
    out = np.empty((sequences, seq_len), dtype=dtype)
    size = len(header) + out.itemsize * seq_len
    n = 0
    try:
        for member in wds.tariterators.tar_file_iterator(io.BytesIO(raw)):
            if not member["fname"].endswith("." + TOKENS_EXT):
                continue
            data = member["data"]
            if len(data) != size or not data.startswith(header):
                arr = np.load(io.BytesIO(data), allow_pickle=False)  # to say what it holds
                raise CorruptShardError(f"{url}: {member['fname']} holds {arr.dtype}{list(arr.shape)}, "
                                        f"expected {dtype}[{seq_len}]")
            if n == sequences:
                raise CorruptShardError(f"{url}: more than the manifest's {sequences} sequences")
            out[n] = np.frombuffer(data, dtype=dtype, offset=len(header))
            n += 1
    except CorruptShardError:
        raise
    except Exception as e:  # noqa: BLE001 - tarfile / numpy errors on damaged bytes
        raise CorruptShardError(f"{url}: unreadable shard ({type(e).__name__}: {e})") from None
    if n != sequences:
        raise CorruptShardError(f"{url}: truncated: {n} of the manifest's {sequences} sequences")
    return out


def npy_header(seq_len: int, dtype: str) -> bytes:
    """The .npy header of a [seq_len] array of dtype, as np.save writes it."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(seq_len, dtype=dtype), allow_pickle=False)
    return buf.getvalue()[: -np.dtype(dtype).itemsize * seq_len]


class TokenStream(IterableDataset):
    """Rank `rank` of `world_size`'s share of the global order, as micro-batches (see module doc).
    `exclude`: names of this split's shards to leave out (`excluded_shards`)."""

    def __init__(self, manifest: Manifest, split: str, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, state: dict | None = None, loop: bool = True,
                 exclude: Collection[str] = (), storage: StorageConfig | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.manifest, self.split_name = manifest, split
        self.split = manifest.split(split)
        names = [s.name for s in self.split.shards]
        unknown = sorted(set(exclude) - set(names))
        if unknown:
            raise ManifestError(f"{manifest.url}: split {split!r} has no shard(s) {unknown} to exclude")
        self.excluded = sorted(exclude)
        self._counts = np.array([s.sequences for s in self.split.shards], dtype=np.int64)
        self._live = self._kept(self.excluded)  # the counts with the excluded shards' set to 0
        self.sequences = int(self._live.sum())  # an epoch's length
        if self.sequences == 0:
            raise ManifestError(f"{manifest.url}: split {split!r} has no sequences"
                                + (f" outside the excluded shards {self.excluded}" if self.excluded else ""))
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.loop, self.storage = seed, loop, storage
        self._starts = self.split.shard_starts()
        self._order_cache: tuple = (None, None)
        self._within_cache: dict = {}
        self.start = 0 if state is None else self._position(state)

    def _kept(self, excluded: Collection[str]) -> np.ndarray:
        gone = set(excluded)
        return np.array([0 if s.name in gone else s.sequences for s in self.split.shards], dtype=np.int64)

    def position(self, state: dict) -> int:
        """The stream position a reader state stands at (checked against this stream)."""
        return self._position(state)

    def _position(self, state: dict) -> int:
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"reader state version {state.get('version')!r} is not 1 or {STATE_VERSION} "
                             f"(manifest {self.manifest.url})")
        want = {"seed": self.seed, "manifest_sha256": self.manifest.sha256}
        for key, value in want.items():
            if state.get(key) != value:
                raise ValueError(f"reader state {key} = {state.get(key)!r} does not match this reader's "
                                 f"{value!r} (manifest {self.manifest.url})")
        epoch, cursor = state["epoch"], state["cursor"]
        before = state.get("excluded", []) if state["version"] == STATE_VERSION else []
        n_before = int(self._kept(before).sum())
        if not (isinstance(epoch, int) and isinstance(cursor, int) and epoch >= 0 and 0 <= cursor < n_before):
            raise ValueError(f"reader state has a bad epoch / cursor: {epoch!r} / {cursor!r}")
        if sorted(before) != self.excluded:  # the same point of the full order, counted in this one
            log.warning("the reader state left out shards %s, this reader leaves out %s: the epoch "
                        "goes on from the same point without the shards now excluded", before, self.excluded)
            cursor = self._recount(epoch, cursor, self._kept(before))
        return epoch * self.sequences + cursor

    def _recount(self, epoch: int, cursor: int, counts: np.ndarray) -> int:
        """Cursor `cursor` of an epoch's order built on `counts`, as a cursor of this stream's:
        the sequences before the same point of the full order that this stream keeps."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self._counts))
        ends = np.cumsum(counts[order])
        slot = int(np.searchsorted(ends, cursor, side="right"))
        inside = cursor - int(ends[slot] - counts[order[slot]])  # into shard order[slot]
        return int(self._live[order[:slot]].sum()) + (inside if self._live[order[slot]] else 0)

    def state_at(self, position: int) -> dict:
        """The JSON state for global stream position `position`."""
        n = self.sequences
        return {"version": STATE_VERSION, "seed": self.seed, "epoch": position // n,
                "cursor": position % n, "manifest_sha256": self.manifest.sha256,
                "excluded": self.excluded}

    def skipped_before(self, position: int) -> int:
        """The excluded shards' sequences the stream has stepped over before `position`, from the
        start of epoch 0 (the trainer's skipped_sequences): each whole epoch's, and in the current
        one those of the excluded shards whose place in the order lies before `position`."""
        if not self.excluded:
            return 0
        per_epoch = int(self._counts.sum()) - self.sequences
        epoch, i = divmod(position, self.sequences)
        order, ends = self._shard_order(epoch)
        slot = int(np.searchsorted(ends, i, side="right"))
        return epoch * per_epoch + int((self._counts[order[:slot]] - self._live[order[:slot]]).sum())

    # -- the global order ---------------------------------------------------------------------
    def _shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard permutation of an epoch and the end offset of each permuted shard (cached). The
        permutation is of every shard, excluded ones too (they hold nothing): the order with a
        shard excluded is the full order without its sequences."""
        if self._order_cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._counts))
            self._order_cache = (epoch, (order, np.cumsum(self._live[order])))
        return self._order_cache[1]

    def _within(self, epoch: int, shard: int) -> np.ndarray:
        """The permutation of one shard's sequences in an epoch (the last few cached)."""
        key = (epoch, shard)
        if key not in self._within_cache:
            self._within_cache[key] = np.random.default_rng([self.seed, epoch, shard]).permutation(
                int(self._counts[shard]))
            while len(self._within_cache) > 4:
                del self._within_cache[next(iter(self._within_cache))]
        return self._within_cache[key]

    def locate(self, position: int) -> tuple[int, int]:
        """(shard index, index inside the shard's file) of global stream position `position`."""
        epoch, i = divmod(position, self.sequences)
        order, ends = self._shard_order(epoch)
        slot = int(np.searchsorted(ends, i, side="right"))  # skips the excluded shards: no width
        shard = int(order[slot])
        j = i - int(ends[slot] - self._live[shard])
        return shard, int(self._within(epoch, shard)[j])

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cache: dict[int, np.ndarray] = {}  # the last two shards read
        m, W, n = self.batch_size, self.world_size, self.sequences
        epoch_end = (self.start // n + 1) * n  # loop=False stops at the end of the starting epoch
        b = worker
        while True:
            positions = [self.start + self.rank + (b * m + k) * W for k in range(m)]
            if not self.loop:
                positions = [p for p in positions if p < epoch_end]
                if not positions:
                    return
            rows, ids = [], []
            for p in positions:
                shard, q = self.locate(p)
                if shard not in cache:
                    cache[shard] = self._load(shard)
                    while len(cache) > 2:
                        del cache[next(iter(cache))]
                rows.append(cache[shard][q])
                ids.append(int(self._starts[shard]) + q)
            yield {"tokens": torch.from_numpy(np.stack(rows).astype(np.int64)),
                   "ids": torch.tensor(ids, dtype=torch.int64),
                   "positions": torch.tensor(positions, dtype=torch.int64),
                   "state": self.state_at(self.start + (b + 1) * m * W)}
            b += workers

    def _load(self, shard: int) -> np.ndarray:
        meta = self.split.shards[shard]
        return read_shard(self.manifest.shard_url(meta.name), meta.sequences, self.manifest.seq_len,
                          self.manifest.dtype, self.storage)


def make_loader(stream: TokenStream, num_workers: int = 2) -> DataLoader:
    """A DataLoader over the stream's ready-made batches, in order."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      prefetch_factor=4 if num_workers else None)
