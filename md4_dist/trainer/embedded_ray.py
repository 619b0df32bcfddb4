"""The embedded Ray instance, kept out of the driver's process group and gone when the driver is.

`ray.init(address="local")` starts GCS, the raylet, the dashboard and the monitors as children of
the driver, in its process group. A SIGTERM to that group (`timeout`, `kill -TERM -PGID`,
systemd's stop, a scheduler signalling every process of a job) then kills them at the moment the
driver asks its workers for a checkpoint, and the driver hangs on a GCS that is gone. And after a
SIGKILL of the driver, Ray's DashboardAgent and RuntimeEnvAgent (children of the raylet) live on.

So the driver starts a keeper, `python -m md4_dist.trainer.embedded_ray`, in a session of its own:
the keeper calls `ray.init(address="local")`, prints the instance's address, and the driver
attaches to it. Every process of the instance (GCS, raylet, agents, the workers that run the
train loop) descends from the keeper and stays in its session, out of reach of signals sent to
the driver's group. The keeper ends the instance when its stdin closes, that is when the driver
exits, however it exits (the kernel closes the pipe on a SIGKILL too): `ray.shutdown()`, then a
SIGKILL to whatever of its session is left (the agents). The GCS and the raylet also die with
the keeper itself (Ray's own parent-death signal).

    python -m md4_dist.trainer.embedded_ray   # the keeper: started by `start`, not by hand
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys

START_TIMEOUT_S = 180  # Ray starts in ~10 s; a loaded 2-core machine can take several times that
STOP_TIMEOUT_S = 30  # for the keeper to shut the instance down when the driver exits normally


class EmbeddedRay:
    """The keeper process, as the driver holds it: `address` to attach to, `close()` to end it."""

    def __init__(self, keeper: subprocess.Popen, address: str):
        self.keeper, self.address = keeper, address

    def close(self) -> None:
        """End the instance and wait (bounded) for the keeper to have done so."""
        self.keeper.stdin.close()
        try:
            self.keeper.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"the embedded Ray instance's keeper (pid {self.keeper.pid}) did not stop within "
                  f"{STOP_TIMEOUT_S} s: killing its session", file=sys.stderr, flush=True)
            _kill_session(self.keeper.pid)


def start(timeout_s: float = START_TIMEOUT_S) -> EmbeddedRay:
    """Start the keeper in a new session and wait for the instance's address. The environment
    (RAY_* settings included) is this process's, as with `ray.init(address="local")` here."""
    keeper = subprocess.Popen([sys.executable, "-m", "md4_dist.trainer.embedded_ray"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    ready, _, _ = select.select([keeper.stdout], [], [], timeout_s)
    line = keeper.stdout.readline() if ready else b""
    keeper.stdout.close()
    if not line:
        why = f"exited with status {keeper.poll()}" if keeper.poll() is not None else \
            f"gave no address within {timeout_s:.0f} s"
        keeper.stdin.close()  # it ends the instance, should it come up after all
        raise RuntimeError(f"the embedded Ray instance did not start: its keeper (pid {keeper.pid}) "
                           f"{why}; Ray's own messages are above")
    return EmbeddedRay(keeper, json.loads(line)["address"])


def _session_processes(sid: int, exclude: int | None = None) -> list:
    """The live processes of session `sid` (zombies are already dead)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != exclude and os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (ProcessLookupError, psutil.Error):
            pass  # gone while we looked
    return found


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` but this one (Ray's agents ignore SIGTERM once
    their raylet is gone)."""
    import psutil

    left = _session_processes(sid, exclude=os.getpid())
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass  # gone already
    psutil.wait_procs(left, timeout=10)


def _keep() -> None:
    """The keeper: start the instance, report its address, end it when stdin closes."""
    import ray

    report = os.dup(1)
    os.dup2(2, 1)  # anything printed from here on goes to stderr; stdout carries the address only
    try:
        ctx = ray.init(address="local", log_to_driver=False)
        os.write(report, (json.dumps({"address": ctx.address_info["gcs_address"]}) + "\n").encode())
        os.close(report)
        while sys.stdin.buffer.read(65536):  # until the driver is gone (EOF)
            pass
    finally:
        ray.shutdown()
        _kill_session(os.getsid(0))


if __name__ == "__main__":
    _keep()
