"""The training job as a user runs it: real Ray (embedded local instance), real DeepSpeed ZeRO-3
over gloo with 2 CPU workers, real TensorBoard event files."""

import json
import os
import subprocess
import sys
import time

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


def test_tiny_run_writes_metrics_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, data = tmp_path / "run", tmp_path / "markov"  # no dataset yet: made on first use
    r = train(f"train.run_dir={run_dir}", f"data.manifest={data}", "train.steps=20",
              "logging.every=5", "data.synthetic.num_sequences=2000")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 20/20" in r.stdout + r.stderr
    assert (data / "manifest.json").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [5, 10, 15, 20]
    keys = {"loss", "nelbo_bits_per_token", "lr", "grad_norm", "tokens_per_s", "samples_seen",
            "exponent_min", "exponent_mean", "exponent_max"}
    assert keys <= set(records[0])
    assert records[-1]["samples_seen"] == 20 * 32
    assert records[-1]["nelbo_bits_per_token"] < records[0]["nelbo_bits_per_token"] < 6.2  # log2(64) = 6
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["steps"] == 20 and os.path.isabs(saved["data"]["manifest"])

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    for key in ("loss", "nelbo_bits_per_token", "lr", "tokens_per_s", "exponent_mean"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [5, 10, 15, 20]
        assert [e.value for e in events] == pytest.approx([rec[key] for rec in records], rel=1e-6)
    assert acc.Tags()["histograms"] == ["exponents"]

    again = train(f"train.run_dir={run_dir}", f"data.manifest={data}")
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4, "nothing lost"


@pytest.mark.parametrize("sets,message", [
    (["model.widht=3"], "unknown config key 'model.widht'"),
    (["train.global_batch=24", "train.micro_batch=8", "cluster.num_workers=[1, 2]"],
     "'train.global_batch': train.global_batch (24) is not divisible by train.micro_batch x workers (8 x 2)"),
    (["data.manifest=/nonexistent/ds", "data.synthetic=null"], "/nonexistent/ds/manifest.json does not exist"),
    (["model.vocab_size=65"], "vocab_size 64 disagrees with the model's model.vocab_size = 65"),
])
def test_bad_config_fails_before_any_worker_starts(tmp_path, tiny_data, sets, message):
    t = time.monotonic()
    r = train(f"train.run_dir={tmp_path / 'run'}", f"data.manifest={tiny_data}", *sets)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "ray" not in r.stderr.lower().split("error:")[0]  # nothing was launched
    assert time.monotonic() - t < 60


def test_ray_job_submit(ray_cluster, tmp_path, tiny_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    run_dir = tmp_path / "run"
    runtime_env = {"env_vars": {"TORCH_EXTENSIONS_DIR": os.environ.get(
        "TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".build", "torch_extensions"))}}
    address, auth = ray_cluster
    cmd = [ray_bin, "job", "submit", "--address", address, "--runtime-env-json", json.dumps(runtime_env),
           "--", sys.executable, "-m", "md4_dist.train", os.path.join(ROOT, "configs", "tiny.json"),
           "--set", f"train.run_dir={run_dir}", "--set", f"data.manifest={tiny_data}",
           "--set", "train.steps=10", "--set", "logging.every=5"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, **auth))
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "succeeded" in out, out[-4000:]
    assert "step 10/10" in out
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("nelbo_bits_per_token")] == [5, 10]
