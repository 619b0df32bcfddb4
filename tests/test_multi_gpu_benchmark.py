"""benchmarks/multi_gpu.py on CPU workers: the script that a multi-GPU machine runs, checked here
so that it works when one is lent. Real Ray (embedded), real DeepSpeed ZeRO-3 over gloo."""

import glob
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scaling_runs_the_trainer_at_each_worker_count_and_reads_its_records(tmp_path):
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".build", "torch_extensions"))
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "multi_gpu.py"), "scaling", "--device", "cpu",
           "--workers", "1", "2", "--steps", "20", "--log-every", "5", "--skip", "2",
           "--results", str(tmp_path)]
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "md4-multi-gpu-*")))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = sorted((json.loads(p.read_text()) for p in tmp_path.glob("scaling-tiny-*.json")),
                  key=lambda row: row["workers"])
    assert [(row["workers"], row["global_batch"], row["records"]) for row in rows] == [(1, 16, 2), (2, 32, 2)]
    for row in rows:
        per = row["tokens_per_s_per_worker"]
        assert row["device"].startswith("CPU") and row["mfu"] is None
        assert 0 < per["min"] <= per["median"] <= per["max"] and per["n"] == 2
    assert rows[0]["scaling_efficiency"] == 1.0 and 0 < rows[1]["scaling_efficiency"]
    assert "2 workers" in r.stdout and "efficiency" in r.stdout
    after = set(glob.glob(os.path.join(tempfile.gettempdir(), "md4-multi-gpu-*")))
    assert after <= before and "kept" not in r.stderr, "the work directory is removed after a clean finish"
