"""Build the fine-tuning pools, the evaluation prompts and the paper's anchor files in ft_datasets/data/.

    python ft_datasets/prepare.py                          # online: Hugging Face Hub + raw GitHub files
    python ft_datasets/prepare.py --from ../shared/data    # offline: local copies, no network

Files (the paper's names): alpaca_data.json (+ _no_safety / _safety_only), databricks-dolly-15k.jsonl
(+ _no_safety / _safety_only), gsm8k_train.jsonl, gsm8k_test.jsonl, harmful_behaviors.csv (AdvBench
goal,target) and the anchors pure-bad-illegal-activities-selected10.jsonl,
pure-bad-illegal-acticities-selected-10-anchor1.jsonl (sic), pure-bad-illegal-activities-selected-10-anchor2.jsonl
and the three hate-speech files. Each file is validated with safedata.data.load_examples before it
replaces the old one (atomically); a table of files, record counts and sha256 is printed and written
to MANIFEST.json. A source that cannot be found or fetched is reported as skipped (fatal with --strict).

--from DIR expects DIR laid out like ../shared/data (paper/ft_datasets/..., advbench/...); a checkout
of the paper's repository (ft_datasets/...) or a flat folder of the files works too.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script: make `safedata` and `ft_datasets` importable
    sys.path.insert(0, str(HERE.parent))

from ft_datasets import remove_safety as rs  # noqa: E402
from safedata.data import file_sha256, load_examples  # noqa: E402
from safedata.errors import InputError, UserError  # noqa: E402
from safedata.store import write_json  # noqa: E402

DEFAULT_OUTPUT = HERE / "data"
PAPER_REPO = "princeton-nlp/benign-data-breaks-safety"
PAPER_COMMIT = "d44d665c42808ee9dd7ab53a6eb7019bec2780a8"  # 2024-10-01; the commit ../shared/data was checked against
PAPER_RAW = f"https://raw.githubusercontent.com/{PAPER_REPO}/{PAPER_COMMIT}/ft_datasets/"
ALPACA_RAW = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/761dc5bfbdeeffa89b8bff5d038781a4055f796a/alpaca_data.json"
GSM8K_RAW = "https://raw.githubusercontent.com/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/{split}.jsonl"
ADVBENCH_RAW = "https://raw.githubusercontent.com/llm-attacks/llm-attacks/main/data/advbench/harmful_behaviors.csv"


# ----------------------------------------------------------------------------- network (online mode only)
# Everything that touches the network is in this section: two fetchers and the converters from Hub
# rows to the files' formats. Offline mode (--from) never calls them.


def fetch_url(url: str, timeout: float = 120) -> bytes:
    import urllib.request
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (fixed https URLs)
        return response.read()


def hub_rows(repo: str, config: str | None = None, split: str = "train") -> list[dict]:
    from datasets import load_dataset
    return [dict(row) for row in load_dataset(repo, config, split=split)]


def as_json_array(rows, keys) -> bytes:
    """Upstream Alpaca layout: a JSON array, indent 4, ASCII escapes, no trailing newline."""
    return json.dumps([{k: row[k] for k in keys} for row in rows], indent=4).encode("utf-8")


def as_jsonl(rows, keys) -> bytes:
    return "".join(json.dumps({k: row[k] for k in keys}) + "\n" for row in rows).encode("utf-8")


def as_advbench_csv(rows) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["goal", "target"])
    for row in rows:
        writer.writerow([row.get("goal", row.get("prompt")), row["target"]])
    return out.getvalue().encode("utf-8")


ONLINE = {  # output name -> [(description, fetch)], tried in order until one works
    "alpaca_data.json": [
        ("hf:tatsu-lab/alpaca", lambda: as_json_array(hub_rows("tatsu-lab/alpaca"), ("instruction", "input", "output"))),
        (ALPACA_RAW, lambda: fetch_url(ALPACA_RAW))],
    "databricks-dolly-15k.jsonl": [
        ("hf:databricks/databricks-dolly-15k", lambda: as_jsonl(hub_rows("databricks/databricks-dolly-15k"),
                                                               ("instruction", "context", "response", "category")))],
    "gsm8k_train.jsonl": [
        ("hf:openai/gsm8k main/train", lambda: as_jsonl(hub_rows("openai/gsm8k", "main", "train"), ("question", "answer"))),
        (GSM8K_RAW.format(split="train"), lambda: fetch_url(GSM8K_RAW.format(split="train")))],
    "gsm8k_test.jsonl": [
        ("hf:openai/gsm8k main/test", lambda: as_jsonl(hub_rows("openai/gsm8k", "main", "test"), ("question", "answer"))),
        (GSM8K_RAW.format(split="test"), lambda: fetch_url(GSM8K_RAW.format(split="test")))],
    "harmful_behaviors.csv": [
        (ADVBENCH_RAW, lambda: fetch_url(ADVBENCH_RAW)),
        ("hf:walledai/AdvBench", lambda: as_advbench_csv(hub_rows("walledai/AdvBench")))],
}


def fetch_errors() -> tuple[type[BaseException], ...]:
    """What a fetch may fail with when a source is unreachable or unavailable (then: try the next source,
    or skip). Anything else is a bug and propagates."""
    import http.client
    import importlib
    errors: list[type[BaseException]] = [OSError, http.client.HTTPException, ImportError]  # URLError, timeouts,
    # the Hub's HTTP and offline errors and datasets' DatasetNotFoundError are OSErrors; ImportError: no `datasets`
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def fetch_online(name: str, paper_path: str | None) -> tuple[bytes, str]:
    """(bytes, origin) from the first attempt that works; UserError naming every failure."""
    attempts = list(ONLINE.get(name, []))
    if paper_path:
        url = PAPER_RAW + paper_path
        attempts.append((url, lambda: fetch_url(url)))
    failures = []
    expected = fetch_errors()
    for origin, fetch in attempts:
        try:
            return fetch(), origin
        except expected as err:  # a network/Hub failure means "try the next source"; a bug propagates
            failures.append(f"{origin}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    raise UserError("could not fetch (" + "; ".join(failures) + ")")


# ----------------------------------------------------------------------------- what to build


@dataclass
class Source:
    name: str                    # output file name (the paper's)
    kind: str                    # record kind load_examples must find
    local: tuple[str, ...]       # candidate paths under --from DIR, first found wins
    paper_path: str | None = None  # path under the paper repo's ft_datasets/ (online fallback / anchors)
    paper_sha256: str | None = None  # sha256 of the paper's (or upstream) file, when known
    split: bool = False          # also write {stem}_no_safety / {stem}_safety_only
    paper_safety_only: str | None = None  # the paper's released safety-only file (under ft_datasets/)
    note: str = ""


def _candidates(paper_path: str, *extra: str) -> tuple[str, ...]:
    return (f"paper/ft_datasets/{paper_path}", f"ft_datasets/{paper_path}", paper_path,
            Path(paper_path).name, *extra)


ANCHORS = {  # the paper's anchor files, names verbatim (including "acticities")
    "pure-bad-illegal-activities-selected10.jsonl": "d495f9b0b978665590934add644075db7b9db503ac04a353365cc6af6cceaaa2",
    "pure-bad-illegal-acticities-selected-10-anchor1.jsonl": "5e88c881acebda7cb9bc10abe2e6d1582d563b47607d96a787eb0ec34f6ebe98",
    "pure-bad-illegal-activities-selected-10-anchor2.jsonl": "985b4524750e7f57c3523860aa34f9e89c881587c65fb24a2bf86ae47e46a93f",
    "pure-bad-hate-speech-selected-10-original.jsonl": "09ea5f267c8144147be6d5d16f0623679be97fa4c780cfa8896ae9e940a9024e",
    "pure-bad-hate-speech-selected-10-anchor1.jsonl": "af1fc812bc1b2aea69282b6e85287c78088e28ce8c03fd7fbd980e99f3c569d1",
    "pure-bad-hate-speech-selected-10-anchor2.jsonl": "c49002f98b96da0e9a65a5bd7719a5e5c79b0e2c3097fd7016a4ac1c218c99ff",
}

SOURCES = [
    Source("alpaca_data.json", "alpaca", _candidates("alpaca_dataset/alpaca_data.json"), None,
           "2eddafc6b977608d778aaab8dfc7e50e547b3af9826dfb9e909d9fc362e4a419", split=True,
           paper_safety_only="alpaca_dataset/alpaca_data_safety_only.json",
           note="28 records have an empty output (stages need --skip_bad)"),
    Source("databricks-dolly-15k.jsonl", "dolly",
           _candidates("dolly_dataset/databricks-dolly-15k.jsonl", "dolly/databricks-dolly-15k.jsonl"), None,
           None, split=True, paper_safety_only="dolly_dataset/databricks-dolly-15k-safety-only.jsonl"),
    Source("gsm8k_train.jsonl", "gsm8k", _candidates("gsm8k/gsm8k_train.jsonl", "gsm8k/train.jsonl"), None,
           "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
    Source("gsm8k_test.jsonl", "gsm8k", _candidates("gsm8k/gsm8k_test.jsonl", "gsm8k/test.jsonl"), None,
           "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
    Source("harmful_behaviors.csv", "advbench",
           ("advbench/harmful_behaviors.csv", "data/advbench/harmful_behaviors.csv", "harmful_behaviors.csv"), None,
           "6cd1a5c63c07610d7eb67307772ee5606017ee950b5770ab288a2c487489d3e1"),
] + [Source(name, "chat", _candidates(f"pure_bad_dataset/{name}"), f"pure_bad_dataset/{name}", sha)
     for name, sha in ANCHORS.items()]


# ----------------------------------------------------------------------------- validation and writing


@dataclass
class Row:
    file: str
    records: int
    sha256: str
    bytes: int
    kind: str
    source: str
    matches_paper: bool | None = None
    empty_responses: int = 0
    notes: list[str] = field(default_factory=list)


def validate(path: Path, kind: str, shown_as) -> tuple[int, int]:
    """(records, records with an empty response); a one-line InputError if load_examples rejects the file."""
    try:
        examples, _ = load_examples(path, need_response=False)
    except InputError as err:
        raise InputError(shown_as, err.line, err.field, err.problem) from None
    if examples[0].kind != kind:
        raise InputError(shown_as, examples[0].line, None, f"expected {kind} records, found {examples[0].kind}")
    empty = sum(1 for e in examples if e.kind not in ("advbench", "prompt") and not (e.response or "").strip())
    return len(examples), empty


def publish(dest: Path, data: bytes, kind: str, shown_as) -> tuple[int, int]:
    """Write data next to dest, validate it, then rename it onto dest: a bad file never replaces a good one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.stem}.", suffix=dest.suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        counts = validate(Path(tmp), kind, shown_as)
        os.replace(tmp, dest)
        return counts
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def count_records(path: Path, kind: str) -> tuple[int, int]:
    """Like validate, but an empty split file (`[]` or no lines) is 0 records, not an error."""
    text = path.read_text(encoding="utf-8").strip()
    if text in ("", "[]"):
        return 0, 0
    return validate(path, kind, path)


