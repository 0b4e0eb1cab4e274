"""Records of text files (a JSON array, JSONL, CSV) and of datasets-library sources, each with the line (or
record label) that error messages name. The one JSONL reader: `jsonl_lines` / `read_jsonl`."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import InputError, UserError
from .kinds import KIND_FIELDS
from .sources import INPUT_TYPES, is_dataset_source, iter_records


KNOWN_CSV_HEADERS = {("goal", "target"), ("goal",), ("prompt",)}


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(path, line, None, f"not valid UTF-8 (byte {err.start})") from None


def _json_array_records(path: Path, text: str):
    """Yield (line, value) for each element of a top-level JSON array, tracking lines."""
    decoder = json.JSONDecoder()
    line, counted_to = 1, 0

    def line_at(position):  # lines are counted incrementally: the file is read once
        nonlocal line, counted_to
        line += text.count("\n", counted_to, position)
        counted_to = position
        return line

    pos = len(text) - len(text.lstrip())
    if pos >= len(text):
        raise InputError(path, 1, None, "empty file")
    if text[pos] != "[":
        raise InputError(path, line_at(pos), None, "a .json file must hold a JSON array of records")
    pos += 1
    expect_value = True
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            raise InputError(path, line_at(pos), None, "unterminated JSON array")
        if text[pos] == "]":
            if text[pos + 1:].strip():
                raise InputError(path, line_at(pos), None, "extra data after the JSON array")
            return
        if not expect_value:
            if text[pos] != ",":
                raise InputError(path, line_at(pos), None, "expected ',' or ']' between records")
            pos += 1
            expect_value = True
            continue
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise InputError(path, err.lineno, None, f"malformed JSON: {err.msg}") from None
        yield line_at(pos), value
        pos = end
        expect_value = False


def jsonl_lines(text: str) -> list[str]:
    """A JSONL text's lines: split at "\n" alone (a "\r" before it dropped), so line numbers count "\n" as
    everywhere else. Not str.splitlines: it also splits at U+2028, U+2029 and U+0085, which a JSON string may
    hold raw (json.dumps(..., ensure_ascii=False) writes them so)."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def read_jsonl(path) -> list[tuple[int, object]]:
    """(line, value) for every non-blank line of a JSONL file (one-line errors naming the line: bad UTF-8,
    malformed JSON)."""
    path = Path(path)
    return list(_jsonl_records(path, _read_text(path)))


def _jsonl_records(path: Path, text: str):
    for line_number, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(path, line_number, None, f"malformed JSON: {err.msg}") from None


def _csv_records(path: Path, text: str):
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = []
    for row in reader:
        rows.append((reader.line_num, row))
    rows = [(n, r) for n, r in rows if any(cell.strip() for cell in r)]
    if not rows:
        return
    first_line, first = rows[0]
    header = tuple(cell.strip() for cell in first)
    known_kind_header = any(set(header) >= set(req) for req, _ in KIND_FIELDS.values())
    if header in KNOWN_CSV_HEADERS or known_kind_header:
        for line_number, row in rows[1:]:
            if len(row) != len(header):
                raise InputError(path, line_number, None, f"expected {len(header)} columns ({','.join(header)}), found {len(row)}")
            yield line_number, dict(zip(header, row))
    elif len(first) == 1:
        # One column and no known header: every row is a prompt (the paper's AdvBench file).
        for line_number, row in rows:
            if len(row) != 1:
                raise InputError(path, line_number, None, f"expected 1 column, found {len(row)}")
            yield line_number, {"prompt": row[0]}
    else:
        raise InputError(path, first_line, None, f"unexpected CSV header {','.join(header)!r}; "
                         "expected goal,target / prompt / the fields of a known record kind")


def read_raw_records(path) -> list[tuple[int, object]]:
    """(line, raw value) for every record of a .json, .jsonl or .csv file, or (record label, record) for a
    datasets-library source (Parquet, Arrow, a save_to_disk directory, hf:owner/name)."""
    return read_records(path)[0]


def read_records(path) -> tuple[list[tuple[int, object]], bool]:
    """(records as in read_raw_records, whether the file is one JSON array)."""
    if is_dataset_source(path):
        return list(iter_records(path)), False
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a data file (.json, .jsonl or .csv)")
    if not path.exists():
        raise UserError(f"{path}: no such file")
    text = _read_text(path)
    if not text.strip():
        raise InputError(path, 1, None, "empty file")
    suffix = path.suffix.lower()
    is_array = suffix == ".json" and text.lstrip().startswith("[")
    if suffix == ".json":
        records = _json_array_records(path, text) if is_array else _jsonl_records(path, text)
    elif suffix == ".jsonl":
        records = _jsonl_records(path, text)
    elif suffix == ".csv":
        records = _csv_records(path, text)
    else:
        raise UserError(f"{path}: unsupported file type {suffix!r} (use {INPUT_TYPES})")
    return list(records), is_array
