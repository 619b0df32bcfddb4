"""The sample ledger: which sequences every rank trained at every step, and its audit.

    ledger = SampleLedger(run_dir, storage, rank, world, attempt)   # data.record_sample_ids
    ledger.write(step, ids); ledger.upload()                        # per step; before a checkpoint
    ledger_problems(read_ledger(run_dir), manifest, global_batch, seed, steps)   # [] when exactly once
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection

from md4_dist.data.storage import StorageConfig, join, list_dir, read_bytes
from md4_dist.trainer.metrics import StagedFiles


class SampleLedger:
    """samples/rank-<r>.jsonl: {"step", "attempt", "rank", "world_size", "ids"} per step. A step
    trained again after a restart is written again under a later attempt; the effective ledger
    takes, for each step, the entries of the latest attempt that wrote it."""

    def __init__(self, run_dir: str, storage: StorageConfig | None, rank: int, world: int, attempt: int):
        name = f"samples/rank-{rank:05d}.jsonl"
        self.files = StagedFiles(run_dir, storage, fetch=(name,))
        self.path, self.rank, self.world, self.attempt = self.files.path(name), rank, world, attempt

    def write(self, step: int, ids: list[int]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "attempt": self.attempt, "rank": self.rank,
                                "world_size": self.world, "ids": ids}) + "\n")

    def upload(self) -> None:
        self.files.upload()


def effective_ledger(lines: list[dict]) -> dict[int, list[int]]:
    """{step: ids trained at it} from all ranks' ledger entries: the latest attempt wins."""
    latest: dict[int, int] = {}
    for e in lines:
        latest[e["step"]] = max(latest.get(e["step"], e["attempt"]), e["attempt"])
    steps: dict[int, list[int]] = {}
    for e in lines:
        if e["attempt"] == latest[e["step"]]:
            steps.setdefault(e["step"], []).extend(e["ids"])
    return steps


def read_ledger(run_dir: str, storage: StorageConfig | None = None) -> list[dict]:
    """Every rank's ledger entries under run_dir/samples (local or object storage)."""
    folder = join(run_dir, "samples")
    lines = []
    for name in sorted(list_dir(folder, storage)):
        for i, line in enumerate(read_bytes(join(folder, name), storage).decode().splitlines(), 1):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{join(folder, name)}, line {i}: not a ledger entry ({e})") from None
    return lines


def ledger_problems(lines: list[dict], manifest, global_batch: int, seed: int, steps: int,
                    exclude: Collection[str] = (), run_length: int = 1) -> list[str]:
    """What keeps the effective ledger from being the stream's own order, trained exactly once:
    steps 1..steps, each with the sequences a 1-rank stream of `global_batch` gives it (the order
    every world size reads; without the `exclude`d train shards, as the run left them out under
    data.on_corrupt = "skip"; in runs of `run_length`, data.run_length). [] when there is nothing."""
    from md4_dist.data import TokenStream

    effective = effective_ledger(lines)
    if sorted(effective) != list(range(1, steps + 1)):
        missing = sorted(set(range(1, steps + 1)) - set(effective))
        extra = sorted(set(effective) - set(range(1, steps + 1)))
        return [f"the ledger's steps are not 1..{steps}: missing {missing[:10]}, extra {extra[:10]}"]
    stream = TokenStream(manifest, "train", global_batch, seed=seed, exclude=exclude, run_length=run_length,
                         lanes=global_batch)
    problems = []
    for step, batch in zip(range(1, steps + 1), stream):
        got, want = Counter(effective[step]), Counter(batch["ids"].tolist())
        if got != want:
            missing, extra = want - got, got - want
            problems.append(f"step {step}: {missing.total()} of the stream's sequences missing "
                            f"{sorted(missing)[:5]}, {extra.total()} others or repeats trained "
                            f"{sorted(extra)[:5]}")
    return problems
