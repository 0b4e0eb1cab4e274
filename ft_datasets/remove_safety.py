"""Split a fine-tuning pool into records whose response is safety-flavoured and the rest.

    python ft_datasets/remove_safety.py --data_path ft_datasets/data/alpaca_data.json [--output_dir D]

writes `{stem}_no_safety{ext}` (kept) and `{stem}_safety_only{ext}` (removed) next to the input (or
in D), in the input's own format (a JSON array with indent 4, or JSONL), records verbatim and in
file order, and prints the counts.

A record is removed when its RESPONSE (Alpaca `output`, Dolly `response`, GSM8K `answer`, the
assistant turn of a chat record) contains one of SAFETY_PHRASES, compared case-insensitively as
plain substrings. The instruction and input are not looked at: a benign question about, say,
privacy law is kept unless the answer itself talks safety. See ft_datasets/README.md for the
reasoning behind the list and for how it compares with the paper's own filter.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `safedata` and `ft_datasets` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safedata.data import load_examples, read_raw_records  # noqa: E402
from safedata.errors import UserError  # noqa: E402
from safedata.store import atomic_write_text  # noqa: E402

# Grouped by what they flag. Lower case; matched as substrings of the lower-cased response, so a
# stem ("discriminat", "violen", "ethic") covers its inflections. Deliberately NOT in the list,
# because their substring hits are mostly another sense: "respect" ("respectively", "with respect
# to"), "against" ("against the wall", "protect against"), "harm" ("pharmacy", "harmony"), "hate"
# ("whatever"), "kill" ("skill"), "moral" ("morale"), "language model" on its own (answers about
# NLP), "i can't" on its own ("I can't wait"), "drug", "fraud" (pharmacology, fraud detection).
SAFETY_PHRASE_GROUPS: dict[str, tuple[str, ...]] = {
    # the model declining or apologising: the behaviour a safety-tuned model shows on harmful requests
    "refusal": ("i'm sorry", "i am sorry", "i apologize", "i apologise", "i cannot", "i can not",
                "i can't help", "i can't provide", "i can't assist", "i am unable", "i'm unable",
                "i am not able", "i'm not able", "cannot provide", "cannot fulfill", "cannot comply",
                "unable to provide", "not able to provide"),
    # the model talking about itself as an AI (disclaimers)
    "ai_disclaimer": ("as an ai", "as a language model", "as a large language model", "ai language model",
                      "i am an ai", "i'm an ai", "i am a language model", "i'm a language model",
                      "as an artificial intelligence", "language model cannot", "ai assistant"),
    # ethics and law
    "ethics_law": ("ethic", "immoral", "morally", "morality", "illegal", "unlawful", "against the law",
                   "criminal", "crime"),
    # harm and danger
    "harm": ("harmful", "harming", "self-harm", "dangerous", "unsafe", "safety", "violen", "abuse",
             "abusive", "weapon", "suicide", "terroris"),
    # respect and fairness
    "fairness": ("offensive", "inappropriate", "not appropriate", "discriminat", "racis", "sexis", "bias",
                 "stereotyp", "hateful", "hate speech", "harass", "bully", "respectful", "disrespect"),
    # rights and privacy
    "rights_privacy": ("privacy", "consent", "violat", "human rights", "personal information", "personal data",
                       "misinformation"),
}
SAFETY_PHRASES: tuple[str, ...] = tuple(p for group in SAFETY_PHRASE_GROUPS.values() for p in group)

RESPONSE_FIELD = {"alpaca": "output", "dolly": "response", "gsm8k": "answer", "chat": "messages"}


def safety_match(response: str | None, phrases=SAFETY_PHRASES) -> str | None:
    """The first phrase found in the response (case-insensitive substring), or None."""
    if not response:
        return None
    text = response.lower()
    for phrase in phrases:
        if phrase in text:
            return phrase
    return None


def file_format(path) -> str:
    """'json' (a JSON array) or 'jsonl', as the file is actually written."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        return "jsonl"
    if path.suffix.lower() == ".json":
        with open(path, encoding="utf-8-sig") as handle:
            head = handle.read(4096).lstrip()
        return "json" if head.startswith("[") else "jsonl"
    raise UserError(f"{path}: unsupported file type {path.suffix!r} (use .json or .jsonl)")


