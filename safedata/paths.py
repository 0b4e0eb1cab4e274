"""Flag values that name files and folders, checked before anything is loaded (one-line errors)."""
from __future__ import annotations

from pathlib import Path

from .data.sources import is_hub, is_saved_dataset
from .errors import UserError


def input_file(path, flag: str) -> Path:
    """An existing regular file, else a one-line error naming the flag."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory, not a file")
    if not path.exists():
        raise UserError(f"{flag} {path}: no such file")
    return path


def output_dir(path, flag: str = "--output_dir") -> Path:
    """A folder to write into: absent (it will be created) or a directory, never an existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a directory")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
    return path


def input_data(path, flag: str = "--data_path"):
    """A data file, or a datasets-library source: a save_to_disk directory or hf:owner/name (safedata.data.sources)."""
    if is_hub(path) or is_saved_dataset(path):
        return path
    return input_file(path, flag)
