"""A damaged shard in a training run: under data.on_corrupt = skip it is left out of the order
before the workers read anything, so every step trains a full global batch (real Ray, real
DeepSpeed ZeRO-3 over gloo, 2 CPU workers)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(*sets, timeout=900):
    cmd = [sys.executable, "-m", "md4_dist.train", os.path.join(ROOT, "configs", "tiny.json")]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".build", "torch_extensions"))
    env.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def strict_json(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(line, parse_constant=refuse)


def test_skipped_shard_leaves_every_step_full(tmp_path):
    from data_tools import synthetic
    from md4_dist.data import CorruptShardError, load_manifest
    from md4_dist.trainer.ledger import effective_ledger, ledger_problems, read_ledger

    data = tmp_path / "markov"
    assert synthetic.main(["--out", str(data), "--vocab-size", "64", "--seq-len", "64", "--num-sequences",
                           "400", "--sequences-per-shard", "40", "--val-fraction", "0"]) == 0
    m = load_manifest(str(data))
    # the first shard of epoch 0's order (seed 0), so that the first step would have read it
    first = int(np.random.default_rng([0, 0]).permutation(len(m.split("train").shards))[0])
    victim = m.split("train").shards[first]
    path = data / victim.name
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 3])

    run_dir = tmp_path / "run"
    steps = 6
    r = train(f"train.run_dir={run_dir}", f"data.manifest={data}", f"train.steps={steps}", "logging.every=1",
              "eval.every=0", "logging.sample_every=0", "data.on_corrupt=skip", "data.record_sample_ids=true",
              "optim.warmup_steps=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"leaving out 1 train shard(s), 40 of 400 sequences: {path}: " in r.stdout + r.stderr

    got = [strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in got] == list(range(1, steps + 1))
    for rec in got:
        assert np.isfinite(rec["loss"]) and rec["tokens_per_s"] > 0, rec
        assert rec["skipped_sequences"] == 40 and rec["samples_seen"] == rec["step"] * 32
    # every step trained 32 sequences, none of the damaged shard's, each once: the stream's order
    lines = read_ledger(str(run_dir))
    trained = effective_ledger(lines)
    assert [len(trained[s]) for s in range(1, steps + 1)] == [32] * steps
    start = int(m.split("train").shard_starts()[first])
    ids = [i for s in trained.values() for i in s]
    assert len(set(ids)) == len(ids) and not set(ids) & set(range(start, start + 40))
    assert ledger_problems(lines, m, 32, 0, steps, exclude=[victim.name]) == []
    with pytest.raises(CorruptShardError, match=victim.name):  # the full order would read it
        ledger_problems(lines, m, 32, 0, steps)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("data/skipped_sequences")] == [40] * steps


def test_metrics_jsonl_writes_a_non_finite_value_as_null(tmp_path):
    """JSON has no NaN: such a value is null in metrics.jsonl, and itself in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from md4_dist.trainer.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path))
    writer.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5})
    writer.close()
    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    assert strict_json(line) == {"step": 1, "loss": None, "grad_norm": None, "lr": 0.5}
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert np.isnan(acc.Scalars("train/loss")[0].value) and acc.Scalars("train/lr")[0].value == 0.5
