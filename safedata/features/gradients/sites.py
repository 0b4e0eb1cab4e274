"""Which modules carry the parameters whose per-example gradients are assembled (kronfluence calls them
tracked modules): every Linear, the input embedding, elementwise norms; or the LoRA matrices."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...errors import UserError

PARAMS = ("all", "linear")
MODES = ("full", "lora")


@dataclass
class Site:
    """A module whose parameters' per-example gradients we assemble from its inputs and output-grads."""

    module_name: str
    module: nn.Module
    kind: str                   # "linear" | "embedding" | "norm"
    weight: str | None          # canonical parameter name of the weight
    bias: str | None = None
    head: bool = False          # the LM head: sees the supervised positions only
    lora: bool = False          # per-example gradient materialised (LoRA matrices: small; Adam needs it)


def unwrap(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_elementwise_norm(module: nn.Module) -> bool:
    own = dict(module.named_parameters(recurse=False))
    if not own or "weight" not in own or set(own) - {"weight", "bias"}:
        return False
    if isinstance(module, (nn.Linear, nn.Embedding)) or "norm" not in type(module).__name__.lower():
        return False
    if any(True for child in module.children() for _p in child.parameters()):
        return False
    return all(p.dim() == 1 and p.shape == own["weight"].shape for p in own.values())


def discover_sites(model, params="all", mode="full") -> list[Site]:
    """The modules to hook, in module order; refuses a model with parameters it cannot account for."""
    if mode == "full" and params not in PARAMS:
        raise UserError(f"--params {params!r}: choose from {', '.join(PARAMS)}")
    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: choose from {', '.join(MODES)}")
    base = unwrap(model)
    canonical = {id(p): n for n, p in model.named_parameters()}
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    sites: list[Site] = []

    def pname(module, attr):
        p = getattr(module, attr, None)
        return canonical[id(p)] if isinstance(p, nn.Parameter) else None

    if mode == "lora":
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and (".lora_A." in name or ".lora_B." in name):
                sites.append(Site(name, module, "linear", pname(module, "weight"), pname(module, "bias"), lora=True))
        covered = {s.weight for s in sites} | {s.bias for s in sites if s.bias}
        lora_params = [n for n in canonical.values() if "lora_" in n]
        missing = [n for n in lora_params if n not in covered]
        if not sites or missing:
            raise UserError("--mode lora: only LoRA adapters on Linear layers are supported "
                            f"(uncovered LoRA parameters: {missing[:5]})" if missing else
                            "--mode lora: the model has no LoRA Linear layers (check --lora_target_modules)")
        return sites
    if head is not None and not isinstance(head, nn.Linear):
        raise UserError(f"{type(base).__name__}: the output embeddings are not an nn.Linear")
    for name, module in model.named_modules():
        if module is embed:
            if not isinstance(module, nn.Embedding):
                raise UserError(f"{type(base).__name__}: the input embeddings are not an nn.Embedding")
            if params == "all":
                sites.append(Site(name, module, "embedding", pname(module, "weight")))
        elif module is head:
            if params == "all":
                sites.append(Site(name, module, "linear", pname(module, "weight"), pname(module, "bias"), head=True))
        elif isinstance(module, nn.Linear):
            sites.append(Site(name, module, "linear", pname(module, "weight"), pname(module, "bias")))
        elif params == "all" and _is_elementwise_norm(module):
            sites.append(Site(name, module, "norm", pname(module, "weight"), pname(module, "bias")))
    if params == "all":
        covered = {s.weight for s in sites} | {s.bias for s in sites if s.bias}
        missing = [n for n in canonical.values() if n not in covered]
        if missing:
            raise UserError(f"{type(base).__name__}: cannot compute per-example gradients of {len(missing)} "
                            f"parameter(s) ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}); "
                            "supported: Linear, Embedding, elementwise norms (Llama, Mistral, Qwen2); "
                            "use --params linear")
    return sites


def param_shapes(model, sites: list[Site]) -> dict[str, tuple]:
    params = dict(model.named_parameters())
    out = {}
    for s in sites:
        for name in (s.weight, s.bias):
            if name:
                out[name] = tuple(params[name].shape)
    return out
