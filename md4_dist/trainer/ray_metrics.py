"""Rank 0's mirror of a few record values as Ray metrics (gauges), for Ray's dashboard and its
Prometheus endpoint (each node's metrics export port). Each gauge is named after the value's tag
(metrics.TAGS), "/" as "_", under "md4_dist_"; Ray's exporter adds "ray_" before it:

    ray_md4_dist_train_loss{run="<train.name>", ...}               the surrogate loss
    ray_md4_dist_train_nelbo_bits_per_token{run="<train.name>", ...}
    ray_md4_dist_perf_tokens_per_s{run="<train.name>", ...}
    ray_md4_dist_perf_mfu{run="<train.name>", ...}                 where the record has MFU (GPUs)

A gauge holds the last record's value while the worker lives: Ray drops a worker's metrics when
it exits, so they show a running job.
"""

from __future__ import annotations

from md4_dist.trainer.metrics import tag

EXPORTED = ("loss", "nelbo_bits_per_token", "tokens_per_s", "mfu")  # record names (metrics.jsonl's)


def gauge_name(record_name: str) -> str:
    return "md4_dist_" + tag(record_name).replace("/", "_")


class RayGauges:
    def __init__(self, run_name: str):
        from ray.util.metrics import Gauge

        self.tags = {"run": run_name}
        self.gauges = {tag(name): Gauge(gauge_name(name), description=f"md4_dist's {name} (metrics.jsonl)",
                                        tag_keys=("run",))
                       for name in EXPORTED}

    def write(self, step: int, scalars: dict, histograms: dict, texts: dict) -> None:
        for name, value in scalars.items():
            if name in self.gauges:
                self.gauges[name].set(value, tags=self.tags)

    def close(self) -> None:
        pass
