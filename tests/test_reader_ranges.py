"""The reader at scale: each rank fetches only its share of the bytes (counted by the filesystem
it reads through), global batches mix many shards, and a damaged or truncated shard read by byte
ranges is still an error naming it (local disk and a moto S3 server)."""

import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from md4_dist.data import CorruptShardError, ManifestError, TokenStream, load_manifest, make_loader
from md4_dist.data.ranges import Layout, fetch
from md4_dist.data.storage import filesystem, read_bytes, write_bytes
from md4_dist.data.synthetic import write_synthetic_corpus

N, L = 1600, 16  # 16 shards of 100


class CountingFileSystem(LocalFileSystem):
    """Local files through a protocol of its own, counting the bytes its files hand out and the
    reads that hand them out (class-wide: the reader builds its own instances)."""

    protocol = "counting"
    read_bytes = reads = 0

    def _open(self, path, mode="rb", **kwargs):
        return Counted(super()._open(path, mode, **kwargs))


class Counted:
    def __init__(self, f):
        self.f = f

    def read(self, n=-1):
        data = self.f.read(n)
        CountingFileSystem.read_bytes += len(data)
        CountingFileSystem.reads += 1
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


fsspec.register_implementation("counting", CountingFileSystem, clobber=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranges") / "ds"
    write_synthetic_corpus(str(out), vocab_size=50, seq_len=L, num_sequences=N, seed=3, sequences_per_shard=100)
    return str(out)


def fetched_by(stream) -> tuple[int, int]:
    """(bytes, reads) the filesystem handed out while the stream read one epoch (in this process)."""
    CountingFileSystem.read_bytes = CountingFileSystem.reads = 0
    for _ in stream:
        pass
    return CountingFileSystem.read_bytes, CountingFileSystem.reads


def test_rank_0_of_8_fetches_an_eighth_of_rank_0_of_1(corpus):
    m = load_manifest("counting://" + corpus)
    dataset = sum(s.bytes for s in m.split("train").shards)
    one, _ = fetched_by(TokenStream(m, "train", 10, loop=False))
    assert one <= dataset, "one rank reads the dataset once"
    per_rank = [fetched_by(TokenStream(m, "train", 10, rank=r, world_size=8, loop=False)) for r in range(8)]
    print(f"dataset {dataset} B; rank 0 of 1: {one} B; ranks of 8: {per_rank}")
    assert 0.11 < per_rank[0][0] / one < 0.14
    assert sum(b for b, _ in per_rank) <= 1.1 * dataset, "all ranks together fetch the dataset about once"
    # the same figures without the counting protocol: the reader's own tally agrees
    s = TokenStream(load_manifest(corpus), "train", 10, world_size=8, loop=False)
    fetched_by(s)
    assert s.fetched["bytes"] == per_rank[0][0]


def test_windows_mix_shards_exactly_once_at_any_world_size_and_worker_count(corpus):
    """Windows of 4 shards: a batch of 64 spans about 4 shards; each epoch holds every sequence
    once, in the same global order whatever the world size and worker count."""
    m = load_manifest(corpus)
    ref = torch.cat([b["ids"] for b in TokenStream(m, "train", 64, mix=4, loop=False)]).tolist()
    assert sorted(ref) == list(range(N))
    starts = m.split("train").shard_starts()
    shards = [len(set(np.searchsorted(starts, ref[i:i + 64], side="right"))) for i in range(0, N, 64)]
    assert min(shards) >= 3 and max(shards) <= 8, shards  # 4 shards per window; a batch may straddle two
    windows = [set(np.searchsorted(starts, ref[i:i + 400], side="right")) for i in range(0, N, 400)]
    assert all(len(w) == 4 for w in windows) and len(set().union(*windows)) == 16
    for world, workers in ((3, 2), (5, 0)):
        streams = [torch.cat([b["ids"] for b in make_loader(TokenStream(m, "train", 7, rank=r, world_size=world,
                                                                         mix=4, loop=False), workers)]).tolist()
                   for r in range(world)]
        assert [streams[p % world][p // world] for p in range(N)] == ref


def test_resume_and_exclusion_across_windows(corpus):
    """A state resumes where it stood (here, mid-window into the next epoch); a shard excluded
    later leaves the rest of the full order in place; another mix or an old state is refused."""
    m = load_manifest(corpus)
    straight = torch.cat([b["ids"] for _, b in zip(range(64), TokenStream(m, "train", 50, mix=4))]).tolist()
    state = [b for _, b in zip(range(35), TokenStream(m, "train", 50, mix=4))][-1]["state"]
    assert state["epoch"] == 1 and state["version"] == 4 and state["mix"] == 4
    rest = torch.cat([b["ids"] for _, b in zip(range(5), TokenStream(m, "train", 50, mix=4, state=state))]).tolist()
    assert rest == straight[35 * 50:40 * 50]
    gone = m.split("train").shards[5].name  # ids 500..599
    later = torch.cat([b["ids"] for b in TokenStream(m, "train", 50, mix=4, state=state, exclude=[gone],
                                                     loop=False)]).tolist()
    assert later == [i for i in straight[35 * 50:2 * N] if not 500 <= i < 600]
    s = TokenStream(m, "train", 50, mix=4, exclude=[gone])
    # skipped: epoch 0's 100, and in epoch 1 the 100 again once the stream has read from its window
    assert s.position(state) % 1500 < 300, "the state stands in epoch 1's first window"
    first_window = list(np.random.default_rng([0, 1]).permutation(16)).index(5) < 4  # shards permuted by (seed, epoch)
    assert s.skipped_before(s.position(state)) == 100 + 100 * first_window
    assert s.skipped_before(2 * 1500 - 1) == 200  # the last position of epoch 1: every window begun
    with pytest.raises(ValueError, match="mix = 4 does not match this reader's 64"):
        TokenStream(m, "train", 50, state=state)
    with pytest.raises(ValueError, match=r"version 2 is from before the reader mixed shards.*afresh"):
        TokenStream(m, "train", 50, mix=4, state={**state, "version": 2})


def test_runs_are_read_side_by_side_exactly_once_at_any_world_size(corpus, caplog):
    """data.run_length: a window's shuffle moves runs of neighbouring sequences, read side by side
    in lanes (the trainer's global batch). Each epoch holds every sequence once, in the same
    global order at every world size dividing the lanes and any worker count; each lane goes on
    along its run; rank 0 of 8 makes about one request per run instead of one per sequence."""
    m = load_manifest(corpus)

    def ids(**kw):
        return torch.cat([b["ids"] for b in TokenStream(m, "train", 4, mix=4, loop=False, **kw)]).tolist()

    runs = {"run_length": 10, "lanes": 16}  # windows of 4 shards of 100: 40 runs, groups of 16, 16, 8
    ref = ids(**runs)
    assert sorted(ref) == list(range(N))
    for group, k in ((0, 16), (160, 16), (320, 8)):  # the first window's groups: k lanes of 10
        lanes = np.array(ref[group:group + 10 * k]).reshape(10, k)
        assert (np.diff(lanes, axis=0) == 1).all(), "each lane reads its run in order"
    assert ids() == ids(run_length=1, lanes=16), "runs of one: the plain shuffle, whatever the lanes"
    assert ref != ids(), "runs of ten: another order"
    for world, workers in ((2, 2), (4, 0), (8, 2)):
        streams = [torch.cat([b["ids"] for b in make_loader(TokenStream(m, "train", 2, rank=r, world_size=world,
                                                                         mix=4, loop=False, **runs), workers)]).tolist()
                   for r in range(world)]
        assert [streams[p % world][p // world] for p in range(N)] == ref
    plain, ran = (TokenStream(m, "train", 2, rank=0, world_size=8, mix=4, loop=False, **kw) for kw in ({}, runs))
    for stream in (plain, ran):
        for _ in stream:
            pass
    assert ran.fetched["bytes"] == plain.fetched["bytes"] == N // 8 * Layout(L, m.dtype).stride
    print(f"rank 0 of 8: {plain.fetched['requests']} requests a sequence at a time, {ran.fetched['requests']} in runs")
    assert ran.fetched["requests"] <= N // 8 // 10 + 8 < plain.fetched["requests"] // 4
    # a window of 400 sequences cannot hold 64 lanes of 10: said, naming the setting
    TokenStream(m, "train", 4, mix=4, run_length=10, lanes=64)
    assert "data.run_length 10 x 64 lanes is more than a window of 4 shards holds (400" in caplog.text


def test_runs_resume_and_leave_a_shard_out(corpus):
    """A state taken in runs resumes where it stood, and names its runs (another run_length is
    refused); an excluded shard leaves the rest of the runs' order in place; a version-3 state
    (before runs) resumes as runs of one, its order unchanged."""
    m = load_manifest(corpus)
    runs = {"mix": 4, "run_length": 10, "lanes": 16}
    straight = torch.cat([b["ids"] for _, b in zip(range(40), TokenStream(m, "train", 16, **runs))]).tolist()
    state = [b for _, b in zip(range(25), TokenStream(m, "train", 16, **runs))][-1]["state"]
    assert (state["version"], state["run_length"], state["lanes"]) == (4, 10, 16)
    rest = torch.cat([b["ids"] for _, b in zip(range(15), TokenStream(m, "train", 16, state=state, **runs))]).tolist()
    assert rest == straight[25 * 16:]
    with pytest.raises(ValueError, match="run_length = 10 does not match this reader's 1"):
        TokenStream(m, "train", 16, mix=4, state=state)
    gone = m.split("train").shards[5].name  # ids 500..599
    full = torch.cat([b["ids"] for b in TokenStream(m, "train", 16, loop=False, **runs)]).tolist()
    left = torch.cat([b["ids"] for b in TokenStream(m, "train", 16, loop=False, exclude=[gone], **runs)]).tolist()
    assert left == [i for i in full if not 500 <= i < 600]
    old = [b for _, b in zip(range(25), TokenStream(m, "train", 16, mix=4))][-1]["state"]
    v3 = {k: v for k, v in old.items() if k not in ("run_length", "lanes")} | {"version": 3}
    assert TokenStream(m, "train", 16, mix=4, state=v3).start == TokenStream(m, "train", 16, mix=4, state=old).start


def test_records_a_few_apart_share_one_range(corpus):
    """fetch's gap: records at most `gap` apart are read as one range, the ones between dropped
    (a worker reading its lanes through the records of the other workers' batches)."""
    m = load_manifest(corpus)
    layout, url = Layout(L, m.dtype), m.shard_url(m.split("train").shards[0].name)
    want = {url: np.array([3, 5, 7, 9, 40])}
    tight, loose = {}, {}
    a, b = fetch(want, layout, stats=tight), fetch(want, layout, stats=loose, gap=1)
    assert len(a[url]) == 5 and (a[url] == b[url]).all()
    assert (tight["requests"], loose["requests"]) == (5, 2)
    assert loose["bytes"] == (7 + 1) * layout.stride  # records 3..9 and 40


def test_damaged_record_names_the_shard_and_record(corpus, tmp_path):
    ds = tmp_path / "ds"
    fsspec.filesystem("file").cp(corpus, str(ds), recursive=True)
    victim = ds / "train-000007.tar"
    raw = bytearray(victim.read_bytes())
    stride = 1024  # a 512-byte tar header, then 128 + 16 * 2 bytes of .npy padded to 512
    raw[3 * stride + 257:3 * stride + 263] = b"XXXXXX"  # record 3's ustar magic
    victim.write_bytes(bytes(raw))
    m = load_manifest(str(ds))
    assert m.dtype == "uint16"
    with pytest.raises(CorruptShardError, match=r"train-000007.tar: record 3 \(bytes 3072..4096\) is not"):
        for _ in TokenStream(m, "train", 50, loop=False):
            pass
    # a manifest whose sizes do not fit the writer's fixed records is refused before any read
    text = (ds / "manifest.json").read_text()
    size = m.split("train").shards[0].bytes
    (ds / "manifest.json").write_text(text.replace(f'"bytes": {size}', f'"bytes": {size + 512}', 1))
    with pytest.raises(ManifestError, match="train-000000.tar: the manifest says .* not a shard data_tools wrote"):
        TokenStream(load_manifest(str(ds)), "train", 50)


def test_range_past_the_end_of_a_truncated_shard_on_s3_names_it(s3_bucket):
    url = f"{s3_bucket}/trunc"
    write_synthetic_corpus(url, vocab_size=50, seq_len=L, num_sequences=300, seed=3, sequences_per_shard=100)
    m = load_manifest(url)
    victim = m.shard_url("train-000001.tar")
    write_bytes(victim, read_bytes(victim)[:30000])  # records 0..28 remain whole
    with pytest.raises(CorruptShardError, match=f"{victim}: truncated: 30000 bytes, record (29|[3-9][0-9]) needs"):
        for _ in TokenStream(m, "train", 20, loop=False):
            pass
    fs, path = filesystem(victim)
    fs.rm_file(path)
    with pytest.raises(CorruptShardError, match=f"{victim} does not exist"):
        for _ in TokenStream(m, "train", 20, loop=False):
            pass
