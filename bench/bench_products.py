"""The floor of exact dense scoring on one device: per-example products against the weight gradient they replace.

A training step's weight gradient of a Linear layer is one GEMM over the batch's tokens, dW = g^T x
([out, B*T] x [B*T, in]). Exact scoring against dense targets needs each example's own G_i = g_i^T x_i
(the same FLOPs, as B GEMMs with B outputs instead of one), then ||G_i||^2 and <G_i, T_j> for J targets: reads of
B x out x in per-example values and J x out x in target values that a training step never makes. This prints, for
every Linear shape of a decoder layer of the model's config (the LM head and embeddings apart: the engine handles
those by ghost products and rows), summed over the layers:

  weight grad    torch.mm(g^T, x): what the training step computes
  per-example    torch.bmm(g^T, x) into a reused buffer (safedata.features.gradients.context.Workspace)
  norms          ||G_i||^2 (torch.linalg.vector_norm, as the ScoreAccumulator)
  target dots    <G_i, T_j>: one GEMM [B, out*in] x [out*in, J]

and the ratios per-example / weight grad and (per-example + norms + target dots) / weight grad: the second is what
the decoder layers' hooks cost against the weight gradients they stand in for, before anything else in the pass.
Random values of the real shapes; each timing is the minimum of --repeats after a warm-up.

  python bench/bench_products.py                                # SmolLM2-135M (make smollm2), B 8, T 137
  python bench/bench_products.py --batch_size 32 --targets 3
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def fastest(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"),
                   help="a model directory, a config.json or a cached Hub id (only the config is read)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--tokens", type=int, default=137, help="tokens per example (the padded batch length)")
    p.add_argument("--targets", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "products.json"))
    a = p.parse_args()
    from safedata.plan import model_shape
    shape = model_shape(a.model)       # the decoder's Linear shapes, from the model built on the meta device
    torch.set_num_threads(a.threads)
    B, T, J = a.batch_size, a.tokens, a.targets
    seconds = {"weight grad": 0.0, "per-example": 0.0, "norms": 0.0, "target dots": 0.0}
    for (n, m), count in Counter(shape.decoder_linears).items():    # (in, out), and how many Linears have it
        g, x = torch.randn(B, T, m), torch.randn(B, T, n)
        targets = torch.randn(J, m * n)
        grads = torch.empty(B, m, n)
        flat = grads.view(B, -1)
        seconds["weight grad"] += count * fastest(lambda: torch.mm(g.reshape(B * T, m).T, x.reshape(B * T, n)),
                                                  a.repeats)
        seconds["per-example"] += count * fastest(lambda: torch.bmm(g.transpose(1, 2), x, out=grads), a.repeats)
        seconds["norms"] += count * fastest(lambda: torch.linalg.vector_norm(flat, dim=1).square(), a.repeats)
        seconds["target dots"] += count * fastest(lambda: torch.mm(flat, targets.T), a.repeats)
    hooks = seconds["per-example"] + seconds["norms"] + seconds["target dots"]
    ratios = {"per-example / weight grad": seconds["per-example"] / seconds["weight grad"],
              "(per-example + norms + target dots) / weight grad": hooks / seconds["weight grad"]}
    print(f"{Path(a.model).name}: {shape.n_layers} decoder layers, batch {B} x {T} tokens, {J} dense targets, "
          f"{a.threads} threads (seconds per batch, all layers)")
    for name, value in seconds.items():
        print(f"  {name:12s} {value:7.3f} s")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x")
    from common import machine
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": a.model, "batch_size": B, "tokens": T, "targets": J, "threads": a.threads,
                               "repeats": a.repeats, "seconds": seconds, "ratios": ratios, "machine": machine()},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
