"""Submit a training run to a Ray cluster as a Ray job, the project uploaded as its working dir.

    python -m launcher.submit configs/owt_large.json --address http://127.0.0.1:8265 --follow \
        --set train.run_dir=s3://bucket/runs/owt --env WANDB_MODE=offline

The config is validated here first, so a typo fails before anything is uploaded. The job runs
`python -m md4_dist.train CONFIG --set ...` in a copy of this project on the cluster; with
--follow its logs stream here and the exit status is the job's (0 only if it SUCCEEDED).
Token auth (Ray 2.60): the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token (see
launcher/README.md).
"""

import argparse
import asyncio
import os
import shlex
import sys

import requests

from launcher.working_dir import EXCLUDES, LARGE, ROOT, config_in_project, large_files
from md4_dist.config import ConfigError, load_config

CONNECT_TIMEOUT_S = 15
STOP_WAIT_S = 600  # for `ray job stop`: the checkpoint before the SIGKILL


def check_cluster_paths(cfg) -> None:
    # The job runs in a temporary copy of the project: a relative path would land there, and be lost.
    for key, url in (("train.run_dir", cfg.train.run_dir), ("data.manifest", cfg.data.manifest)):
        if "://" not in url and not os.path.isabs(url):
            raise ConfigError(f"config key '{key}' is the relative path {url!r}, which would land in "
                              "the job's temporary copy of the project: use an absolute path that "
                              "exists on every node, or an s3:// / gs:// URL")


def auth_mode(address: str) -> str:
    """The cluster's auth mode ("token" or "disabled"), asked with a bounded wait: Ray's own
    client sets no timeouts. The endpoint is public, so this works before any token is sent."""
    try:
        r = requests.get(f"{address}/api/authentication_mode", timeout=CONNECT_TIMEOUT_S)
    except requests.RequestException as e:
        raise ConnectionError(f"no Ray job API at {address} within {CONNECT_TIMEOUT_S} s "
                              f"({type(e).__name__}): is the cluster up, and `ray dashboard "
                              "CLUSTER.yaml` forwarding it?") from None
    if r.status_code != 200 or "authentication_mode" not in r.text:
        raise ConnectionError(f"{address} answers (HTTP {r.status_code}), but not as a Ray dashboard")
    return r.json()["authentication_mode"]


async def follow(client, job_id: str, poll_s: float = 60) -> None:
    logs = client.tail_job_logs(job_id).__aiter__()
    while True:
        chunk = asyncio.ensure_future(anext(logs))
        # A quiet job is normal, a head gone without closing the socket is not: ask (on a new
        # connection, which the OS connect timeout bounds) and go on waiting while the job runs.
        while not (await asyncio.wait({chunk}, timeout=poll_s))[0]:
            if client.get_job_status(job_id).is_terminal():
                chunk.cancel()
                return
        try:
            print(chunk.result(), end="", flush=True)
        except StopAsyncIteration:
            return


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m launcher.submit", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="JSON config: a file inside this project, or an fsspec URL")
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265",
                    help="the job API: $RAY_ADDRESS, else http://127.0.0.1:8265 (default: %(default)s)")
    ap.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, as md4_dist.train's --set (repeatable)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="an environment variable of the job (repeatable)")
    ap.add_argument("--python", default="python",
                    help="the python on the cluster's nodes (default: %(default)s)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    address = args.address.rstrip("/")
    try:
        config = config_in_project(args.config)
        check_cluster_paths(load_config(args.config, args.set))
        if bad := [s for s in args.env if "=" not in s or s.startswith("=")]:
            raise ConfigError(f"--env {bad[0]!r} is not KEY=VALUE")
        if not address.startswith(("http://", "https://")):
            raise ConfigError(f"--address (or RAY_ADDRESS) {address!r} is not http://HOST:PORT")
        # Ray's client sends its token (RAY_AUTH_TOKEN or ~/.ray/auth_token) only in token mode.
        os.environ.setdefault("RAY_AUTH_MODE", auth_mode(address))
    except (ConfigError, ConnectionError) as e:
        return fail(str(e))
    from ray.exceptions import AuthenticationError  # imported after RAY_AUTH_MODE: Ray reads it once
    from ray.job_submission import JobSubmissionClient

    skipped = large_files()
    for path in skipped:
        print(f"not uploaded (over {LARGE >> 20} MiB): {path[1:]}", file=sys.stderr)
    entrypoint = shlex.join([args.python, "-m", "md4_dist.train", config,
                             *(a for s in args.set for a in ("--set", s))])
    # `ray job stop` sends SIGTERM, then SIGKILL after this many seconds (Ray's default is 3):
    # time for every worker to finish its step and write a checkpoint.
    env_vars = {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S)} | dict(s.split("=", 1) for s in args.env)
    runtime_env = {"working_dir": str(ROOT), "excludes": EXCLUDES + skipped, "env_vars": env_vars}
    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    except AuthenticationError as e:
        return fail(f"{address} refused the token: {e}\n"
                    "(the cluster's token: `ray get-auth-token` on its head)")
    except (ConnectionError, RuntimeError, ValueError) as e:  # ValueError: a working dir too large
        hint = ("\n(the head's job agent is down: another Ray on that host may hold its port, see "
                "ray start --dashboard-agent-listen-port)") if "No available agent" in str(e) else ""
        return fail(f"submitting to {address}: {e}{hint}")
    print(f"submitted job {job_id}: {entrypoint}", flush=True)
    # The `ray job` CLI, unlike this client, sends the token only when told to.
    ray_job = "RAY_AUTH_MODE=token ray job" if os.environ["RAY_AUTH_MODE"] == "token" else "ray job"
    if not args.follow:
        print(f"follow it with: {ray_job} logs --follow {job_id} --address {address}")
        return 0
    try:
        asyncio.run(follow(client, job_id))
    except (KeyboardInterrupt, RuntimeError) as e:  # Ctrl-C, or the log stream broke
        print(f"stopped following ({e!r}); the job goes on: {ray_job} status {job_id} --address "
              f"{address} ({ray_job} stop ... ends it)", file=sys.stderr)
        return 1
    info = client.get_job_info(job_id)
    print(f"job {job_id} {info.status}: {info.message}", file=sys.stderr)
    return 0 if info.status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
