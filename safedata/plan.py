"""Memory plan: what a stage will hold per device, from the model's config alone (no weights are read).

`--plan` on get_gradients.py, get_representation.py and finetune.py prints it and exits. The model is
built on the meta device from its config (`AutoConfig`: a local directory, a config.json path, or a Hub
id already in the local cache), so parameter counts and layer shapes are exact; the rest is arithmetic:

* weights: parameters x bytes of the dtype the stage runs in;
* fine-tuning state: gradients and AdamW's two moments in the dtype of the trained parameters (pure
  bf16: all bf16, the paper's setting; bf16 mixed: fp32 master weights, fp32 gradients and moments,
  plus the bf16 weight copies autocast keeps during a step); LoRA: only the adapter's; FSDP shards
  weights, gradients and optimizer state over the processes and gathers one decoder layer at a time;
* gradient targets (get_gradients.py): per decoder Linear, the factored form (an output-gradient and an
  input vector per anchor token, model dtype) or the dense matrix (fp32), whichever is smaller, as
  `--target_layout auto` stores them; LM-head factors for the supervised anchor tokens; embedding rows
  by token id and norm weights (fp32);
* activations: what autograd (or the gradient hooks) keeps per token and decoder layer for a Llama-style
  block (RMSNorm inputs and outputs, q/k/v after RoPE, attention output and log-sum-exp, the four
  MLP intermediates), times batch x length x layers; plus the vocabulary-sized logits, their fp32
  log-softmax and its gradients at the start of the backward. With gradient checkpointing, one layer's
  input per layer plus one layer's full activations. Forward-only stages (representations) hold the
  residual stream and one layer's intermediates.

The per-device total is the sum; allocator fragmentation and the CUDA context (~0.5-1 GB) come on top.
Sizes are printed in GB (10^9 bytes), as the README states them.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .config import add_mode_flag, without
from .distributed import launched_world_size
from .errors import UserError
from .features.gradients import GradientArgs
from .features.gradients.numerics import FactoredLayer, MEMORY_COST, choose_dense_copies, dense_copy_budget
from .features.representations import RepresentationArgs
from .training import FinetuneArgs, plan_batches, precision_name

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp64": 8, "float64": 8}
PLAN_DEVICES = ("cuda", "cpu")
PLAN_KEYS = {"device": str, "length": int, "nproc": int, "anchors": int, "anchor_tokens": int,
             "response_tokens": int, "targets": int}
PlanSpec = str | list[str] | None     # --plan's KEY=VALUE settings, as parse_settings reads them
PLAN_HELP = ("print the memory plan (weights, targets, activations, optimizer state, per-device total) from the "
             "model's config alone and exit (default: off, the run itself); --model_name may be a directory, a "
             "config.json or a cached Hub id; its first line names the device and dtype planned for. Optional "
             "KEY=VALUE settings, comma- or space-separated: device (cuda or cpu: the machine the run will use, "
             "which need not be this one; default --device, else cuda with --fsdp, else cuda where a GPU is "
             "visible here, else cpu), length (tokens per example; default --max_length, else 512), nproc "
             "(processes/GPUs; default $WORLD_SIZE or 1); for gradients also anchors (10), anchor_tokens (tokens per "
             "anchor, 100), response_tokens (supervised per anchor: --max_response_length, else 10), targets "
             "(default: how many --targets, else 3)")
GB = 1e9
KEY_VALUE_NAMES = ("k_proj", "v_proj", "key", "value", "wk", "wv")


@dataclass
class ModelShape:
    """What the plan needs from a config: exact parameter counts and the Llama-style block dimensions."""

    name: str
    n_params: int
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    decoder_linears: list[tuple[int, int]]   # (in, out) of every Linear inside the decoder layers
    decoder_linear_names: list[str]          # their attribute names (q_proj, ..., down_proj)
    head: tuple[int, int]                     # (in, out) of the LM head
    norm_numel: int                           # all norm weights
    layer_params: int                         # parameters of one decoder layer

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def load_config(name_or_path: str):
    path = Path(name_or_path)
    if not path.exists() and (name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(".json")):
        raise UserError(f"--model_name {name_or_path}: no such file or directory")
    try:
        if path.is_file():
            raw = PretrainedConfig.get_config_dict(str(path))[0]
            if "model_type" not in raw:
                raise UserError(f"{path}: no 'model_type' in this config")
            return AutoConfig.for_model(**raw)
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        if path.exists():
            raise UserError(f"--model_name {name_or_path}: no model config there ({str(err).splitlines()[0]})") \
                from None
        raise UserError(f"--model_name {name_or_path}: config not in the local cache and not reachable "
                        f"({str(err).splitlines()[0]}); pass its config.json") from None


def model_shape(name_or_path: str) -> ModelShape:
    """Build the model on the meta device (no memory, no weights) and read its shapes."""
    config = load_config(name_or_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unique = {id(p): p for p in model.parameters()}
    n_params = sum(p.numel() for p in unique.values())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    layers = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) and
                   type(m[0]).__name__ in (model._no_split_modules or [])), None)
    if layers is None:
        raise UserError(f"--model_name {name_or_path}: {type(model).__name__}: no decoder layers found")
    linears = [(name.rsplit(".", 1)[-1], m) for layer in layers for name, m in layer.named_modules()
               if isinstance(m, nn.Linear)]
    norm_numel = sum(m.weight.numel() for m in model.modules()
                     if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
    return ModelShape(
        name=name_or_path, n_params=n_params, n_layers=len(layers), hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size), n_heads=n_heads,
        n_kv_heads=getattr(text, "num_key_value_heads", None) or n_heads, head_dim=head_dim,
        vocab=embed.weight.shape[0], tied=head is not None and head.weight is embed.weight,
        decoder_linears=[(m.in_features, m.out_features) for _, m in linears],
        decoder_linear_names=[name for name, _ in linears], head=(head.in_features, head.out_features),
        norm_numel=norm_numel, layer_params=sum(p.numel() for p in layers[0].parameters()))


# ----------------------------------------------------------------------------- pieces


def layer_activation_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """Bytes autograd keeps per token for one decoder layer (Llama-style block, SDPA attention)."""
    h, i, b = shape.hidden, shape.intermediate, dtype_bytes
    norms = 2 * (4 * h + b * h)                  # each RMSNorm: its fp32 input/normalised copy and its output
    attention = b * (shape.hidden + 2 * shape.kv_dim + h) + 4 * shape.n_heads   # q, k, v after RoPE, output, lse
    mlp = 4 * b * i                              # gate, act(gate), up, act(gate) * up
    return norms + attention + mlp


def logits_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """Per supervised token at the start of the backward: fp32 log-softmax, its gradient and the logits' gradient
    (plus the logits in the model dtype when that is not fp32)."""
    return shape.vocab * (3 * 4 + (dtype_bytes if dtype_bytes != 4 else 0))


@dataclass(frozen=True)
class PlannedLayer:
    """One 2-D weight of an anchor target as `--target_layout auto` stores it."""
    name: str
    fan_in: int
    fan_out: int
    tokens: int          # factor pairs per target if factored
    factored: bool
    nbytes: int


def _stored(name: str, fan_in: int, fan_out: int, tokens: int, dtype_bytes: int, dense_allowed=True) -> PlannedLayer:
    factored_bytes = tokens * ((fan_in + fan_out) * dtype_bytes + 4)
    factored = not dense_allowed or factored_bytes < fan_in * fan_out * 4
    return PlannedLayer(name, fan_in, fan_out, tokens, factored,
                        factored_bytes if factored else fan_in * fan_out * 4)


def target_layers(shape: ModelShape, anchor_tokens: int, response_tokens: int, dtype_bytes: int) -> list:
    """The decoder Linears and the LM head of one target, each factored or dense, whichever is smaller."""
    layers = []
    per_layer = len(shape.decoder_linears) // shape.n_layers
    last_layer = len(shape.decoder_linears) - per_layer
    for i, ((fan_in, fan_out), name) in enumerate(zip(shape.decoder_linears, shape.decoder_linear_names)):
        # In the last layer only keys and values reach other positions: the other Linears get a gradient at
        # the supervised tokens alone (zero-gradient tokens are not stored).
        tokens = anchor_tokens if i < last_layer or name in KEY_VALUE_NAMES else response_tokens
        layers.append(_stored(f"{i}.{name}", fan_in, fan_out, tokens, dtype_bytes))
    # a tied head's factors are stored beside the embedding's rows, never as a dense matrix
    layers.append(_stored("lm_head", *shape.head, response_tokens, dtype_bytes, dense_allowed=not shape.tied))
    return layers


def target_bytes(shape: ModelShape, anchor_tokens: int, response_tokens: int, dtype_bytes: int) -> int:
    """One anchor target as `--target_layout auto` stores it."""
    total = sum(layer.nbytes for layer in target_layers(shape, anchor_tokens, response_tokens, dtype_bytes))
    total += min(anchor_tokens, shape.vocab) * shape.hidden * 4    # embedding rows by token id
    total += shape.norm_numel * 4
    return total


def dense_copy_bytes(shape: ModelShape, anchor_tokens: int, response_tokens: int, dtype_bytes: int,
                     n_targets: int, device: str) -> int:
    """The dense copies the target bank adds to factored layers where materialising is cheaper (the bank's
    own choice, numerics.choose_dense_copies, on the planned layout)."""
    layers = [FactoredLayer(layer.name, layer.fan_out, layer.fan_in, n_targets * layer.tokens, 0, n_targets)
              for layer in target_layers(shape, anchor_tokens, response_tokens, dtype_bytes) if layer.factored]
    compute_bytes = 8 if dtype_bytes == 8 else 4
    chosen = choose_dense_copies(layers, MEMORY_COST.get(device, 64.0),
                                 dense_copy_budget(shape.n_params * dtype_bytes), compute_bytes)
    return sum(nbytes for _, nbytes in chosen)


@dataclass
class Plan:
    title: str
    settings: dict
    rows: list[tuple[str, float, str]] = field(default_factory=list)   # (what, bytes per device, how)
    target: str = ""     # the first line: the device and dtype planned for, and why that device

    def add(self, what: str, nbytes: float, how: str) -> None:
        self.rows.append((what, float(nbytes), how))

    def get(self, what: str) -> float:
        return next(b for w, b, _ in self.rows if w == what)

    @property
    def total(self) -> float:
        return sum(b for _, b, _ in self.rows)

    def text(self) -> str:
        width = max(len(w) for w, _, _ in self.rows + [("per-device total", 0, "")])
        lines = ([self.target] if self.target else []) + [
            self.title, "  " + ", ".join(f"{k}={v}" for k, v in self.settings.items())]
        lines += [f"  {w:<{width}}  {b / GB:9.3f} GB  {how}" for w, b, how in self.rows]
        lines.append(f"  {'per-device total':<{width}}  {self.total / GB:9.3f} GB  (+ CUDA context and allocator "
                     "slack, ~1 GB on a GPU)")
        return "\n".join(lines)


def _tokens(batch: int, length: int) -> int:
    if batch < 1 or length < 1:
        raise UserError("--plan: batch size and length must be at least 1")
    return batch * length


def plan_finetune(shape: ModelShape, per_device_batch: int, length: int, precision: str = "pure_bf16",
                  nproc: int = 1, fsdp: bool = False, lora: bool = False, lora_r: int = 8,
                  lora_modules: tuple = ("q_proj", "v_proj"), gradient_checkpointing: bool = False,
                  accumulation: int = 1) -> Plan:
    """Per-device memory of one fine-tuning step (precision: as training.precision_name resolves --precision)."""
    tokens = _tokens(per_device_batch, length)
    compute = 2 if precision in ("bf16", "pure_bf16") else 4
    master = 2 if precision == "pure_bf16" else 4
    shard = nproc if fsdp else 1
    plan = Plan(f"memory plan: fine-tuning {shape.name} ({shape.n_params / 1e9:.3f} B parameters)",
                {"precision": precision, "processes": nproc, "fsdp": fsdp, "lora": lora,
                 "per-device batch": per_device_batch, "accumulation": accumulation, "length": length,
                 "gradient checkpointing": gradient_checkpointing})
    p = shape.n_params
    if lora:
        targets = [lin for lin, name in zip(shape.decoder_linears, shape.decoder_linear_names) if name in lora_modules]
        trainable = sum(lora_r * (fan_in + fan_out) for fan_in, fan_out in targets)
        plan.add("weights", p * master / shard, f"{p:,} frozen parameters x {master} bytes" + (f" / {shard}" if shard > 1 else ""))
        plan.add("LoRA params + grads + AdamW", trainable * 16, f"{trainable:,} trainable fp32 parameters x (4+4+8) bytes")
    else:
        how = "fp32 master weights" if master == 4 else "bf16 weights (pure bf16)"
        plan.add("weights", p * master / shard, f"{p:,} x {master} bytes, {how}" + (f", FSDP / {shard}" if shard > 1 else ""))
        plan.add("gradients", p * master / shard, "same dtype as the weights" + (f", / {shard}" if shard > 1 else ""))
        plan.add("AdamW state", 2 * p * master / shard, f"two moments x {master} bytes" + (f", / {shard}" if shard > 1 else ""))
        if precision == "bf16" and not fsdp:
            plan.add("autocast weight copies", p * 2, "bf16 casts of the fp32 weights, cached for a step")
    if fsdp and nproc > 1:
        plan.add("gathered layer", 2 * shape.layer_params * compute,
                 "one decoder layer gathered in full, and the next prefetched")
    layer = layer_activation_bytes(shape, compute)
    if gradient_checkpointing:
        plan.add("activations", tokens * (shape.n_layers * shape.hidden * compute + layer),
                 f"checkpointed: each layer's input + one layer recomputed, {tokens:,} tokens")
    else:
        plan.add("activations", tokens * shape.n_layers * layer,
                 f"{layer:,} bytes/token/layer x {shape.n_layers} layers x {tokens:,} tokens")
    plan.add("logits + loss", tokens * logits_bytes(shape, compute), f"vocab {shape.vocab:,} x {tokens:,} tokens")
    plan.add("backward transients", tokens * 2 * compute * shape.intermediate,
             "one layer's activation gradients while its backward runs")
    return plan


def plan_gradients(shape: ModelShape, batch: int, length: int, dtype_bytes: int = 2, n_targets: int = 3,
                   anchors: int = 10, anchor_tokens: int = 100, response_tokens: int = 10, nproc: int = 1,
                   building_target: bool = False, device: str = "cuda") -> Plan:
    """Per-device memory of exact gradient scoring (or of building one anchor target)."""
    tokens = _tokens(batch, length)
    what = "building an anchor target" if building_target else f"scoring against {n_targets} target(s)"
    plan = Plan(f"memory plan: gradients of {shape.name} ({shape.n_params / 1e9:.3f} B parameters), {what}",
                {"device": device, "dtype bytes": dtype_bytes, "processes": nproc, "batch per process": batch,
                 "length": length, "anchors": anchors, "tokens per anchor": anchor_tokens, "supervised per anchor": response_tokens})
    plan.add("weights", shape.n_params * dtype_bytes, f"{shape.n_params:,} x {dtype_bytes} bytes, frozen: no "
             "gradient or optimizer state (every process holds a copy)")
    one = target_bytes(shape, anchors * anchor_tokens, anchors * response_tokens, dtype_bytes)
    count = 1 if building_target else n_targets
    plan.add("targets", count * one, f"{count} x {one / GB:.3f} GB (factored: {anchors} anchors x {anchor_tokens} "
             "tokens, or dense per layer, whichever is smaller)")
    if not building_target:
        copies = dense_copy_bytes(shape, anchors * anchor_tokens, anchors * response_tokens, dtype_bytes, count,
                                  device)
        plan.add("dense target copies", copies, f"factored layers also held dense where that is faster on {device} "
                 "(within 1 GiB + the weights' size)")
    layer = layer_activation_bytes(shape, dtype_bytes)
    plan.add("activations", tokens * shape.n_layers * layer,
             f"{layer:,} bytes/token/layer x {shape.n_layers} layers x {tokens:,} tokens (weights frozen; the "
             "hooks keep each Linear's input)")
    plan.add("logits + loss", tokens * logits_bytes(shape, dtype_bytes), f"vocab {shape.vocab:,} x {tokens:,} tokens")
    widest = max(fan_in * fan_out for fan_in, fan_out in shape.decoder_linears + [shape.head])
    plan.add("per-layer products", 4 * min(2 ** 26, batch * widest),
             "Gram/factor products or one materialised layer gradient (fp32, chunked to <= 2^26 numbers)")
    return plan


def plan_representations(shape: ModelShape, batch: int, length: int, dtype_bytes: int = 2, nproc: int = 1,
                         device: str = "cuda") -> Plan:
    tokens = _tokens(batch, length)
    plan = Plan(f"memory plan: representations of {shape.name} ({shape.n_params / 1e9:.3f} B parameters)",
                {"device": device, "dtype bytes": dtype_bytes, "processes": nproc, "batch per process": batch,
                 "length": length})
    plan.add("weights", shape.n_params * dtype_bytes, f"{shape.n_params:,} x {dtype_bytes} bytes (every process)")
    plan.add("activations", tokens * dtype_bytes * (4 * shape.hidden + 4 * shape.intermediate),
             "forward only, no LM head: the residual stream, one layer's norm output, attention and MLP "
             "intermediates at their widest")
    return plan


# ----------------------------------------------------------------------------- the CLI side


def parse_settings(spec: PlanSpec) -> dict:
    """'length=512,nproc=2' (or ['device=cuda', 'nproc=2'], --plan's words) -> {'length': 512, 'nproc': 2}."""
    if isinstance(spec, (list, tuple)):
        spec = ",".join(spec)
    settings = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in PLAN_KEYS:
            raise UserError(f"--plan {spec!r}: expected KEY=VALUE with KEY one of {', '.join(PLAN_KEYS)}")
        try:
            settings[key] = PLAN_KEYS[key](value.strip())
        except ValueError:
            raise UserError(f"--plan {spec!r}: {key} must be a number") from None
    if "device" in settings:
        settings["device"] = settings["device"].split(":")[0]
        if settings["device"] not in PLAN_DEVICES:
            raise UserError(f"--plan {spec!r}: device must be one of {', '.join(PLAN_DEVICES)}")
    return settings


NEEDED_UNLESS_PLAN = ("data_path", "output_dir")   # a plan needs the model alone


def add_plan_flag(parser: argparse.ArgumentParser, needed: tuple[str, ...] = NEEDED_UNLESS_PLAN) -> None:
    """Add --plan, a mode flag (config.add_mode_flag): the flags in `needed` are required unless --plan is given,
    since a plan needs the model alone. With --plan, the command builds its settings as `without(Args)` (below)."""
    add_mode_flag(parser, "--plan", needed, nargs="*", default=None, metavar="KEY=VALUE", help=PLAN_HELP)


# The settings a plan reads: each stage's, without the flags --plan does without (no field typed str is None).
RepresentationPlanArgs = without(RepresentationArgs, NEEDED_UNLESS_PLAN, "RepresentationPlanArgs")
GradientPlanArgs = without(GradientArgs, NEEDED_UNLESS_PLAN, "GradientPlanArgs")
FinetunePlanArgs = without(FinetuneArgs, NEEDED_UNLESS_PLAN, "FinetunePlanArgs")


def _nproc(settings: dict) -> int:
    return settings.get("nproc") or launched_world_size()


def _planned_device(settings: dict, device: str | None = None, fsdp: bool = False) -> tuple[str, str]:
    """(device type, why): --plan device=..., else --device, else cuda for --fsdp (it shards on GPUs only), else
    a GPU where one is visible here (as models.default_device). A plan made on a login node is the CPU run's
    unless told otherwise, and says so."""
    if settings.get("device"):
        return settings["device"], "--plan device=" + settings["device"]
    if device:
        return device.split(":")[0], "--device " + device
    if fsdp:
        return "cuda", "--fsdp shards on GPUs only"
    if torch.cuda.is_available():
        return "cuda", "a GPU is visible here"
    return "cpu", "no GPU visible here; --plan device=cuda plans the GPU run"


def _dtype_name(name: str | None, device: str) -> str:
    """--dtype as the run resolves it (auto: bf16 on a GPU, fp32 on CPU, as models.resolve_dtype)."""
    if name in (None, "auto"):
        return "bf16" if device == "cuda" else "fp32"
    if name not in DTYPE_BYTES:
        raise UserError(f"--dtype {name!r}: choose from auto, {', '.join(sorted(DTYPE_BYTES))}")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}.get(name, name)


