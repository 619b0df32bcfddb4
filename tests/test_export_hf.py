"""The export as a transformers model (md4_dist/hf): `python -m md4_dist.export` writes a directory
that AutoModel.from_pretrained(dir, trust_remote_code=True) loads in a Python where md4_dist
cannot be imported; its logits are md4_dist.load_pretrained's, and its generate draws what
md4_dist.sampling.generate draws for the same seed. An MD4 model (token ids, no EOS) and a
GenMD4 one (learned exponents, a tokenizer.json with an EOS)."""

import hashlib
import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from md4_dist import cli, export, load_pretrained
from md4_dist.checkpoint_format import FORMAT_VERSION, STATE, rank_file
from md4_dist.config import config_from_dict
from md4_dist.diffusion_model import DiffusionModel
from md4_dist.hf import remote_code
from md4_dist.sampling import generate, prefix_condition, row_seeds
from md4_dist.strict_config import to_dict
from test_train import ROOT

V, L = 50, 24  # V is no multiple of 128: the output layer's padding rows matter
MODELS = {
    "md4": ["diffusion.kind=md4", "diffusion.schedule=cosine"],
    "genmd4": ["diffusion.kind=genmd4", "diffusion.schedule=learnable_poly"],
}
WORDS = ["<|endoftext|>", "the", "cat", "sat", "on", "mat"] + [f"w{i}" for i in range(V - 6)]
PREFIX = "the cat sat"
# generate's options, each run by the exported model and by md4_dist.sampling.generate
DRAWS = [
    {"sampler": "ancestral", "steps": 6, "num_samples": 3, "seed": 3},
    {"sampler": "topp", "top_p": 0.7, "steps": 5, "num_samples": 2, "seed": 4},
    {"sampler": "margin", "temperature": 0.0, "steps": 4, "num_samples": 2, "seed": 5},
    {"sampler": "threshold", "threshold": 0.3, "temperature": 0.8, "steps": 12, "num_samples": 3,
     "seed": 6, "batch_invariant": True, "stop_at_eos": True},
]

# Run with -I -S: neither the working directory, PYTHONPATH nor site-packages' .pth files (the
# editable install of md4_dist is one) are on the path; site-packages itself is added by hand.
LOADER = r"""
import json, sys
site, inputs, out, *dirs = sys.argv[1:]
sys.path.append(site)
try:
    import md4_dist
except ModuleNotFoundError:
    pass
else:
    raise SystemExit(f"md4_dist is importable here: {md4_dist.__file__}")
import torch
from tokenizers import Tokenizer
from transformers import AutoModel

given = torch.load(inputs)
results = {}
for d in dirs:
    model, info = AutoModel.from_pretrained(d, trust_remote_code=True, output_loading_info=True)
    r = {"class": type(model).__module__ + "." + type(model).__name__, "dtype": str(model.dtype),
         "model_type": model.config.model_type,
         "info": {k: sorted(map(str, v)) for k, v in info.items()}}
    with torch.no_grad():
        r["logits"] = model(given["z"], given["t"])
        r["logits_at_one_t"] = model(given["z"], 0.5)
    prefix = None
    if model.config.tokenizer is not None:
        tok = Tokenizer.from_file(f"{d}/{model.config.tokenizer['file']}")
        prefix = tok.encode(given["prefix"], add_special_tokens=False).ids
    r["prefix"], r["draws"], r["errors"] = prefix, [], []
    for draw in given["draws"]:
        if draw.get("stop_at_eos") and model.config.eos_id is None:
            draw = {k: v for k, v in draw.items() if k != "stop_at_eos"}
        drawn = model.generate(prefix=prefix, **draw)
        r["draws"].append((drawn.tokens, drawn.denoiser_calls))
    for bad in ({"prefix": torch.zeros(1, 3, dtype=torch.long)}, {"stop_at_eos": True}):
        try:
            model.generate(steps=2, **bad)
        except ValueError as e:
            r["errors"].append(str(e))
    results[d] = r
assert not any(m == "md4_dist" or m.startswith("md4_dist.") for m in sys.modules)
torch.save(results, out)
"""


