"""Gradient similarity, the paper's method: each pool example's loss gradient against anchor targets.

What is computed
----------------
For an example i with tokens supervised by the data template, the loss is its own token mean
L_i = mean_t CE_t, and G_i = dL_i/dtheta over the chosen parameters (default: all of them, as the paper:
embeddings, every Linear, RMSNorm weights, LM head; a tied embedding/LM-head weight counts once, its
gradient being the sum of both uses; `--params linear`: only the decoder's Linear weights, attention +
MLP, LESS-like, no embeddings, norms or LM head). An anchor file gives the target

    T = (1/N) sum_a G_a / ||G_a||                  (not re-normalised unless --renormalize)

and a pool example's score against a target is

    score_i = <G_i, T> / ||G_i|| = mean_a cos(G_i, G_a)

i.e. the paper's (and LESS's) score: the normalised pool gradient against the mean normalised anchor
gradient. With `--renormalize` the stored target is T/||T|| and the score is exactly cos(G_i, T).
||T|| is always recorded in the target's meta.json (`target.norm`), so one converts between the two.

How, without per-example gradient vectors
-----------------------------------------
One batched forward + backward per batch, with every weight's requires_grad off (no .grad buffer, no
weight-gradient matmuls). The batch loss is sum_i L_i, so the output-gradient a hook sees at a token of
example i is example i's own. The input embeddings' output is made a leaf that requires grad, so the
backward flows through activations only. Forward hooks keep each Linear's input x; a tensor hook on its
output receives g = dL/d(output) and, right there, computes for the layer (W = sum_t g_t x_t^T per example):

* ||G_i,W||^2 either by "ghost" Gram products sum_{t,t'} (g_t.g_t')(x_t.x_t')  (cost T^2 (in+out)) or by
  materialising that one layer's per-example gradient (T in out, chunks of examples, a reused buffer
  off CUDA), whichever is cheaper for the batch (`linear_costs`: multiply-adds, plus the passes over a
  materialised gradient weighted by the device's compute/bandwidth ratio, MEMORY_COST);
* <G_i,W, T_j,W> for every target j: against a factored target (anchor tokens k, scaled factors
  T = sum_k s_k G_k X_k^T) as sum_{t,k} (g_t.G_k)(x_t.X_k) (cost T K (in+out)), against a dense one as
  sum_t g_t^T T x_t, or from the materialised gradient when that is cheaper (one GEMM against all dense
  targets of the layer); all targets of a layer in one product, the per-token sums folded into a
  [K, n_targets] matrix. Where the factor products of a layer would cost more than materialising it (many
  anchor tokens, e.g. 3 targets x 100 head tokens against a narrow LM head), the TargetBank adds a dense
  copy of its factored targets (`TargetBank.densify`, within a memory budget) and that layer materialises;
* norm weights (y = w * n(x)): per-example dL/dw = sum_t g_t * n(x_t), n recomputed from the saved
  input by calling the module with w = 1 and w = 0 (exact for RMSNorm);
* embeddings: per (example, token id) rows of the gradient, summed exactly (scatter-add), never a
  vocab x d matrix per example (a token equal to the Embedding's padding_idx adds nothing, as in autograd);
* a tied embedding / LM head: the shared weight's gradient is E_i + H_i; the cross term 2<E_i, H_i> =
  2 sum_{t,s} h-grad_s[id_t] (g_t . h_s) is added (the head's part is kept from its hook until the
  embedding's, as a [B, S, T] tensor).
Products run in fp32 (fp64 for fp64 models): on CUDA low-precision operands go to fp32-output matmuls
(torch.mm(..., out_dtype=float32)), elsewhere they are upcast. Padding is on the right of a causal LM: a
padded position's output-grad is exactly zero and its input finite, so it adds nothing to any product and
no masking copy is made. Results accumulate in [B, n_targets] and [B] buffers; each layer's saved input is
dropped as soon as its backward hook has run.

Exact vs approximate: the scores are exact (up to floating-point summation order) for all of the above.
`--proj_dim` features are random projections (projection.py): unbiased, approximate.

LoRA mode (`--mode lora`, LESS-style)
-------------------------------------
Gradients of the LoRA A and B matrices only (peft; r, alpha, target modules configurable, defaults r=8,
alpha=32, q_proj,v_proj; or an adapter from `--lora_path`). Per-example LoRA gradients are small and are
materialised (one layer at a time). With `--optimizer_state optimizer.pt` (a Trainer's torch-saved Adam
state; index n = the n-th trainable parameter, as LESS reads it) each per-example gradient is replaced by
the Adam update direction (beta1 m + (1-beta1) g) / (sqrt(beta2 v + (1-beta2) g^2) + eps) (LESS puts eps
inside the sqrt; the difference is ~1e-8). LESS applies it to the training pool only: pass it to the
scoring run, not to the anchor run. Note: a fresh adapter (peft's init: random A, B = 0) has dL/dA = 0
exactly, so only B's gradient counts; LESS warms the adapter up first (train briefly, pass --lora_path).

Memory (Llama-2-7B, bf16 on GPU)
--------------------------------
Weights 13.5 GB. No gradient buffers, no optimizer state. Activations of one forward+backward of a batch
(as a training step; weights frozen, so the backward also skips the weight-gradient matmuls), plus per
layer transient products: Gram matrices B*T^2 fp32, factor products B*T*K fp32 (chunked to <= 2^26
numbers), a materialised layer gradient <= 2^26 numbers. Targets live on the device: a factored target
holds, per anchor token, the output-grad and input of every Linear (bf16): about K * 2.5e6 numbers for
Llama-2-7B (sum over its Linears of in+out = 2.5e6), i.e. ~5 GB per target for the paper's 10 anchors of
~100 tokens (prompt + 10 response tokens; prompt tokens carry gradient too), plus LM-head factors for the
supervised tokens only and embedding rows by token id (small). A layer whose factors would outgrow its
dense matrix is stored dense (fp32). The bank's dense copies of factored layers (densify) stay within
1 GiB + the model's size; with the GPU's MEMORY_COST the cost model makes none for this model (factor
products are cheaper than materialising its Linears). Three targets (harmful + two safe) therefore need
~15 GB besides the model: a 40 GB GPU fits batch sizes of a few examples of 512 tokens; 80 GB is
comfortable.

On disk
-------
Target dir (stage "gradient_target"): `target.safetensors` with, per parameter p, some of
  p::dense [shape]                    dense part (fp32/fp64)
  p::fact.g [K, out], p::fact.x [K, in], p::fact.scale [K]   T_p += sum_k scale_k g_k x_k^T (model dtype)
  p::rows.ids [U], p::rows.val [U, d] T_p[ids] += val (embedding rows by token id)
and meta.json (base_meta + `target`: norm, renormalized, per-anchor norms and cosines, layout, bytes).
Score dir (stage "gradient_scores"): `scores.csv` (index,id,<target names>; file order; rows with a
non-finite or zero gradient left out and listed in meta.json `nonfinite`), `products.safetensors`
(inner [N, n_targets], sqnorm [N], fp64: the raw <G_i,T_j> and ||G_i||^2) and meta.json with `targets`.
Feature dir (`--proj_dim`, stage "gradient_features"): features.safetensors [N, proj_dim] like
representations (non-finite rows kept as NaN and listed in `nonfinite`).

Where each part lives
---------------------
numerics.py      fixed-dtype products (fp32-output matmuls on CUDA) and the per-layer cost model
sites.py         which modules carry the parameters (Linear, Embedding, elementwise norms; LoRA matrices)
engine.py        the hooks and one batched forward + backward (GradientEngine, get_engine)
accumulators.py  what the hooks compute: scores and norms, anchor capture, random projections
targets.py       Target / ParamTarget, the target file, and the TargetBank the hooks read
anchors.py       an anchor file -> a target (anchor_gradients)
batch.py         one batch -> scores or projected features (score_batch, project_batch)
lora.py          the peft adapter and Adam preconditioning (LESS)
distributed.py   torchrun process group
stages.py        the CLI stages: build_target, score_pool, extract_gradient_features
"""
from .accumulators import CaptureAccumulator, ProjectAccumulator, ScoreAccumulator
from .anchors import AnchorResult, anchor_gradients
from .batch import bank_for, project_batch, projector_for, score_batch
from .distributed import init_distributed
from .engine import PATHS, GradientEngine, get_engine
from .lora import AdamState, apply_lora, load_adam_state, lora_settings
from .numerics import MEMORY_COST, TEMP_ELEMENTS, Numerics, linear_costs, memory_cost
from .sites import MODES, PARAMS, Site, discover_sites, unwrap
from .stages import (EXAMPLES_FILE, FEATURES_FILE, GRADIENT_FLAGS, PRODUCTS_FILE, SCORES_FILE, build_target,
                     extract_gradient_features, score_pool, self_influence_n)
from .targets import LAYOUTS, TARGET_FILE, ParamTarget, Target, TargetBank, load_target

__all__ = ["AdamState", "AnchorResult", "CaptureAccumulator", "FEATURES_FILE", "GRADIENT_FLAGS", "GradientEngine",
           "LAYOUTS", "MEMORY_COST", "MODES", "Numerics", "PARAMS", "PATHS", "PRODUCTS_FILE", "ParamTarget",
           "ProjectAccumulator", "SCORES_FILE", "ScoreAccumulator", "Site", "TARGET_FILE", "TEMP_ELEMENTS", "Target",
           "TargetBank", "anchor_gradients", "apply_lora", "bank_for", "build_target", "discover_sites",
           "extract_gradient_features", "get_engine", "init_distributed", "linear_costs", "load_adam_state",
           "load_target", "lora_settings", "memory_cost", "project_batch", "projector_for", "score_batch",
           "score_pool", "self_influence_n", "unwrap", "EXAMPLES_FILE"]
