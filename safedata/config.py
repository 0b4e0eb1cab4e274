"""Stage settings as dataclasses, and the command lines generated from them.

Each stage's settings are one dataclass (`RepresentationArgs`, `GradientArgs`, `RankArgs`, `FinetuneArgs`,
`GenerationArgs`, `EvaluateArgs`, `AuditArgs`, `ScoreArgs`); a field declared with `option()` carries its default and
its help text, and `add_options` turns the dataclass into argparse flags, so that a default or a help text is written
once, for the package's callers and for the CLI alike. transformers' `HfArgumentParser` (used by LESS) does the same;
this equivalent keeps argparse's plain switches (`--anchor`, not `--anchor [ANCHOR]`) and the project's flag names (no
`--model-name` spellings added), so every CLI's options stay what users' scripts already pass.

Options several stages share (the template, the LoRA flags, the per-example stage flags) are declared once here
and placed into each stage's dataclass with `shared()`, which copies the declaration (type checked by
tests/test_config.py) and can prefix its help with when it applies (`--lora: rank of the adapter`).

`describe` (called by safedata.cli.parse_args for every CLI, generated or not) writes each flag's default or
required marker into its help; `option(deprecated=...)` / `value_aliases` keep a renamed flag's old spelling
working, with one warning line. `add_mode_flag` adds a flag read before the rest (--plan), under which some
required flags may be left out; `without` makes the settings of such a mode, without those fields.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import sys
import types
import typing
from dataclasses import MISSING, dataclass

from .data import TEMPLATES

_HELP, _FLAGS, _CHOICES, _METAVAR, _NARGS, _GROUP, _CLI = ("help", "flags", "choices", "metavar", "nargs", "group",
                                                            "cli")
_DEPRECATED, _VALUE_ALIASES = "deprecated", "value_aliases"


def option(default=MISSING, help: str = "", *, default_factory=MISSING, flags: tuple = (), choices=None,
           metavar: str | None = None, nargs: str | None = None, group: str | None = None, cli: bool = True,
           deprecated: tuple = (), value_aliases: dict | None = None):
    """A dataclass field that is also a command-line flag: `--<name>` (or `flags`, the first naming the field
    when given), its help, choices, metavar and argument group. A field without a default is a required flag.
    cli=False: a setting for the package's callers only (no flag). deprecated: old spellings of the flag, still
    accepted, each use printing one `warning: --old is deprecated; use --new` line on stderr; value_aliases:
    old values of the flag and the value each stands for ({"none": "keyword"}), the same."""
    metadata = {_HELP: help, _FLAGS: tuple(flags), _CHOICES: choices, _METAVAR: metavar, _NARGS: nargs,
                _GROUP: group, _CLI: cli, _DEPRECATED: tuple(deprecated), _VALUE_ALIASES: dict(value_aliases or {})}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def deprecation(old: str, new: str) -> None:
    """The one line an old spelling prints (stderr), the run going on with the new one."""
    print(f"warning: {old} is deprecated; use {new}", file=sys.stderr)


class _Deprecating:
    """An argparse action that warns once per use when the flag was spelt with one of its deprecated names."""

    def __init__(self, *args, deprecated=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.deprecated = tuple(deprecated)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.deprecated:
            deprecation(option_string, self.option_strings[0])
        super().__call__(parser, namespace, values, option_string)


class DeprecatingStore(_Deprecating, argparse._StoreAction):
    """store, with deprecated spellings."""


class DeprecatingSwitch(_Deprecating, argparse._StoreTrueAction):
    """store_true, with deprecated spellings."""


def _aliased(value_type, aliases: dict, flag: str):
    """argparse type: an old value becomes the one it stands for (one warning line), before choices are checked."""
    def convert(text):
        if text in aliases:
            deprecation(f"{flag} {text}", f"{flag} {aliases[text]}")
            text = aliases[text]
        return value_type(text)
    convert.__name__ = getattr(value_type, "__name__", "value")   # argparse names the type in its errors
    convert.aliases = dict(aliases)
    return convert


_KEEP = object()   # shared(default=...) not given: the owner's default


def shared(owner, name: str, purpose: str = "", *, default=_KEEP, **changes):
    """A copy of the option `name` declared on dataclass `owner`, for another stage's dataclass; `purpose`
    prefixes its help ("--lora" -> "--lora: ..."), `changes` replace metadata entries (e.g. group, help).
    `default`: the same option with another default in this stage (score.py's methods embed texts cheaply, so a
    chunk there holds 4096 examples, not the feature stages' 512); the type and meaning stay the owner's."""
    original = owner.__dataclass_fields__[name]
    metadata = dict(original.metadata, shared_from=(owner, name))
    metadata.setdefault(_DEPRECATED, ())
    metadata.setdefault(_VALUE_ALIASES, {})
    if purpose:
        metadata[_HELP] = f"{purpose}: {metadata[_HELP]}"
    metadata.update(changes)
    if default is _KEEP:
        return dataclasses.field(default=original.default, default_factory=original.default_factory,
                                 metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def without(cls, names: tuple[str, ...], name: str) -> type:
    """A dataclass of `cls`'s fields but `names` (each declaration as it is: type, default, help), keyword-only,
    with `cls`'s __post_init__: the settings of a mode that does without those fields (a memory plan reads the
    model, never the data or the output dir), so that neither class holds None in a field typed str. It has
    none of `cls`'s other methods: they may read the fields left out."""
    hints = typing.get_type_hints(cls)
    unknown = set(names) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    kept = [(f.name, hints[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                      init=f.init, repr=f.repr, compare=f.compare,
                                                      metadata=f.metadata))
            for f in dataclasses.fields(cls) if f.name not in names]
    # the caller's module, as make_dataclass(module=) finds it from Python 3.12 on (repr, pickling)
    namespace = {"__doc__": f"{cls.__name__} without {', '.join(names)}.",
                 "__module__": sys._getframe(1).f_globals.get("__name__", cls.__module__)}
    if hasattr(cls, "__post_init__"):
        namespace["__post_init__"] = cls.__post_init__
    return dataclasses.make_dataclass(name, kept, namespace=namespace, kw_only=True)


