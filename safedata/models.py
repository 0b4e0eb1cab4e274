"""Load a causal LM and its tokenizer by Hub id or local path; build the tiny test model."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from .data.hashing import file_sha256
from .distributed import local_rank
from .errors import UserError
from .store import read_json, write_json

log = logging.getLogger(__name__)
# peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model: a FutureWarning on
# every LoRA run that no user of this tool can act on (peft's to fix); every other warning is left alone.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

TRAINING_ARGS_FILE = "training_args.bin"   # what transformers' Trainer saves beside a checkpoint
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32, "fp64": torch.float64, "float64": torch.float64}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU unless asked otherwise."""
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r}: choose from auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def looks_like_local_path(name: str) -> bool:
    """A Hub id is `name` or `org/name`; anything else (./x, /x, ~/x, a/b/c, or a path whose first folder
    exists here) is meant as a local directory."""
    text = str(name)
    if text.startswith(("/", "./", "../", "~", ".\\")) or text.endswith("/") or text.count("/") > 1:
        return True
    head = text.split("/", 1)[0]
    return "/" in text and Path(head).is_dir()


def check_model_name(name: str, flag: str = "--model_name") -> None:
    """A local path that is not a model directory fails here, before any Hub lookup."""
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {name}: is a file; expected a model directory or a Hugging Face id")
    if not path.exists() and looks_like_local_path(name):
        raise UserError(f"{flag} {name}: no such directory (and not a Hugging Face id of the form org/name)")


FINETUNE_META = "finetune_meta.json"


def read_finetune_meta(model_dir) -> dict | None:
    """finetune_meta.json of a checkpoint made here, or None for any other model (a Hub id, a base model)."""
    path = Path(model_dir) / FINETUNE_META
    return read_json(path) if path.is_file() else None


def load_tokenizer(name_or_path: str):
    check_model_name(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as err:
        raise UserError(f"--model_name {name_or_path}: cannot load a tokenizer ({str(err).splitlines()[0]})") from None
    return tokenizer


def load_model(name_or_path: str, dtype: str | None = None, device: str | torch.device | None = None):
    """(model, tokenizer) in eval mode on the device. Never adds tokens (that would resize the model)."""
    check_model_name(name_or_path)
    log.info("loading model %s", name_or_path)
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype)
    except OSError as err:
        raise UserError(f"--model_name {name_or_path}: cannot load a model ({str(err).splitlines()[0]})") from None
    model.to(device).eval()
    log.info("loaded %s (%s on %s)", name_or_path, torch_dtype, device)
    return model, load_tokenizer(name_or_path)


# The files of a model directory that decide its numbers: the config, the weights (*.safetensors, *.bin, their
# index), the tokenizer (token ids; the chat template) and the generation defaults. Not finetune_meta.json (its
# times) nor a Trainer's training_args.bin (a pickle holding a logging dir named by the time): two fine-tunes with
# the same weights are the same model.
IDENTITY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                  "chat_template.json")
HASH_CACHE_ENV = "SAFEDATA_HASH_CACHE"     # a file for the weights' hashes ("off": none); default under ~/.cache
_HASHES: dict[str, str] = {}                # this process's: stat key -> sha256
# A file changed less than this long before it was hashed is not remembered: on a file system with coarse
# timestamps (1 s, some NFS) a second write in the same tick would keep the stat key ("racy git").
RACY_S = 2.0


def identity_files(path: Path) -> list[Path]:
    """The files of model directory `path` whose bytes make its identity (IDENTITY_FILES, sorted by name)."""
    weights = [f for f in path.iterdir() if f.is_file() and f.name != TRAINING_ARGS_FILE
               and (f.suffix in (".safetensors", ".bin") or f.name.endswith((".safetensors.index.json",
                                                                             ".bin.index.json")))]
    return sorted({*weights, *(path / name for name in IDENTITY_FILES if (path / name).is_file())},
                  key=lambda f: f.name)


def _stat_key(path: Path) -> str:
    """What the hash cache trusts: a file with the same device, inode, size, mtime and ctime (ns) holds the same
    bytes. Any write, truncation, replacement (a new inode) or chmod moves one of them, and ctime cannot be set
    from user space (touch resets mtime, not ctime); copying a model elsewhere gives new inodes, so a copy is
    hashed again."""
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _cache_path() -> Path | None:
    value = os.environ.get(HASH_CACHE_ENV)
    if value == "off":
        return None
    if value:
        return Path(value)
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:     # no home directory: this process's memory only
        return None
    return base / "safedata" / "file_sha256.json"


