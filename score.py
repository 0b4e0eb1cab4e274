"""The score CLI, written once in safedata/commands/score.py (installed: safedata-score)."""
from safedata.cli import parse_args, run
from safedata.commands import score as command


def main():
    return command.main(parse_args)


if __name__ == "__main__":
    run(main)