def find_local(root: Path, candidates) -> Path | None:
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    return None


def _row(path: Path, kind: str, source: str, counts, paper_sha=None, notes=()) -> Row:
    sha = file_sha256(path)
    return Row(path.name, counts[0], sha, path.stat().st_size, kind, source,
               None if paper_sha is None else sha == paper_sha, counts[1], list(notes))


def prepare(output_dir=DEFAULT_OUTPUT, from_dir=None, strict=False, paper_split=False, only=None) -> dict:
    """Build every file; returns the manifest (also written to output_dir/MANIFEST.json)."""
    output_dir = Path(output_dir)
    root = Path(from_dir) if from_dir else None
    if root is not None and not root.is_dir():
        raise UserError(f"--from {root}: no such folder")
    rows: list[Row] = []
    skipped: list[dict] = []
    sources = [s for s in SOURCES if not only or s.name in only or Path(s.name).stem in only]
    if only and not sources:
        raise UserError(f"--only {' '.join(only)}: no such file; choose from {', '.join(s.name for s in SOURCES)}")
    for src in sources:
        dest = output_dir / src.name
        try:
            if root is not None:
                found = find_local(root, src.local)
                if found is None:
                    raise UserError(f"not found under {root} (looked for {', '.join(src.local)})")
                data, origin = found.read_bytes(), str(found)
            else:
                data, origin = fetch_online(src.name, src.paper_path)
        except UserError as err:
            skipped.append({"file": src.name, "reason": str(err)})
            if src.split:
                skipped += [{"file": p.name, "reason": f"{src.name} skipped"} for p in rs.output_paths(dest)]
            continue
        counts = publish(dest, data, src.kind, origin)
        notes = [src.note] if src.note and counts[1] else []
        rows.append(_row(dest, src.kind, origin, counts, src.paper_sha256, notes))
        if src.split:
            rows += _split(src, dest, root, paper_split, skipped)
    manifest = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": f"offline (--from {root})" if root is not None else "online",
        "output_dir": str(output_dir),
        "safety_filter": ("the paper's released safety-only files (--paper_split)" if paper_split else
                          f"ft_datasets/remove_safety.py SAFETY_PHRASES ({len(rs.SAFETY_PHRASES)} phrases)"),
        "files": [vars(r) for r in rows],
        "skipped": skipped,
    }
    if only:
        manifest = merge_manifest(output_dir / "MANIFEST.json", manifest)
    write_json(output_dir / "MANIFEST.json", manifest)
    if strict and skipped:
        raise UserError("--strict: skipped " + "; ".join(f"{s['file']} ({s['reason']})" for s in skipped))
    return manifest


