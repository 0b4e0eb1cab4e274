"""Data read through the `datasets` library: Parquet and Arrow files, a directory written
by `Dataset.save_to_disk`, and a Hugging Face Hub dataset (`hf:owner/name?config=NAME&split=train`; the only
one that needs the network).

Parquet files and Hub datasets are streamed (row batches, nothing cached on disk); Arrow files and
save_to_disk directories are memory-mapped. Records are plain dicts, numbered from 0 in file order: the
index every stage keeps. Subsets are written back by safedata.data.writers.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs


from ..errors import InputError, UserError


HUB_PREFIX = "hf:"


FILE_SUFFIXES = (".parquet", ".arrow")


# Every input a stage reads records from (readers.py's text files, then this module's), for help texts and errors.
INPUT_TYPES = ".json, .jsonl, .csv, .parquet, .arrow, a save_to_disk directory or hf:owner/name?config=NAME&split=SPLIT"


def is_hub(path) -> bool:
    return str(path).startswith(HUB_PREFIX)


def is_saved_dataset(path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                              or (path / "dataset_dict.json").exists())


def is_dataset_source(path) -> bool:
    """True for the inputs this module reads (the others are readers.py's JSON/JSONL/CSV)."""
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


def load_source(path, streaming: bool):
    """The source as a datasets-library Dataset (streamed: an IterableDataset)."""
    import datasets  # lazy: 2.8 s to import, and only Parquet, Arrow and Hub inputs need it
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
    for number, row in enumerate(load_source(path, streaming=True)):
        if not isinstance(row, dict):  # pragma: no cover - datasets always yields dicts
            raise InputError(path, f"record {number}", None, f"expected a record, found {type(row).__name__}")
        yield f"record {number}", row
