"""The global order of one epoch of a split: a pure function of (seed, epoch, mix, run_length,
lanes) and the shards' sequence counts.

The shards are permuted by (seed, epoch) and cut into windows of `mix` consecutive shards (the
last one may hold fewer). The sequences of a window are shuffled together by (seed, epoch,
window), one by one or in runs of neighbours read side by side (`shuffled_runs`), and the windows
follow each other. A shard left out (data.on_corrupt = "skip") keeps its place, its sequences are
taken out of the window's shuffle and the others keep their order, so the order without it is the
full order with its sequences removed.

With mix = 64, a global batch of 512 drawn from a window holds sequences of about 64 shards, each
from a different place in its shard: a batch mixes the corpus although each shard is a
contiguous stretch of it (data_tools.shard writes the corpus in input order).
"""

from __future__ import annotations

import numpy as np

MIX = 64  # shards per window: the shards a global batch draws from


def shuffled_runs(n: int, run_length: int, lanes: int, rng: np.random.Generator) -> np.ndarray:
    """The window's order: [n] indices into its n sequences (its shards' records end to end).

    With run_length 1, a shuffle. Otherwise the sequences are cut into runs of `run_length`
    neighbours, the runs shuffled, and each group of `lanes` runs read side by side: slot s of a
    group holding k runs takes record s // k of its run s % k (the last group may hold fewer;
    the sequences after the last whole run come last, in order). Position P of the stream is
    read by rank P mod W, so where W divides `lanes` (the trainer's lanes are its global batch,
    which every world size divides) a rank's positions fall in lanes/W lanes of each group, each
    a run of neighbours: one ranged read per run instead of one per sequence. A global batch of
    `lanes` positions still holds `lanes` runs from all over the window."""
    full = n // run_length
    perm = rng.permutation(full)  # with run_length 1 the same draw as a plain shuffle
    t = np.arange(full * run_length, dtype=np.int64)
    group, s = np.divmod(t, lanes * run_length)
    k = np.minimum(lanes, full - group * lanes)  # runs in each slot's group
    run = perm[group * lanes + s % k]
    return np.concatenate([run * run_length + s // k, np.arange(full * run_length, n, dtype=np.int64)])


class Window:
    """One window's sequences in order: `shard[k]`, `record[k]` for its k-th live sequence, and
    `full[k]`, that sequence's index in the window's order before any shard was left out."""

    def __init__(self, shards: np.ndarray, counts: np.ndarray, live: np.ndarray, key: list[int],
                 run_length: int = 1, lanes: int = 1):
        sizes = counts[shards]  # [s] sequences of each of the window's shards, in window order
        ends = np.cumsum(sizes)
        slots = shuffled_runs(int(ends[-1]), run_length, lanes, np.random.default_rng(key))
        which = np.searchsorted(ends, slots, side="right")  # the window's shard of each slot
        keep = live[shards][which] > 0
        self.full = np.flatnonzero(keep)
        self.shard = shards[which[keep]]
        self.record = (slots - (ends - sizes)[which])[keep]


class EpochOrder:
    """The order of one epoch over shards with `counts` sequences, of which those with `live`
    > 0 are read (live is counts with the left-out shards' set to 0)."""

    def __init__(self, counts: np.ndarray, live: np.ndarray, seed: int, epoch: int, mix: int,
                 run_length: int = 1, lanes: int = 1):
        self.counts, self.live, self.seed, self.epoch = counts, live, seed, epoch
        self.run_length, self.lanes = run_length, lanes
        shards = np.random.default_rng([seed, epoch]).permutation(len(counts))
        self.windows = [shards[w:w + mix] for w in range(0, len(shards), mix)]
        self.sizes = np.array([live[s].sum() for s in self.windows], dtype=np.int64)  # live per window
        self.full_sizes = np.array([counts[s].sum() for s in self.windows], dtype=np.int64)
        self.ends = np.cumsum(self.sizes)  # end of each window in the epoch's cursor
        self._cache: dict[int, Window] = {}

    def window(self, w: int) -> Window:
        if w not in self._cache:
            self._cache[w] = Window(self.windows[w], self.counts, self.live, [self.seed, self.epoch, w],
                                    self.run_length, self.lanes)
            while len(self._cache) > 2:  # a chunk of reads spans at most a window boundary or two
                del self._cache[next(iter(self._cache))]
        return self._cache[w]

    def split_cursor(self, cursor: int) -> tuple[int, int]:
        """(window, index among the window's live sequences) of epoch cursor `cursor`."""
        w = int(np.searchsorted(self.ends, cursor, side="right"))
        return w, cursor - int(self.ends[w] - self.sizes[w])

    def locate(self, cursors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, record index in the shard's file) of each epoch cursor."""
        shard = np.empty(len(cursors), dtype=np.int64)
        record = np.empty(len(cursors), dtype=np.int64)
        w_of = np.searchsorted(self.ends, cursors, side="right")
        for w in np.unique(w_of):
            at = w_of == w
            win = self.window(int(w))
            k = cursors[at] - (self.ends[w] - self.sizes[w])
            shard[at], record[at] = win.shard[k], win.record[k]
        return shard, record

    def left_out_through(self, cursor: int) -> int:
        """The left-out sequences of the windows up to the one holding cursor `cursor`: a
        window's left-out shards count as stepped over once the stream has read from it."""
        w = self.split_cursor(cursor)[0]
        return int((self.full_sizes[:w + 1] - self.sizes[:w + 1]).sum())

    def recount(self, cursor: int, other: "EpochOrder") -> int:
        """Cursor `cursor` of `other` (the same epoch with other shards left out) as a cursor of
        this order: the sequences before the same point of the full order that this one keeps."""
        w, k = other.split_cursor(cursor)
        f = int(other.window(w).full[k])  # the point, in the window's full shuffle
        return int(self.ends[w] - self.sizes[w]) + int(np.searchsorted(self.window(w).full, f))