def _flag_type(annotation):
    """(argparse type, takes a list) of a field's annotation: int | None -> (int, False), list[str] -> (str, True)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            raise TypeError(f"an option's type must be one type or one type | None, not {annotation}")
        return _flag_type(members[0])
    if origin in (list, tuple):
        (item,) = {a for a in typing.get_args(annotation) if a is not Ellipsis}
        return item, True
    return annotation, False


def option_fields(cls) -> list:
    """The dataclass's fields that are flags, with their resolved types, in declaration order."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get(_CLI, False)]


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """Declare the dataclass's options on `parser`, in field order; fields with a `group` go into argument groups
    of that title (made on first use, or found on the parser). A field without a default is a required flag
    (add_mode_flag can waive it in a mode: --plan)."""
    groups = {g.title: g for g in parser._action_groups}
    for f, annotation in option_fields(cls):
        meta = f.metadata
        target = parser
        if meta[_GROUP]:
            target = groups.get(meta[_GROUP]) or parser.add_argument_group(meta[_GROUP])
            groups[meta[_GROUP]] = target
        names = (meta[_FLAGS] or ("--" + f.name,)) + meta.get(_DEPRECATED, ())
        kwargs = {"dest": f.name, "help": meta[_HELP], "deprecated": meta.get(_DEPRECATED, ())}
        value_type, many = _flag_type(annotation)
        has_default = f.default is not MISSING or f.default_factory is not MISSING
        if value_type is bool:
            if f.default is not False:
                raise TypeError(f"{cls.__name__}.{f.name}: a switch's default must be False")
            target.add_argument(*names, action=DeprecatingSwitch, **kwargs)
            continue
        kwargs["action"] = DeprecatingStore
        kwargs["type"] = value_type
        if meta.get(_VALUE_ALIASES):
            kwargs["type"] = _aliased(value_type, meta[_VALUE_ALIASES], names[0])
        if many:
            kwargs["nargs"] = meta[_NARGS] or "+"
        elif meta[_NARGS]:
            kwargs["nargs"] = meta[_NARGS]
        for key in (_CHOICES, _METAVAR):
            if meta[key] is not None:
                kwargs[key] = meta[key]
        if has_default:
            kwargs["default"] = f.default if f.default is not MISSING else f.default_factory()
        else:
            kwargs["required"] = True
        target.add_argument(*names, **kwargs)


