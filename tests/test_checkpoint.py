"""Checkpoints as a user meets them: a run stopped and started again with the same command, and a
worker killed mid-run. Real Ray (embedded), real DeepSpeed ZeRO-3 over gloo, 2 CPU workers."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from crafted import write_crafted
from md4_dist.checkpoint_format import load_file, step_of_dir
from md4_dist.data import load_manifest
from md4_dist.trainer.ledger import ledger_problems, read_ledger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = {"tokens_per_s", "step_time_s", "data_wait_share"}  # wall-clock figures; the rest must repeat exactly


def command(run_dir, data, *sets):
    cmd = [sys.executable, "-m", "md4_dist.train", os.path.join(ROOT, "configs", "tiny.json"),
           "--set", f"train.run_dir={run_dir}", "--set", f"data.manifest={data}"]
    for s in ("train.steps=60", "checkpoint.every=20", "logging.every=5", "eval.every=30", *sets):
        cmd += ["--set", s]
    return cmd


def environment():
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".build", "torch_extensions"))
    env.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    return env


def run(cmd, timeout=900):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environment(), cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def start(cmd, log):
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=environment(), cwd=ROOT)


def wait_for_checkpoint(run_dir, name, proc, timeout=600):
    """Until Ray has registered checkpoint `name` in its record of the run."""
    snapshot = run_dir / "checkpoints" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while not (snapshot.exists() and name in snapshot.read_text()):
        assert proc.poll() is None, f"the run ended before {name}"
        assert time.monotonic() < deadline, f"no {name} in {snapshot} after {timeout} s"
        time.sleep(0.05)


def wait_for_line(log_path, text, proc, timeout=600):
    deadline = time.monotonic() + timeout
    while text not in log_path.read_text():
        assert proc.poll() is None, f"the run ended before {text!r}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout} s"
        time.sleep(0.5)


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def assert_exactly_once(run_dir, data, steps, run_length=1):
    """The effective ledger holds steps 1..steps, each with the stream's own sequences for it."""
    problems = ledger_problems(read_ledger(str(run_dir)), load_manifest(data), 32, 0, steps,  # tiny.json's
                               run_length=run_length)
    assert not problems, problems[:5]


LONG = ("train.steps=100", "eval.every=50")  # room to stop a run after its second checkpoint


