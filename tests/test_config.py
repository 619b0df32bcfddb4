import json

import pytest

from md4_dist.config import Config, ConfigError, config_from_dict, load_config, save_config
from md4_dist.strict_config import to_dict


def test_unknown_key_names_dotted_key_and_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.widht'.*allowed.*dim.*n_layers"):
        config_from_dict({"model": {"widht": 512}})
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer'.*allowed.*optim"):
        config_from_dict({"optimizer": {}})


def test_wrong_type_names_key_expected_and_given():
    with pytest.raises(ConfigError, match=r"'model\.dim': expected int, got str \(\"768\"\)"):
        config_from_dict({"model": {"dim": "768"}})
    with pytest.raises(ConfigError, match=r"'train\.steps': expected int, got float"):
        config_from_dict({"train": {"steps": 1.5}})
    with pytest.raises(ConfigError, match=r"'train\.ema': expected float, got bool"):
        config_from_dict({"train": {"ema": True}})
    with pytest.raises(ConfigError, match=r"'model': expected object, got int"):
        config_from_dict({"model": 3})
    with pytest.raises(ConfigError, match=r"'deepspeed\.zero_stage': 4 is not allowed; allowed: 0, 1, 2, 3"):
        config_from_dict({"deepspeed": {"zero_stage": 4}})


def test_unknown_schedule_and_bad_values_name_the_culprit():
    with pytest.raises(ConfigError, match=r"'diffusion\.schedule'.*'quadratic'"):
        config_from_dict({"diffusion": {"schedule": "quadratic"}})
    with pytest.raises(ConfigError, match=r"'train\.global_batch'.*micro_batch"):
        config_from_dict({"train": {"global_batch": 10, "micro_batch": 4}})
    with pytest.raises(ConfigError, match=r"'cluster\.num_workers'"):
        config_from_dict({"cluster": {"num_workers": [3, 1]}})
    with pytest.raises(ConfigError, match=r"'optim\.lr'.*float32's largest value.*got 1e\+300"):
        config_from_dict({"optim": {"lr": 1e300}})
    with pytest.raises(ConfigError, match=r"'optim\.warmup_steps'.*>= 1.*got 0"):
        config_from_dict({"optim": {"warmup_steps": 0}})
    with pytest.raises(ConfigError, match=r"'logging\.sample_every': sample_every must be >= 0, got -1"):
        config_from_dict({"logging": {"sample_every": -1}})
    with pytest.raises(ConfigError, match=r"'logging\.samples'.*>= 1"):
        config_from_dict({"logging": {"samples": 0}})


