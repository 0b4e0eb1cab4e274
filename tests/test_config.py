"""The stage settings dataclasses and the CLIs generated from them (safedata/config.py): a flag's type, default
and help are the dataclass field's, every flag of every generated CLI has a help text, and an option shared by
several stages has one type everywhere."""
import argparse
import dataclasses
import importlib
import sys
import typing
from pathlib import Path

import pytest

from safedata.audit import AuditArgs
from safedata.config import LoraArgs, StageArgs, add_options, from_args, option, option_fields, shared
from safedata.features.gradients import GradientArgs
from safedata.features.representations import RepresentationArgs
from safedata.evaluation import EvaluateArgs
from safedata.generation import GenerationArgs
from safedata.methods.run import ScoreArgs
from safedata.ranking import RankArgs
from safedata.training import FinetuneArgs

ROOT = Path(__file__).resolve().parents[1]
STAGE_ARGS = (RepresentationArgs, GradientArgs, RankArgs, FinetuneArgs, GenerationArgs, AuditArgs, ScoreArgs,
              EvaluateArgs)
CLIS = {"get_representation": RepresentationArgs, "get_gradients": GradientArgs, "rank": RankArgs,
        "finetune": FinetuneArgs, "generate": GenerationArgs, "audit": AuditArgs, "score": ScoreArgs,
        "evaluate": EvaluateArgs}


@dataclasses.dataclass(kw_only=True)
class Sample:
    name: str = option(help="required")
    size: int | None = option(None, "an optional int")
    ratio: float = option(0.5, "a float", flags=("--r", "--ratio"), group="numbers")
    weights: list[float] | None = option(None, "floats", group="numbers")
    names: list[str] = option(default_factory=lambda: ["a", "b"], help="strings", metavar="N")
    kind: str = option("x", "a choice", choices=("x", "y"))
    on: bool = option(False, "a switch")
    hidden: int = option(3, "for callers only", cli=False)
    copied: float = shared(LoraArgs, "lora_alpha", "--copy")


def sample_parser():
    parser = argparse.ArgumentParser()
    add_options(parser, Sample)
    return parser


def test_flags_follow_the_field_types_defaults_and_metadata():
    parser = sample_parser()
    got = from_args(Sample, parser.parse_args(["--name", "n", "--size", "7", "--r", "0.25", "--weights", "1", "-1",
                                               "--names", "c", "--kind", "y", "--on", "--copied", "2.5"]))
    # the reference: the dataclass built by hand from the same values
    assert got == Sample(name="n", size=7, ratio=0.25, weights=[1.0, -1.0], names=["c"], kind="y", on=True,
                         copied=2.5)
    assert type(got.size) is int and type(got.ratio) is float and all(type(w) is float for w in got.weights)
    assert from_args(Sample, parser.parse_args(["--name", "n"])) == Sample(name="n")   # defaults = the dataclass's
    assert from_args(Sample, parser.parse_args(["--name", "n", "--ratio", "2"])).ratio == 2.0   # both spellings
    with pytest.raises(SystemExit):
        parser.parse_args([])                        # --name has no default: required
    with pytest.raises(SystemExit):
        parser.parse_args(["--name", "n", "--kind", "z"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--name", "n", "--hidden", "1"])      # cli=False: no flag
    actions = {a.dest: a for a in parser._actions}
    assert actions["copied"].help == "--copy: alpha (the adapter's scale is alpha / r)"
    assert actions["names"].metavar == "N" and actions["names"].default == ["a", "b"]
    groups = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups}
    assert groups["numbers"] == ["ratio", "weights"]
    optional = argparse.ArgumentParser()
    add_options(optional, Sample, optional=("name",))
    assert from_args(Sample, optional.parse_args([])).name is None   # required by parse_args unless --plan


def test_a_switch_must_default_to_false():
    @dataclasses.dataclass
    class Bad:
        on: bool = option(True, "a switch that is on already")
    with pytest.raises(TypeError, match="False"):
        add_options(argparse.ArgumentParser(), Bad)


@pytest.mark.parametrize("cls", STAGE_ARGS, ids=lambda c: c.__name__)
def test_every_option_has_help_and_a_shared_option_keeps_its_type(cls):
    for field, annotation in option_fields(cls):
        assert field.metadata["help"].strip(), f"{cls.__name__}.{field.name}: no help text"
        owner = field.metadata.get("shared_from")
        if owner:
            owner_cls, name = owner
            assert annotation == typing.get_type_hints(owner_cls)[name], (cls.__name__, field.name)


class Parsed(Exception):
    pass


@pytest.mark.parametrize("script", CLIS)
def test_every_flag_of_every_generated_cli_has_a_help_text(script, monkeypatch):
    """The CLIs' own parsers, captured where they would parse sys.argv."""
    sys.path.insert(0, str(ROOT))
    try:
        module = importlib.import_module(script)
    finally:
        sys.path.remove(str(ROOT))
    captured = {}

    def capture(parser):
        captured["parser"] = parser
        raise Parsed

    monkeypatch.setattr(module, "parse_args", capture)
    with pytest.raises(Parsed):
        module.main()
    actions = [a for a in captured["parser"]._actions if not isinstance(a, argparse._HelpAction)]
    assert actions
    missing = [a.option_strings[0] for a in actions if not (a.help or "").strip()]
    assert not missing, f"{script}.py: flags without a help text: {missing}"
    dests = {a.dest: a for a in actions}
    for field, _ in option_fields(CLIS[script]):    # every option of the dataclass is a flag, with its default
        assert field.name in dests, (script, field.name)
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        assert dests[field.name].default == default, (script, field.name)


def test_stage_args_hold_the_shared_declarations():
    assert [f.name for f, _ in option_fields(LoraArgs)] == ["lora_r", "lora_alpha", "lora_target_modules"]
    assert "template" in {f.name for f, _ in option_fields(StageArgs)}
