"""Gradient scores: the paper's algorithm vs ours vs a plain training step, with peak memory.

Pool: the first --n records of the real Alpaca file (paper template, --max_length 512). Three targets:
the paper's 10 illegal-activities anchors and the two safe-counterpart anchor files next to it (first
10 response tokens each). A random-initialised Llama-architecture model (32,000-token vocabulary).

  paper (pad 512)  the paper's algorithm: batch size 1, every example padded to 512 tokens, the full
                   gradient vector (autograd over all parameters, flattened), its dot product with each
                   of the three dense targets (P-vectors) and its norm. On the first --paper_n examples;
                   its per-example time is what "time / ours" compares.
  paper (dynamic)  the same without padding to 512.
  ours             get_gradients.py's scoring path: score_batch with a TargetBank, length-bucketed batches.
  train step       forward + backward with weight gradients (mean loss, no optimizer step), same batches.
  floor            forward + backward through activations only (weights frozen, grad enabled on the input
                   embeddings' output), same batches; like the training step it computes the LM head at
                   every position.
  ours, no products  our engine's own forward + backward (LM head at supervised positions only) with the
                   per-example products switched off: what ours costs beyond this is the scoring itself.

Timing: the minimum over --repeats passes. Memory: on CPU each method runs in a fresh subprocess and its
peak RSS growth over the passes is reported (the model, data and targets are loaded before the baseline
is taken; "targets MiB" is the size of the target bank on the device); on CUDA, the growth of
torch.cuda.max_memory_allocated. "ours (64 longest records only)" scores a quarter of the examples with
the same largest batches: the peak follows the largest batch, not the number of pool examples.

Scores: "max |score diff| vs ours" is over the examples both scored (score = <G, T_j>/||G||). On CPU the
smallest width also runs both algorithms on the first --exactness_n records in fp64 (they agree to ~1e-15)
and in fp32 against that fp64 reference: the fp32 difference in the table is fp32 rounding on both sides.
CPU threads: --threads (default 1: on a shared machine a second thread waits for a busy core at every op).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (ANCHORS, LAB_ANCHORS, ROOT, D, model_for, parser, pool_examples, print_table, save, sync,
                    tokenizer)
from safedata.features import gradients as G
from safedata.models import load_tokenizer

TARGET_FILES = ("pure-bad-illegal-activities-selected10.jsonl",
                "pure-bad-illegal-acticities-selected-10-anchor1.jsonl",
                "pure-bad-illegal-activities-selected-10-anchor2.jsonl")
LAB_TARGET_FILES = (LAB_ANCHORS.name, "anchors_safe.jsonl", "anchors_safe2.jsonl")
MLENS = 10
MAX_LENGTH = 512
METHODS = ("paper512", "paper_dynamic", "ours", "train", "floor", "engine", "ours64")
LABELS = {"paper512": "paper (bs1, pad 512, full grad vector)", "paper_dynamic": "paper, dynamic padding",
          "ours": "ours (score_batch, TargetBank)", "train": "train step (fwd+bwd, weight grads)",
          "floor": "floor (fwd+bwd, activations only)", "engine": "ours, no products (engine fwd+bwd)",
          "ours64": "ours (64 longest records only)"}
MiB = 2 ** 20


# ----------------------------------------------------------------------------- data, model, targets


def target_paths():
    if ANCHORS.exists():
        return [ANCHORS.parent / f for f in TARGET_FILES]
    return [LAB_ANCHORS.parent / f for f in LAB_TARGET_FILES]


def load_pool(tok, n):
    path, examples = pool_examples(n)
    encoded, excluded = D.encode_examples(examples, tok, "paper", max_length=MAX_LENGTH)
    return path, encoded


def batches_of(encoded, batch_size):
    return [[encoded[i] for i in b] for b in D.length_bucketed_batches([len(e) for e in encoded], batch_size)]


def build_targets(model, tok, pad):
    targets = []
    for path in target_paths():
        examples, _ = D.load_examples(path)
        encoded, _ = D.encode_examples(examples, tok, "paper", max_length=MAX_LENGTH, max_response_length=MLENS)
        targets.append(G.anchor_gradients(model, encoded, pad, batch_size=8).target)
    return targets


def save_targets(targets, path):
    torch.save([{"tensors": t.tensors(), "layout": t.layout(), "mode": t.mode, "param_set": t.param_set,
                 "norm": t.norm} for t in targets], path)


def load_targets(path, device):
    out = []
    for t in torch.load(path, weights_only=True):
        tensors = {k: v.to(device) for k, v in t["tensors"].items()}
        out.append(G.Target.from_tensors(tensors, t["layout"], mode=t["mode"], param_set=t["param_set"],
                                         norm=t["norm"]))
    return out


def dense_targets(model, targets, dtype):
    """[n_targets, P]: each target as one dense vector over all parameters, in named_parameters order."""
    params = list(model.named_parameters())
    P = sum(p.numel() for _, p in params)
    out = torch.empty(len(targets), P, dtype=dtype, device=params[0][1].device)
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for j, t in enumerate(targets):
        start = 0
        for name, p in params:
            out[j, start:start + p.numel()] = t.params[name].to_dense(compute_dtype, p.device).reshape(-1).to(dtype)
            start += p.numel()
    return out


# ----------------------------------------------------------------------------- methods


def set_requires_grad(model, flag):
    for p in model.parameters():
        p.requires_grad_(flag)


def paper_scores(model, items, pad, tdense, pad_to):
    """Batch size 1, a full flattened gradient per example; <G, T_j> and ||G||^2 in fp32 (fp64 for fp64)."""
    device = tdense.device
    compute_dtype = torch.float64 if tdense.dtype == torch.float64 else torch.float32
    params = list(model.parameters())
    set_requires_grad(model, True)
    inner, sq = [], []
    step = 1 << 27
    try:
        for item in items:
            batch = D.collate([item], pad)
            width = pad_to or len(item)
            ids = torch.full((1, width), pad, dtype=torch.long)
            mask = torch.zeros((1, width), dtype=torch.long)
            labels = torch.full((1, width), D.IGNORE_INDEX, dtype=torch.long)
            ids[0, :len(item)], mask[0, :len(item)] = batch["input_ids"][0], 1
            labels[0, :len(item)] = batch["labels"][0]
            # the example's mean token loss: in fp32 for bf16/fp16 models (as HF's loss), else in the model's
            # dtype (HF's own loss would round fp64 logits to fp32)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[0, :-1]
            if logits.dtype in (torch.bfloat16, torch.float16):
                logits = logits.float()
            target = labels[0, 1:].to(device)
            keep = target != D.IGNORE_INDEX
            loss = F.cross_entropy(logits[keep], target[keep])
            del logits
            grads = torch.autograd.grad(loss, params)
            flat = torch.cat([g.reshape(-1) for g in grads])
            del grads, loss
            i = torch.zeros(tdense.shape[0], dtype=compute_dtype, device=device)
            s = torch.zeros((), dtype=compute_dtype, device=device)
            for c in range(0, flat.numel(), step):          # chunks: upcasting a 7B vector at once is 27 GB
                f = flat[c:c + step].to(compute_dtype)
                i += tdense[:, c:c + step].to(compute_dtype) @ f
                s += f @ f
            inner.append(i)
            sq.append(s)
            del flat
    finally:
        set_requires_grad(model, False)
    return torch.stack(inner).double().cpu(), torch.stack(sq).double().cpu()


def ours_scores(model, batches, pad, bank_and_engine: tuple):
    """(bank, engine) as G.bank_for returns them."""
    set_requires_grad(model, False)
    bank, engine = bank_and_engine
    inner, sq = [], []
    for b in batches:
        scores = G.score_batch(engine, bank, b, pad)
        inner.append(scores.inner.detach().double().cpu())
        sq.append(scores.sqnorm.detach().double().cpu())
    return torch.cat(inner), torch.cat(sq)


def train_step(model, batches, pad, device):
    set_requires_grad(model, True)
    try:
        for b in batches:
            batch = {k: v.to(device) for k, v in D.collate(b, pad).items()}
            model.zero_grad(set_to_none=True)
            model(**batch, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
    finally:
        set_requires_grad(model, False)


def floor_step(model, batches, pad, device):
    set_requires_grad(model, False)
    leaf = []

    def hook(module, inputs, output):
        out = output.detach().requires_grad_(True)
        leaf.append(out)
        return out

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        for b in batches:
            batch = {k: v.to(device) for k, v in D.collate(b, pad).items()}
            leaf.clear()
            loss = model(**batch, use_cache=False).loss
            torch.autograd.grad(loss, leaf[0])
    finally:
        handle.remove()


class NoProducts(G.Accumulator):
    """An accumulator that receives every hook's inputs and output-grads and computes nothing."""

    def dense(self, name, v):
        pass

    def linear(self, site, layer_input, g, mask):
        pass

    def embedding(self, site, token_ids, g, mask):
        pass


