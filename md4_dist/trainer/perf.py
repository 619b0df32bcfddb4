"""Model FLOPs utilisation: the FLOPs a step's tokens are worth, against the device's peak.

    flops = flops_per_token(cfg.model, cfg.diffusion, cfg.data.seq_len)   # per clean token
    mfu = tokens_per_s * flops / (peak_tflops(cfg, device_name) * 1e12 * devices)

The count (per clean token, forward and backward): masks x (6 x P + 12 x n_layers x L x d), with
P the matrix parameters (attention, MLP and output projections; not the embedding lookup or the
adaLN layers) and 12 n_layers L d the attention scores and values. It counts the output layer at
every position, as the model defines it; the trainer projects only the masked rows, so the FLOPs
it executes are fewer, and MFU by this count rises with that saving. GenMD4 counts twice (its two
masks per sequence).
"""

from __future__ import annotations

from md4_dist.config import Config
from md4_dist.diffusion.objectives import DiffusionConfig, masks_per_sequence
from md4_dist.model import ModelConfig

# Dense bf16 matrix-product rates measured by this project on its GPU machines (a large square
# bf16 torch.matmul; `benchmarks/throughput.py` measures it at every run): the peak that MFU is
# quoted against, in TFLOP/s. The datasheets say 989 for both, which no product reaches there.
# `logging.peak_tflops` sets the peak of any other device.
MEASURED_PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0}


def matrix_params(m: ModelConfig) -> int:
    per_layer = 4 * m.dim * m.dim + 3 * m.dim * m.hidden
    return m.n_layers * per_layer + m.vocab_size * m.dim


def flops_per_token(m: ModelConfig, d: DiffusionConfig, seq_len: int) -> float:
    return masks_per_sequence(d) * (6 * matrix_params(m) + 12 * m.n_layers * seq_len * m.dim)


def measured_peak(device_name: str | None) -> float | None:
    """MEASURED_PEAK_TFLOPS of the GPU that torch names `device_name` ("NVIDIA H200"), if known."""
    return next((peak for name, peak in MEASURED_PEAK_TFLOPS.items()
                 if device_name is not None and name in device_name.split()), None)


def peak_tflops(cfg: Config, device_name: str | None) -> float | None:
    """The peak MFU is quoted against: `logging.peak_tflops` when set, else the measured figure
    for this GPU; None (no MFU) for any other device."""
    return cfg.logging.peak_tflops or measured_peak(device_name)
