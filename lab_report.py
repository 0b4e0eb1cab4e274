"""The mini safety lab's report (docs/LAB.md): metrics of lab models, random subsets, the demo's result table.

  report:  lab_report.py report --run_dir runs/demo
           every fine-tuned run under RUN/ft/ -> RUN/report/{table.md,table.csv,results.json,metrics.png,scores.png};
           prints the table (mean ± sd over seeds; composition of each subset) and PASS/FAIL lines for the
           expected orderings (top-k above random-k and bottom-k). Exit status 0 either way: the lines say it.
  metrics: lab_report.py metrics --model_name M --responses R [--compliant ft_datasets/lab/eval_compliant.jsonl]
           keyword ASR, compliance rate and keyword-ASR-without-compliance of generate.py's responses;
           with --compliant, the held-out compliant-answer loss (all response tokens, first 5) under M.
  methods: lab_report.py methods --run_dir runs/lab_methods
           the every-method benchmark (make lab-methods): RUN/report/methods.{md,json,png}, with 95% intervals
           (rates: Wilson, seeds pooled; losses: t), per-seed values and each method's selection cost.
           lab_report.py methods --from_json docs/lab_methods/methods.json [--n_prompts 152]
           the same files again from a methods.json alone (no runs), beside it or in --output_dir.
  random:  lab_report.py random --data_path ft_datasets/lab/pool.json --k 100 --seed 1 --output_dir DIR
           a seeded random-k subset in rank.py's format (DIR/pool_random100.json + _index.csv).
"""
import argparse
import json
from pathlib import Path

from safedata.cli import parse_args, run
from safedata.config import DeprecatingStore
from lab import demo_metrics, demo_report


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("report", help="collect a demo run into a table, checks and plots")
    r.add_argument("--run_dir", default="runs/demo", help="the OUT of scripts/demo.sh")
    r.add_argument("--data_dir", default="ft_datasets/lab", help="the lab data (eval_compliant.jsonl, model/)")
    r.add_argument("--output_dir", default=None, help="default: RUN_DIR/report")
    r.add_argument("--k", type=int, default=100, help="subset size (for the cut-offs in the score plot)")
    r.add_argument("--pool_name", default="pool", help="the subsets' file name prefix (rank.py --name)")
    r.add_argument("--batch_size", type=int, default=16, help="batch size of the loss passes")
    r.add_argument("--model_name", default=None, help="the aligned model the runs start from (default: DATA_DIR/model)")
    r.add_argument("--weights", type=float, nargs="+", default=None,
                   help="the weights rank.py used, for the pool score plot (default: 1 -1 -1 ..., as rank.py)")

    m = sub.add_parser("metrics", help="lab metrics of one model")
    m.add_argument("--model_name", required=True, help="the model whose metrics are computed")
    m.add_argument("--responses", default=None, help="generate.py's responses.jsonl")
    m.add_argument("--compliant", default=None, help="held-out compliant answers (eval_compliant.jsonl)")
    m.add_argument("--template", default=None, help="default: the model's fine-tuning template, else paper")
    m.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    m.add_argument("--batch_size", type=int, default=16, help="batch size of the loss passes")
    m.add_argument("--run_dir", default=None,
                   help="instead: a demo run (RUN/gen/responses.jsonl, RUN/eval/summary.json) whose metrics under "
                        "--model_name and --compliant are cached in RUN/lab_metrics.json, where report reads them")

    t = sub.add_parser("methods", help="the every-method benchmark's table (95%% intervals, per seed, cost) and plot")
    t.add_argument("--run_dir", default="runs/lab_methods", help="the OUT of the every-method benchmark")
    t.add_argument("--data_dir", default="ft_datasets/lab", help="the lab data (eval_compliant.jsonl, model/)")
    t.add_argument("--output_dir", default=None, help="default: RUN_DIR/report")
    t.add_argument("--batch_size", type=int, default=16, help="batch size of the loss passes")
    t.add_argument("--model_name", default=None, help="the aligned model the runs start from (default: DATA_DIR/model)")
    t.add_argument("--from_json", default=None,
                   help="instead of a run: re-render from this methods.json (intervals recomputed from its per-seed values)")
    t.add_argument("--n_prompts", type=int, default=None,
                   help="with --from_json, for a methods.json without per-seed prompt counts: prompts per seed (lab: 152)")

    w = sub.add_parser("random", help="write a seeded random-k subset (rank.py's format)")
    w.add_argument("--data_path", required=True, help="the pool the subset is drawn from")
    w.add_argument("--output_dir", "--write_to", required=True, action=DeprecatingStore, deprecated=("--write_to",),
                   help="where the subset and its index CSV go")
    w.add_argument("--k", type=int, default=100, help="the subset's size")
    w.add_argument("--seed", type=int, default=0, help="seed of the draw")
    w.add_argument("--name", default=None, help="file name prefix (default: the pool file's stem)")
    a = parse_args(p)

    if a.command == "report":
        result = demo_report.report(a.run_dir, a.data_dir, a.output_dir, a.k, a.pool_name, a.batch_size, a.model_name,
                            a.weights)
        print(result["table"])
        print(demo_report.format_checks(result["checks"]))
        print("wrote " + ", ".join([*result["plots"].values(), str(result["output_dir"])]))
    elif a.command == "methods":
        from lab import methods
        if a.from_json:
            result = methods.rerender(a.from_json, a.output_dir, a.n_prompts)
        else:
            result = methods.report(a.run_dir, a.data_dir, a.output_dir, a.batch_size, a.model_name)
        print(result["table"])
        print("wrote " + result["plot"])
    elif a.command == "metrics" and a.run_dir:
        if not a.compliant:
            p.error("metrics --run_dir needs --compliant")
        print(json.dumps(demo_metrics.run_metrics(Path(a.run_dir), Path(a.model_name), Path(a.compliant),
                                                  a.batch_size), indent=1))
    elif a.command == "metrics":
        metrics = demo_metrics.model_metrics(a.model_name, a.responses, a.compliant, a.template,
                                             batch_size=a.batch_size)
        if a.output:
            from safedata.store import write_json
            write_json(a.output, metrics)
        print(json.dumps(metrics, indent=1))
    else:
        print(json.dumps(demo_metrics.write_random(a.data_path, a.output_dir, a.k, a.seed, a.name), indent=1))


if __name__ == "__main__":
    run(main)
