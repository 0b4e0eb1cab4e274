"""Load a causal LM and its tokenizer by Hub id or local path; build the tiny test model."""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from .distributed import local_rank
from .errors import UserError
from .store import read_json

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


def model_identity(name_or_path: str) -> str:
    """What metadata records as the model: the id, or a local dir with its config hash."""
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.json").exists():
        digest = hashlib.sha256((path / "config.json").read_bytes())
        # Size plus the first and last MiB of each weights file: a retrained checkpoint in the same
        # directory gets a new identity without hashing 14 GB.
        # Weights only: a Trainer's training_args.bin (a pickle holding a logging dir named by the time) would give
        # the same weights a new identity on every run.
        for weights in sorted(w for w in list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
                              if w.name != TRAINING_ARGS_FILE):
            size = weights.stat().st_size
            digest.update(f"{weights.name}:{size}".encode())
            with open(weights, "rb") as handle:
                digest.update(handle.read(1 << 20))
                handle.seek(max(0, size - (1 << 20)))
                digest.update(handle.read(1 << 20))
        return f"{path.resolve()}#{digest.hexdigest()[:12]}"
    return name_or_path


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
