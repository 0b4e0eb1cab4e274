"""Shared by the benchmarks: the model, the data, timing, and the result table."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from safedata import data as D  # noqa: E402
from safedata.models import build_tiny_llama, build_tokenizer, default_tokenizer_corpus  # noqa: E402
from safedata.store import now, write_json  # noqa: E402

# SAFEDATA_ALPACA: the Alpaca file elsewhere (a device machine has no ../shared; see bench/README.md)
ALPACA = Path(os.environ.get("SAFEDATA_ALPACA") or
              ROOT.parent / "shared" / "data" / "paper" / "ft_datasets" / "alpaca_dataset" / "alpaca_data.json")
LAB_POOL = ROOT / "ft_datasets" / "lab" / "pool.json"
ANCHORS = ROOT.parent / "shared" / "data" / "paper" / "ft_datasets" / "pure_bad_dataset" / "pure-bad-illegal-activities-selected10.jsonl"
LAB_ANCHORS = ROOT / "ft_datasets" / "lab" / "anchors_harmful.jsonl"

LLAMA2_7B = dict(hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008)


def parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--n", type=int, default=256, help="pool examples (the first n records)")
    p.add_argument("--hidden", type=int, nargs="+", default=[512], help="model widths to measure")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="timing repeats (the minimum is reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--config", choices=("small", "llama2-7b"), default="small")
    p.add_argument("--output", default=None, help="JSON result path (default bench/results/<name>.json)")
    return p


def tokenizer():
    return build_tokenizer(default_tokenizer_corpus(), vocab_size=4096)


def model_for(tok, hidden, layers, device, dtype, config="small", seed=0):
    # built directly on the device (a 7B model initialised on the CPU takes minutes), then cast
    with torch.device(device):
        if config == "llama2-7b":
            spec = dict(LLAMA2_7B)
            model = build_tiny_llama(32000, spec["hidden_size"], spec["num_layers"], spec["num_heads"],
                                     spec["intermediate_size"], max_position_embeddings=4096, seed=seed)
        else:
            # Llama-2's 32,000-token vocabulary, so the LM head costs what it costs there.
            model = build_tiny_llama(32000, hidden, layers, max(1, hidden // 64), seed=seed,
                                     max_position_embeddings=2048)
    return model.to(device=device, dtype=dtype).eval()


def pool_examples(n):
    path = ALPACA if ALPACA.exists() else LAB_POOL
    examples, _ = D.load_examples(path, skip_bad=True)
    return path, examples[:n]


def anchor_examples():
    path = ANCHORS if ANCHORS.exists() else LAB_ANCHORS
    examples, _ = D.load_examples(path)
    return path, examples


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats=1, warmup=True):
    """(best seconds, result, peak memory bytes) over repeats, after one untimed warm-up call."""
    best, result, peak = float("inf"), None, 0
    if warmup:
        fn()
    for _ in range(repeats):
        if str(device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() if str(device).startswith("cuda") else peak_rss_bytes()
    return best, result, peak


def peak_rss_bytes():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine():
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(title, rows, columns):
    print(f"\n{title}")
    widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def fmt(value):
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def save(name, result, output=None):
    path = Path(output) if output else ROOT / "bench" / "results" / f"{name}.json"
    write_json(path, dict(result, date=now(), machine=machine()))
    print(f"\nwrote {path}")
