"""Errors no restart can cure end the run at once, naming the culprit: a damaged shard, training
gone NaN (real Ray, real DeepSpeed)."""

import json
import os
import tarfile
import time

from test_data_faults import train


def make_corpus(tmp_path):
    from data_tools import synthetic
    from md4_dist.data import load_manifest

    data = tmp_path / "markov"
    assert synthetic.main(["--out", str(data), "--vocab-size", "64", "--seq-len", "64", "--num-sequences",
                           "400", "--sequences-per-shard", "40", "--val-fraction", "0"]) == 0
    return data, load_manifest(str(data))


def test_truncated_shard_fails_before_any_worker_starts(tmp_path):
    data, m = make_corpus(tmp_path)
    victim = data / m.split("train").shards[3].name
    victim.write_bytes(victim.read_bytes()[:1000])
    r = train(f"train.run_dir={tmp_path / 'run'}", f"data.manifest={data}", "train.steps=4")
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"{victim}: 1000 bytes, the manifest says" in r.stderr and "data.on_corrupt=skip" in r.stderr
    assert "ray" not in r.stderr.lower().split("error:")[0]  # nothing was launched


def test_shard_damaged_inside_ends_the_run_without_retries(tmp_path):
    """The right size, a broken tar header inside: found by the worker that reads it, which
    records it; the restarted group returns at once and the driver names the shard."""
    data, m = make_corpus(tmp_path)
    victim = data / m.split("train").shards[0].name
    with tarfile.open(victim) as tf:
        header = tf.getmembers()[3].offset  # member 3's tar header block
    raw = bytearray(victim.read_bytes())
    raw[header:header + 512] = b"A" * 512
    victim.write_bytes(bytes(raw))
    t = time.monotonic()
    r = train(f"train.run_dir={tmp_path / 'run'}", f"data.manifest={data}", "train.steps=30",
              "logging.every=1", "eval.every=0", "logging.sample_every=0")
    print(f"ended after {time.monotonic() - t:.0f} s")
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    # tarfile reads the broken header as the end: "truncated: 3 of the manifest's 40 sequences"
    assert f"{victim}: " in r.stderr and "a restart cannot cure this" in r.stderr, r.stderr[-3000:]


def checkpoints(run) -> list[str]:
    return [n for n in os.listdir(run / "checkpoints") if n.startswith("checkpoint-")] \
        if (run / "checkpoints").exists() else []


# A learning rate near fp32's largest value: after a step or two the weights overflow and the loss
# is NaN (at ZeRO-3 in fp32, tiny.json's, DeepSpeed applies every step).
NAN_LR = ("optim.lr=1e38", "optim.warmup_steps=1", "train.steps=20", "eval.every=0", "logging.sample_every=0")


def nan_run(tmp_path, *sets):
    """tiny.json trained at NAN_LR with `sets`, which ends with exit status 2: (run dir, result)."""
    data, _ = make_corpus(tmp_path)
    run = tmp_path / "run"
    r = train(f"train.run_dir={run}", f"data.manifest={data}", *NAN_LR, *sets)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    return run, r


def test_a_nan_loss_is_recorded_and_ends_the_run_at_its_record_without_retries(tmp_path):
    run, r = nan_run(tmp_path, "logging.every=5", "checkpoint.every=10")
    assert "the training loss is nan at the record of step 5" in r.stderr, r.stderr[-3000:]
    assert "a restart cannot cure this" in r.stderr and "(none written yet)" in r.stderr
    # one failure: the group Ray restarts finds it recorded and returns at once (trainer/fatal.py)
    assert "Error count: 2" not in r.stdout + r.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(rec["step"], rec["loss"]) for rec in records] == [(5, None)]
    assert checkpoints(run) == []


def test_weights_gone_nan_are_never_checkpointed(tmp_path):
    """The checkpoint falls due (step 5) before any record: the check before it finds the weights
    (finite, if huge, after step 3; NaN after step 4's NaN loss)."""
    run, r = nan_run(tmp_path, "logging.every=10", "checkpoint.every=5")
    assert "NaN or infinite values after step 5 (" in r.stderr, r.stderr[-3000:]
    assert "the run stops without writing its checkpoint" in r.stderr
    assert checkpoints(run) == []
    assert not (run / "metrics.jsonl").exists() or (run / "metrics.jsonl").read_text() == ""
