"""PartitionedEMA under real DeepSpeed ZeRO-3: 2 CPU ranks over gloo, started by torchrun."""

import os
import subprocess
import sys

from conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_partitioned_ema_matches_the_whole_average_and_swaps_exactly():
    """Also: the ranks' shares, joined as md4_dist.inference.consolidate joins a checkpoint's, give
    the whole average (the padding of odd-sized parameters cut)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".build", "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           os.path.join(ROOT, "tests", "zero3_ema_worker.py")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    # each rank averaged only its half of every parameter, each half rounded up (odd sizes)
    assert "rank 0: ok, EMA holds 1659 of 3314 values" in out
    assert "rank 1: ok, EMA holds 1659 of 3314 values" in out
