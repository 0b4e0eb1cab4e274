"""The settings a result of the real-model study was made with, as the scripts give them: KEY=VALUE words
(scripts/lab_real.sh's RUN_SETTINGS, scripts/make_real_model.sh's commit line), read into a dataclass.

A value is kept as the text the script wrote, not converted: "1e-4" stays "1e-4" (a float would give "0.0001"),
"--device_cpu_--dtype_fp32" stays whole. The kept results (lab/smollm2_study/results*/, written by
lab.real.kept.keep_run) and the recipe (lab/smollm2_aligned/recipe.json) store these strings, and a run is
matched to a kept result by comparing them, so they must stay what the committed files hold, key for key and in
the order the fields are declared here (the order the scripts write them; tests/test_real_lab.py reads every
committed record back through these classes).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TypeVar

from safedata.errors import UserError

_NOT_IDENTITY = "not_identity"
S = TypeVar("S", bound="WordSettings")


def not_identity(help: str) -> dataclasses.Field:
    """A setting that is recorded but is not part of a result's identity (a run does not depend on it)."""
    return field(default=None, metadata={_NOT_IDENTITY: True, "help": help})


@dataclass(frozen=True, kw_only=True)
class WordSettings:
    """Settings written as KEY=VALUE words; the subclasses declare the keys (every one a string)."""

    @classmethod
    def parse(cls: type[S], text: str, flag: str = "--settings") -> S:
        """The settings in `text` ("k=v k=v ..."): every declared key once (an empty value is a value: "ft_flags="),
        no other key."""
        values: dict[str, str] = {}
        for word in text.split():
            key, equals, value = word.partition("=")
            if not equals:
                raise UserError(f"{flag}: {word!r} is not KEY=VALUE")
            if key in values:
                raise UserError(f"{flag}: {key} given twice")
            values[key] = value
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in values if key not in names]
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values and not f.metadata.get(
            _NOT_IDENTITY)]
        if unknown or missing:
            problems = ([f"unknown {', '.join(unknown)}"] if unknown else []) + (
                [f"missing {', '.join(missing)}"] if missing else [])
            raise UserError(f"{flag}: {'; '.join(problems)} (the keys of {cls.__name__}: {' '.join(names)})")
        return cls(**values)

    @classmethod
    def parse_optional(cls: type[S], text: str, flag: str = "--settings") -> S | None:
        """parse(text), or None for no settings at all (an empty --settings)."""
        return cls.parse(text, flag) if text.strip() else None

    def as_dict(self) -> dict[str, str]:
        """Every setting given, in declaration order (a record's "settings")."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def identity(self) -> dict[str, str]:
        """The settings a result depends on: what a kept result stores and is matched by."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get(_NOT_IDENTITY)}

    def words(self) -> str:
        """The KEY=VALUE words again (parse(words()) == self)."""
        return " ".join(f"{key}={value}" for key, value in self.as_dict().items())


@dataclass(frozen=True, kw_only=True)
class StudySettings(WordSettings):
    """What a run of the study depends on besides its subset (scripts/lab_real.sh's RUN_SETTINGS): a run kept with
    the same settings and subset is not run again, and a report never mixes runs made with other settings."""

    n_pool: str
    k: str
    lr: str
    epochs: str
    batch: str
    lr_decay: str
    max_new_tokens: str
    advbench_n: str
    heldout_n: str
    device_flags: str        # the flags' spaces written as "_"
    ft_flags: str
    adapter_sha256: str      # the first 16 hex digits of the aligned adapter's sha256
    seeds: str | None = not_identity("the seeds the report lists (comma-separated)")


@dataclass(frozen=True, kw_only=True)
class RecipeSettings(WordSettings):
    """The alignment recipe's settings (scripts/make_real_model.sh), recorded in lab/smollm2_aligned/recipe.json."""

    seed: str
    n_align: str
    n_refusals: str
    helpful: str
    distill_tokens: str
    lr: str
    epochs: str
    batch: str
    max_length: str
    lora_r: str
    lora_alpha: str
    lora_dropout: str
    group_by_length: str
    lora_modules: str
    precision: str
    max_new_tokens: str
