"""What a run shows beside metrics.jsonl and TensorBoard (tested in test_train.py): a profiler
trace of chosen steps, the records mirrored to Weights & Biases (offline mode, read back from the
run's .wandb file with W&B's own protobuf records) and to Ray's metrics (read back from the node's
Prometheus endpoint while the run lives). One real run on a real local Ray cluster carries all
three; the resume of the same W&B run is checked in test_train's S3 run."""

import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import pytest

from conftest import free_port
from test_train import ROOT


def wandb_records(path: str) -> list:
    """The records of a W&B run file (run-<id>.wandb): W&B's header, then LevelDB's log format
    (32 KiB blocks of chunks: crc32c, length, kind; FULL = 1, FIRST, MIDDLE, LAST = 4), each
    record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:7]
    pos, block, records, chunks = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        chunks += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def wandb_history(records) -> dict[int, dict]:
    """{step: {key: value}} of the run's logged history."""
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            out[row["_step"]] = row
    return out


def wandb_env(root) -> dict:
    """W&B's own files (settings, cache, its service's logs) under `root`, none in $HOME."""
    return {"WANDB_DIR": str(root), "WANDB_CONFIG_DIR": str(root / "config"),
            "WANDB_CACHE_DIR": str(root / "cache"), "WANDB_DATA_DIR": str(root / "data"), "WANDB_SILENT": "true"}


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head` with a known metrics export port (Prometheus text at /metrics); its
    workers report their metrics every second. Yields (GCS address, metrics URL, environment)."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's AF_UNIX sockets live here
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    gcs, metrics = free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex,
               RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="300", RAY_metrics_report_interval_ms="1000",
               **wandb_env(tmp_path / "wandb-home"))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".build", "torch_extensions"))
    start = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
             f"--metrics-export-port={metrics}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             "--disable-usage-stats", f"--temp-dir={temp}"]
    r = subprocess.run(start, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{metrics}/metrics", env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(temp, ignore_errors=True)


def scrape(url: str) -> dict[str, set[float]]:
    """{metric name: its values} of md4_dist's gauges for run "tiny", by Prometheus' own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_md4_dist_") and s.labels.get("run") == "tiny":
                found.setdefault(s.name, set()).add(s.value)
    return found


def test_profile_wandb_and_ray_metrics_of_a_real_run(ray_head, tmp_path, tiny_data):
    address, metrics_url, env = ray_head
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "md4_dist.train", os.path.join(ROOT, "configs", "tiny.json")]
    for s in (f"train.run_dir={run_dir}", f"data.manifest={tiny_data}", "train.steps=8", "logging.every=2",
              "logging.peak_tflops=1", "logging.sample_every=8", "logging.sample_steps=8",
              "logging.profile_steps=[3, 4]", "logging.profile_all_ranks=true",
              "logging.wandb.enabled=true", "logging.wandb.mode=offline", "logging.wandb.project=md4-test"):
        cmd += ["--set", s]
    out = open(tmp_path / "train.log", "w+")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=dict(env, RAY_ADDRESS=address))
    seen: dict[str, set[float]] = {}
    deadline = time.monotonic() + 900
    try:
        while proc.poll() is None:  # Ray drops a worker's gauges when it exits: read them meanwhile
            assert time.monotonic() < deadline, "the run did not end within 900 s"
            for name, values in scrape(metrics_url).items():
                seen.setdefault(name, set()).update(values)
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    out.seek(0)
    log = out.read()
    assert proc.returncode == 0, log[-5000:]
    got = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in got] == [2, 4, 6, 8]

    # the trace: rank 0's and, with profile_all_ranks, rank 1's; "step n" ranges of steps 3 and 4 only
    for rank in (0, 1):
        trace = json.loads((run_dir / "profile" / f"steps-3-4-rank-{rank}.json").read_text())
        names = [e.get("name", "") for e in trace["traceEvents"]]
        assert sorted(n for n in names if n.startswith("step ")) == ["step 3", "step 4"], rank
        assert any(n.startswith("aten::") for n in names), "the steps' operators"
    assert f"profiled steps 3-4: {run_dir}/profile/steps-3-4-rank-0.json" in log

    # W&B, offline: the run's file under <run_dir>/wandb, its id the one kept in wandb.json
    run_id = json.loads((run_dir / "wandb.json").read_text())["id"]
    (run_file,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
    records = wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.project, run.display_name) == (run_id, "md4-test", "tiny")
    history = wandb_history(records)
    assert sorted(history) == [2, 4, 6, 8]
    from md4_dist.trainer.metrics import TAGS

    for rec in got:
        row = history[rec["step"]]
        for name, value in rec.items():
            if name != "step":
                assert row[TAGS[name]] == pytest.approx(value, rel=1e-12), name
        assert row["schedule/exponents/_type"] == "histogram"
    table = history[8]["samples/path"]  # the samples of step 8, as a W&B table
    text = json.loads(open(os.path.join(os.path.dirname(run_file), "files", table)).read())["data"][0][0]
    assert text.count("**sample ") == 4

    # Ray's metrics: each value the gauge showed is one the run recorded
    for name, key in (("ray_md4_dist_train_loss", "loss"),
                      ("ray_md4_dist_train_nelbo_bits_per_token", "nelbo_bits_per_token"),
                      ("ray_md4_dist_perf_tokens_per_s", "tokens_per_s"), ("ray_md4_dist_perf_mfu", "mfu")):
        assert seen.get(name), f"{name} never showed in {metrics_url}; seen: {sorted(seen)}"
        recorded = [rec[key] for rec in got]
        for value in seen[name]:
            assert value == pytest.approx(min(recorded, key=lambda v: abs(v - value)), rel=1e-9), name


def test_profile_steps_are_validated():
    from md4_dist.config import ConfigError, config_from_dict

    assert config_from_dict({"logging": {"profile_steps": [5, 5]}}).logging.profile_steps == (5, 5)
    assert config_from_dict({}).logging.profile_steps == ()
    for bad in ([3], [4, 3], [0, 2], [1, 2, 3]):
        with pytest.raises(ConfigError, match=r"config key 'logging.profile_steps': profile_steps must be "
                                              r"\[first, last\] with 1 <= first <= last"):
            config_from_dict({"logging": {"profile_steps": bad}})


def test_wandb_asked_for_without_wandb_installed_fails_before_any_worker_starts(tmp_path, tiny_data):
    """wandb hidden from the command (an import of it fails, as where it is not installed)."""
    code = ("import sys; sys.modules['wandb'] = None; from md4_dist.train import main; "
            "sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code, os.path.join(ROOT, "configs", "tiny.json"),
           "--set", f"train.run_dir={tmp_path / 'run'}", "--set", f"data.manifest={tiny_data}",
           "--set", "logging.wandb.enabled=true"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert ("config key 'logging.wandb.enabled' is true, but the wandb package is not installed: "
            "pip install 'md4_dist[wandb]'") in r.stderr
    assert "ray" not in r.stderr.lower().split("error:")[0]  # nothing was launched


def test_each_attempts_wandb_file_is_whole_in_the_s3_run_directory_at_close(s3_bucket, tmp_path, monkeypatch):
    """The records of every attempt of one W&B run reach the bucket: the run directory's last
    upload follows the mirror's close. (W&B's finish() alone returned before its file was written
    out in 2 of 48 offline runs, and the upload then carried the file's header only.)"""
    import fsspec

    from md4_dist.config import load_config
    from md4_dist.trainer.metrics import MetricsWriter
    from md4_dist.trainer.wandb_log import WandbMirror

    for k, v in wandb_env(tmp_path / "wandb-home").items():
        monkeypatch.setenv(k, v)
    run_dir = f"{s3_bucket}/runs/w"
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.json"), [
        f"train.run_dir={run_dir}", "logging.wandb.enabled=true", "logging.wandb.mode=offline"])
    attempts = 8
    for _ in range(attempts):
        writer = MetricsWriter(run_dir, cfg.storage)
        writer.mirrors.append(WandbMirror(cfg, writer.files))
        for step in (5, 10):
            writer.write({"step": step, "loss": 1.0 / step})
        writer.close()
        time.sleep(1.1)  # W&B names an attempt's directory by its start's second
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL_S3"]})
    root = run_dir.removeprefix("s3://")
    run_id = json.loads(fs.cat(f"{root}/wandb.json"))["id"]
    files = fs.glob(f"{root}/wandb/offline-run-*/run-{run_id}.wandb")
    assert len(files) == attempts, fs.find(f"{root}/wandb")
    for i, path in enumerate(files):
        fs.get(path, str(tmp_path / f"{i}.wandb"))
        logged = wandb_records(str(tmp_path / f"{i}.wandb"))
        assert [r.run.run_id for r in logged if r.WhichOneof("record_type") == "run"] == [run_id], path
        assert sorted(wandb_history(logged)) == [5, 10], path
