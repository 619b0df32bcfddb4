"""Shared entry-point behaviour of the data tools: expected failures print one clear line."""

from __future__ import annotations

import sys

from md4_dist.data.manifest import ManifestError
from md4_dist.data.storage import StorageError


def run(main) -> int:
    """Call main(); a user error (bad input, storage, existing output) prints `error: ...`, exits 2."""
    try:
        return main()
    except (FileExistsError, FileNotFoundError, StorageError, ManifestError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no manifest was written, so the output is not a dataset", file=sys.stderr)
        return 130
