"""Answer a file of prompts (AdvBench harmful_behaviors.csv, or any .json/.jsonl/.csv records) with a model.

Writes OUTPUT_DIR/responses.jsonl ({index, id, prompt, response} per prompt, file order) and meta.json.
Killed runs resume where they stopped (same flags, same output dir).
"""
import argparse

from safedata.cli import parse_args, run
from safedata.config import add_options, from_args
from safedata.generation import GenerationArgs, generate_responses


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, GenerationArgs)
    generate_responses(from_args(GenerationArgs, parse_args(p)))


if __name__ == "__main__":
    run(main)
