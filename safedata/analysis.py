"""What a selected subset is made of, compared with its pool: lists, math, code, lengths, formats.

The paper observes that the benign examples closest to harmful data are mostly lists, bullet points
and math questions. `classify_format` puts each example into format categories (an example can be
in several), `composition` counts them over a file, `compare` sets a subset against its pool
(share in the subset / share in the pool = over-representation), and `plot_composition` draws it.

The rules are simple text heuristics on the response (and, for math, on the question); each is a
regular expression below, so a surprising number can be traced to the lines that caused it.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

from .data import Example, file_sha256, load_examples
from .errors import UserError
from .plots import plt, save_figure
from .store import atomic_write_text

SHORT_WORDS = 10    # "short": fewer whitespace words than this
LONG_WORDS = 100    # "long_prose": at least this many
MIN_OVER_SHARE = 0.05  # a category counts as over-represented only if it holds at least this share of the subset

# Category -> one-line definition (the order of tables and plots).
CATEGORIES = {
    "list": "at least 2 lines starting with a number ('1.', '1)') or a bullet ('-', '*', '•')",
    "math": "a GSM8K record, arithmetic (numbers joined by + * ^ =, or a spaced - or /), a math question "
            "(calculate, solve, how many...) with numbers in question and answer, or a bare numeric answer",
    "code": "a code fence, a line starting like code (def, import, #include, SELECT, <tag>...), "
            "or several lines ending in '{', '}' or ';'",
    "short": f"response under {SHORT_WORDS} words",
    "long_prose": f"response of {LONG_WORDS}+ words that is not a list, math or code",
    "prose": "neither a list, math nor code",
    "has_input": "the record has a non-empty input / context",
    "affirmative": "response starts with 'Sure', 'Here', 'Certainly', 'Of course' or 'Absolutely'",
}

LIST_LINE = re.compile(r"^[ \t]*(?:(?:\d{1,3}[.)]|[-*•●▪◦–])[ \t]+\S|[•●▪◦]\S|-(?=[A-Za-z]))", re.M)

_NUM = r"\d+(?:[.,]\d+)*"
_TERM = rf"(?:[$€£]?{_NUM}[a-z]?|\b[a-z]\b)"  # 3, 2.5, $4, 2x, x
_ARITH = re.compile(
    rf"(?<![\w.]){_TERM}\s*[+*×÷^]\s*\(?-?{_TERM}"        # 3 + 4, 2x*5, 2^8, 6 ÷ 2
    rf"|(?<![\w.]){_TERM}\s+[-−/]\s+\(?{_TERM}"           # 10 - 4, 12 / 3 (spaced: not 10-20, COVID-19, 1/2 cup)
    rf"|\b\d+\s+x\s+\d+\b"                                 # 3 x 4
    rf"|(?:[$€£]?{_NUM}[a-z]?|\))\s*=\s*[-−$€£(]?\s*{_TERM}", re.I)  # 3 = x, 2x = 10, f(x) = 3
_DATE = re.compile(r"\b\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}\b|\b\d{1,2}:\d{2}\b|\b\d{4}\s*[-/–]\s*\d{2,4}\b")
_MATH_WORDS = re.compile(
    r"\b(?:calculate|compute|solve|evaluate|simplify|sum of|product of|difference between|quotient|"
    r"how many|how much|average|mean of|median|percent(?:age)?|equation|area of|perimeter|volume of|"
    r"square root|factor(?:ial|ise|ize)?|divide[ds]?|multipl(?:y|ied)|convert|probability|"
    r"greatest common|least common|remainder|fraction|decimal|integer)\b", re.I)
_NUMERIC_ANSWER = re.compile(
    rf"^(?:(?:the )?(?:answer|result|total|solution) (?:is|=)\s*|=\s*|x\s*=\s*)?"
    rf"[-−]?[$€£]?{_NUM}(?:\s*(?:%|[a-z]{{1,12}}(?:\s[a-z]{{1,12}})?))?\.?$", re.I)
_FINAL_ANSWER = re.compile(rf"####\s*[-−]?[$€£]?{_NUM}|\b(?:the )?answer is:?\s*[-−]?[$€£]?{_NUM}", re.I)
_YEAR = re.compile(r"^\s*1\d{3}\.?\s*$|^\s*20\d{2}\.?\s*$")

_CODE_START = re.compile(
    r"^[ \t]*(?:def \w+\s*\(|class \w+\s*[:({]|import \w|from [\w.]+ import |#include\b|#!/|"
    r"public (?:static |class |void )|private |function\s*\w*\s*\(|(?:const|let|var) \w+\s*=|"
    r"(?:int|void|float|double|char|bool) \w+\s*[(=;]|print(?:f|ln)?\s*\(|console\.log|System\.out|"
    r"SELECT\b.+\bFROM\b|INSERT INTO\b|UPDATE \w+ SET\b|CREATE (?:TABLE|DATABASE|INDEX)\b|DELETE FROM\b|"
    r"<\?php|<!DOCTYPE|for\s*\(.*;.*;|while\s*\(.*\)\s*[:{]|if\s*\(.*\)\s*\{|for \w+ in .+:$|return\b.*;$)",
    re.M | re.I)
_HTML_LINE = re.compile(r"^[ \t]*</?[a-zA-Z][\w-]*(?:\s[^<>]*)?/?>", re.M)
_BRACE_LINE = re.compile(r"(?:[{};]\s*$)|^\s*[{}]", re.M)
_AFFIRMATIVE = re.compile(r"^\W*(?:sure|here|certainly|of course|absolutely)\b", re.I)


def words(text: str | None) -> int:
    return len((text or "").split())


def is_list(response: str) -> bool:
    return len(LIST_LINE.findall(response)) >= 2


def _has_arithmetic(text: str) -> bool:
    text = _DATE.sub(" ", text)
    return any(re.search(r"\d", m.group(0)) for m in _ARITH.finditer(text))


def is_math(example: Example) -> bool:
    if example.kind == "gsm8k":
        return True
    question = f"{example.instruction}\n{example.input}"
    response = (example.response or "").strip()
    if _has_arithmetic(question) or (_has_arithmetic(response) and not is_code(response)):
        return True
    if _MATH_WORDS.search(question) and re.search(r"\d", question) and re.search(r"\d", response):
        return True
    if _FINAL_ANSWER.search(response):
        return True
    return bool(response) and bool(_NUMERIC_ANSWER.match(response)) and not _YEAR.match(response)


def is_code(response: str) -> bool:
    if "```" in response or _CODE_START.search(response):
        return True
    if len(_HTML_LINE.findall(response)) >= 2:
        return True
    brace_lines = _BRACE_LINE.findall(response)
    return len(brace_lines) >= 2 and any(c in response for c in "{}()=")


def classify_format(example: Example) -> set[str]:
    """The format categories (keys of CATEGORIES) this example falls in."""
    response = example.response or ""
    n_words = words(response)
    found = set()
    if is_list(response):
        found.add("list")
    if is_math(example):
        found.add("math")
    if is_code(response):
        found.add("code")
    if n_words < SHORT_WORDS:
        found.add("short")
    if not found & {"list", "math", "code"}:
        found.add("prose")
        if n_words >= LONG_WORDS:
            found.add("long_prose")
    if (example.input or "").strip():
        found.add("has_input")
    if _AFFIRMATIVE.match(response):
        found.add("affirmative")
    return found


def _stats(values) -> dict:
    if not values:
        return {"mean": 0.0, "median": 0.0}
    return {"mean": round(statistics.fmean(values), 2), "median": float(statistics.median(values))}


def composition(examples) -> dict:
    """Counts and shares of each category, response lengths (whitespace words, characters), kinds."""
    examples = list(examples)
    n = len(examples)
    counts = {c: 0 for c in CATEGORIES}
    kinds: dict[str, int] = {}
    for example in examples:
        for category in classify_format(example):
            counts[category] += 1
        kinds[example.kind] = kinds.get(example.kind, 0) + 1
    responses = [e.response or "" for e in examples]
    return {
        "n": n,
        "counts": counts,
        "shares": {c: (counts[c] / n if n else 0.0) for c in CATEGORIES},
        "response_words": _stats([words(r) for r in responses]),
        "response_chars": _stats([len(r) for r in responses]),
        "kinds": kinds,
    }


def _ratio(a: float, b: float):
    if b == 0:
        return None if a == 0 else math.inf
    return a / b


def _vs_pool(sub: dict, pool: dict) -> dict:
    ratio = {c: _ratio(sub["shares"][c], pool["shares"][c]) for c in CATEGORIES}
    # "over-represented": ratio > 1 and at least MIN_OVER_SHARE of the subset (2 of 100 is noise)
    over = [{"category": c, "subset_share": sub["shares"][c], "pool_share": pool["shares"][c], "ratio": r}
            for c, r in ratio.items() if r is not None and r > 1 and sub["shares"][c] >= MIN_OVER_SHARE]
    over.sort(key=lambda o: (-o["ratio"], o["category"]))
    return {"ratio": ratio, "over_represented": over,
            "words_ratio": _ratio(sub["response_words"]["mean"], pool["response_words"]["mean"])}


def compare(subset_examples, pool_examples) -> dict:
    """Subset vs pool: both compositions, the share ratio per category and the over-represented ones."""
    sub, pool = composition(subset_examples), composition(pool_examples)
    return {"subset": sub, "pool": pool, **_vs_pool(sub, pool)}


def compare_many(subsets: dict, pool_examples=None) -> dict:
    """Several named subsets against one pool (or standalone when pool_examples is None)."""
    pool = composition(pool_examples) if pool_examples is not None else None
    result = {"categories": CATEGORIES, "pool": pool, "subsets": {}}
    for name, examples in subsets.items():
        sub = composition(examples)
        result["subsets"][name] = {"composition": sub, **(_vs_pool(sub, pool) if pool else {})}
    return result


# ----------------------------------------------------------------------------- files, tables, plot


def load_for_analysis(path) -> list[Example]:
    """Any record file with responses; empty responses are allowed (they count as short)."""
    examples, _ = load_examples(path, need_response=False)
    if all(e.response is None for e in examples):
        raise UserError(f"{path}: {examples[0].kind} records carry no response to analyse")
    return examples


def default_names(paths) -> list[str]:
    """File stems, or parent/stem where two stems collide."""
    paths = [Path(p) for p in paths]
    stems = [p.stem for p in paths]
    return [p.stem if stems.count(p.stem) == 1 else f"{p.parent.name}/{p.stem}" for p in paths]


def analyze_files(subset_paths, pool_path=None, names=None, pool_name=None) -> dict:
    subset_paths = [Path(p) for p in subset_paths]
    names = list(names) if names else default_names(subset_paths)
    if len(names) != len(subset_paths):
        raise UserError(f"--name: {len(names)} name(s) for {len(subset_paths)} subset file(s)")
    if len(set(names)) != len(names):
        raise UserError(f"--name: names must differ ({', '.join(names)})")
    pool = load_for_analysis(pool_path) if pool_path else None
    result = compare_many({n: load_for_analysis(p) for n, p in zip(names, subset_paths)}, pool)
    result["pool_name"] = (pool_name or Path(pool_path).stem) if pool_path else None
    result["files"] = {"pool": ({"path": str(pool_path), "sha256": file_sha256(pool_path)} if pool_path else None),
                       "subsets": {n: {"path": str(p), "sha256": file_sha256(p)}
                                   for n, p in zip(names, subset_paths)}}
    return result


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _times(r) -> str:
    if r is None:
        return "-"
    return "inf" if r == math.inf else f"{r:.2f}x"


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per category (share, and ratio to the pool) and the length rows."""
    pool, subsets = result["pool"], result["subsets"]
    header = ["category"]
    if pool:
        header.append(f"{result['pool_name']} (n={pool['n']})")
    for name, s in subsets.items():
        header.append(f"{name} (n={s['composition']['n']})")
        if pool:
            header.append("ratio")
    rows = []
    for c in CATEGORIES:
        row = [c] + ([_pct(pool["shares"][c])] if pool else [])
        for s in subsets.values():
            row.append(_pct(s["composition"]["shares"][c]))
            if pool:
                row.append(_times(s["ratio"][c]))
        rows.append(row)
    for key, label in (("response_words", "words"), ("response_chars", "chars")):
        for stat in ("mean", "median"):
            row = [f"{label} {stat}"] + ([f"{pool[key][stat]:.1f}"] if pool else [])
            for s in subsets.values():
                row.append(f"{s['composition'][key][stat]:.1f}")
                if pool:
                    row.append(_times(_ratio(s["composition"][key][stat], pool[key][stat])))
            rows.append(row)
    return header, rows


