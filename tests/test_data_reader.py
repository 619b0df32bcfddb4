"""The streaming reader: one global order, exactly once for any world size, exact resume."""

import io
import json
import math
import shutil
import tarfile

import numpy as np
import pytest
import torch

from data_tools import synthetic
from md4_dist.data import CorruptShardError, ManifestError, TokenStream, load_manifest, make_loader
from md4_dist.data.manifest import check_shards
from md4_dist.data.reader import excluded_shards

N, L, V = 230, 8, 13  # 230 sequences in shards of 40 (the last one shorter)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("markov") / "ds"
    assert synthetic.main(["--out", str(out), "--vocab-size", str(V), "--seq-len", str(L),
                           "--num-sequences", str(N), "--seed", "5", "--sequences-per-shard", "40"]) == 0
    return str(out)


def read_all(corpus, world, workers, batch=7, seed=0, state=None, loop=False, max_batches=None):
    """{rank: [batches]} read through real DataLoaders."""
    m = load_manifest(corpus)
    out = {}
    for r in range(world):
        s = TokenStream(m, "train", batch, rank=r, world_size=world, seed=seed, state=state, loop=loop)
        batches = []
        for b in make_loader(s, workers):
            batches.append(b)
            if max_batches and len(batches) == max_batches:
                break
        out[r] = batches
    return out


def global_order(per_rank, world):
    """Interleave rank streams back into global positions: position P is rank P % W's (P // W)-th."""
    streams = {r: torch.cat([b["ids"] for b in bs]).tolist() for r, bs in per_rank.items()}
    order = []
    for k in range(max(len(s) for s in streams.values())):
        for r in range(world):
            if k < len(streams[r]):
                order.append(streams[r][k])
    return order


@pytest.mark.parametrize("world", [1, 2, 3])
def test_exactly_once_per_epoch_and_same_order_for_any_world_size(corpus, world):
    per_rank = read_all(corpus, world, workers=2)
    order = global_order(per_rank, world)
    assert sorted(order) == list(range(N)), "every sample exactly once"
    reference = global_order(read_all(corpus, 1, workers=0), 1)
    assert order == reference, "the global order does not depend on world size or workers"
    assert order != sorted(order), "the order is shuffled"
    for r, batches in per_rank.items():  # rank r holds positions r, r + W, r + 2W, ...
        got = torch.cat([b["positions"] for b in batches]).tolist()
        assert got == list(range(r, N, world))


def test_tokens_match_the_ids(corpus):
    """Each batch row is the sequence its id names (checked against a plain tar read)."""
    m = load_manifest(corpus)
    by_id = {}
    for shard in m.split("train").shards:
        with tarfile.open(m.shard_url(shard.name)) as tf:
            for member in tf.getmembers():
                gid = int(member.name.split("-")[1].split(".")[0])
                by_id[gid] = np.load(io.BytesIO(tf.extractfile(member).read()))
    assert len(by_id) == N
    for b in read_all(corpus, 2, workers=2)[1]:
        for row, gid in zip(b["tokens"], b["ids"].tolist()):
            assert row.tolist() == by_id[gid].tolist()
        assert b["tokens"].dtype == torch.int64


