"""An exported MD4 / GenMD4 model as a transformers model, for a machine without md4_dist:

    model = AutoModel.from_pretrained("exported/owt", trust_remote_code=True)
    logits = model(input_ids, t)        # input_ids [B, L] in [0, V] (V: the mask id), t [B] or a float
    out = model.generate(prefix=ids, num_samples=4, steps=256, sampler="threshold", seed=0)
    out.tokens                          # [4, seq_len] int64 in [0, V); out.denoiser_calls

Export (md4_dist/inference/pretrained.py) copies this file into the exported directory beside
the md4_dist modules it imports, whose imports become relative there (md4_dist/hf/remote_code.py).
Nothing here is the model written again: the denoiser is model.Denoiser, the schedule
schedules.build's, and generation sampling.generate, with the arguments and draws of
`python -m md4_dist.sample` (a sample's randomness from (seed, its index): sampling.row_seeds).
The config is md4_dist's config.json as export writes it, which md4_dist.load_pretrained reads too.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from md4_dist.diffusion.schedules import build
from md4_dist.model import Denoiser, ModelConfig
from md4_dist.sampling import Generated, Sampler, generate, prefix_condition, row_seeds


class MD4Config(PretrainedConfig):
    """config.json: `model` (model.ModelConfig's fields), `diffusion` (objectives.DiffusionConfig's),
    the training sequence length, the EOS id (None for token-id corpora), the tokenizer's file
    record and where the weights came from."""

    model_type = "md4"  # remote_code.MODEL_TYPE, config.json's

    def __init__(self, model: dict | None = None, diffusion: dict | None = None, seq_len: int = 1024,
                 eos_id: int | None = None, tokenizer: dict | None = None, source: dict | None = None,
                 format_version: int = 3, **kwargs):  # pretrained.EXPORT_FORMAT_VERSION
        self.model = dict(model or {})
        self.diffusion = dict(diffusion or {"kind": "md4", "schedule": "linear"})
        self.seq_len, self.eos_id, self.tokenizer = seq_len, eos_id, tokenizer
        self.source, self.format_version = source, format_version
        super().__init__(**kwargs)


class MD4Model(PreTrainedModel):
    """The denoiser p_theta(x | z_t, t) and the masking schedule (GenMD4's learned exponents),
    with the weights' names of md4_dist's export ("denoiser.*", "schedule.*")."""

    config_class = MD4Config
    base_model_prefix = "md4"
    _no_split_modules = ["Block"]

    def __init__(self, config: MD4Config):
        super().__init__(config)
        try:
            model_cfg = ModelConfig(**config.model)
        except TypeError as e:  # an unknown or missing key
            raise ValueError(f"config.json's model: {e}") from None
        self.denoiser = Denoiser(model_cfg)
        # The export keeps the output layer's V rows; training pads them to a multiple of 128
        # (output_head.padded_vocab), rows never read as logits.
        out = self.denoiser.out
        out.weight = nn.Parameter(out.weight.detach()[:model_cfg.vocab_size].clone())
        # md4 or genmd4's schedule by its name; GenMD4's exponents are weights (schedule.phi)
        self.schedule = build(config.diffusion["schedule"], vocab_size=model_cfg.vocab_size)
        self.post_init()

    def _init_weights(self, module):
        pass  # model.Denoiser initialises its own weights, as in training

    @property
    def mask_id(self) -> int:
        return self.config.model["vocab_size"]

    def forward(self, input_ids: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Logits [B, L, V] of the clean tokens, given z_t = input_ids [B, L] (mask id V) at
        time t ([B], or one float for every row; 1: all masked, 0: clean)."""
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            t = torch.full(input_ids.shape[:1], float(t), device=input_ids.device)
        return self.denoiser(input_ids, t)

    @torch.no_grad()
    def generate(self, prefix: Sequence[int] | torch.Tensor | None = None, *, num_samples: int = 1,
                 seq_len: int | None = None, steps: int = 256, sampler: Sampler = "ancestral",
                 top_p: float = 0.9, threshold: float = 0.9, temperature: float = 1.0,
                 grid: Literal["uniform", "cosine"] = "cosine", seed: int | None = 0,
                 batch_invariant: bool = False, stop_at_eos: bool = False,
                 given: torch.Tensor | None = None, fixed: torch.Tensor | None = None) -> Generated:
        """Draw `num_samples` sequences of `seq_len` tokens (default: the training length) with
        md4_dist.sampling.generate: `sampler` one of ancestral, topp (`top_p`), confidence,
        margin, entropy (`temperature`), threshold (`threshold`, `temperature`); `steps` the
        denoising steps (threshold: the most model calls). `prefix` (token ids) starts every
        sample; or `given` [N, L] with `fixed` [N, L] bool keeps given's tokens where fixed is
        True (infilling). Sample i's randomness comes from (seed, i) alone, as in
        `python -m md4_dist.sample --seed`; seed None draws from torch's global generator.
        `stop_at_eos`: every generated token after a sample's first generated EOS is EOS."""
        L = seq_len or self.config.seq_len
        if prefix is not None:
            if given is not None:
                raise ValueError("pass prefix or given/fixed, not both")
            if isinstance(prefix, torch.Tensor) and prefix.dim() != 1:
                raise ValueError(f"prefix must be a sequence of token ids, got a tensor of shape "
                                 f"{tuple(prefix.shape)}")
            given, fixed = prefix_condition([int(i) for i in prefix], num_samples, L)
        if stop_at_eos and self.config.eos_id is None:
            raise ValueError("stop_at_eos: this model's corpus had no EOS id (config.json's eos_id)")
        dev = self.device
        return generate(self.denoiser, self.schedule, num_samples, L, steps, sampler=sampler,
                        top_p=top_p, threshold=threshold, temperature=temperature, grid=grid,
                        seeds=None if seed is None else row_seeds(seed, 0, num_samples),
                        batch_invariant=batch_invariant,
                        eos_id=self.config.eos_id if stop_at_eos else None,
                        given=None if given is None else given.to(dev),
                        fixed=None if fixed is None else fixed.to(dev), device=dev)
