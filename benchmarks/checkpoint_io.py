"""Checkpoint costs on this machine (a benchmark, not a test).

    .venv/bin/python benchmarks/checkpoint_io.py [--dim 768 --layers 8] [--repeats 3] [--skip-resize]

Everything runs the real command, `python -m md4_dist.train` (embedded Ray, 2 CPU workers,
DeepSpeed ZeRO-3 over gloo), and reads the figures it prints:
1. Save: a run checkpointing every 2 steps; per checkpoint the bytes, the seconds writing the
   ranks' files (DeepSpeed's ZeRO shards, EMA shares) and committing them (Ray moving them into
   the run directory and registering them). Against it: a plain copy of the same checkpoint
   directory on the same disk (`shutil.copytree`), and the copy with an fsync of every file.
2. Load: the same command again, resuming the finished run: the check (every file read once,
   spread over the ranks) and DeepSpeed's load.
3. Universal conversion: the same again on 1 worker, so the 2-worker ZeRO-3 checkpoint goes
   through `ds_to_universal` before loading.
4. Time lost per resize: the tiny model, `cluster.num_workers: [1, 2]` on a
   `ray.cluster_utils.Cluster` of two 1-CPU nodes: a node removed, then added back. Lost time is
   from the last step the old group logged until the new group logs that step again.
Each figure: median over --repeats, with min and max.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.json")
GIB = 2**30


def spread(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fmt(s, unit=""):
    return f"{s['median']:.2f}{unit} (min {s['min']:.2f}, max {s['max']:.2f}, n={s['n']})"


def environment():
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".build", "torch_extensions"))
    env.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    return env


def train(*sets, env=None) -> str:
    cmd = [sys.executable, "-m", "md4_dist.train", TINY]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env or environment(), cwd=ROOT)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out[-4000:]}")
    return out


def copy_seconds(src: str, dst: str, fsync: bool) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    began = time.perf_counter()
    shutil.copytree(src, dst)
    if fsync:
        for root, _, names in os.walk(dst):
            for n in names:
                fd = os.open(os.path.join(root, n), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
    took = time.perf_counter() - began
    shutil.rmtree(dst)
    return took


def io(args, work: str, data: str) -> dict:
    run_dir = os.path.join(work, "io")
    model = [f"model.dim={args.dim}", f"model.n_layers={args.layers}", f"model.n_heads={args.dim // 64}",
             f"data.manifest={data}", f"train.run_dir={run_dir}", "train.micro_batch=1",
             "train.global_batch=2", f"train.steps={2 * args.repeats}", "checkpoint.every=2",
             f"checkpoint.keep={args.repeats}", "eval.every=0", "logging.every=1"]
    out = train(*model)
    saves = [tuple(map(float, m)) for m in re.findall(
        r"checkpoint after step \d+: ([\d.]+) GiB, written in ([\d.]+) s, committed in ([\d.]+) s", out)]
    assert len(saves) == args.repeats, out[-3000:]
    gib = saves[-1][0]
    names = os.listdir(os.path.join(run_dir, "checkpoints"))
    latest = max(d for d in names if d.startswith("checkpoint-"))
    src = os.path.join(run_dir, "checkpoints", latest)
    copies = [copy_seconds(src, os.path.join(work, "copy"), False) for _ in range(args.repeats)]
    synced = [copy_seconds(src, os.path.join(work, "copy"), True) for _ in range(args.repeats)]

    loads, checks, conversions = [], [], []
    for _ in range(args.repeats):
        out = train(*model)
        m = re.search(r"\(2 workers then, 2 now\): checked in ([\d.]+) s, loaded in ([\d.]+) s", out)
        checks.append(float(m.group(1)))
        loads.append(float(m.group(2)))
    for _ in range(args.repeats):
        out = train(*model, "cluster.num_workers=1")
        m = re.search(r"converted to a universal checkpoint in ([\d.]+) s", out)
        conversions.append(float(m.group(1)))
    per_gib = lambda xs: spread([x / gib for x in xs])  # noqa: E731 - seconds per GiB
    return {
        "checkpoint_gib": gib,
        "save_write_s_per_gib": per_gib([w for _, w, _ in saves]),
        "save_commit_s_per_gib": per_gib([c for _, _, c in saves]),
        "save_total_s_per_gib": per_gib([w + c for _, w, c in saves]),
        "plain_copy_s_per_gib": per_gib(copies),
        "plain_copy_fsync_s_per_gib": per_gib(synced),
        "load_check_s_per_gib": per_gib(checks),
        "load_s_per_gib": per_gib(loads),
        "universal_conversion_s_per_gib": per_gib(conversions),
    }


def local_cluster(**head):
    """A `ray.cluster_utils.Cluster` whose head holds no CPUs (workers go to the nodes added) and
    which notices a removed node within about 3 s."""
    from ray.cluster_utils import Cluster

    return Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **head, "_system_config": {
        "health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
        "health_check_failure_threshold": 3}})


def resize(args, work: str, data: str) -> dict:
    """One elastic run per repeat: shrink (a node removed), then grow (it comes back)."""
    shrink, grow = [], []
    # The controller runs in the cluster, whose processes read this environment.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(args.start_timeout)
    for i in range(args.repeats):
        cluster = local_cluster()
        try:
            nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
            cluster.wait_for_nodes()
            env = environment() | {"RAY_ADDRESS": cluster.address}
            run_dir = os.path.join(work, f"resize-{i}")
            cmd = [sys.executable, "-m", "md4_dist.train", TINY]
            for s in (f"data.manifest={data}", f"train.run_dir={run_dir}", "train.steps=100000",
                      "checkpoint.every=50", "logging.every=1", "eval.every=0",
                      "cluster.num_workers=[1, 2]", "cluster.resize_check_s=5"):
                cmd += ["--set", s]
            log_path = os.path.join(work, f"resize-{i}.log")
            with open(log_path, "w") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                try:
                    events = Events(log_path, proc)
                    events.until(lambda: events.max_step() >= 120)
                    cluster.remove_node(nodes[1])
                    events.until(lambda: events.regained(1))
                    cluster.add_node(num_cpus=1)
                    events.until(lambda: events.regained(2))
                finally:
                    proc.terminate()
                    proc.wait(timeout=300)
            lost = events.lost_per_restart()
            assert len(lost) == 2, f"expected a shrink and a grow, got {len(lost)} restarts: {log_path}"
            shrink.append(lost[0])
            grow.append(lost[1])
        finally:
            cluster.shutdown()
    return {"resize_lost_s_shrink": spread(shrink), "resize_lost_s_grow": spread(grow),
            "start_timeout_s": args.start_timeout}


STEP = re.compile(r"step (\d+)/\d+")
RESUMED = re.compile(r"resuming after step (\d+) .*\((\d+) workers then, (\d+) now\)")


class Events:
    """The run's log as it grows: (when first read, "step", n) for each step logged and
    (when, "start", workers) for each group that resumed, each line parsed once."""

    def __init__(self, log_path: str, proc):
        self.log_path, self.proc = log_path, proc
        self.file = open(log_path)
        self.partial = ""
        self.seen: list[tuple[float, str, int]] = []

    def until(self, done, timeout=900) -> None:
        deadline = time.monotonic() + timeout
        while True:
            text = self.partial + self.file.read()
            *lines, self.partial = text.split("\n")
            now = time.monotonic()
            for line in lines:
                if m := STEP.search(line):
                    self.seen.append((now, "step", int(m.group(1))))
                elif m := RESUMED.search(line):
                    self.seen.append((now, "start", int(m.group(3))))
            if lines and done():
                return
            if self.proc.poll() is not None or now > deadline:
                raise SystemExit(f"the elastic run ended or stalled; see {self.log_path}")
            time.sleep(0.05)

    def max_step(self, events=None) -> int:
        events = self.seen if events is None else events
        return max((n for _, kind, n in events if kind == "step"), default=0)

    def regained(self, workers: int) -> bool:
        """Whether a group of `workers` has started and got back to the step the one before reached."""
        starts = [i for i, (_, kind, n) in enumerate(self.seen) if kind == "start" and n == workers]
        if not starts:
            return False
        return self.max_step(self.seen[starts[-1]:]) >= self.max_step(self.seen[:starts[-1]])

    def lost_per_restart(self) -> list[float]:
        """For each restart: from the old group's last logged step to the new group logging it."""
        lost = []
        for i, (_, kind, _) in enumerate(self.seen):
            if kind != "start":
                continue
            s_old = self.max_step(self.seen[:i])
            t_old = min(t for t, k, n in self.seen[:i] if k == "step" and n == s_old)
            t_new = min(t for t, k, n in self.seen[i:] if k == "step" and n == s_old)
            lost.append(t_new - t_old)
        return lost


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--start-timeout", type=int, default=60,
                    help="RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for the elastic runs")
    ap.add_argument("--skip-resize", action="store_true")
    ap.add_argument("--skip-io", action="store_true")
    args = ap.parse_args(argv)

    sys.path.insert(0, ROOT)
    from data_tools import synthetic

    results = {"machine": f"{os.cpu_count()} cores", "dim": args.dim, "layers": args.layers}
    with tempfile.TemporaryDirectory(prefix="md4-ckpt-bench-", dir=ROOT) as work:
        data = os.path.join(work, "data")
        synthetic.main(["--out", data, "--vocab-size", "64", "--seq-len", "64",
                        "--num-sequences", "4000", "--seed", "0", "--val-fraction", "0.05"])
        if not args.skip_io:
            results.update(io(args, work, data))
        if not args.skip_resize:
            results.update(resize(args, work, data))
    for key, value in results.items():
        print(f"{key}: {fmt(value) if isinstance(value, dict) else value}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