def _dtype_bytes(name: str | None, device: str) -> int:
    return DTYPE_BYTES[_dtype_name(name, device)]


def _target_line(device: str, why: str, dtype: str) -> str:
    return f"plan for device={device}, dtype={dtype}; device: {why}"


def gradient_plan(a: GradientPlanArgs, spec: PlanSpec) -> Plan:
    """The plan of a get_gradients.py run (a: its settings; spec: --plan's KEY=VALUE settings)."""
    settings = parse_settings(spec)
    length = settings.get("length") or a.max_length or 512
    anchor_tokens = settings.get("anchor_tokens") or min(length, 100)
    response = settings.get("response_tokens") or a.max_response_length or min(anchor_tokens, 10)
    device, why = _planned_device(settings, a.device)
    plan = plan_gradients(model_shape(a.model_name), a.batch_size, length, _dtype_bytes(a.dtype, device),
                          n_targets=settings.get("targets") or len(a.targets or []) or 3,
                          anchors=settings.get("anchors") or 10, anchor_tokens=anchor_tokens,
                          response_tokens=response, nproc=_nproc(settings), building_target=bool(a.anchor),
                          device=device)
    plan.target = _target_line(device, why, _dtype_name(a.dtype, device))
    return plan


def representation_plan(a: RepresentationPlanArgs, spec: PlanSpec) -> Plan:
    """The plan of a get_representation.py run (a: its settings)."""
    settings = parse_settings(spec)
    device, why = _planned_device(settings, a.device)
    plan = plan_representations(model_shape(a.model_name), a.batch_size, settings.get("length") or a.max_length or 512,
                                _dtype_bytes(a.dtype, device), _nproc(settings), device)
    plan.target = _target_line(device, why, _dtype_name(a.dtype, device))
    return plan