def test_overrides_parse_to_field_types():
    cfg = config_from_dict({}, ["optim.lr=1e-4", "train.steps=10", "deepspeed.precision=fp32",
                                "cluster.num_workers=[1, 2]", "train.name=123", "model.mlp_type=swiglu",
                                "optim.betas=[0.9, 0.95]", "train.ema=0", "cluster.use_gpu=true"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 10 and cfg.deepspeed.precision == "fp32"
    assert cfg.cluster.num_workers == (1, 2) and cfg.train.name == "123"
    assert cfg.optim.betas == (0.9, 0.95) and cfg.train.ema == 0.0 and cfg.cluster.use_gpu is True
    # an optional section: set by its keys (starting from its defaults), or to null
    cfg = config_from_dict({}, ["data.synthetic.num_sequences=50"])
    assert cfg.data.synthetic.num_sequences == 50 and cfg.data.synthetic.seed == 0
    assert config_from_dict({"data": {"synthetic": {}}}, ["data.synthetic=null"]).data.synthetic is None
    with pytest.raises(ConfigError, match=r"override 'train\.steps': cannot parse 'ten' as int"):
        config_from_dict({}, ["train.steps=ten"])
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.stpes'"):
        config_from_dict({}, ["train.stpes=3"])
    with pytest.raises(ConfigError, match="names a section"):
        config_from_dict({}, ["train=3"])
    with pytest.raises(ConfigError, match="key.path=value"):
        config_from_dict({}, ["train.steps"])


def test_dump_and_load_round_trip(tmp_path):
    cfg = config_from_dict({"diffusion": {"kind": "genmd4", "schedule": "learnable_poly"},
                            "cluster": {"num_workers": [2, 4]}}, ["model.dim=384"])
    path = tmp_path / "config.json"
    save_config(cfg, str(path))
    again = load_config(str(path))
    assert again == cfg and isinstance(again.cluster.num_workers, tuple)
    assert json.loads(path.read_text()) == to_dict(cfg)
    assert load_config(str(path), ["model.dim=192"]).model.dim == 192
    assert config_from_dict({}) == Config()


def test_storage_keys_are_secrets_never_written_nor_shown(tmp_path):
    """storage.key and storage.secret load like any key, but to_dict (config.json, checkpoints,
    Ray's train_loop_config) and the repr leave them out; secrets_of gives them apart."""
    from md4_dist.strict_config import secrets_of, with_secrets

    cfg = config_from_dict({"storage": {"key": "AKIA-visible-nowhere", "endpoint_url": "http://s3"}},
                           ["storage.secret=s3cr3t-visible-nowhere"])
    assert (cfg.storage.key, cfg.storage.secret) == ("AKIA-visible-nowhere", "s3cr3t-visible-nowhere")
    path = tmp_path / "config.json"
    save_config(cfg, str(path))
    for text in (path.read_text(), json.dumps(to_dict(cfg)), repr(cfg), str(cfg.storage)):
        assert "visible-nowhere" not in text
    assert json.loads(path.read_text())["storage"] == {"endpoint_url": "http://s3", "region": "", "anon": False}
    assert load_config(str(path)).storage.key == ""
    assert secrets_of(cfg) == {"storage": {"key": "AKIA-visible-nowhere", "secret": "s3cr3t-visible-nowhere"}}
    assert config_from_dict(with_secrets(to_dict(cfg), secrets_of(cfg))) == cfg
    # a rotated key: the same public config, so the same run
    rotated = config_from_dict({}, ["storage.endpoint_url=http://s3", "storage.key=another"])
    assert to_dict(rotated) == to_dict(cfg) and rotated != cfg


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.json does not exist"):
        load_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        load_config(str(bad))
    bad.write_text('{"model": {"dimm": 3}}')
    with pytest.raises(ConfigError, match=r"bad.json: unknown config key 'model\.dimm'"):
        load_config(str(bad))


@pytest.mark.parametrize("name,params,workers", [("tiny", 152672, [2]), ("owt_small", 165.9e6, [8]),
                                                 ("owt_large", 1.33e9, [15, 16])])
def test_shipped_configs_load_and_fit_every_allowed_world_size(name, params, workers):
    """Each config in configs/ loads strictly, has the model size its README line claims, and its
    global batch divides into micro-batches for every world size it allows."""
    import os

    import torch

    from md4_dist.model import Denoiser
    from md4_dist.output_head import padded_vocab
    from md4_dist.trainer.ds_config import accumulation_steps

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", f"{name}.json"))
    with torch.device("meta"):  # counted without allocating 1.3B parameters
        count = sum(p.numel() for p in Denoiser(cfg.model).parameters())
    count -= (padded_vocab(cfg.model.vocab_size) - cfg.model.vocab_size) * cfg.model.dim  # never read
    assert count == pytest.approx(params, rel=0.01)
    assert list(cfg.cluster.world_sizes) == workers
    for world in cfg.cluster.world_sizes:
        assert accumulation_steps(cfg, world) * cfg.train.micro_batch * world == cfg.train.global_batch


def test_bf16_sums_gradients_in_fp32():
    """bf16 runs keep fp32 master weights and sum micro-batch gradients in fp32; DeepSpeed's
    stage 0 cannot, so it is refused where there is a sum to do."""
    from md4_dist.trainer.ds_config import deepspeed_config

    for stage in (1, 2, 3):
        cfg = config_from_dict({}, [f"deepspeed.zero_stage={stage}", "deepspeed.precision=bf16"])
        assert deepspeed_config(cfg, 1)["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = config_from_dict({}, ["deepspeed.precision=fp32"])
    assert "data_types" not in deepspeed_config(fp32, 1)
    stage0 = ["deepspeed.zero_stage=0", "deepspeed.precision=bf16", "train.micro_batch=16"]
    one = config_from_dict({}, stage0 + ["train.global_batch=16"])
    assert "data_types" not in deepspeed_config(one, 1)  # one micro-batch: nothing to sum
    two = config_from_dict({}, stage0 + ["train.global_batch=32"])
    with pytest.raises(ValueError, match="would sum the gradients of 2 micro-batches per step in bf16"):
        deepspeed_config(two, 1)


def test_deepspeed_extra_is_merged_and_cannot_set_what_md4_dist_sets(tmp_path):
    """`deepspeed.extra` reaches DeepSpeed's config, nested key by key; a setting md4_dist derives
    itself is refused at load, naming the key and the md4_dist config key that sets it."""
    from md4_dist.config import DEEPSPEED_OWNED
    from md4_dist.trainer.ds_config import deepspeed_config

    cfg = config_from_dict({}, ['deepspeed.extra={"zero_optimization": {"stage3_prefetch_bucket_size": 7}, '
                                '"activation_checkpointing": {"partition_activations": true}}'])
    ds = deepspeed_config(cfg, 1)
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 7
    assert ds["zero_optimization"]["stage"] == 3, "ours kept beside the merged key"
    assert ds["activation_checkpointing"] == {"partition_activations": True}
    # what benchmarks/gpu_runs/*.sh pass, each reaching DeepSpeed's config as given
    big = {"reduce_bucket_size": 500000000, "stage3_prefetch_bucket_size": 500000000}
    for extra in [{"zero_optimization": big},
                  {"zero_optimization": {**big, "overlap_comm": False}},
                  {"zero_optimization": {**big, "overlap_comm": False}, "data_types": {"grad_accum_dtype": "bf16"}},
                  {"wall_clock_breakdown": True, "zero_optimization": {"memory_efficient_linear": True}},
                  # DeepSpeed's optimizer-step waits put back (compile_unit.sh's WAITS)
                  {"bf16": {"check_grad_overflow": True}, "zero_optimization": {"compute_grad_norm": True}}]:
        ds = deepspeed_config(config_from_dict({}, [f"deepspeed.extra={json.dumps(extra)}",
                                                    "deepspeed.persistence_threshold=1000000000"]), 1)
        for section, value in extra.items():
            got = ds[section]
            assert (got if not isinstance(value, dict) else {k: got[k] for k in value}) == value, section
        assert ds["zero_optimization"]["stage"] == 3
        assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 1000000000
        assert ds["bf16"]["enabled"] is True, "ours kept beside extra's bf16 keys"
    # every key md4_dist sets is refused, naming its replacement
    for path, replacement in DEEPSPEED_OWNED.items():
        *parents, leaf = path.split(".")
        extra = {leaf: 1}
        for parent in reversed(parents):
            extra = {parent: extra}
        with pytest.raises(ConfigError) as e:
            config_from_dict({}, [f"deepspeed.extra={json.dumps(extra)}"])
        assert f"config key 'deepspeed.extra.{path}' is set by md4_dist: use {replacement}" in str(e.value)
    for extra, message in [
        ('{"zero_optimization": {"stage": 1}}', "'deepspeed.extra.zero_optimization.stage' is set by md4_dist: use deepspeed.zero_stage"),
        ('{"train_micro_batch_size_per_gpu": 8}', "'deepspeed.extra.train_micro_batch_size_per_gpu' is set by md4_dist: use train.micro_batch"),
        ('{"bf16": {"enabled": false}}', "'deepspeed.extra.bf16.enabled' is set by md4_dist: use deepspeed.precision"),
        ('{"bf16": false}', "'deepspeed.extra.bf16' is a bool, but it is an object"),
        ('{"compile": {"deepcompile": true}}', "use deepspeed.deepcompile"),
        ('{"zero_optimization": 2}', "'deepspeed.extra.zero_optimization' is a int, but it is an object"),
        ('{"data_types": {"grad_accum_dtype": "fp16"}}', "'deepspeed.extra.data_types.grad_accum_dtype': \"fp16\" is not allowed; allowed: \"fp32\", \"bf16\""),
        ('{"data_types": {"other": 1}}', "'deepspeed.extra.data_types' may hold only grad_accum_dtype"),
        ('[1]', "expected object"),
    ]:
        with pytest.raises(ConfigError, match="deepspeed.extra") as e:
            config_from_dict({}, [f"deepspeed.extra={extra}"])
        assert message in str(e.value)
    # fp32 precision and ZeRO-0 sum in the parameters' dtype, the only one DeepSpeed allows there
    for where in (["deepspeed.precision=fp32"], ["deepspeed.zero_stage=0", "train.global_batch=16"]):
        with pytest.raises(ConfigError, match=r"'deepspeed\.extra\.data_types\.grad_accum_dtype' is set by md4_dist"):
            config_from_dict({}, where + ['deepspeed.extra={"data_types": {"grad_accum_dtype": "fp32"}}'])
    # refused at load, named by the config file
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"deepspeed": {"extra": {"gradient_clipping": 1.0}}}))
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value) == (f"{path}: config key 'deepspeed.extra.gradient_clipping' is set by md4_dist: "
                            "use optim.grad_clip")
    with pytest.raises(ConfigError, match="deepcompile needs zero_stage 1 or 3"):
        config_from_dict({}, ["deepspeed.deepcompile=true", "deepspeed.zero_stage=2"])
    with pytest.raises(ConfigError, match="train.compile_unit='trunk' does nothing under deepspeed.deepcompile"):
        config_from_dict({}, ["deepspeed.deepcompile=true", "train.compile_unit=trunk"])
    with pytest.raises(ConfigError, match="'train.compile_unit': \"layer\" is not allowed"):
        config_from_dict({}, ["train.compile_unit=layer"])


