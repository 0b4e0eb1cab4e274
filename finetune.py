"""Fine-tune a model on a selected subset (the paper's recipe by default); writes an HF checkpoint.

One process:  python finetune.py --model_name M --data_path subset.json --output_dir runs/ft/x
Several GPUs: torchrun --standalone --nproc_per_node 2 finetune.py ... --fsdp   (the paper: 2 GPUs, pure bf16)
Memory first: python finetune.py --model_name M --plan nproc=2 --fsdp
"""
import argparse

from safedata import plan
from safedata.cli import add_field_map_arg, add_lora_args, add_template_arg, module_names, parse_args, run
from safedata.data import INPUT_TYPES
from safedata.training import PRECISIONS, SAVE_DTYPES, FinetuneConfig, finetune


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", required=True, help="Hugging Face id or local directory")
    p.add_argument("--data_path", help=f"the subset: records with responses, {INPUT_TYPES}")
    p.add_argument("--output_dir", help="where the fine-tuned model (or LoRA adapter) and finetune_meta.json go")
    add_template_arg(p)
    p.add_argument("--max_length", type=int, default=None, help="truncate examples to this many tokens")
    g = p.add_argument_group("optimisation (defaults: the paper)")
    g.add_argument("--lr", "--learning_rate", dest="learning_rate", type=float, default=5e-5)
    g.add_argument("--epochs", type=int, default=5)
    g.add_argument("--batch_size", type=int, default=20,
                   help="effective batch: per-device batch x gradient accumulation x processes")
    g.add_argument("--per_device_batch_size", type=int, default=None,
                   help="micro-batch per process (default: batch_size / processes); accumulation makes up the rest")
    g.add_argument("--lr_decay", type=float, default=0.85, help="lr multiplied by this after every epoch")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=float, default=0.0, help="gradient clipping; 0 = off (the paper)")
    g.add_argument("--seed", type=int, default=42, help="initialisation of the run and order of the data")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: pure_bf16 on GPU (the paper's setting), fp32 on CPU; pure_bf16: bf16 weights, "
                        "gradients and optimizer state (the paper's --pure_bf16); bf16: fp32 master weights with "
                        "bf16 autocast (twice the memory); fp32")
    g.add_argument("--save_dtype", choices=SAVE_DTYPES, default="auto",
                   help="dtype of the saved weights (auto: fp32 on CPU and with --precision fp32, else bf16)")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--group_by_length", action="store_true",
                   help="batches of examples of similar length, in random order (less padding, so faster on "
                        "mixed lengths; the paper shuffles without it)")
    l = p.add_argument_group("LoRA")
    l.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all parameters")
    add_lora_args(l, "--lora")
    l.add_argument("--lora_dropout", type=float, default=0.05, help="--lora: dropout of the adapter's input")
    l.add_argument("--merge_lora", action="store_true",
                   help="also write the merged full model to --output_dir (the adapter goes to OUTPUT_DIR/adapter)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard the model over the torchrun processes (FSDP full shard, one unit per decoder layer)")
    p.add_argument("--skip_bad", action="store_true", help="skip (count and log) bad records instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace a finished fine-tune in --output_dir")
    p.add_argument("--reuse_if_same", action="store_true",
                   help="if --output_dir holds a finished fine-tune made with exactly these settings (flags, subset "
                        "content, base model), keep it and exit; one made with other settings is refused, naming "
                        "the differences (the SLURM job's reruns use this)")
    add_field_map_arg(p)
    plan.add_plan_flag(p)
    a = vars(parse_args(p))
    del a["field_map"]  # in force for this process (parse_args); not a training setting
    a["lora_target_modules"] = module_names(a["lora_target_modules"])
    if a["plan"] is not None:
        return plan.print_plan(plan.finetune_plan_from_args(a))
    del a["plan"]
    finetune(FinetuneConfig(**a))


if __name__ == "__main__":
    run(main)
