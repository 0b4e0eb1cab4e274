"""The generate CLI, written once in safedata/commands/generate.py (installed: safedata-generate)."""
from safedata.cli import parse_args, run
from safedata.commands import generate as command


def main():
    return command.main(parse_args)


if __name__ == "__main__":
    run(main)
