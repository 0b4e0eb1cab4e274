"""Answer a file of prompts (AdvBench, or any records) with a model: batched, resumable, shardable.

Prompts are wrapped by `data.prompt_ids` with the template the model was fine-tuned with
(read from its finetune_meta.json; another template is refused unless asked for).
Batches are groups of prompts of similar length, left-padded with an attention mask;
greedy decoding by default. Each finished batch is appended to a partial file (flushed and
fsynced), so a killed run resumes where it stopped; the batches are a fixed function of the
prompts and flags, so a resumed run writes the same bytes as an uninterrupted one.

Output in OUTPUT_DIR: `responses.jsonl` (one {index, id, prompt, response} per prompt, file
order) and `meta.json` (model, data file sha256, template, flags). With `--shard I/N` each
shard writes its part under OUTPUT_DIR/parts/ and whichever shard finishes last merges.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig as HFGenerationConfig

from . import data as D
from .config import StageArgs, option, shared
from .errors import UserError
from .models import load_model, load_tokenizer, model_identity
from .progress import progress
from .store import META, atomic_write_text, environment, fingerprint, model_key, now, parse_shard, read_json, write_json
from .templates import resolve_template

log = logging.getLogger(__name__)

FINETUNE_IDENTITY = ("settings", "train_loss", "epoch_losses", "total_steps")   # of finetune_meta.json

RESPONSES = "responses.jsonl"
PARTS = "parts"
BACKENDS = ("hf", "vllm")


@dataclass(kw_only=True)
class GenerationArgs:
    """generate.py's settings (its flags are generated from these fields)."""

    model_name: str = option(help="Hugging Face id, local checkpoint or LoRA adapter directory")
    data_path: str = option(help="prompts: AdvBench CSV (one column without header, or goal,target) or "
                                 "alpaca-style records", deprecated=("--prompts",))
    output_dir: str = option(help="where responses.jsonl and meta.json go (a rerun with the same flags resumes "
                                  "there)")
    template: str | None = shared(StageArgs, "template")
    allow_template_mismatch: bool = option(False, "use --template even though the model was fine-tuned with "
                                                  "another one")
    batch_size: int = option(16, "prompts per generate call (left-padded; default: 16)")
    max_new_tokens: int = option(512, "the longest answer in tokens (default: 512, the paper's)")
    do_sample: bool = option(False, "sample (default: greedy)")
    temperature: float = option(1.0, "with --do_sample: softmax temperature (default: 1.0)")
    top_p: float = option(1.0, "with --do_sample: nucleus sampling mass (default: 1.0)")
    seed: int = option(42, "sampling seed (each batch is seeded from it)")
    shard: str | None = option(None, "I/N: answer this part of N (default: the SLURM array task, else all)")
    backend: str = option("hf", "hf (transformers) or vllm (if installed)", choices=BACKENDS)
    dtype: str | None = option("auto", "auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    device: str | None = option(None, "e.g. cuda:0 or cpu (default: the GPU if any)")
    tensor_parallel_size: int = option(1, "vllm: GPUs per model")
    skip_bad: bool = option(False, "skip (count and log) bad records instead of stopping")
    overwrite: bool = option(False, "replace responses made with other flags")
    field_map: str | None = shared(StageArgs, "field_map")


# ----------------------------------------------------------------------------- templates


# ----------------------------------------------------------------------------- backends


def eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if ids is not None else tokenizer.eos_token_id
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    return [int(i) for i in ids if i is not None]


def cut_at_eos(tokens: list[int], stop: set[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in stop:
            return tokens[:position]
    return tokens


class HFBackend:
    """transformers' generate on one device; batches left-padded with an attention mask."""

    name = "hf"

    def __init__(self, model_name, dtype=None, device=None):
        self.model, self.tokenizer = load_model(model_name, dtype, device)
        self.pad_id = D.pad_token_id(self.tokenizer)
        self.stop = eos_ids(self.model, self.tokenizer)
        self.device = next(self.model.parameters()).device
        self.dtype = str(next(self.model.parameters()).dtype).split(".")[-1]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens, do_sample, temperature, top_p,
                 seed) -> list[list[int]]:
        items = [D.Encoded(0, "", ids, [D.IGNORE_INDEX] * len(ids)) for ids in prompts]
        batch = D.collate(items, self.pad_id, padding_side="left")
        if do_sample:  # pure temperature / nucleus sampling: no top-k cut
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        else:
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        config = HFGenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=self.pad_id,
                                    eos_token_id=self.stop, **sampling)
        torch.manual_seed(seed)
        out = self.model.generate(input_ids=batch["input_ids"].to(self.device),
                                  attention_mask=batch["attention_mask"].to(self.device), generation_config=config)
        new = out[:, batch["input_ids"].shape[1]:].tolist()
        return [cut_at_eos(row, set(self.stop)) for row in new]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


class VLLMBackend:
    """vLLM (imported only when asked for): whole batches at once, tensor parallel over GPUs."""

    name = "vllm"

    def __init__(self, model_name, dtype=None, tensor_parallel_size=1, seed=42):
        try:
            from vllm import LLM
        except ImportError:
            raise UserError("--backend vllm: vLLM is not installed in this environment (pip install vllm); "
                            "or use --backend hf") from None
        if (Path(model_name) / "adapter_config.json").exists():
            raise UserError(f"--backend vllm: {model_name} is a LoRA adapter; fine-tune with --merge_lora and "
                            "generate from the merged checkpoint, or use --backend hf")
        self.tokenizer = load_tokenizer(model_name)
        self.dtype = {None: "auto", "auto": "bfloat16", "bf16": "bfloat16", "fp16": "float16",
                      "fp32": "float32"}.get(dtype, dtype)
        self.llm = LLM(model=model_name, tokenizer=model_name, dtype=self.dtype, seed=seed,
                       tensor_parallel_size=tensor_parallel_size)
        self.stop = [self.tokenizer.eos_token_id]

    def generate(self, prompts, max_new_tokens, do_sample, temperature, top_p, seed):
        from vllm import SamplingParams
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                                top_p=top_p if do_sample else 1.0, seed=seed)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        return [cut_at_eos(list(o.outputs[0].token_ids), set(self.stop)) for o in outputs]

    def decode(self, tokens):
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def make_backend(config: GenerationArgs):
    if config.backend == "hf":
        return HFBackend(config.model_name, config.dtype, config.device)
    if config.backend == "vllm":
        return VLLMBackend(config.model_name, config.dtype, config.tensor_parallel_size, config.seed)
    raise UserError(f"--backend {config.backend!r}: choose from {', '.join(BACKENDS)}")


