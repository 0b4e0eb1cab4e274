"""The stage settings dataclasses and the CLIs generated from them (safedata/config.py): a flag's type, default
and help are the dataclass field's, every flag of every generated CLI has a help text, and an option shared by
several stages has one type everywhere. Every root CLI's --help, parsed, names each flag's default or that it is
required; an old spelling of a flag still works and prints one deprecation line."""
import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from safedata.audit import AuditArgs
from safedata.config import (LoraArgs, StageArgs, add_mode_flag, add_options, from_args, option, option_fields,
                             shared, waived_by, without)
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


def test_a_mode_flag_waives_required_flags_only_when_given(capsys):
    """add_mode_flag (--plan): the flags it waives are required (argparse's own check) unless it is on the command
    line, found before the rest is parsed; --help says so; the parser keeps them required after a parse."""
    from safedata.cli import parse_args
    parser = argparse.ArgumentParser(prog="x")
    add_options(parser, Sample)
    add_mode_flag(parser, "--mode", ("name",), nargs="*", default=None, help="another mode")
    with pytest.raises(SystemExit):
        parse_args(parser, ["--size", "2"])
    assert "the following arguments are required: --name" in capsys.readouterr().err
    got = parse_args(parser, ["--size", "2", "--mode", "a=1", "b=2"])
    assert got.mode == ["a=1", "b=2"] and got.name is None and got.size == 2
    assert parse_args(parser, ["--mo", "--name", "n"]).name == "n"      # abbreviated as argparse allows
    assert parse_args(parser, ["--name", "n"]).mode is None
    name = next(a for a in parser._actions if a.dest == "name")
    assert name.required and waived_by(name) == "--mode" and name.help.endswith("(required unless --mode)")
    assert "usage: x [-h] --name NAME " in parser.format_usage()       # unbracketed: a normal run needs it
    with pytest.raises(SystemExit):                                   # an error under --mode: the same usage line
        parse_args(parser, ["--mode", "--kind", "z"])
    assert capsys.readouterr().err.startswith("usage: x [-h] --name NAME ")


def test_without_makes_the_settings_of_a_mode_with_honest_types():
    """config.without: the fields but those named, each declaration unchanged, and the class's __post_init__."""
    from safedata import plan
    lean = without(Sample, ("name",), "Lean")
    assert [f.name for f in dataclasses.fields(lean)] == [f.name for f in dataclasses.fields(Sample) if f.name != "name"]
    assert lean() == lean(size=None, ratio=0.5, weights=None, names=["a", "b"], kind="x", on=False, hidden=3)
    assert typing.get_type_hints(lean)["copied"] is float and not hasattr(lean(), "name")
    with pytest.raises(TypeError, match="no field nothing"):
        without(Sample, ("nothing",), "Bad")
    for stage, planned in ((RepresentationArgs, plan.RepresentationPlanArgs), (GradientArgs, plan.GradientPlanArgs),
                           (FinetuneArgs, plan.FinetunePlanArgs)):
        names = {f.name for f in dataclasses.fields(planned)}
        assert names == {f.name for f in dataclasses.fields(stage)} - {"data_path", "output_dir"}, stage
        assert typing.get_type_hints(planned)["model_name"] is str
    assert plan.FinetunePlanArgs(model_name="m", lora_target_modules=["q_proj,k_proj"]).lora_target_modules == [
        "q_proj", "k_proj"]                                         # FinetuneArgs.__post_init__ runs there too


def test_score_args_share_the_stage_options_with_their_own_help():
    """ScoreArgs declares none of the per-example stage options again: each is StageArgs's (one type), with a
    help naming the methods that read it; --chunk_size keeps score.py's default (4096)."""
    fields = {f.name: f for f in dataclasses.fields(ScoreArgs)}
    for name in ("template", "max_length", "shard", "chunk_size", "dtype", "device", "skip_bad", "field_map"):
        assert fields[name].metadata["shared_from"] == (StageArgs, name), name
    assert fields["chunk_size"].default == 4096 and StageArgs().chunk_size == 512
    assert fields["max_length"].metadata["help"] == "compliance: truncate examples to this many tokens"


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


