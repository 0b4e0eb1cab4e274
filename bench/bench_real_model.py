"""A real model, whole processes: what each stage costs against the plain pass it is built on, fp32 and bf16.

Model: SmolLM2-135M-Instruct as `make smollm2` writes it (models/smollm2-135m-instruct: 134.5M parameters,
vocabulary 49,152, tied embeddings, GQA), or any Hugging Face directory given with --model. Pool: the first --n
records of the real Alpaca file, the model's own chat template, --max_length 512. Three targets: the paper's
illegal-activities anchors and its two safe counterparts (first 10 answer tokens), built once per dtype before the
timed runs (their build time is reported apart).

Each row is one process, started fresh, timed from start to exit, with its peak resident memory (the process's
own ru_maxrss, read by a wrapper process that runs nothing else):

  train pass       forward + backward with weight gradients (mean token loss, no optimizer step), the same
                   length-bucketed batches the stages use: what a fine-tuning step costs without the optimizer
  scoring          get_gradients.py --targets T_harmful T_safe1 T_safe2 (exact bi-directional scores)
  self-influence   get_gradients.py --self_influence
  forward          the decoder's forward without gradients (no LM head), the same batches
  representations  get_representation.py

and prints, per dtype, scoring / train pass, self-influence / train pass, representations / forward, and per
command bf16 / fp32 time. All processes get --threads CPU threads (OMP_NUM_THREADS); run it on a quiet machine.
--repeats R runs the commands R times, interleaved (train, scoring, ..., train, scoring, ...), and reports each
command's median time and peak: on a virtual machine one process's first touch of fresh memory can cost seconds
more than the next one's, so single runs of a minute differ by 10-20%.

  python bench/bench_real_model.py                       # SmolLM2, 32 records, batch 8, fp32 and bf16
  python bench/bench_real_model.py --n 64 --dtypes fp32 --output bench/results/real_model_fp32.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHARED_PAPER = ROOT.parent / "shared" / "data" / "paper" / "ft_datasets"
# the paper's file names, its misspelling included
ANCHOR_FILES = (SHARED_PAPER / "pure_bad_dataset" / "pure-bad-illegal-activities-selected10.jsonl",
                SHARED_PAPER / "pure_bad_dataset" / "pure-bad-illegal-acticities-selected-10-anchor1.jsonl",
                SHARED_PAPER / "pure_bad_dataset" / "pure-bad-illegal-activities-selected-10-anchor2.jsonl")
LAB = ROOT / "ft_datasets" / "lab"
LAB_ANCHORS = (LAB / "anchors_harmful.jsonl", LAB / "anchors_safe.jsonl", LAB / "anchors_safe2.jsonl")
MAX_LENGTH = 512
COMMANDS = ("train pass", "scoring", "self-influence", "forward", "representations")
RATIOS = (("scoring", "train pass"), ("self-influence", "train pass"), ("representations", "forward"))


# ----------------------------------------------------------------------------- the plain passes (worker processes)


def plain_pass(kind: str, model_dir: str, data: str, dtype: str, batch_size: int) -> None:
    """The counterpart a stage is measured against, on the stage's own encoding and batches."""
    import torch

    from safedata import data as D
    from safedata.features.representations import decoder_of
    from safedata.models import load_model
    from safedata.templates import choose_template
    model, tokenizer = load_model(model_dir, dtype, "cpu")
    template = choose_template(model_dir, None, tokenizer)
    examples, _ = D.load_examples(data)
    encoded, _ = D.encode_examples(examples, tokenizer, template, MAX_LENGTH)
    pad = D.pad_token_id(tokenizer)
    batches = [[encoded[i] for i in b] for b in D.length_bucketed_batches([len(e) for e in encoded], batch_size)]
    if kind == "train":
        model.train()
        for batch in batches:
            tensors = D.collate(batch, pad)
            model(**tensors, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)
    else:
        decoder = decoder_of(model)
        with torch.no_grad():
            for batch in batches:
                tensors = D.collate(batch, pad)
                decoder(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"], use_cache=False)


# ----------------------------------------------------------------------------- measuring a process


def measured(cmd: list[str], env: dict) -> dict:
    """Run cmd through a wrapper process that runs nothing else: wall seconds and the command's peak RSS."""
    wrapper = [sys.executable, __file__, "--wrap", json.dumps(cmd)]
    done = subprocess.run(wrapper, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def wrap(cmd: list[str]) -> None:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        sys.exit(done.returncode)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak / 2**20}))


# ----------------------------------------------------------------------------- the benchmark


