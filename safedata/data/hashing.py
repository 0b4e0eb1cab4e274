"""The one hasher of inputs and records: a file's bytes, a dataset directory's files, a Hub dataset's rows;
a record's content id."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .sources import is_hub, iter_records


def file_sha256(path) -> str:
    """The sha256 of a file's bytes; of a save_to_disk directory's file names and bytes; of a Hub dataset's rows."""
    digest = hashlib.sha256()
    if is_hub(path):  # the rows (canonical JSON, in order): the remote files are not at hand
        for _, row in iter_records(path):
            digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
            digest.update(b"\n")
        return digest.hexdigest()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():  # a save_to_disk directory: every file's name and bytes
            digest.update(str(file.relative_to(path)).encode("utf-8") + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def record_id(record: dict) -> str:
    """Content hash: the same record gets the same id in every file and stage."""
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
