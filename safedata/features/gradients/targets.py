"""Targets: what an anchor file becomes (Target, ParamTarget), how it is stored on disk (load_target) and the
lock its builders share (target_lock). bank.py arranges a run's targets for the hooks."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock

from ...errors import UserError
from ...store import META, SafetensorsReader, read_json

TARGET_FILE = "target.safetensors"
LOCK_FILE = ".target.lock"
TARGET_FORMAT = "safedata.gradient_target"
TARGET_VERSION = "1"
LAYOUTS = ("auto", "factored", "dense")


class StoredTensor:
    """A tensor left in its safetensors file until it is wanted: read whole (`load`) or straight into memory the
    caller laid out (`read_into`). A scoring run's dense target parts stay on disk until the TargetBank reads each
    into its row of the bank, so their bytes are copied once (file -> bank), not twice (file -> tensor -> bank)."""

    def __init__(self, reader: SafetensorsReader, key: str):
        self.reader, self.key = reader, key
        self.shape = torch.Size(reader.shape(key))
        self.dtype = reader.dtype(key)

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return torch.tensor([], dtype=self.dtype).element_size()

    def load(self) -> torch.Tensor:
        return self.reader.read(self.key)

    def read_into(self, out: torch.Tensor) -> torch.Tensor:
        return self.reader.read_into(self.key, out)


def loaded(value):
    """The tensor itself (a StoredTensor is read)."""
    return value.load() if isinstance(value, StoredTensor) else value


@dataclass
class ParamTarget:
    """One parameter's part of a target: a sum of a dense part, scaled factors and embedding rows."""

    shape: tuple
    dense: torch.Tensor | StoredTensor | None = None   # a StoredTensor until read (load_target(defer_dense=True))
    fact_g: torch.Tensor | None = None      # [K, out]
    fact_x: torch.Tensor | None = None      # [K, in]
    fact_scale: torch.Tensor | None = None  # [K]
    rows_ids: torch.Tensor | None = None    # [U]
    rows_val: torch.Tensor | None = None    # [U, d]

    @property
    def form(self) -> str:
        parts = [k for k, v in (("dense", self.dense), ("factored", self.fact_g), ("rows", self.rows_ids))
                 if v is not None]
        return "+".join(parts)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.dense, self.fact_g, self.fact_x, self.fact_scale,
                                                          self.rows_ids, self.rows_val) if t is not None)

    def scale_(self, s: float) -> None:
        if self.dense is not None:
            self.dense = loaded(self.dense) * s
        if self.fact_scale is not None:
            self.fact_scale = self.fact_scale * s
        if self.rows_val is not None:
            self.rows_val = self.rows_val * s

    def to_dense(self, dtype, device=None) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=dtype, device=device)
        if self.dense is not None:
            out += loaded(self.dense).to(device=device, dtype=dtype)
        if self.fact_g is not None:
            g = self.fact_g.to(device=device, dtype=dtype) * self.fact_scale.to(device=device, dtype=dtype)[:, None]
            out += g.T @ self.fact_x.to(device=device, dtype=dtype)
        if self.rows_ids is not None:
            # rows_ids are distinct: no two adds meet, so even CUDA's atomic index_add_ gives fixed bits
            out.index_add_(0, self.rows_ids.to(device), self.rows_val.to(device=device, dtype=dtype))
        return out


@dataclass
class Target:
    """T = (1/N) sum_a G_a/||G_a|| (times 1/||T|| when renormalised), per parameter."""

    params: dict[str, ParamTarget]
    mode: str = "full"
    param_set: str = "all"
    norm: float | None = None
    renormalized: bool = False
    anchor_sqnorm: list[float] = field(default_factory=list)
    anchor_inner: list[float] = field(default_factory=list)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.params.items():
            for key in ("dense", "fact_g", "fact_x", "fact_scale", "rows_ids", "rows_val"):
                value = loaded(getattr(p, key))
                if value is not None:
                    out[f"{name}::{key.replace('_', '.', 1)}"] = value
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], layout: dict, **kw) -> "Target":
        params = {name: ParamTarget(tuple(spec["shape"])) for name, spec in layout.items()}
        for key, value in tensors.items():
            name, _, part = key.rpartition("::")
            if name not in params:
                raise UserError(f"target tensor {key!r} is not in the layout of meta.json")
            setattr(params[name], part.replace(".", "_"), value)
        return cls(params, **kw)

    def layout(self) -> dict:
        return {name: {"shape": list(p.shape), "form": p.form,
                       "tokens": int(p.fact_g.shape[0]) if p.fact_g is not None else 0,
                       "rows": int(p.rows_ids.shape[0]) if p.rows_ids is not None else 0,
                       "bytes": p.nbytes()} for name, p in self.params.items()}


