"""A trained model for use outside training: safetensors weights, a config and the tokenizer in
one directory, and `load_pretrained` to get it back on any device.

    python -m md4_dist.export --checkpoint runs/owt --out exported/owt
    m = md4_dist.load_pretrained("exported/owt", device="cuda")
    m.denoiser, m.schedule, m.tokenizer       # logits = m.denoiser(z_t, t)
    # the same directory in transformers, without md4_dist (md4_dist/hf/modeling_md4.py):
    AutoModel.from_pretrained("exported/owt", trust_remote_code=True)

    DIR/
      model.safetensors  fp32 weights: "denoiser.*" and "schedule.*" (GenMD4's exponents); the
                         output layer's weight has V rows (training pads it, model.OutputLayer)
      config.json        {"format_version", "model", "diffusion", "seq_len", "eos_id",
                          "tokenizer": {"file", "sha256"} | null, "source": {"checkpoint",
                          "step", "weights": "ema" | "trained"}} and transformers' keys
                         (model_type, architectures, auto_map); written last
      tokenizer.model | tokenizer.json   the training data's tokenizer (SentencePiece, or a
                         Hugging Face tokenizer.json), when it had one
      modeling_md4.py, model.py, ...   the code transformers' AutoModel runs: md4_dist's own
                         modules, imports made relative (md4_dist/hf/remote_code.py)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import safetensors.torch
import torch

from md4_dist.checkpoint_format import CheckpointError
from md4_dist.data.storage import StorageConfig, StorageError, join, read_bytes, write_bytes
from md4_dist.diffusion.objectives import DiffusionConfig
from md4_dist.diffusion.schedules import MaskingSchedule
from md4_dist.diffusion_model import DiffusionModel
from md4_dist.hf import remote_code
from md4_dist.inference.consolidate import TrainedCheckpoint, remove
from md4_dist.model import Denoiser, ModelConfig
from md4_dist.strict_config import ConfigError, from_dict, to_dict
from md4_dist.tokenizer import FILE_NAMES, load_tokenizer, parse_tokenizer, read_tokenizer

# config.json's; a format of its own, apart from a training checkpoint's. 2: a block's weights in
# one tensor, `denoiser.blocks.N.params` (model.Block); 3: the time MLP's and the output adaLN's
# too, `denoiser.time.params` (model.TimeConditioning)
EXPORT_FORMAT_VERSION = 3
WEIGHTS, CONFIG = "model.safetensors", "config.json"  # the tokenizer's file: FILE_NAMES[its kind]
OUTPUT_WEIGHT = "denoiser.out.weight"


@dataclass
class Pretrained:
    model: DiffusionModel  # the denoiser and the schedule; its forward is the training objective
    diffusion_config: DiffusionConfig
    seq_len: int  # the sequence length it was trained at
    tokenizer: object | None  # md4_dist.tokenizer.Tokenizer, or None for token-id corpora
    eos_id: int | None

    @property
    def denoiser(self) -> Denoiser:
        return self.model.denoiser

    @property
    def schedule(self) -> MaskingSchedule:
        return self.model.schedule


def export(ckpt: TrainedCheckpoint, out: str, ema: bool = True, tokenizer_url: str | None = None,
           storage: StorageConfig | None = None) -> None:
    """Write `ckpt`'s weights (its EMA, or the trained ones) to the directory `out`."""
    cfg = ckpt.config
    storage = storage or cfg.storage
    # Everything that can fail on the reading side first: `out` is touched only after.
    weights = ckpt.weights(ema)
    proto = read_tokenizer(ckpt.tokenizer, tokenizer_url, storage) if ckpt.tokenizer is not None else None
    if proto is not None:
        name = FILE_NAMES[parse_tokenizer(proto, tokenizer_url or ckpt.tokenizer["url"]).kind]
    code = remote_code.files()
    V = cfg.model.vocab_size
    # The padding rows are zero from initialisation on (their gradient is zero): nothing is lost.
    weights[OUTPUT_WEIGHT] = weights[OUTPUT_WEIGHT][:V].contiguous()
    remove(join(out, CONFIG), storage)  # until the new one is written, `out` is no export
    token_record = None
    if proto is not None:
        write_bytes(join(out, name), proto, storage)
        token_record = {"file": name, "sha256": ckpt.tokenizer["sha256"]}
    write_bytes(join(out, WEIGHTS), safetensors.torch.save(weights, metadata={"format": "pt"}), storage)
    for file, source in code.items():
        write_bytes(join(out, file), source, storage)
    config = {**remote_code.CONFIG_KEYS, "format_version": EXPORT_FORMAT_VERSION,
              "model": to_dict(cfg.model), "diffusion": to_dict(cfg.diffusion), "seq_len": cfg.data.seq_len,
              "eos_id": ckpt.state["eos_id"], "tokenizer": token_record,
              "source": {"checkpoint": ckpt.url, "step": ckpt.step, "weights": "ema" if ema else "trained"}}
    write_bytes(join(out, CONFIG), (json.dumps(config, indent=1) + "\n").encode(), storage)


def load_pretrained(path: str, device: str | torch.device = "cpu",
                    storage: StorageConfig | None = None) -> Pretrained:
    """The model exported to `path` (a local directory or an object-storage URL), in eval mode
    on `device`, with its tokenizer."""
    try:
        config = json.loads(read_bytes(join(path, CONFIG), storage))
    except StorageError as e:
        raise CheckpointError(f"no exported model at {path}: {e}") from None
    if config.get("format_version") != EXPORT_FORMAT_VERSION:
        raise CheckpointError(f"{join(path, CONFIG)} has format version "
                              f"{config.get('format_version')}; this code reads {EXPORT_FORMAT_VERSION}")
    try:
        model_cfg = from_dict(ModelConfig, config["model"], "model")
        diffusion_cfg = from_dict(DiffusionConfig, config["diffusion"], "diffusion")
    except ConfigError as e:
        raise CheckpointError(f"{join(path, CONFIG)}: {e}") from None
    weights = safetensors.torch.load(read_bytes(join(path, WEIGHTS), storage))
    model = DiffusionModel(model_cfg, diffusion_cfg)
    padded = model.denoiser.out.weight.detach().clone().zero_()
    padded[:model_cfg.vocab_size] = weights[OUTPUT_WEIGHT]
    weights[OUTPUT_WEIGHT] = padded
    model.load_state_dict(weights)
    tokenizer = None
    if config["tokenizer"] is not None:
        record = {"url": join(path, config["tokenizer"]["file"]), "sha256": config["tokenizer"]["sha256"]}
        tokenizer = load_tokenizer(record, storage=storage)
    return Pretrained(model.to(device).eval(), diffusion_cfg, config["seq_len"], tokenizer, config["eos_id"])

