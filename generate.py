"""Answer a file of prompts (AdvBench harmful_behaviors.csv, or any .json/.jsonl/.csv records) with a model.

Writes OUTPUT_DIR/responses.jsonl ({index, id, prompt, response} per prompt, file order) and meta.json.
Killed runs resume where they stopped (same flags, same output dir).
"""
import argparse

from safedata.cli import add_field_map_arg, add_template_arg, parse_args, run
from safedata.generation import BACKENDS, GenerationConfig, generate_responses


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", required=True, help="Hugging Face id, local checkpoint or LoRA adapter directory")
    p.add_argument("--data_path", "--prompts", dest="data_path", required=True,
                   help="prompts: AdvBench CSV (one column without header, or goal,target) or alpaca-style records")
    p.add_argument("--output_dir", required=True,
                   help="where responses.jsonl and meta.json go (a rerun with the same flags resumes there)")
    add_template_arg(p)
    p.add_argument("--allow_template_mismatch", action="store_true",
                   help="use --template even though the model was fine-tuned with another one")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per generate call (left-padded; default: 16)")
    p.add_argument("--max_new_tokens", type=int, default=512,
                   help="the longest answer in tokens (default: 512, the paper's)")
    p.add_argument("--do_sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0, help="with --do_sample: softmax temperature (default: 1.0)")
    p.add_argument("--top_p", type=float, default=1.0, help="with --do_sample: nucleus sampling mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (each batch is seeded from it)")
    p.add_argument("--shard", default=None, help="I/N: answer this part of N (default: the SLURM array task, else all)")
    p.add_argument("--backend", choices=BACKENDS, default="hf", help="hf (transformers) or vllm (if installed)")
    p.add_argument("--tensor_parallel_size", type=int, default=1, help="vllm: GPUs per model")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--device", default=None, help="e.g. cuda:0 or cpu (default: the GPU if any)")
    p.add_argument("--skip_bad", action="store_true", help="skip (count and log) bad records instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace responses made with other flags")
    add_field_map_arg(p)
    options = vars(parse_args(p))
    del options["field_map"]  # in force for this process (parse_args); not a generation setting
    generate_responses(GenerationConfig(**options))


if __name__ == "__main__":
    run(main)
