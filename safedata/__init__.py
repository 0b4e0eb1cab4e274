"""Find the benign-looking fine-tuning data that breaks an aligned LLM's safety.

The public API (docs/PYTHON.md has a worked example), each stage's function with its settings dataclass, as the
CLIs call them:
  load_examples                                   a data file -> (examples, skipped)        (data.load_examples)
  extract_representations, RepresentationArgs     hidden-state features of anchors or a pool (get_representation.py)
  build_target, score_pool, GradientArgs          gradient scores of a pool against anchor targets (get_gradients.py)
  rank, RankArgs                                  combine anchor-set scores, write the selection (rank.py)
  run_audit, AuditArgs                            score, drop, write the kept set and report.html (audit.py)
  summarize, SummaryArgs                          run folders -> ASR table (summarize.py)
Names are imported on first use (PEP 562): `import safedata` stays light, and loads no torch. The audit's function
is exported as run_audit (safedata.audit.audit): `safedata.audit` is the module, as Python's import sets it.
"""
import importlib

__version__ = "0.1.0"

# name -> the module that defines it ("module:name there" where the name differs)
_EXPORTS = {
    "load_examples": "safedata.data",
    "extract_representations": "safedata.features.representations",
    "RepresentationArgs": "safedata.features.representations",
    "build_target": "safedata.features.gradients.stages",
    "score_pool": "safedata.features.gradients.stages",
    "GradientArgs": "safedata.features.gradients.stages",
    "rank": "safedata.ranking",
    "RankArgs": "safedata.ranking",
    "run_audit": "safedata.audit:audit",
    "AuditArgs": "safedata.audit",
    "summarize": "safedata.summary",
    "SummaryArgs": "safedata.summary",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """safedata.rank and the like, imported from their module on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'safedata' has no attribute {name!r}")
    module, _, attribute = _EXPORTS[name].partition(":")
    value = getattr(importlib.import_module(module), attribute or name)
    globals()[name] = value    # later look-ups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
