"""Streaming token batches from WebDataset shards, in a global order fixed by (seed, epoch) alone.

    manifest = load_manifest("s3://bucket/owt")        # or a local path
    stream = TokenStream(manifest, "train", batch_size=16, rank=r, world_size=W, seed=0)
    for batch in make_loader(stream, num_workers=2):
        batch["tokens"]   # [b, L] int64
        batch["ids"]      # [b] int64: global sample ids (index in the manifest's order)
        batch["positions"]  # [b] int64: their positions in the stream (the trainer's noise key)
        batch["state"]    # the reader state after this batch: resume with TokenStream(..., state=...)

The global order of an epoch (order.py): the shards permuted by (seed, epoch) and cut into windows
of `mix` shards, each window's sequences shuffled together by (seed, epoch, window), the windows
one after the other; epochs follow each other. So a global batch draws from about `mix` shards,
each a different stretch of the corpus. With `run_length` > 1 a window's shuffle moves runs of
that many neighbouring sequences, read side by side in `lanes` (order.shuffled_runs). Position P
of this endless stream belongs to rank P mod W, so the ranks together read every sequence exactly
once per epoch, for any world size. A rank's positions form micro-batches of `batch_size`;
DataLoader worker k of K makes batches k, k + K, ..., and the DataLoader's round-robin returns
them in order, so the worker count changes nothing either. The state is the global cursor after
the batch; since every rank trains the same number of batches, it is the same on every rank and
resumes at any world size.

Each worker fetches only the sequences of its own batches (ranges.py): a chunk of its next batches
at a time, by byte ranges of the shards (records of a fixed size), neighbours coalesced. So the
ranks together fetch each sequence once per epoch, whatever W and K: about the dataset's bytes in
all, rank r about 1/W of it, at the price of about one request per sequence (the order within a
window is random), or, with runs, about one per run (where W divides the lanes). Each record's tar
and .npy headers are checked on the way.

Damaged shards (data.on_corrupt = "skip") are decided before the stream starts, not found on the
way: `excluded_shards` compares every shard's size with the manifest (one listing per directory),
and the stream is built without them (`exclude`). An excluded shard keeps its place in the shard
permutation and its sequences are taken out of its window's shuffle, so the order is the full
order with its sequences taken out: the sequences after it move up, every batch is full, every
rank agrees (rank 0 decides, the trainer broadcasts), and each remaining sequence is read exactly
once per epoch. The state names the excluded shards; a resume with another set (a shard damaged
since, or repaired) continues at the same point of the full order, with the new set from there
on. A shard whose size is right but whose bytes are not is found only when read (a record's
headers are not the writer's, or a range lies past its end): that is a CorruptShardError naming
it, whatever on_corrupt says, since a rank cannot leave a shard out on its own without the ranks'
batches diverging. The trainer ends the run at once on it (no restart can cure it); repair the
shard, or delete it and run again, when under "skip" it is left out as a missing one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Collection, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from md4_dist.data.manifest import Manifest, ManifestError, ShardProblem, check_shards
from md4_dist.data.order import MIX, EpochOrder
from md4_dist.data.ranges import CorruptShardError, Layout, fetch, npy_header  # noqa: F401 - re-exported
from md4_dist.data.storage import StorageConfig

log = logging.getLogger(__name__)
# 3: the order mixes windows of `mix` shards (order.py) and the state names mix. A state of
# version 1 or 2 (the order of one shard at a time) is refused: its cursor means other sequences now.
# 4: the state also names run_length and lanes (order.shuffled_runs); a version-3 state is the
# order of run_length 1, which is unchanged, and resumes as such.
STATE_VERSION = 4
# a worker fetches its next batches' records this many bytes (or sequences) at a time
CHUNK_BYTES, CHUNK_SEQUENCES = 16 << 20, 4096


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
    # sequences a rank reads as one run of neighbours in its shard (1: each on its own, the
    # window's order a plain shuffle). A rank reads about one range per sequence at 1, which at
    # hundreds of ranks on object storage is hundreds of thousands of requests a second; with
    # runs, about one per run. A global batch still holds train.global_batch runs (its lanes)
    # from all over the window; a run goes on in the same lane at the next steps.
    run_length: int = 1
    synthetic: SyntheticData | None = None  # generate this corpus when the manifest is absent
    record_sample_ids: bool = False  # each rank writes the ids it trains on to samples/rank-<r>.jsonl

    def __post_init__(self):
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.loader_workers < 0:
            raise ValueError(f"loader_workers must be >= 0, got {self.loader_workers}")
        if self.run_length < 1:
            raise ValueError(f"run_length must be >= 1, got {self.run_length}")


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


class TokenStream(IterableDataset):
    """Rank `rank` of `world_size`'s share of the global order, as micro-batches (see module doc).
    `exclude`: names of this split's shards to leave out (`excluded_shards`). `mix`: shards per
    window of the order (order.py); a state resumes only under the same mix. `run_length`,
    `lanes`: runs of neighbouring sequences read side by side (order.shuffled_runs; the trainer's
    lanes are its global batch), so that a rank reads runs, not scattered sequences. `fetched`
    adds up the bytes and requests this process has fetched (for benchmarks; workers keep their
    own)."""

    def __init__(self, manifest: Manifest, split: str, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, state: dict | None = None, loop: bool = True,
                 exclude: Collection[str] = (), storage: StorageConfig | None = None, mix: int = MIX,
                 run_length: int = 1, lanes: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mix < 1:
            raise ValueError(f"mix must be >= 1, got {mix}")
        if run_length < 1 or lanes < 1:
            raise ValueError(f"run_length and lanes must be >= 1, got {run_length} and {lanes}")
        self.manifest, self.split_name = manifest, split
        self.split = manifest.split(split)
        self.layout = Layout(manifest.seq_len, manifest.dtype)
        names = [s.name for s in self.split.shards]
        unknown = sorted(set(exclude) - set(names))
        if unknown:
            raise ManifestError(f"{manifest.url}: split {split!r} has no shard(s) {unknown} to exclude")
        for s in self.split.shards:  # the records' offsets are computed, not read: check the layout fits
            if s.bytes != self.layout.shard_bytes(s.sequences):
                raise ManifestError(f"{manifest.shard_url(s.name)}: the manifest says {s.bytes} bytes, the "
                                    f"writer's layout of {s.sequences} sequences of {manifest.dtype}"
                                    f"[{manifest.seq_len}] takes {self.layout.shard_bytes(s.sequences)}: "
                                    "not a shard data_tools wrote; re-shard it with data_tools.shard")
        self.excluded = sorted(exclude)
        self._counts = np.array([s.sequences for s in self.split.shards], dtype=np.int64)
        self._live = self._kept(self.excluded)  # the counts with the excluded shards' set to 0
        self.sequences = int(self._live.sum())  # an epoch's length
        if self.sequences == 0:
            raise ManifestError(f"{manifest.url}: split {split!r} has no sequences"
                                + (f" outside the excluded shards {self.excluded}" if self.excluded else ""))
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.loop, self.storage, self.mix = seed, loop, storage, mix
        # with runs of one sequence the lanes change nothing: the order is a plain shuffle
        self.run_length, self.lanes = run_length, lanes if run_length > 1 else 1
        window = int(np.sort(self._live)[::-1][:mix].sum())  # the most a window holds
        if run_length > 1 and window < run_length * lanes:
            log.warning("data.run_length %d x %d lanes is more than a window of %d shards holds (%d "
                        "sequences of split %r): a global batch takes several neighbours of each run",
                        run_length, lanes, mix, window, split)
        self._starts = self.split.shard_starts()
        self._urls = [manifest.shard_url(n) for n in names]
        self._order: EpochOrder | None = None
        self.fetched = {"bytes": 0, "requests": 0}
        self.start = 0 if state is None else self._position(state)

    def _kept(self, excluded: Collection[str]) -> np.ndarray:
        gone = set(excluded)
        return np.array([0 if s.name in gone else s.sequences for s in self.split.shards], dtype=np.int64)

    def position(self, state: dict) -> int:
        """The stream position a reader state stands at (checked against this stream)."""
        return self._position(state)

    def _position(self, state: dict) -> int:
        version = state.get("version")
        if version in (1, 2):
            raise ValueError(f"reader state version {version} is from before the reader mixed shards "
                             f"(version {STATE_VERSION}): the global order has changed, so its position "
                             "would resume at other sequences. Start the run afresh (a new train.run_dir), "
                             "or resume it with the md4_dist that wrote it")
        if version == 3:  # the order of run_length 1, unchanged since
            state = {**state, "run_length": 1, "lanes": 1}
        elif version != STATE_VERSION:
            raise ValueError(f"reader state version {version!r} is not {STATE_VERSION} "
                             f"(manifest {self.manifest.url})")
        want = {"seed": self.seed, "manifest_sha256": self.manifest.sha256, "mix": self.mix,
                "run_length": self.run_length, "lanes": self.lanes}
        for key, value in want.items():
            if state.get(key) != value:
                raise ValueError(f"reader state {key} = {state.get(key)!r} does not match this reader's "
                                 f"{value!r} (manifest {self.manifest.url})")
        epoch, cursor, before = state["epoch"], state["cursor"], state["excluded"]
        n_before = int(self._kept(before).sum())
        if not (isinstance(epoch, int) and isinstance(cursor, int) and epoch >= 0 and 0 <= cursor < n_before):
            raise ValueError(f"reader state has a bad epoch / cursor: {epoch!r} / {cursor!r}")
        if sorted(before) != self.excluded:  # the same point of the full order, counted in this one
            log.warning("the reader state left out shards %s, this reader leaves out %s: the epoch "
                        "goes on from the same point without the shards now excluded", before, self.excluded)
            other = EpochOrder(self._counts, self._kept(before), self.seed, epoch, self.mix,
                               self.run_length, self.lanes)
            cursor = self._epoch(epoch).recount(cursor, other)
        return epoch * self.sequences + cursor

    def state_at(self, position: int) -> dict:
        """The JSON state for global stream position `position`."""
        n = self.sequences
        return {"version": STATE_VERSION, "seed": self.seed, "epoch": position // n,
                "cursor": position % n, "manifest_sha256": self.manifest.sha256, "mix": self.mix,
                "run_length": self.run_length, "lanes": self.lanes,
                "excluded": self.excluded}

    def skipped_before(self, position: int) -> int:
        """The excluded shards' sequences the stream has stepped over before `position`, from the
        start of epoch 0 (the trainer's skipped_sequences): each whole epoch's, and in the current
        one those of the windows the positions before `position` come from (with mix = 1, the
        shards whose place in the order lies before it)."""
        if not self.excluded:
            return 0
        per_epoch = int(self._counts.sum()) - self.sequences
        epoch, i = divmod(position, self.sequences)
        return epoch * per_epoch + (self._epoch(epoch).left_out_through(i - 1) if i else 0)

    # -- the global order ---------------------------------------------------------------------
    def _epoch(self, epoch: int) -> EpochOrder:
        """The order of one epoch (order.py), the current one cached."""
        if self._order is None or self._order.epoch != epoch:
            self._order = EpochOrder(self._counts, self._live, self.seed, epoch, self.mix,
                                     self.run_length, self.lanes)
        return self._order

    def locate_many(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, record index in the shard's file) of each global stream position."""
        shard = np.empty(len(positions), dtype=np.int64)
        record = np.empty(len(positions), dtype=np.int64)
        epochs = positions // self.sequences
        for epoch in np.unique(epochs):
            at = epochs == epoch
            shard[at], record[at] = self._epoch(int(epoch)).locate(positions[at] % self.sequences)
        return shard, record

    def locate(self, position: int) -> tuple[int, int]:
        """(shard index, index inside the shard's file) of global stream position `position`."""
        shard, record = self.locate_many(np.array([position], dtype=np.int64))
        return int(shard[0]), int(record[0])

    # -- iteration ------------------------------------------------------------------------------
    def _batch_positions(self, b: int) -> np.ndarray | None:
        """Positions of this rank's micro-batch b, or None past the end of a finite stream."""
        m, W = self.batch_size, self.world_size
        positions = self.start + self.rank + (b * m + np.arange(m, dtype=np.int64)) * W
        if not self.loop:
            epoch_end = (self.start // self.sequences + 1) * self.sequences  # of the starting epoch
            positions = positions[positions < epoch_end]
            if not len(positions):
                return None
        return positions

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        per_chunk = max(1, min(CHUNK_BYTES // self.layout.stride, CHUNK_SEQUENCES) // self.batch_size)
        # A lane's neighbours may fall in other workers' batches (one a step in each lane, with
        # one micro-batch a step): a worker reads through the others' records, so that a run
        # stays one range.
        gap = workers - 1 if self.run_length > 1 else 0
        b = worker
        while True:
            batches = []  # (b, positions) of the chunk
            for _ in range(per_chunk):
                positions = self._batch_positions(b)
                if positions is None:
                    break
                batches.append((b, positions))
                b += workers
            if not batches:
                return
            allpos = np.concatenate([p for _, p in batches])
            shard, record = self.locate_many(allpos)
            rows = self._fetch(shard, record, gap)  # [len(allpos), L]
            ids = self._starts[shard] + record
            at = 0
            for bb, positions in batches:
                k = slice(at, at + len(positions))
                at += len(positions)
                yield {"tokens": torch.from_numpy(rows[k].astype(np.int64)),
                       "ids": torch.from_numpy(ids[k].astype(np.int64)),
                       "positions": torch.from_numpy(positions),
                       "state": self.state_at(self.start + (bb + 1) * self.batch_size * self.world_size)}
            if len(batches) < per_chunk:
                return

    def _fetch(self, shard: np.ndarray, record: np.ndarray, gap: int = 0) -> np.ndarray:
        """The sequences (shard[i], record[i]), fetched once each, in the order asked."""
        rows = np.empty((len(shard), self.manifest.seq_len), dtype=self.manifest.dtype)
        wanted, where = {}, {}
        for s in np.unique(shard):
            at = np.flatnonzero(shard == s)
            distinct, inverse = np.unique(record[at], return_inverse=True)
            wanted[self._urls[s]], where[self._urls[s]] = distinct, (at, inverse)
        for url, got in fetch(wanted, self.layout, self.storage, self.fetched, gap).items():
            at, inverse = where[url]
            rows[at] = got[inverse]
        return rows


def make_loader(stream: TokenStream, num_workers: int = 2) -> DataLoader:
    """A DataLoader over the stream's ready-made batches, in order."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      prefetch_factor=4 if num_workers else None)
