"""What of the project travels with a Ray job: its runtime_env working_dir, less what is excluded.

    runtime_env = {"working_dir": str(ROOT), "excludes": EXCLUDES + large_files()}
    config_in_project("configs/tiny.json")   # -> "configs/tiny.json", as the job names it

Ray also leaves out what .gitignore names; these excludes hold without one.
"""

import os
from fnmatch import fnmatch
from pathlib import Path

from md4_dist.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# Anchored with "/" where the name also occurs inside the package (md4_dist/data/ must travel).
EXCLUDES = ["/.git", "/.venv", "/.build", "/data", "/runs", "__pycache__", "*.egg-info"]
LARGE = 10 * 2**20  # bytes: bigger files stay behind too (checkpoints, shards, corpora)


def excluded(rel: Path) -> bool:
    """Whether EXCLUDES leaves `rel` (relative to the project root) out of the upload."""
    return any(fnmatch(part, pattern.lstrip("/")) for pattern in EXCLUDES
               for part in (rel.parts[:1] if pattern.startswith("/") else rel.parts))


def large_files() -> list[str]:
    """Files over LARGE that EXCLUDES misses, as excludes anchored at the project root."""
    found = []
    for d, dirs, files in os.walk(ROOT):
        rel = Path(d).relative_to(ROOT)
        dirs[:] = [x for x in dirs if not excluded(rel / x)]
        found += [f"/{rel / f}" for f in files if os.lstat(os.path.join(d, f)).st_size > LARGE]
    return found


def config_in_project(config: str) -> str:
    """The config as the job names it: a URL as is, a local file relative to the project root."""
    if not (ROOT / "pyproject.toml").is_file():  # an installed copy: no project to upload
        raise ConfigError(f"{ROOT} is not a checkout of md4_dist: install it with `pip install -e .`")
    if "://" in config:
        return config
    path = Path(config).resolve()
    if not path.is_relative_to(ROOT) or excluded(path.relative_to(ROOT)):
        raise ConfigError(f"config {config} does not travel with the project ({ROOT} without "
                          f"{' '.join(EXCLUDES)}): put it under configs/ or use an s3:// URL")
    return str(path.relative_to(ROOT))
