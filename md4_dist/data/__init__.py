"""Token datasets: the manifest format, object storage access and the resumable streaming reader."""

from md4_dist.data.manifest import Manifest, ManifestError, load as load_manifest
from md4_dist.data.reader import CorruptShardError, DataConfig, TokenStream, make_loader

__all__ = ["Manifest", "ManifestError", "load_manifest", "CorruptShardError", "DataConfig",
           "TokenStream", "make_loader"]
