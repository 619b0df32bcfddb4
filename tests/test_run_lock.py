"""One run at a time in a run directory (trainer/run_lock.py): on local disk and on S3 (a moto
server on 127.0.0.1), through the real command. The lock is held from the test itself, so the
refused command never needs to train."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from md4_dist.trainer import run_lock
from md4_dist.trainer.run_lock import RunLocked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(*sets):
    cmd = [sys.executable, "-m", "md4_dist.train", os.path.join(ROOT, "configs", "tiny.json")]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def holder_named(text: str) -> bool:
    return f"host {socket.gethostname()} pid {os.getpid()}, since " in text


def race(run_dir, contenders=6) -> list:
    """`contenders` threads take the lock at the same moment; the locks they got."""
    won, start = [], threading.Barrier(contenders)

    def contend():
        start.wait()
        try:
            won.append(run_lock.take(run_dir))
        except RunLocked:
            pass

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return won


def lapse(run_dir) -> run_lock.RunLock:
    """A holder that died: it took the lock with a short lease and never renewed it."""
    dead = run_lock.take(run_dir, lease_s=0.2)
    time.sleep(0.5)
    return dead


def test_a_held_run_directory_is_refused_naming_the_holder(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    with run_lock.take(str(run_dir)):
        r = train(f"train.run_dir={run_dir}", f"data.manifest={tiny_data}")
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        assert f"{run_dir} is in use by another run: " in r.stderr and holder_named(r.stderr), r.stderr
        assert "ray" not in (r.stdout + r.stderr).lower().split("error:")[0]  # nothing was launched
        assert not (run_dir / "config.json").exists()
        with pytest.raises(RunLocked, match="is in use by another run"):
            run_lock.take(str(run_dir))
    assert (run_dir / "run.lock").read_bytes() == b"", "released on leaving"

    assert len(race(str(tmp_path / "raced"))) == 1


def test_a_lapsed_lease_is_taken_over_and_released_at_exit(tmp_path, tiny_data):
    """The command takes over the lock of a run that died, and releases it also when it stops
    at a pre-flight error; the dead holder, were it to come back, finds it lost."""
    run_dir = tmp_path / "run"
    dead = lapse(str(run_dir))
    r = train(f"train.run_dir={run_dir}", f"data.manifest={tiny_data}", "model.vocab_size=65")
    assert r.returncode == 2 and "model.vocab_size = 65" in r.stderr, r.stderr[-2000:]
    assert f"taking over {run_dir}/run.lock: the lease of the run that held it has lapsed" in r.stdout
    assert holder_named(r.stdout)
    assert (run_dir / "run.lock").read_bytes() == b""
    assert not dead.renew() and dead.lost == "released by another process"


def test_lock_on_s3_is_exclusive_and_lapses(s3_bucket):
    import fsspec

    run_dir = f"{s3_bucket}/runs/held"
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL_S3"]})
    with run_lock.take(run_dir) as held:
        record = json.loads(fs.cat(f"{run_dir}/run.lock"))
        assert record["pid"] == os.getpid() and record["token"] == held.token
        r = train(f"train.run_dir={run_dir}")
        assert r.returncode == 2 and f"{run_dir} is in use by another run: " in r.stderr, r.stderr[-2000:]
        assert holder_named(r.stderr)
        assert held.renew()
    assert fs.cat(f"{run_dir}/run.lock") == b""

    won = race(f"{s3_bucket}/runs/raced")
    assert len(won) == 1, "conditional writes: exactly one of the contenders"

    dead = lapse(f"{s3_bucket}/runs/lapsed")
    with run_lock.take(f"{s3_bucket}/runs/lapsed") as taken:
        assert not dead.renew() and dead.lost.startswith(f"now held by host {socket.gethostname()}")
        assert taken.renew()