REQUIRED = "(required)"
REQUIRED_UNLESS = "(required unless {flag})"
_EXPLAINED = re.compile(r"\bdefault:", re.I)
_WAIVED_BY = "waived_by"     # the attribute add_mode_flag gives an action it waives: the mode flag


def add_mode_flag(parser: argparse.ArgumentParser, flag: str, waives: tuple[str, ...], **argument) -> None:
    """Add `flag`, which puts the CLI in another mode (--plan: a memory plan instead of the run). The flags named
    (by dest) in `waives` are required, argparse checking them, except when `flag` is on the command line:
    safedata.cli.parse_args looks for it before parsing the rest (`waived`). --help marks them
    `(required unless FLAG)`."""
    parser.add_argument(flag, **argument)
    actions = {action.dest: action for action in parser._actions}
    for dest in waives:
        actions[dest].required = True
        setattr(actions[dest], _WAIVED_BY, flag)


def waived_by(action: argparse.Action) -> str | None:
    """The mode flag (add_mode_flag) under which this required flag may be left out; None: none."""
    return getattr(action, _WAIVED_BY, None)


def waived(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> list[argparse.Action]:
    """The required flags that the mode flags given in `argv` (default: sys.argv[1:]) waive. The mode flags are
    read before the rest, by a parser that knows them alone (the other flags and their values are left over),
    so that the full parse can check the required flags of the mode it is in."""
    modes = {waived_by(action) for action in parser._actions} - {None}
    if not modes:
        return []
    modes_only = argparse.ArgumentParser(add_help=False, allow_abbrev=parser.allow_abbrev,
                                         prefix_chars=parser.prefix_chars)
    mode_actions = [action for action in parser._actions if set(action.option_strings) & modes]
    for action in mode_actions:
        takes = {"action": "store_const", "const": True} if action.nargs == 0 else {"nargs": action.nargs}
        modes_only.add_argument(*action.option_strings, dest=action.dest, default=None, **takes)
    given, _ = modes_only.parse_known_args(argv)
    on = {flag for action in mode_actions if getattr(given, action.dest) is not None
          for flag in action.option_strings}
    return [action for action in parser._actions if waived_by(action) in on]


def shown_default(action) -> str:
    """How --help writes a flag's default: off for a switch, none for None or an empty list, a list's items
    space-separated (as they are typed), else the value."""
    default = action.default
    if action.nargs == 0 and default in (False, None):
        return "off"
    if default is None or default == [] or default == "":
        return "none"
    if isinstance(default, (list, tuple)):
        return " ".join(str(v) for v in default)
    return str(default)


def describe(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Write into every flag's help (this parser's and its sub-commands') its default, `(default: X)`, or that it
    is required: `(required)`, or `(required unless --plan)` for a flag a mode flag waives (add_mode_flag). A
    help that already states the default (`(default: 16)`), or explains what no value means (`default: the GPU
    if any`), is left to say it. Deprecated spellings of a flag are named. Done once per parser (safedata.cli.
    parse_args calls it for every CLI)."""
    if getattr(parser, "_described", False):
        return parser
    parser._described = True
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                describe(sub)
            continue
        if (not action.option_strings or action.help == argparse.SUPPRESS or
                isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            continue
        text = (action.help or "").rstrip()
        flat = " ".join(text.split())
        if action.required:
            mode = waived_by(action)
            note = REQUIRED_UNLESS.format(flag=mode) if mode else REQUIRED
        else:
            shown = shown_default(action)
            spellings = {shown} | ({str(int(action.default))} if isinstance(action.default, float) and
                                   action.default.is_integer() else set())    # 60.0 stated as "default: 60"
            stated = any(re.search(rf"\bdefault:?\s+{re.escape(spelling)}(?![\w.-])", flat, re.I)
                         for spelling in spellings)
            note = None if stated or (shown in ("none", "off") and _EXPLAINED.search(flat)) else \
                f"(default: {shown.replace('%', '%%')})"
        old = getattr(action, "deprecated", ())
        parts = [text] if text else []
        parts += [note] if note else []
        parts += [f"(deprecated spelling: {', '.join(old)})"] if old else []
        action.help = " ".join(parts)
    return parser


def from_args(cls, args: argparse.Namespace, **overrides):
    """The dataclass from parsed flags: every field the namespace holds (others keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def replace(config, **changes):
    """A copy of a stage's settings with some changed (dataclasses.replace, lists copied, not shared)."""
    return dataclasses.replace(copy.deepcopy(config), **changes)


# ----------------------------------------------------------------------------- options several stages share


TEMPLATE_HELP = ("prompt template: paper (the paper's Llama-2 wrapper), chat (the tokenizer's own chat template) or "
                 "plain. Default: the model's own: the template it was fine-tuned with here, else chat for a "
                 "tokenizer with a chat template of its own, paper for Llama-2-chat and for tokenizers without one "
                 "(logged; recorded in meta.json)")
ORIGINAL_QUIRKS_HELP = (
    "reproduce what the original code computed, to compare with its released selections and numbers: "
    "examples are tokenised as prompt + ' ' + response + ' ', so the trailing space is a supervised token "
    "before the end token (--template paper only; default: off, the response and the end token as intended)")
FIELD_MAP_HELP = (
    "conversations under other field names, e.g. 'conversation=dialog,role=speaker,content=text,user=customer,"
    "assistant=agent' (names added to the defaults: OpenAI messages with role/content, ShareGPT conversations "
    "with from/value; docs/AUDIT.md)")


def module_names(values) -> list[str]:
    """--lora_target_modules as a list of names: given space-separated, comma-separated, or both."""
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


@dataclass
class LoraArgs:
    """The LoRA adapter's shape, shared by every stage that makes or reads one (finetune.py --lora,
    get_gradients.py --mode lora); `shared(LoraArgs, name, purpose)` places each flag in a stage's settings."""

    lora_r: int = option(8, "rank of the adapter")
    lora_alpha: float = option(32, "alpha (the adapter's scale is alpha / r)")
    lora_target_modules: list[str] = option(
        default_factory=lambda: ["q_proj", "v_proj"], metavar="NAME",
        help="module names the adapter wraps, space- or comma-separated (q_proj v_proj or q_proj,v_proj)")

    def __post_init__(self):
        self.lora_target_modules = module_names(self.lora_target_modules)


@dataclass
class StageArgs:
    """The options the per-example stages share (features, scores, the audit): how records are tokenised,
    sharding, chunks, precision, bad input and how conversations are read (--field_map: an argument of the
    readers, never process state)."""

    template: str | None = option(None, TEMPLATE_HELP, choices=TEMPLATES)
    max_length: int | None = option(None, "truncate examples to this many tokens")
    original_quirks: bool = option(False, ORIGINAL_QUIRKS_HELP)
    shard: str | None = option(None, "I/N: this part of N (default: the SLURM array task, else all)")
    chunk_size: int = option(512, "examples per resumable chunk file")
    dtype: str | None = option("auto", "auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32, fp64")
    device: str | None = option(None, "e.g. cuda:0 or cpu (default: the GPU of LOCAL_RANK if any, else cpu)")
    skip_bad: bool = option(False, "skip (count and log) malformed records instead of stopping at the first; an "
                                   "empty response is not malformed (kept, as the original, with the end token "
                                   "alone supervised)")
    field_map: str | None = option(None, FIELD_MAP_HELP, metavar="SPEC")
