"""The driver's process as schedulers and shells treat it: a SIGTERM to its whole process group
(`timeout`, `kill -TERM -PGID`, systemd), a SIGKILL. Real Ray (the embedded instance), real
DeepSpeed ZeRO-3 over gloo, 2 CPU workers."""

import contextlib
import os
import signal
import subprocess
import time

import psutil

from test_checkpoint import command, environment, wait_for_checkpoint, wait_for_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def driver_in_own_group(cmd, log_path):
    """The driver as a shell job: the leader of a process group this test is not in. Killed if
    a failed assertion leaves it running (its Ray instance then ends with it)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=environment(),
                                cwd=ROOT, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)


def ray_session(driver: subprocess.Popen) -> int:
    """The session of the driver's embedded Ray instance: its keeper's pid."""
    [keeper] = [p for p in psutil.Process(driver.pid).children()
                if "md4_dist.trainer.embedded_ray" in " ".join(p.cmdline())]
    assert os.getsid(keeper.pid) == keeper.pid != os.getsid(driver.pid)
    return keeper.pid


def live_in_session(sid: int) -> list[str]:
    found = []
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{p.pid} {' '.join(p.info['cmdline'] or [p.info['name']])[:100]}")
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def wait_until_gone(sid: int, timeout=60) -> None:
    deadline = time.monotonic() + timeout
    while (left := live_in_session(sid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the embedded Ray instance outlive the driver: {left}"


def test_sigterm_to_the_drivers_process_group_checkpoints_and_stops(tmp_path, tiny_data):
    """`kill -TERM -PGID`, as `timeout` and schedulers send it: the embedded Ray instance lives
    on (its own session), every worker saves after its step, the driver exits 143, and then no
    process of that instance is left."""
    run_dir, log_path = tmp_path / "run", tmp_path / "run.log"
    with driver_in_own_group(command(run_dir, tiny_data), log_path) as proc:
        wait_for_checkpoint(run_dir, "checkpoint-00000020", proc)
        wait_for_line(log_path, "step 25/60", proc)
        sid = ray_session(proc)
        workers = [line for line in live_in_session(sid) if "RayTrainWorker" in line]
        assert len(workers) >= 2, live_in_session(sid)  # the train loop runs out of the group
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=300) == 128 + signal.SIGTERM, log_path.read_text()[-4000:]
    out = log_path.read_text()
    assert out.count("SIGTERM: every worker saves a checkpoint") == 1, "one request, not two"
    stopped = int(out.split("stopped after step ")[1].split()[0])
    assert 25 <= stopped < 60
    assert f"checkpoint after step {stopped} (a SIGTERM to the driver): " in out
    assert list((run_dir / "checkpoints").glob(f"checkpoint-{stopped:08d}-*")), out[-3000:]
    assert "Failed to connect to GCS" not in out
    wait_until_gone(sid)


def test_sigkill_of_the_driver_leaves_no_process_of_its_ray_instance(tmp_path, tiny_data):
    """Ray's DashboardAgent and RuntimeEnvAgent outlived a killed driver: now the instance's
    keeper ends every process of its session once the driver is gone."""
    log_path = tmp_path / "run.log"
    with driver_in_own_group(command(tmp_path / "run", tiny_data), log_path) as proc:
        wait_for_line(log_path, "step 5/60", proc)
        sid = ray_session(proc)
        running = "\n".join(live_in_session(sid))
        for name in ("RayTrainWorker", "DashboardAgent", "RuntimeEnvAgent", "raylet", "gcs_server"):
            assert name in running, running
        proc.kill()
        proc.wait(timeout=60)
    wait_until_gone(sid)
