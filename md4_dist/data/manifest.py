"""The dataset manifest: what a directory of token shards holds. Written last, so no manifest
means no dataset (an interrupted write is never read as a complete one).

    {"format_version": 1, "vocab_size": V, "eos_id": 2 | null, "seq_len": L, "dtype": "uint16",
     "tokenizer": {"url": ..., "sha256": ..., "kind": "sentencepiece" | "hf_tokenizer_json"} | null,
     "entropy_bits_per_token": H | null,
     "splits": {"train": {"shards": [{"name": "train-000000.tar", "sequences": n, "bytes": b}],
                          "sequences": N, "tokens": T, "source_bytes": S | null}, "val": ...},
     "created_by": {...}}

Each shard is a WebDataset tar; sample i of a shard has the key "<split>-<global id:09d>" and one
member "<key>.tokens.npy" holding a numpy array [L] of `dtype`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np

from md4_dist.data.storage import (StorageConfig, StorageError, explain, filesystem, join, read_bytes,
                                   write_bytes)

MANIFEST_FORMAT_VERSION = 1  # manifest.json's; a format of its own, apart from checkpoints and exports
MANIFEST_NAME = "manifest.json"
TOKENS_EXT = "tokens.npy"


class ManifestError(ValueError):
    """A manifest is missing, malformed, or disagrees with what reads it; names the URL."""


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


@dataclass
class Shard:
    name: str
    sequences: int
    bytes: int


@dataclass
class Split:
    shards: list[Shard]
    sequences: int
    tokens: int
    source_bytes: int | None = None  # UTF-8 bytes of the source text, for bits per byte

    def shard_starts(self) -> np.ndarray:
        """Global id of each shard's first sequence: [num_shards]."""
        counts = np.array([s.sequences for s in self.shards], dtype=np.int64)
        return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


@dataclass
class Manifest:
    vocab_size: int
    seq_len: int
    dtype: str
    splits: dict[str, Split]
    eos_id: int | None = None
    tokenizer: dict | None = None  # {"url", "sha256", "kind"} (md4_dist.tokenizer; no "kind" before it)
    entropy_bits_per_token: float | None = None  # exact, for synthetic corpora
    created_by: dict = field(default_factory=dict)
    format_version: int = MANIFEST_FORMAT_VERSION
    # Filled in by `load`: where it was read from and the sha256 of its bytes.
    url: str = field(default="", compare=False)
    sha256: str = field(default="", compare=False)

    def to_json(self) -> bytes:
        data = asdict(self)
        del data["url"], data["sha256"]
        return (json.dumps(data, indent=1) + "\n").encode()

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise ManifestError(f"{self.url}: no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def shard_url(self, name: str) -> str:
        return join(self.url.rsplit("/", 1)[0], name)

    def check_compatible(self, vocab_size: int, seq_len: int) -> None:
        """Raise if the model config disagrees with this dataset."""
        if vocab_size != self.vocab_size:
            raise ManifestError(f"{self.url}: vocab_size {self.vocab_size} disagrees with the model's "
                                f"model.vocab_size = {vocab_size}")
        if seq_len != self.seq_len:
            raise ManifestError(f"{self.url}: seq_len {self.seq_len} disagrees with the config's "
                                f"data.seq_len = {seq_len}")


def manifest_url(url: str) -> str:
    """Accept a dataset directory or its manifest.json."""
    return url if url.endswith(".json") else join(url, MANIFEST_NAME)


def load(url: str, storage: StorageConfig | None = None) -> Manifest:
    url = manifest_url(url)
    try:
        raw = read_bytes(url, storage)
    except StorageError as e:
        # The hint only where it is true: the storage answered, and the manifest is not there.
        missing = isinstance(e.__cause__, (FileNotFoundError, NotADirectoryError))
        hint = " (an interrupted or unfinished write leaves no manifest)" if missing else ""
        raise ManifestError(f"cannot read the dataset manifest: {e}{hint}") from None
    try:
        data = json.loads(raw)
        if data.get("format_version") != MANIFEST_FORMAT_VERSION:
            raise ManifestError(f"{url}: format_version {data.get('format_version')!r} is not the "
                                f"supported {MANIFEST_FORMAT_VERSION}")
        splits = {k: Split(shards=[Shard(**s) for s in v.pop("shards")], **v)
                  for k, v in data.pop("splits").items()}
        m = Manifest(splits=splits, **data)
    except ManifestError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ManifestError(f"{url} is not a valid manifest: {type(e).__name__}: {e}") from None
    if m.dtype not in ("uint16", "uint32") or m.dtype != token_dtype(m.vocab_size) and m.dtype != "uint32":
        raise ManifestError(f"{url}: dtype {m.dtype!r} cannot hold vocab_size {m.vocab_size}")
    for name, split in m.splits.items():
        if sum(s.sequences for s in split.shards) != split.sequences:
            raise ManifestError(f"{url}: split {name!r} shard counts do not add up to {split.sequences}")
    m.url, m.sha256 = url, hashlib.sha256(raw).hexdigest()
    return m


@dataclass(frozen=True)
class ShardProblem:
    """A shard whose file disagrees with the manifest: missing, or of another size."""

    split: str
    name: str
    url: str
    why: str  # e.g. "missing", "1536 bytes, the manifest says 20480"

    def __str__(self) -> str:
        return f"{self.url}: {self.why}"


def check_shards(m: Manifest, storage: StorageConfig | None = None) -> list[ShardProblem]:
    """Every shard of every split against the manifest: present, and of the size it records.

    One listing per directory (fsspec `ls(detail=True)`), not one request per shard, so it is
    cheap enough to run before every (re)start. It catches what truncation or a lost upload
    does; a shard of the right size with damaged bytes is found only when it is read.
    """
    by_dir: dict[str, list[tuple[str, Shard]]] = {}
    for split_name, split in m.splits.items():
        for shard in split.shards:
            by_dir.setdefault(m.shard_url(shard.name).rsplit("/", 1)[0], []).append((split_name, shard))
    problems = []
    for folder, shards in by_dir.items():
        try:
            fs, path = filesystem(folder, storage)
            sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"]
                     for e in fs.ls(path, detail=True, refresh=True)}
        except FileNotFoundError:
            sizes = {}  # the directory is gone: every shard in it is missing
        except Exception as e:  # noqa: BLE001 - re-raised with the URL named
            raise explain(folder, e) from e
        for split_name, shard in shards:
            url, base = m.shard_url(shard.name), shard.name.rsplit("/", 1)[-1]
            if base not in sizes:
                problems.append(ShardProblem(split_name, shard.name, url, "missing"))
            elif sizes[base] != shard.bytes:
                problems.append(ShardProblem(split_name, shard.name, url, f"{sizes[base]} bytes, the "
                                             f"manifest says {shard.bytes}"))
    return problems


def save(m: Manifest, out_dir: str, storage: StorageConfig | None = None) -> str:
    url = join(out_dir, MANIFEST_NAME)
    write_bytes(url, m.to_json(), storage)
    return url
