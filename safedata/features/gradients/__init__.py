"""Gradient similarity, the paper's method: each pool example's loss gradient against anchor targets, exact,
from one batched forward + backward per batch and never a per-example gradient vector (what is computed,
how, its memory and its files: docs/GRADIENTS.md).

Where each part lives
---------------------
numerics.py      fixed-dtype products (fp32-output matmuls on CUDA) and the per-layer cost model
sites.py         which modules carry the parameters (Linear, Embedding, elementwise norms; LoRA matrices)
context.py       what the engine hands an accumulator: BatchContext, LayerInput, the Accumulator interface, Products
engine.py        the hooks and one batched forward + backward (GradientEngine, get_engine): a run -> BatchResult
layers.py        one strategy per way a layer's products are computed: ghost, materialised, dense, embedding,
                 tied head (choose_linear: the cost model's pick)
accumulators.py  what the hooks compute (Accumulators): scores and norms, anchor capture, random projections
targets.py       Target / ParamTarget, the target file and its build lock
bank.py          the TargetBank: a run's targets per parameter, as the hooks read them
anchors.py       an anchor file -> a target (anchor_gradients)
batch.py         one batch -> Scores or projected features (score_batch with a TargetBank, project_batch)
lora.py          the peft adapter and Adam preconditioning (LESS)
stages.py        the CLI stages: GradientArgs; build_target, score_pool, extract_gradient_features
"""
from ...distributed import init_distributed
from .accumulators import CaptureAccumulator, Captured, ProjectAccumulator, ScoreAccumulator, TargetPieces
from .context import Accumulator, BatchContext, LayerInput, Products
from .anchors import AnchorResult, anchor_gradients
from .bank import TargetBank
from .batch import Scores, bank_for, project_batch, projector_for, score_batch
from .engine import PATHS, BatchResult, GradientEngine, frozen_weights, get_engine
from .lora import AdamState, apply_lora, load_adam_state, lora_settings
from .numerics import MEMORY_COST, TEMP_ELEMENTS, Numerics, linear_costs, memory_cost
from .sites import MODES, PARAMS, Site, discover_sites, unwrap
from .stages import (EXAMPLES_FILE, FEATURES_FILE, GRADIENT_FLAGS, PRODUCTS_FILE, SCORES_FILE, GradientArgs,
                     build_target, extract_gradient_features, run_gradients, score_pool, self_influence_n)
from .targets import LAYOUTS, TARGET_FILE, ParamTarget, Target, load_target

__all__ = ["Accumulator", "AdamState", "anchor_gradients", "AnchorResult", "apply_lora", "bank_for", "BatchContext",
           "BatchResult", "build_target", "CaptureAccumulator", "Captured", "discover_sites", "EXAMPLES_FILE",
           "extract_gradient_features", "FEATURES_FILE", "frozen_weights", "get_engine", "GRADIENT_FLAGS",
           "GradientArgs", "GradientEngine", "init_distributed", "LayerInput", "LAYOUTS", "linear_costs",
           "load_adam_state", "load_target", "lora_settings", "memory_cost", "MEMORY_COST", "MODES", "Numerics",
           "PARAMS", "ParamTarget", "PATHS", "Products", "PRODUCTS_FILE", "project_batch", "ProjectAccumulator",
           "projector_for", "run_gradients", "score_batch", "score_pool", "ScoreAccumulator", "Scores", "SCORES_FILE",
           "self_influence_n", "Site", "Target", "TARGET_FILE", "TargetBank", "TargetPieces", "TEMP_ELEMENTS", "unwrap"]
