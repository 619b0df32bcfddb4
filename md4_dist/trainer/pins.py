"""The job's side of the one pinned stack: each Ray Train worker checks, as it starts, that the
packages md4_dist uses are installed at their versions in scripts/constraints.txt, the file every
node's set-up installs from (launcher/node_setup.sh) and which travels in the job's working_dir.
A node set up from other versions then fails the run, naming itself, instead of joining an
elastic run unnoticed. `cluster.check_pins = false` turns the check off (development).

    check("gpu-node-7 (10.0.0.7)")   # raises PinMismatch naming the node, packages and versions

The packages: md4_dist's dependencies as installed (its metadata, from pyproject.toml), and the
optional extras' ones where installed (gcsfs, wandb, ...); not the `test` extra. A version's local
label (torch's +cpu, +cu128) is not compared: the CPU and CUDA builds of a pin are the same pin.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

# the checkout md4_dist runs from: the job's working_dir on a cluster
CONSTRAINTS = Path(__file__).resolve().parents[2] / "scripts" / "constraints.txt"


class PinMismatch(RuntimeError):
    """A package's installed version differs from its pin; the message names node and versions."""


def canonical(name: str) -> str:
    """A distribution's name as PEP 503 compares them (Jinja2 = jinja2, typing_extensions = typing-extensions)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """{canonical name: version} of a constraints file's `name==version` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise PinMismatch(f"{path}: {line!r} is not pinned as name==version")
            pins[canonical(name.strip())] = version.strip()
    return pins


def used_packages() -> tuple[list[str], list[str]]:
    """(required, optional): md4_dist's dependencies, and its extras' (the test extra aside)."""
    required, optional = [], []
    for req in metadata.requires("md4_dist") or []:
        name = canonical(re.match(r"[A-Za-z0-9._-]+", req)[0])
        extra = re.search(r"extra\s*==\s*[\"']([^\"']+)", req)
        if extra is None:
            required.append(name)
        elif extra[1] != "test":
            optional.append(name)
    return required, optional


def mismatches(pins: dict[str, str], required: list[str], optional: list[str]) -> list[str]:
    """One line per package whose installed version is not its pin (or that is not installed)."""
    wrong = []
    for name in dict.fromkeys(required + optional):
        pinned = pins.get(name)
        if pinned is None:
            continue  # not pinned (tests/test_launcher.py keeps every dependency pinned)
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name in required:
                wrong.append(f"{name}: not installed, {pinned} pinned")
            continue
        if installed.split("+", 1)[0] != pinned.split("+", 1)[0]:
            wrong.append(f"{name}: {installed} installed, {pinned} pinned")
    return wrong


def check(node: str, constraints: Path = CONSTRAINTS) -> None:
    """Raise PinMismatch unless every package md4_dist uses is installed at its pin."""
    if not constraints.is_file():
        print(f"note: {constraints} is absent (md4_dist is not run from its checkout): the "
              "packages' versions are not checked", flush=True)
        return
    try:
        required, optional = used_packages()
    except metadata.PackageNotFoundError:
        raise PinMismatch(f"node {node}: md4_dist is not installed (pip install -c {constraints} -e "
                          ". or launcher/node_setup.sh), so the packages it needs are unknown; "
                          "cluster.check_pins=false runs without the check") from None
    wrong = mismatches(read_pins(constraints), required, optional)
    if wrong:
        raise PinMismatch(
            f"node {node} does not hold the pinned stack of {constraints}: {'; '.join(wrong)}. "
            "Set the node up again (launcher/node_setup.sh: pip install -c scripts/constraints.txt), "
            "or set cluster.check_pins=false to run on it anyway (development only)")
