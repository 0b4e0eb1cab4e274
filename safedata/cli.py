"""What every top-level script shares: logging, one-line user errors."""
from __future__ import annotations

import logging
import os
import sys

from huggingface_hub.utils import disable_progress_bars as disable_hub_progress_bars
from transformers.utils import logging as hf_logging

from .data import conversations as C
from .data import TEMPLATES, check_sizes
from .errors import UserError
from .progress import interactive


def run(main) -> None:
    """Call main(); a user error becomes one line on stderr and exit status 2, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not interactive():  # a job log: the libraries' bars would write carriage-return redraws
        # Switched off through their APIs (the libraries are imported by now, so the environment variable alone
        # would come too late for this process); the variable still reaches any process started from here.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        disable_hub_progress_bars()
        hf_logging.disable_progress_bar()
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


TEMPLATE_HELP = ("prompt template: paper (the paper's Llama-2 wrapper), chat (the tokenizer's own chat template) or "
                 "plain. Default: the model's own: the template it was fine-tuned with here, else chat for a "
                 "tokenizer with a chat template of its own, paper for Llama-2-chat and for tokenizers without one "
                 "(logged; recorded in meta.json)")


def add_template_arg(parser, extra_help: str = "") -> None:
    """--template, default None: safedata.templates resolves it from the model."""
    parser.add_argument("--template", choices=TEMPLATES, default=None, help=TEMPLATE_HELP + extra_help)


# Flags that count something (examples, tokens, epochs, dimensions): below 1 is refused before any work.
SIZE_FLAGS = ("batch_size", "per_device_batch_size", "chunk_size", "max_length", "max_response_length",
              "max_seq_length", "max_new_tokens", "proj_dim", "epochs", "lora_r", "tensor_parallel_size")
FIELD_MAP_HELP = (
    "conversations under other field names, e.g. 'conversation=dialog,role=speaker,content=text,user=customer,"
    "assistant=agent' (names added to the defaults: OpenAI messages with role/content, ShareGPT conversations "
    "with from/value; docs/AUDIT.md)")


def add_field_map_arg(parser) -> None:
    """--field_map, on every CLI that reads records (parse_args puts it in force)."""
    parser.add_argument("--field_map", default=None, metavar="SPEC", help=FIELD_MAP_HELP)


def parse_args(parser):
    """parser.parse_args(), then what every stage CLI does before any work or file: each size flag it has
    checked, its --field_map put in force for this process (safedata.data.conversations.use_field_map)."""
    args = parser.parse_args()
    needed = getattr(args, "needed_unless_plan", ())
    if needed:
        if getattr(args, "plan", None) is None:
            missing = ["--" + name for name in needed if getattr(args, name, None) is None]
            if missing:
                parser.error(f"the following arguments are required: {', '.join(missing)}")
        del args.needed_unless_plan   # not a setting of the run
    check_sizes(**{name: getattr(args, name) for name in SIZE_FLAGS if hasattr(args, name)})
    spec = getattr(args, "field_map", None)
    C.use_field_map(C.FieldMap.parse(spec) if spec else None)
    return args


def add_stage_args(parser) -> None:
    """The flags every per-example feature stage shares: sharding, chunks, precision, bad input, field names."""
    parser.add_argument("--shard", default=None, help="I/N: this part of N (default: the SLURM array task, else all)")
    parser.add_argument("--chunk_size", type=int, default=512, help="examples per resumable chunk file")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32, fp64")
    parser.add_argument("--device", default=None, help="e.g. cuda:0 or cpu (default: the GPU of LOCAL_RANK if any, else cpu)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="skip (count and log) malformed records instead of stopping at the first; an empty "
                             "response is not malformed (kept, as the original, with the end token alone supervised)")
    add_field_map_arg(parser)


def module_names(values) -> list[str]:
    """--lora_target_modules as a list of names: given space-separated, comma-separated, or both."""
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def add_lora_args(parser, purpose: str) -> None:
    """The LoRA flags every CLI that takes them shares (one type, one default, one help text each); `purpose`
    says when they apply, e.g. "--lora" or "--mode lora". Pass --lora_target_modules through module_names."""
    parser.add_argument("--lora_r", type=int, default=8, help=f"{purpose}: rank of the adapter")
    parser.add_argument("--lora_alpha", type=float, default=32, help=f"{purpose}: alpha (the adapter's scale is "
                        "alpha / r)")
    parser.add_argument("--lora_target_modules", nargs="+", default=["q_proj", "v_proj"], metavar="NAME",
                        help=f"{purpose}: module names the adapter wraps, space- or comma-separated (q_proj v_proj "
                             "or q_proj,v_proj)")


ORIGINAL_QUIRKS_HELP = (
    "reproduce what the original code computed, to compare with its released selections and numbers: "
    "examples are tokenised as prompt + ' ' + response + ' ', so the trailing space is a supervised token "
    "before the end token (--template paper only; default: off, the response and the end token as intended)")


def add_original_quirks_arg(parser) -> None:
    """--original_quirks: the one data-layer switch to the original's tokenisation (safedata.data.token_ids)."""
    parser.add_argument("--original_quirks", action="store_true", help=ORIGINAL_QUIRKS_HELP)
