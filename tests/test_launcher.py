"""The launcher as a user runs it: `python -m launcher.submit` against a real `ray start --head`
cluster with token auth, bad inputs refused before anything is uploaded, and the cluster YAMLs
checked with Ray's own schema validator and for a dashboard that stays on localhost.

    TORCH_EXTENSIONS_DIR=$PWD/.build/torch_extensions .venv/bin/python -m pytest -q tests/test_launcher.py
"""

import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAMLS = sorted(glob.glob(os.path.join(ROOT, "launcher", "*.yaml")))


def submit(*args, env=(), timeout=900):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | dict(env)
    return subprocess.run([sys.executable, "-m", "launcher.submit", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def test_submit_follow_runs_the_job_to_success(ray_cluster, tmp_path, tiny_data):
    address, auth = ray_cluster
    run_dir = tmp_path / "run"
    ext = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".build", "torch_extensions"))
    args = ["configs/tiny.json", "--address", address, "--follow", "--python", sys.executable,
            "--env", f"TORCH_EXTENSIONS_DIR={ext}", "--set", f"train.run_dir={run_dir}",
            "--set", f"data.manifest={tiny_data}", "--set", "train.steps=10", "--set", "logging.every=5"]

    wrong = submit(*args, env={"RAY_AUTH_TOKEN": "0" * 32})
    assert wrong.returncode == 2 and "refused the token" in wrong.stderr, wrong.stderr[-2000:]
    # The token alone is enough: the launcher asks the cluster whether it wants one.
    r = submit(*args, env={"RAY_AUTH_TOKEN": auth["RAY_AUTH_TOKEN"]})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    job_id = re.search(r"submitted job (\S+):", r.stdout).group(1)
    assert "step 10/10" in r.stdout
    assert f"job {job_id} SUCCEEDED" in r.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [5, 10]

    # Without --follow: the job id and how to follow it (a job that ends at once: `true -m ...`).
    quick = submit("configs/tiny.json", "--address", address, "--python", "true",
                   "--set", f"train.run_dir={tmp_path / 'quick'}", "--set", f"data.manifest={tiny_data}",
                   env={"RAY_AUTH_TOKEN": auth["RAY_AUTH_TOKEN"]}, timeout=300)
    assert quick.returncode == 0, quick.stderr[-2000:]
    assert re.search(r"follow it with: RAY_AUTH_MODE=token ray job logs --follow raysubmit_\S+ "
                     rf"--address {address}", quick.stdout), quick.stdout

    # `ray job stop` sends the entrypoint SIGTERM: the run saves a checkpoint after its step, stops.
    long_dir = tmp_path / "long"
    r = submit("configs/tiny.json", "--address", address, "--python", sys.executable,
               "--env", f"TORCH_EXTENSIONS_DIR={ext}", "--set", f"train.run_dir={long_dir}",
               "--set", f"data.manifest={tiny_data}", "--set", "train.steps=100000",
               "--set", "logging.every=5", env={"RAY_AUTH_TOKEN": auth["RAY_AUTH_TOKEN"]})
    assert r.returncode == 0, r.stderr[-2000:]
    job_id = re.search(r"submitted job (\S+):", r.stdout).group(1)
    deadline = time.monotonic() + 600
    while not (long_dir / "metrics.jsonl").exists() or not (long_dir / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline, "the job wrote no metrics in 600 s"
        time.sleep(1)
    ray_job = [os.path.join(os.path.dirname(sys.executable), "ray"), "job"]
    env = dict(os.environ, **auth)
    subprocess.run([*ray_job, "stop", job_id, "--address", address], check=True, timeout=700, env=env)
    logs = subprocess.run([*ray_job, "logs", job_id, "--address", address], capture_output=True,
                          text=True, check=True, timeout=60, env=env).stdout
    step = int(logs.split("stopped after step ")[1].split()[0])
    assert f"checkpoint after step {step} (a SIGTERM to the driver): " in logs
    assert list((long_dir / "checkpoints").glob(f"checkpoint-{step:08d}-*")), logs[-3000:]


@pytest.mark.parametrize("args,message", [
    (["--set", "model.widht=3"], "unknown config key 'model.widht'"),
    (["--set", "train.run_dir=runs/mine"], "config key 'train.run_dir' is the relative path 'runs/mine'"),
    (["--set", "data.manifest=data/tiny-markov"], "config key 'data.manifest' is the relative path"),
    (["--env", "NO_EQUALS_SIGN"], "--env 'NO_EQUALS_SIGN' is not KEY=VALUE"),
    ([], "no Ray job API at http://127.0.0.1:{port}"),  # nothing listens there
])
def test_bad_input_fails_fast_naming_the_culprit(tmp_path, args, message):
    port = free_port()
    t = time.monotonic()
    r = submit("configs/tiny.json", "--address", f"http://127.0.0.1:{port}",
               "--set", f"train.run_dir={tmp_path / 'run'}", "--set", f"data.manifest={tmp_path}",
               *args, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr[-2000:]
    assert message.format(port=port) in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - t < 60


def test_config_outside_the_project_is_refused(tmp_path):
    outside = tmp_path / "tiny.json"
    outside.write_text(open(os.path.join(ROOT, "configs", "tiny.json")).read())
    r = submit(str(outside), "--address", f"http://127.0.0.1:{free_port()}", timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(f"error: config {outside} does not travel"), r.stderr


def test_working_dir_leaves_the_bulk_behind_and_takes_the_package(tmp_path, monkeypatch):
    from launcher import working_dir

    monkeypatch.setattr(working_dir, "ROOT", tmp_path)
    sizes = {"md4_dist/data/reader.py": 1, "data/shard-0.tar": working_dir.LARGE + 1,
             ".venv/lib/torch.so": working_dir.LARGE + 1, "checkpoints/model.pt": working_dir.LARGE + 1}
    for rel, size in sizes.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(tmp_path / rel, "wb") as f:
            f.truncate(size)  # sparse: no disk used
    assert working_dir.large_files() == ["/checkpoints/model.pt"]
    assert not working_dir.excluded(Path("md4_dist/data/reader.py"))
    assert working_dir.excluded(Path("data/shard-0.tar"))
    assert working_dir.excluded(Path("md4_dist/__pycache__/model.cpython-311.pyc"))


def prepared(path):
    """The config `ray up` acts on: ours merged with the provider's defaults (commands left
    out of a YAML come from those defaults, and Ray's AWS and GCP ones open the dashboard)."""
    from ray.autoscaler._private.util import prepare_config

    with open(path) as f:
        return prepare_config(yaml.safe_load(f))


@pytest.mark.parametrize("path", YAMLS, ids=os.path.basename)
def test_cluster_yaml_passes_rays_schema(path):
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared(path))


def strings(node):
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def open_ports(node):
    """Inbound rules anywhere in the tree: AWS IpPermissions and GCP firewall `allowed` entries."""
    if isinstance(node, list):
        return [p for v in node for p in open_ports(v)]
    if not isinstance(node, dict):
        return []
    own = [(node.get("FromPort"), node.get("ToPort"))] if {"FromPort", "ToPort"} & set(node) else []
    own += [port for rule in node.get("allowed", []) for port in rule.get("ports", ["all"])]
    return own + [p for v in node.values() for p in open_ports(v)]


@pytest.mark.parametrize("path", YAMLS, ids=os.path.basename)
def test_cluster_yaml_keeps_the_dashboard_on_localhost(path):
    config = prepared(path)
    starts = [s for s in strings(config) if re.search(r"\bray start\b", s)]
    heads = [s for s in starts if "--head" in s.split()]
    assert heads and all("--dashboard-host=127.0.0.1" in s.split() for s in heads), heads
    assert not [s for s in strings(config) if "0.0.0.0" in s]
    assert all("RAY_AUTH_MODE=token" in s for s in starts), starts  # the job API wants the token
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert set(open_ports(config)) <= {(22, 22), "22"}, open_ports(config)


def test_aws_security_group_opens_only_ssh_to_the_internet():
    """The rules Ray's AWS bootstrap will write into the group: its defaults plus ours."""
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    config = prepared(os.path.join(ROOT, "launcher", "aws.yaml"))
    # A group named by id would keep rules we cannot see; Ray makes its own from the YAML's.
    assert not any("SecurityGroupIds" in t["node_config"] for t in config["available_node_types"].values())
    ours = config["provider"]["security_group"]["IpPermissions"]
    rules = _create_default_inbound_rules(["sg-md4"], ours)
    public = [r for r in rules if r.get("IpRanges") or r.get("Ipv6Ranges") or r.get("PrefixListIds")]
    assert public and all((r["FromPort"], r["ToPort"]) == (22, 22) for r in public), public


def pinned(path):
    """{normalised name: version} of a pins file; every entry must be `name==version`."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert m, f"{path}: {line!r} is not pinned as name==version"
        name = re.sub(r"[-_.]+", "-", m[1]).lower()
        assert name not in pins, f"{path}: {m[1]} pinned twice"
        pins[name] = m[2]
    return pins


def test_every_node_installs_the_one_pinned_set():
    """The CPU set-up, every YAML's node set-up and its head-only packages install with `-c`
    scripts/constraints.txt, whose every entry is pinned and which pins every dependency."""
    pins = pinned(os.path.join(ROOT, "scripts", "constraints.txt"))
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        import tomllib
        deps = tomllib.load(f)["project"]["dependencies"]
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", dep)[0]).lower()
        assert name in pins, f"pyproject dependency {dep!r} is not in scripts/constraints.txt"
    for path in YAMLS:
        config = prepared(path)
        assert "bash ~/md4-dist/launcher/node_setup.sh" in config["setup_commands"], path
        commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                  "worker_setup_commands") for c in config.get(key, [])]
        for c in commands:
            if "pip install" in c:
                assert "-c ~/md4-dist/scripts/constraints.txt" in c, f"{path}: {c!r}"
    for script, flag in (("launcher/node_setup.sh", '-c "$pins"'), ("scripts/setup.sh", "-c scripts/constraints.txt")):
        text = Path(ROOT, script).read_text()
        installs = [ln for ln in text.splitlines() if "pip install" in ln and not ln.lstrip().startswith("#")]
        assert installs and all(flag in ln for ln in installs), (script, installs)
    node = Path(ROOT, "launcher", "node_setup.sh").read_text()
    assert "pins=scripts/constraints.txt" in node and "bash scripts/setup.sh" in node


def test_console_scripts_are_the_commands():
    """Each `md4-*` command is installed and calls the `main` of its `python -m` form."""
    from importlib.metadata import entry_points

    scripts = {e.name: e for e in entry_points(group="console_scripts") if e.name.startswith("md4-")}
    assert set(scripts) == {"md4-train", "md4-evaluate", "md4-sample", "md4-export", "md4-shard",
                            "md4-tokenizer", "md4-synthetic", "md4-submit"}
    for e in scripts.values():
        assert e.load().__name__ == "main", e
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "md4-synthetic"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--vocab-size" in r.stdout, r.stderr
