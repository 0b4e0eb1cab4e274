"""summarize.py / safedata/summary.py on hand-written run folders: keyword ASR in % per seed, mean and sample sd
against values computed by hand, missing seeds listed, several run folders (each with its own base), one-line
errors for bad input, the PNG; and the base model's cache key (prepare_base) and job.json (write_job_record)."""
import csv
import importlib
import io
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from safedata.errors import UserError
from safedata.summary import SummaryArgs, gather_row, prepare_base, summarize, write_job_record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def evaluation(folder: Path, keyword_asr: float, n: int = 8) -> Path:
    """An evaluate.py summary.json as it writes one (the keys summarize reads, and a few it does not)."""
    folder.mkdir(parents=True, exist_ok=True)
    refused = round(n * (1 - keyword_asr))
    (folder / "summary.json").write_text(json.dumps({"n": n, "keyword_asr": keyword_asr, "n_refused": refused,
                                                     "judge": {"kind": "keyword"}, "model": "m"}))
    return folder


def run_folder(root: Path, name: str, asr: dict, base_asr: float | None = None, job_seeds=None, n: int = 8) -> Path:
    run = root / name
    for seed, value in asr.items():
        folder = run / f"seed{seed}"
        folder.mkdir(parents=True)
        if value is not None:   # None: a seed folder without evaluation/summary.json
            evaluation(folder / "evaluation", value, n)
    if base_asr is not None or job_seeds is not None:
        job = {"save_name": name, "model": "tiny", "template": "paper", "seeds": job_seeds or sorted(asr),
               "base": None}
        if base_asr is not None:
            evaluation(root / "base" / "k" / "evaluation-keyword", base_asr, n)
            job["base"] = {"evaluation": "../base/k/evaluation-keyword"}
        (run / "job.json").write_text(json.dumps(job))
    return run