def format_table(result: dict) -> str:
    header, rows = table_rows(result)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    lines += _top_lines(result)
    return "\n".join(lines)


def _top_lines(result: dict, top: int = 3) -> list[str]:
    if not result["pool"]:
        return []
    out = []
    for name, s in result["subsets"].items():
        over = [f"{o['category']} {_times(o['ratio'])}" for o in s["over_represented"][:top]]
        out.append(f"most over-represented in {name} (ratio > 1, share >= {MIN_OVER_SHARE:.0%}): "
                   + (", ".join(over) if over else "none"))
    return out


def format_markdown(result: dict, title: str | None = None) -> str:
    header, rows = table_rows(result)
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    top = _top_lines(result)
    if top:
        lines += [""] + [f"- {t}" for t in top]
    return "\n".join(lines) + "\n"


def plot_composition(result: dict, path) -> None:
    """Grouped bars: the share of each category in the pool and in each subset (PNG, Agg backend).

    Accepts a compare() result (subset vs pool) or a compare_many() / analyze_files() result.
    """
    if "subsets" in result:
        series = ([(result.get("pool_name") or "pool", result["pool"])] if result["pool"] else [])
        series += [(name, s["composition"]) for name, s in result["subsets"].items()]
    else:
        series = [("pool", result["pool"]), ("subset", result["subset"])]
    categories = list(CATEGORIES)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(categories) + 0.4 * len(series)), 4.5))
    for i, (name, comp) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(categories))]
        ax.bar(xs, [100 * comp["shares"][c] for c in categories], width, label=f"{name} (n={comp['n']})")
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories)
    ax.set_ylabel("share of examples (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("format composition")
    save_figure(fig, path, dpi=120)


def _jsonable(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def write_outputs(result: dict, output_dir, markdown=None, title=None) -> dict:
    """composition.json and composition.png in output_dir (+ a markdown table); returns their paths."""
    output_dir = Path(output_dir)
    paths = {"json": output_dir / "composition.json", "png": output_dir / "composition.png"}
    atomic_write_text(paths["json"], json.dumps(_jsonable(result), indent=1) + "\n")
    plot_composition(result, paths["png"])
    if markdown:
        paths["markdown"] = Path(markdown)
        atomic_write_text(markdown, format_markdown(result, title))
    return paths