def prepare(tmp: Path, n: int) -> tuple[Path, list[Path]]:
    from common import pool_examples
    path, examples = pool_examples(n)
    pool = tmp / "pool.json"
    pool.write_text(json.dumps([e.record for e in examples]))
    anchors = ANCHOR_FILES if all(p.exists() for p in ANCHOR_FILES) else LAB_ANCHORS
    return pool, list(anchors)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    p.add_argument("--n", type=int, default=32, help="pool records (the first N of Alpaca)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=COMMANDS)
    p.add_argument("--repeats", type=int, default=1, help="runs of each command, interleaved; medians reported")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "real_model.json"))
    p.add_argument("--wrap", default=None, help=argparse.SUPPRESS)
    p.add_argument("--plain", nargs=5, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.wrap:
        return wrap(json.loads(a.wrap))
    if a.plain:
        kind, model, data, dtype, batch = a.plain
        return plain_pass(kind, model, data, dtype, int(batch))
    if not Path(a.model, "config.json").exists():
        raise SystemExit(f"{a.model}: no model there (make smollm2 writes SmolLM2-135M-Instruct)")
    from common import machine
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    py = sys.executable
    results: dict = {"model": a.model, "n": a.n, "batch_size": a.batch_size, "threads": a.threads,
                     "repeats": a.repeats, "machine": machine(), "runs": [], "rows": [], "target_build_s": {}}
    with tempfile.TemporaryDirectory(prefix="bench_real_") as tmp:
        tmp = Path(tmp)
        pool, anchors = prepare(tmp, a.n)
        common = ["--model_name", a.model, "--batch_size", str(a.batch_size), "--max_length", str(MAX_LENGTH),
                  "--device", "cpu"]
        for dtype in a.dtypes:
            targets = []
            start = time.perf_counter()
            for number, anchor in enumerate(anchors):
                target = tmp / f"target_{dtype}_{number}"
                subprocess.run([py, "get_gradients.py", "--anchor", "--data_path", str(anchor), "--output_dir",
                                str(target), "--max_response_length", "10", "--dtype", dtype, *common],
                               cwd=ROOT, env=env, check=True, capture_output=True)
                targets.append(str(target))
            results["target_build_s"][dtype] = time.perf_counter() - start
            def commands(repeat: int) -> dict:          # each run writes a new output dir (a finished one is kept)
                return {
                    "train pass": [py, __file__, "--plain", "train", a.model, str(pool), dtype, str(a.batch_size)],
                    "scoring": [py, "get_gradients.py", "--targets", *targets, "--data_path", str(pool),
                                "--output_dir", str(tmp / f"scores_{dtype}_{repeat}"), "--dtype", dtype, *common],
                    "self-influence": [py, "get_gradients.py", "--self_influence", "--data_path", str(pool),
                                       "--output_dir", str(tmp / f"self_{dtype}_{repeat}"), "--dtype", dtype, *common],
                    "forward": [py, __file__, "--plain", "forward", a.model, str(pool), dtype, str(a.batch_size)],
                    "representations": [py, "get_representation.py", "--data_path", str(pool), "--output_dir",
                                        str(tmp / f"reps_{dtype}_{repeat}"), "--dtype", dtype, *common],
                }
            for repeat in range(a.repeats):
                for name in a.commands:
                    run = {"dtype": dtype, "command": name, "repeat": repeat, **measured(commands(repeat)[name], env)}
                    print(f"  {dtype}: {name} (run {repeat + 1}/{a.repeats}): {run['seconds']:.1f} s, "
                          f"{run['peak_rss_mib']:.0f} MiB", flush=True)
                    results["runs"].append(run)
            for name in a.commands:
                runs = [r for r in results["runs"] if r["dtype"] == dtype and r["command"] == name]
                results["rows"].append({"dtype": dtype, "command": name,
                                        "seconds": statistics.median(r["seconds"] for r in runs),
                                        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
                                        "seconds_min": min(r["seconds"] for r in runs),
                                        "seconds_max": max(r["seconds"] for r in runs)})
    by = {(r["dtype"], r["command"]): r for r in results["rows"]}
    results["ratios"] = {f"{x} / {y} ({d})": by[d, x]["seconds"] / by[d, y]["seconds"]
                         for d in a.dtypes for x, y in RATIOS if (d, x) in by and (d, y) in by}
    results["memory_ratios"] = {f"{x} / {y} ({d})": by[d, x]["peak_rss_mib"] / by[d, y]["peak_rss_mib"]
                                for d in a.dtypes for x, y in RATIOS if (d, x) in by and (d, y) in by}
    if len(a.dtypes) == 2:
        results["bf16_over_fp32_time"] = {c: by["bf16", c]["seconds"] / by["fp32", c]["seconds"]
                                          for c in a.commands}
    print(f"\n{a.model}: {a.n} Alpaca records, batch {a.batch_size}, {a.threads} threads, whole processes, "
          f"median of {a.repeats} run(s)")
    print(f"{'dtype':6} {'command':16} {'seconds':>8} {'min-max':>13} {'peak MiB':>9}")
    for r in results["rows"]:
        spread = f"{r['seconds_min']:.1f}-{r['seconds_max']:.1f}"
        print(f"{r['dtype']:6} {r['command']:16} {r['seconds']:8.1f} {spread:>13} {r['peak_rss_mib']:9.0f}")
    for key, value in results["ratios"].items():
        print(f"time   {key}: {value:.2f}x   memory: {results['memory_ratios'][key]:.2f}x")
    for command, value in results.get("bf16_over_fp32_time", {}).items():
        print(f"bf16 / fp32 time, {command}: {value:.2f}x")
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