def engine_step(model, batches, pad):
    engine = G.get_engine(model)
    for b in batches:
        engine.run(b, pad, NoProducts())


# ----------------------------------------------------------------------------- measuring one method


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process (VmHWM); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Meter:
    """Peak memory growth over a block: RSS high-water mark on CPU, max_memory_allocated on CUDA."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.exact = reset_peak_rss()
            self.base = rss_bytes()

    def peak(self):
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return max(0, peak_rss_bytes() - self.base)


def measure(method, model, tok, args, targets, device, dtype):
    """{seconds (min over repeats), peak bytes, n, scores} for one method on an already built model."""
    pad = D.pad_token_id(tok)
    _, encoded = load_pool(tok, args.n)
    if method == "ours64":      # the 64 longest: the same largest batches as all n, a quarter of the examples
        encoded = sorted(encoded, key=lambda e: -len(e))[:64]
    batches = batches_of(encoded, args.batch_size)
    order = [e.index for b in batches for e in b]
    extra = {}
    if method in ("paper512", "paper_dynamic"):
        items = encoded[:args.paper_n]
        tdense = dense_targets(model, targets, torch.float64 if dtype == torch.float64 else
                               (torch.float32 if device.type == "cpu" else dtype))
        extra["targets_mib"] = tdense.numel() * tdense.element_size() / MiB
        pad_to = MAX_LENGTH if method == "paper512" else None
        fn = lambda: paper_scores(model, items, pad, tdense, pad_to)  # noqa: E731
        order = [e.index for e in items]
    elif method in ("ours", "ours64"):
        bank, engine = G.bank_for(model, targets)
        extra["targets_mib"] = bank.nbytes() / MiB
        extra["densified"] = len(bank.densified)
        fn = lambda: ours_scores(model, batches, pad, (bank, engine))  # noqa: E731
    elif method == "train":
        fn = lambda: train_step(model, batches, pad, device)  # noqa: E731
    elif method == "floor":
        fn = lambda: floor_step(model, batches, pad, device)  # noqa: E731
    elif method == "engine":
        fn = lambda: engine_step(model, batches, pad)  # noqa: E731
    else:
        raise ValueError(method)
    if device.type == "cuda":     # CUDA: one untimed batch first (kernel selection, allocator warm-up)
        if method.startswith("paper"):
            paper_scores(model, encoded[:1], pad, tdense, MAX_LENGTH if method == "paper512" else None)
        elif method in ("ours", "ours64"):
            ours_scores(model, batches[-1:], pad, (bank, engine))
        elif method == "train":
            train_step(model, batches[-1:], pad, device)
        elif method == "floor":
            floor_step(model, batches[-1:], pad, device)
        else:
            engine_step(model, batches[-1:], pad)
    meter = Meter(device)
    meter.start()
    best, result = math.inf, None
    repeats = 1 if method == "ours64" else args.repeats
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    peak = meter.peak()
    out = {"method": method, "seconds": best, "n": len(order), "peak_bytes": peak,
           "tokens": sum(len(e) for e in encoded if e.index in set(order)),
           "padded_tokens": sum(len(b) * max(len(e) for e in b) for b in batches) if not method.startswith("paper")
           else None, **extra}
    if result is not None:
        inner, sq = result
        out["index"] = order
        out["inner"] = inner.tolist()
        out["sqnorm"] = sq.tolist()
    if device.type != "cuda":
        out["peak_exact"] = meter.exact
    return out


def exactness(hidden, tok, args):
    """The paper's algorithm vs ours on the first records in fp64 (the algorithms agree exactly) and each
    one's fp32 result against that fp64 reference (what the fp32 difference in the table is made of)."""
    pad = D.pad_token_id(tok)
    _, encoded = load_pool(tok, args.n)
    items = encoded[:args.exactness_n]
    batches = batches_of(items, args.batch_size)
    order = [e.index for b in batches for e in b]
    scores = {}
    for dt in (torch.float64, torch.float32):
        model = model_for(tok, hidden, args.layers, torch.device("cpu"), dt, args.config)
        set_requires_grad(model, False)
        targets = build_targets(model, tok, pad)
        inner, sq = paper_scores(model, items, pad, dense_targets(model, targets, dt), None)
        scores["paper", dt] = {"index": [e.index for e in items], "inner": inner.tolist(), "sqnorm": sq.tolist()}
        inner, sq = ours_scores(model, batches, pad, G.bank_for(model, targets))
        scores["ours", dt] = {"index": order, "inner": inner.tolist(), "sqnorm": sq.tolist()}
        del model, targets
    ref = scores["paper", torch.float64]
    return {"n": len(items),
            "fp64 paper vs ours": score_diff(ref, scores["ours", torch.float64]),
            "fp32 paper vs fp64": score_diff(scores["paper", torch.float32], ref),
            "fp32 ours vs fp64": score_diff(scores["ours", torch.float32], ref)}


