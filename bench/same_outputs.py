"""Do two versions of the project write the same bytes? The check the redesign (issue 18) is merged by.

Checks out one commit into WORK/root (a git worktree, always the same path, so that the paths and the
fingerprints that record them are the same for every commit), runs its scripts and CLIs on fixed inputs into
WORK/out and writes a manifest: the sha256 of every output file, with the fields that measure time, memory or
the machine blanked (VOLATILE_KEYS; nothing else is ignored), plus each CLI's `--help` options. Run it for the
commit before a change and the commit after, then compare the two manifests:

  python bench/same_outputs.py run --commit 3513f24 --manifest /tmp/before.json
  python bench/same_outputs.py run --commit HEAD --manifest /tmp/after.json
  python bench/same_outputs.py compare /tmp/before.json /tmp/after.json

What runs (all on 2 CPU cores, ~10 minutes), each in fp32 on the CPU:
  - scripts/demo.sh at reduced scale: the lab model, a 100-record slice of the lab pool, 16 held-out prompts, one
    seed, k 10, one epoch: gradient and representation features, scores, selections, fine-tunes, responses,
    evaluations, the report's table and results;
  - the paper's recipe scripts (get_representation.sh, get_full_gradient.sh, rank.sh) with a tiny model built by
    scripts/make_tiny_model.py, on 8 lab pool records and the lab's anchors;
  - score.py with every method that needs no download (random, format, bm25, compliance) and rank.py --scores;
  - audit.py (gradient, --drop_k 3): kept and flagged records, flagged.csv, meta.json (report.html is compared
    after its embedded plot is blanked).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

CLIS = ("get_representation.py", "get_gradients.py", "score.py", "rank.py", "audit.py", "finetune.py",
        "generate.py", "evaluate.py", "analyze.py", "compare_rankings.py", "lab_defence.py", "lab_real.py",
        "lab_report.py", "prepare_model.py")
# Fields that measure time or the machine: blanked in JSON; nothing else differs between two identical runs.
VOLATILE_KEYS = re.compile(r"(^|_)(time|times|elapsed|wall|wall_s|seconds|runtime|created|date|started|finished|"
                           r"host|hostname|pid|peak_rss_mib|samples_per_second|steps_per_second|train_runtime|"
                           r"train_samples_per_second|train_steps_per_second|python|torch_version|"
                           r"transformers_version)($|_)")
SKIPPED_SUFFIXES = (".png", ".log", ".err", ".out", ".lock")
# progress: the lab's step log; training_args.bin: a pickle of transformers' TrainingArguments, which holds the
# run's own folders and a logging dir named by the time (finetune_meta.json records the settings it carries).
SKIPPED_NAMES = ("progress", "training_args.bin")


def sh(cmd, env, cwd):
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def head_json(src: Path, dst: Path, n: int) -> Path:
    dst.write_text(json.dumps(json.loads(src.read_text())[:n], indent=1))
    return dst


def head_lines(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return dst


def run_everything(root: Path, work: Path, python: str) -> None:
    lab = root / "ft_datasets" / "lab"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=python, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false")
    data = work / "inputs"
    data.mkdir(parents=True, exist_ok=True)
    out = work / "out"

    # demo.sh at reduced scale (as tests/test_demo_script.py)
    demo_data = data / "lab"
    demo_data.mkdir(exist_ok=True)
    head_json(lab / "pool.json", demo_data / "pool.json", 100)
    for name in ("anchors_harmful", "anchors_safe", "anchors_safe2"):
        head_lines(lab / f"{name}.jsonl", demo_data / f"{name}.jsonl", 10 ** 6)
    for name in ("eval_prompts", "eval_compliant"):
        head_lines(lab / f"{name}.jsonl", demo_data / f"{name}.jsonl", 16)
    sh(["bash", "scripts/demo.sh"], dict(env, DATA=str(demo_data), MODEL=str(lab / "model"), OUT=str(out / "demo"),
                                         K="10", SEEDS="1", EPOCHS="1", BATCH="10", MAX_NEW_TOKENS="12", JOBS="1"),
       root)

    # the paper's recipes with a tiny model
    tiny = work / "tiny_model"
    if not (tiny / "model.safetensors").exists():
        sh([python, "scripts/make_tiny_model.py", "--output_dir", str(tiny)], env, root)
    pool = head_json(lab / "pool.json", data / "pool8.json", 8)
    anchors = {"HARMFUL": lab / "anchors_harmful.jsonl", "SAFE1": lab / "anchors_safe.jsonl",
               "SAFE2": lab / "anchors_safe2.jsonl"}
    recipe = dict(env, MODEL=str(tiny), POOL=str(pool), RUNS=str(out / "recipes"), BATCH_SIZE="4",
                  EXTRA="--dtype fp32 --device cpu", K="3", TYPES="top bottom",
                  **{k: str(v) for k, v in anchors.items()})
    sh(["bash", "scripts/get_representation.sh"], recipe, root)
    sh(["bash", "scripts/get_full_gradient.sh"], recipe, root)
    sh(["bash", "scripts/rank.sh"], dict(recipe, METHOD="gradient"), root)
    sh(["bash", "scripts/rank.sh"], dict(recipe, METHOD="reps"), root)
    sh(["bash", "scripts/rank.sh"], dict(recipe, METHOD="reps", REP_ANCHORS="harmful"), root)

    # the other methods, and rank.py on one of them
    pool100 = demo_data / "pool.json"
    anchor_files = [str(demo_data / f"{n}.jsonl") for n in ("anchors_harmful", "anchors_safe", "anchors_safe2")]
    methods = out / "methods"
    for method, extra in (("random", ["--seed", "3"]), ("format", ["--feature", "list_share"]),
                          ("format", ["--feature", "answer_words"]), ("bm25", ["--anchors", *anchor_files]),
                          ("compliance", ["--anchors", *anchor_files, "--model_name", str(lab / "model"),
                                          "--template", "chat", "--dtype", "fp32", "--device", "cpu"])):
        name = method + ("_" + extra[1] if method == "format" else "")
        sh([python, "score.py", "--method", method, "--data_path", str(pool100), "--output_dir", str(methods / name),
            *extra], env, root)
    # --write_to, rank.py's old spelling of --output_dir: it runs on the commits before the rename too (a
    # deprecation line on stderr after it)
    sh([python, "rank.py", "--data_path", str(pool100), "--scores", str(methods / "bm25"), "--weights", "1", "-1",
        "-1", "--type", "top", "--k", "7", "--write_to", str(methods / "bm25_selection")], env, root)

    # the defensive audit
    sh([python, "audit.py", "--data_path", str(pool100), "--output_dir", str(out / "audit"), "--model_name",
        str(lab / "model"), "--anchors", *anchor_files, "--drop_k", "3", "--template", "chat", "--dtype", "fp32",
        "--device", "cpu"], env, root)


def help_options(root: Path, python: str) -> dict[str, list[str]]:
    options = {}
    for cli in CLIS:
        if not (root / cli).exists():
            continue
        text = sh([python, cli, "--help"], dict(os.environ, COLUMNS="200"), root)
        options[cli] = sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", text)))
    return options


def blank_volatile(value):
    if isinstance(value, dict):
        return {k: ("<volatile>" if VOLATILE_KEYS.search(k) else blank_volatile(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [blank_volatile(v) for v in value]
    return value


def normalized(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            return json.dumps(blank_volatile(json.loads(data)), sort_keys=True).encode()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return data
    if path.suffix == ".html":  # the report's plot: matplotlib's PNG, not this project's bytes
        return re.sub(rb"data:image/png;base64,[A-Za-z0-9+/=]+", b"data:image/png;base64,<plot>", data)
    return data


def manifest(root: Path, work: Path, python: str) -> dict:
    out = work / "out"
    files = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file() or path.suffix in SKIPPED_SUFFIXES or path.name in SKIPPED_NAMES:
            continue
        files[str(path.relative_to(out))] = hashlib.sha256(normalized(path)).hexdigest()
    return {"files": files, "help_options": help_options(root, python)}


def compare(before: dict, after: dict) -> int:
    problems = []
    for name in sorted(set(before["files"]) | set(after["files"])):
        a, b = before["files"].get(name), after["files"].get(name)
        if a != b:
            problems.append(f"{'missing after' if b is None else 'new' if a is None else 'differs'}: {name}")
    for cli in sorted(set(before["help_options"]) | set(after["help_options"])):
        a, b = set(before["help_options"].get(cli, [])), set(after["help_options"].get(cli, []))
        if a != b:
            problems.append(f"--help of {cli}: removed {sorted(a - b)}, added {sorted(b - a)}")
    print(f"{len(before['files'])} files before, {len(after['files'])} after; "
          f"{len(before['help_options'])} CLIs' options compared")
    print("\n".join(problems) if problems else "identical")
    return 1 if problems else 0


def checkout(commit: str, root: Path) -> None:
    """The commit's tree at `root`, a detached git worktree of the repository this runs in (replaced if there)."""
    repo = Path.cwd()
    if root.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(root)], cwd=repo, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=repo, check=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(root), commit], cwd=repo, check=True,
                   capture_output=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="check out COMMIT, run its scripts on the fixed inputs, write the manifest")
    r.add_argument("--commit", required=True, help="the commit whose code runs (a hash, a branch, HEAD)")
    r.add_argument("--work", default="/tmp/safedata_same", help="scratch folder: WORK/root (the code), WORK/out")
    r.add_argument("--manifest", required=True, help="JSON file written")
    r.add_argument("--python", default=sys.executable, help="interpreter with the requirements (this one)")
    c = sub.add_parser("compare", help="compare two manifests; exit 1 when they differ")
    c.add_argument("before")
    c.add_argument("after")
    a = p.parse_args()
    if a.command == "compare":
        sys.exit(compare(json.loads(Path(a.before).read_text()), json.loads(Path(a.after).read_text())))
    work = Path(a.work).resolve()
    root = work / "root"
    shutil.rmtree(work / "out", ignore_errors=True)
    shutil.rmtree(work / "inputs", ignore_errors=True)
    shutil.rmtree(work / "tiny_model", ignore_errors=True)   # built again by the commit's own code
    checkout(a.commit, root)
    python = os.path.abspath(a.python)
    run_everything(root, work, python)
    Path(a.manifest).write_text(json.dumps(dict(manifest(root, work, python), commit=a.commit), indent=1,
                                           sort_keys=True) + "\n")
    print(f"wrote {a.manifest}")


if __name__ == "__main__":
    main()
