"""Representation features: the paper's way vs ours vs a plain forward without the LM head.

paper: batch size 1, every example padded to 512 tokens, a full forward with logits and all
hidden states. ours: safedata.features.representations.representation_batch on length-bucketed
batches with dynamic padding. floor: the decoder's forward on the same batches, nothing else.
"""
import torch

from common import D, anchor_examples, model_for, parser, pool_examples, print_table, save, timed, tokenizer
from safedata.features.representations import decoder_of, representation_batch


def main():
    args = parser(__doc__).parse_args()
    device, dtype = torch.device(args.device), {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    tok = tokenizer()
    path, examples = pool_examples(args.n)
    encoded, _ = D.encode_examples(examples, tok, "paper", max_length=512)
    pad = D.pad_token_id(tok)
    batches = [[encoded[i] for i in b] for b in D.length_bucketed_batches([len(e) for e in encoded], args.batch_size)]
    rows = []
    for hidden in args.hidden:
        model = model_for(tok, hidden, args.layers, device, dtype, args.config)

        @torch.no_grad()
        def paper():
            out = []
            for item in encoded:
                batch = D.collate([item], pad)
                ids = torch.full((1, 512), pad, dtype=torch.long)
                mask = torch.zeros((1, 512), dtype=torch.long)
                ids[0, :len(item)] = batch["input_ids"][0]
                mask[0, :len(item)] = 1
                res = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
                out.append(res.hidden_states[-1][0, len(item) - 1].float().cpu())
            return torch.stack(out)

        def ours():
            return torch.cat([representation_batch(model, b, pad) for b in batches])

        @torch.no_grad()
        def floor():
            decoder = decoder_of(model)
            for b in batches:
                batch = D.collate(b, pad)
                decoder(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        use_cache=False)

        t_ours, feats, _ = timed(ours, device, args.repeats)
        t_floor, _, _ = timed(floor, device, args.repeats)
        t_paper, ref, _ = timed(paper, device, 1, warmup=False)
        order = [e.index for b in batches for e in b]
        position = {e.index: i for i, e in enumerate(encoded)}
        ref = ref[[position[i] for i in order]]
        diff = float((feats - ref).abs().max() / ref.abs().max())
        n = len(encoded)
        for name, t in (("paper (bs1, pad 512, logits+all states)", t_paper), ("ours", t_ours),
                        ("floor (forward, no LM head)", t_floor)):
            rows.append({"hidden": hidden, "method": name, "examples/s": n / t, "seconds": t,
                         "time / ours": t / t_ours, "max rel diff vs paper": diff if name == "ours" else None})
    print_table(f"Representations: {len(encoded)} records of {path.name}, {args.layers} layers, {args.device} {args.dtype}",
                rows, ["hidden", "method", "examples/s", "seconds", "time / ours", "max rel diff vs paper"])
    save("representations", {"args": vars(args), "rows": rows}, args.output)


if __name__ == "__main__":
    main()
