"""md4_dist: distributed training of MD4 / GenMD4 masked-diffusion language models."""

__version__ = "0.1.0"