# ----------------------------------------------------------------------------- orchestration


WORKER = Path(__file__).with_name("gradient_worker.py")    # one method in a process of its own (CPU)


def measure_spec(spec: dict) -> dict:
    """One method of one width as the worker runs it: the model rebuilt from the parent's settings (`args`, its
    parsed flags), the parent's tokenizer and targets loaded, then measure()."""
    args = argparse.Namespace(**spec["args"])
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    tok = load_tokenizer(spec["tokenizer"])     # the parent's: the corpus it is trained on may change meanwhile
    model = model_for(tok, spec["hidden"], args.layers, device, dtype, args.config)
    set_requires_grad(model, False)
    targets = load_targets(spec["targets"], device)
    return measure(spec["method"], model, tok, args, targets, device, dtype)


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def add_args(p):
    p.add_argument("--paper_n", type=int, default=32, help="the paper's algorithm runs on the first N records")
    p.add_argument("--exactness_n", type=int, default=4,
                   help="CPU: also compare paper vs ours in fp64 on the first N records, smallest width (0: skip)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per method (1: stable timings on a shared machine)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--inprocess", action="store_true",
                   help="run every method in this process (always on CUDA; on CPU the peak RSS is then not per method)")
    p.set_defaults(hidden=[128, 256], repeats=2)


