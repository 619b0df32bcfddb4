"""The training job as a user runs it: real Ray (embedded local instance), real DeepSpeed ZeRO-3
over gloo with 2 CPU workers, real TensorBoard event files."""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(*sets, timeout=900, env_changes=None):
    """The command as a user runs it; `env_changes` sets variables (None: removes them)."""
    cmd = [sys.executable, "-m", "md4_dist.train", os.path.join(ROOT, "configs", "tiny.json")]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ)
    for k, v in (env_changes or {}).items():
        env.pop(k, None) if v is None else env.__setitem__(k, v)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".build", "torch_extensions"))
    env.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_tiny_run_writes_metrics_and_tensorboard(tmp_path):
    """The tiny config as the README runs it, on a corpus it makes on first use. Its validation
    NELBO, an upper bound on the corpus entropy, must respect the bound and be far below the
    log2(V) of a uniform guess. TensorBoard shows each record value under its grouped tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from md4_dist.trainer.metrics import TAGS

    run_dir, data = tmp_path / "run", tmp_path / "markov"  # no dataset yet: made on first use
    shm_before = set(os.listdir("/dev/shm"))
    # a peak for the CPU (no device table entry), so that every record carries its MFU
    r = train(f"train.run_dir={run_dir}", f"data.manifest={data}", "logging.every=50",
              "eval.every=150", "logging.peak_tflops=1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 300/300" in r.stdout + r.stderr
    # torch's deprecation warnings for the collectives DeepSpeed calls, once per worker, not at
    # every step (DeepSpeed's CPU accelerator re-armed them without LOCAL_SIZE; engine.build_engine):
    # at most 2 warnings x 2 workers, none of them folded by Ray's log as "[repeated Nx ...]"
    warned = [ln for ln in (r.stdout + r.stderr).splitlines() if "is deprecated" in ln]
    assert len(warned) <= 4 and not any("repeated" in ln for ln in warned), warned
    # ... and no shared-memory buffer left behind (DeepSpeed's CPU all-reduce maps one per rank,
    # never unlinked, where LOCAL_SIZE is set before its communication starts)
    left = [f for f in set(os.listdir("/dev/shm")) - shm_before if f.startswith("deepspeed")]
    assert not left, left
    got = records((run_dir / "metrics.jsonl").read_text())
    assert [rec["step"] for rec in got] == [50, 100, 150, 200, 250, 300]
    keys = {"loss", "nelbo_bits_per_token", "lr", "grad_norm", "tokens_per_s", "step_time_s", "samples_seen",
            "epoch", "skipped_sequences", "exponent_min", "exponent_mean", "exponent_max", "data_wait_share"}
    assert all(keys <= set(rec) for rec in got)
    assert [rec["step"] for rec in got if "val_nelbo_bits_per_token" in rec] == [150, 300]
    assert got[-1]["samples_seen"] == 300 * 32
    from md4_dist.config import load_config
    from md4_dist.trainer.perf import flops_per_token

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.json"))
    per_token = flops_per_token(cfg.model, cfg.diffusion, cfg.data.seq_len)
    for rec in got:  # the model's FLOPs over both workers' peak (1 TFLOP/s each)
        assert rec["mfu"] == pytest.approx(rec["tokens_per_s"] * per_token / 2e12, rel=1e-9)
        assert "peak_memory_gib" not in rec  # GPU memory, on GPU workers only
        # a step's time (the mean since the last record) is its tokens at the record's rate
        assert rec["step_time_s"] == pytest.approx(32 * 64 / rec["tokens_per_s"], rel=1e-9)
        assert rec["epoch"] == pytest.approx(rec["samples_seen"] / 19000, abs=32 / 19000)  # 95 % of 20000
        # the slowest rank's time blocked on its loader, a share of the record's training time
        assert 0 < rec["data_wait_share"] < 1
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["eval"]["every"] == 150 and os.path.isabs(saved["data"]["manifest"])
    assert (run_dir / "run.lock").read_bytes() == b"", "the run's lock released at its end"

    entropy = json.loads((data / "manifest.json").read_text())["entropy_bits_per_token"]
    last = got[-1]
    assert last["val_sequences"] == 1000  # the whole val split: 5 % of 20000
    assert 0 < last["val_nelbo_se"] < 0.1
    assert last["val_nelbo_bits_per_token"] >= entropy - 3 * last["val_nelbo_se"]
    assert last["val_nelbo_bits_per_token"] < 6 - 1.0, "far below log2(64) = 6"
    assert last["nelbo_bits_per_token"] < got[0]["nelbo_bits_per_token"]

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    # tiny.json's samples (logging.sample_every), in the text tab: 4 of 64 token ids
    samples = acc.Tensors("samples/text_summary")
    assert [e.step for e in samples] == [150, 300]
    assert samples[-1].tensor_proto.string_val[0].decode().count("**sample ") == 4
    # every record value under its tag (metrics.TAGS), grouped by purpose
    names = set().union(*got) - {"step"}
    assert set(acc.Tags()["scalars"]) == {TAGS[n] for n in names}
    assert {TAGS[n].split("/")[0] for n in names} == {"train", "val", "schedule", "perf", "data"}
    assert (TAGS["loss"], TAGS["nelbo_bits_per_token"], TAGS["tokens_per_s"], TAGS["skipped_sequences"]) == (
        "train/loss", "train/nelbo_bits_per_token", "perf/tokens_per_s", "data/skipped_sequences")
    for key in ("loss", "nelbo_bits_per_token", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu",
                "exponent_mean", "epoch", "data_wait_share"):
        events = acc.Scalars(TAGS[key])
        assert [e.step for e in events] == [rec["step"] for rec in got]
        assert [e.value for e in events] == pytest.approx([rec[key] for rec in got], rel=1e-6)
    assert [e.step for e in acc.Scalars("val/nelbo_bits_per_token")] == [150, 300]
    assert acc.Tags()["histograms"] == ["schedule/exponents"]

    again = train(f"train.run_dir={run_dir}", f"data.manifest={data}", "logging.peak_tflops=1")
    assert again.returncode == 2 and "holds a run with another config" in again.stderr
    assert "differing: eval.every, logging.every" in again.stderr
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 6, "nothing lost"


def test_one_worker_follows_two_workers(tmp_path, tiny_data):
    """The same global batch and seed on 1 worker (2 accumulated micro-batches) and on 2 ZeRO-3
    workers (every parameter partitioned), gathered block by block or the whole trunk at once
    (train.compile_unit): the same loss curve, step by step."""
    common = [f"data.manifest={tiny_data}", "train.steps=12", "logging.every=1", "eval.every=6",
              "deepspeed.persistence_threshold=0", "optim.warmup_steps=2"]
    curves = {}
    for workers, unit in ((2, "block"), (2, "trunk"), (1, "block")):
        run_dir = tmp_path / f"w{workers}-{unit}"
        r = train(f"train.run_dir={run_dir}", f"cluster.num_workers={workers}",
                  f"train.compile_unit={unit}", *common)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        curves[workers, unit] = records((run_dir / "metrics.jsonl").read_text())
    one = curves[1, "block"]
    for two in (curves[2, "block"], curves[2, "trunk"]):
        assert [rec["step"] for rec in one] == [rec["step"] for rec in two] == list(range(1, 13))
        for key in ("loss", "nelbo_bits_per_token", "grad_norm", "exponent_mean"):
            a, b = [rec[key] for rec in one], [rec[key] for rec in two]
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6), key
        for step in (6, 12):
            assert one[step - 1]["val_nelbo_bits_per_token"] == pytest.approx(
                two[step - 1]["val_nelbo_bits_per_token"], rel=1e-4)
    # the curve moved: equal curves are not two copies of the initial loss
    assert one[-1]["nelbo_bits_per_token"] < one[0]["nelbo_bits_per_token"] - 0.05


def test_zero2_takes_the_gradient_norm_at_the_recorded_steps_only(tmp_path, tiny_data):
    """At ZeRO-2 without clipping, DeepSpeed leaves the gradient norm (a host wait for the GPU at
    every step) out of the steps no record shows, and the loop asks for it on the recorded ones:
    every record still carries it, equal to the norm DeepSpeed takes when it takes it every step
    (deepspeed.extra turning that back on) in a run that is otherwise the same. In bf16, as
    owt_small trains: DeepSpeed's bf16 overflow check is off in both runs (md4_dist's default)."""
    common = [f"data.manifest={tiny_data}", "train.steps=15", "logging.every=5", "eval.every=0",
              "deepspeed.zero_stage=2", "deepspeed.precision=bf16", "optim.grad_clip=0"]
    got = {}
    for name, sets in (("at-records", []),
                       ("every-step", ['deepspeed.extra={"zero_optimization": {"compute_grad_norm": true}}'])):
        run_dir = tmp_path / name
        r = train(f"train.run_dir={run_dir}", *common, *sets)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        got[name] = records((run_dir / "metrics.jsonl").read_text())
    at_records, every_step = got["at-records"], got["every-step"]
    assert [rec["step"] for rec in at_records] == [rec["step"] for rec in every_step] == [5, 10, 15]
    for key in ("grad_norm", "loss"):
        a, b = [rec[key] for rec in at_records], [rec[key] for rec in every_step]
        assert all(v > 0 for v in a) and a == pytest.approx(b, rel=1e-6), key


def holding(values: list[str], files) -> list[str]:
    """'name: value' for each (name, bytes) of `files` that holds one of `values`."""
    return [f"{name}: {v}" for name, data in files for v in values if v.encode() in data]


def local_files(root: str):
    """(path, bytes) of every regular file under root, links not followed (Ray's sockets left out)."""
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    yield path, f.read()


def test_run_directory_and_data_on_s3(tmp_path, s3_bucket, capsys):
    """Data and run directory on S3 (a moto server on 127.0.0.1): config.json, metrics.jsonl,
    TensorBoard's event files, the profiler's trace and W&B's offline files end up in the bucket
    (the command run again continues the same W&B run); its checkpoint evaluates and exports from there.
    The keys come from the config's storage section only (none in the command's environment, so
    none in the workers'): no file of the run nor of Ray's session holds them, and a rotated key
    resumes the run."""
    import shutil
    import tempfile
    import uuid

    import fsspec
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from data_tools import synthetic
    from test_observability import wandb_env, wandb_history, wandb_records

    data, run_dir = f"{s3_bucket}/markov", f"{s3_bucket}/runs/tiny"
    assert synthetic.main(["--out", data, "--vocab-size", "64", "--seq-len", "64",
                           "--num-sequences", "1000", "--val-fraction", "0.05"]) == 0
    keys = [f"AKIA{uuid.uuid4().hex[:16].upper()}", f"secret-{uuid.uuid4().hex}"]  # moto takes any
    # the embedded Ray instance's session directory, to look into (short: Ray's sockets live there)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    no_env_keys = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "RAY_TMPDIR": ray_tmp,
                   **wandb_env(tmp_path / "wandb-home")}
    observed = ("logging.profile_steps=[9, 10]", "logging.wandb.enabled=true", "logging.wandb.mode=offline")
    try:
        r = train(f"train.run_dir={run_dir}", f"data.manifest={data}", "train.steps=10",
                  "logging.every=5", "eval.every=10", f"storage.key={keys[0]}", f"storage.secret={keys[1]}",
                  *observed, env_changes=no_env_keys)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        # the key rotated: the same run, resumed (finished: nothing left to do)
        keys += [f"AKIA{uuid.uuid4().hex[:16].upper()}", f"secret-{uuid.uuid4().hex}"]
        again = train(f"train.run_dir={run_dir}", f"data.manifest={data}", "train.steps=10",
                      "logging.every=5", "eval.every=10", f"storage.key={keys[2]}",
                      f"storage.secret={keys[3]}", *observed, env_changes=no_env_keys)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert f"resuming the run in {run_dir}" in again.stdout
        sessions = [p for p in os.listdir(os.path.join(ray_tmp, "ray")) if p.startswith("session_2")]
        assert len(sessions) == 2, sessions  # one embedded instance per command
        looked = list(local_files(ray_tmp))
        assert len(looked) > 20  # logs of GCS, the raylet, the workers...
        assert holding(keys, looked) == []
        for out in (r, again):
            assert not any(k in out.stdout + out.stderr for k in keys)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL_S3"]})
    root = run_dir.removeprefix("s3://")
    run_files = [(p, fs.cat_file(p)) for p in fs.find(root)]
    assert sum(p.endswith("/state.json") for p, _ in run_files) == 1  # the checkpoint's, looked into
    assert holding(keys, run_files) == []
    assert json.loads(fs.cat(f"{root}/config.json"))["train"]["run_dir"] == run_dir
    assert fs.cat(f"{root}/run.lock") == b"", "the run's lock released at its end"
    got = records(fs.cat(f"{root}/metrics.jsonl").decode())
    assert [rec["step"] for rec in got] == [5, 10] and "val_nelbo_bits_per_token" in got[-1]
    fs.get(f"{root}/tensorboard", str(tmp_path / "tb"), recursive=True)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10]
    trace = json.loads(fs.cat(f"{root}/profile/steps-9-10-rank-0.json"))
    assert sorted(e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("step ")) == [
        "step 10", "step 9"]
    run_id = json.loads(fs.cat(f"{root}/wandb.json"))["id"]
    attempts = sorted(fs.glob(f"{root}/wandb/offline-run-*/run-{run_id}.wandb"))
    assert len(attempts) == 2, fs.find(f"{root}/wandb")  # one per command, both of the one W&B run
    histories = []
    for i, path in enumerate(attempts):  # by their start
        fs.get(path, str(tmp_path / f"attempt-{i}.wandb"))
        logged = wandb_records(str(tmp_path / f"attempt-{i}.wandb"))
        assert [r.run.run_id for r in logged if r.WhichOneof("record_type") == "run"] == [run_id]
        histories.append(sorted(wandb_history(logged)))
    assert histories == [[5, 10], []]  # the second command found the run finished: nothing to log

    # the checkpoint read back from the bucket, consolidated in one process, and exported to it
    from md4_dist import load_pretrained
    from md4_dist.cli import run as run_cli
    from md4_dist.evaluate import main as evaluate
    from md4_dist.export import main as export

    import torch

    from md4_dist.inference.consolidate import open_checkpoint
    from md4_dist.data.storage import StorageError

    assert run_cli(export, ["--checkpoint", run_dir, "--out", f"{s3_bucket}/exported"]) == 0
    got = load_pretrained(f"{s3_bucket}/exported").model.state_dict()
    with open_checkpoint(run_dir) as ckpt:
        assert ckpt.url.startswith(f"{run_dir}/checkpoints/checkpoint-00000010-")
        want = ckpt.weights()
        assert sorted(os.listdir(ckpt.local)) == ["rank-00000.pt", "rank-00001.pt"], "the EMA's files only"
        shards = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{ckpt.url.removeprefix('s3://')}/step"))
        ckpt.files(f"step/{shards[0]}")  # one file of the directory first, then all of it
        trained = ckpt.weights(ema=False)  # from the ZeRO-3 shards, copied now
        assert sorted(os.listdir(os.path.join(ckpt.local, "step"))) == shards
        stamp = os.stat(os.path.join(ckpt.local, "step")).st_mtime_ns
        ckpt.files("step", "rank-00000.pt")  # each copied once
        assert os.stat(os.path.join(ckpt.local, "step")).st_mtime_ns == stamp
        with pytest.raises(StorageError, match=f"{ckpt.url}/nothing-here does not exist"):
            ckpt.files("nothing-here")
        assert sorted(os.listdir(ckpt.local)) == ["rank-00000.pt", "rank-00001.pt", "step"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert trained.keys() == want.keys() and not all(torch.equal(trained[k], want[k]) for k in want)
    capsys.readouterr()
    assert run_cli(evaluate, ["--checkpoint", run_dir, "--max-sequences", "20"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["sequences"] == 20 and res["step"] == 10 and res["data"] == f"{data}/manifest.json"

    other = train(f"train.run_dir={run_dir}", f"data.manifest={data}", "train.steps=10", "logging.every=5",
                  "eval.every=10", "logging.peak_tflops=1", *observed)
    assert other.returncode == 2, other.stderr[-2000:]
    assert "holds a run with another config (differing: logging.peak_tflops)" in other.stderr


@pytest.mark.parametrize("sets,message", [
    (["model.widht=3"], "unknown config key 'model.widht'"),
    (["train.global_batch=24", "train.micro_batch=8", "cluster.num_workers=[1, 2]"],
     "'train.global_batch': train.global_batch (24) is not divisible by train.micro_batch x workers (8 x 2)"),
    (["data.manifest=/nonexistent/ds", "data.synthetic=null"], "/nonexistent/ds/manifest.json does not exist"),
    (["model.vocab_size=65"], "vocab_size 64 disagrees with the model's model.vocab_size = 65"),
    (["deepspeed.zero_stage=0", "deepspeed.precision=bf16", "train.micro_batch=8"],
     "'deepspeed.zero_stage': deepspeed.zero_stage 0 with bf16 would sum the gradients of 2 "
     "micro-batches per step in bf16 at 2 worker(s)"),
])
def test_bad_config_fails_before_any_worker_starts(tmp_path, tiny_data, sets, message):
    t = time.monotonic()
    r = train(f"train.run_dir={tmp_path / 'run'}", f"data.manifest={tiny_data}", *sets)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "ray" not in r.stderr.lower().split("error:")[0]  # nothing was launched
    assert time.monotonic() - t < 60


def test_workers_the_embedded_instance_cannot_hold_fail_at_once(tmp_path, tiny_data):
    """Ray would wait for the CPUs and retry without end; the embedded instance is this machine,
    so the run fails, naming the keys."""
    cpus = os.cpu_count() + 1
    t = time.monotonic()
    r = train(f"train.run_dir={tmp_path / 'run'}", f"data.manifest={tiny_data}", "cluster.num_workers=[1, 2]",
              f"cluster.cpus_per_worker={cpus}", "train.global_batch=32")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert (f"cannot hold 1 worker(s) (cluster.num_workers = [1, 2], its minimum): they need {cpus} "
            f"CPUs (cluster.cpus_per_worker = {cpus} each)") in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert time.monotonic() - t < 120


def test_evaluation_without_a_val_split_fails_before_any_worker_starts(tmp_path):
    from data_tools import synthetic

    data = str(tmp_path / "no-val")
    assert synthetic.main(["--out", data, "--vocab-size", "64", "--seq-len", "64",
                           "--num-sequences", "200", "--val-fraction", "0"]) == 0
    r = train(f"train.run_dir={tmp_path / 'run'}", f"data.manifest={data}", "eval.every=10")
    assert r.returncode == 2 and "'eval.every' = 10 needs a 'val' split" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run" / "config.json").exists()


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
    assert [e.step for e in acc.Scalars("train/nelbo_bits_per_token")] == [5, 10]
