"""Padding against micro-batch size: the time of the paper's effective batch of 20 on a real subset.

finetune.py pads each micro-batch to its longest example (`data.collate`), and its loss is the mean over all
supervised tokens of the effective batch whatever the micro-batch size (tests/test_training.py,
test_micro_batches_and_accumulation_do_not_change_the_result). So a micro-batch smaller than the effective batch
only changes how many padded positions the forward and backward passes compute, and how well the GEMMs use the
cores. This times forward + backward of the same effective batches (a seeded shuffle of the subset, as a
fine-tune's epoch) for each micro-batch size, the gradients accumulated, and prints side by side: seconds per
effective batch, padded tokens / real tokens, and the ratio to the first setting (the batch of 20 with activation
checkpointing: what scripts/lab_real.sh ran first). The AdamW step is left out: it is the same for every setting.

  python bench/bench_microbatch.py --data runs/lab_real/selections/grad/pool_bottom100.json
  python bench/bench_microbatch.py --data SUBSET --micro 20 4 2 1 --batches 2
  python bench/bench_microbatch.py --count_only --data runs/lab_real/selections/*/pool_*100.json

--count_only times nothing: for each subset it counts padded / real tokens of whole epochs (--draws seeded
shuffles) for each micro-batch size.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-aligned"))
    p.add_argument("--data", required=True, nargs="+",
                   help="a subset of records (as finetune.py --data_path); with --count_only, several")
    p.add_argument("--count_only", action="store_true", help="count padded / real tokens only, for every --data")
    p.add_argument("--draws", type=int, default=50, help="--count_only: seeded shuffles (epochs) counted")
    p.add_argument("--template", default="chat")
    p.add_argument("--batch_size", type=int, default=20, help="the effective batch")
    p.add_argument("--micro", type=int, nargs="+", default=[20, 20, 4, 2, 1],
                   help="micro-batch sizes; the first is timed with activation checkpointing, as the baseline")
    p.add_argument("--batches", type=int, default=2, help="effective batches timed per setting")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=None, help="JSON of the figures (default: print only)")
    a = p.parse_args()
    for micro in a.micro:
        if micro < 1 or a.batch_size % micro:
            p.error(f"--micro {micro}: must divide --batch_size {a.batch_size} (as finetune.py requires)")
    from safedata.data import collate, encode_examples, load_examples
    from safedata.data.encoding import pad_token_id
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    tokenizer = AutoTokenizer.from_pretrained(a.model)

    def encoded(path):      # as finetune.py encodes its subset
        examples, _ = load_examples(path)
        return encode_examples(examples, tokenizer, a.template)[0]

    if a.count_only:
        for path in a.data:
            lengths = [len(item) for item in encoded(path)]
            ratios = []
            for micro in dict.fromkeys(a.micro):
                padded = 0
                for draw in range(a.draws):
                    order = list(range(len(lengths)))
                    random.Random(draw).shuffle(order)
                    # micro divides the batch size, so no micro-batch spans two effective batches
                    for start in range(0, len(order), micro):
                        micro_batch = [lengths[i] for i in order[start:start + micro]]
                        padded += len(micro_batch) * max(micro_batch)
                ratios.append(f"{micro}: {padded / (a.draws * sum(lengths)):.2f}")
            print(f"{os.path.relpath(path)}: {len(lengths)} records, mean {sum(lengths) / len(lengths):.0f} tokens, "
                  f"max {max(lengths)}; padded / real by micro-batch: {', '.join(ratios)}")
        return
    if len(a.data) > 1:
        p.error("timing takes one --data")
    items = encoded(a.data[0])
    order = list(range(len(items)))
    random.Random(a.seed).shuffle(order)
    batches = [[items[i] for i in order[s:s + a.batch_size]]
               for s in range(0, a.batch_size * a.batches, a.batch_size)]
    real_tokens = sum(len(item) for batch in batches for item in batch)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.train()
    pad = pad_token_id(tokenizer)

    def effective_batch(batch, micro):
        supervised = sum(item.n_supervised for item in batch)
        padded = 0
        for start in range(0, len(batch), micro):
            inputs = collate(batch[start:start + micro], pad)
            padded += inputs["input_ids"].numel()
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), inputs["labels"][:, 1:].flatten(),
                                                     ignore_index=-100, reduction="sum") / supervised
            loss.backward()
        return padded

    rows = []
    for n, micro in enumerate(a.micro):
        checkpointing = n == 0
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        effective_batch(batches[0][:micro], micro)        # warm-up
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        padded = sum(effective_batch(batch, micro) for batch in batches)
        seconds = (time.perf_counter() - start) / len(batches)
        model.zero_grad(set_to_none=True)
        rows.append({"micro_batch": micro, "checkpointing": checkpointing, "seconds_per_batch": round(seconds, 2),
                     "padded_over_real": round(padded / real_tokens, 3)})
        print(f"micro-batch {micro:3d}{' +checkpointing' if checkpointing else '               '}  "
              f"{seconds:7.2f} s per batch of {a.batch_size}  padded/real {padded / real_tokens:.2f}  "
              f"{seconds / rows[0]['seconds_per_batch']:.2f}x", flush=True)
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(json.dumps({"model": os.path.relpath(a.model, ROOT), "data": a.data[0],
                                              "threads": a.threads, "batches": a.batches, "real_tokens": real_tokens,
                                              "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
