"""Subsets of an input written back: `write_records` (records as a JSON array or JSONL, the order given: rank.py's
selections) and `write_subset` (rows of any input in file order and in the input's own type and schema: the
audit's kept and flagged files). Atomic, with the user's umask (safedata.store)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from ..store import atomic_dir, atomic_path, atomic_write_bytes
from .readers import read_raw_records
from .sources import is_dataset_source, kind_of, load_source


def records_text(records: list, suffix: str) -> str:
    """Records as JSONL (one compact line each) for ".jsonl", else as a JSON array (indent 4, as the paper's
    released selections)."""
    if suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return json.dumps(records, indent=4, ensure_ascii=False) + "\n"


def write_records(records: list, target) -> Path:
    """Records in the order given, as the target's suffix says (JSONL or a JSON array); atomic."""
    target = Path(target)
    atomic_write_bytes(target, records_text(records, target.suffix.lower()).encode("utf-8"))
    return target


def subset_suffix(path) -> str:
    """The file suffix (or "" for a directory) a subset of `path` is written with: its own type; a directory for
    a save_to_disk directory; Parquet for a Hub dataset."""
    if not is_dataset_source(path):
        return Path(path).suffix.lower()
    kind = kind_of(path)
    return {"hub": ".parquet", "saved": ""}.get(kind, "." + kind)


def write_subset(path, rows, target_stem) -> Path:
    """Rows `rows` (0-based record indices) of any input, in ascending order, in the input's own type and schema:
    returns `target_stem` + the input's suffix (a directory for save_to_disk input)."""
    target = Path(str(target_stem) + subset_suffix(path))
    wanted = sorted(set(int(r) for r in rows))
    if is_dataset_source(path):
        _write_dataset_subset(path, wanted, target)
    else:
        atomic_write_bytes(target, _text_subset(Path(path), wanted))
    return target


def _write_dataset_subset(path, wanted: list[int], target: Path) -> None:
    kind = kind_of(path)
    if kind == "parquet":
        # Row groups are read one at a time: a file larger than memory is filtered in a stream.
        source = pq.ParquetFile(str(path))
        with atomic_path(target) as tmp, pq.ParquetWriter(str(tmp), source.schema_arrow) as writer:
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
    elif kind == "arrow":
        table = load_source(path, streaming=False).select(wanted).flatten_indices().data.table
        with atomic_path(target) as tmp, pa.OSFile(str(tmp), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    elif kind == "saved":
        dataset = load_source(path, streaming=False).select(wanted)
        with atomic_dir(target) as tmp:
            dataset.save_to_disk(str(tmp))
    elif kind == "hub":
        dataset = load_source(path, streaming=False).select(wanted)
        with atomic_path(target) as tmp:
            dataset.to_parquet(str(tmp))
    else:  # pragma: no cover - guarded by is_dataset_source
        raise UserError(f"{path}: not a datasets-library source")


def _jsonl_subset(data: bytes, line_numbers) -> bytes:
    """Lines of a JSONL file's bytes (1-based, as readers.jsonl_lines counts them), each with its own line ending:
    a CRLF file's subset is CRLF, and U+2028 inside a string stays inside its line. A last line without an
    ending gets the first line's."""
    lines = data.split(b"\n")
    newline = b"\r\n" if lines[0].endswith(b"\r") else b"\n"
    return b"".join(lines[n - 1] + (b"\n" if n < len(lines) else newline) for n in line_numbers)


def _text_subset(path: Path, wanted: list[int]) -> bytes:
    """JSONL: the records' own lines, byte for byte. JSON arrays: the records re-serialised (records_text).
    CSV: the header and the rows, re-quoted by the csv module."""
    raw = read_raw_records(path)
    chosen = [raw[i] for i in wanted]
    data = path.read_bytes()
    text = data.decode("utf-8-sig")  # decoded as the reader decodes it (it accepted it): no newline translation
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and not text.lstrip().startswith("[")):
        return _jsonl_subset(data, [line for line, _ in chosen])
    if suffix == ".json":
        return records_text([record for _, record in chosen], ".json").encode("utf-8")
    buffer = io.StringIO()
    header = list(raw[0][1]) if raw else []
    one_column_prompts = header == ["prompt"] and not text.lstrip().startswith("prompt")
    writer = csv.writer(buffer, lineterminator="\n")
    if not one_column_prompts:
        writer.writerow(header)
    for _, record in chosen:
        writer.writerow([record[h] for h in header])
    return buffer.getvalue().encode("utf-8")