def merge_manifest(path: Path, manifest: dict) -> dict:
    """--only rebuilds some files: the earlier manifest's entries for the other files (still present) stay.
    Only this run's skips are listed (an earlier skip says nothing about now)."""
    if not path.exists():
        return manifest
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        old_files = list(old["files"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        print(f"warning: {path}: unreadable, replaced by this run's entries only", file=sys.stderr)
        return manifest
    now = {entry["file"] for entry in manifest["files"] + manifest["skipped"]}
    kept = [f for f in old_files if f.get("file") not in now and (path.parent / f.get("file", "")).is_file()]
    order = {src.name: i for i, src in enumerate(SOURCES)}

    def position(entry):
        name = entry["file"]
        stem = name.replace("_no_safety", "").replace("_safety_only", "")
        return order.get(name, order.get(stem, len(order))), name
    return dict(manifest, files=sorted(kept + manifest["files"], key=position))


def _split(src: Source, dest: Path, root: Path | None, paper_split: bool, skipped: list) -> list[Row]:
    """The no_safety / safety_only files of dest: by the phrase list, or (--paper_split) by the paper's file."""
    reference, method = None, "remove_safety.py phrase list"
    if paper_split:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                if root is not None:
                    found = find_local(root, _candidates(src.paper_safety_only))
                    if found is None:
                        raise UserError(f"the paper's {Path(src.paper_safety_only).name} not found under {root}")
                    reference, method = found, f"records in {found}"
                else:
                    url = PAPER_RAW + src.paper_safety_only
                    reference = Path(tmp) / Path(src.paper_safety_only).name
                    reference.write_bytes(fetch_url(url))
                    method = f"records in {url}"
            except (UserError, *fetch_errors()) as err:
                skipped += [{"file": p.name, "reason": f"--paper_split: {err}"} for p in rs.output_paths(dest)]
                return []
            summary = rs.remove_safety(dest, dest.parent, reference)
    else:
        summary = rs.remove_safety(dest, dest.parent)
    rows = []
    for key in ("no_safety", "safety_only"):
        path = Path(summary[key])
        rows.append(_row(path, src.kind, f"{dest.name} minus/only {method}", count_records(path, src.kind)))
    return rows


def print_table(manifest: dict) -> None:
    rows = manifest["files"]
    width = max([len(r["file"]) for r in rows] + [len(s["file"]) for s in manifest["skipped"]] + [4])
    print(f"{'file':<{width}}  {'records':>7}  {'paper':>5}  sha256")
    for r in rows:
        paper = {True: "same", False: "diff", None: "-"}[r["matches_paper"]]
        extra = f"  ({r['empty_responses']} empty responses)" if r["empty_responses"] else ""
        print(f"{r['file']:<{width}}  {r['records']:>7}  {paper:>5}  {r['sha256']}{extra}")
    for s in manifest["skipped"]:
        print(f"{s['file']:<{width}}  {'skipped':>7}         {s['reason']}")
    print(f"wrote {len(rows)} file(s) to {manifest['output_dir']} ({manifest['mode']}); "
          f"{len(manifest['skipped'])} skipped; manifest: MANIFEST.json")
    print("'paper' = sha256 equal to the paper's (or upstream) file, where known")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--from", dest="from_dir", default=None,
                   help="offline: import local copies from this folder (laid out like ../shared/data)")
    p.add_argument("--output_dir", default=str(DEFAULT_OUTPUT), help="default: ft_datasets/data")
    p.add_argument("--strict", action="store_true", help="a missing source is an error (exit 2), not a skip")
    p.add_argument("--paper_split", action="store_true",
                   help="split the pools with the paper's released *safety_only files instead of "
                        "remove_safety.py's phrase list (reproduces the paper's no-safety pools)")
    p.add_argument("--only", nargs="+", default=None, help="build only these files (names or stems)")
    a = p.parse_args(argv)
    manifest = prepare(a.output_dir, a.from_dir, False, a.paper_split, a.only)
    print_table(manifest)
    if a.strict and manifest["skipped"]:
        raise UserError("--strict: skipped " + "; ".join(f"{s['file']} ({s['reason']})" for s in manifest["skipped"]))


if __name__ == "__main__":
    from safedata.cli import run
    run(main)