def run_width(hidden, tok, args, device, dtype, tmp, partial=None):
    """All methods for one model width: {method: measurement}; partial(results) after each method."""
    pad = D.pad_token_id(tok)
    t0 = time.perf_counter()
    model = model_for(tok, hidden, args.layers, device, dtype, args.config)
    built = time.perf_counter() - t0
    targets = build_targets(model, tok, pad)
    info = {"model_build_s": built, "targets_s": time.perf_counter() - t0 - built,
            "params": sum(p.numel() for p in model.parameters()),
            "target_layout": {form: sum(1 for p in targets[0].params.values() if p.form == form)
                              for form in sorted({p.form for p in targets[0].params.values()})}}
    results = {}
    inprocess = args.inprocess or device.type == "cuda"
    if inprocess:
        for method in args.methods:
            print(f"  {hidden or args.config}: {method} ...", flush=True)
            try:
                results[method] = measure(method, model, tok, args, targets, device, dtype)
            except torch.cuda.OutOfMemoryError as err:
                print(f"  {method}: out of memory ({str(err).splitlines()[0]})", flush=True)
                results[method] = {"method": method, "error": "out of memory"}
            if partial:
                partial(results)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return results, info
    target_file = Path(tmp) / f"targets_{hidden}.pt"
    save_targets(targets, target_file)
    del model, targets
    gc.collect()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for method in args.methods:
        spec = Path(tmp) / f"{method}_{hidden}.json"
        out = Path(tmp) / f"{method}_{hidden}.out.json"
        spec.write_text(json.dumps({"args": vars(args), "hidden": hidden, "method": method, "targets": str(target_file),
                                    "tokenizer": str(Path(tmp) / "tokenizer"), "out": str(out)}))
        print(f"  hidden {hidden}: {method} ...", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(WORKER), str(spec)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"worker {method} (hidden {hidden}) failed with exit code {done.returncode}")
        results[method] = json.loads(out.read_text())
        results[method]["wall_s"] = time.perf_counter() - start
        if partial:
            partial(results)
    return results, info