def stop_after_checkpoint(run_dir, data, log_path, *sets) -> int:
    """Start a run and SIGTERM it between its first two checkpoints, as `ray job stop` or a
    scheduler would: it saves after the step it is in and exits 143. Returns that step."""
    with open(log_path, "w") as log:
        proc = start(command(run_dir, data, *LONG, *sets), log)
        wait_for_checkpoint(run_dir, "checkpoint-00000020", proc)
        wait_for_line(log_path, "step 25/100", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 128 + signal.SIGTERM, log_path.read_text()[-4000:]
    out = log_path.read_text()
    stopped = int(out.split("stopped after step ")[1].split()[0])
    assert 25 <= stopped < 100 and records(run_dir)[-1]["step"] <= stopped
    assert f"checkpoint after step {stopped} (a SIGTERM to the driver): " in out
    assert out.count(f"stopped after step {stopped}") == 1  # rank 0 says it, once
    return stopped


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_data):
    """The records of an uninterrupted 2-worker run of LONG (ZeRO-3, fp32): what stopped and
    resumed runs must repeat."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run(command(run_dir, tiny_data, *LONG))
    want = records(run_dir)
    assert [r["step"] for r in want] == list(range(5, 101, 5))
    return want


def resumed_at(out: str) -> int:
    lines = [line for line in out.splitlines() if "resuming after step" in line]
    assert lines, out[-3000:]
    return int(lines[0].split("resuming after step ")[1].split()[0])


def test_stopped_run_resumes_exactly_and_at_another_world_size(tmp_path, tiny_data, straight):
    """Stop a 2-worker run (SIGTERM: it checkpoints first) and run the same command again: its
    metrics.jsonl equals that of an uninterrupted run, number for number, also when the latest
    checkpoint has a truncated shard (it falls back to the one before and says so). Resumed on 1
    worker instead (DeepSpeed's universal checkpoint, the EMA re-split), it follows the same curve
    up to float rounding."""
    want = straight
    same = tmp_path / "same"
    stopped = stop_after_checkpoint(same, tiny_data, tmp_path / "same.log")
    [latest] = (same / "checkpoints").glob(f"checkpoint-{stopped:08d}-*")
    shard = latest / "step" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = run(command(same, tiny_data, *LONG))
    before = (stopped - 1) // 20 * 20  # the periodic checkpoint before the damaged one
    assert "resuming the run in" in out and resumed_at(out) == before
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is damaged" in out
    assert f"resuming from {latest.parent}/checkpoint-{before:08d}" in out
    assert records(same) == want

    # The finished run's last checkpoint damaged in both ranks' shares of the check: a file made
    # to run code (read by rank 0) and a truncated one (rank 1). The same command resumes from
    # the one before, sets the damaged one aside and registers the good one again, so that with
    # tiny.json's checkpoint.keep = 2 the kept pair is {80, the new 100}: the damaged one never
    # takes the good one's place (Ray drops checkpoints oldest registered first).
    [last] = (same / "checkpoints").glob("checkpoint-00000100-*")
    marker = tmp_path / "ran"
    write_crafted(last / "rank-00000.pt", marker)
    truncated = last / "rank-00001.pt"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    out = run(command(same, tiny_data, *LONG))
    assert resumed_at(out) == 80 and not marker.exists(), "the crafted file ran its command"
    assert "rank-00000.pt is refused: it holds an object no md4_dist checkpoint holds" in out
    assert "rank-00001.pt is damaged" in out and f"set aside {last.name}" in out
    kept = sorted((same / "checkpoints").glob("checkpoint-*"))
    assert [step_of_dir(p.name) for p in kept] == [80, 100] and last not in kept
    snapshot = json.loads((same / "checkpoints" / "checkpoint_manager_snapshot.json").read_text())
    assert sorted(r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]) == [p.name for p in kept]
    assert records(same) == want

    resized = tmp_path / "resized"
    stopped = stop_after_checkpoint(resized, tiny_data, tmp_path / "resized.log")
    out = run(command(resized, tiny_data, *LONG, "cluster.num_workers=1"))
    assert resumed_at(out) == stopped and "(2 workers then, 1 now)" in out
    assert_follows(records(resized), want, rel=1e-4)
    assert json.loads((resized / "config.json").read_text())["cluster"]["num_workers"] == 1


def assert_follows(got, want, rel):
    """The same records, step for step and name for name, each figure within `rel`."""
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for key in ("loss", "nelbo_bits_per_token", "grad_norm", "lr", "exponent_mean",
                "val_nelbo_bits_per_token"):
        a = [r[key] for r in got if key in r]
        b = [r[key] for r in want if key in r]
        assert a == pytest.approx(b, rel=rel, abs=1e-6), key


def assert_master_weights(run_dir, step, precision):
    """The run's trained weights, consolidated in one process (md4_dist.inference.consolidate),
    are the fp32 master weights: the module's working weights in the checkpoint are their rounding."""
    from md4_dist.inference.consolidate import open_checkpoint

    with open_checkpoint(str(run_dir)) as ckpt:
        assert ckpt.step == step
        master = ckpt.weights(ema=False)
        module = load_file(os.path.join(ckpt.url, "step", "mp_rank_00_model_states.pt"))["module"]
    assert master.keys() == module.keys()
    for name, w in master.items():
        assert w.dtype == torch.float32 and torch.equal(w.to(module[name].dtype), module[name]), name
    if precision == "bf16":  # the master weights hold more than their bf16 rounding
        assert any(not torch.equal(w, w.bfloat16().float()) for w in master.values())


def test_zero_0_bf16_checkpoint_gives_its_fp32_master_weights(tmp_path, tiny_data):
    """Stage 0 with bf16 keeps the fp32 master weights in DeepSpeed's fp16/bf16 optimizer state,
    beside the module's bf16 weights."""
    run(command(tmp_path / "run", tiny_data, "train.steps=10", "checkpoint.every=10", "eval.every=0",
                "deepspeed.zero_stage=0", "deepspeed.precision=bf16"))
    assert_master_weights(tmp_path / "run", 10, "bf16")


@pytest.mark.parametrize("zero, precision", [(1, "bf16"), (2, "fp32"), (0, "fp32")])
def test_zero_0_1_2_resume_at_another_world_size_and_consolidate(tmp_path, tiny_data, straight, zero,
                                                                 precision):
    """ZeRO-1 and 2 partition the optimizer state, not the weights (with bf16, ZeRO-1 runs
    DeepSpeed's BF16_Optimizer, whose shards have a format of their own); ZeRO-0 partitions
    nothing. Stopped on 2 workers and resumed on 1, a run follows the uninterrupted one (in fp32
    the ZeRO-3 run: the stages differ in summation order only); the trained weights consolidated
    in one process are the fp32 master weights, whose rounding is what the module computes with."""
    sets = (f"deepspeed.zero_stage={zero}", f"deepspeed.precision={precision}")
    if precision == "bf16":
        run(command(tmp_path / "straight", tiny_data, *LONG, *sets))
        straight = records(tmp_path / "straight")
    resized = tmp_path / "resized"
    stopped = stop_after_checkpoint(resized, tiny_data, tmp_path / "resized.log", *sets)
    assert_master_weights(resized, stopped, precision)

    out = run(command(resized, tiny_data, *LONG, *sets, "cluster.num_workers=1"))
    assert resumed_at(out) == stopped and "(2 workers then, 1 now)" in out
    assert ("converted to a universal checkpoint" in out) == (zero > 0)  # stage 0: one whole file
    # 1 worker sums the same gradients in another order; bf16 rounds the sums' inputs apart
    if zero == 0 and precision == "fp32":  # DeepSpeed keeps no gradient norm there: none logged
        straight = [{k: v for k, v in r.items() if k != "grad_norm"} for r in straight]
    assert_follows(records(resized), straight, rel=1e-4 if precision == "fp32" else 2e-2)


def test_killed_worker_restarts_from_its_checkpoint_exactly_once(tmp_path, tiny_data):
    """SIGKILL one worker of a 2-worker run after its first checkpoint: Ray restarts the group from
    the checkpoint and the run completes; the effective sample ledger holds the stream's first
    60 x 32 sequences, each exactly once, in the steps the uninterrupted order puts them. The
    run reads its data in runs of 4 neighbours (data.run_length), side by side in 32 lanes."""
    run_dir = tmp_path / "run"
    with open(tmp_path / "run.log", "w") as log:
        proc = start(command(run_dir, tiny_data, "data.record_sample_ids=true", "data.run_length=4"), log)
        wait_for_checkpoint(run_dir, "checkpoint-00000020", proc)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if p.name() == "ray::RayTrainWorker"]  # not their DataLoader workers
        assert len(workers) == 2, [p.cmdline() for p in workers]
        workers[1].kill()
        assert proc.wait(timeout=900) == 0, (tmp_path / "run.log").read_text()[-4000:]
    log = (tmp_path / "run.log").read_text()
    assert "resuming after step" in log

    assert [r["step"] for r in records(run_dir)] == list(range(5, 61, 5))
    assert len({e["attempt"] for e in read_ledger(str(run_dir))}) == 2, "the killed attempt and the restarted one"
    assert_exactly_once(run_dir, tiny_data, 60, run_length=4)
    assert ledger_problems(read_ledger(str(run_dir)), load_manifest(tiny_data), 32, 0, 60), \
        "the runs' order is not the plain shuffle's"