def test_deepspeed_takes_the_gradient_norm_every_step_only_where_clipping_needs_it():
    """DeepSpeed's per-step norm and bf16 overflow check each make the host wait for the GPU
    (benchmarks/RESULTS.md). The norm is left to the recorded steps where DeepSpeed's optimizer
    allows it and nothing clips; DeepSpeed's bf16 check, which skips a non-finite step silently,
    is off (trainer/finite.py stops such a run). deepspeed.extra may turn either back on."""
    from md4_dist.trainer.ds_config import deepspeed_config

    def ds(*sets):
        return deepspeed_config(config_from_dict({}, ["optim.grad_clip=0", *sets]), 1)

    for sets, left_out in [
        (["deepspeed.zero_stage=2"], True), (["deepspeed.zero_stage=2", "deepspeed.precision=fp32"], True),
        (["deepspeed.zero_stage=1", "deepspeed.precision=fp32"], True),
        # DeepSpeed's BF16 optimizer (ZeRO-1, bf16, fp32 sums) and ZeRO-3 always take it
        (["deepspeed.zero_stage=1"], False), (["deepspeed.zero_stage=3"], False),
        (["deepspeed.zero_stage=2", "optim.grad_clip=1.0"], False),  # clipping reads it every step
        (["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"], False),  # DeepSpeed: not with offload
        (["deepspeed.zero_stage=2", 'deepspeed.extra={"zero_optimization": {"compute_grad_norm": true}}'], False),
    ]:
        got = ds(*sets)
        assert got["zero_optimization"].get("compute_grad_norm", True) is not left_out, sets
        assert got["bf16"]["check_grad_overflow"] is False, sets
    assert ds('deepspeed.extra={"bf16": {"check_grad_overflow": true}}')["bf16"] == \
        {"enabled": True, "check_grad_overflow": True}
