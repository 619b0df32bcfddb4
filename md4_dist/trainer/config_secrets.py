"""The config's secret fields (storage.key, storage.secret: `secret_field` in strict_config.py)
reach the workers without being written down.

Everything Ray is given for a run is recorded somewhere: `train_loop_config` and the workers'
runtime env are shown on the dashboard's Train page (Ray Train's state manager keeps them), and
a runtime env, its variables included, is logged by Ray's agent (runtime_env_agent.log). So the
workers get the config without its secrets (`to_dict`), and ask a small actor on the driver's
node for them. It is given the values by a method call after it starts, not as constructor
arguments (an actor's creation task is kept by the GCS for restarts); a method's small arguments
and return value travel inline, from process to process, and are not spilled to disk.

    holder = hand_over(cfg, on_driver_node)        # driver, passed in train_loop_config
    cfg = received(loop_config["config"], holder)  # worker: the whole config back
"""

from __future__ import annotations

import ray

from md4_dist.config import Config, config_from_dict
from md4_dist.strict_config import secrets_of, with_secrets

ACTOR_TIMEOUT_S = 60  # the actor lives on the driver's node; a wait longer than this is a lost driver


@ray.remote(num_cpus=0)
class ConfigSecrets:
    """Holds the secret fields of the run's config, nested as `secrets_of` gives them."""

    def __init__(self):
        self._secrets: dict = {}

    def put(self, secrets: dict) -> None:
        self._secrets = secrets

    def get(self) -> dict:
        return self._secrets


def hand_over(cfg: Config, scheduling_strategy):
    """A ConfigSecrets actor holding cfg's secrets (placed by `scheduling_strategy`)."""
    holder = ConfigSecrets.options(scheduling_strategy=scheduling_strategy).remote()
    ray.get(holder.put.remote(secrets_of(cfg)), timeout=ACTOR_TIMEOUT_S)
    return holder


def received(public: dict, holder) -> Config:
    """The whole config on a worker: the public dict with the holder's secrets put back."""
    return config_from_dict(with_secrets(public, ray.get(holder.get.remote(), timeout=ACTOR_TIMEOUT_S)))
