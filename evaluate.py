"""Measure how often a model complied with harmful requests: keyword ASR (always) and optionally a judge.

Reads the JSONL written by generate.py ({"index", "id", "prompt", "response"} per line) and writes
OUTPUT_DIR/results.jsonl (each record with refused, matched_keyword and the judge's fields) and
OUTPUT_DIR/summary.json.
"""
import argparse
import json

from safedata.cli import run
from safedata.evaluation import JUDGE_CHOICES, PAPER_SCORE_FORMAT, evaluate_file


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--responses", required=True, help="generate.py's responses JSONL")
    p.add_argument("--output_dir", required=True, help="where results.jsonl and summary.json go")
    p.add_argument("--judge", choices=JUDGE_CHOICES, default="keyword",
                   help="none/keyword: keyword ASR only; local: a Llama-Guard-style model; "
                        "api: an OpenAI-compatible chat API scoring 1-5 with our own rubric, or with --judge_prompt "
                        "(default: keyword)")
    p.add_argument("--judge_prompt", default=None, metavar="FILE",
                   help="api: your judge prompt instead of our rubric (e.g. the paper's GPT-4 judge prompt, which we "
                        "do not ship): UTF-8 text with {prompt} and {response} where the request and the answer go, "
                        "sent as one user message; summary keys judge_prompt_* (ours: safedata_rubric_*)")
    p.add_argument("--judge_score_regex", default=PAPER_SCORE_FORMAT,
                   help="api with --judge_prompt: where the score 1-5 stands in the reply, as a regular expression "
                        "whose first group is the score; the last match counts (default: the paper's "
                        "'#thescore: N' line)")
    p.add_argument("--judge_model", help="local: path or Hub id of the guard model; api: the model name")
    p.add_argument("--judge_base_url", default=None,
                   help="api: base URL, requests go to {base_url}/chat/completions (default: $JUDGE_BASE_URL)")
    p.add_argument("--judge_api_key", default=None, help="api: bearer key (default: $JUDGE_API_KEY; optional)")
    p.add_argument("--max_attempts", type=int, default=5, help="api: tries per request (default: 5)")
    p.add_argument("--workers", type=int, default=4, help="api: concurrent requests (default: 4)")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="api: seconds before the first retry, doubling each time (default: 1.0)")
    p.add_argument("--timeout", type=float, default=60.0, help="api: seconds per request (default: 60)")
    p.add_argument("--batch_size", type=int, default=8, help="local: pairs per generation batch (default: 8)")
    p.add_argument("--max_new_tokens", type=int, default=10, help="local: tokens the guard may generate (default: 10)")
    p.add_argument("--dtype", default=None, help="local: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--device", default=None, help="local: e.g. cuda:0 or cpu (default: GPU if any)")
    p.add_argument("--model", default=None,
                   help="the evaluated model, recorded in the summary (default: 'model' of meta.json next to --responses)")
    a = p.parse_args()
    summary = evaluate_file(a.responses, a.output_dir, judge=a.judge, judge_model=a.judge_model,
                            judge_base_url=a.judge_base_url, judge_api_key=a.judge_api_key,
                            max_attempts=a.max_attempts, workers=a.workers, backoff=a.backoff, timeout=a.timeout,
                            batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, dtype=a.dtype,
                            device=a.device, model=a.model, judge_prompt=a.judge_prompt,
                            judge_score_regex=a.judge_score_regex)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    run(main)
