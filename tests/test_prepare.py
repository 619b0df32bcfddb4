"""What the driver checks and writes before any worker starts (train.prepare), on a run directory
that already holds a run: a rotated storage key resumes it, a changed train.steps is refused
with what to do instead. No Ray, no workers."""

import json
import os

import pytest

from md4_dist.config import ConfigError, load_config
from md4_dist.strict_config import secrets_of, to_dict, with_secrets
from md4_dist.train import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(run_dir, data, *sets):
    return load_config(os.path.join(ROOT, "configs", "tiny.json"),
                       [f"train.run_dir={run_dir}", f"data.manifest={data}", *sets])


def prepare_paths(cfg):
    """cfg with the absolute paths prepare resolves (as a saved config holds them)."""
    from dataclasses import replace

    return replace(cfg, data=replace(cfg.data, manifest=os.path.abspath(cfg.data.manifest)),
                   train=replace(cfg.train, run_dir=os.path.abspath(cfg.train.run_dir)))


def test_a_rotated_storage_key_resumes_the_run(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    prepare(tiny(run, tiny_data, "storage.key=first-key-id", "storage.secret=first-secret"))
    prepare(tiny(run, tiny_data, "storage.key=second-key-id", "storage.secret=second-secret"))
    assert f"resuming the run in {run}" in capsys.readouterr().out
    saved = (run / "config.json").read_text()
    assert "first" not in saved and "second" not in saved
    assert set(json.loads(saved)["storage"]) == {"endpoint_url", "region", "anon"}


def test_keys_an_earlier_version_wrote_are_taken_out_of_config_json(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    cfg = tiny(run, tiny_data, "storage.key=old-key-id", "storage.secret=old-secret")
    run.mkdir()
    # what save_config wrote before the keys were secrets: every field
    (run / "config.json").write_text(json.dumps(with_secrets(to_dict(prepare_paths(cfg)), secrets_of(cfg))))
    prepare(cfg)
    out = capsys.readouterr().out
    assert f"resuming the run in {run}" in out and "without the storage keys" in out
    assert "old-" not in (run / "config.json").read_text()


@pytest.mark.parametrize("steps,sets,words", [
    (400, [], "cannot be extended in place"),
    (200, ["optim.lr=1e-3"], "cannot be shortened in place"),
])
def test_another_train_steps_is_refused_saying_why_and_what_to_do(tmp_path, tiny_data, steps, sets, words):
    run = tmp_path / "run"
    prepare(tiny(run, tiny_data))  # train.steps = 300, as tiny.json has it
    before = (run / "config.json").read_text()
    with pytest.raises(ConfigError) as e:
        prepare(tiny(run, tiny_data, f"train.steps={steps}", *sets))
    msg = str(e.value)
    assert msg.startswith(f"config key 'train.steps': {run} holds a run of train.steps = 300, "
                          f"and this command asks for {steps}; the run {words}")
    assert "WarmupCosineLR" in msg and "optim.warmup_steps = 20" in msg
    assert ("start a new run in another train.run_dir; to resume this one, run it with "
            "train.steps = 300") in msg
    assert msg.endswith(" (also differing: optim.lr)") == bool(sets)
    assert (run / "config.json").read_text() == before


def test_a_resumed_run_may_add_a_profile_and_wandb_but_not_change_what_it_trains(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    prepare(tiny(run, tiny_data))
    prepare(tiny(run, tiny_data, "logging.profile_steps=[3, 4]", "logging.profile_all_ranks=true",
                 "logging.wandb.enabled=true", "logging.wandb.mode=offline", "cluster.num_workers=1"))
    assert f"resuming the run in {run}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"another config \(differing: logging.every\)"):
        prepare(tiny(run, tiny_data, "logging.every=3"))


def test_a_deepspeed_setting_deepspeed_refuses_fails_on_the_driver_naming_it(tmp_path, tiny_data):
    """DeepSpeed parses the config md4_dist builds (with `deepspeed.extra` merged in) before any
    worker starts: a misspelt or mistyped key is one error naming it, not the same error in every
    worker at engine start, retried by Ray; and the run directory is left as it was. DeepSpeed's
    top level ignores unknown keys: a top-level key its parse never looks up is refused too."""
    run = tmp_path / "run"
    norm_off = '{"zero_optimization": {"compute_grad_norm": false}}'
    for extra, sets, words in [
        ('{"zero_optimization": {"reduce_bucket_sise": 5}}', [], "DeepSpeedZeroConfig reduce_bucket_sise"),
        ('{"zero_optimization": {"reduce_bucket_size": "big"}}', [], "DeepSpeedZeroConfig reduce_bucket_size"),
        # a section DeepSpeed would drop without a word (its top level ignores unknown keys)
        ('{"zero_optimisation": {"stage": 1}}', [],
         "reads no top-level setting 'zero_optimisation', so it would be ignored; did you mean 'zero_optimization'?"),
        # DeepSpeed's own rules: its config's, and its ZeRO-1/2 optimizer's (checked when built)
        (norm_off, [], "compute_grad_norm=false is supported only with ZeRO Stage 1 or 2"),
        (norm_off, ["deepspeed.zero_stage=2", "optim.grad_clip=1.0"], "no norm to clip with, and optim.grad_clip is 1.0"),
    ]:
        with pytest.raises(ConfigError) as e:
            prepare(tiny(run, tiny_data, f"deepspeed.extra={extra}", *sets))
        assert "config key 'deepspeed.extra': " in str(e.value) and words in str(e.value), str(e.value)
        assert not run.exists()
    # what DeepSpeed accepts passes, and the run begins
    prepare(tiny(run, tiny_data, 'deepspeed.extra={"zero_optimization": {"reduce_bucket_size": 5}, '
                 '"flops_profiler": {"enabled": false}, "wall_clock_breakdown": true}'))
    assert (run / "config.json").exists()