def _read_cache(path: Path | None) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8")) if path else {}
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_file_sha256(path) -> str:
    """The sha256 of a file's bytes (data.file_sha256, every byte read), remembered by the file's stat key (_stat_key)
    in this process and in a per-user cache file ($SAFEDATA_HASH_CACHE, "off" for none): a 13.5 GB model is read
    once (about 7 s at sha256's 1.9 GB/s, or the disk's speed), not by every stage. A file that changed while it
    was read, or within RACY_S before, is not remembered."""
    path = Path(path)
    key = _stat_key(path)
    if key in _HASHES:
        return _HASHES[key]
    cache_file = _cache_path()
    digest = _read_cache(cache_file).get(key)
    if not (isinstance(digest, str) and len(digest) == 64):
        started = time.time()
        digest = file_sha256(path)
        st = path.stat()
        if _stat_key(path) != key or started - max(st.st_mtime, st.st_ctime) < RACY_S:
            return digest
        if cache_file is not None:
            cache = _read_cache(cache_file)
            cache[key] = digest
            try:
                write_json(cache_file, dict(list(cache.items())[-4096:]))
            except OSError as err:   # a read-only home: the process's own memory still holds it
                log.debug("hash cache %s not written (%s)", cache_file, err)
    _HASHES[key] = digest
    return digest


def model_content_id(path) -> str:
    """sha256:<16 hex>, a hash of the names and full bytes of a model directory's identity_files: the same for every
    copy of the model wherever it lies, another for any changed byte of its config, weights or tokenizer."""
    digest = hashlib.sha256()
    for file in identity_files(Path(path)):
        digest.update(f"{file.name}\t{cached_file_sha256(file)}\n".encode())
    return "sha256:" + digest.hexdigest()[:16]


def model_identity(name_or_path: str) -> str:
    """What metadata records as the model: a Hub id as given; a local model directory as `<resolved path>#<content
    id>` (model_content_id). The path is there for a person; only the content id decides whether two outputs were
    made by the same model (store.model_key: chunk fingerprints and every check that compares metas), so moving a
    model, a checkout or a run tree keeps finished work."""
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.json").exists():
        return f"{path.resolve()}#{model_content_id(path)}"
    return name_or_path


def folder_key(name_or_path: str) -> str:
    """The name a model's output folders go under (the recipes' MODEL_NAME): a Hub id with '/' as '--'; a local
    model directory as its name and the first 8 hex digits of its content id, so that two checkpoints in folders both
    named hf/ never share outputs and a moved or copied model keeps its finished work."""
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.json").exists():
        return f"{path.resolve().name}-{model_content_id(path).removeprefix('sha256:')[:8]}"
    if path.is_dir():
        raise UserError(f"{name_or_path}: a directory without config.json is not a model")
    return name_or_path.replace("/", "--")


# ----------------------------------------------------------------------------- tiny model

LLAMA2_STYLE_CHAT_TEMPLATE = (
    # A leading system turn goes into the first user turn, as Llama-2's <<SYS>> block.
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' and loop.index0 == 1 and messages[0]['role'] == 'system' %}"
    "{{ '[INST] <<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def default_tokenizer_corpus() -> list[Path]:
    """The project's own lab data (generated, rarely edited). Docs and code stay out of it: a tiny model built
    from a corpus that changes with every README edit would change the numbers every test sees."""
    root = Path(__file__).resolve().parent.parent
    return sorted((root / "ft_datasets" / "lab").glob("*.json*"))


def _corpus_lines(files):
    for path in map(Path, files):
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".json", ".jsonl"):
            # Strings only, so JSON punctuation does not eat the vocabulary.
            try:
                values = json.loads(text) if path.suffix == ".json" else [json.loads(l) for l in text.split("\n") if l.strip()]
            except json.JSONDecodeError:
                values = [text]
            stack = list(values) if isinstance(values, list) else [values]
            while stack:
                value = stack.pop()
                if isinstance(value, str):
                    yield value
                elif isinstance(value, dict):
                    stack.extend(value.values())
                elif isinstance(value, list):
                    stack.extend(value)
        else:
            yield text


def build_tokenizer(corpus_files, vocab_size: int = 2048):
    """A byte-level BPE trained on the project's own text, with a Llama-2-style chat template."""

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = list(_corpus_lines(corpus_files)) or ["the quick brown fox jumps over the lazy dog"]
    bpe.train_from_iterator(lines + ["[INST] <<SYS>> <</SYS>> [/INST] ### Instruction: ### Input: ### Response:"],
                            trainer=trainer)
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", clean_up_tokenization_spaces=False)
    tokenizer.chat_template = LLAMA2_STYLE_CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(vocab_size: int, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=None,
                     max_position_embeddings=1024, tie_word_embeddings=False, seed=0):
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         intermediate_size=intermediate_size or 4 * hidden_size,
                         max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def make_tiny_model(output_dir, hidden_size=64, num_layers=2, num_heads=4, vocab_size=2048, seed=0,
                    corpus_files=None, tie_word_embeddings=False):
    """Write a small random-initialised Llama and the project's own tokenizer to output_dir."""
    output_dir = Path(output_dir)
    tokenizer = build_tokenizer(corpus_files if corpus_files is not None else default_tokenizer_corpus(), vocab_size)
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2, 3]
    model = build_tiny_llama(len(tokenizer), hidden_size, num_layers, num_heads, seed=seed,
                             tie_word_embeddings=tie_word_embeddings)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