def crafted_checkpoint(d, overrides, tokenizer: bytes | None, seed: int):
    """A one-rank checkpoint in checkpoint_format's layout (ZeRO stage 0, the EMA's share whole)
    with random weights, which export reads as it reads a trained run's: seconds instead of a
    training run's minutes, and weights far from the zero initialisation of the output layer
    and adaLN, so that the logits depend on every weight."""
    with open(os.path.join(ROOT, "configs", "tiny.json")) as f:
        cfg = config_from_dict(json.load(f), [f"model.vocab_size={V}", "model.dim=32", "model.time_dim=16",
                                              f"data.seq_len={L}", "deepspeed.zero_stage=0", *overrides])
    model = DiffusionModel(cfg.model, cfg.diffusion)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        model.denoiser.out.weight[V:] = 0  # training's padding rows stay zero
        if tokenizer is not None:  # EOS (id 0) as likely as the likeliest token: stop_at_eos stops
            logits = model.denoiser(torch.full((1, L), V), torch.ones(1))
            model.denoiser.out.weight[0] = model.denoiser.out.weight[logits[0, :, 1:].mean(0).argmax() + 1]
    record = None
    if tokenizer is not None:
        (d / "tokenizer.json").write_bytes(tokenizer)
        record = {"url": str(d / "tokenizer.json"), "sha256": hashlib.sha256(tokenizer).hexdigest()}
    ckpt = d / "checkpoint"
    ckpt.mkdir()
    torch.save({"ema": {"shadow": [p.detach().clone() for p in model.parameters()]}}, ckpt / rank_file(0))
    state = {"format_version": FORMAT_VERSION, "step": 7, "world_size": 1, "config": to_dict(cfg),
             "tokenizer": record, "eos_id": 0 if tokenizer is not None else None}
    (ckpt / STATE).write_text(json.dumps(state))
    return ckpt


