"""A worker's check of its node's packages against scripts/constraints.txt (trainer/pins.py)."""

from importlib import metadata

import pytest

from md4_dist.trainer import pins


def test_this_machine_holds_the_pinned_stack():
    """The CPU set-up installs from the constraints file; its torch is 2.13.0+cpu, pinned 2.13.0."""
    required, optional = pins.used_packages()
    assert {"torch", "deepspeed", "ray", "webdataset"} <= set(required)
    assert not {"pytest", "moto"} & set(required + optional), "the test extra is not checked"
    pins.check("this machine")  # raises on any difference


def test_a_wrong_pin_names_the_node_the_package_and_both_versions(tmp_path):
    real = pins.read_pins(pins.CONSTRAINTS)
    torch_now, ray_now = metadata.version("torch"), metadata.version("ray")
    lines = [f"{name}=={version}" for name, version in real.items()
             if name not in ("torch", "ray")]
    path = tmp_path / "constraints.txt"
    path.write_text("# pins\n" + "\n".join(lines + ["torch==2.4.1+cu121", "Ray==2.9.0  # old"]) + "\n")
    with pytest.raises(pins.PinMismatch) as e:
        pins.check("gpu-7 (10.0.0.7)", path)
    message = str(e.value)
    assert message.startswith(f"node gpu-7 (10.0.0.7) does not hold the pinned stack of {path}: ")
    assert f"torch: {torch_now} installed, 2.4.1+cu121 pinned" in message
    assert f"ray: {ray_now} installed, 2.9.0 pinned" in message
    assert "deepspeed" not in message.split(": ", 1)[1].split(". Set")[0], "only the wrong ones"
    assert "cluster.check_pins=false" in message


def test_local_labels_missing_packages_and_bad_lines():
    torch_now = metadata.version("torch").split("+")[0]
    pinned = {"torch": torch_now, "no-such-package": "1.0", "no-such-extra": "1.0"}
    for label in ("", "+cpu", "+cu128"):  # the CPU and the CUDA builds of one pin
        assert pins.mismatches({**pinned, "torch": torch_now + label}, ["torch"], []) == []
    assert pins.mismatches(pinned, ["torch", "no-such-package"], ["no-such-extra"]) == [
        "no-such-package: not installed, 1.0 pinned"]  # an optional extra may be absent
    assert pins.canonical("typing_extensions") == "typing-extensions" and pins.canonical("Jinja2") == "jinja2"


def test_a_line_without_a_pin_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "constraints.txt"
    path.write_text("torch==2.13.0\nnumpy>=1.26\n")
    with pytest.raises(pins.PinMismatch, match=rf"{path}: 'numpy>=1.26' is not pinned as name==version"):
        pins.read_pins(path)
