"""Token datasets: the manifest format, object storage access and the resumable streaming reader;
writing them: text documents (sources), packed into rows (packing) and shards (sharding,
shard_writer), and the synthetic corpus (synthetic).

Names are imported on first use, so a module that needs only the manifest and storage modules
starts without importing torch.
"""

import importlib

_NAMES = {
    "Manifest": "md4_dist.data.manifest", "ManifestError": "md4_dist.data.manifest",
    "load_manifest": ("md4_dist.data.manifest", "load"),
    "CorruptShardError": "md4_dist.data.reader", "DataConfig": "md4_dist.data.reader",
    "TokenStream": "md4_dist.data.reader", "make_loader": "md4_dist.data.reader",
}
__all__ = list(_NAMES)


def __getattr__(name):
    if name not in _NAMES:
        raise AttributeError(f"module 'md4_dist.data' has no attribute {name!r}")
    module, attr = _NAMES[name] if isinstance(_NAMES[name], tuple) else (_NAMES[name], name)
    return getattr(importlib.import_module(module), attr)
