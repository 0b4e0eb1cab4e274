"""The evaluate CLI, written once in safedata/commands/evaluate.py (installed: safedata-evaluate)."""
from safedata.cli import parse_args, run
from safedata.commands import evaluate as command


def main():
    return command.main(parse_args)


if __name__ == "__main__":
    run(main)