# ----------------------------------------------------------------------------- partial files


def record_line(record: dict) -> str:
    return json.dumps({k: record[k] for k in ("index", "id", "prompt", "response")}, ensure_ascii=False) + "\n"


class PartialFile:
    """Append-only JSONL of finished records, headed by the run's fingerprint; survives kill -9."""

    def __init__(self, path: Path, run_fingerprint: str):
        self.path = path
        self.fingerprint = run_fingerprint

    def load(self, repair: bool = True) -> dict[int, dict]:
        """Records already done (by index). The owner (repair=True) drops a stale file and cuts a torn
        last line so its appends stay valid; readers of other shards' files (repair=False) only read."""
        if not self.path.exists():
            return {}
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = {}
        if header.get("fingerprint") != self.fingerprint:
            if not repair:
                return {}
            log.warning("%s: made by another run (fingerprint %s, now %s); starting again",
                        self.path, header.get("fingerprint"), self.fingerprint)
            self.path.unlink()
            return {}
        done, good_bytes = {}, len(lines[0]) + 1
        for line in lines[1:]:
            if not line:
                break
            try:
                record = json.loads(line)
                done[int(record["index"])] = record
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
                break  # a torn last line from a kill: cut it off
            good_bytes += len(line) + 1
        if good_bytes < len(raw) and repair:
            log.warning("%s: dropping %d byte(s) of a torn last write", self.path, len(raw) - good_bytes)
            with open(self.path, "r+b") as handle:
                handle.truncate(good_bytes)
                handle.flush()
                os.fsync(handle.fileno())
        if done and repair:
            log.info("resuming: %d record(s) already in %s", len(done), self.path)
        return done

    def append(self, records: list[dict]) -> None:
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            if new:
                handle.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            handle.write("".join(record_line(r) for r in records))
            handle.flush()
            os.fsync(handle.fileno())


# ----------------------------------------------------------------------------- the stage