# ----------------------------------------------------------------------------- --help: defaults, required, old names

# The root CLIs that are not generated from a dataclass, with their sub-commands ([] = no sub-command): their
# flags' defaults are argparse's own.
OTHER_CLIS = {"compare_rankings": [None], "analyze": [None], "prepare_model": [None],
              "lab_defence": ["mix", "report"], "lab_report": ["report", "metrics", "methods", "random"],
              "lab_real": ["data", "distill", "loss", "gates", "commit", "build", "head", "same_selections",
                           "stand_in", "report", "agree", "drift", "keep", "kept"]}


def cli_module(script):
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module(script)
    finally:
        sys.path.remove(str(ROOT))


def cli_parser(script, monkeypatch):
    """The parser a CLI's main() builds, captured where it would be parsed."""
    module = cli_module(script)
    captured = {}

    def capture(parser, *args):
        captured["parser"] = parser
        raise Parsed

    with monkeypatch.context() as patch:       # undone on return: the CLI parses for real afterwards
        patch.setattr(module, "parse_args", capture)
        patch.setattr(sys, "argv", [script + ".py"])
        with pytest.raises(Parsed):
            module.main()
    return captured["parser"]


def help_text(script, argv, monkeypatch, capsys):
    """What `script.py *argv --help` prints, run in-process through the CLI's own main()."""
    module = cli_module(script)
    monkeypatch.setattr(sys, "argv", [script + ".py", *argv, "--help"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        module.main()
    assert stop.value.code == 0
    return capsys.readouterr().out


def help_entries(text) -> dict:
    """--help's option entries: {first option string: its help, whitespace flattened}."""
    entries, current, started = {}, None, False
    for line in text.splitlines():
        if line.endswith(":") and not line.startswith(" "):      # "options:", a group's title
            started, current = True, None
            continue
        if not started:
            continue
        match = re.match(r"^  (-\S+?),? ", line + " ")
        if match:
            parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            current = match.group(1)
            entries[current] = parts[1] if len(parts) > 1 else ""
        elif current and line.startswith("      "):
            entries[current] += " " + line.strip()
    return {flag: " ".join(words.split()) for flag, words in entries.items()}


def expected_default(value) -> list[str]:
    """How a default may be written: the value itself (60.0 also as 60); None, [] and '' as 'none'."""
    if value is None or value == [] or value == "":
        return ["none"]
    if isinstance(value, bool):
        return ["off"] if value is False else ["on"]
    if isinstance(value, (list, tuple)):
        return [" ".join(map(str, value))]
    if isinstance(value, float) and value.is_integer():
        return [str(value), str(int(value))]
    return [str(value)]


def check_help(name, parser, entries, defaults: dict):
    """Every flag of `parser` has an entry whose help names its default (defaults: dest -> value, else argparse's
    default), or that it is required."""
    problems = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        text = entries.get(flag)
        if text is None:
            problems.append(f"{flag}: not in --help")
        elif action.required and waived_by(action):
            if f"(required unless {waived_by(action)})" not in text:
                problems.append(f"{flag}: not marked (required unless {waived_by(action)}): {text!r}")
        elif action.required:
            if "(required)" not in text:
                problems.append(f"{flag}: required, not marked (required): {text!r}")
        else:
            value = defaults.get(action.dest, action.default)
            spellings = expected_default(value)
            shown = any(re.search(rf"\bdefault:?\s+{re.escape(s)}(?![\w.-])", text, re.I) for s in spellings)
            # No value (None, a switch off) may be told in words instead: "(default: the GPU if any)".
            explained = spellings in (["none"], ["off"]) and re.search(r"\bdefault:", text, re.I)
            if not (shown or explained):
                problems.append(f"{flag}: default {value!r} not in its help: {text!r}")
    assert not problems, f"{name} --help:\n" + "\n".join(problems)


def dataclass_defaults(cls) -> dict:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f, _ in option_fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


@pytest.mark.parametrize("script", CLIS)
def test_every_generated_cli_help_shows_each_default_and_what_is_required(script, monkeypatch, capsys):
    """`--help` of each generated CLI, parsed: each flag's help names the dataclass's default (a switch: off),
    or (required) / (required unless --plan); the usage line writes what is required without brackets."""
    text = help_text(script, [], monkeypatch, capsys)
    parser = cli_parser(script, monkeypatch)
    check_help(script, parser, help_entries(text), dataclass_defaults(CLIS[script]))
    usage = " ".join(text.split("\n\n")[0].split())
    for action in parser._actions:
        if action.required:
            assert f"[{action.option_strings[0]} " not in usage, (script, action.option_strings[0], usage)


@pytest.mark.parametrize("script", OTHER_CLIS)
def test_every_other_cli_help_shows_each_default_and_what_is_required(script, monkeypatch, capsys):
    parser = cli_parser(script, monkeypatch)
    subs = {name: sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}
    assert sorted(subs) == sorted(c for c in OTHER_CLIS[script] if c), script   # every sub-command is listed
    for command in OTHER_CLIS[script]:
        argv = [command] if command else []
        text = help_text(script, argv, monkeypatch, capsys)
        check_help(" ".join([script, *argv]), subs[command] if command else parser, help_entries(text), {})


def test_the_help_check_reads_what_it_should():
    """The parsing above on a hand-written help: a default found, one missing, a required flag unmarked."""
    text = ("usage: x\n\noptions:\n  -h, --help  show\n  --batch_size BATCH_SIZE\n                        examples per "
            "pass (default:\n                        8)\n  --seed SEED  the seed\n  --name NAME  a name\n")
    entries = help_entries(text)
    assert entries == {"-h": "show", "--batch_size": "examples per pass (default: 8)", "--seed": "the seed",
                       "--name": "a name"}
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_size", type=int, default=8, help="h")
    parser.add_argument("--seed", type=int, default=42, help="h")
    parser.add_argument("--name", required=True, help="h")
    with pytest.raises(AssertionError) as failed:
        check_help("x", parser, entries, {})
    assert "--batch_size" not in str(failed.value)
    assert "--seed: default 42 not in its help" in str(failed.value) and "--name: required" in str(failed.value)


# (script, sub-command, old argv, new argv, dest, value, the one warning line)
DEPRECATED = [
    ("rank", None, ["--write_to", "SEL"], ["--output_dir", "SEL"], "output_dir", "SEL",
     "warning: --write_to is deprecated; use --output_dir"),
    ("evaluate", None, ["--model", "M"], ["--model_name", "M"], "model", "M",
     "warning: --model is deprecated; use --model_name"),
    ("evaluate", None, ["--judge", "none"], ["--judge", "keyword"], "judge", "keyword",
     "warning: --judge none is deprecated; use --judge keyword"),
    ("generate", None, ["--prompts", "P"], ["--data_path", "P"], "data_path", "P",
     "warning: --prompts is deprecated; use --data_path"),
    ("lab_report", "random", ["--write_to", "D"], ["--output_dir", "D"], "output_dir", "D",
     "warning: --write_to is deprecated; use --output_dir"),
    ("lab_real", "loss", ["--model", "M"], ["--model_name", "M"], "model_name", "M",
     "warning: --model is deprecated; use --model_name"),
    ("lab_real", "loss", ["--data", "F"], ["--data_path", "F"], "data_path", "F",
     "warning: --data is deprecated; use --data_path"),
    ("lab_real", "head", ["--data", "F"], ["--data_path", "F"], "data_path", "F",
     "warning: --data is deprecated; use --data_path"),
    ("lab_real", "drift", ["--model", "M"], ["--model_name", "M"], "model_name", "M",
     "warning: --model is deprecated; use --model_name"),
]
# a whole command line's required flags; the flag under test (either spelling) is taken out of it
REQUIRED_FLAGS = {("rank", None): ["--data_path", "P", "--scores", "S", "--output_dir", "SEL"],
                  ("evaluate", None): ["--responses", "R", "--output_dir", "O"],
                  ("generate", None): ["--model_name", "M", "--output_dir", "O", "--data_path", "P"],
                  ("lab_report", "random"): ["--data_path", "P", "--output_dir", "D"],
                  ("lab_real", "loss"): ["--output", "O", "--model_name", "M", "--data_path", "F"],
                  ("lab_real", "head"): ["--n", "1", "--output", "O", "--data_path", "F"],
                  ("lab_real", "drift"): ["--reference", "R", "--base", "B", "--model_name", "M"]}


@pytest.mark.parametrize("case", DEPRECATED, ids=lambda c: " ".join(filter(None, [c[0], c[1], *c[2][:1]])) + (
    f" {c[2][1]}" if c[2][0] == "--judge" else ""))
def test_a_deprecated_spelling_works_and_prints_one_warning_line(case, monkeypatch, capsys):
    from safedata.cli import parse_args as real_parse_args
    script, command, old, new, dest, value, warning = case
    parser = cli_parser(script, monkeypatch)
    prefix = [command] if command else []
    rest = list(REQUIRED_FLAGS[(script, command)])
    # the rest of the line without the flag under test (its other spelling may be required)
    for flag in (old[0], new[0]):
        if flag in rest:
            i = rest.index(flag)
            del rest[i:i + 2]
    capsys.readouterr()
    got_old = real_parse_args(parser, prefix + rest + old)
    err = capsys.readouterr().err
    assert getattr(got_old, dest) == value
    assert [line for line in err.splitlines() if line.strip()] == [warning]
    got_new = real_parse_args(parser, prefix + rest + new)
    assert capsys.readouterr().err == ""                       # the new spelling: no warning
    assert vars(got_old) == vars(got_new)


def test_every_deprecated_spelling_is_tried(monkeypatch):
    """DEPRECATED lists every old spelling the CLIs accept (a new one needs a row there)."""
    found = set()
    for script in [*CLIS, *OTHER_CLIS]:
        parser = cli_parser(script, monkeypatch)
        parsers = [(None, parser)] + [(name, sub) for action in parser._actions
                                      if isinstance(action, argparse._SubParsersAction)
                                      for name, sub in action.choices.items()]
        for command, each in parsers:
            for action in each._actions:
                found |= {(script, command, old) for old in getattr(action, "deprecated", ())}
                found |= {(script, command, f"{action.option_strings[0]} {old}")
                          for old in getattr(action.type, "aliases", {})}
    tried = {(s, c, " ".join(old) if old[0] == "--judge" else old[0]) for s, c, old, *_ in DEPRECATED}
    assert found == tried


def test_an_old_spelling_still_runs_end_to_end(tmp_path):
    """lab_report.py random --write_to: the subset written where the new --output_dir would write it."""
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps([{"instruction": f"Q{i}", "input": "", "output": f"A{i}."} for i in range(10)]))
    runs = {}
    for flag in ("--write_to", "--output_dir"):
        runs[flag] = subprocess.run([sys.executable, str(ROOT / "lab_report.py"), "random", "--data_path", str(pool),
                                     "--k", "3", flag, str(tmp_path / flag.strip("-"))], capture_output=True,
                                    text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert runs[flag].returncode == 0, runs[flag].stderr
    assert (tmp_path / "write_to" / "pool_random3.json").read_bytes() == \
        (tmp_path / "output_dir" / "pool_random3.json").read_bytes()
    lines = lambda run: [line for line in run.stderr.splitlines() if " INFO " not in line and line.strip()]
    assert lines(runs["--write_to"]) == ["warning: --write_to is deprecated; use --output_dir"]
    assert lines(runs["--output_dir"]) == []
