"""Per-example outputs on disk: atomic writes, meta.json, chunks for sharding and resume.

A stage splits its examples (file order) into fixed-size chunks. Each chunk is one
safetensors file, written atomically and stamped with the run's fingerprint (a hash
of everything that determines its numbers: contents, never paths), so a killed run
resumes at the first missing chunk, a run tree or model moved elsewhere keeps its
finished chunks, and a stale chunk from other flags or bytes is never merged.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import struct
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open

from .errors import MetadataMismatch, UserError

log = logging.getLogger(__name__)

META = "meta.json"


# ----------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _umask_mode() -> int:
    return 0o666 & ~_umask()


def apply_umask(directory) -> None:
    """Give a directory and the files in it the modes the user's umask asks for: some writers (mkdtemp, the
    safetensors files of transformers' save_pretrained) make them owner-only, and outputs are meant to be shared."""
    directory = Path(directory)
    os.chmod(directory, 0o777 & ~_umask())
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, _umask_mode())


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path` for a writer that wants a file name; the file is synced and appears at `path`
    (with the user's umask) only once the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600; outputs are meant to be shared
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_file(path):
    """A binary handle whose content appears at `path` only once complete (temp file + rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        yield handle


@contextlib.contextmanager
def atomic_dir(path):
    """A temporary directory path for a writer of a whole folder (save_to_disk); it replaces `path` (and what was
    there) only once the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield scratch / "data"
        if path.exists():
            shutil.rmtree(path)
        os.replace(scratch / "data", path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_file(path) as handle:
        handle.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=1, ensure_ascii=False, sort_keys=False) + "\n")


def output_hint() -> str:
    """What a refusal to reuse an output dir tells the user to change: --output_dir, or what a recipe script
    that chooses the dir for them says (SAFEDATA_OUTPUT_HINT, set by scripts/recipe_env.sh)."""
    return os.environ.get("SAFEDATA_OUTPUT_HINT") or "use another --output_dir"


def read_json(path):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing (was the stage that writes it run and finished?)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Safetensors with a deterministic header (sorted names and metadata keys): the same tensors
    give the same bytes in every process (the library's own writer orders metadata by hash)."""
    header: dict = {"__metadata__": dict(sorted((metadata or {}).items()))} if metadata else {}
    payload, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        raw = tensor.view(torch.int16) if tensor.dtype in (torch.bfloat16, torch.float16) else tensor
        data = raw.numpy().tobytes()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        payload.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with atomic_file(path) as handle:
        handle.write(struct.pack("<Q", len(header_bytes)))
        handle.write(header_bytes)
        for data in payload:
            handle.write(data)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                       torch.bool: "BOOL"}


def stream_rows_to_safetensors(path, name: str, blocks, n_rows: int, row_shape: tuple, dtype: torch.dtype,
                               metadata: dict[str, str] | None = None) -> None:
    """Write one tensor block by block, never holding it whole: for pools larger than memory.

    The safetensors layout is an 8-byte header length, a JSON header (padded to 8 bytes), then raw
    little-endian data, so rows can be appended in order once the shape is known.
    """
    numel_row = 1
    for size in row_shape:
        numel_row *= size
    nbytes = n_rows * numel_row * torch.tensor([], dtype=dtype).element_size()
    header = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": [n_rows, *row_shape], "data_offsets": [0, nbytes]}
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    written = 0
    with atomic_file(path) as handle:
        handle.write(struct.pack("<Q", len(header_bytes)))
        handle.write(header_bytes)
        for block in blocks:
            block = block.detach().to("cpu", dtype).contiguous()
            if tuple(block.shape[1:]) != tuple(row_shape):
                raise ValueError(f"{path}: block of shape {tuple(block.shape)} does not fit rows {row_shape}")
            raw = block.view(torch.int16) if dtype in (torch.bfloat16, torch.float16) else block
            handle.write(raw.numpy().tobytes())
            written += block.shape[0]
        if written != n_rows:
            raise ValueError(f"{path}: wrote {written} rows, expected {n_rows}")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsReader:
    """A safetensors file read with plain reads into memory of its own: safetensors' safe_open maps the file,
    and every page a copy touches stays resident (counted in the process's RSS) until the last tensor from
    it is freed, so loading then copying would hold the data twice. Rows can be read in blocks."""

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            header_len = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(header_len))
        self.metadata = dict(header.pop("__metadata__", None) or {})
        self.entries = header
        self.data_start = 8 + header_len

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        entry = self.entries[name]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise UserError(f"{self.path}: tensor {name} has dtype {entry['dtype']}, not one this project writes")
        return SAFETENSORS_DTYPES[entry["dtype"]]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor, or rows start:stop of its first dimension."""
        shape = list(self.shape(name))
        if shape:
            stop = shape[0] if stop is None else min(stop, shape[0])
            shape[0] = max(0, stop - start)
        out = torch.empty(shape, dtype=self.dtype(name))
        self._fill(name, out, start)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """The whole tensor written into `out`, memory the caller laid out (a CPU tensor, contiguous, of the stored
        dtype and element count; its shape is the caller's): the file's bytes copied once, to where they are used."""
        numel = math.prod(self.shape(name))
        if out.device.type != "cpu" or not out.is_contiguous() or out.dtype != self.dtype(name) \
                or out.numel() != numel:
            raise ValueError(f"read_into {name}: need a contiguous CPU {self.dtype(name)} tensor of {numel} "
                             f"elements, got {out.dtype} {tuple(out.shape)} on {out.device}")
        self._fill(name, out, 0)
        return out

    def _fill(self, name: str, out: torch.Tensor, start: int) -> None:
        flat = out.reshape(-1).view(torch.uint8)           # the tensor's own bytes, filled in place
        row_bytes = flat.numel() // max(1, out.shape[0]) if start else 0
        offset = self.entries[name]["data_offsets"][0] + start * row_bytes
        with open(self.path, "rb") as handle:
            handle.seek(self.data_start + offset)
            if flat.numel() and handle.readinto(memoryview(flat.numpy())) != flat.numel():
                raise UserError(f"{self.path}: truncated (tensor {name})")

    def read_all(self) -> dict[str, torch.Tensor]:
        return {name: self.read(name) for name in self.entries}


def load_tensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    reader = SafetensorsReader(path)
    return reader.read_all(), reader.metadata


# ----------------------------------------------------------------------------- metadata


def fingerprint(config: dict) -> str:
    canonical = json.dumps(config, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]


def environment() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "host": platform.node()}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def model_key(identity):
    """What of a recorded model (models.model_identity) decides the numbers: a local model's content id, the part
    after the last '#' of `<path>#sha256:<hex>` (the path is for a person), or a Hub id as given. A meta.json written
    before content ids (`<path>#<12 hex>`, a hash of the config and the weights' first and last MiB) gives its old
    hash, never equal to a content id: its outputs are not proved to come from the same bytes."""
    if not isinstance(identity, str):
        return identity
    return identity.rpartition("#")[2] if "#" in identity else identity


def _old_model_id(identity) -> bool:
    """A local model recorded the old way (`<path>#<12 hex>`, before content ids)."""
    return isinstance(identity, str) and "#" in identity and not model_key(identity).startswith("sha256:")


def _comparable(key: str, value):
    return model_key(value) if key == "model" else value


def require_same(mine: dict, theirs: dict, keys, mine_name: str, theirs_name: str) -> None:
    """Refuse to combine outputs made differently, naming the first difference (the model by its content, not its
    path: model_key)."""
    for key in keys:
        if _comparable(key, mine.get(key)) != _comparable(key, theirs.get(key)):
            raise MetadataMismatch(f"{theirs_name} was made with {key}={theirs.get(key)!r}, "
                                   f"but {mine_name} has {key}={mine.get(key)!r}"
                                   + (" (recorded before models were identified by their content: remake it)"
                                      if key == "model" and _old_model_id(theirs.get(key)) else ""))


def refuse_foreign_output(output_dir, meta: dict, keys, this: str = "this run", earlier: str = "an earlier run",
                          hint: str | None = None, stage: str | None = None) -> None:
    """An output dir holding another run's result (its meta.json differs in one of `keys`, or is of another
    `stage`) is refused, naming the difference, never overwritten silently."""
    path = Path(output_dir) / META
    if not path.exists():
        return
    old = read_json(path)
    if stage is not None and old.get("stage") != stage:
        raise MetadataMismatch(f"{path}: holds a {old.get('stage')!r} output, not {stage_noun(stage)}; use another "
                               "--output_dir")
    require_same(meta, old, keys, this, f"{path} ({earlier}; {hint or output_hint()})")


def stage_noun(stage: str) -> str:
    return "an " + stage if stage[:1] in "aeiou" else "a " + stage


# ----------------------------------------------------------------------------- shards and chunks


def parse_shard(spec: str | None) -> tuple[int, int]:
    """'I/N' (0-based I), else the SLURM array task, else the whole job (0/1)."""
    if spec:
        try:
            index, count = (int(x) for x in spec.split("/"))
        except ValueError:
            raise UserError(f"--shard {spec!r}: expected I/N, e.g. 0/4") from None
        if not 0 <= index < count:
            raise UserError(f"--shard {spec!r}: need 0 <= I < N")
        return index, count
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is not None and os.environ.get("SLURM_ARRAY_TASK_COUNT"):
        low = int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(task) - low, int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


class ChunkStore:
    """Fixed-size chunks of a stage's per-example tensors under `root/chunks/`."""

    def __init__(self, root, run_fingerprint: str, n_items: int, chunk_size: int):
        if chunk_size < 1:
            raise UserError("--chunk_size must be at least 1")
        self.root = Path(root)
        self.dir = self.root / "chunks"
        self.fingerprint = run_fingerprint
        self.n_items = n_items
        self.chunk_size = chunk_size
        self.n_chunks = (n_items + chunk_size - 1) // chunk_size

    def span(self, chunk: int) -> range:
        return range(chunk * self.chunk_size, min(self.n_items, (chunk + 1) * self.chunk_size))

    def path(self, chunk: int) -> Path:
        return self.dir / f"chunk-{chunk:06d}.safetensors"

    def assigned(self, shard=(0, 1), rank=(0, 1)) -> list[int]:
        """Contiguous chunk ranges per shard; round-robin over data-parallel ranks inside it."""
        shard_index, shard_count = shard
        lo = self.n_chunks * shard_index // shard_count
        hi = self.n_chunks * (shard_index + 1) // shard_count
        rank_index, world = rank
        return [c for c in range(lo, hi) if (c - lo) % world == rank_index]

    def done(self, chunk: int) -> bool:
        path = self.path(chunk)
        if not path.exists():
            return False
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
        except SafetensorError as err:  # a truncated or foreign file is redone, never read
            log.warning("%s: not a complete chunk (%s), recomputing", path, err)
            return False
        except OSError as err:
            # Permissions, a full or failing disk, a directory in the way: recomputing would hide the
            # problem (and fail again on writing), so stop and say what to fix.
            raise UserError(f"{path}: cannot read this chunk ({err.strerror or err}); fix access to "
                            f"{self.dir} and rerun (only missing, truncated, foreign or stale chunks are "
                            "recomputed)") from None
        if meta.get("fingerprint") != self.fingerprint:
            log.warning("%s: stale chunk from another run (fingerprint %s, now %s), recomputing",
                        path, meta.get("fingerprint"), self.fingerprint)
            return False
        span = self.span(chunk)
        return meta.get("start") == str(span.start) and meta.get("stop") == str(span.stop)

    def pending(self, chunks) -> list[int]:
        return [c for c in chunks if not self.done(c)]

    def save(self, chunk: int, tensors: dict[str, torch.Tensor]) -> None:
        span = self.span(chunk)
        for name, tensor in tensors.items():
            if tensor.shape[0] != len(span):
                raise ValueError(f"chunk {chunk}: tensor {name} has {tensor.shape[0]} rows, expected {len(span)}")
        save_tensors(self.path(chunk), tensors,
                     {"fingerprint": self.fingerprint, "start": str(span.start), "stop": str(span.stop)})

    def missing(self) -> list[int]:
        return [c for c in range(self.n_chunks) if not self.done(c)]

    def iter_tensor(self, name: str):
        """One tensor's rows chunk by chunk, in order (for streaming merges)."""
        for chunk in range(self.n_chunks):
            with safe_open(str(self.path(chunk)), framework="pt") as handle:
                yield handle.get_tensor(name)

    def gather(self) -> dict[str, torch.Tensor]:
        """All chunks concatenated in order; refuses when any chunk is missing or stale."""
        missing = self.missing()
        if missing:
            raise UserError(f"{self.dir}: {len(missing)} of {self.n_chunks} chunk(s) missing or stale "
                            f"(first: {missing[0]}); run the remaining shards first")
        parts: dict[str, list[torch.Tensor]] = {}
        for chunk in range(self.n_chunks):
            tensors, _ = load_tensors(self.path(chunk))
            for name, tensor in tensors.items():
                parts.setdefault(name, []).append(tensor)
        return {name: torch.cat(ts) for name, ts in parts.items()}
