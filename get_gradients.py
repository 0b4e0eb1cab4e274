"""Gradient similarity (the paper's method): build an anchor target, score a pool against targets, or store
projected per-example gradient features.

  anchor target:  get_gradients.py --anchor --data_path anchors.jsonl --max_response_length 10 --output_dir T
  pool scores:    get_gradients.py --targets T_harmful T_safe1 T_safe2 --data_path pool.json --output_dir S
                  (scores.csv: index,id,<one column per target>; rank.py --scores S combines them)
  features:       get_gradients.py --proj_dim 8192 --data_path FILE --output_dir F   (anchors and pool alike)
  self-influence: get_gradients.py --self_influence --data_path pool.json --output_dir S   (no anchors)
                  (scores.csv: index,id,self_inf,self_inf_n; rank by one: rank.py --scores S --weights 0 1)
Every score dir also has examples.csv: index,id,n_supervised,loss (each example's mean token loss).

Score of pool example i against a target: <G_i, T>/||G_i|| with T = mean over anchors of G_a/||G_a||
(= cos(G_i, T) with --renormalize). Data-parallel: torchrun --nproc_per_node K get_gradients.py ...
"""
import argparse

from safedata import plan
from safedata.cli import (ORIGINAL_QUIRKS_HELP, add_lora_args, add_stage_args, add_template_arg, module_names,
                          parse_args, run)
from safedata.features import gradients as G
from safedata.data import INPUT_TYPES
from safedata.distributed import close_distributed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", required=True, help="Hugging Face id or local directory")
    p.add_argument("--data_path", help=f"anchor or pool records: {INPUT_TYPES}")
    p.add_argument("--output_dir",
                   help="where the target / scores / features go (a rerun with the same settings resumes there)")
    what = p.add_argument_group("what to compute (exactly one)")
    what.add_argument("--anchor", action="store_true", help="build a target from this (anchor) file")
    what.add_argument("--targets", nargs="+", default=None, metavar="DIR", help="score this (pool) file against targets")
    what.add_argument("--proj_dim", type=int, default=None, help="store per-example gradient projections of this size")
    what.add_argument("--self_influence", action="store_true",
                      help="anchor-free scores of this (pool) file: self_inf = ||G_i||^2 and its length-normalised "
                           "self_inf_n = ln(self_inf + 1) + ln(n_supervised + 1) (Guan et al. 2025, Self-Inf-N)")
    p.add_argument("--target_names", nargs="+", default=None, help="score column names (default: the target dir names)")
    p.add_argument("--renormalize", action="store_true",
                   help="--anchor: store T/||T|| so scores are cos(G_i, T) (default: the paper's mean cosine)")
    p.add_argument("--target_layout", choices=G.LAYOUTS, default="auto",
                   help="--anchor: per layer, store the target as scaled factors or dense (auto: whichever is smaller; "
                        "scores are the same)")
    p.add_argument("--proj_seed", type=int, default=0, help="--proj_dim: projection seed (anchors and pool alike)")
    add_template_arg(p)
    p.add_argument("--batch_size", type=int, default=8,
                   help="examples per forward + backward (an out-of-memory error names a smaller one to try)")
    p.add_argument("--max_length", type=int, default=None, help="truncate examples to this many tokens")
    p.add_argument("--max_response_length", type=int, default=None,
                   help="keep only the first N supervised tokens (the paper: 10 for anchors, all for the pool)")
    p.add_argument("--params", choices=G.PARAMS, default="all",
                   help="all: every parameter, as the paper; linear: the decoder's Linear weights only "
                        "(attention + MLP; no embeddings, norms or LM head)")
    p.add_argument("--mode", choices=G.MODES, default="full", help="full gradients, or LoRA gradients (LESS)")
    add_lora_args(p, "--mode lora, a fresh adapter")
    p.add_argument("--lora_path", default=None, help="--mode lora: a trained peft adapter (else a fresh seeded one)")
    p.add_argument("--lora_seed", type=int, default=0, help="--mode lora: seed of a fresh adapter's init")
    p.add_argument("--optimizer_state", default=None,
                   help="--mode lora: a Trainer's optimizer.pt; pool gradients become Adam update directions (LESS)")
    p.add_argument("--original_quirks", action="store_true",
                   help=ORIGINAL_QUIRKS_HELP + "; with --anchor also the original's target: gradients never zeroed "
                        "between anchors, so anchor i contributes the normalised running sum G_0 + ... + G_i (file "
                        "order), averaged over i")
    add_stage_args(p)
    plan.add_plan_flag(p)
    a = parse_args(p)
    if a.plan is not None:
        return plan.print_plan(plan.gradient_plan_from_args(a))
    chosen = [name for name, on in (("--anchor", a.anchor), ("--targets", a.targets), ("--proj_dim", a.proj_dim),
                                    ("--self_influence", a.self_influence)) if on]
    if len(chosen) != 1:
        p.error("give exactly one of --anchor, --targets, --proj_dim, --self_influence"
                + (f" (got {', '.join(chosen)})" if chosen else ""))
    common = dict(template=a.template, batch_size=a.batch_size, max_length=a.max_length,
                  max_response_length=a.max_response_length, params=a.params, mode=a.mode, lora_r=a.lora_r,
                  lora_alpha=a.lora_alpha, lora_target_modules=module_names(a.lora_target_modules), lora_path=a.lora_path,
                  lora_seed=a.lora_seed, optimizer_state=a.optimizer_state, dtype=a.dtype, device=a.device,
                  skip_bad=a.skip_bad, original_quirks=a.original_quirks)
    created = G.init_distributed()
    try:
        if a.anchor:
            G.build_target(a.model_name, a.data_path, a.output_dir, renormalize=a.renormalize,
                           layout=a.target_layout, **common)
        elif a.targets or a.self_influence:
            G.score_pool(a.model_name, a.data_path, a.output_dir, a.targets or [], a.target_names, shard=a.shard,
                         chunk_size=a.chunk_size, self_influence=a.self_influence, **common)
        else:
            G.extract_gradient_features(a.model_name, a.data_path, a.output_dir, a.proj_dim, a.proj_seed,
                                        shard=a.shard, chunk_size=a.chunk_size, **common)
    finally:
        close_distributed(created)


if __name__ == "__main__":
    run(main)
