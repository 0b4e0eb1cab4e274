"""The rank CLI, written once in safedata/commands/rank.py (installed: safedata-rank)."""
from safedata.cli import parse_args, run
from safedata.commands import rank as command


def main():
    return command.main(parse_args)


if __name__ == "__main__":
    run(main)
