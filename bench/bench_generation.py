"""Generation: one prompt at a time (the paper's way) against batched left-padded generation, tokens/s.

Both use generate.py's backend (safedata.generation.HFBackend) on the same prompts, greedy,
with EOS disabled so every prompt produces exactly --max_new_tokens tokens.
"""
import tempfile

import torch

from common import ROOT, D, model_for, parser, print_table, save, timed, tokenizer
from safedata.generation import HFBackend

ADVBENCH = ROOT.parent / "shared" / "data" / "advbench" / "harmful_behaviors.csv"
LAB_PROMPTS = ROOT / "ft_datasets" / "lab" / "eval_prompts.jsonl"


def main():
    p = parser(__doc__)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.set_defaults(n=64, hidden=[512], batch_size=16)
    args = p.parse_args()
    device, dtype = torch.device(args.device), {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    tok = tokenizer()
    path = ADVBENCH if ADVBENCH.exists() else LAB_PROMPTS
    examples, _ = D.load_examples(path, need_response=False)
    prompts = [D.prompt_ids(e, "paper", tok) for e in examples[:args.n]]
    rows = []
    for hidden in args.hidden:
        with tempfile.TemporaryDirectory() as tmp:
            model_for(tok, hidden, args.layers, "cpu", torch.float32, args.config).save_pretrained(tmp)
            tok.save_pretrained(tmp)
            backend = HFBackend(tmp, args.dtype, device)
        backend.stop = [-1]  # never stop early: equal work per prompt in both modes

        def run(batch_size):
            out = []
            order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), batch_size):
                chunk = [prompts[i] for i in order[start:start + batch_size]]
                out += backend.generate(chunk, args.max_new_tokens, False, 1.0, 1.0, 0)
            return out

        t_one, one, _ = timed(lambda: run(1), device, 1, warmup=False)
        t_batch, batched, _ = timed(lambda: run(args.batch_size), device, args.repeats)
        tokens = sum(len(r) for r in batched)
        same = sum(a == b for a, b in zip(one, batched))
        for name, t in (("one at a time (paper)", t_one), (f"batched ({args.batch_size})", t_batch)):
            rows.append({"hidden": hidden, "method": name, "tokens/s": tokens / t, "seconds": t,
                         "speed-up vs one at a time": t_one / t,
                         "greedy outputs equal": f"{same}/{len(prompts)}" if name.startswith("batched") else None})
    print_table(f"Generation: {len(prompts)} prompts of {path.name}, {args.max_new_tokens} new tokens, "
                f"{args.layers} layers, {args.device} {args.dtype}", rows,
                ["hidden", "method", "tokens/s", "seconds", "speed-up vs one at a time", "greedy outputs equal"])
    save("generation", {"args": vars(args), "rows": rows}, args.output)


if __name__ == "__main__":
    main()