def score_diff(a, b):
    """max |score_a - score_b| over the examples both scored (score = inner / sqrt(sqnorm))."""
    def scores(r):
        inner, sq = torch.tensor(r["inner"], dtype=torch.float64), torch.tensor(r["sqnorm"], dtype=torch.float64)
        return dict(zip(r["index"], (inner / sq.sqrt()[:, None]).unbind(0)))
    sa, sb = scores(a), scores(b)
    common = [i for i in sa if i in sb]
    if not common:
        return None
    return max(float((sa[i] - sb[i]).abs().max()) for i in common)


def rows_for(width, results):
    ours = results.get("ours")
    per_ex_ours = ours["seconds"] / ours["n"] if ours and "seconds" in ours else None
    rows = []
    for method in METHODS:
        r = results.get(method)
        if r is None:
            continue
        if "error" in r:
            rows.append({"model": width, "method": LABELS[method], "note": r["error"]})
            continue
        per_ex = r["seconds"] / r["n"]
        note = None
        if method.startswith("paper"):
            note = f"first {r['n']} records; per-example rate"
        elif method == "ours64":
            note = f"memory: same largest batch as all {ours['n'] if ours else ''}"
        diff = score_diff(r, ours) if ours and "inner" in r and method.startswith("paper") else None
        rows.append({"model": width, "method": LABELS[method], "examples": r["n"], "examples/s": 1 / per_ex,
                     "seconds": r["seconds"], "time / ours": per_ex / per_ex_ours if per_ex_ours else None,
                     "peak MiB": r["peak_bytes"] / MiB, "targets MiB": r.get("targets_mib"),
                     "max |score diff| vs ours": diff, "note": note})
    return rows


def checks_for(width, results, gpu, dtype):
    def per_ex(m):
        r = results.get(m)
        return r["seconds"] / r["n"] if r and "seconds" in r else None
    out = []

    def check(name, value, ok, target):
        if value is not None:
            out.append({"model": width, "target": target, "value": value, "check": name,
                        "met": None if ok is None else bool(ok(value))})

    o = per_ex("ours")
    if o is None:
        return out
    if per_ex("paper512"):
        check("speed-up vs paper", per_ex("paper512") / o, lambda v: v >= 3, ">= 3x faster than the paper")
    if per_ex("train"):
        check("time / train step", o / per_ex("train"), lambda v: v <= (1.2 if gpu else 1.5),
              f"<= {1.2 if gpu else 1.5}x a training step")
    if per_ex("floor"):
        check("time / floor", o / per_ex("floor"), None, "(information)")
    if per_ex("train") and per_ex("floor") and per_ex("engine") and per_ex("train") > per_ex("floor"):
        check("(ours - no products) / (train - floor)", (o - per_ex("engine")) / (per_ex("train") - per_ex("floor")),
              None, "(information: the scoring products vs the weight-gradient work)")
    if gpu:
        check("examples/s", 1 / o, lambda v: v >= 45, ">= 45 examples/s")
    mem = lambda m: results[m]["peak_bytes"] if m in results and "peak_bytes" in results[m] else None  # noqa: E731
    if mem("floor") is not None:
        check("peak / floor peak", mem("ours") / max(1, mem("floor")), lambda v: v <= 1.0,
              "peak <= forward+backward (no weight grads)")
    if mem("ours64") is not None:
        check("peak(64 longest) / peak(all)", mem("ours64") / max(1, mem("ours")), lambda v: 0.9 <= v <= 1.1,
              "peak independent of the number of examples (0.9-1.1)")
    if "paper512" in results and "inner" in results["paper512"]:
        # bf16: both sides carry bf16 rounding (the paper's gradient vector and dense targets are bf16)
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
        check("max |score diff| paper vs ours", score_diff(results["paper512"], results["ours"]),
              lambda v: v < tol, f"< {tol:g}")
    return out


