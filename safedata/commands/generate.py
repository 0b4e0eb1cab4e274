"""Answer a file of prompts (AdvBench harmful_behaviors.csv, or any .json/.jsonl/.csv records) with a model.

Writes OUTPUT_DIR/responses.jsonl ({index, id, prompt, response} per prompt, file order) and meta.json.
Killed runs resume where they stopped (same flags, same output dir).
"""
import argparse

from .. import cli
from ..config import add_options, from_args
from ..generation import GenerationArgs, generate_responses


def main(parse_args=cli.parse_args):
    """generate.py's work; the root script passes its own parse_args (where tests capture the parser)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, GenerationArgs)
    generate_responses(from_args(GenerationArgs, parse_args(p)))


def console() -> None:
    """The safedata-generate console script: generate.py, installed."""
    cli.run(main)
