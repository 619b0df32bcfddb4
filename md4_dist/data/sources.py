"""Documents from text corpora: local paths, globs or any fsspec URL.

    urls = expand(["data/owt/*.parquet", "s3://bucket/extra.jsonl.zst"])
    for text in all_documents(urls, text_field="text"):
        ...

  .txt                            one document per file (UTF-8)
  .jsonl, .jsonl.gz, .jsonl.zst   one document per line, the text under --text-field
  .parquet                        one document per row, the text column --text-field
                                  (the OpenWebText release is parquet)

Errors name the file (and line or row): a missing field, a non-string value, bad UTF-8.
"""

from __future__ import annotations

import io
import json
from typing import Iterator

from md4_dist.data.storage import explain, filesystem, open_url

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


def expand(inputs: list[str]) -> list[str]:
    """Resolve paths and globs (local or remote) into a sorted, de-duplicated list of file URLs."""
    urls: list[str] = []
    for pattern in inputs:
        try:
            fs, path = filesystem(pattern)
            matches = sorted(fs.glob(path)) if any(c in pattern for c in "*?[") else (
                [path] if fs.exists(path) else [])
        except Exception as e:  # noqa: BLE001 - re-raised with the URL named
            raise explain(pattern, e) from e
        if not matches:
            raise FileNotFoundError(f"input {pattern} matches no file")
        proto = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        for m in matches:
            url = m if (not proto or m.startswith(proto)) else proto + m
            if not url.endswith(SUFFIXES):
                raise ValueError(f"input {url}: unsupported file type; use one of {', '.join(SUFFIXES)}")
            if url not in urls:
                urls.append(url)
    return urls


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
    return value


def documents(url: str, text_field: str = "text") -> Iterator[str]:
    """The documents of one file, in order."""
    if url.endswith(".txt"):
        with open_url(url, "rb") as f:
            yield f.read().decode("utf-8")  # bad UTF-8: all_documents names the file
    elif ".jsonl" in url:
        compression = "gzip" if url.endswith(".gz") else "zstd" if url.endswith(".zst") else None
        with open_url(url, "rb") as raw:
            stream = raw
            if compression:
                from fsspec.compression import compr
                stream = compr[compression](raw, mode="rb")
            for lineno, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8", errors="strict"), 1):
                if not line.strip():
                    continue
                where = f"{url} line {lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not JSON ({e})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(f"{where}: no field {text_field!r} (use --text-field)")
                yield _text(record[text_field], where, text_field)
    elif url.endswith(".parquet"):
        import pyarrow.parquet as pq

        with open_url(url, "rb") as f:
            pf = pq.ParquetFile(f)
            if text_field not in pf.schema_arrow.names:
                raise ValueError(f"{url}: no column {text_field!r}; it has {pf.schema_arrow.names} "
                                 "(use --text-field)")
            row = 0
            for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    yield _text(value, f"{url} row {row}", text_field)
                    row += 1
    else:
        raise ValueError(f"input {url}: unsupported file type; use one of {', '.join(SUFFIXES)}")


def all_documents(urls: list[str], text_field: str = "text") -> Iterator[str]:
    for url in urls:
        try:
            yield from documents(url, text_field)
        except UnicodeDecodeError as e:
            raise ValueError(f"{url} is not UTF-8 text ({e.reason} at byte {e.start})") from None
