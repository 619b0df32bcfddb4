"""md4_dist: distributed training of MD4 / GenMD4 masked-diffusion language models.

    m = md4_dist.load_pretrained("exported/owt", device="cuda")   # see md4_dist.inference.pretrained
"""

__version__ = "0.1.0"


def __getattr__(name):
    # imported on first use: `import md4_dist.<module>` stays free of torch where it can
    if name == "load_pretrained":
        from md4_dist.inference.pretrained import load_pretrained
        return load_pretrained
    raise AttributeError(f"module 'md4_dist' has no attribute {name!r}")
