"""Where Ray enters: attach to a cluster or start the embedded one, and run the train loop on
`cluster.num_workers` workers with Ray Train's TorchTrainer, each first checking its node's
packages against their pins (`worker`, trainer/pins.py). Inside the workers, Ray Train's
API is used in two more places: its context (trainer/loop.py) and its checkpoint reports
(trainer/checkpoint.py); the driver's stop request is a Ray actor (trainer/stop.py), and so are
its record of uncurable errors (trainer/fatal.py) and the config's secrets
(trainer/config_secrets.py), which are not written into anything Ray keeps."""

from __future__ import annotations

import os
import socket

from md4_dist.config import Config, ConfigError
from md4_dist.data.storage import filesystem, protocol
from md4_dist.strict_config import to_dict
from md4_dist.trainer import checkpoint, config_secrets, embedded_ray, pins, wandb_log
from md4_dist.trainer.fatal import ACTOR_TIMEOUT_S, FatalRecord, earlier_failure, raise_if_recorded
from md4_dist.trainer.loop import train_loop
from md4_dist.trainer.stop import StopRequest, on_sigterm

# Passed to every worker when set: the compiled-op cache, the NVLink-multicast switches of NCCL,
# PyTorch and NVSHMEM (some hosts must keep multicast off), and S3 settings. No credentials: Ray
# records a runtime env (its dashboard, its agent's log); the config's keys go through
# trainer/config_secrets.py.
FORWARDED_ENV = ("TORCH_EXTENSIONS_DIR", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                 "NVSHMEM_DISABLE_NVLS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")


def check_room(cfg: Config, have: dict, embedded: bool) -> None:
    """The smallest worker group must fit the cluster. Ray would otherwise wait for resources and
    retry without end: on the embedded instance, whose resources are this machine's, that is an
    error; an attached cluster may grow (an autoscaler), so there it is a note."""
    workers = cfg.cluster.world_sizes[0]
    need = {"CPU": workers * cfg.cluster.cpus_per_worker}
    why = {"CPU": f"cluster.cpus_per_worker = {cfg.cluster.cpus_per_worker} each"}
    if cfg.cluster.use_gpu:
        need["GPU"], why["GPU"] = workers, "cluster.use_gpu = true: one each"
    short = [f"{need[k]} {k}s ({why[k]})" for k in need if have.get(k, 0) < need[k]]
    if not short:
        return
    has = f"{have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs"
    n = cfg.cluster.num_workers
    asked = n if isinstance(n, int) else f"[{n[0]}, {n[1]}], its minimum"
    what = (f"{workers} worker(s) (cluster.num_workers = {asked}): they "
            f"need {' and '.join(short)}")
    if embedded:
        raise ConfigError(f"the embedded Ray instance (this machine: {has}) cannot hold {what}. "
                          "Lower those config keys, or attach to a larger cluster (ray job submit, "
                          "or RAY_ADDRESS)")
    print(f"note: this Ray cluster ({has} now) cannot hold {what}; the job waits until the "
          "cluster grows (an autoscaler adding nodes)", flush=True)


def worker(loop_config: dict) -> None:
    """Ray Train's worker function: the node's packages checked against their pins (unless
    cluster.check_pins is false), then the train loop (trainer/loop.py)."""
    import ray

    record = loop_config["fatal"]
    if loop_config["config"]["cluster"]["check_pins"] and not earlier_failure(record):
        try:
            pins.check(f"{socket.gethostname()} ({ray.util.get_node_ip_address()})")
        except pins.PinMismatch as e:
            # No restart cures it while the node is in the cluster: the run stops (trainer/fatal.py).
            ray.get(record.set.remote(str(e)), timeout=ACTOR_TIMEOUT_S)
            raise
    train_loop(loop_config)


def fit(cfg: Config) -> int:
    """Train; returns the last step checkpointed, short of `train.steps` when stopped early."""
    import ray

    wandb_log.require(cfg)  # here, not in every attempt of rank 0: W&B asked for, not installed
    # How long Ray Train waits for a worker group's resources (its placement group) before it
    # decides the size again (Ray's default: 60 s). Read by the Ray processes this driver starts,
    # the embedded default, whose room check_room has checked; a cluster sets its own (launcher/).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    address = os.environ.get("RAY_ADDRESS")
    embedded = None
    if not ray.is_initialized():
        # Inside `ray job submit`, or with RAY_ADDRESS set, this attaches to that cluster;
        # otherwise it starts a local Ray instance sized to this machine (the embedded default),
        # also where `ray start` left a cluster running. That instance lives in a session of its
        # own, so that a SIGTERM to this process's group reaches this process only (embedded_ray.py).
        if not address:
            embedded = embedded_ray.start()
        ray.init(address=address or embedded.address, log_to_driver=True)
    try:
        return _fit(cfg, embedded=not address)
    finally:
        if embedded is not None:
            ray.shutdown()
            embedded.close()


def _fit(cfg: Config, embedded: bool) -> int:
    import pyarrow.fs
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check_room(cfg, ray.cluster_resources(), embedded=embedded)
    # Ray Train keeps its own state under the run directory; on object storage it goes through
    # the same fsspec filesystem (endpoint, credentials, timeouts) as everything else.
    if protocol(cfg.train.run_dir) == "file":
        storage_path, storage_fs = cfg.train.run_dir, None
    else:
        fs, storage_path = filesystem(cfg.train.run_dir, cfg.storage)
        # Ray Train's controller gets it pickled, the storage keys in it (s3fs keeps them): as the
        # controller actor's creation arguments, which the GCS holds in memory, written nowhere
        # (its Train page shows the filesystem's type); a Redis-backed GCS would store them there.
        storage_fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    # Ray Train's print patch also logs each line, which Ray then shows twice.
    env = {"DS_ACCELERATOR": "cuda" if cfg.cluster.use_gpu else "cpu", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    # On the driver's node, which lives as long as the run: workers' nodes may come and go.
    on_driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    stop = StopRequest.options(scheduling_strategy=on_driver_node).remote()
    fatal = FatalRecord.options(scheduling_strategy=on_driver_node).remote()  # trainer/fatal.py
    secrets = config_secrets.hand_over(cfg, on_driver_node)  # storage keys, never written down
    trainer = TorchTrainer(
        worker,
        # Ray Train shows this on its dashboard: the config without its secrets (to_dict)
        train_loop_config={"config": to_dict(cfg), "secrets": secrets, "stop": stop, "fatal": fatal},
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo",
                                 timeout_s=cfg.cluster.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker},
                                     elastic_resize_monitor_interval_s=cfg.cluster.resize_check_s),
        # Ray keeps its record of the run and the checkpoints in <run_dir>/checkpoints, and restores
        # from there when the same run directory is used again.
        run_config=RunConfig(name="checkpoints", storage_path=storage_path,
                             storage_filesystem=storage_fs, worker_runtime_env={"env_vars": env},
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
                             failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures)),
    )
    restore = on_sigterm(stop)
    try:
        result = trainer.fit()
    except Exception:
        raise_if_recorded(fatal)  # the data error itself, named, rather than Ray's wrapper of it
        raise
    finally:
        restore()
    raise_if_recorded(fatal)  # a restarted group that found the record returned at once
    return checkpoint.step_of(result.checkpoint)