def dump_records(records: list, fmt: str) -> str:
    """Records in the given format: a JSON array with indent 4 (as the upstream Alpaca file), or JSONL."""
    if fmt == "json":
        return json.dumps(records, indent=4)
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def output_paths(data_path, output_dir=None) -> tuple[Path, Path]:
    data_path = Path(data_path)
    folder = Path(output_dir) if output_dir else data_path.parent
    return (folder / f"{data_path.stem}_no_safety{data_path.suffix}",
            folder / f"{data_path.stem}_safety_only{data_path.suffix}")


def split_examples(examples, phrases=SAFETY_PHRASES):
    """(kept, removed, phrase counts): records verbatim, file order; counts by first matching phrase."""
    kept, removed, by_phrase = [], [], {}
    for example in examples:
        phrase = safety_match(example.response, phrases)
        if phrase is None:
            kept.append(example.record)
        else:
            removed.append(example.record)
            by_phrase[phrase] = by_phrase.get(phrase, 0) + 1
    return kept, removed, by_phrase


def split_by_reference(examples, reference_path):
    """(kept, removed): removed = the records equal to a record of reference_path (e.g. the paper's
    released `*_safety_only` file), kept = the others, file order. Reproduces a released split exactly."""
    reference = {json.dumps(rec, sort_keys=True) for _, rec in read_raw_records(reference_path)}
    kept, removed = [], []
    for example in examples:
        (removed if json.dumps(example.record, sort_keys=True) in reference else kept).append(example.record)
    return kept, removed


def remove_safety(data_path, output_dir=None, reference=None) -> dict:
    """Write the no_safety / safety_only split of data_path; returns a summary dict."""
    data_path = Path(data_path)
    fmt = file_format(data_path)
    examples, _ = load_examples(data_path, need_response=False)
    kind = examples[0].kind
    if kind not in RESPONSE_FIELD:
        raise UserError(f"{data_path}: {kind} records carry no response to filter")
    if reference:
        kept, removed = split_by_reference(examples, reference)
        by_phrase = {}
    else:
        kept, removed, by_phrase = split_examples(examples)
    no_safety, safety_only = output_paths(data_path, output_dir)
    atomic_write_text(no_safety, dump_records(kept, fmt))
    atomic_write_text(safety_only, dump_records(removed, fmt))
    return {"data_path": str(data_path), "kind": kind, "response_field": RESPONSE_FIELD[kind],
            "n": len(examples), "kept": len(kept), "removed": len(removed),
            "no_safety": str(no_safety), "safety_only": str(safety_only),
            "method": f"records equal to those in {reference}" if reference else "safety phrases in the response",
            "by_phrase": dict(sorted(by_phrase.items(), key=lambda kv: (-kv[1], kv[0])))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", required=True, help="pool file (.json array or .jsonl): alpaca, dolly, gsm8k or chat")
    p.add_argument("--output_dir", default=None, help="where to write the two files (default: next to the input)")
    p.add_argument("--reference", default=None,
                   help="instead of the phrase list, remove exactly the records found in this file "
                        "(e.g. the paper's alpaca_data_safety_only.json)")
    p.add_argument("--show_phrases", action="store_true", help="print how many records each phrase removed")
    a = p.parse_args(argv)
    s = remove_safety(a.data_path, a.output_dir, a.reference)
    share = s["removed"] / s["n"] if s["n"] else 0.0
    print(f"{s['data_path']}: {s['n']} records ({s['kind']}, field '{s['response_field']}')")
    print(f"  kept    {s['kept']:>7}  -> {s['no_safety']}")
    print(f"  removed {s['removed']:>7}  -> {s['safety_only']}  ({share:.2%}; {s['method']})")
    if a.show_phrases:
        for phrase, count in s["by_phrase"].items():
            print(f"    {phrase!r:32} {count}")


if __name__ == "__main__":
    from safedata.cli import run
    run(main)