def main():
    p = parser(__doc__)
    add_args(p)
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.set_num_threads(args.threads) if device.type == "cpu" else None
    gpu = device.type == "cuda"
    widths = [None] if args.config == "llama2-7b" else args.hidden
    tok = tokenizer()
    path, encoded = load_pool(tok, args.n)
    out_path = Path(args.output) if args.output else ROOT / "bench" / "results" / "gradients.json"
    print(f"pool: first {args.n} records of {path} ({len(encoded)} encoded, {sum(len(e) for e in encoded)} tokens); "
          f"targets: {', '.join(p.name for p in target_paths())}; device {device} {args.dtype}, "
          f"{args.threads if device.type == 'cpu' else ''} threads", flush=True)
    all_rows, all_checks, raw = [], [], {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(Path(tmp) / "tokenizer")
        for hidden in widths:
            width = args.config if hidden is None else f"h{hidden} x {args.layers}L"

            def partial(results, width=width):  # what is measured so far, in case a later step is killed
                from safedata.store import write_json
                write_json(out_path.with_suffix(".partial.json"), {"args": vars(args), "done": raw, width: {
                    m: {k: v for k, v in r.items() if k not in ("inner", "sqnorm")} for m, r in results.items()}})

            results, info = run_width(hidden, tok, args, device, dtype, tmp, partial)
            if args.exactness_n and device.type == "cpu" and hidden == min(widths):
                print(f"  hidden {hidden}: exactness (fp64 and fp32, first {args.exactness_n} records) ...", flush=True)
                info["exactness"] = exact = exactness(hidden, tok, args)
                for key in ("fp64 paper vs ours", "fp32 paper vs fp64", "fp32 ours vs fp64"):
                    all_checks.append({"model": width, "check": f"max |score diff| {key} (first {exact['n']})",
                                       "value": exact[key], "met": None if "fp32" in key else exact[key] < 1e-10,
                                       "target": "< 1e-10" if key.startswith("fp64") else "(information)"})
            raw[width] = {"info": info, "results": {m: {k: v for k, v in r.items() if k not in ("inner", "sqnorm")}
                                                    for m, r in results.items()}}
            all_rows += rows_for(width, results)
            all_checks += checks_for(width, results, gpu, dtype)
    title = (f"Gradient scores: first {args.n} records of {path.name} (max_length {MAX_LENGTH}), 3 targets x 10 "
             f"anchors (mlens {MLENS}), batch {args.batch_size}, {args.device} {args.dtype}, min of {args.repeats}"
             + (f", {args.threads} thread(s)" if device.type == "cpu" else ""))
    print_table(title, all_rows, ["model", "method", "examples", "examples/s", "seconds", "time / ours", "peak MiB",
                                  "targets MiB", "max |score diff| vs ours", "note"])
    print_table("Targets", all_checks, ["model", "check", "value", "target", "met"])
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    save("gradients", {"args": vars(args), "pool_file": str(path), "target_files": [str(p) for p in target_paths()],
                       "rows": all_rows, "checks": all_checks, "raw": raw,
                       "total_s": time.perf_counter() - start}, args.output)
    out_path.with_suffix(".partial.json").unlink(missing_ok=True)
    missed = [c for c in all_checks if c["met"] is False]
    print("all targets met" if not missed else f"{len(missed)} target(s) missed: "
          + "; ".join(f"{c['model']} {c['check']}" for c in missed))


if __name__ == "__main__":
    main()
