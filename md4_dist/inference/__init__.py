"""Using a trained model, beside the trainer on the shared core (md4_dist/diffusion_model.py,
md4_dist/checkpoint_format.py) and never on it: a training checkpoint's weights whole in one
process (consolidate.py), the exported model and `load_pretrained` (pretrained.py), and the NELBO
estimate (nelbo.py). The commands `python -m md4_dist.evaluate`, `.sample` and `.export` stand on
these; one process, CPU or GPU, no DeepSpeed engine or Ray."""