def test_order_depends_on_seed_and_epoch(corpus):
    a = global_order(read_all(corpus, 1, workers=0, seed=0), 1)
    b = global_order(read_all(corpus, 1, workers=0, seed=1), 1)
    assert a != b and sorted(a) == sorted(b)
    m = load_manifest(corpus)
    s = TokenStream(m, "train", 10, seed=0)
    two = torch.cat([b["ids"] for _, b in zip(range(2 * N // 10 + 1), s)]).tolist()
    e0, e1 = two[:N], two[N:2 * N]
    assert sorted(e0) == sorted(e1) == list(range(N)) and e0 != e1


@pytest.mark.parametrize("new_world", [2, 3])
def test_resume_equals_uninterrupted(corpus, new_world):
    """Stop a 2-rank run after 5 batches, resume from rank 0's state at world size new_world:
    the global stream continues exactly as an uninterrupted reader's, across the epoch end."""
    m = load_manifest(corpus)
    batch = 6
    first = read_all(corpus, 2, workers=2, batch=batch, loop=True, max_batches=5)
    state = first[0][-1]["state"]
    assert state == first[1][-1]["state"], "every rank reports the same state"
    assert json.loads(json.dumps(state)) == state and state["cursor"] == 5 * batch * 2
    # after the restore, 30 batches per rank: 2 epochs' worth, so the epoch boundary is crossed
    resumed = read_all(corpus, new_world, workers=2, batch=batch, state=state, loop=True,
                       max_batches=30 * 2 // new_world)
    got = global_order(resumed, new_world)
    straight = TokenStream(m, "train", 1, loop=True)
    want = torch.cat([b["ids"] for _, b in zip(range(state["cursor"] + len(got)), straight)]).tolist()
    assert got == want[state["cursor"]:]
    assert resumed[0][-1]["state"]["epoch"] >= 1


def test_finite_reader_ends_at_the_end_of_its_epoch(corpus):
    """loop=False reads to the end of the epoch it starts in, also when resumed in a later one."""
    m = load_manifest(corpus)
    looping = TokenStream(m, "train", 50)
    batches = [b for _, b in zip(range(6), looping)]  # 300 positions: into epoch 1 (N = 230)
    state = batches[-1]["state"]
    assert state["epoch"] == 1 and state["cursor"] == 300 - N
    rest = list(TokenStream(m, "train", 50, state=state, loop=False))
    ids = torch.cat([b["ids"] for b in rest]).tolist()
    assert len(ids) == N - state["cursor"] and len(set(ids)) == len(ids)
    epoch1 = torch.cat([b["ids"] for _, b in zip(range(10), TokenStream(m, "train", 50))]).tolist()[N:2 * N]
    assert ids == epoch1[state["cursor"]:]


def test_state_mismatch_is_refused(corpus):
    m = load_manifest(corpus)
    state = next(iter(TokenStream(m, "train", 4)))["state"]
    with pytest.raises(ValueError, match="seed"):
        TokenStream(m, "train", 4, seed=9, state=state)
    with pytest.raises(ValueError, match="manifest_sha256"):
        TokenStream(m, "train", 4, state={**state, "manifest_sha256": "0" * 64})


@pytest.fixture
def damaged(corpus, tmp_path):
    """The corpus with train-000002.tar (ids 80..119) truncated to half its bytes."""
    ds = tmp_path / "ds"
    shutil.copytree(corpus, ds)
    victim = ds / "train-000002.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return ds


def test_size_check_names_missing_and_truncated_shards(corpus, damaged):
    assert check_shards(load_manifest(corpus)) == []
    (damaged / "train-000005.tar").unlink()
    m = load_manifest(str(damaged))
    want = m.split("train").shards[2].bytes
    problems = {p.name: p.why for p in check_shards(m)}
    assert problems == {"train-000002.tar": f"{want // 2} bytes, the manifest says {want}",
                        "train-000005.tar": "missing"}
    with pytest.raises(ManifestError, match=r"2 shard\(s\) disagree.*train-000002.tar: .*train-000005.tar: "
                                            r"missing.*data.on_corrupt=skip"):
        excluded_shards(m, "raise")
    assert excluded_shards(m, "skip") == {"train": problems}


def test_truncated_shard_read_is_an_error_naming_it(damaged):
    m = load_manifest(str(damaged))
    with pytest.raises(CorruptShardError, match="train-000002.tar: .*truncated"):
        for _ in TokenStream(m, "train", 10, loop=False):
            pass
    (damaged / "train-000002.tar").unlink()
    with pytest.raises(CorruptShardError, match="train-000002.tar"):
        for _ in TokenStream(m, "train", 10, loop=False):
            pass


@pytest.mark.parametrize("world", [1, 3])
def test_excluded_shard_leaves_the_order_full_and_exactly_once(corpus, damaged, world):
    """Without the damaged shard: the full order with its ids taken out, every batch full, the
    same at any world size and worker count, each other sequence once per epoch."""
    m = load_manifest(str(damaged))
    gone = excluded_shards(m, "skip")["train"]
    full = global_order(read_all(corpus, 1, workers=0), 1)
    want = [i for i in full if not 80 <= i < 120]
    per_rank = {}
    for r in range(world):
        s = TokenStream(m, "train", 7, rank=r, world_size=world, exclude=gone, loop=False)
        per_rank[r] = list(make_loader(s, 2))
        assert all(len(b["ids"]) == 7 for b in per_rank[r][:-1]), "every batch but the epoch's last is full"
    assert global_order(per_rank, world) == want
    # looping on: the next epoch leaves it out too, and the state says so
    s = TokenStream(m, "train", 10, exclude=gone)
    two = [b for _, b in zip(range(2 * len(want) // 10), s)]
    ids = torch.cat([b["ids"] for b in two]).tolist()
    assert sorted(ids[:len(want)]) == sorted(ids[len(want):]) == sorted(want)
    assert two[-1]["state"]["excluded"] == ["train-000002.tar"] and two[-1]["state"]["epoch"] == 2
    assert s.skipped_before(s.position(two[-1]["state"])) == 2 * 40
    with pytest.raises(ManifestError, match="no shard"):
        TokenStream(m, "train", 10, exclude=["train-999.tar"])


def test_resume_with_another_exclusion_goes_on_from_the_same_point(corpus):
    """A state saved before a shard was excluded (or after it was repaired) resumes at the same
    point of the full order: the rest of the epoch is the full order's rest, less what is excluded."""
    m = load_manifest(corpus)  # the same manifest bytes as the damaged copy's
    full = torch.cat([b["ids"] for b in TokenStream(m, "train", 1, loop=False)]).tolist()
    for before, now in (((), ("train-000002.tar",)), (("train-000002.tar",), ())):
        s = TokenStream(m, "train", 5, exclude=before)
        state = [b for _, b in zip(range(20), s)][-1]["state"]  # 100 sequences in
        order = [i for i in full if not (before and 80 <= i < 120)]
        upto = full.index(order[99]) + 1  # the same point of the full order
        rest = torch.cat([b["ids"] for b in TokenStream(m, "train", 5, exclude=now, state=state,
                                                         loop=False)]).tolist()
        assert rest == [i for i in full[upto:] if not (now and 80 <= i < 120)], (before, now)


def test_manifest_errors_name_the_url(corpus, tmp_path):
    with pytest.raises(ManifestError, match=r"nowhere/manifest.json does not exist"):
        load_manifest(str(tmp_path / "nowhere"))
    m = load_manifest(corpus)
    with pytest.raises(ManifestError, match=r"manifest.json: vocab_size 13 disagrees.*model.vocab_size = 50"):
        m.check_compatible(vocab_size=50, seq_len=L)
    with pytest.raises(ManifestError, match=r"seq_len 8 disagrees.*data.seq_len = 16"):
        m.check_compatible(vocab_size=V, seq_len=16)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"format_version": 1, "vocab_size": 3}')
    with pytest.raises(ManifestError, match="bad/manifest.json is not a valid manifest"):
        load_manifest(str(bad))


def test_synthetic_entropy_matches_a_plug_in_estimate(tmp_path):
    """A large sample's empirical H(X1) + (L - 1) H(X2 | X1) agrees with the manifest's exact value."""
    out = tmp_path / "big"
    Vb, Lb, Nb = 8, 64, 20000
    assert synthetic.main(["--out", str(out), "--vocab-size", str(Vb), "--seq-len", str(Lb),
                           "--num-sequences", str(Nb), "--seed", "11"]) == 0
    m = load_manifest(str(out))
    x = torch.cat([b["tokens"] for b in TokenStream(m, "train", 1000, loop=False)]).numpy()
    p1 = np.bincount(x[:, 0], minlength=Vb) / Nb
    pairs = np.zeros((Vb, Vb))
    np.add.at(pairs, (x[:, :-1].ravel(), x[:, 1:].ravel()), 1)
    joint = pairs / pairs.sum()
    cond = pairs / pairs.sum(1, keepdims=True)
    h1 = -(p1[p1 > 0] * np.log2(p1[p1 > 0])).sum()
    h21 = -(joint[pairs > 0] * np.log2(cond[pairs > 0])).sum()
    estimate = (h1 + (Lb - 1) * h21) / Lb
    print(f"exact {m.entropy_bits_per_token:.5f}, plug-in {estimate:.5f}")
    assert abs(estimate - m.entropy_bits_per_token) < 0.005
    assert m.entropy_bits_per_token < math.log2(Vb) - 0.5  # far from uniform: the check has power


def test_same_seed_same_bytes(tmp_path):
    args = ["--vocab-size", "9", "--seq-len", "5", "--num-sequences", "50", "--seed", "2",
            "--sequences-per-shard", "16", "--val-fraction", "0.2"]
    for d in ("a", "b"):
        assert synthetic.main(["--out", str(tmp_path / d), *args]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and "val-000000.tar" in names
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