def finetune_plan(a: FinetunePlanArgs, spec: PlanSpec) -> Plan:
    """The plan of a finetune.py run (a: its settings)."""
    settings = parse_settings(spec)
    nproc = _nproc(settings)
    per_device, accumulation = plan_batches(a.batch_size, a.per_device_batch_size, nproc)
    # What the run will do: auto is fp32 on CPU, pure bf16 on a GPU. --fsdp shards on GPUs only (on CPU the
    # processes run DDP), so an --fsdp plan, made on a login node as often as not, is the GPU run's.
    device, why = _planned_device(settings, getattr(a, "device", None), a.fsdp)
    precision = precision_name(a.precision, cuda=device == "cuda")
    plan = plan_finetune(model_shape(a.model_name), per_device, settings.get("length") or a.max_length or 512,
                         precision, nproc, a.fsdp and device == "cuda", a.lora, a.lora_r, tuple(a.lora_target_modules),
                         a.gradient_checkpointing, accumulation)
    dtype = {"pure_bf16": "bf16 (pure bf16: weights, gradients and AdamW state)",
             "bf16": "bf16 autocast over fp32 master weights", "fp32": "fp32"}[precision]
    if a.fsdp and device != "cuda":
        why += " (--fsdp shards on GPUs only: on cpu the processes run DDP, each holding the whole model)"
    plan.target = _target_line(device, why, dtype)
    return plan


def print_plan(plan: Plan) -> None:
    print(plan.text())
