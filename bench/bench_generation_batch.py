"""Generation batch size on a real model: whole generate.py runs, as the real-model study's evaluation runs them.

The study's evaluation (scripts/real_steps.sh, evaluate_model) answers 520 AdvBench and 200 held-out prompts with
generate.py, greedy, 64 new tokens (batch 16, 64 since this benchmark), and that generation is most of a run's
evaluation (~520 of ~630 s at batch 16).
This runs generate.py on the same prompts once per --batch_sizes entry, in fresh processes, and prints side by
side: seconds, prompts/s, the ratio to the first batch size, and how many answers are the same text as the first
batch size's (and, with --reference, as a responses.jsonl the study wrote). Greedy answers depend on the
batch only through floating-point rounding (left padding is masked; batches group prompts of similar length), so
"same" counts what that rounding flips. No answer text is printed or written: only counts.

  python bench/bench_generation_batch.py --model runs/lab_real/ft/length-top/seed1/model \\
      --prompts ft_datasets/data/harmful_behaviors.csv --n 128 --batch_sizes 16 32 64 \\
      --reference runs/lab_real/ft/length-top/seed1/advbench/responses.jsonl
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, print_table, save


def read_answers(path) -> dict[int, str]:
    from safedata.evaluation import read_responses
    return {record["index"]: record["response"] for record in read_responses(path)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="as generate.py --data_path")
    p.add_argument("--n", type=int, default=128, help="the first n prompts (0: all)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--reference", default=None,
                   help="a responses.jsonl of the same model (e.g. the study's); its first n answers are compared")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--output", default=None, help="JSON of the figures (default: bench/results/generation_batch.json)")
    a = p.parse_args()
    from lab.real import head

    reference = read_answers(a.reference) if a.reference else None
    rows, answers = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / ("prompts" + Path(a.prompts).suffix)
        head(a.prompts, a.n, prompts)
        for batch_size in a.batch_sizes:
            out = Path(tmp) / f"b{batch_size}"
            command = [a.python, str(ROOT / "generate.py"), "--model_name", a.model, "--data_path", str(prompts),
                       "--output_dir", str(out), "--template", "chat", "--max_new_tokens", str(a.max_new_tokens),
                       "--batch_size", str(batch_size), "--device", "cpu", "--dtype", "fp32"]
            start = time.perf_counter()
            done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode:
                sys.exit(f"error: generate.py at batch {batch_size} failed:\n{done.stderr[-2000:]}")
            seconds = time.perf_counter() - start
            answers[batch_size] = read_answers(out / "responses.jsonl")
            rows.append({"batch_size": batch_size, "prompts": len(answers[batch_size]), "seconds": seconds})
    first = a.batch_sizes[0]
    for row in rows:
        mine = answers[row["batch_size"]]
        row["prompts/s"] = row["prompts"] / row["seconds"]
        row[f"time vs batch {first}"] = row["seconds"] / rows[0]["seconds"]
        row[f"same answers as batch {first}"] = sum(mine[i] == answers[first][i] for i in mine)
        if reference is not None:
            row["same answers as --reference"] = sum(mine[i] == reference.get(i) for i in mine)
    print_table(f"generate.py on the first {rows[0]['prompts']} prompts of {a.prompts}, {a.max_new_tokens} new tokens, "
                f"greedy, fp32, CPU, whole processes (model loading included)", rows, list(rows[0]))
    save("generation_batch", {"args": vars(a), "rows": rows}, a.output)


if __name__ == "__main__":
    main()
