import faulthandler
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

# botocore falls back to the EC2 metadata endpoint when it finds no credentials; tests talk to
# 127.0.0.1 only, so that lookup is turned off for this process and every process it starts.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
os.environ.setdefault("AWS_CONFIG_FILE", os.devnull)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 protocol server (moto) on 127.0.0.1, for the whole session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket; the standard AWS variables point s3fs (and subprocesses) at the server."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    name = f"md4-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def ray_cluster():
    """`ray start --head` on 127.0.0.1 (a real local cluster), stopped afterwards."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's AF_UNIX sockets live here
    # Ray 2.60 guards the job API with a token; the cluster and the client share a fresh one.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}

    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    gcs, dashboard = free_port(), free_port()
    env = dict(os.environ, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="300", **auth)
    start = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
             # its job agent's port too: the default one may be held by another Ray on this host
             f"--dashboard-agent-listen-port={free_port()}",
             "--disable-usage-stats", f"--temp-dir={temp}"]
    r = subprocess.run(start, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        yield f"http://127.0.0.1:{dashboard}", auth
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The tiny config's corpus shape (V = 64, L = 64), made directly."""
    from data_tools import synthetic

    out = str(tmp_path_factory.mktemp("data") / "markov")
    assert synthetic.main(["--out", out, "--vocab-size", "64", "--seq-len", "64",
                           "--num-sequences", "2000", "--val-fraction", "0.05"]) == 0
    return out


# The suite's guard. CI gives the whole job 90 minutes and shows only the tail of its output, so a
# run that goes wrong must end, and say why, in that tail: past the budget no further test starts
# (the summary still prints), a test hung well past it dumps every thread's stack and exits, and
# the summary ends with the first failure and the state of the machine.
BUDGET_S = float(os.environ.get("MD4_TEST_BUDGET_S", 3600))  # the suite takes about 33 min here
_started = time.monotonic()
_first_failure = []


def pytest_sessionstart(session):
    # A copy of stderr: while a test runs, pytest captures fd 2 itself. (pytest's own
    # faulthandler_timeout, if set, would cancel this timer after each test.)
    faulthandler.dump_traceback_later(BUDGET_S + 900, exit=True, file=open(os.dup(2), "w"))


@pytest.fixture(autouse=True)
def _within_the_suites_budget():
    spent = time.monotonic() - _started
    if spent > BUDGET_S:
        pytest.exit(f"the suite has run {spent / 60:.0f} min, past its {BUDGET_S / 60:.0f} min "
                    "(MD4_TEST_BUDGET_S): no further test starts", returncode=1)
    yield


def pytest_runtest_logreport(report):
    if report.failed and not _first_failure:
        _first_failure.append(report)


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: after the short summary, at the tail
def pytest_terminal_summary(terminalreporter):
    yield
    if not _first_failure:
        return
    import psutil

    report, tr = _first_failure[0], terminalreporter
    tr.section("the first failure, and the machine now")
    tr.write_line(f"{report.nodeid} ({report.when}), its last lines:")
    for line in report.longreprtext.splitlines()[-60:]:
        tr.write_line("    " + line)
    gib = 2 ** 30
    tr.write_line(f"memory available {psutil.virtual_memory().available / gib:.1f} GiB; free: "
                  + ", ".join(f"{d} {shutil.disk_usage(d).free / gib:.1f} GiB"
                              for d in ("/tmp", "/dev/shm", os.getcwd()) if os.path.isdir(d)))
    ray = [p.info["name"] for p in psutil.process_iter(["name", "cmdline"])
           if p.info["name"] in ("raylet", "gcs_server") or (p.info["cmdline"] or [""])[0].startswith("ray::")]
    tr.write_line(f"Ray processes still running: {len(ray)} {sorted(set(ray))}")
