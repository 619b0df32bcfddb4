"""Every command's options have a help text that shows their default; train's --print-config
prints the resolved config (secrets redacted) and every key --set accepts, without starting Ray."""

import argparse
import importlib
import json
import subprocess
import sys

import pytest

from md4_dist.config import Config, load_config
from md4_dist.strict_config import parse_override, settable_keys, to_dict

COMMANDS = ["md4_dist.train", "md4_dist.evaluate", "md4_dist.sample", "md4_dist.export", "data_tools.shard", "data_tools.train_tokenizer", "data_tools.synthetic", "launcher.submit"]


def shows_nothing(action: argparse.Action) -> bool:
    """A default with nothing to show: none, an empty list (a repeatable option), a flag's False."""
    return action.default in (None, [], argparse.SUPPRESS) or action.nargs == 0


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_showing_its_default(command):
    ap = importlib.import_module(command).build_parser()
    text = "".join(ap.format_help().split())  # without the whitespace of wrapped lines
    options = [a for a in ap._actions if not isinstance(a, argparse._HelpAction)]
    assert options, command
    for action in options:
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{command} {name} has no help"
        assert (action.option_strings or [action.metavar or action.dest])[0] in text
        if shows_nothing(action):
            continue
        assert "%(default)" in action.help, f"{command} {name}: its help does not show its default"
        shown = " ".join((action.help % dict(vars(action), prog=ap.prog)).split())
        assert f"default: {action.default}" in shown, (command, name, shown)
        assert "".join(shown.split()) in text, (command, name)


def test_print_config_shows_the_resolved_config_and_every_key(tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "md4_dist.train", "configs/tiny.json", "--print-config",
                        "--set", "optim.lr=0.005", "--set", f"train.run_dir={run_dir}",
                        "--set", "storage.key=AKIA-NOT-SHOWN", "--set", "data.synthetic.seed=7"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "AKIA-NOT-SHOWN" not in r.stdout + r.stderr
    config_text, _, keys_text = r.stdout.partition("\nkeys that --set accepts:\n")
    shown = json.loads(config_text)
    assert shown["optim"]["lr"] == 0.005 and shown["data"]["synthetic"]["seed"] == 7
    assert shown["model"]["dim"] == 64  # from configs/tiny.json
    assert shown["storage"]["key"] == "<redacted>" and shown["storage"]["secret"] == ""
    # the rest is the whole resolved config: loading it (secrets aside) gives the same tree
    del shown["storage"]["key"], shown["storage"]["secret"]
    cfg = load_config("configs/tiny.json", ["optim.lr=0.005", f"train.run_dir={run_dir}",
                                            "data.synthetic.seed=7"])
    assert shown == to_dict(cfg)
    assert not run_dir.exists(), "nothing written: no run lock, no config.json, no Ray session"
    lines = keys_text.strip().splitlines()
    assert lines[0].split() == ["KEY", "TYPE", "DEFAULT"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == [k for k, _, _ in settable_keys(Config)]
    assert rows["optim.lr"].split() == ["optim.lr", "float", "0.0003"]  # the default, not the set value
    assert rows["deepspeed.zero_stage"].split() == ["deepspeed.zero_stage", "0", "|", "1", "|", "2", "|", "3", "3"]
    assert "secret" in rows["storage.key"] and "data.synthetic: null by default" in rows["data.synthetic.seed"]
    for key, _, default in settable_keys(Config):  # each key --set accepts, with its default
        parse_override(Config, f"{key}={default.split(' (')[0]}")
    assert len(rows) > 60