def load_target(directory, defer_dense: bool = False) -> tuple[Target, dict]:
    """The target in DIRECTORY and its meta.json. defer_dense: leave the dense parts in the file as StoredTensor
    (for a TargetBank, which reads each into place)."""
    directory = Path(directory)
    meta = read_json(directory / META)
    if meta.get("stage") != "gradient_target":
        raise UserError(f"{directory}: stage {meta.get('stage')!r} is not a gradient target "
                        "(make one with get_gradients.py --anchor)")
    path = directory / TARGET_FILE
    if not path.exists():
        raise UserError(f"{path}: missing (did the anchor run finish?)")
    reader = SafetensorsReader(path)
    if reader.metadata.get("format") != TARGET_FORMAT or reader.metadata.get("version") != TARGET_VERSION:
        raise UserError(f"{path}: not a version-{TARGET_VERSION} gradient target")
    tensors = {key: StoredTensor(reader, key) if defer_dense and key.endswith("::dense") else reader.read(key)
               for key in reader.keys()}
    info = meta["target"]
    flags = meta.get("flags") or {}
    target = Target.from_tensors(tensors, info["layout"], mode=flags.get("mode", "full"),
                                 param_set=flags.get("params", "all"), norm=info.get("norm"),
                                 renormalized=info.get("renormalized", False))
    return target, meta


def target_tensors_sha256(path) -> str:
    """The sha256 of a target file's tensors: each one's name, dtype, shape and bytes (sorted by name), not the
    file's header metadata. What a score chunk's fingerprint holds of a target: the same tensors give the same hash
    whatever a file's metadata says (target files written before 2026-12-07 name the model's path there)."""
    reader = SafetensorsReader(path)
    digest = hashlib.sha256()
    with open(reader.path, "rb") as handle:
        for name in sorted(reader.entries):
            entry = reader.entries[name]
            digest.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode("utf-8") + b"\n")
            start, stop = entry["data_offsets"]
            handle.seek(reader.data_start + start)
            left = stop - start
            while left:
                block = handle.read(min(left, 1 << 24))
                if not block:
                    raise UserError(f"{reader.path}: truncated (tensor {name})")
                digest.update(block)
                left -= len(block)
    return digest.hexdigest()


def _write_holder(fd: int) -> None:
    """The lock holder's pid in the lock file (for a person looking at a waiting array task)."""
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())


@contextlib.contextmanager
def target_lock(directory):
    """An exclusive lock on DIRECTORY/.target.lock (filelock, an OS file lock) held while a target is checked and
    built, so that concurrent builders of one target (every task of a SLURM array runs the anchor builds) build it
    once: the first builds, the others wait, then find it built with the same settings and keep it. Every task
    therefore scores against the same target bytes. File locks work on local disks and NFSv4; on a shared file
    system without them (e.g. Lustre mounted without -o flock) the lock fails with a clear error (never a soft
    lock that a killed task would leave behind): submit the anchor builds as their own job and the scoring array
    with --dependency=afterok on it."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--output_dir {directory}: is a file, not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    lock = FileLock(path, fallback_to_soft=False, preserve_lock_file=True, on_acquired=_write_holder)
    try:
        lock.acquire()
    except (OSError, NotImplementedError) as err:
        raise UserError(f"{path}: cannot take a file lock here ({err}); build the targets in one job and "
                        "start the scoring array after it (sbatch --dependency=afterok:JOB)") from None
    try:
        yield
    finally:
        lock.release()
