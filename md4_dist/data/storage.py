"""Object storage through fsspec: local paths, s3:// (s3fs), gs:// (gcsfs), with bounded waits.

S3 credentials, region and endpoint come from the standard AWS variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)
or from a `StorageConfig`, which wins where set. Every network wait is bounded: connect and read
timeouts and two tries in all, so an unreachable endpoint or missing credentials fail in under
30 s with an error that names the URL.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import fsspec

from md4_dist.strict_config import secret_field

CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 6  # per socket read; botocore makes up to three tries: about 20 s in all
S3FS_RETRIES = 1  # s3fs tries per call (its loops nest); botocore retries within each


class StorageError(OSError):
    """A storage operation failed; the message names the URL."""


@dataclass
class StorageConfig:
    endpoint_url: str = ""  # e.g. https://s3.us-east-1.amazonaws.com, or a MinIO / moto server
    region: str = ""
    # Prefer the AWS environment variables or instance roles for keys; these exist for endpoints
    # (MinIO, tests) where a per-run key pair is the norm. Secrets: never written into the run
    # (its config.json, checkpoints, Ray's records) nor part of its identity, so a rotated key
    # resumes the run; the workers get them from the driver (trainer/config_secrets.py).
    key: str = secret_field()
    secret: str = secret_field()
    anon: bool = False  # unsigned requests, for public buckets


def protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def storage_options(url: str, cfg: StorageConfig | None = None) -> dict:
    """fsspec keyword arguments for `url`; raises StorageError when S3 has no credentials."""
    cfg = cfg or StorageConfig()
    proto = protocol(url)
    if proto in ("s3", "s3a"):
        endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        client_kwargs = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if region:
            client_kwargs["region_name"] = region
        opts = {
            "client_kwargs": client_kwargs,
            "config_kwargs": {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S,
                              "retries": {"max_attempts": 2, "mode": "standard"}},
        }
        if cfg.anon:
            opts["anon"] = True
        elif cfg.key:
            opts.update(key=cfg.key, secret=cfg.secret)
        elif not _have_aws_credentials():
            raise StorageError(f"no S3 credentials for {url}: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, an instance role, or the "
                               "storage section's key / secret; storage.anon for public buckets)")
        return opts
    if proto in ("gs", "gcs"):
        return {"timeout": READ_TIMEOUT_S}
    return {}


@functools.lru_cache(maxsize=None)
def _credentials_for(env_key: tuple) -> bool:
    import botocore.session

    return botocore.session.get_session().get_credentials() is not None


def _have_aws_credentials() -> bool:
    """Whether botocore's standard chain finds credentials (cached per relevant environment)."""
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    return _credentials_for(tuple(os.environ.get(k) for k in keys))


def filesystem(url: str, cfg: StorageConfig | None = None):
    """(fs, path) for url."""
    opts = storage_options(url, cfg)
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts)
    except ImportError as e:
        raise StorageError(f"no filesystem for {url}: {e} (gs:// needs `pip install gcsfs`)") from None
    if hasattr(fs, "retries"):  # s3fs: 5 tries by default, each up to the timeouts above
        fs.retries = S3FS_RETRIES
    return fs, path


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def explain(url: str, exc: BaseException) -> StorageError:
    """A StorageError naming url, with the cause in words a user can act on."""
    name = type(exc).__name__
    text = str(exc)
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{url} does not exist")
    if name in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in text.lower():
        return StorageError(f"no usable S3 credentials for {url}: set AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY (or a storage section) ({name}: {text})")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                "ClientConnectorError", "ServerTimeoutError") or "connect" in text.lower():
        return StorageError(f"cannot reach the storage endpoint for {url} ({name}: {text})")
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return StorageError(f"access denied to {url} ({name}: {text})")
    return StorageError(f"{url}: {name}: {text}")


def read_bytes(url: str, cfg: StorageConfig | None = None, missing_ok: bool = False) -> bytes | None:
    """The file's bytes; with missing_ok, None when it does not exist (any other failure is
    still an error that names the URL)."""
    try:
        fs, path = filesystem(url, cfg)
        return fs.cat_file(path)
    except (FileNotFoundError, NotADirectoryError) as e:
        if missing_ok:
            return None
        raise explain(url, e) from e
    except Exception as e:  # noqa: BLE001 - re-raised with the URL named
        raise explain(url, e) from e


def write_bytes(url: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    try:
        fs, path = filesystem(url, cfg)
        if protocol(url) == "file":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fs.pipe_file(path, data)
    except Exception as e:  # noqa: BLE001 - re-raised with the URL named
        raise explain(url, e) from e


def exists(url: str, cfg: StorageConfig | None = None) -> bool:
    try:
        fs, path = filesystem(url, cfg)
        return fs.exists(path)
    except Exception as e:  # noqa: BLE001 - re-raised with the URL named
        raise explain(url, e) from e


def list_dir(url: str, cfg: StorageConfig | None = None) -> list[str]:
    """Names under url; [] when it does not exist."""
    try:
        fs, path = filesystem(url, cfg)
        if not fs.exists(path):
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except Exception as e:  # noqa: BLE001 - re-raised with the URL named
        raise explain(url, e) from e


def open_url(url: str, mode: str = "rb", cfg: StorageConfig | None = None):
    """An open file for url (local parent directories are created for writing)."""
    try:
        fs, path = filesystem(url, cfg)
        if "w" in mode and protocol(url) == "file":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return fs.open(path, mode)
    except Exception as e:  # noqa: BLE001 - re-raised with the URL named
        raise explain(url, e) from e
