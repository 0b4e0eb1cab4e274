"""Data read (and written back) through the `datasets` library: Parquet and Arrow files, a directory written
by `Dataset.save_to_disk`, and a Hugging Face Hub dataset (`hf:owner/name?config=NAME&split=train`; the only
one that needs the network).

Parquet files and Hub datasets are streamed (row batches, nothing cached on disk); Arrow files and
save_to_disk directories are memory-mapped. Records are plain dicts, numbered from 0 in file order: the
index every stage keeps. Subsets are written back in the input's own type, rows verbatim (same schema), in
file order: see `write_subset`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import parse_qs

from .errors import InputError, UserError

HUB_PREFIX = "hf:"
FILE_SUFFIXES = (".parquet", ".arrow")
# Every input a stage reads records from (data.py's text files, then this module's), for help texts and errors.
INPUT_TYPES = ".json, .jsonl, .csv, .parquet, .arrow, a save_to_disk directory or hf:owner/name?config=NAME&split=SPLIT"


def is_hub(path) -> bool:
    return str(path).startswith(HUB_PREFIX)


def is_saved_dataset(path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                              or (path / "dataset_dict.json").exists())


def is_dataset_source(path) -> bool:
    """True for the inputs this module reads (the others are data.py's JSON/JSONL/CSV)."""
    return is_hub(path) or Path(path).suffix.lower() in FILE_SUFFIXES or is_saved_dataset(path)


def kind_of(path) -> str:
    if is_hub(path):
        return "hub"
    if is_saved_dataset(path):
        return "saved"
    return Path(path).suffix.lower().lstrip(".")


def parse_hub(spec: str) -> tuple[str, str | None, str]:
    """`hf:owner/name?config=NAME&split=SPLIT` -> (repo id, config or None, split; default train)."""
    body = spec[len(HUB_PREFIX):]
    repo, _, query = body.partition("?")
    options = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = set(options) - {"config", "split"}
    if not repo or unknown:
        raise UserError(f"{spec}: expected hf:owner/name[?config=NAME&split=SPLIT]"
                        + (f" (unknown option {', '.join(sorted(unknown))})" if unknown else ""))
    return repo, options.get("config") or None, options.get("split") or "train"


def _load(path, streaming: bool):
    import datasets
    kind = kind_of(path)
    try:
        if kind == "hub":
            repo, config, split = parse_hub(str(path))
            return datasets.load_dataset(repo, config, split=split, streaming=streaming)
        if not Path(path).exists():
            raise UserError(f"{path}: no such file or directory")
        if kind == "parquet":
            if streaming:
                return datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
            return datasets.Dataset.from_parquet(str(path))
        if kind == "arrow":
            return datasets.Dataset.from_file(str(path))
        loaded = datasets.load_from_disk(str(path))
    except UserError:
        raise
    except Exception as err:  # the library's own message, on one line
        raise UserError(f"{path}: cannot be read as a dataset ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if isinstance(loaded, datasets.DatasetDict):
        raise UserError(f"{path}: a DatasetDict with splits {', '.join(loaded)}; give one split's directory "
                        f"(e.g. {Path(path) / next(iter(loaded))})")
    return loaded


def iter_records(path):
    """(position label, record dict) per row, in order; the label names the row in error messages."""
    for number, row in enumerate(_load(path, streaming=True)):
        if not isinstance(row, dict):  # pragma: no cover - datasets always yields dicts
            raise InputError(path, f"record {number}", None, f"expected a record, found {type(row).__name__}")
        yield f"record {number}", row


def source_sha256(path) -> str:
    """Files: their bytes. save_to_disk directories: every file's name and bytes. Hub datasets: the rows
    (canonical JSON, in order), since the remote files are not at hand."""
    digest = hashlib.sha256()
    if is_hub(path):
        for _, row in iter_records(path):
            digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
            digest.update(b"\n")
        return digest.hexdigest()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode("utf-8") + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- writing subsets


def output_suffix(path) -> str:
    """What a subset of this source is written as: the same file type; a directory for save_to_disk; Parquet
    for a Hub dataset."""
    kind = kind_of(path)
    return {"hub": ".parquet", "saved": ""}.get(kind, "." + kind)


def _atomic_dir(target: Path, write):
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        write(tmp / "data")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / "data", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _atomic_path(target: Path, write):
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_subset(path, rows, target) -> Path:
    """Rows `rows` (0-based indices, written in ascending order) of the source, in its own type and schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    wanted = sorted(set(int(r) for r in rows))
    target = Path(target)
    kind = kind_of(path)
    if kind == "parquet":
        def write(tmp):
            # Row groups are read one at a time: a file larger than memory is filtered in a stream.
            source = pq.ParquetFile(str(path))
            with pq.ParquetWriter(str(tmp), source.schema_arrow) as writer:
                start, at = 0, 0
                for group in range(source.num_row_groups):
                    table = source.read_row_group(group)
                    end = start + table.num_rows
                    take = []
                    while at < len(wanted) and wanted[at] < end:
                        take.append(wanted[at] - start)
                        at += 1
                    writer.write_table(table.take(pa.array(take, type=pa.int64())))
                    start = end
        _atomic_path(target, write)
    elif kind == "arrow":
        dataset = _load(path, streaming=False).select(wanted).flatten_indices()

        def write(tmp):
            table = dataset.data.table
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        _atomic_path(target, write)
    elif kind == "saved":
        dataset = _load(path, streaming=False).select(wanted)
        _atomic_dir(target, lambda tmp: dataset.save_to_disk(str(tmp)))
    elif kind == "hub":
        dataset = _load(path, streaming=False).select(wanted)
        _atomic_path(target, lambda tmp: dataset.to_parquet(str(tmp)))
    else:
        raise UserError(f"{path}: not a datasets-library source")
    return target


def _jsonl_subset(data: bytes, line_numbers) -> bytes:
    """Lines of a JSONL file's bytes (1-based, as data.jsonl_lines counts them), each with its own line ending:
    a CRLF file's subset is CRLF, and U+2028 inside a string stays inside its line. A last line without an
    ending gets the first line's."""
    lines = data.split(b"\n")
    newline = b"\r\n" if lines[0].endswith(b"\r") else b"\n"
    return b"".join(lines[n - 1] + (b"\n" if n < len(lines) else newline) for n in line_numbers)


def _text_subset(path: Path, wanted: list[int]) -> bytes:
    """JSONL: the records' own lines, byte for byte. JSON arrays: the records re-serialised (indent 4, as
    rank.py writes). CSV: the header and the rows, re-quoted by the csv module."""
    import csv
    import io

    from .data import read_raw_records
    from .ranking import _records_text
    raw = read_raw_records(path)
    chosen = [raw[i] for i in wanted]
    data = path.read_bytes()
    text = data.decode("utf-8-sig")  # decoded as data.py reads it (read_records accepted it): no newline translation
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and not text.lstrip().startswith("[")):
        return _jsonl_subset(data, [line for line, _ in chosen])
    if suffix == ".json":
        return _records_text([record for _, record in chosen], ".json").encode("utf-8")
    buffer = io.StringIO()
    header = list(raw[0][1]) if raw else []
    one_column_prompts = header == ["prompt"] and not text.lstrip().startswith("prompt")
    writer = csv.writer(buffer, lineterminator="\n")
    if not one_column_prompts:
        writer.writerow(header)
    for _, record in chosen:
        writer.writerow([record[h] for h in header])
    return buffer.getvalue().encode("utf-8")


def subset_suffix(path) -> str:
    """The file suffix (or "" for a directory) a subset of `path` is written with."""
    return output_suffix(path) if is_dataset_source(path) else Path(path).suffix.lower()


def write_subset_like(path, rows, target_stem) -> Path:
    """Rows `rows` (0-based record indices) of any input, in ascending order, in the input's own type:
    returns `target_stem` + the input's suffix (a directory for save_to_disk input)."""
    from .store import atomic_write_bytes
    target = Path(str(target_stem) + subset_suffix(path))
    wanted = sorted(set(int(r) for r in rows))
    if is_dataset_source(path):
        return write_subset(path, wanted, target)
    atomic_write_bytes(target, _text_subset(Path(path), wanted))
    return target
