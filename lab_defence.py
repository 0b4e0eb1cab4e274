"""The lab defence (docs/AUDIT.md), the pieces scripts/lab_defence.sh calls:

  mix:     lab_defence.py mix --pool ft_datasets/lab/pool.json --output_dir RUN/mixes
           held-out benign set, a natural mix and an enriched mix (seeded draws from the pool)
  report:  lab_defence.py report --run_dir RUN [--output_dir docs/lab_defence]
           every run under RUN/ft/ -> RUN/report/ (or --output_dir): table.md, results.json, defence.png,
           per_seed.csv (every run's values) and pooled.csv (the rates' successes pooled over seeds, 95% Wilson
           interval); prints the table
"""
import argparse
import json

from lab import defence
from safedata.cli import parse_args, run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mix", help="draw the held-out benign set and the two mixes")
    m.add_argument("--pool", default="ft_datasets/lab/pool.json", help="the lab's benign pool")
    m.add_argument("--output_dir", required=True, help="writes heldout_benign.json, natural.json, enriched.json")
    m.add_argument("--n_mix", type=int, default=1000, help="examples per mix")
    m.add_argument("--n_heldout", type=int, default=200, help="held-out benign examples (the cost of a drop)")
    m.add_argument("--n_enrich", type=int, default=100,
                   help="examples of the natural mix replaced by answers opening like the compliant form")
    m.add_argument("--seed", type=int, default=0, help="seed of the draws")
    r = sub.add_parser("report", help="table and plot of a lab_defence.sh run")
    r.add_argument("--run_dir", required=True, help="the OUT of scripts/lab_defence.sh")
    r.add_argument("--data_dir", default="ft_datasets/lab", help="the lab data (eval_compliant.jsonl, model/)")
    r.add_argument("--batch_size", type=int, default=16, help="batch size of the loss passes")
    r.add_argument("--output_dir", default=None, help="default: RUN_DIR/report (docs/lab_defence for the docs' copy)")
    a = parse_args(p)
    if a.command == "mix":
        print(json.dumps(defence.build_mixes(a.pool, a.output_dir, a.n_mix, a.n_heldout, a.n_enrich, a.seed), indent=1))
    else:
        print(defence.report(a.run_dir, a.data_dir, a.batch_size, a.output_dir)["table"])


if __name__ == "__main__":
    run(main)
