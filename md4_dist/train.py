"""Train MD4 / GenMD4 with DeepSpeed under Ray Train.

    python -m md4_dist.train configs/tiny.json [--set train.steps=100 --set optim.lr=1e-4 ...]
    python -m md4_dist.train configs/tiny.json --print-config   # the resolved config, every key
    ray job submit -- python -m md4_dist.train configs/owt_large.json

Attaches to a Ray cluster when run inside `ray job submit` or with RAY_ADDRESS set; otherwise
starts a local Ray instance (the embedded default). Run again with the same run directory and
config, it resumes from the latest checkpoint (storage keys aside: secrets, written nowhere, so a
rotated key resumes too; train.steps included: the LR schedule spans it); while a run lives,
another on its run directory is refused (trainer/run_lock.py). Everything that can be checked
before a worker starts is checked here: the config, the global batch against every allowed world
size, the dataset's manifest against the model.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import replace

from tqdm import tqdm

from md4_dist.config import Config, ConfigError, config_from_dict, load_config, save_config
from md4_dist.data.manifest import ManifestError, load as load_manifest
from md4_dist.data.reader import describe_exclusion, excluded_shards
from md4_dist.data.storage import StorageError, join, list_dir, read_bytes
from md4_dist.strict_config import key_table, redacted, secrets_of, to_dict
from md4_dist.trainer.ds_config import (accumulation_steps, check_gradient_precision,
                                        check_with_deepspeed, why_steps_are_fixed)
from md4_dist.trainer.run_lock import RunLocked, take as take_run_lock


# Config keys a resumed run may change: they leave the trained numbers as they were.
MAY_CHANGE = ("cluster.", "logging.profile_steps", "logging.profile_all_ranks", "logging.wandb.")


def absolute(url: str) -> str:
    """Local paths made absolute: Ray workers run in directories of their own."""
    return url if "://" in url else os.path.abspath(url)


def prepare(cfg: Config) -> Config:
    """Fail before any worker starts; make the synthetic corpus if the config asks for it.
    Returns the config the workers get (local paths absolute), also saved to the run directory."""
    if not cfg.data.manifest:
        raise ConfigError("config key 'data.manifest' is empty: name a dataset (see data_tools)")
    cfg = replace(cfg, data=replace(cfg.data, manifest=absolute(cfg.data.manifest)),
                  train=replace(cfg.train, run_dir=absolute(cfg.train.run_dir)))
    for world in cfg.cluster.world_sizes:
        try:
            accumulation_steps(cfg, world)
        except ValueError as e:
            raise ConfigError(f"config key 'train.global_batch': {e}") from None
        try:
            check_gradient_precision(cfg, world)
        except ValueError as e:
            raise ConfigError(f"config key 'deepspeed.zero_stage': {e}") from None
    try:
        check_with_deepspeed(cfg, min(cfg.cluster.world_sizes))
    except ValueError as e:
        raise ConfigError(f"config key 'deepspeed.extra': {e}") from None
    try:
        manifest = load_manifest(cfg.data.manifest, cfg.storage)
    except ManifestError:
        if cfg.data.synthetic is None:
            raise
        from md4_dist.data.synthetic import describe, write_synthetic_corpus
        s = cfg.data.synthetic
        print(f"making the synthetic corpus at {cfg.data.manifest}", flush=True)
        with tqdm(total=s.num_sequences, unit="seq", desc="markov") as bar:
            written = write_synthetic_corpus(
                cfg.data.manifest, vocab_size=cfg.model.vocab_size, seq_len=cfg.data.seq_len,
                num_sequences=s.num_sequences, seed=s.seed, val_fraction=s.val_fraction, overwrite=True,
                progress=bar.update)
        print(describe(written), flush=True)
        manifest = load_manifest(cfg.data.manifest, cfg.storage)
    manifest.check_compatible(cfg.model.vocab_size, cfg.data.seq_len)
    # every shard's size against the manifest; on_corrupt "raise": a ManifestError naming them
    excluded = excluded_shards(manifest, cfg.data.on_corrupt, cfg.storage)
    if excluded:
        print(f"warning: {describe_exclusion(manifest, excluded)}", flush=True)
    if cfg.eval.every and not getattr(manifest.splits.get("val"), "sequences", 0):
        raise ConfigError(f"config key 'eval.every' = {cfg.eval.every} needs a 'val' split, and "
                          f"{manifest.url} has none: set eval.every=0 or re-shard with a val fraction")
    saved = join(cfg.train.run_dir, "config.json")
    if "config.json" in list_dir(cfg.train.run_dir, cfg.storage):
        # The same command again resumes the run from its latest checkpoint; another config
        # would silently turn it into a different run.
        now = json.loads(json.dumps(to_dict(cfg)))  # tuples as JSON lists, as saved
        # read through the config tree, so that keys added since the run began take their defaults
        try:
            was = config_from_dict(json.loads(read_bytes(saved, cfg.storage)))
        except ConfigError as e:
            raise ConfigError(f"{saved}: {e}") from None
        # without its secrets (storage keys): a rotated key resumes the run
        before = to_dict(was)
        # The cluster may change between attempts (the checkpoint is resharded), and what the run
        # shows beside its records (a profile, W&B); nothing else may.
        differ = [k for k in _differences(before, now) if not k.startswith(MAY_CHANGE)]
        if "train.steps" in differ:
            old, new = before["train"]["steps"], now["train"]["steps"]
            others = [k for k in differ if k != "train.steps"]
            raise ConfigError(
                f"config key 'train.steps': {cfg.train.run_dir} holds a run of train.steps = {old}, "
                f"and this command asks for {new}; the run cannot be "
                f"{'extended' if new > old else 'shortened'} in place: {why_steps_are_fixed(cfg)}. "
                f"To train for {new} steps, start a new run in another train.run_dir; to resume "
                f"this one, run it with train.steps = {old}"
                + (f" (also differing: {', '.join(others[:8])})" if others else ""))
        if differ:
            raise ConfigError(f"config key 'train.run_dir': {cfg.train.run_dir} holds a run with "
                              f"another config (differing: {', '.join(differ[:8])}); run it again "
                              "with the same config to resume it, or choose another run directory")
        print(f"resuming the run in {cfg.train.run_dir}", flush=True)
        if secrets_of(was) != secrets_of(Config()):
            print(f"rewriting {saved} without the storage keys that an earlier version wrote into "
                  "it (its checkpoints' state.json files still hold them)", flush=True)
            save_config(cfg, saved)
        elif before.get("cluster") != now["cluster"]:
            save_config(cfg, saved)  # the resolved config of the attempt that runs now
    else:
        save_config(cfg, saved)
    return cfg


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            keys.append(f"{prefix}{k}")
    return keys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m md4_dist.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="JSON config (local path or fsspec URL)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set optim.lr=1e-4 (repeatable; "
                         "--print-config lists the keys)")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config (--set applied, secrets redacted) and every "
                         "key --set accepts with its type and default, then exit (Ray not started)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.print_config:
            print(json.dumps(redacted(cfg), indent=2))
            print(f"\nkeys that --set accepts:\n{key_table(Config)}", flush=True)
            return 0
        # One run at a time per run directory, taken before anything is written there.
        lock = take_run_lock(absolute(cfg.train.run_dir), cfg.storage)
    except (ConfigError, StorageError, RunLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with lock:  # renewed while the run lives; released at exit, a SIGTERM's included
        try:
            cfg = prepare(cfg)
        except (ConfigError, ManifestError, StorageError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not os.environ.get("RAY_ADDRESS"):
            # The embedded instance's token authentication, on by default as `ray.init(address=
            # "local")` would set it; here, before Ray is imported, which reads its settings once.
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        from md4_dist.trainer.fatal import UncurableError
        from md4_dist.trainer.ray_job import fit  # Ray starts the job there (trainer/ray_job.py)

        try:
            step = fit(cfg)
        except (ConfigError, UncurableError) as e:  # the cluster cannot hold the workers; a damaged
            # shard; a NaN loss
            print(f"error: {e}", file=sys.stderr)
            return 2
    # Stopped early (SIGTERM): not a success for a scheduler, which may run the command again.
    return 0 if step == cfg.train.steps else 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