def word_tokenizer() -> bytes:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok.to_str().encode()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each model exported by the command, in this process, with transformers unimportable."""
    out = {}
    for i, (name, overrides) in enumerate(MODELS.items()):
        d = tmp_path_factory.mktemp(name)
        ckpt = crafted_checkpoint(d, overrides, word_tokenizer() if name == "genmd4" else None, seed=i)
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "transformers", None)  # an import of it fails: export must not need it
            assert cli.run(export.main, ["--checkpoint", str(ckpt), "--out", str(d / "exported")]) == 0
        out[name] = d / "exported"
    return out


def test_automodel_loads_the_export_without_md4_dist_with_the_same_logits_and_draws(exported, tmp_path):
    g = torch.Generator().manual_seed(0)
    z = torch.randint(0, V + 1, (4, L), generator=g)  # V: the mask id
    z[:, ::3] = V
    t = torch.rand(4, generator=g) * 0.9 + 0.05
    torch.save({"z": z, "t": t, "prefix": PREFIX, "draws": DRAWS}, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "modules"))
    dirs = [str(exported[name]) for name in MODELS]
    r = subprocess.run([sys.executable, "-I", "-S", "-c", LOADER, sysconfig.get_paths()["purelib"],
                        str(tmp_path / "inputs.pt"), str(tmp_path / "results.pt"), *dirs],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    results = torch.load(tmp_path / "results.pt")

    for name, d in zip(MODELS, dirs):
        got = results[d]
        assert got["class"].startswith("transformers_modules.")  # the directory's copy, not md4_dist's
        assert got["class"].endswith(".modeling_md4.MD4Model")
        assert got["dtype"] == "torch.float32" and got["model_type"] == remote_code.MODEL_TYPE
        assert got["info"]["missing_keys"] == [] and got["info"]["unexpected_keys"] == []
        assert got["info"]["mismatched_keys"] == []
        m = load_pretrained(d)
        with torch.no_grad():
            want = m.denoiser(z, t)
            assert torch.equal(got["logits"], want), f"{name}: the logits differ"
            assert torch.equal(got["logits_at_one_t"], m.denoiser(z, torch.full((4,), 0.5)))
        assert want.shape == (4, L, V) and want.std() > 0.5, "a model whose weights all matter"

        prefix = None if m.tokenizer is None else m.tokenizer.encode(PREFIX)
        assert got["prefix"] == prefix and (prefix is None) == (name == "md4")
        for draw, (tokens, calls) in zip(DRAWS, got["draws"]):
            n, seed = draw["num_samples"], draw["seed"]
            options = {k: v for k, v in draw.items() if k not in ("num_samples", "seed", "stop_at_eos")}
            given = fixed = None
            if prefix is not None:
                given, fixed = prefix_condition(prefix, n, L)
            eos = m.eos_id if draw.get("stop_at_eos") else None
            want = generate(m.denoiser, m.schedule, n, L, seeds=row_seeds(seed, 0, n), given=given,
                            fixed=fixed, eos_id=eos, **options)
            assert torch.equal(tokens, want.tokens) and calls == want.denoiser_calls, f"{name} {draw}"
            assert tokens.shape == (n, L) and tokens.min() >= 0 and tokens.max() < V
            if prefix is not None:
                assert (tokens[:, :len(prefix)] == torch.tensor(prefix)).all(), "the prefix is kept"
        assert len({tokens.numpy().tobytes() for tokens, _ in got["draws"]}) == len(DRAWS)
        assert "prefix must be a sequence of token ids, got a tensor of shape (1, 3)" in got["errors"][0]
        if m.eos_id is None:
            assert "stop_at_eos: this model's corpus had no EOS id" in got["errors"][1]

    # GenMD4's draw stopped at EOS: after a sample's first generated EOS, only EOS
    stopped = results[dirs[1]]["draws"][3][0][:, len(results[dirs[1]]["prefix"]):]
    assert any(0 in row[:-1] for row in stopped), "an EOS before the end"
    assert all((row[row.tolist().index(0):] == 0).all() for row in stopped if 0 in row)
    config = json.loads((exported["genmd4"] / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_md4.MD4Model" and config["eos_id"] == 0
    assert sorted(os.listdir(exported["genmd4"])) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", *remote_code.MODULES.values()])


def test_the_copied_code_imports_only_its_own_files():
    files = remote_code.files()
    assert set(files) == set(remote_code.MODULES.values())
    assert b"from .schedules import MaskingSchedule" in files["sampling.py"]
    assert b"md4_dist.model import" not in files["modeling_md4.py"]
    for bad, why in (("from md4_dist.trainer import engine\n", "imports md4_dist.trainer"),
                     ("from . import checks\n", "imports ."), ("from .losses import x\n", "imports .losses"),
                     ("def f():\n    import md4_dist.data\n", "imports md4_dist.data")):
        with pytest.raises(RuntimeError, match=why):
            remote_code._check("x.py", bad)


def test_sample_and_evaluate_read_a_tokenizer_json(exported, tmp_path, capsys):
    """`sample --prefix` and `evaluate --text` with a model whose corpus was tokenized by a Hugging
    Face tokenizer.json (the checkpoint records it by URL and sha256, as for SentencePiece)."""
    from md4_dist import evaluate, sample

    ckpt = exported["genmd4"].parent / "checkpoint"
    out = tmp_path / "samples.jsonl"
    assert cli.run(sample.main, ["--checkpoint", str(ckpt), "--num-samples", "2", "--steps", "4",
                                 "--prefix", PREFIX, "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert r["tokens"][:3] == [WORDS.index(w) for w in PREFIX.split()] and r["text"].startswith(PREFIX), r
    text = tmp_path / "doc.txt"
    text.write_text("the cat sat on the mat " * 20)
    capsys.readouterr()
    assert cli.run(evaluate.main, ["--checkpoint", str(ckpt), "--text", str(text), "--t-samples", "2"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["sequences"] == -(-121 // L) and got["bits_per_byte"] > 0, got  # 120 words and an EOS
