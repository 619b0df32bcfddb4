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
    from md4_dist.trainer.ds_config import accumulation_steps

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", f"{name}.json"))
    with torch.device("meta"):  # counted without allocating 1.3B parameters
        count = sum(p.numel() for p in Denoiser(cfg.model).parameters())
    assert count == pytest.approx(params, rel=0.01)
    assert list(cfg.cluster.world_sizes) == workers
    for world in cfg.cluster.world_sizes:
        assert accumulation_steps(cfg, world) * cfg.train.micro_batch * world == cfg.train.global_batch