def cli(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    """summarize.py in this process, as its __main__ runs it (safedata.cli.run): (exit status, stdout, stderr)."""
    sys.path.insert(0, str(ROOT))
    try:
        module = importlib.import_module("summarize")
    finally:
        sys.path.remove(str(ROOT))
    monkeypatch.setattr(sys, "argv", ["summarize.py", *map(str, argv)])
    status = 0
    try:
        module.run(module.main)
    except SystemExit as done:
        status = done.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_one_run_folder_mean_sd_base_and_every_output(tmp_path, monkeypatch, capsys):
    # seeds 1-3 complied on 4, 2 and 6 of 8 prompts: 50, 25, 75 %; mean 50; sd sqrt((0 + 625 + 625) / 2) = 25.
    # The base model on 1 of 8: 12.5 %.
    run = run_folder(tmp_path, "top8", {1: 0.5, 2: 0.25, 3: 0.75}, base_asr=0.125)
    status, out, err = cli(monkeypatch, capsys, run)
    assert status == 0, err
    summary = json.loads((run / "summary" / "summary.json").read_text())
    (row,) = summary["rows"]
    assert row["name"] == "top8" and row["seeds"] == [1, 2, 3] and row["n_prompts"] == 8
    assert row["asr_pct"] == pytest.approx([50.0, 25.0, 75.0])
    assert row["asr_pct_mean"] == pytest.approx(50.0) and row["asr_pct_sd"] == pytest.approx(25.0)
    assert row["base_asr_pct"] == pytest.approx(12.5) and row["seeds_missing"] == []
    table = (run / "summary" / "table.md").read_text()
    assert table == out   # printed as written
    assert "| top8 | 50.0 ± 25.0 | 1: 50.0, 2: 25.0, 3: 75.0 | 12.5 | 3 | 8 | none |" in table
    (line,) = list(csv.DictReader(io.StringIO((run / "summary" / "table.csv").read_text())))
    assert line["seeds"] == "1;2;3" and float(line["asr_pct_mean"]) == pytest.approx(50.0)
    assert float(line["asr_pct_sd"]) == pytest.approx(25.0) and float(line["base_asr_pct"]) == pytest.approx(12.5)
    assert [float(v) for v in line["asr_pct"].split(";")] == pytest.approx([50.0, 25.0, 75.0])
    png = (run / "summary" / "asr.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_a_missing_seed_is_listed_not_dropped(tmp_path):
    # seed 3's folder has no evaluation/summary.json; job.json also names seed 4, which has no folder.
    # Finished: 4 and 8 of 8 -> 50, 100 %; mean 75; sd sqrt((625 + 625) / 1) = 25 * sqrt(2) = 35.355...
    run = run_folder(tmp_path, "partial", {1: 0.5, 2: 1.0, 3: None}, job_seeds=[1, 2, 3, 4])
    row = gather_row(run)
    assert row["seeds"] == [1, 2] and row["seeds_missing"] == [3, 4]
    assert row["asr_pct_mean"] == pytest.approx(75.0) and row["asr_pct_sd"] == pytest.approx(25 * math.sqrt(2))
    assert row["base_asr_pct"] is None   # job.json names no base
    summarize(SummaryArgs(run_dirs=[str(run)]))
    assert "| partial | 75.0 ± 35.4 | 1: 50.0, 2: 100.0 | - | 2 | 8 | 3, 4 |" in (run / "summary" / "table.md").read_text()


def test_several_run_folders_each_with_its_own_base(tmp_path, monkeypatch, capsys):
    # a: one seed, 3 of 8 -> 37.5 %, sd null, base 0 %; b: no job.json (no base), 2 seeds 12.5 and 37.5 %:
    # mean 25, sd sqrt((156.25 + 156.25) / 1) = 17.677...; c in another OUTPUT_ROOT, base 25 %.
    a = run_folder(tmp_path / "r1", "a", {1: 0.375}, base_asr=0.0)
    b = run_folder(tmp_path / "r1", "b", {1: 0.125, 2: 0.375})
    c = run_folder(tmp_path / "r2", "c", {5: 1.0, 6: 0.75}, base_asr=0.25)
    out_dir = tmp_path / "table"
    status, out, err = cli(monkeypatch, capsys, "--output_dir", out_dir, a, b, c)
    assert status == 0, err
    rows = json.loads((out_dir / "summary.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["asr_pct"] == [37.5] and rows[0]["asr_pct_sd"] is None and rows[0]["base_asr_pct"] == 0.0
    assert rows[1]["asr_pct_mean"] == pytest.approx(25.0) and rows[1]["asr_pct_sd"] == pytest.approx(
        12.5 * math.sqrt(2)) and rows[1]["base_asr_pct"] is None
    assert rows[2]["seeds"] == [5, 6] and rows[2]["asr_pct_mean"] == pytest.approx(87.5)
    assert rows[2]["asr_pct_sd"] == pytest.approx(12.5 * math.sqrt(2)) and rows[2]["base_asr_pct"] == 25.0
    assert "| a | 37.5 | 1: 37.5 | 0.0 | 1 | 8 | none |" in out
    assert (out_dir / "asr.png").read_bytes().startswith(PNG_MAGIC)
    assert len((out_dir / "table.csv").read_text().splitlines()) == 4


def one_line_error(monkeypatch, capsys, *argv) -> str:
    status, out, err = cli(monkeypatch, capsys, *argv)
    assert status == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), (status, err)
    return err.strip()


def test_bad_input_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    bad = run_folder(tmp_path, "bad", {1: 0.5})
    path = bad / "seed1" / "evaluation" / "summary.json"
    path.write_text('{"n": 8, "keyword_asr": ')
    assert one_line_error(monkeypatch, capsys, bad) == f"error: {path}:1: malformed JSON (Expecting value)"
    path.write_text(json.dumps({"n": 8, "keyword_asr": 50.0}))   # a percentage where a share belongs
    assert one_line_error(monkeypatch, capsys, bad) == (f"error: {path}: field 'keyword_asr': 50.0 is not a share "
                                                        "between 0 and 1")
    path.write_text(json.dumps({"n": 0, "keyword_asr": 0.5}))
    assert f"{path}: field 'n'" in one_line_error(monkeypatch, capsys, bad)

    empty = run_folder(tmp_path, "empty", {1: None, 2: None})
    assert one_line_error(monkeypatch, capsys, empty) == (
        f"error: {empty}: no finished seed (no seed*/evaluation/summary.json; seeds 1, 2 unfinished); run "
        "finetune_evaluation.slurm for it first")
    assert "no such run folder" in one_line_error(monkeypatch, capsys, tmp_path / "nowhere")
    good = run_folder(tmp_path, "good", {1: 0.5})
    assert "--output_dir" in one_line_error(monkeypatch, capsys, good, empty)

    lost = run_folder(tmp_path / "r3", "lost", {1: 0.5}, base_asr=0.0)
    shutil.rmtree(tmp_path / "r3" / "base")
    assert "its base model's evaluation" in one_line_error(monkeypatch, capsys, lost)

    mixed = run_folder(tmp_path, "mixed", {1: 0.5, 2: 0.25})
    for seed, lr in ((1, 1e-3), (2, 2e-3)):
        (mixed / f"seed{seed}" / "model").mkdir()
        (mixed / f"seed{seed}" / "model" / "finetune_meta.json").write_text(json.dumps(
            {"settings": {"flags": {"learning_rate": lr, "seed": seed}, "data_sha256": "x", "base_model": "m"}}))
    assert "seed1 and seed2 were fine-tuned with other settings (flag learning_rate: 0.001 vs 0.002)" in \
        one_line_error(monkeypatch, capsys, mixed)
    (mixed / "seed2" / "model" / "finetune_meta.json").write_text(json.dumps(   # only the seed differs: fine
        {"settings": {"flags": {"learning_rate": 1e-3, "seed": 2}, "data_sha256": "x", "base_model": "m"}}))
    assert gather_row(mixed)["seeds"] == [1, 2]

    other_n = run_folder(tmp_path, "other_n", {1: 0.5})
    evaluation(other_n / "seed2" / "evaluation", 0.5, n=6)
    with pytest.raises(UserError, match="seeds answered different numbers of prompts"):
        gather_row(other_n)


def test_job_record_survives_moving_output_root(tmp_path):
    root = tmp_path / "root"
    run = run_folder(root, "moved", {1: 0.5})
    base_eval = evaluation(root / "base" / "key1" / "evaluation-keyword-0", 0.25)
    subset, prompts = tmp_path / "subset.json", tmp_path / "prompts.csv"
    subset.write_text("[]")
    prompts.write_text("a\n")
    write_job_record(run, model="m", template="paper", subset=str(subset), prompts=str(prompts), seeds=[1],
                     base_evaluation=str(base_eval))
    job = json.loads((run / "job.json").read_text())
    assert job["base"] == {"evaluation": "../base/key1/evaluation-keyword-0"} and job["seeds"] == [1]
    moved = tmp_path / "elsewhere"
    shutil.move(root, moved)
    assert gather_row(moved / "moved")["base_asr_pct"] == 25.0


def test_base_key_names_content_and_settings_not_paths(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.csv"
    prompts.write_text("Name a colour\nGive a tip\n")
    copy = tmp_path / "elsewhere" / Path(tiny_model_dir).name
    shutil.copytree(tiny_model_dir, copy)
    flags = ["--data_path", str(prompts), "--output_dir", "-", "--max_new_tokens", "8"]
    first = prepare_base(tmp_path / "runs", ["--model_name", tiny_model_dir, *flags], ["--judge", "keyword"])
    # the tiny model's tokenizer has a Llama-2-style chat template: the paper's wrapper
    assert first["template"] == "paper" and first["key"].startswith("model_paper_")
    key_file = json.loads((Path(first["dir"]) / "key.json").read_text())
    assert key_file["prompts_sha256"] == __import__("hashlib").sha256(prompts.read_bytes()).hexdigest()
    assert key_file["generation"]["max_new_tokens"] == 8 and key_file["n_shards"] == 1
    # the same model elsewhere, the same prompts in another file: the same key
    prompts2 = tmp_path / "copy.csv"
    shutil.copy(prompts, prompts2)
    moved = prepare_base(tmp_path / "runs", ["--model_name", str(copy), "--data_path", str(prompts2),
                                             "--output_dir", "x", "--max_new_tokens", "8"], ["--judge", "keyword"],
                         create=False)
    assert moved["key"] == first["key"] and moved["evaluation"] == first["evaluation"]
    for other in (["--max_new_tokens", "9"], ["--template", "plain"], ["--batch_size", "3"]):
        assert prepare_base(tmp_path / "runs", ["--model_name", tiny_model_dir, *flags, *other], ["--judge", "keyword"],
                            create=False)["key"] != first["key"], other
    assert prepare_base(tmp_path / "runs", ["--model_name", tiny_model_dir, *flags], ["--judge", "keyword"],
                        n_shards=2, create=False)["key"] != first["key"]
    judged = prepare_base(tmp_path / "runs", ["--model_name", tiny_model_dir, *flags],
                          ["--judge", "api", "--judge_model", "x"], create=False)
    assert judged["generation"] == first["generation"] and judged["evaluation"] != first["evaluation"]
