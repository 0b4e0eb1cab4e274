"""The summarize CLI, written once in safedata/commands/summarize.py (installed: safedata-summarize)."""
from safedata.cli import parse_args, run
from safedata.commands import summarize as command


def main():
    return command.main(parse_args)


if __name__ == "__main__":
    run(main)