def test_elastic_run_shrinks_and_grows_with_its_nodes(tmp_path, tiny_data, monkeypatch):
    """`cluster.num_workers: [1, 2]` on a Ray cluster of two 1-CPU nodes: a node drained for
    preemption after the first checkpoint, the run saves a checkpoint at once; the node removed,
    the run goes on with 1 worker from that checkpoint; the node added back once that worker has
    saved a checkpoint of its own, the run grows to 2 again from it. The
    effective ledger holds the stream's order exactly once, and the loss curve has no jump."""
    from ray.cluster_utils import Cluster

    # The controller runs in this cluster, whose processes read this environment: after the node
    # loss Ray first tries 2 workers again (the dead node's resources linger); this bounds the try,
    # as the launcher's cluster configs do.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": {
        "health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
        "health_check_failure_threshold": 3}})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        run_dir, log_path = tmp_path / "run", tmp_path / "run.log"
        # 600 steps: the 1-worker group runs about 13 steps/s here, so the growth (a node start,
        # Ray's resize check, a restart) has over 30 s before the run would end without it.
        cmd = command(run_dir, tiny_data, "train.steps=600", "logging.every=10", "eval.every=0",
                      "checkpoint.every=20", "cluster.num_workers=[1, 2]", "cluster.resize_check_s=5",
                      "data.record_sample_ids=true")
        with open(log_path, "w") as log:
            proc = start(cmd, log)
            wait_for_checkpoint(run_dir, "checkpoint-00000020", proc)
            # A spot reclaim as Ray's autoscaler announces it: the node drains, then goes.
            subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "drain-node",
                            "--address", cluster.address, "--node-id", nodes[1].node_id,
                            "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot",
                            "--deadline-remaining-seconds", "30"], check=True, timeout=60)
            wait_for_line(log_path, f"(Ray is preempting node {nodes[1].node_id[:12]}", proc)
            saved = int(log_path.read_text().split("(Ray is preempting node")[0]
                        .rsplit("checkpoint after step ", 1)[1])
            wait_for_checkpoint(run_dir, f"checkpoint-{saved:08d}", proc)  # committed, then gone
            cluster.remove_node(nodes[1])
            wait_for_line(log_path, "(2 workers then, 1 now)", proc)
            # The node comes back only once the 1-worker group has committed a checkpoint: a group
            # that grows before that resumes from the 2-worker checkpoint ("2 workers then, 2 now").
            shrunk = int(log_path.read_text().split("(2 workers then, 1 now)")[0]
                         .rsplit("resuming after step ", 1)[1].split()[0])
            wait_for_checkpoint(run_dir, f"checkpoint-{(shrunk // 20 + 1) * 20:08d}", proc)
            cluster.add_node(num_cpus=1)
            wait_for_line(log_path, "(1 workers then, 2 now)", proc)
            assert proc.wait(timeout=900) == 0, log_path.read_text()[-4000:]
    finally:
        cluster.shutdown()

    log = log_path.read_text()
    resumed = [int(line.split("resuming after step ")[1].split()[0])
               for line in log.splitlines() if "(2 workers then, 1 now)" in line]
    assert resumed and resumed[0] >= saved >= 20, "nothing before the preemption's checkpoint is lost"
    got = records(run_dir)
    assert [r["step"] for r in got] == list(range(10, 601, 10))
    jumps = [abs(a["nelbo_bits_per_token"] - b["nelbo_bits_per_token"]) for a, b in zip(got, got[1:])]
    assert max(jumps) < 0.5, jumps
    assert {e["world_size"] for e in read_ledger(str(run_dir))} == {1, 2}
    assert_exactly_once(run_dir, tiny_data, 600)


def test_ledger_check_names_a_missing_step_and_a_sequence_trained_twice(tiny_data):
    """The exactly-once check the tests and benchmarks/multi_gpu.py rely on fails when it should."""
    from md4_dist.data import TokenStream

    manifest = load_manifest(tiny_data)
    steps = [b["ids"].tolist() for _, b in zip(range(3), TokenStream(manifest, "train", 32, seed=0))]
    good = [{"step": s + 1, "attempt": 1, "ids": ids} for s, ids in enumerate(steps)]
    assert ledger_problems(good, manifest, 32, 0, 3) == []
    # a restarted attempt rewrites step 3; its entry wins over the first attempt's
    assert ledger_problems(good + [{"step": 3, "attempt": 2, "ids": steps[2]}], manifest, 32, 0, 3) == []
    assert "missing [2]" in ledger_problems([good[0], good[2]], manifest, 32, 0, 3)[0]
    twice = good[:2] + [{"step": 3, "attempt": 1, "ids": steps[2][:-1] + steps[1][:1]}]
    assert ledger_problems(twice, manifest, 32, 0, 3) == [
        f"step 3: 1 of the stream's sequences missing [{steps[2][-1]}], 1 others or repeats trained "
        f"[{steps[1][0]}]"]
