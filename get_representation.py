"""The get_representation CLI, written once in safedata/commands/get_representation.py."""
from safedata.cli import parse_args, run
from safedata.commands import get_representation as command


def main():
    return command.main(parse_args)


if __name__ == "__main__":
    run(main)