def shard_span(n: int, shard: tuple[int, int]) -> range:
    index, count = shard
    return range(n * index // count, n * (index + 1) // count)


def part_path(output_dir: Path, shard: tuple[int, int]) -> Path:
    if shard[1] == 1:
        return output_dir / "responses.partial.jsonl"
    return output_dir / PARTS / f"shard-{shard[0]:04d}-of-{shard[1]:04d}.jsonl"


def generate_responses(config: GenerationArgs) -> bool:
    """Answer this shard's prompts; merge into responses.jsonl when every shard is done. True when complete."""
    out = Path(config.output_dir)
    if config.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    if config.max_new_tokens < 1:
        raise UserError("--max_new_tokens must be at least 1")
    if config.backend not in BACKENDS:
        raise UserError(f"--backend {config.backend!r}: choose from {', '.join(BACKENDS)}")
    shard = parse_shard(config.shard)
    template, finetune_meta = resolve_template(config.model_name, config.template, allow_mismatch=config.allow_template_mismatch)
    field_map = D.field_map_of(config.field_map)
    examples, skipped = D.load_examples(config.data_path, need_response=False, skip_bad=config.skip_bad,
                                        field_map=field_map)
    flags = {"batch_size": config.batch_size, "max_new_tokens": config.max_new_tokens, "do_sample": config.do_sample,
             "temperature": config.temperature if config.do_sample else None,
             "top_p": config.top_p if config.do_sample else None, "seed": config.seed, "backend": config.backend,
             "dtype": config.dtype, "n_shards": shard[1]}
    meta = {
        "stage": "generate",
        "model": model_identity(config.model_name),
        "model_name": config.model_name,
        "finetune": {k: finetune_meta.get(k) for k in ("base_model", "data_file", "data_sha256", "template", "kind")}
        if finetune_meta else None,
        "template": template,
        "data_file": str(Path(config.data_path).resolve()),
        "data_sha256": D.file_sha256(config.data_path),
        "n": len(examples),
        "n_cut": 0,         # prompts are read whole: generation has no --max_length (answers stop at max_new_tokens)
        "skipped": skipped,
        "flags": flags,
        # --field_map, when one was given: how the prompts' conversations were read
        **D.recorded_field_map(field_map),
    }
    identity = {k: meta[k] for k in ("model", "template", "data_sha256", "flags", "field_map") if k in meta}
    identity["model"] = model_key(meta["model"])   # the model's content, not the folder it was read from
    # A checkpoint retrained in place keeps its path, config and sizes: what its fine-tune was asked and reached
    # tells the runs apart (not the whole finetune meta: its times would make every rerun of one recipe new).
    identity["finetune_meta"] = fingerprint({k: finetune_meta.get(k) for k in FINETUNE_IDENTITY}) \
        if finetune_meta else None
    run_fp = fingerprint(identity)
    log.info("cut 0 of %d prompt(s): prompts are read whole (no --max_length in generation)", len(examples))
    meta["fingerprint"] = run_fp
    if _finished(out, run_fp, config.overwrite):
        return True

    mine = [examples[i] for i in shard_span(len(examples), shard)]
    partial = PartialFile(part_path(out, shard), run_fp)
    done = partial.load()
    pending_examples = [e for e in mine if e.index not in done]
    if pending_examples:
        backend = make_backend(config)
        prompts = [D.prompt_ids(e, template, backend.tokenizer) for e in mine]
        batches = D.length_bucketed_batches([len(p) for p in prompts], config.batch_size)
        with progress(total=len(mine), initial=len(mine) - len(pending_examples),
                      desc=f"generate {shard[0]}/{shard[1]}", unit="prompt") as bar:
            for number, positions in enumerate(batches):
                if all(mine[p].index in done for p in positions):
                    continue
                # Seeded per batch: a resumed run samples exactly what an uninterrupted one would.
                outputs = backend.generate([prompts[p] for p in positions], config.max_new_tokens, config.do_sample,
                                           config.temperature, config.top_p, seed=config.seed * 1_000_003 + number)
                records = [{"index": mine[p].index, "id": mine[p].id, "prompt": D.user_turn(mine[p]),
                            "response": backend.decode(tokens)} for p, tokens in zip(positions, outputs)]
                partial.append(records)
                for record in records:
                    done[record["index"]] = record
                bar.update(len(records))
    return _merge(out, examples, shard, run_fp, meta)


def _finished(out: Path, run_fp: str, overwrite: bool) -> bool:
    meta_path, responses = out / META, out / RESPONSES
    if not (meta_path.exists() and responses.exists()):
        return False
    old = read_json(meta_path)
    if old.get("fingerprint") == run_fp:
        log.info("%s: already complete (same model, prompts, template and flags)", responses)
        return True
    if not overwrite:
        raise UserError(f"{out} already holds responses made differently (fingerprint {old.get('fingerprint')}, "
                        f"now {run_fp}: model, template, prompts or flags differ); use another --output_dir "
                        "or --overwrite")
    log.warning("%s: replacing responses made by another run (--overwrite)", out)
    responses.unlink()
    meta_path.unlink()
    return False


def _merge(out: Path, examples, shard, run_fp: str, meta: dict) -> bool:
    records: dict[int, dict] = {}
    for i in range(shard[1]):
        part = PartialFile(part_path(out, (i, shard[1])), run_fp)
        if not part.path.exists():
            log.info("shard %d/%d not started yet; the last shard to finish merges", i, shard[1])
            return False
        records.update(part.load(repair=False))
    missing = [e.index for e in examples if e.index not in records]
    if missing:
        log.info("%d prompt(s) still to answer in other shards; the last shard to finish merges", len(missing))
        return False
    atomic_write_text(out / RESPONSES, "".join(record_line(records[e.index]) for e in examples))
    write_json(out / META, dict(meta, created=now(), environment=environment()))
    if shard[1] == 1:
        part_path(out, shard).unlink(missing_ok=True)
    log.info("wrote %s (%d responses)", out / RESPONSES, len(examples))
    return True


__all__ = ["GenerationArgs", "generate_responses", "resolve_template", "HFBackend",
           "VLLMBackend", "RESPONSES", "BACKENDS"]
