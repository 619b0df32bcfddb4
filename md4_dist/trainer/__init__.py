"""The training job: DeepSpeed config generation, the per-worker train loop, the Ray Train launch."""
